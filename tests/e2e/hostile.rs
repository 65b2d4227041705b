//! Hostile connections (issue 17, findings 2, 3 and 10): silent TCP connections beyond the
//! pending budget, half-sent request headers, WebSockets that never speak, one credential or
//! one address taking more than its share. Each is closed or refused on time while health,
//! the API and admitted agents carry on. How each close and refusal is counted is asserted in
//! the serial metrics binary (`tests/metrics/connections.rs`).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use agent::{ConnectError, WsConnection};
use shared::ids::InstanceUid;
use tests::{bearer, eventually, hello, TestServer, DEADLINE};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A second source address on loopback (Linux routes all of 127/8 to `lo`).
const OTHER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// Waits (at most `within`) for the server to close `s`: EOF or a reset. Anything it sends
/// first (a 408, say) is read and ignored.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A WebSocket with `token` that sent its first message and got the answer.
async fn admitted_agent(server: &TestServer, token: &str) -> anyhow::Result<WsConnection> {
    let mut conn = WsConnection::connect(&server.ws_url(), &bearer(token)).await?;
    conn.send(&hello(InstanceUid::new_v7())).await?;
    anyhow::ensure!(
        conn.recv().await?.is_some(),
        "no reply to the first message"
    );
    Ok(conn)
}

/// `GET path` on a new connection, answered within `within`.
async fn answers(addr: SocketAddr, path: &str, within: Duration) -> anyhow::Result<u16> {
    let http = reqwest::Client::builder().timeout(within).build()?;
    Ok(http
        .get(format!("http://{addr}{path}"))
        .send()
        .await?
        .status()
        .as_u16())
}

const PENDING_BUDGET: u64 = 32;
const SILENT: usize = 150;
const FIRST_BYTE_MS: u64 = 1_500;

#[tokio::test]
async fn silent_connections_beyond_the_pending_budget_do_not_stop_the_port() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| {
        c.connections.max_pending = PENDING_BUDGET;
        c.connections.first_byte_timeout_ms = FIRST_BYTE_MS;
    })
    .await?;
    let token = server.api.token("steady").await?;
    let mut agent = admitted_agent(&server, &token).await?;

    // Several times the budget of connections that never say a word.
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(server.addr).await?);
    }

    // Health, the API and the admitted agent answer at once, not after the silent ones expire.
    let quick = Duration::from_secs(3);
    assert_eq!(answers(server.addr, "/health/live", quick).await?, 200);
    let (status, _) = tokio::time::timeout(
        quick,
        server.api.raw(reqwest::Method::GET, "/api/v1/agents", None),
    )
    .await??;
    assert_eq!(status, 200, "the API answers");
    agent.send(&hello(InstanceUid::new_v7())).await?;
    let reply = tokio::time::timeout(quick, agent.recv()).await??;
    assert!(reply.is_some(), "the admitted agent is answered");

    // Every silent connection is closed: shed for newcomers, or at the first-byte deadline.
    let within = Duration::from_millis(FIRST_BYTE_MS) + Duration::from_secs(5);
    for s in &mut silent {
        let left = within.saturating_sub(opened.elapsed());
        assert!(
            closed_by_server(s, left).await,
            "a silent connection outlived the first-byte deadline"
        );
    }
    server.stop().await
}

#[tokio::test]
async fn half_sent_headers_and_idle_keep_alive_are_closed_at_the_header_timeout(
) -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.connections.header_read_timeout_secs = 1).await?;

    // The request line and one header, never the blank line that ends them.
    let mut half = TcpStream::connect(server.addr).await?;
    half.write_all(b"GET /health/live HTTP/1.1\r\nHost: ampora\r\n")
        .await?;
    let started = Instant::now();
    assert!(
        closed_by_server(&mut half, Duration::from_secs(6)).await,
        "half-sent headers kept the connection open"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "closed before the timeout"
    );

    // A keep-alive connection that went quiet after its request is closed as well.
    let mut idle = TcpStream::connect(server.addr).await?;
    idle.write_all(b"GET /health/live HTTP/1.1\r\nHost: ampora\r\n\r\n")
        .await?;
    assert!(
        closed_by_server(&mut idle, Duration::from_secs(6)).await,
        "an idle keep-alive connection stayed open"
    );
    // Meanwhile, complete requests are served.
    assert_eq!(
        answers(server.addr, "/health/live", Duration::from_secs(3)).await?,
        200
    );
    server.stop().await
}

#[tokio::test]
async fn a_websocket_that_never_sends_a_first_message_is_closed() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| c.admission.first_message_timeout_secs = 1).await?;
    let silent_token = server.api.token("silent").await?;
    let mut silent = WsConnection::connect(&server.ws_url(), &bearer(&silent_token)).await?;
    let mut agent = admitted_agent(&server, &server.api.token("talks").await?).await?;

    let ended = tokio::time::timeout(Duration::from_secs(6), silent.recv()).await??;
    assert!(ended.is_none(), "a silent WebSocket got a message");
    assert_eq!(
        silent.close_info().map(|(code, _)| code),
        Some(1008),
        "closed with policy violation: {:?}",
        silent.close_info()
    );

    // The agent that spoke in time is past the deadline and still served.
    agent.send(&hello(InstanceUid::new_v7())).await?;
    assert!(agent.recv().await?.is_some(), "the agent was cut off");
    server.stop().await
}

