//! Unit tests of the protocol core: sequence numbers, full-state resends, the remote config
//! status flow, uid adoption, server errors and connection-settings offers, all without
//! sockets.

use std::collections::BTreeMap;

use proto::v1::{
    AgentConfigFile, AgentIdentification, ConnectionSettingsOffers, OpAmpConnectionSettings,
    RetryInfo, ServerErrorResponse,
};

use super::*;
use crate::options::DEFAULT_CAPABILITIES;

const UID: [u8; 16] = [9; 16];

fn opts() -> AgentOptions {
    AgentOptions {
        instance_uid: Some(UID),
        description: vec![("service.name".into(), "svc".into())],
        non_identifying: vec![("host.name".into(), "h1".into())],
        initial_config: "a: 1\n".into(),
        ..AgentOptions::default()
    }
}

fn string_attr(kvs: &[KeyValue], key: &str) -> Option<String> {
    kvs.iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

fn single_body(msg: &AgentToServer) -> Vec<u8> {
    let map = &msg
        .effective_config
        .as_ref()
        .and_then(|e| e.config_map.as_ref())
        .expect("effective config")
        .config_map;
    assert_eq!(map.len(), 1);
    map.values()
        .next()
        .map(|f| f.body.clone())
        .unwrap_or_default()
}

fn remote(hash: &[u8], files: &[(&str, &str)]) -> ServerToAgent {
    ServerToAgent {
        instance_uid: UID.to_vec(),
        remote_config: Some(AgentRemoteConfig {
            config: Some(AgentConfigMap {
                config_map: files
                    .iter()
                    .map(|(n, b)| {
                        (
                            n.to_string(),
                            AgentConfigFile {
                                body: b.as_bytes().to_vec(),
                                content_type: "text/yaml".into(),
                            },
                        )
                    })
                    .collect(),
            }),
            config_hash: hash.to_vec(),
        }),
        ..ServerToAgent::default()
    }
}

#[test]
fn first_message_is_a_full_report_with_seq_zero() {
    let (mut core, rx) = AgentCore::new(opts());
    let m = core.full_state();
    assert_eq!(m.instance_uid, UID.to_vec());
    assert_eq!(m.sequence_num, 0);
    assert_eq!(m.capabilities, DEFAULT_CAPABILITIES);
    assert_eq!(m.flags, 0);
    let d = m.agent_description.as_ref().expect("description");
    assert_eq!(
        string_attr(&d.identifying_attributes, "service.name").as_deref(),
        Some("svc")
    );
    assert_eq!(
        string_attr(&d.non_identifying_attributes, "host.name").as_deref(),
        Some("h1")
    );
    let h = m.health.as_ref().expect("health");
    assert!(h.healthy);
    assert_eq!(h.status, "running");
    assert_eq!(single_body(&m), b"a: 1\n");
    let rcs = m
        .remote_config_status
        .as_ref()
        .expect("status is always reported");
    assert_eq!(
        (rcs.status, rcs.last_remote_config_hash.len()),
        (RemoteConfigStatuses::Unset as i32, 0),
        "nothing received yet"
    );
    assert!(m.agent_disconnect.is_none());
    assert_eq!(rx.borrow().instance_uid, Some(UID));
    assert_eq!(rx.borrow().effective_config, "a: 1\n");
}

#[test]
fn sequence_numbers_increase_by_one_per_message() {
    let (mut core, _rx) = AgentCore::new(opts());
    assert_eq!(core.full_state().sequence_num, 0);
    let hb = core.heartbeat_message();
    assert_eq!(hb.sequence_num, 1);
    assert_eq!(hb.instance_uid, UID.to_vec());
    assert_eq!(hb.capabilities, DEFAULT_CAPABILITIES);
    assert!(hb.agent_description.is_none() && hb.effective_config.is_none());
    assert_eq!(core.heartbeat_message().sequence_num, 2);
    let bye = core.disconnect_message();
    assert_eq!(bye.sequence_num, 3);
    assert!(bye.agent_disconnect.is_some());
}

#[test]
fn plain_ack_needs_no_answer_and_is_counted() {
    let (mut core, rx) = AgentCore::new(opts());
    core.full_state();
    let out = core.on_message(ServerToAgent {
        instance_uid: UID.to_vec(),
        capabilities: 0x67,
        ..ServerToAgent::default()
    });
    assert!(out.send.is_empty() && !out.reconnect);
    let s = rx.borrow().clone();
    assert_eq!((s.replies, s.server_capabilities), (1, 0x67));
    // A later reply without capabilities keeps the known value.
    core.on_message(ServerToAgent::default());
    assert_eq!(rx.borrow().server_capabilities, 0x67);
}

#[test]
fn report_full_state_resends_everything() {
    let (mut core, rx) = AgentCore::new(opts());
    let first = core.full_state();
    core.heartbeat_message();
    let out = core.on_message(ServerToAgent {
        flags: server_flags::REPORT_FULL_STATE,
        ..ServerToAgent::default()
    });
    assert_eq!(out.send.len(), 1);
    let again = &out.send[0];
    assert_eq!(again.sequence_num, 2);
    assert_eq!(again.agent_description, first.agent_description);
    assert_eq!(again.health, first.health);
    assert_eq!(again.effective_config, first.effective_config);
    assert_eq!(again.capabilities, first.capabilities);
    assert_eq!(rx.borrow().full_state_requests, 1);
}

#[test]
fn remote_config_reports_applying_then_applied_with_the_hash() {
    let (mut core, rx) = AgentCore::new(opts());
    core.full_state();
    let out = core.on_message(remote(b"h1", &[("", "b: 2\n")]));
    assert!(!out.reconnect);
    assert_eq!(out.send.len(), 2);
    let (applying, applied) = (&out.send[0], &out.send[1]);
    assert_eq!((applying.sequence_num, applied.sequence_num), (1, 2));
    let st = applying.remote_config_status.as_ref().expect("applying");
    assert_eq!(st.status, RemoteConfigStatuses::Applying as i32);
    assert_eq!(st.last_remote_config_hash, b"h1");
    let st = applied.remote_config_status.as_ref().expect("applied");
    assert_eq!(st.status, RemoteConfigStatuses::Applied as i32);
    assert_eq!(st.last_remote_config_hash, b"h1");
    assert_eq!(single_body(applied), b"b: 2\n");

    let s = rx.borrow().clone();
    assert_eq!(s.applied_configs, 1);
    assert_eq!(s.last_remote_config_hash.as_deref(), Some(&b"h1"[..]));
    assert_eq!(s.effective_config, "b: 2\n");

    // A later full report (e.g. after a reconnect) carries the new state.
    let full = core.full_state();
    assert_eq!(single_body(&full), b"b: 2\n");
    assert_eq!(
        full.remote_config_status.map(|s| s.status),
        Some(RemoteConfigStatuses::Applied as i32)
    );

    // The same offer again is acknowledged without re-applying.
    let out = core.on_message(remote(b"h1", &[("", "b: 2\n")]));
    assert_eq!(out.send.len(), 1);
    assert!(out.send[0].effective_config.is_none());
    assert_eq!(rx.borrow().applied_configs, 1);
}

#[test]
fn multi_file_config_round_trips() {
    let (mut core, rx) = AgentCore::new(opts());
    let files = [("a.yaml", "x: 1\n"), ("b.yaml", "ünï: 2\n"), ("c.yaml", "")];
    let out = core.on_message(remote(b"h", &files));
    let map = out.send[1]
        .effective_config
        .clone()
        .and_then(|e| e.config_map)
        .expect("map")
        .config_map;
    let expect: BTreeMap<String, AgentConfigFile> = remote(b"h", &files)
        .remote_config
        .and_then(|r| r.config)
        .expect("cfg")
        .config_map;
    assert_eq!(map, expect);
    assert_eq!(rx.borrow().effective_config, "x: 1\nünï: 2\n");
}

#[test]
fn an_agent_refuses_or_sickens_on_the_configs_it_dislikes() {
    let (mut core, rx) = AgentCore::new(AgentOptions {
        fail_configs_containing: Some("kafka".into()),
        unhealthy_configs_containing: Some("unreachable".into()),
        capabilities: opts().capabilities | agent_caps::REPORTS_HEALTH,
        ..opts()
    });
    let out = core.on_message(remote(b"h1", &[("", "exporters: {kafka: {}}\n")]));
    let st = out.send[1].remote_config_status.as_ref().expect("status");
    assert_eq!(st.status, RemoteConfigStatuses::Failed as i32);
    assert_eq!(st.error_message, DISLIKED);
    assert_eq!(rx.borrow().applied_configs, 0);

    let out = core.on_message(remote(b"h2", &[("", "endpoint: unreachable\n")]));
    let st = out.send[1].remote_config_status.as_ref().expect("status");
    assert_eq!(st.status, RemoteConfigStatuses::Applied as i32);
    let h = out.send[1]
        .health
        .as_ref()
        .expect("health changed, so reported");
    assert!(!h.healthy);
    assert_eq!(h.last_error, SICKENED);
    assert!(!core.full_state().health.expect("health").healthy);

    let out = core.on_message(remote(b"h3", &[("", "endpoint: fine\n")]));
    assert!(
        out.send[1].health.as_ref().expect("health").healthy,
        "well again"
    );
    let out = core.on_message(remote(b"h4", &[("", "endpoint: fine too\n")]));
    assert!(
        out.send[1].health.is_none(),
        "unchanged health is not repeated"
    );
}

#[test]
fn failing_agent_reports_failed_with_a_reason() {
    let (mut core, rx) = AgentCore::new(AgentOptions {
        fail_configs: true,
        ..opts()
    });
    let out = core.on_message(remote(b"h2", &[("", "c: 3\n")]));
    assert_eq!(out.send.len(), 2);
    let st = out.send[1].remote_config_status.as_ref().expect("status");
    assert_eq!(st.status, RemoteConfigStatuses::Failed as i32);
    assert_eq!(st.last_remote_config_hash, b"h2");
    assert_eq!(st.error_message, REJECTED);
    assert!(out.send[1].effective_config.is_none(), "config not applied");
    let s = rx.borrow().clone();
    assert_eq!(s.applied_configs, 0);
    assert_eq!(s.effective_config, "a: 1\n");
}

#[test]
fn remote_config_is_ignored_without_the_capability() {
    let (mut core, _rx) = AgentCore::new(AgentOptions {
        capabilities: agent_caps::REPORTS_STATUS,
        ..opts()
    });
    assert!(core.on_message(remote(b"h", &[("", "x")])).send.is_empty());
}

#[test]
fn requests_and_adopts_an_instance_uid() {
    let (mut core, rx) = AgentCore::new(AgentOptions {
        instance_uid: None,
        ..opts()
    });
    let first = core.full_state();
    assert_eq!(first.flags, agent_flags::REQUEST_INSTANCE_UID);
    assert_eq!(first.instance_uid.len(), 16);
    assert_eq!(
        rx.borrow().instance_uid,
        None,
        "temporary uid is not published"
    );
    // Wrong length: ignored, still asking.
    let out = core.on_message(ServerToAgent {
        agent_identification: Some(AgentIdentification {
            new_instance_uid: vec![1; 26],
        }),
        ..ServerToAgent::default()
    });
    assert!(out.send.is_empty());
    assert!(rx.borrow().last_error.is_some());
    assert_eq!(
        core.heartbeat_message().flags,
        agent_flags::REQUEST_INSTANCE_UID
    );

    let new = [5u8; 16];
    let out = core.on_message(ServerToAgent {
        instance_uid: first.instance_uid.clone(),
        agent_identification: Some(AgentIdentification {
            new_instance_uid: new.to_vec(),
        }),
        ..ServerToAgent::default()
    });
    assert_eq!(out.send.len(), 1, "announces itself under the new uid");
    assert_eq!(out.send[0].instance_uid, new.to_vec());
    assert_eq!(out.send[0].flags, 0);
    assert!(out.send[0].agent_description.is_some());
    assert_eq!(rx.borrow().instance_uid, Some(new));
    assert_eq!(core.heartbeat_message().instance_uid, new.to_vec());
}

#[test]
fn adopts_server_heartbeat_interval_but_not_zero() {
    let (mut core, rx) = AgentCore::new(opts());
    let offer = |secs| ServerToAgent {
        connection_settings: Some(ConnectionSettingsOffers {
            hash: vec![1],
            opamp: Some(OpAmpConnectionSettings {
                heartbeat_interval_seconds: secs,
                ..OpAmpConnectionSettings::default()
            }),
            ..ConnectionSettingsOffers::default()
        }),
        ..ServerToAgent::default()
    };
    core.on_message(offer(7));
    assert_eq!(core.heartbeat(), Duration::from_secs(7));
    assert_eq!(rx.borrow().heartbeat_secs, 7);
    core.on_message(offer(0));
    assert_eq!(core.heartbeat(), Duration::from_secs(7));
}

#[test]
fn unavailable_error_asks_for_a_reconnect() {
    let (mut core, rx) = AgentCore::new(opts());
    let out = core.on_message(ServerToAgent {
        error_response: Some(ServerErrorResponse {
            r#type: ServerErrorResponseType::Unavailable as i32,
            error_message: "busy".into(),
            details: Some(server_error_response::Details::RetryInfo(RetryInfo {
                retry_after_nanoseconds: 2_000_000_000,
            })),
        }),
        ..ServerToAgent::default()
    });
    assert!(out.reconnect && out.send.is_empty());
    assert_eq!(out.retry_after, Some(Duration::from_secs(2)));
    assert!(rx
        .borrow()
        .last_error
        .as_deref()
        .is_some_and(|e| e.contains("busy")));

    let out = core.on_message(ServerToAgent {
        error_response: Some(ServerErrorResponse {
            r#type: ServerErrorResponseType::BadRequest as i32,
            ..ServerErrorResponse::default()
        }),
        ..ServerToAgent::default()
    });
    assert!(!out.reconnect, "bad request is not retried");
}

mod identity {
    use super::*;
    use gateway::tls::{AgentCa, LocalCa};
    use proto::v1::TlsCertificate;

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

    fn tls_opts(f: &Fixture, caps: u64) -> AgentOptions {
        AgentOptions {
            endpoint: "wss://127.0.0.1:4320/v1/opamp".into(),
            tls: Some(ClientTls::from_ca_pem(&f.ca_pem).expect("tls")),
            token: Some("amp-bs.x".into()),
            accept_identity: true,
            capabilities: caps,
            ..opts()
        }
    }

    fn offer(hash: &[u8], cert: &str, key: Option<&str>, ca: &str) -> ServerToAgent {
        ServerToAgent {
            connection_settings: Some(ConnectionSettingsOffers {
                hash: hash.to_vec(),
                opamp: Some(OpAmpConnectionSettings {
                    destination_endpoint: "ws://127.0.0.1:4320/v1/opamp".into(),
                    heartbeat_interval_seconds: 30,
                    certificate: Some(TlsCertificate {
                        cert: cert.as_bytes().to_vec(),
                        private_key: key.unwrap_or_default().as_bytes().to_vec(),
                        ca_cert: ca.as_bytes().to_vec(),
                    }),
                    ..OpAmpConnectionSettings::default()
                }),
                ..ConnectionSettingsOffers::default()
            }),
            ..ServerToAgent::default()
        }
    }

    fn status_of(msg: &AgentToServer) -> (i32, Vec<u8>) {
        let s = msg
            .connection_settings_status
            .as_ref()
            .expect("connection settings status");
        (s.status, s.last_connection_settings_hash.clone())
    }

    #[test]
    fn offered_certificate_is_tried_then_committed_and_replaces_the_token() {
        let f = fixture();
        let caps = DEFAULT_CAPABILITIES | agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS;
        let (mut core, rx) = AgentCore::new(tls_opts(&f, caps));
        let first = core.full_state();
        assert_ne!(
            first.capabilities & agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS,
            0,
            "the opt-in declares 0x100"
        );
        assert!(
            first.connection_settings_status.is_none(),
            "nothing to report yet"
        );
        assert_eq!(core.connection().headers.len(), 1, "the token");

        let uid = shared::ids::InstanceUid(UID);
        let issued =
            f.ca.issue(uid, None, Duration::from_secs(3600))
                .expect("issue");
        let key = issued.private_key_pem.clone().expect("key");
        let out = core.on_message(offer(b"h1", &issued.cert_pem, Some(&key), &f.ca_pem));
        assert!(out.switch, "reconnect with the certificate");
        assert_eq!(out.send.len(), 1);
        assert_eq!(
            status_of(&out.send[0]),
            (ConnectionSettingsStatuses::Applying as i32, b"h1".to_vec())
        );
        let c = core.connection();
        assert!(
            c.headers.is_empty(),
            "no Authorization header with a certificate"
        );
        assert!(c.tls.as_ref().is_some_and(ClientTls::has_client_cert));
        assert_eq!(rx.borrow().client_cert_serial, None, "not committed yet");

        core.connection_succeeded();
        assert_eq!(
            rx.borrow().client_cert_serial.as_deref(),
            Some(&*issued.serial)
        );
        let next = core.connect_message();
        assert_eq!(
            status_of(&next),
            (ConnectionSettingsStatuses::Applied as i32, b"h1".to_vec())
        );
        assert!(!core.connection_failed("later failures keep the certificate"));
        assert!(core.connection().headers.is_empty());

        // The same offer again: skipped. The certificate repeated without its key under a
        // new hash: nothing to change, APPLIED.
        let out = core.on_message(offer(b"h1", &issued.cert_pem, Some(&key), &f.ca_pem));
        assert!(!out.switch && out.send.is_empty());
        let out = core.on_message(offer(b"h2", &issued.cert_pem, None, &f.ca_pem));
        assert!(!out.switch);
        assert_eq!(
            status_of(&out.send[0]),
            (ConnectionSettingsStatuses::Applied as i32, b"h2".to_vec())
        );

        // A new certificate that does not work: back to the one in use, FAILED.
        let renewed =
            f.ca.issue(uid, None, Duration::from_secs(3600))
                .expect("issue");
        let key2 = renewed.private_key_pem.clone().expect("key");
        let out = core.on_message(offer(b"h3", &renewed.cert_pem, Some(&key2), &f.ca_pem));
        assert!(out.switch);
        assert!(core.connection_failed("handshake refused"));
        let msg = core.heartbeat_message();
        assert_eq!(
            status_of(&msg),
            (ConnectionSettingsStatuses::Failed as i32, b"h3".to_vec())
        );
        assert_eq!(
            rx.borrow().client_cert_serial.as_deref(),
            Some(&*issued.serial)
        );
        assert!(
            core.connection().headers.is_empty(),
            "still on the first certificate"
        );

        // Another certificate without a key (this agent sends no CSR): refused.
        let out = core.on_message(offer(b"h4", &renewed.cert_pem, None, &f.ca_pem));
        assert!(!out.switch);
        assert_eq!(
            status_of(&out.send[0]).0,
            ConnectionSettingsStatuses::Failed as i32
        );
    }

    #[test]
    fn offers_are_ignored_without_the_opt_in_and_refused_over_plaintext() {
        let f = fixture();
        let uid = shared::ids::InstanceUid(UID);
        let issued =
            f.ca.issue(uid, None, Duration::from_secs(3600))
                .expect("issue");
        let key = issued.private_key_pem.clone().expect("key");
        let o = || offer(b"h1", &issued.cert_pem, Some(&key), &f.ca_pem);

        let (mut core, _rx) = AgentCore::new(AgentOptions {
            accept_identity: false,
            ..tls_opts(&f, DEFAULT_CAPABILITIES)
        });
        assert_eq!(
            core.full_state().capabilities & agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS,
            0
        );
        let out = core.on_message(o());
        assert!(!out.switch && out.send.is_empty());
        assert_eq!(core.connection().headers.len(), 1);

        // ws:// with no TLS endpoint offered: the certificate cannot be used.
        let (mut core, rx) = AgentCore::new(AgentOptions {
            endpoint: "ws://127.0.0.1:4320/v1/opamp".into(),
            tls: None,
            ..tls_opts(&f, DEFAULT_CAPABILITIES)
        });
        let out = core.on_message(o());
        assert!(!out.switch, "no status sent without 0x8000 either");
        assert!(out.send.is_empty());
        assert_eq!(core.connection().headers.len(), 1, "keeps the token");
        assert!(rx
            .borrow()
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("wss://")));
    }
}
