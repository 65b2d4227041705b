//! Property tests of the session core ([`handle`]): this file owns them. Arbitrary sequences of
//! `AgentToServer` messages (sequence gaps, repeats and restarts, omitted sub-messages, any
//! capability and flag bits, odd instance uids, agent_disconnect) interleaved with reconnects,
//! each answered under a freshly drawn desired config and connection-settings offer, are
//! checked against [`Model`]: a few lines per invariant of the module docs and opamp-facts.md
//! §3.3 (compression, sequence numbers), §3.4 (remote config), §3.10 (instance uid) and §3.14
//! (capability gating). Example-based tests stay in `session.rs`.

use super::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use proto::v1::{AgentDisconnect, ConnectionSettingsStatus, EffectiveConfig, RemoteConfigStatus};
use proto::{agent_caps as caps, server_flags};

const UID: [u8; 16] = [9; 16];
const NEW_UID: [u8; 16] = [0xA5; 16];
/// A bit outside the AgentCapabilities enum: must be ignored.
const UNDEFINED_CAP: u64 = 1 << 40;

fn files(i: u8) -> ConfigMap {
    ConfigMap::from([(
        "collector.yaml".to_string(),
        ConfigFile {
            body: format!("receivers: {i}"),
            content_type: "text/yaml".into(),
        },
    )])
}

/// The three configs an agent may be asked to run, hashed once.
static DESIRED: std::sync::LazyLock<[Desired; 3]> =
    std::sync::LazyLock::new(|| [0, 1, 2].map(|i| Desired::new(i64::from(i) + 1, &files(i))));

fn desired(i: u8) -> Desired {
    DESIRED[usize::from(i)].clone()
}

fn offer(i: u8) -> OpampOffer {
    OpampOffer {
        endpoint: "ws://ampora.test:4320/v1/opamp".into(),
        // 0 included on purpose: it must never go out as 0.
        heartbeat_interval_secs: u64::from(i) * 30,
    }
}

fn identity(with_key: bool) -> IdentityOffer {
    IdentityOffer {
        serial: "01".into(),
        cert_pem: "CERT".into(),
        ca_pem: "CA".into(),
        private_key_pem: with_key.then(|| "KEY".into()),
    }
}

fn description(i: u8) -> AgentDescription {
    AgentDescription {
        identifying_attributes: vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(format!("svc-{i}"))),
            }),
        }],
        non_identifying_attributes: vec![],
    }
}

#[derive(Debug, Clone)]
enum Seq {
    Next,
    Repeat,
    Zero,
    /// last + d (wrapping); d may happen to be 0 or 1.
    Jump(u64),
}

#[derive(Debug, Clone)]
enum HashPick {
    Desired(u8),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
struct MsgSpec {
    seq: Seq,
    uid_len: usize,
    caps: u64,
    flags: u64,
    description: Option<u8>,
    health: Option<(bool, u8)>,
    effective: Option<u8>,
    remote_status: Option<(HashPick, i32)>,
    /// Some(true): the hash of the offer in this message's context; Some(false): another one.
    settings_status: Option<bool>,
    disconnect: bool,
    /// The caller assigns a new uid even if the agent did not ask (a duplicate uid).
    collision: bool,
    desired: Option<u8>,
    offer: Option<u8>,
    identity: Option<bool>,
    http: bool,
}

#[derive(Debug, Clone)]
enum Step {
    /// `connection_started`: a new WebSocket connection.
    Reconnect,
    Msg(Box<MsgSpec>),
}

fn msg_spec() -> impl Strategy<Value = MsgSpec> {
    let seq = prop_oneof![
        6 => Just(Seq::Next),
        2 => Just(Seq::Repeat),
        1 => Just(Seq::Zero),
        1 => (2u64..5).prop_map(Seq::Jump),
        1 => any::<u64>().prop_map(Seq::Jump),
    ];
    let uid_len = prop_oneof![8 => Just(16usize), 1 => 0usize..40];
    let caps = prop_oneof![
        1 => Just(0u64),
        8 => (any::<u16>(), prop::bool::weighted(0.1))
            .prop_map(|(c, odd)| u64::from(c) | if odd { UNDEFINED_CAP } else { 0 }),
    ];
    let flags = prop_oneof![4 => Just(0u64), 1 => Just(1u64), 1 => any::<u64>()];
    let hash = prop_oneof![
        3 => (0u8..3).prop_map(HashPick::Desired),
        1 => prop::collection::vec(any::<u8>(), 0..33).prop_map(HashPick::Bytes),
    ];
    let subs = (
        prop::option::of(0u8..3),
        prop::option::of((any::<bool>(), 0u8..3)),
        prop::option::of(0u8..3),
        prop::option::of((hash, 0i32..5)),
        prop::option::of(any::<bool>()),
    );
    let context = (
        prop::option::of(0u8..3),
        prop::option::of(0u8..3),
        prop::option::weighted(0.3, any::<bool>()),
        any::<bool>(),
    );
    (
        seq,
        uid_len,
        caps,
        flags,
        subs,
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.05),
        context,
    )
        .prop_map(
            |(seq, uid_len, caps, flags, subs, disconnect, collision, context)| MsgSpec {
                seq,
                uid_len,
                caps,
                flags,
                description: subs.0,
                health: subs.1,
                effective: subs.2,
                remote_status: subs.3,
                settings_status: subs.4,
                disconnect,
                collision,
                desired: context.0,
                offer: context.1,
                identity: context.2,
                http: context.3,
            },
        )
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let step = prop_oneof![
        1 => Just(Step::Reconnect),
        10 => msg_spec().prop_map(|m| Step::Msg(Box::new(m))),
    ];
    prop::collection::vec(step, 1..24)
}

