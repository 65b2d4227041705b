//! The latency histograms, counted exactly through their `_count` series: one observation per
//! API request under its route template (never the raw path), one per OpAMP message answered
//! under its transport, one per bus request under its kind.

use agent::{HttpTransport, WsConnection};
use shared::ids::InstanceUid;
use tests::{bearer, hello, TestServer};

use crate::{alone, expect_changes, snapshot};

const API: &str = "ampora_api_request_duration_seconds_count";
const OPAMP: &str = "ampora_opamp_message_duration_seconds_count";
const BUS: &str = "ampora_bus_request_duration_seconds_count";

fn api_series(method: &str, route: &str, status: u16) -> String {
    format!("{API}{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}}")
}

fn bus_series(kind: &str) -> String {
    format!("{BUS}{{kind=\"{kind}\",outcome=\"ok\"}}")
}

#[tokio::test]
async fn api_requests_are_timed_by_route_template() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    let before = snapshot(api, &[API]).await?;
    // Two different uids, one series: the label is the template.
    for _ in 0..2 {
        let uid = InstanceUid::new_v7().to_string();
        anyhow::ensure!(api.agent(&uid).await?.is_none(), "no agent {uid}");
    }
    // A method nobody defined is one label, whatever its name.
    let (s, _) = api
        .raw(
            reqwest::Method::from_bytes(b"FROBNICATE")?,
            "/api/v1/agents",
            None,
        )
        .await?;
    assert_eq!(s, 405);
    api.get("/api/v1/agents").await?;
    expect_changes(
        api,
        &[API],
        &before,
        &[
            (&api_series("GET", "/api/v1/agents/{uid}", 404), 2.0),
            (&api_series("other", "/api/v1/agents", 405), 1.0),
            (&api_series("GET", "/api/v1/agents", 200), 1.0),
        ],
    )
    .await?;
    server.stop().await
}

#[tokio::test]
async fn opamp_messages_and_bus_requests_are_timed_per_transport_and_kind() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start().await?;
    let api = &server.api;
    let families = &[OPAMP, BUS];
    let token = api.token("timed").await?;
    let mut s = snapshot(api, families).await?;

    // WebSocket: the upgrade authenticates once, then each message is one frame request and
    // one round trip.
    let mut ws = WsConnection::connect(&server.ws_url(), &bearer(&token)).await?;
    let uid = InstanceUid::new_v7();
    for _ in 0..2 {
        ws.send(&hello(uid)).await?;
        anyhow::ensure!(ws.recv().await?.is_some(), "answered");
    }
    s = expect_changes(
        api,
        families,
        &s,
        &[
            (&format!("{OPAMP}{{transport=\"ws\"}}"), 2.0),
            (&bus_series("authenticate"), 1.0),
            (&bus_series("frame"), 2.0),
        ],
    )
    .await?;
    ws.close(1000, "done").await;

    // Plain HTTP: every request authenticates and is one frame request.
    let mut http = HttpTransport::new(&server.http_url(), bearer(&token), false);
    http.exchange(&hello(uid)).await?;
    expect_changes(
        api,
        families,
        &s,
        &[
            (&format!("{OPAMP}{{transport=\"http\"}}"), 1.0),
            (&bus_series("authenticate"), 1.0),
            (&bus_series("frame"), 1.0),
        ],
    )
    .await?;
    server.stop().await
}
