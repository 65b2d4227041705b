//! The cluster view: which coordinator holds the lease on which partition of agents.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::guard::{Caller, Viewer};
use super::ApiResult;
use crate::service::Coordinator;

/// Which coordinator serves which partition of agents.
#[derive(Serialize, ToSchema)]
pub struct ClusterView {
    /// The coordinator that answered.
    node: String,
    partitions: Vec<PartitionLease>,
}

#[derive(Serialize, ToSchema)]
pub struct PartitionLease {
    partition: u16,
    holder: String,
    fence: i64,
    expires_ms: i64,
}

#[utoipa::path(get, path = "/api/v1/cluster",
    responses((status = 200, body = ClusterView)), security(("api_token" = [])))]
pub(super) async fn show_cluster(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<ClusterView> {
    let partitions = c
        .store()
        .list_leases()
        .await?
        .into_iter()
        .map(|l| PartitionLease {
            partition: l.partition,
            holder: l.holder,
            fence: l.fence,
            expires_ms: l.expires_ms,
        })
        .collect();
    Ok(Json(ClusterView {
        node: c.node().to_string(),
        partitions,
    }))
}