/// What the server should know, by the spec's rules, from the messages so far.
#[derive(Debug, Clone, Default)]
struct Model {
    caps: u64,
    description: Description,
    health: Option<Health>,
    effective_hash: Option<String>,
    remote: Option<RemoteConfigReport>,
    settings_in_use: Option<String>,
    settings_offered: Option<String>,
    last_seq: Option<u64>,
    /// A complete state has arrived (the code may also count an answer to its request).
    complete: bool,
    /// Config hash offered on this connection.
    offered: Option<String>,
}

/// One message as built from its spec, with the context it is handled under.
struct Input {
    msg: AgentToServer,
    desired: Option<Desired>,
    offer: Option<OpampOffer>,
    identity: Option<IdentityOffer>,
    transport: Transport,
    assign: Option<InstanceUid>,
}

impl Input {
    fn build(spec: &MsgSpec, model: &Model) -> Input {
        let seq = match (&spec.seq, model.last_seq) {
            (Seq::Zero, _) | (_, None) => 0,
            (Seq::Next, Some(l)) => l.wrapping_add(1),
            (Seq::Repeat, Some(l)) => l,
            (Seq::Jump(d), Some(l)) => l.wrapping_add(*d),
        };
        let transport = if spec.http {
            Transport::Http
        } else {
            Transport::WebSocket
        };
        let offer = spec.offer.map(offer);
        let identity = spec.identity.map(identity);
        let settings_hash_bytes = |current: bool| match (&offer, current) {
            (Some(o), true) => super::settings_hash(
                &o.for_agent(transport, identity.is_some()),
                identity.as_ref(),
            ),
            _ => b"something else".to_vec(),
        };
        let uid = (0..spec.uid_len).map(|i| UID[i % 16]).collect();
        let msg = AgentToServer {
            instance_uid: uid,
            sequence_num: seq,
            capabilities: spec.caps,
            flags: spec.flags,
            agent_description: spec.description.map(description),
            health: spec.health.map(|(healthy, s)| ComponentHealth {
                healthy,
                status: format!("s{s}"),
                ..Default::default()
            }),
            effective_config: spec.effective.map(|i| EffectiveConfig {
                config_map: Some(config_map_to_proto(&files(i))),
            }),
            remote_config_status: spec.remote_status.clone().map(|(h, status)| {
                RemoteConfigStatus {
                    last_remote_config_hash: match h {
                        HashPick::Desired(i) => desired(i).remote.config_hash,
                        HashPick::Bytes(b) => b,
                    },
                    status,
                    error_message: if status == 3 {
                        "boom".into()
                    } else {
                        "".into()
                    },
                }
            }),
            connection_settings_status: spec.settings_status.map(|current| {
                ConnectionSettingsStatus {
                    last_connection_settings_hash: settings_hash_bytes(current),
                    status: 1,
                    error_message: String::new(),
                }
            }),
            agent_disconnect: spec.disconnect.then_some(AgentDisconnect {}),
            ..Default::default()
        };
        // The caller assigns a uid when asked, when the uid is not 16 bytes, or on a collision.
        let asked = spec.flags & proto::agent_flags::REQUEST_INSTANCE_UID != 0;
        let assign =
            (asked || spec.uid_len != 16 || spec.collision).then_some(InstanceUid(NEW_UID));
        Input {
            msg,
            desired: spec.desired.map(desired),
            offer,
            identity,
            transport,
            assign,
        }
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            components_known: false,
            custom_capabilities: &[],
            telemetry: None,
            now_ms: 1_000,
            transport: self.transport,
            desired: self.desired.as_ref(),
            opamp_offer: self.offer.as_ref(),
            identity: self.identity.as_ref(),
            assign_uid: self.assign,
            packages: None,
        }
    }

    fn disconnect(&self) -> bool {
        self.msg.agent_disconnect.is_some()
    }
}

