//! A refused agent that reconnects the moment it is closed (as clients built on opamp-go do)
//! costs a bounded number of refusals, whatever the reason, in the embedded default and in
//! the cluster sandbox.

use std::time::Duration;

use agent::WsConnection;
use coordinator::config::Config;
use shared::ids::InstanceUid;
use tests::{bearer, hello, Fleet, TestServer};

/// How long the looping client runs.
const WINDOW: Duration = Duration::from_secs(10);

/// Reconnects at once after every close for [`WINDOW`], sending `uid`'s first message each
/// time; returns how many connections were refused after the upgrade.
async fn loop_refused(url: &str, token: &str, uid: InstanceUid) -> anyhow::Result<u32> {
    let mut refused = 0;
    let _ = tokio::time::timeout(WINDOW, async {
        loop {
            let Ok(mut conn) = WsConnection::connect(url, &bearer(token)).await else {
                continue;
            };
            if conn.send(&hello(uid)).await.is_err() {
                continue;
            }
            if let Ok(Some(reply)) = conn.recv().await {
                if reply.error_response.is_some() {
                    refused += 1;
                }
            }
            // Wait for the server's close, then go again at once.
            while let Ok(Some(_)) = conn.recv().await {}
        }
    })
    .await;
    Ok(refused)
}

async fn a_looping_refused_agent_is_refused_a_handful_of_times(
    f: &impl Fleet,
) -> anyhow::Result<()> {
    // A token bound to another agent: refused at the first message, after the upgrade.
    let token = f.api().token("taken").await?;
    let owner = InstanceUid::new_v7();
    let mut conn = WsConnection::connect(&f.ws_url(), &bearer(&token)).await?;
    conn.send(&hello(owner)).await?;
    assert!(conn
        .recv()
        .await?
        .is_some_and(|r| r.error_response.is_none()));
    conn.close(1000, "done").await;

    let refused = loop_refused(&f.ws_url(), &token, InstanceUid::new_v7()).await?;
    assert!(refused >= 1, "the loop was never refused");
    // Held 1 + 2 + 4 s before each close: at most 4 refusals in 10 s, not hundreds.
    assert!(refused <= 4, "{refused} refusals in {WINDOW:?}");
    Ok(())
}
both_modes!(
    a_looping_refused_agent_is_refused_a_handful_of_times,
    |_: &mut Config| {}
);
