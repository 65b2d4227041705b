//! Fuzz target `client_cert_header`: the client-certificate header a trusted proxy forwards
//! (`X-SSL-Client-Cert`: URL-encoded PEM, or plain PEM), parsed into a chain and verified
//! against an agent CA as the gateway does for the header path.
//!
//! Asserts that parsing and verification never panic, and that a chain verified against the
//! fixture CA names the instance UID of the fixture agent certificate: nothing else can chain
//! to that CA.
#![no_main]

use std::sync::LazyLock;

use gateway::server::fuzzing::client_cert_chain;
use gateway::tls::AgentTrust;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

/// The CA the seeds' agent certificate is issued by (tests/fuzz/fixtures, made by
/// make_seeds.py); its key is not kept.
static TRUST: LazyLock<AgentTrust> = LazyLock::new(|| {
    AgentTrust::from_ca_pem(include_str!("../fixtures/agent-ca.pem")).expect("fixture CA")
});

const AGENT_UID: &str = include_str!("../fixtures/agent-uid.txt");

fuzz_target!(|data: &[u8]| {
    // What the HTTP layer lets through as a header value.
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let chain = client_cert_chain(&value);
    if let Ok(id) = TRUST.verify(&chain) {
        assert_eq!(id.uid.to_string(), AGENT_UID.trim(), "unexpected identity");
    }
});