/// Everything a property may look at for one message.
struct Obs<'a> {
    input: &'a Input,
    /// The model before this message, with the capabilities this message leaves in force.
    model: &'a Model,
    before: &'a AgentRecord,
    state: &'a AgentState,
    out: &'a Outcome,
}

impl Obs<'_> {
    fn has(&self, bit: u64) -> bool {
        self.model.caps & bit != 0
    }

    /// Every sub-message the capabilities say the agent reports is in this message.
    fn full(&self) -> bool {
        let m = &self.input.msg;
        m.agent_description.is_some()
            && (!self.has(caps::REPORTS_EFFECTIVE_CONFIG) || m.effective_config.is_some())
            && (!self.has(caps::REPORTS_REMOTE_CONFIG) || m.remote_config_status.is_some())
            && (!self.has(caps::REPORTS_HEALTH) || m.health.is_some())
    }

    fn status_in_msg(&self) -> bool {
        self.input.msg.remote_config_status.is_some() && self.has(caps::REPORTS_REMOTE_CONFIG)
    }

    fn settings_hash(&self) -> Option<String> {
        let o = self.input.offer.as_ref()?;
        let id = self.input.identity.as_ref();
        Some(hex::encode(super::settings_hash(
            &o.for_agent(self.input.transport, id.is_some()),
            id,
        )))
    }
}

impl Model {
    /// Capabilities as this message leaves them: 0 (absent) keeps the old ones, undefined
    /// bits are dropped.
    fn take_caps(&mut self, msg: &AgentToServer) {
        let c = msg.capabilities & caps::ALL;
        if c != 0 {
            self.caps = c;
        }
    }

    /// Learns what the message and the reply tell (after the properties looked at them).
    fn advance(&mut self, o: &Obs<'_>) {
        let m = &o.input.msg;
        if let Some(d) = &m.agent_description {
            self.description = description_from_proto(d);
        }
        if let (Some(h), true) = (&m.health, o.has(caps::REPORTS_HEALTH)) {
            self.health = Some(health_from_proto(h));
        }
        if let (Some(ec), true) = (&m.effective_config, o.has(caps::REPORTS_EFFECTIVE_CONFIG)) {
            let files = ec
                .config_map
                .as_ref()
                .map(config_map_from_proto)
                .unwrap_or_default();
            self.effective_hash = Some(hex::encode(config_hash(&files)));
        }
        if let (Some(s), true) = (&m.remote_config_status, o.status_in_msg()) {
            self.remote = Some(RemoteConfigReport {
                hash: hex::encode(&s.last_remote_config_hash),
                status: remote_status(s.status),
                error_message: s.error_message.clone(),
            });
        }
        if let (Some(s), true) = (
            &m.connection_settings_status,
            o.has(caps::REPORTS_CONNECTION_SETTINGS_STATUS),
        ) {
            self.settings_in_use = Some(hex::encode(&s.last_connection_settings_hash));
        }
        if let Some(cs) = &o.out.reply.connection_settings {
            self.settings_offered = Some(hex::encode(&cs.hash));
        }
        if o.out.reply.remote_config.is_some() {
            self.offered = o.input.desired.as_ref().map(|d| d.hash_hex.clone());
        }
        self.complete |= o.full();
        self.last_seq = Some(m.sequence_num);
    }
}

