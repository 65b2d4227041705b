//! Staged rollouts: create, list, show (with live progress), history, and the operator
//! actions (pause, resume, promote, abort, rollback). The rules are the service's
//! (`service::rollouts`); this module parses requests and shapes answers, for the console too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use serde::Deserialize;
use shared::domain::Target;
use shared::rollout::{Amount, OnFailure, Rollout, RolloutEvent};
use utoipa::ToSchema;

use super::guard::{ApiJson, Caller, Operator, Viewer};
use super::{check_labels, ApiError, ApiResult, ErrorBody};
use crate::service::rollouts::actions::{Action, Payload, RolloutPlan, RolloutStatus};
use crate::service::Coordinator;

/// Soak when none is given: long enough to see a collector settle after a restart.
pub const DEFAULT_SOAK: Duration = Duration::from_secs(60);
/// How long a stage's members have to answer when no deadline is given.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(600);

/// A new rollout: a config version (`config_id`) or a package version (`package` and
/// `version`: an upgrade), whom (`group`, `labels` or `all`), and how.
#[derive(Deserialize, ToSchema)]
pub struct NewRolloutBody {
    pub config_id: Option<i64>,
    /// An upgrade: the package's name (`""` for the agent itself) ...
    pub package: Option<String>,
    /// ... and the version every member is brought to (imported for their platforms).
    pub version: Option<String>,
    pub group: Option<String>,
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub all: bool,
    /// Cumulative stage sizes, comma separated: counts and percentages, the last `100%`
    /// (default `1,5%,25%,100%`).
    pub stages: Option<String>,
    /// Soak per stage, as `90s`, `5m`, `0s` (default 60s).
    pub soak: Option<String>,
    /// Time a stage's members have to answer before they count as stragglers (default 10m).
    pub deadline: Option<String>,
    /// Failures allowed per stage: a count or a percentage of its members (default 0).
    pub budget: Option<String>,
    /// `pause` (default) or `rollback` when a gate fails.
    pub on_failure: Option<String>,
    /// An upgrade may take agents to an older version than they run (default: refused).
    #[serde(default)]
    pub allow_downgrade: bool,
    /// A config rollout goes ahead though the config fails its pre-flight check (audited).
    #[serde(default)]
    pub force: bool,
}

fn duration_ms(what: &str, text: Option<&str>, default: Duration) -> Result<i64, ApiError> {
    let d = match text {
        None => default,
        Some(t) => humantime::parse_duration(t.trim())
            .map_err(|e| ApiError::BadRequest(format!("{what} `{t}`: {e}")))?,
    };
    i64::try_from(d.as_millis()).map_err(|_| ApiError::BadRequest(format!("{what} too long")))
}

/// Parses `body` into a plan, resolving a group to its labels (the console's path too).
pub(crate) async fn plan(c: &Coordinator, body: NewRolloutBody) -> Result<RolloutPlan, ApiError> {
    let (group, target) = match (body.group, body.labels, body.all) {
        (Some(g), None, false) => {
            let group = c.group(&g).await?;
            (Some(g), group.target())
        }
        (None, Some(labels), false) if !labels.is_empty() => {
            check_labels("label", &labels)?;
            (None, Target::Labels(labels))
        }
        (None, None, true) => (None, Target::All),
        _ => {
            return Err(ApiError::BadRequest(
                "give exactly one of `group`, non-empty `labels`, or `all: true`".into(),
            ))
        }
    };
    let stages = body
        .stages
        .as_deref()
        .unwrap_or("1,5%,25%,100%")
        .split(',')
        .map(|s| s.parse::<Amount>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::BadRequest(format!("stages: {e}")))?;
    let budget = match body.budget.as_deref() {
        None => Amount::Count(0),
        Some(b) => {
            Amount::parse_budget(b).map_err(|e| ApiError::BadRequest(format!("budget: {e}")))?
        }
    };
    let on_failure = match body.on_failure.as_deref() {
        None | Some("pause") => OnFailure::Pause,
        Some("rollback") => OnFailure::Rollback,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "on_failure `{other}`: give `pause` or `rollback`"
            )))
        }
    };
    let payload = match (body.config_id, body.package, body.version) {
        (Some(id), None, None) => Payload::Config(id),
        (None, Some(name), Some(version)) => Payload::Package { name, version },
        _ => {
            return Err(ApiError::BadRequest(
                "give either `config_id`, or `package` and `version` (an upgrade)".into(),
            ))
        }
    };
    Ok(RolloutPlan {
        payload,
        group,
        target,
        stages,
        soak_ms: duration_ms("soak", body.soak.as_deref(), DEFAULT_SOAK)?,
        deadline_ms: duration_ms("deadline", body.deadline.as_deref(), DEFAULT_DEADLINE)?,
        budget,
        on_failure,
        allow_downgrade: body.allow_downgrade,
        force: body.force,
    })
}