/// The status and `Retry-After` of a refused upgrade; `None` when it was admitted.
async fn upgrade(
    url: &str,
    token: &str,
    from: Option<IpAddr>,
) -> anyhow::Result<Result<WsConnection, (u16, Option<Duration>)>> {
    match WsConnection::connect_from(url, &bearer(token), from).await {
        Ok(conn) => Ok(Ok(conn)),
        Err(ConnectError::Status {
            status,
            retry_after,
            ..
        }) => Ok(Err((status, retry_after))),
        Err(e) => Err(e.into()),
    }
}

fn is_throttled(refused: &(u16, Option<Duration>)) -> bool {
    refused.0 == 429 && refused.1.is_some_and(|d| d >= Duration::from_secs(1))
}

#[tokio::test]
async fn per_credential_and_per_address_caps_refuse_the_excess() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| {
        c.admission.max_connections_per_credential = 2;
        c.admission.max_connections_per_ip = 3;
        // The held connections stay silent on purpose.
        c.admission.first_message_timeout_secs = 0;
    })
    .await?;
    let url = server.ws_url();
    let (a, b, c) = (
        server.api.token("a").await?,
        server.api.token("b").await?,
        server.api.token("c").await?,
    );

    let a1 = upgrade(&url, &a, None)
        .await?
        .map_err(|r| anyhow::anyhow!("{r:?}"))?;
    let _a2 = upgrade(&url, &a, None)
        .await?
        .map_err(|r| anyhow::anyhow!("{r:?}"))?;
    let third = upgrade(&url, &a, None).await?;
    assert!(
        third.as_ref().is_err_and(is_throttled),
        "a third connection on one token: {:?}",
        third.err()
    );
    let _b1 = upgrade(&url, &b, None)
        .await?
        .map_err(|r| anyhow::anyhow!("{r:?}"))?;
    // 127.0.0.1 now holds three: a fourth, on a fresh token, is refused for the address.
    let fourth = upgrade(&url, &c, None).await?;
    assert!(
        fourth.as_ref().is_err_and(is_throttled),
        "a fourth connection from one address: {:?}",
        fourth.err()
    );
    // The same token from another address gets in: the others proceed.
    let _c1 = upgrade(&url, &c, Some(OTHER_IP))
        .await?
        .map_err(|r| anyhow::anyhow!("{r:?}"))?;

    // A closed connection gives its places back.
    a1.close(1000, "").await;
    let again = eventually("token a's place back", DEADLINE, || async {
        Ok(upgrade(&url, &a, None).await?.ok())
    })
    .await?;
    drop(again);
    server.stop().await
}

/// A plaintext POST to `/v1/opamp` from `from`: its status (401 once admitted, no token).
async fn post_from(server: &TestServer, http: &reqwest::Client) -> anyhow::Result<u16> {
    Ok(http
        .post(server.http_url())
        .header("Content-Type", "application/x-protobuf")
        .header("Authorization", "Bearer amp-bs.aaaaaaaa.00000000")
        .body(Vec::<u8>::new())
        .send()
        .await?
        .status()
        .as_u16())
}

const FLOOD: usize = 60;

#[tokio::test]
async fn one_address_flooding_does_not_starve_another() -> anyhow::Result<()> {
    let server = TestServer::start_with(|c| {
        // The gateway-wide bucket is small enough for one flood to empty it.
        c.admission.accept_rate_per_sec = 1;
        c.admission.accept_burst = 20;
        c.admission.warmup_secs = 0;
        c.admission.accept_rate_per_ip_per_sec = 1;
        c.admission.accept_burst_per_ip = 5;
    })
    .await?;
    let flooder = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .build()?;
    let mut statuses = Vec::new();
    for _ in 0..FLOOD {
        statuses.push(post_from(&server, &flooder).await?);
    }
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert!(
        throttled >= FLOOD - 10,
        "the flooding address was throttled ({throttled} of {FLOOD}): {statuses:?}"
    );

    // Another address still finds tokens, over plain HTTP and WebSocket.
    let other = reqwest::Client::builder().local_address(OTHER_IP).build()?;
    assert_eq!(
        post_from(&server, &other).await?,
        401,
        "admitted, then authenticated"
    );
    let token = server.api.token("other").await?;
    let conn = upgrade(&server.ws_url(), &token, Some(OTHER_IP)).await?;
    assert!(
        conn.is_ok(),
        "the other address's upgrade: {:?}",
        conn.err()
    );
    server.stop().await
}