/// Runs `steps` through `handle` from a fresh state, calling `check` on every message.
fn run(
    steps: &[Step],
    check: impl Fn(&Obs<'_>) -> Result<(), TestCaseError>,
) -> Result<(), TestCaseError> {
    let mut state = AgentState::new(AgentRecord::new(InstanceUid(UID), 0));
    let mut model = Model::default();
    for step in steps {
        let spec = match step {
            Step::Reconnect => {
                state.connection_started();
                model.offered = None;
                continue;
            }
            Step::Msg(spec) => spec,
        };
        let input = Input::build(spec, &model);
        let before = state.record.clone();
        let out = handle(&mut state, &input.msg, &input.ctx());
        model.take_caps(&input.msg);
        let obs = Obs {
            input: &input,
            model: &model.clone(),
            before: &before,
            state: &state,
            out: &out,
        };
        check(&obs)?;
        model.advance(&obs);
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        // Failures are reported with their shrunk input; no regression files in the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Exactly one reply per message (`handle` returns one), never an error, always our
    /// capabilities and the uid it answers; a new uid exactly when the caller assigns one
    /// (facts §3.1, §3.10).
    #[test]
    fn every_message_gets_one_plain_reply(steps in steps()) {
        run(&steps, |o| {
            let r = &o.out.reply;
            prop_assert_eq!(&r.instance_uid, &o.input.msg.instance_uid);
            prop_assert_eq!(r.capabilities, SERVER_CAPABILITIES);
            prop_assert!(r.error_response.is_none());
            let new_uid = r.agent_identification.as_ref().map(|a| a.new_instance_uid.clone());
            prop_assert_eq!(new_uid, o.input.assign.map(|u| u.as_bytes().to_vec()));
            prop_assert_eq!(r.flags & !server_flags::REPORT_FULL_STATE, 0);
            Ok(())
        })?;
    }

    /// ReportFullState (facts §3.3): asked on a sequence gap or while the state is incomplete,
    /// never when this message is itself complete or says goodbye, and never for an in-order
    /// or repeated message once a complete state has arrived.
    #[test]
    fn full_state_is_asked_exactly_when_state_cannot_be_trusted(steps in steps()) {
        run(&steps, |o| {
            let asked = o.out.reply.flags & server_flags::REPORT_FULL_STATE != 0;
            let seq = o.input.msg.sequence_num;
            let gap = o
                .model
                .last_seq
                .is_some_and(|l| seq != l.wrapping_add(1) && seq != l);
            if o.input.disconnect() || o.full() {
                prop_assert!(!asked, "full or leaving message asked for full state");
            } else if gap || o.model.last_seq.is_none() {
                prop_assert!(asked, "gap or first partial message not asked (seq {})", seq);
            } else if o.model.complete {
                prop_assert!(!asked, "in-order message of a complete agent asked");
            }
            prop_assert_eq!(o.state.last_seq, Some(seq));
            prop_assert_eq!(o.state.record.sequence_num, seq);
            Ok(())
        })?;
    }

    /// Capability gating (facts §3.14): nothing offered that the agent did not declare it
    /// accepts, nothing at all to an agent that is leaving, and never a command or packages.
    #[test]
    fn nothing_is_offered_that_the_agent_does_not_accept(steps in steps()) {
        run(&steps, |o| {
            let r = &o.out.reply;
            if r.remote_config.is_some() {
                prop_assert!(o.has(caps::ACCEPTS_REMOTE_CONFIG));
                prop_assert!(!o.input.disconnect());
            }
            if let Some(cs) = &r.connection_settings {
                prop_assert!(o.has(caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS));
                if o.input.identity.is_none() {
                    prop_assert!(o.has(caps::REPORTS_HEARTBEAT));
                }
                prop_assert!(!o.input.disconnect());
                prop_assert!(!cs.hash.is_empty());
                let op = cs.opamp.as_ref();
                prop_assert!(op.is_some_and(|op| op.heartbeat_interval_seconds > 0));
                prop_assert_eq!(
                    op.and_then(|op| op.certificate.as_ref()).is_some(),
                    o.input.identity.is_some()
                );
                prop_assert!(cs.own_metrics.is_none() && cs.own_traces.is_none());
                prop_assert!(cs.own_logs.is_none() && cs.other_connections.is_empty());
            }
            prop_assert!(r.command.is_none());
            prop_assert!(r.packages_available.is_none());
            prop_assert!(r.custom_message.is_none() && r.custom_capabilities.is_none());
            Ok(())
        })?;
    }

    /// Remote config (facts §3.4): offered iff there is a desired config, the agent accepts
    /// remote config, is not leaving, and does not already report the desired hash; then
    /// whenever this message reports another hash, else once per connection. An agent that
    /// reported the desired hash (APPLIED or not) is not offered it again.
    #[test]
    fn remote_config_is_offered_iff_the_agent_lacks_it(steps in steps()) {
        run(&steps, |o| {
            let d = o.input.desired.as_ref();
            let m = &o.input.msg;
            let reported = if o.status_in_msg() {
                m.remote_config_status.as_ref().map(|s| hex::encode(&s.last_remote_config_hash))
            } else {
                o.model.remote.as_ref().map(|r| r.hash.clone())
            };
            let expect = d.is_some_and(|d| {
                o.has(caps::ACCEPTS_REMOTE_CONFIG)
                    && !o.input.disconnect()
                    && reported.as_ref() != Some(&d.hash_hex)
                    && (o.status_in_msg() || o.model.offered.as_ref() != Some(&d.hash_hex))
            });
            prop_assert_eq!(o.out.reply.remote_config.is_some(), expect);
            if let (Some(rc), Some(d)) = (&o.out.reply.remote_config, d) {
                prop_assert_eq!(rc, &d.remote);
            }
            Ok(())
        })?;
    }

    /// Connection settings: offered once per change of their hash (not per connection), to
    /// agents that accept them, unless the agent reports that hash in use.
    #[test]
    fn connection_settings_are_offered_once_per_hash(steps in steps()) {
        run(&steps, |o| {
            let mut need = caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS;
            if o.input.identity.is_none() {
                need |= caps::REPORTS_HEARTBEAT;
            }
            let in_use = match &o.input.msg.connection_settings_status {
                Some(s) if o.has(caps::REPORTS_CONNECTION_SETTINGS_STATUS) => {
                    Some(hex::encode(&s.last_connection_settings_hash))
                }
                _ => o.model.settings_in_use.clone(),
            };
            let hash = o.settings_hash();
            let expect = hash.as_ref().is_some_and(|h| {
                o.model.caps & need == need
                    && !o.input.disconnect()
                    && in_use.as_ref() != Some(h)
                    && o.model.settings_offered.as_ref() != Some(h)
            });
            let got = o.out.reply.connection_settings.as_ref().map(|c| hex::encode(&c.hash));
            prop_assert_eq!(got.is_some(), expect);
            if got.is_some() {
                prop_assert_eq!(got, hash);
            }
            Ok(())
        })?;
    }

    /// Status compression (facts §3.3): the record holds the last value of each compressed
    /// sub-message the agent declared it reports; omitted ones keep theirs; capabilities 0
    /// keep the previous ones and undefined bits are dropped.
    #[test]
    fn omitted_fields_keep_their_last_value(steps in steps()) {
        run(&steps, |o| {
            let mut m = o.model.clone();
            m.advance(o);
            let rec = &o.state.record;
            prop_assert_eq!(rec.capabilities, m.caps);
            prop_assert_eq!(&rec.description, &m.description);
            prop_assert_eq!(&rec.health, &m.health);
            prop_assert_eq!(&rec.effective_config_hash, &m.effective_hash);
            prop_assert_eq!(&rec.remote_config, &m.remote);
            prop_assert_eq!(rec.connected, !o.input.disconnect());
            prop_assert_eq!(rec.transport, Some(o.input.transport));
            let described = o.out.events.contains(&Event::DescriptionChanged);
            prop_assert_eq!(described, o.before.description != rec.description);
            let left = o.out.events.contains(&Event::Disconnected);
            prop_assert_eq!(left, o.input.disconnect());
            Ok(())
        })?;
    }

    /// `Outcome::changed` is exactly "the record differs in more than liveness": the caller
    /// may persist on it.
    #[test]
    fn changed_is_true_iff_the_record_changed(steps in steps()) {
        run(&steps, |o| {
            let liveness_only = |r: &AgentRecord| AgentRecord {
                last_seen_ms: 0,
                sequence_num: 0,
                ..r.clone()
            };
            let differs = liveness_only(o.before) != liveness_only(&o.state.record);
            prop_assert_eq!(o.out.changed, differs);
            Ok(())
        })?;
    }
}
