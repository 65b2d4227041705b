//! One agent that takes up the identity it is offered (`AgentOptions::accept_identity`), for
//! trying identities by hand, e.g. through `deploy/local-cluster.sh --tls`:
//!
//! ```sh
//! cargo run -p tests --example identity_agent -- ENDPOINT CA_FILE TOKEN [HOLD_SECS]
//! ```
//!
//! It connects to ENDPOINT (`wss://…/v1/opamp`) trusting CA_FILE, with bootstrap TOKEN, waits
//! until it is connected on the certificate it was issued, prints its instance uid and the
//! certificate's serial, and stays connected HOLD_SECS (default 0) before it says goodbye.
//! With CA_FILE `-` it speaks plaintext (`ws://`) and only waits for the server's first reply
//! (no identity without TLS).

use std::path::Path;
use std::time::Duration;

use agent::{wait_for, Agent, AgentOptions, ClientTls};
use anyhow::Context as _;
use shared::ids::InstanceUid;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [endpoint, ca, token, rest @ ..] = args.as_slice() else {
        anyhow::bail!("usage: identity_agent ENDPOINT CA_FILE TOKEN [HOLD_SECS]");
    };
    let hold = match rest.first() {
        Some(s) => s.parse().context("HOLD_SECS")?,
        None => 0,
    };
    let tls = match ca.as_str() {
        "-" => None,
        file => Some(ClientTls::from_ca_file(Path::new(file))?),
    };
    let want_identity = tls.is_some();
    let uid = InstanceUid::new_v7();
    let agent = Agent::start(AgentOptions {
        endpoint: endpoint.clone(),
        tls,
        token: Some(token.clone()),
        instance_uid: Some(uid.0),
        description: vec![("service.name".into(), "identity-agent".into())],
        accept_identity: true,
        ..AgentOptions::default()
    });
    let mut status = agent.status();
    let connected = wait_for(&mut status, Duration::from_secs(60), |s| {
        s.connected && s.replies > 0 && (s.client_cert_serial.is_some() || !want_identity)
    })
    .await;
    let s = match connected {
        Ok(s) => s,
        Err(e) => {
            let last = status.borrow().last_error.clone();
            anyhow::bail!("not connected as expected: {e} (last error: {last:?})");
        }
    };
    println!(
        "instance_uid={uid} serial={}",
        s.client_cert_serial.as_deref().unwrap_or_default()
    );
    tokio::time::sleep(Duration::from_secs(hold)).await;
    agent.stop().await;
    Ok(())
}
