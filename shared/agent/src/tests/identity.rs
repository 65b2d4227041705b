//! Certificates without sockets: [`AgentCore`] under the opamp-go options.

use super::*;
use gateway::tls::{AgentCa, LocalCa};
use proto::v1::TlsCertificate;

const UID: [u8; 16] = [0x31; 16];

struct Fixture {
    _dir: tempfile::TempDir,
    ca: AgentCa,
    ca_pem: String,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("dir");
    let local = LocalCa::new(dir.path(), vec!["localhost".into()]);
    local.ensure().expect("ca");
    let ca = AgentCa::from_files(&local.ca_cert_path, &local.ca_key_path).expect("ca");
    let ca_pem = ca.ca_pem().to_string();
    Fixture {
        _dir: dir,
        ca,
        ca_pem,
    }
}

fn opts(f: &Fixture, endpoint: &str) -> AgentOptions {
    AgentOptions {
        endpoint: endpoint.into(),
        tls: Some(ClientTls::from_ca_pem(&f.ca_pem).expect("tls")),
        token: Some("amp-bs.x".into()),
        instance_uid: Some(UID),
        accept_identity: true,
        capabilities: DEFAULT_CAPABILITIES | proto::agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS,
        ..AgentOptions::default()
    }
}

/// An offer of a freshly issued certificate with its key; (offer, serial).
fn offer(f: &Fixture, hash: &[u8], endpoint: &str) -> (ServerToAgent, String) {
    let issued =
        f.ca.issue(
            shared::ids::InstanceUid(UID),
            None,
            Duration::from_secs(3600),
        )
        .expect("issue");
    let msg = ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: hash.to_vec(),
            opamp: Some(OpAmpConnectionSettings {
                destination_endpoint: endpoint.into(),
                heartbeat_interval_seconds: 30,
                certificate: Some(TlsCertificate {
                    cert: issued.cert_pem.as_bytes().to_vec(),
                    private_key: issued.private_key_pem.clone().expect("key").into_bytes(),
                    ca_cert: f.ca_pem.as_bytes().to_vec(),
                }),
                ..OpAmpConnectionSettings::default()
            }),
            ..ConnectionSettingsOffers::default()
        }),
        ..ServerToAgent::default()
    };
    (msg, issued.serial)
}

fn on_certificate(core: &AgentCore) -> bool {
    let c = core.connection();
    c.headers.is_empty() && c.tls.as_ref().is_some_and(ClientTls::has_client_cert)
}

#[test]
fn restart_on_offer_takes_every_certificate_offer_and_reports_nothing() {
    let f = fixture();
    let (mut core, rx) = AgentCore::new(AgentOptions {
        restart_on_settings_offer: true,
        ..opts(&f, "wss://127.0.0.1:1/v1/opamp")
    });
    let (o, serial) = offer(&f, b"h1", "wss://127.0.0.1:1/v1/opamp");
    let out = core.on_message(o.clone());
    assert!(out.restart && !out.switch);
    assert!(out.send.is_empty(), "no ConnectionSettingsStatus");
    assert!(on_certificate(&core));
    // A certificate that does not work is kept (the supervisor retries its new client).
    assert!(!core.connection_failed("handshake"));
    assert!(on_certificate(&core));
    core.connection_succeeded();
    core.client_restarted();
    assert_eq!(rx.borrow().client_cert_serial.as_deref(), Some(&*serial));
    let first = core.connect_message();
    assert_eq!(first.sequence_num, 0);
    assert!(first.connection_settings_status.is_none());
    // The very same offer again: no hash is remembered, so it restarts again.
    let out = core.on_message(o.clone());
    assert!(out.restart && out.send.is_empty());
    let s = rx.borrow().clone();
    assert_eq!((s.settings_offers, s.settings_offers_with_key), (2, 2));
    assert_eq!(s.client_restarts, 1);
    // The certificate in use repeated without its key cannot be started on its own: the
    // client restarts anyway, on the settings it had.
    core.connection_succeeded();
    let mut keyless = o;
    if let Some(c) = keyless
        .connection_settings
        .as_mut()
        .and_then(|c| c.opamp.as_mut())
        .and_then(|o| o.certificate.as_mut())
    {
        c.private_key.clear();
    }
    let out = core.on_message(keyless);
    assert!(out.restart && out.send.is_empty());
    assert!(on_certificate(&core), "still on its certificate");
    assert_eq!(rx.borrow().settings_offers_with_key, 2);
}

#[test]
fn process_restart_forgets_the_certificate_only_when_asked() {
    let f = fixture();
    for forget in [false, true] {
        let (mut core, rx) = AgentCore::new(AgentOptions {
            forget_identity_on_restart: forget,
            ..opts(&f, "wss://127.0.0.1:1/v1/opamp")
        });
        let (o, serial) = offer(&f, b"h1", "wss://127.0.0.1:1/v1/opamp");
        assert!(core.on_message(o).switch);
        core.connection_succeeded();
        assert!(on_certificate(&core));
        core.heartbeat_message();
        let mut core = core.process_restarted(forget);
        let s = rx.borrow().clone();
        assert_eq!((s.process_restarts, s.client_restarts), (1, 0));
        assert_eq!(core.connect_message().sequence_num, 0);
        if forget {
            assert_eq!(
                core.connection().headers,
                vec![("Authorization".to_string(), "Bearer amp-bs.x".to_string())],
                "back on the bootstrap token"
            );
            assert!(!core.connection().tls.is_some_and(|t| t.has_client_cert()));
            assert_eq!(s.client_cert_serial, None);
        } else {
            assert!(on_certificate(&core), "kept, as if persisted");
            assert_eq!(s.client_cert_serial.as_deref(), Some(&*serial));
        }
    }
}

#[test]
fn offered_scheme_picks_the_transport_only_with_the_option() {
    let f = fixture();
    let https = "https://127.0.0.1:1/v1/opamp";
    for pick in [false, true] {
        let (mut core, rx) = AgentCore::new(AgentOptions {
            transport_from_offer_scheme: pick,
            ..opts(&f, "wss://127.0.0.1:1/v1/opamp")
        });
        let configured = Endpoint::parse(&core.options().endpoint).expect("endpoint");
        let (o, _) = offer(&f, b"h1", https);
        assert!(core.on_message(o).switch);
        let expect = if pick { Scheme::Http } else { Scheme::Ws };
        assert_eq!(core.next_scheme(&configured), expect, "option {pick}");
        assert_eq!(rx.borrow().offered_endpoints, vec![https.to_string()]);
    }
}