#[utoipa::path(post, path = "/api/v1/rollouts", request_body = NewRolloutBody,
    responses((status = 200, body = Object), (status = 400, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn create_rollout(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    ApiJson(body, _): ApiJson<NewRolloutBody>,
) -> ApiResult<Rollout> {
    let plan = plan(&c, body).await?;
    Ok(Json(c.create_rollout(plan, &caller.actor).await?))
}

#[utoipa::path(get, path = "/api/v1/rollouts",
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn list_rollouts(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
) -> ApiResult<Vec<Rollout>> {
    let mut all = c.store().list_rollouts().await?;
    all.reverse();
    Ok(Json(all))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}", params(("id" = i64, Path)),
    responses((status = 200, body = RolloutStatus), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn show_rollout(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(id): Path<i64>,
) -> ApiResult<RolloutStatus> {
    Ok(Json(c.rollout_status(id).await?))
}

#[utoipa::path(get, path = "/api/v1/rollouts/{id}/events", params(("id" = i64, Path)),
    responses((status = 200, body = [Object]), (status = 404, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn rollout_events(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(id): Path<i64>,
) -> ApiResult<Vec<RolloutEvent>> {
    if c.store().get_rollout(id).await?.is_none() {
        return Err(ApiError::NotFound(format!("rollout {id}")));
    }
    Ok(Json(c.store().rollout_events(id).await?))
}

#[utoipa::path(post, path = "/api/v1/rollouts/{id}/{action}",
    params(("id" = i64, Path), ("action" = String, Path,
        description = "pause, resume, promote, abort or rollback")),
    responses((status = 200, body = Object), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody)),
    security(("api_token" = [])))]
pub(super) async fn act_on_rollout(
    State(c): State<Arc<Coordinator>>,
    caller: Caller<Operator>,
    Path((id, action)): Path<(i64, String)>,
) -> ApiResult<Rollout> {
    Ok(Json(act(&c, &caller.actor, id, &action).await?))
}

/// An action by name, as `POST /api/v1/rollouts/{id}/{action}` does (the console's too).
pub(crate) async fn act(
    c: &Coordinator,
    actor: &str,
    id: i64,
    action: &str,
) -> Result<Rollout, ApiError> {
    let action = Action::parse(action).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no action `{}`: pause, resume, promote, abort or rollback",
            action.escape_default()
        ))
    })?;
    Ok(c.rollout_action(id, action, actor).await?)
}

#[utoipa::path(get, path = "/api/v1/configs/{id}/rollouts", params(("id" = i64, Path)),
    responses((status = 200, body = [Object])), security(("api_token" = [])))]
pub(super) async fn config_rollouts(
    State(c): State<Arc<Coordinator>>,
    _caller: Caller<Viewer>,
    Path(id): Path<i64>,
) -> ApiResult<Vec<Rollout>> {
    Ok(Json(c.rollouts_of_config(id).await?))
}
