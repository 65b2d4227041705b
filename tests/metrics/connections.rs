//! Connections closed by a limit (`ampora_gateway_connections_closed_total`: `pending_shed`,
//! `first_byte_timeout`, `header_timeout`, `first_message_timeout`) and upgrades or requests
//! refused by the per-credential and per-address limits
//! (`ampora_gateway_admission_refused_total`: `credential_connection_cap`,
//! `ip_connection_cap`, `ip_rate`). That each is closed or refused on time while the port
//! carries on is e2e's (`e2e/hostile.rs`).
//!
//! `/metrics` is read here on connections of its own ([`OneShot`]): the same port, so a pooled
//! keep-alive connection would be closed by the header timeout and counted.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use agent::{ConnectError, WsConnection};
use shared::ids::InstanceUid;
use tests::{bearer, hello, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::{alone, expect_changes, series, snapshot, OneShot};

const CLOSED: &str = "ampora_gateway_connections_closed_total";
const REFUSED: &str = "ampora_gateway_admission_refused_total";

const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

fn closed(reason: &str) -> String {
    series(CLOSED, "reason", reason)
}

fn refused(reason: &str) -> String {
    series(REFUSED, "reason", reason)
}

/// Waits (bounded by [`DEADLINE`]) for the server to close `s`, reading what it sends first.
async fn closed_by_server(s: &mut TcpStream) -> anyhow::Result<()> {
    let mut buf = [0u8; 512];
    tokio::time::timeout(DEADLINE, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .map_err(|_| anyhow::anyhow!("the server did not close the connection"))
}

const PENDING_BUDGET: u64 = 16;
const SILENT: usize = 60;

#[tokio::test]
async fn silent_connections_are_counted_as_shed_or_timed_out() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| {
        c.connections.max_pending = PENDING_BUDGET;
        c.connections.max_pending_per_ip = 0;
        // Long enough for every silent connection to be accepted before the first expires.
        c.connections.first_byte_timeout_ms = 3_000;
    })
    .await?;
    let m = OneShot(server.addr);
    let s = snapshot(&m, &[CLOSED]).await?;

    // Each connection beyond the budget sheds the oldest; the last budget-full time out.
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(server.addr).await?);
    }
    for s in &mut silent {
        closed_by_server(s).await?;
    }
    let budget = PENDING_BUDGET as f64;
    expect_changes(
        &m,
        &[CLOSED],
        &s,
        &[
            (&closed("pending_shed"), SILENT as f64 - budget),
            (&closed("first_byte_timeout"), budget),
        ],
    )
    .await?;
    server.stop().await
}

#[tokio::test]
async fn half_sent_headers_and_idle_keep_alive_are_counted_as_header_timeout() -> anyhow::Result<()>
{
    let _alone = alone().await;
    let server = TestServer::start_with(|c| c.connections.header_read_timeout_secs = 1).await?;
    let m = OneShot(server.addr);
    let s = snapshot(&m, &[CLOSED]).await?;

    let mut half = TcpStream::connect(server.addr).await?;
    half.write_all(b"GET /health/live HTTP/1.1\r\nHost: ampora\r\n")
        .await?;
    closed_by_server(&mut half).await?;
    let s = expect_changes(&m, &[CLOSED], &s, &[(&closed("header_timeout"), 1.0)]).await?;

    let mut idle = TcpStream::connect(server.addr).await?;
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: ampora\r\n\r\n")
        .await?;
    closed_by_server(&mut idle).await?;
    expect_changes(&m, &[CLOSED], &s, &[(&closed("header_timeout"), 1.0)]).await?;
    server.stop().await
}

#[tokio::test]
async fn a_silent_websocket_is_counted_as_first_message_timeout() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| c.admission.first_message_timeout_secs = 1).await?;
    let m = OneShot(server.addr);
    let silent_token = server.api.token("silent").await?;
    let talks = server.api.token("talks").await?;
    let s = snapshot(&m, &[CLOSED]).await?;

    let mut silent = WsConnection::connect(&server.ws_url(), &bearer(&silent_token)).await?;
    let mut agent = WsConnection::connect(&server.ws_url(), &bearer(&talks)).await?;
    agent.send(&hello(InstanceUid::new_v7())).await?;
    assert!(agent.recv().await?.is_some());
    let ended = tokio::time::timeout(DEADLINE, silent.recv()).await??;
    assert!(ended.is_none());
    assert_eq!(silent.close_info().map(|(c, _)| c), Some(1008));
    // The one that spoke in time is not counted, now or later.
    let s = expect_changes(
        &m,
        &[CLOSED],
        &s,
        &[(&closed("first_message_timeout"), 1.0)],
    )
    .await?;
    // A measurement window, not a synchronisation: past the deadline the agent would have had.
    tokio::time::sleep(PAST_THE_FIRST_MESSAGE_DEADLINE).await;
    expect_changes(&m, &[CLOSED], &s, &[]).await?;
    agent.close(1000, "done").await;
    server.stop().await
}

/// An upgrade with `token` from `from` that must be refused with 429.
async fn throttled(url: &str, token: &str, from: Option<IpAddr>) -> anyhow::Result<()> {
    match WsConnection::connect_from(url, &bearer(token), from).await {
        Err(ConnectError::Status { status: 429, .. }) => Ok(()),
        Err(e) => anyhow::bail!("expected 429, got {e}"),
        Ok(_) => anyhow::bail!("expected 429, the upgrade was admitted"),
    }
}

#[tokio::test]
async fn per_credential_and_per_address_caps_are_counted_each_under_its_reason(
) -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| {
        c.admission.max_connections_per_credential = 2;
        c.admission.max_connections_per_ip = 3;
        c.admission.first_message_timeout_secs = 0;
    })
    .await?;
    let m = OneShot(server.addr);
    let url = server.ws_url();
    let (a, b, c) = (
        server.api.token("a").await?,
        server.api.token("b").await?,
        server.api.token("c").await?,
    );
    let s = snapshot(&m, &[REFUSED]).await?;

    let _a1 = WsConnection::connect_from(&url, &bearer(&a), None).await?;
    let _a2 = WsConnection::connect_from(&url, &bearer(&a), None).await?;
    let s = expect_changes(&m, &[REFUSED], &s, &[]).await?;
    throttled(&url, &a, None).await?;
    let s = expect_changes(
        &m,
        &[REFUSED],
        &s,
        &[(&refused("credential_connection_cap"), 1.0)],
    )
    .await?;
    let _b1 = WsConnection::connect_from(&url, &bearer(&b), None).await?;
    // 127.0.0.1 holds three: a fourth, on a fresh token, is refused for the address.
    throttled(&url, &c, None).await?;
    let s = expect_changes(&m, &[REFUSED], &s, &[(&refused("ip_connection_cap"), 1.0)]).await?;
    // The same token from another address is no refusal.
    let _c1 = WsConnection::connect_from(&url, &bearer(&c), Some(OTHER_IP)).await?;
    expect_changes(&m, &[REFUSED], &s, &[]).await?;
    server.stop().await
}

const FLOOD: usize = 40;

/// Half a second past the 1 s first-message deadline of
/// [`a_silent_websocket_is_counted_as_first_message_timeout`].
const PAST_THE_FIRST_MESSAGE_DEADLINE: Duration = Duration::from_millis(1_500);

#[tokio::test]
async fn one_address_flooding_is_counted_as_ip_rate() -> anyhow::Result<()> {
    let _alone = alone().await;
    let server = TestServer::start_with(|c| {
        c.admission.accept_rate_per_sec = 1;
        c.admission.accept_burst = 20;
        c.admission.warmup_secs = 0;
        c.admission.accept_rate_per_ip_per_sec = 1;
        c.admission.accept_burst_per_ip = 5;
    })
    .await?;
    let m = OneShot(server.addr);
    let s = snapshot(&m, &[REFUSED]).await?;
    let flooder = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .build()?;
    let mut throttled = 0;
    for _ in 0..FLOOD {
        let status = flooder
            .post(server.http_url())
            .header("Content-Type", "application/x-protobuf")
            .header(
                "Authorization",
                format!("Bearer {}", shared::token::new_bootstrap_token()),
            )
            .body(Vec::<u8>::new())
            .send()
            .await?
            .status()
            .as_u16();
        match status {
            429 => throttled += 1,
            401 => {}
            other => anyhow::bail!("unexpected status {other}"),
        }
    }
    assert!(throttled >= FLOOD / 2, "{throttled} of {FLOOD} throttled");
    // Each 429 is the address's bucket, none the gateway's (which still had tokens).
    expect_changes(
        &m,
        &[REFUSED],
        &s,
        &[(&refused("ip_rate"), throttled as f64)],
    )
    .await?;
    server.stop().await
}
