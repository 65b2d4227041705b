//! The sans-I/O OpAMP session core: one `AgentToServer` in, one `ServerToAgent` out.
//!
//! Everything here is a pure function of the agent's in-memory [`AgentState`], the message and a
//! [`Context`] the caller fills in (time, transport, the config the agent should run, ...). No
//! sockets, no store, no clock: the caller persists `state.record` when [`Outcome::changed`] says
//! so and acts on [`Outcome::events`].
//!
//! Protocol references (`opamp-facts.md` §3): status compression and sequence numbers §3.3,
//! remote config §3.4, packages §3.6 ([`packages`]), connection settings / heartbeat §3.5 and §3.8, disconnect §3.9,
//! instance uid §3.10, errors §3.2.

use proto::v1::{
    any_value, AgentConfigFile, AgentConfigMap, AgentDescription, AgentIdentification,
    AgentRemoteConfig, AgentToServer, AnyValue, ComponentHealth, ConnectionSettingsOffers,
    KeyValue, OpAmpConnectionSettings, ServerErrorResponse, ServerErrorResponseType, ServerToAgent,
};
use proto::{agent_caps, server_flags};
use sha2::{Digest, Sha256};
use shared::domain::{
    AgentRecord, ConfigFile, ConfigMap, Description, Health, RemoteConfigReport, RemoteStatus,
    SettingsReport, Transport,
};
use shared::ids::InstanceUid;
use std::collections::BTreeMap;

pub mod components;
mod custom;
pub mod packages;
pub mod telemetry;
pub use packages::PackageOffer;
pub use telemetry::TelemetryOffer;

/// Server capabilities Ampora advertises in every reply: AcceptsStatus | OffersRemoteConfig |
/// AcceptsEffectiveConfig | OffersPackages | AcceptsPackagesStatus | OffersConnectionSettings |
/// AcceptsConnectionSettingsRequest (CSRs for agent identities, facts §5.3; without an agent
/// CA a CSR is simply not acted on).
pub const SERVER_CAPABILITIES: u64 = 0x7F;

/// Characters kept of an agent's connection-settings error.
const MAX_SETTINGS_ERROR: usize = 1024;

/// Nesting limit for agent-supplied trees (AnyValue, ComponentHealth). prost already caps decode
/// depth at 100; we stay well below so the JSON we store can always be read back.
const MAX_DEPTH: usize = 32;

/// The config an agent should run, ready to send.
#[derive(Debug, Clone)]
pub struct Desired {
    pub config_id: i64,
    /// Hex of [`config_hash`]; what agents echo back in `RemoteConfigStatus`.
    pub hash_hex: String,
    /// `config_hash` holds the raw 32 hash bytes.
    pub remote: AgentRemoteConfig,
}

impl Desired {
    pub fn new(config_id: i64, files: &ConfigMap) -> Self {
        let hash = config_hash(files);
        Self {
            config_id,
            hash_hex: hex::encode(hash),
            remote: AgentRemoteConfig {
                config: Some(config_map_to_proto(files)),
                config_hash: hash.to_vec(),
            },
        }
    }
}

/// Canonical SHA-256 over a config map: files in name order (the `BTreeMap` order); for each,
/// name, body and content type, each prefixed with its length as u64 big-endian so no two
/// different maps share an encoding.
pub fn config_hash(files: &ConfigMap) -> [u8; 32] {
    let mut h = Sha256::new();
    for (name, file) in files {
        for part in [
            name.as_bytes(),
            file.body.as_bytes(),
            file.content_type.as_bytes(),
        ] {
            update_prefixed(&mut h, part);
        }
    }
    h.finalize().into()
}

fn update_prefixed(h: &mut Sha256, part: &[u8]) {
    h.update((part.len() as u64).to_be_bytes());
    h.update(part);
}

/// The heartbeat/connection-settings offer made to agents that have both
/// AcceptsOpAMPConnectionSettings (0x100) and ReportsHeartbeat (0x2000).
#[derive(Debug, Clone)]
pub struct OpampOffer {
    pub endpoint: String,
    /// 0 is sent as 1: a 0 would disable heartbeats on Go WebSocket clients (facts §4.6).
    pub heartbeat_interval_secs: u64,
}

impl OpampOffer {
    /// The offer as made to one agent: the endpoint in the agent's own transport (`http(s)://`
    /// for plain-HTTP agents, `ws(s)://` for WebSocket ones, which opamp-go picks from the
    /// scheme), and in its TLS form when it carries a certificate (usable over TLS only; the
    /// server makes sure the endpoint speaks TLS then).
    pub fn for_agent(&self, transport: Transport, tls: bool) -> OpampOffer {
        let scheme_end = self.endpoint.find("://");
        let (scheme, rest) = match scheme_end {
            Some(i) => (self.endpoint[..i].to_ascii_lowercase(), &self.endpoint[i..]),
            None => return self.clone(),
        };
        let secure = tls || matches!(scheme.as_str(), "wss" | "https");
        let scheme = match (transport, secure) {
            (Transport::Http, true) => "https",
            (Transport::Http, false) => "http",
            (Transport::WebSocket, true) => "wss",
            (Transport::WebSocket, false) => "ws",
        };
        OpampOffer {
            endpoint: format!("{scheme}{rest}"),
            heartbeat_interval_secs: self.heartbeat_interval_secs,
        }
    }

    fn interval(&self) -> u64 {
        self.heartbeat_interval_secs.max(1)
    }

    /// `ConnectionSettingsOffers.hash`: covers everything we offer (endpoint and interval), so it
    /// changes whenever the offer does.
    pub fn hash(&self) -> Vec<u8> {
        let mut h = Sha256::new();
        update_prefixed(&mut h, b"ampora.opamp-settings.v1");
        update_prefixed(&mut h, self.endpoint.as_bytes());
        h.update(self.interval().to_be_bytes());
        h.finalize().to_vec()
    }

    fn to_proto(&self) -> ConnectionSettingsOffers {
        ConnectionSettingsOffers {
            hash: self.hash(),
            opamp: Some(OpAmpConnectionSettings {
                destination_endpoint: self.endpoint.clone(),
                heartbeat_interval_seconds: self.interval(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// The agent's current mTLS identity, offered in `connection_settings.opamp.certificate`
/// (facts §5.1: every `opamp` offer repeats it). Issued and stored by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityOffer {
    pub serial: String,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Only in the offer that delivers a server-generated key; later offers repeat the
    /// certificate without it (the agent has the key, we keep none).
    pub private_key_pem: Option<String>,
}

/// The offer's `hash`: the endpoint and interval ([`OpampOffer::hash`]) plus the certificate,
/// so it changes whenever the certificate does (rotation) and not when only the key is left
/// out of a repeat.
fn settings_hash(o: &OpampOffer, identity: Option<&IdentityOffer>) -> Vec<u8> {
    let base = o.hash();
    let Some(id) = identity else { return base };
    let mut h = Sha256::new();
    update_prefixed(&mut h, &base);
    update_prefixed(&mut h, id.serial.as_bytes());
    update_prefixed(&mut h, id.cert_pem.as_bytes());
    h.finalize().to_vec()
}

/// Per-agent state kept by the coordinator between messages (in memory). `record` is what gets
/// persisted.
#[derive(Debug, Clone)]
pub struct AgentState {
    pub record: AgentRecord,
    /// False until the agent has sent a full state since this server (re)loaded it; while false,
    /// a message missing an expected sub-message gets ReportFullState (see
    /// `full_state_requested_at` for the one exception).
    pub complete: bool,
    pub last_seq: Option<u64>,
    /// Config hash (hex) we last offered on the current connection; reset by `connection_started`.
    pub offered_config: Option<String>,
    /// When (`Context::now_ms`, or the push's clock) `offered_config` was last sent.
    pub offered_at_ms: i64,
    /// Config hash (hex) we held back on this connection because the agent lacks
    /// AcceptsRemoteConfig; keeps the CapMismatch event to one per connection.
    pub refused_config: Option<String>,
    /// Sequence number of the message whose reply asked for full state. The agent's next message
    /// is its answer and is accepted as complete even if parts are missing: an agent that claims
    /// e.g. ReportsHealth but has no health yet cannot send it, and asking again would make the
    /// Go client answer at once, forever.
    pub full_state_requested_at: Option<u64>,
    /// The agent reported the desired config APPLIED without an effective config in the same
    /// message; its next effective config is taken as the applied baseline rather than drift.
    pub applied_effective_pending: bool,
    /// Aggregate package hash (hex) offered on this connection, and when.
    pub offered_packages: Option<String>,
    pub packages_offered_at_ms: i64,
    /// Package set held back on this connection for lack of AcceptsPackages (one
    /// CapMismatch per connection).
    pub refused_packages: Option<String>,
    /// An operator's Restart waits for this HTTP agent's next poll ([`restart_reply`]).
    pub restart_pending: bool,
    /// Custom messages from operators waiting for this HTTP agent's next polls (one each).
    pub custom_pending: Vec<proto::v1::CustomMessage>,
    /// Ampora's custom capabilities went out on this connection.
    pub custom_announced: bool,
    /// The components hash (hex) this connection was asked the set of (the only set taken).
    pub components_asked: Option<String>,
}

impl AgentState {
    pub fn new(record: AgentRecord) -> Self {
        Self {
            record,
            complete: false,
            last_seq: None,
            offered_config: None,
            offered_at_ms: 0,
            refused_config: None,
            full_state_requested_at: None,
            applied_effective_pending: false,
            offered_packages: None,
            packages_offered_at_ms: 0,
            refused_packages: None,
            restart_pending: false,
            custom_pending: Vec::new(),
            custom_announced: false,
            components_asked: None,
        }
    }

    /// A new WebSocket connection (HTTP: only when the agent comes back after being considered
    /// gone). Forgets what was offered so level-triggered offers are made again.
    pub fn connection_started(&mut self) {
        self.offered_config = None;
        self.refused_config = None;
        self.offered_packages = None;
        self.refused_packages = None;
        self.custom_announced = false;
        // A full-state request on the old connection may never have reached the agent.
        self.full_state_requested_at = None;
    }

    fn caps(&self) -> u64 {
        self.record.capabilities
    }
}

pub struct Context<'a> {
    pub now_ms: i64,
    pub transport: Transport,
    pub desired: Option<&'a Desired>,
    pub opamp_offer: Option<&'a OpampOffer>,
    /// The agent's identity certificate to offer (with `opamp_offer`), if it has one.
    pub identity: Option<&'a IdentityOffer>,
    /// Set by the caller when the agent must get a new instance uid (it asked via
    /// RequestInstanceUid, its uid is not 16 bytes, or its uid collides with another live agent).
    /// The state passed in is already keyed to this uid.
    pub assign_uid: Option<InstanceUid>,
    /// The package set the agent should have, if any package is assigned to it.
    pub packages: Option<&'a PackageOffer>,
    /// Whether the server has the component set of the hash this message reports (if any).
    pub components_known: bool,
    /// The custom capabilities Ampora relays (`opamp.custom_capabilities`).
    pub custom_capabilities: &'a [String],
    /// Where the agent's group has it send its own telemetry, if anywhere.
    pub telemetry: Option<&'a TelemetryOffer>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Agent reported FAILED for a config hash (hex) with its error message.
    ConfigFailed { hash: String, error: String },
    /// Agent reported APPLIED for the config it should run.
    ConfigApplied { hash: String },
    /// We refrained from sending (or ignored) something because of capabilities; `what` is a
    /// short static label: "remote_config", "effective_config", "health",
    /// "remote_config_status", "connection_settings_status", "undefined_bits".
    CapMismatch { what: &'static str },
    /// The agent said goodbye (agent_disconnect present).
    Disconnected,
    /// First time we learned a description for this agent, or its description changed
    /// (assignments may need re-evaluation).
    DescriptionChanged,
    /// The agent newly reported a failed install of the package set offered to it; the
    /// count of such failures so far.
    PackageFailed { attempts: u32 },
    /// Every package of the set offered is now installed.
    PackagesInstalled,
    /// The agent sent its whole component set (hex hash): to be stored once.
    ComponentsReported {
        hash: String,
        set: components::ComponentSet,
    },
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub reply: ServerToAgent,
    /// `state.record` changed in a way worth persisting (anything except last_seen/sequence only).
    pub changed: bool,
    pub events: Vec<Event>,
}

/// Stores `v` in `slot`; true if that changed it.
fn set<T: PartialEq>(slot: &mut T, v: T) -> bool {
    if *slot == v {
        false
    } else {
        *slot = v;
        true
    }
}

fn remote_status(v: i32) -> RemoteStatus {
    match v {
        1 => RemoteStatus::Applied,
        2 => RemoteStatus::Applying,
        3 => RemoteStatus::Failed,
        _ => RemoteStatus::Unset,
    }
}

/// Handle one AgentToServer. Never panics, whatever the input.
pub fn handle(state: &mut AgentState, msg: &AgentToServer, ctx: &Context<'_>) -> Outcome {
    let mut reply = ServerToAgent {
        instance_uid: msg.instance_uid.clone(),
        capabilities: SERVER_CAPABILITIES,
        ..Default::default()
    };
    let mut events = Vec::new();
    let mut changed = false;
    let disconnect = msg.agent_disconnect.is_some();

    // Capabilities: 0 means "not sent" (bare HTTP polls); undefined bits are the agent's bug.
    let mut caps = msg.capabilities;
    if caps & !agent_caps::ALL != 0 {
        events.push(Event::CapMismatch {
            what: "undefined_bits",
        });
        caps &= agent_caps::ALL;
    }
    if caps != 0 {
        changed |= set(&mut state.record.capabilities, caps);
    }
    let caps = state.caps();
    let has = |bit: u64| caps & bit != 0;

    let rec = &mut state.record;
    rec.last_seen_ms = ctx.now_ms;
    changed |= set(&mut rec.transport, Some(ctx.transport));
    changed |= set(&mut rec.connected, !disconnect);
    if disconnect {
        events.push(Event::Disconnected);
    }

    // Status compression: absent = unchanged, so only present sub-messages touch the record.
    // Sub-messages the agent did not declare it reports are ignored (facts §3.14).
    if let Some(d) = &msg.agent_description {
        if set(&mut rec.description, description_from_proto(d)) {
            changed = true;
            events.push(Event::DescriptionChanged);
        }
    }
    let health = accept(
        msg.health.as_ref(),
        has(agent_caps::REPORTS_HEALTH),
        "health",
        &mut events,
    );
    if let Some(h) = health {
        changed |= set(&mut rec.health, Some(health_from_proto(h)));
    }
    let effective = accept(
        msg.effective_config.as_ref(),
        has(agent_caps::REPORTS_EFFECTIVE_CONFIG),
        "effective_config",
        &mut events,
    );
    if let Some(ec) = effective {
        let map = ec
            .config_map
            .as_ref()
            .map(config_map_from_proto)
            .unwrap_or_default();
        let hash = hex::encode(config_hash(&map));
        // The files are kept (until written to the store) only when they are news: memory
        // holds the hash of what was already written, not the files.
        if set(&mut rec.effective_config_hash, Some(hash)) {
            rec.effective_config = Some(map);
            changed = true;
        }
    }
    let status = accept(
        msg.remote_config_status.as_ref(),
        has(agent_caps::REPORTS_REMOTE_CONFIG),
        "remote_config_status",
        &mut events,
    );
    // The hash we want the agent to run; the record's assignment stands in when the caller has
    // no Desired at hand.
    let want = ctx
        .desired
        .map(|d| d.hash_hex.clone())
        .or_else(|| rec.assigned_config_hash.clone());
    let mut newly_applied = false;
    if let Some(s) = status {
        let report = RemoteConfigReport {
            hash: hex::encode(&s.last_remote_config_hash),
            status: remote_status(s.status),
            error_message: s.error_message.clone(),
        };
        // Events only on change: a full-state resend of an old status is not news.
        if set(&mut rec.remote_config, Some(report.clone())) {
            changed = true;
            match report.status {
                RemoteStatus::Failed => events.push(Event::ConfigFailed {
                    hash: report.hash,
                    error: report.error_message,
                }),
                RemoteStatus::Applied if want.as_ref() == Some(&report.hash) => {
                    newly_applied = true;
                    events.push(Event::ConfigApplied { hash: report.hash });
                }
                _ => {}
            }
        }
    }
    // Drift baseline: the effective config as it stands once the agent has applied our config.
    // Agents often report the new effective config in the message after APPLIED, so wait for it.
    if newly_applied {
        changed |= set(
            &mut rec.applied_effective_hash,
            rec.effective_config_hash.clone(),
        );
        state.applied_effective_pending =
            effective.is_none() && has(agent_caps::REPORTS_EFFECTIVE_CONFIG);
    } else if effective.is_some() && state.applied_effective_pending {
        changed |= set(
            &mut rec.applied_effective_hash,
            rec.effective_config_hash.clone(),
        );
        state.applied_effective_pending = false;
    }
    let settings_status = accept(
        msg.connection_settings_status.as_ref(),
        has(agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS),
        "connection_settings_status",
        &mut events,
    );
    // Kept across connections: the status is compressed, a reconnecting agent need not
    // repeat it.
    if let Some(s) = settings_status {
        let in_use = Some(hex::encode(&s.last_connection_settings_hash));
        changed |= set(&mut state.record.settings_in_use, in_use);
        // The agent's words: kept short, like a config error.
        let report = SettingsReport {
            status: remote_status(s.status),
            error_message: s.error_message.chars().take(MAX_SETTINGS_ERROR).collect(),
        };
        changed |= set(&mut state.record.settings_status, Some(report));
    }
    changed |= packages::record_statuses(state, msg, &mut events);
    changed |= components::record(state, msg, ctx.components_known, &mut reply, &mut events);
    changed |= custom::record(
        state,
        msg,
        ctx.custom_capabilities,
        ctx.now_ms,
        &mut reply,
        &mut events,
    );

    // Full state (facts §3.3): ask when our stored state can't be trusted and this message
    // doesn't replace it wholesale.
    let seq = msg.sequence_num;
    let full = msg.agent_description.is_some()
        && (!has(agent_caps::REPORTS_EFFECTIVE_CONFIG) || msg.effective_config.is_some())
        && (!has(agent_caps::REPORTS_REMOTE_CONFIG) || msg.remote_config_status.is_some())
        && (!has(agent_caps::REPORTS_HEALTH) || msg.health.is_some());
    // seq == last is a retried duplicate; seq == 0 after a higher last is a restart (a gap).
    let gap = state
        .last_seq
        .is_some_and(|last| seq != last.wrapping_add(1) && seq != last);
    let answers_request = !gap
        && state
            .full_state_requested_at
            .is_some_and(|r| seq == r.wrapping_add(1));
    if full || answers_request {
        state.complete = true;
    }
    if !disconnect && !full && (!state.complete || gap) {
        reply.flags |= server_flags::REPORT_FULL_STATE;
        state.full_state_requested_at = Some(seq);
    } else {
        state.full_state_requested_at = None;
    }
    state.last_seq = Some(seq);
    state.record.sequence_num = seq;

    if let Some(uid) = ctx.assign_uid {
        reply.agent_identification = Some(AgentIdentification {
            new_instance_uid: uid.as_bytes().to_vec(),
        });
    }

    // Offers. None to an agent that is leaving.
    if !disconnect {
        if let Some(d) = ctx.desired {
            offer_config(
                state,
                d,
                status.is_some(),
                ctx.now_ms,
                &mut reply,
                &mut events,
            );
        }
        if ctx.opamp_offer.is_some() || ctx.telemetry.is_some() {
            let o = ctx
                .opamp_offer
                .map(|o| o.for_agent(ctx.transport, ctx.identity.is_some()));
            changed |= offer_settings(state, o.as_ref(), ctx.identity, ctx.telemetry, &mut reply);
        }
        if let Some(p) = ctx.packages {
            let statuses = msg.package_statuses.is_some()
                && state.caps() & agent_caps::REPORTS_PACKAGE_STATUSES != 0;
            changed |= packages::offer(state, p, statuses, ctx.now_ms, &mut reply, &mut events);
        }
    }

    Outcome {
        reply,
        changed,
        events,
    }
}

/// `sub` if the agent declared the capability that covers it; otherwise records a CapMismatch.
fn accept<'m, T>(
    sub: Option<&'m T>,
    declared: bool,
    what: &'static str,
    events: &mut Vec<Event>,
) -> Option<&'m T> {
    match sub {
        Some(_) if !declared => {
            events.push(Event::CapMismatch { what });
            None
        }
        other => other,
    }
}

/// An offer the agent has not answered (no status with its hash) for this long goes out again
/// with the reply to its next message: a push or a reply can be lost on the bus (at most once),
/// and an agent that keeps its connection would otherwise never get the config.
pub const REOFFER_AFTER_MS: i64 = 10_000;

/// Remote config (facts §3.4). A status report in this message with another hash always gets
/// the config (the spec's MUST); otherwise it goes out once per connection until the agent
/// reports the hash (any status: resending a FAILED config would only loop), and again after
/// [`REOFFER_AFTER_MS`] without an answer.
fn offer_config(
    state: &mut AgentState,
    d: &Desired,
    status_in_msg: bool,
    now_ms: i64,
    reply: &mut ServerToAgent,
    events: &mut Vec<Event>,
) {
    if state.caps() & agent_caps::ACCEPTS_REMOTE_CONFIG == 0 {
        if state.refused_config.as_ref() != Some(&d.hash_hex) {
            state.refused_config = Some(d.hash_hex.clone());
            events.push(Event::CapMismatch {
                what: "remote_config",
            });
        }
        return;
    }
    let reports_desired = state
        .record
        .remote_config
        .as_ref()
        .is_some_and(|r| r.hash == d.hash_hex);
    let already_offered = state.offered_config.as_ref() == Some(&d.hash_hex)
        && now_ms.saturating_sub(state.offered_at_ms) < REOFFER_AFTER_MS;
    // After this message's status was stored, "status in msg with another hash" is
    // `status_in_msg && !reports_desired`.
    if !reports_desired && (status_in_msg || !already_offered) {
        reply.remote_config = Some(d.remote.clone());
        state.offered_config = Some(d.hash_hex.clone());
        state.offered_at_ms = now_ms;
        state.applied_effective_pending = false;
    }
}

/// `connection_settings` (facts §3.5, §3.8, §5.1): `opamp` to agents that accept OpAMP
/// connection settings (the heartbeat interval to those that heartbeat, and the identity
/// certificate, with the interval, never 0, to those that have one), and the own-telemetry
/// settings of the agent's group for the signals it reports. `o` is the `opamp` offer as made
/// to this agent ([`OpampOffer::for_agent`]), if any. True when it made an offer: the record's
/// `settings_offered` changed, and must be persisted for "once per change" to hold. Called by
/// [`handle`], and by the caller again once the message has shown what the offer depends on
/// (the agent's first description decides its groups).
pub fn offer_settings(
    state: &mut AgentState,
    o: Option<&OpampOffer>,
    identity: Option<&IdentityOffer>,
    telemetry: Option<&TelemetryOffer>,
    reply: &mut ServerToAgent,
) -> bool {
    let mut need = agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS;
    if identity.is_none() {
        need |= agent_caps::REPORTS_HEARTBEAT;
    }
    let opamp = o.filter(|_| state.caps() & need == need);
    let telemetry = telemetry
        .map(|t| t.for_caps(state.caps()))
        .filter(|t| !t.is_empty());
    if opamp.is_none() && telemetry.is_none() {
        return false;
    }
    // Without telemetry the hash is the `opamp` one alone, as before telemetry existed, so
    // agents it does not concern are not offered their settings again.
    let mut hash = opamp.map_or_else(Vec::new, |o| settings_hash(o, identity));
    if let Some(t) = &telemetry {
        hash = t.hash_with(&hash);
    }
    let hex = hex::encode(&hash);
    // Once per change, across connections (and restarts, the record is stored): an agent
    // that restarts on every offer, as opamp-go based ones do, would otherwise loop.
    if state.record.settings_in_use.as_ref() == Some(&hex)
        || state.record.settings_offered.as_ref() == Some(&hex)
    {
        return false;
    }
    let mut offer = opamp.map_or_else(ConnectionSettingsOffers::default, OpampOffer::to_proto);
    offer.hash = hash.clone();
    if let (Some(id), Some(op)) = (identity, offer.opamp.as_mut()) {
        op.certificate = Some(proto::v1::TlsCertificate {
            cert: id.cert_pem.clone().into_bytes(),
            private_key: id
                .private_key_pem
                .clone()
                .map(String::into_bytes)
                .unwrap_or_default(),
            ca_cert: id.ca_pem.clone().into_bytes(),
        });
    }
    if let Some(t) = &telemetry {
        t.fill(&mut offer);
    }
    reply.connection_settings = Some(offer);
    state.record.settings_offered = Some(hex);
    true
}

/// The agent connected with `identity`'s certificate over `transport`: the settings that
/// carry it are in use, so they are not offered again.
pub fn identity_in_use(
    state: &mut AgentState,
    o: &OpampOffer,
    identity: &IdentityOffer,
    transport: Transport,
) {
    // The agent confirmed the latest offer, which carried this certificate (and perhaps
    // telemetry settings, which the certificate's own hash does not cover): keep that.
    let failed = state
        .record
        .settings_status
        .as_ref()
        .is_some_and(|s| s.status == RemoteStatus::Failed);
    if state.record.settings_in_use.is_some()
        && state.record.settings_in_use == state.record.settings_offered
        && !failed
    {
        return;
    }
    let hex = hex::encode(settings_hash(&o.for_agent(transport, true), Some(identity)));
    if state.record.settings_in_use.as_ref() != Some(&hex) {
        state.record.settings_in_use = Some(hex);
        // In use, as the connection shows; what the agent said was of other settings.
        state.record.settings_status = None;
    }
}

/// Build a push (WS server-initiated message) for a newly assigned desired config.
///
/// `Some` only if the agent accepts remote config, does not already report that hash as its
/// last remote config, and it was not already offered on this connection; the offer is then
/// recorded in `offered_config`. `None` otherwise, including for agents lacking
/// AcceptsRemoteConfig: counting that CapMismatch is the caller's job (check
/// `record.capabilities & ACCEPTS_REMOTE_CONFIG` before calling).
pub fn push_config(
    state: &mut AgentState,
    desired: &Desired,
    now_ms: i64,
) -> Option<ServerToAgent> {
    if state.caps() & agent_caps::ACCEPTS_REMOTE_CONFIG == 0 {
        return None;
    }
    let reported = state
        .record
        .remote_config
        .as_ref()
        .is_some_and(|r| r.hash == desired.hash_hex);
    if reported || state.offered_config.as_ref() == Some(&desired.hash_hex) {
        return None;
    }
    state.offered_config = Some(desired.hash_hex.clone());
    state.offered_at_ms = now_ms;
    state.applied_effective_pending = false;
    Some(ServerToAgent {
        instance_uid: state.record.instance_uid.as_bytes().to_vec(),
        capabilities: SERVER_CAPABILITIES,
        remote_config: Some(desired.remote.clone()),
        ..Default::default()
    })
}

/// An error reply: `instance_uid` and `error_response` only, since the spec requires every
/// other field to be unset alongside an error (facts §3.2).
/// The Restart command: only `instance_uid`, `capabilities` and `command`, as the spec
/// requires (agents ignore anything else in it).
pub fn restart_reply(instance_uid: &[u8]) -> ServerToAgent {
    ServerToAgent {
        instance_uid: instance_uid.to_vec(),
        capabilities: SERVER_CAPABILITIES,
        command: Some(proto::v1::ServerToAgentCommand {
            r#type: proto::v1::CommandType::Restart as i32,
        }),
        ..Default::default()
    }
}

pub fn error_reply(
    instance_uid: &[u8],
    kind: ServerErrorResponseType,
    message: &str,
) -> ServerToAgent {
    ServerToAgent {
        instance_uid: instance_uid.to_vec(),
        error_response: Some(ServerErrorResponse {
            r#type: kind as i32,
            error_message: message.to_string(),
            details: None,
        }),
        ..Default::default()
    }
}

/// "Try again shortly": an `error_response{Unavailable}` with retry info, sent when this
/// coordinator cannot serve the agent right now (its partition is changing hands).
pub fn unavailable_reply(instance_uid: &[u8], message: &str) -> ServerToAgent {
    use proto::v1::server_error_response::Details;
    let mut reply = error_reply(instance_uid, ServerErrorResponseType::Unavailable, message);
    if let Some(e) = reply.error_response.as_mut() {
        e.details = Some(Details::RetryInfo(proto::v1::RetryInfo {
            retry_after_nanoseconds: UNAVAILABLE_RETRY_NANOS,
        }));
    }
    reply
}

/// Long enough for a partition hand-over to finish (a lease round), short enough that the
/// agent barely notices.
const UNAVAILABLE_RETRY_NANOS: u64 = 2_000_000_000;

// ---- Wire → domain conversions -------------------------------------------------------------

/// Attribute values become JSON: bytes as a hex string, kvlists as objects, unset as null.
/// Duplicate keys: the last one wins.
pub fn description_from_proto(d: &AgentDescription) -> Description {
    Description {
        identifying: attributes(&d.identifying_attributes),
        non_identifying: attributes(&d.non_identifying_attributes),
    }
}

fn attributes(kvs: &[KeyValue]) -> BTreeMap<String, serde_json::Value> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), any_value_to_json(kv.value.as_ref(), 0)))
        .collect()
}

fn any_value_to_json(v: Option<&AnyValue>, depth: usize) -> serde_json::Value {
    use serde_json::Value as J;
    if depth >= MAX_DEPTH {
        return J::Null;
    }
    let Some(value) = v.and_then(|v| v.value.as_ref()) else {
        return J::Null;
    };
    match value {
        any_value::Value::StringValue(s) => J::String(s.clone()),
        any_value::Value::BoolValue(b) => J::Bool(*b),
        any_value::Value::IntValue(i) => J::from(*i),
        // JSON has no NaN/inf; keep them readable rather than dropping them.
        any_value::Value::DoubleValue(f) => serde_json::Number::from_f64(*f)
            .map(J::Number)
            .unwrap_or_else(|| J::String(f.to_string())),
        any_value::Value::ArrayValue(a) => J::Array(
            a.values
                .iter()
                .map(|v| any_value_to_json(Some(v), depth + 1))
                .collect(),
        ),
        any_value::Value::KvlistValue(l) => J::Object(
            l.values
                .iter()
                .map(|kv| {
                    (
                        kv.key.clone(),
                        any_value_to_json(kv.value.as_ref(), depth + 1),
                    )
                })
                .collect(),
        ),
        any_value::Value::BytesValue(b) => J::String(hex::encode(b)),
    }
}

pub fn health_from_proto(h: &ComponentHealth) -> Health {
    health_at(h, 0)
}

fn health_at(h: &ComponentHealth, depth: usize) -> Health {
    Health {
        healthy: h.healthy,
        status: h.status.clone(),
        last_error: h.last_error.clone(),
        start_time_unix_nano: h.start_time_unix_nano,
        status_time_unix_nano: h.status_time_unix_nano,
        components: if depth + 1 >= MAX_DEPTH {
            BTreeMap::new()
        } else {
            h.component_health_map
                .iter()
                .map(|(k, c)| (k.clone(), health_at(c, depth + 1)))
                .collect()
        },
    }
}

/// Bodies are decoded as UTF-8, lossily (config files are text in practice).
pub fn config_map_from_proto(m: &AgentConfigMap) -> ConfigMap {
    m.config_map
        .iter()
        .map(|(name, f)| {
            (
                name.clone(),
                ConfigFile {
                    body: String::from_utf8_lossy(&f.body).into_owned(),
                    content_type: f.content_type.clone(),
                },
            )
        })
        .collect()
}

pub fn config_map_to_proto(m: &ConfigMap) -> AgentConfigMap {
    AgentConfigMap {
        config_map: m
            .iter()
            .map(|(name, f)| {
                (
                    name.clone(),
                    AgentConfigFile {
                        body: f.body.as_bytes().to_vec(),
                        content_type: f.content_type.clone(),
                    },
                )
            })
            .collect(),
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;
    use proto::v1::{
        AgentDisconnect, ArrayValue, ConnectionSettingsStatus, EffectiveConfig, KeyValueList,
        RemoteConfigStatus,
    };
    use proto::{agent_flags, server_caps};
    use serde_json::json;

    const UID: [u8; 16] = [7; 16];
    /// ReportsStatus | AcceptsRemoteConfig | ReportsEffectiveConfig | ReportsHealth |
    /// ReportsRemoteConfig: a typical collector.
    const CAPS: u64 = 0x1 | 0x2 | 0x4 | 0x800 | 0x1000;
    const HB: u64 = agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS | agent_caps::REPORTS_HEARTBEAT;

    fn fresh() -> AgentState {
        AgentState::new(AgentRecord::new(InstanceUid(UID), 0))
    }

    fn ctx<'a>() -> Context<'a> {
        Context {
            components_known: false,
            custom_capabilities: &[],
            telemetry: None,
            now_ms: 1_000,
            transport: Transport::WebSocket,
            desired: None,
            opamp_offer: None,
            identity: None,
            assign_uid: None,
            packages: None,
        }
    }

    fn with_desired(d: &Desired) -> Context<'_> {
        Context {
            desired: Some(d),
            ..ctx()
        }
    }

    fn kv(key: &str, v: any_value::Value) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: Some(AnyValue { value: Some(v) }),
        }
    }

    fn desc(name: &str) -> AgentDescription {
        AgentDescription {
            identifying_attributes: vec![kv(
                "service.name",
                any_value::Value::StringValue(name.into()),
            )],
            non_identifying_attributes: vec![],
        }
    }

    fn files(body: &str) -> ConfigMap {
        ConfigMap::from([(
            "collector.yaml".to_string(),
            ConfigFile {
                body: body.into(),
                content_type: "text/yaml".into(),
            },
        )])
    }

    fn effective(body: &str) -> EffectiveConfig {
        EffectiveConfig {
            config_map: Some(config_map_to_proto(&files(body))),
        }
    }

    fn status(hash: &[u8], s: i32, err: &str) -> RemoteConfigStatus {
        RemoteConfigStatus {
            last_remote_config_hash: hash.to_vec(),
            status: s,
            error_message: err.into(),
        }
    }

    fn healthy() -> ComponentHealth {
        ComponentHealth {
            healthy: true,
            status: "ok".into(),
            ..Default::default()
        }
    }

    /// A message with everything CAPS says the agent reports.
    fn full(seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: UID.to_vec(),
            sequence_num: seq,
            capabilities: CAPS,
            agent_description: Some(desc("otelcol")),
            health: Some(healthy()),
            effective_config: Some(effective("a: 1")),
            remote_config_status: Some(status(&[], 0, "")),
            ..Default::default()
        }
    }

    /// A heartbeat: compressed, nothing changed.
    fn beat(seq: u64) -> AgentToServer {
        AgentToServer {
            instance_uid: UID.to_vec(),
            sequence_num: seq,
            capabilities: CAPS,
            ..Default::default()
        }
    }

    /// An agent that has sent its full state once.
    fn known() -> AgentState {
        let mut s = fresh();
        handle(&mut s, &full(0), &ctx());
        s
    }

    fn full_flag(o: &Outcome) -> bool {
        o.reply.flags & server_flags::REPORT_FULL_STATE != 0
    }

    fn desired() -> Desired {
        Desired::new(1, &files("b: 2"))
    }

    // ---- basics ----

    #[test]
    fn server_capabilities_match_the_bits() {
        assert_eq!(
            SERVER_CAPABILITIES,
            server_caps::ACCEPTS_STATUS
                | server_caps::OFFERS_REMOTE_CONFIG
                | server_caps::ACCEPTS_EFFECTIVE_CONFIG
                | server_caps::OFFERS_PACKAGES
                | server_caps::ACCEPTS_PACKAGES_STATUS
                | server_caps::OFFERS_CONNECTION_SETTINGS
                | server_caps::ACCEPTS_CONNECTION_SETTINGS_REQUEST
        );
    }

    #[test]
    fn first_full_message_is_stored_and_acked() {
        let mut s = fresh();
        let o = handle(&mut s, &full(0), &ctx());
        assert_eq!(o.reply.instance_uid, UID.to_vec());
        assert_eq!(o.reply.capabilities, SERVER_CAPABILITIES);
        assert_eq!(o.reply.flags, 0);
        assert!(o.reply.remote_config.is_none());
        assert!(o.reply.connection_settings.is_none());
        assert!(o.reply.agent_identification.is_none());
        assert!(o.reply.error_response.is_none());
        assert!(o.changed);
        assert_eq!(o.events, vec![Event::DescriptionChanged]);
        let r = &s.record;
        assert_eq!(r.capabilities, CAPS);
        assert_eq!(
            r.description.get_str("service.name").as_deref(),
            Some("otelcol")
        );
        assert_eq!(r.health.as_ref().map(|h| h.status.as_str()), Some("ok"));
        assert_eq!(r.effective_config, Some(files("a: 1")));
        assert_eq!(
            r.effective_config_hash,
            Some(hex::encode(config_hash(&files("a: 1"))))
        );
        assert_eq!(
            r.remote_config.as_ref().map(|c| c.status),
            Some(RemoteStatus::Unset)
        );
        assert!(r.connected);
        assert_eq!(r.transport, Some(Transport::WebSocket));
        assert_eq!(r.last_seen_ms, 1_000);
        assert!(s.complete);
        assert_eq!(s.last_seq, Some(0));
    }

    #[test]
    fn heartbeat_updates_only_liveness() {
        let mut s = known();
        let before = s.record.clone();
        let c = Context {
            now_ms: 5_000,
            ..ctx()
        };
        let o = handle(&mut s, &beat(1), &c);
        assert!(!o.changed);
        assert!(o.events.is_empty());
        assert_eq!(o.reply.flags, 0);
        assert_eq!(s.record.last_seen_ms, 5_000);
        assert_eq!(s.record.sequence_num, 1);
        assert_eq!(
            AgentRecord {
                last_seen_ms: 1_000,
                sequence_num: 0,
                ..s.record.clone()
            },
            before
        );
    }

    #[test]
    fn reply_echoes_the_uid_it_answers_even_a_bad_one() {
        let mut s = fresh();
        let mut m = full(0);
        m.instance_uid = b"short".to_vec();
        let o = handle(&mut s, &m, &ctx());
        assert_eq!(o.reply.instance_uid, b"short".to_vec());
    }

    // ---- status compression ----

    #[test]
    fn omitted_sub_messages_keep_stored_values() {
        let mut s = known();
        let mut m = beat(1);
        m.health = Some(ComponentHealth {
            healthy: false,
            last_error: "boom".into(),
            ..Default::default()
        });
        let o = handle(&mut s, &m, &ctx());
        assert!(o.changed);
        assert_eq!(s.record.health.as_ref().map(|h| h.healthy), Some(false));
        // Description and effective config untouched.
        assert_eq!(s.record.effective_config, Some(files("a: 1")));
        assert!(s.record.description.get_str("service.name").is_some());

        let o = handle(&mut s, &beat(2), &ctx());
        assert!(!o.changed);
        assert_eq!(
            s.record.health.as_ref().map(|h| h.last_error.as_str()),
            Some("boom")
        );
    }

    #[test]
    fn description_change_is_an_event_and_same_description_is_not() {
        let mut s = known();
        let mut m = beat(1);
        m.agent_description = Some(desc("otelcol"));
        let o = handle(&mut s, &m, &ctx());
        assert!(!o.events.contains(&Event::DescriptionChanged));
        assert!(!o.changed);
        m.sequence_num = 2;
        m.agent_description = Some(desc("other"));
        let o = handle(&mut s, &m, &ctx());
        assert!(o.events.contains(&Event::DescriptionChanged));
        assert!(o.changed);
    }

    #[test]
    fn effective_config_change_updates_hash() {
        let mut s = known();
        let mut m = beat(1);
        m.effective_config = Some(effective("a: 2"));
        let o = handle(&mut s, &m, &ctx());
        assert!(o.changed);
        assert_eq!(
            s.record.effective_config_hash,
            Some(hex::encode(config_hash(&files("a: 2"))))
        );
    }

    #[test]
    fn sub_messages_without_capability_are_ignored_and_counted() {
        let mut s = fresh();
        let m = AgentToServer {
            instance_uid: UID.to_vec(),
            capabilities: agent_caps::REPORTS_STATUS,
            agent_description: Some(desc("x")),
            health: Some(healthy()),
            effective_config: Some(effective("a: 1")),
            remote_config_status: Some(status(b"h", 1, "")),
            connection_settings_status: Some(ConnectionSettingsStatus::default()),
            ..Default::default()
        };
        let o = handle(&mut s, &m, &ctx());
        for what in [
            "health",
            "effective_config",
            "remote_config_status",
            "connection_settings_status",
        ] {
            assert!(o.events.contains(&Event::CapMismatch { what }), "{what}");
        }
        assert!(s.record.health.is_none());
        assert!(s.record.effective_config.is_none());
        assert!(s.record.remote_config.is_none());
        // Description is all this agent reports, so the message is full.
        assert!(s.complete);
        assert!(!full_flag(&o));
    }

    // ---- capabilities ----

    #[test]
    fn capabilities_zero_keeps_previous() {
        let mut s = known();
        let mut m = beat(1);
        m.capabilities = 0;
        let o = handle(&mut s, &m, &ctx());
        assert_eq!(s.record.capabilities, CAPS);
        assert!(!o.changed);
        assert!(!full_flag(&o));
    }

    #[test]
    fn capability_change_is_persisted() {
        let mut s = known();
        let mut m = beat(1);
        m.capabilities = CAPS | HB;
        let o = handle(&mut s, &m, &ctx());
        assert!(o.changed);
        assert_eq!(s.record.capabilities, CAPS | HB);
    }

    #[test]
    fn undefined_bits_are_masked_and_reported() {
        let mut s = fresh();
        let mut m = full(0);
        m.capabilities = CAPS | 0x1_0000 | (1 << 63);
        let o = handle(&mut s, &m, &ctx());
        assert_eq!(s.record.capabilities, CAPS);
        assert!(o.events.contains(&Event::CapMismatch {
            what: "undefined_bits"
        }));
    }

    #[test]
    fn only_undefined_bits_count_as_unchanged() {
        let mut s = known();
        let mut m = beat(1);
        m.capabilities = 0x10_0000;
        handle(&mut s, &m, &ctx());
        assert_eq!(s.record.capabilities, CAPS);
    }

    // ---- sequence numbers and full state ----

    #[test]
    fn new_state_with_partial_message_asks_for_full_state() {
        let mut s = fresh();
        let o = handle(&mut s, &beat(5), &ctx());
        assert!(full_flag(&o));
        assert!(!s.complete);
    }

    #[test]
    fn new_state_with_full_message_does_not_ask() {
        let mut s = fresh();
        let o = handle(&mut s, &full(5), &ctx());
        assert!(!full_flag(&o));
        assert!(s.complete);
    }

    #[test]
    fn full_state_answer_completes_the_state() {
        let mut s = fresh();
        assert!(full_flag(&handle(&mut s, &beat(5), &ctx())));
        let o = handle(&mut s, &full(6), &ctx());
        assert!(!full_flag(&o));
        assert!(s.complete);
        assert!(!full_flag(&handle(&mut s, &beat(7), &ctx())));
    }

    #[test]
    fn incomplete_answer_to_full_state_request_is_not_asked_again() {
        // An agent claiming ReportsHealth with no health to report answers without it; asking
        // again would loop (the Go client answers immediately).
        let mut s = fresh();
        assert!(full_flag(&handle(&mut s, &beat(5), &ctx())));
        let mut m = full(6);
        m.health = None;
        let o = handle(&mut s, &m, &ctx());
        assert!(!full_flag(&o));
        assert!(s.complete);
    }

    #[test]
    fn retried_flagged_message_is_flagged_again() {
        let mut s = fresh();
        assert!(full_flag(&handle(&mut s, &beat(5), &ctx())));
        assert!(full_flag(&handle(&mut s, &beat(5), &ctx())));
        assert!(!full_flag(&handle(&mut s, &full(6), &ctx())));
    }

    #[test]
    fn sequence_gap_asks_for_full_state() {
        let mut s = known();
        let o = handle(&mut s, &beat(3), &ctx());
        assert!(full_flag(&o));
        assert_eq!(s.last_seq, Some(3));
    }

    #[test]
    fn sequence_gap_with_full_message_does_not_ask() {
        let mut s = known();
        let o = handle(&mut s, &full(3), &ctx());
        assert!(!full_flag(&o));
    }

    #[test]
    fn duplicate_sequence_is_not_a_gap() {
        let mut s = known();
        handle(&mut s, &beat(1), &ctx());
        let o = handle(&mut s, &beat(1), &ctx());
        assert!(!full_flag(&o));
    }

    #[test]
    fn sequence_restart_at_zero_is_a_gap() {
        let mut s = known();
        for i in 1..=4 {
            handle(&mut s, &beat(i), &ctx());
        }
        assert!(full_flag(&handle(&mut s, &beat(0), &ctx())));
        let mut s = known();
        for i in 1..=4 {
            handle(&mut s, &beat(i), &ctx());
        }
        assert!(!full_flag(&handle(&mut s, &full(0), &ctx())));
    }

    #[test]
    fn sequence_wraps_without_panicking() {
        let mut s = known();
        s.last_seq = Some(u64::MAX);
        assert!(!full_flag(&handle(&mut s, &beat(0), &ctx())));
    }

    #[test]
    fn reconnect_drops_pending_full_state_request() {
        let mut s = fresh();
        assert!(full_flag(&handle(&mut s, &beat(5), &ctx())));
        s.connection_started();
        // The request may never have reached the agent: a partial message is not its answer.
        assert!(full_flag(&handle(&mut s, &beat(6), &ctx())));
    }

    #[test]
    fn expected_set_follows_capabilities() {
        // Without ReportsEffectiveConfig, a missing effective config is not a hole.
        let mut s = fresh();
        let mut m = full(0);
        m.capabilities = CAPS & !agent_caps::REPORTS_EFFECTIVE_CONFIG;
        m.effective_config = None;
        assert!(!full_flag(&handle(&mut s, &m, &ctx())));
        // Without a description, never full.
        let mut s = fresh();
        let mut m = full(0);
        m.agent_description = None;
        assert!(full_flag(&handle(&mut s, &m, &ctx())));
    }

    // ---- remote config ----

    #[test]
    fn remote_config_sent_when_status_hash_differs() {
        let d = desired();
        let mut s = known();
        let mut m = beat(1);
        m.remote_config_status = Some(status(b"old", 1, ""));
        let o = handle(&mut s, &m, &with_desired(&d));
        let rc = o.reply.remote_config.as_ref();
        assert_eq!(
            rc.map(|r| r.config_hash.clone()),
            Some(d.remote.config_hash.clone())
        );
        assert_eq!(
            rc.and_then(|r| r.config.clone()),
            Some(config_map_to_proto(&files("b: 2")))
        );
        assert_eq!(s.offered_config.as_deref(), Some(d.hash_hex.as_str()));
        // A later report with another hash gets it again even on the same connection (MUST).
        let mut m = beat(2);
        m.remote_config_status = Some(status(b"older", 1, ""));
        assert!(handle(&mut s, &m, &with_desired(&d))
            .reply
            .remote_config
            .is_some());
    }

    #[test]
    fn remote_config_sent_once_per_connection_without_fresh_status() {
        let d = desired();
        let mut s = known();
        assert!(handle(&mut s, &beat(1), &with_desired(&d))
            .reply
            .remote_config
            .is_some());
        assert!(handle(&mut s, &beat(2), &with_desired(&d))
            .reply
            .remote_config
            .is_none());
        s.connection_started();
        assert!(handle(&mut s, &beat(3), &with_desired(&d))
            .reply
            .remote_config
            .is_some());
    }

    #[test]
    fn remote_config_not_resent_when_agent_reports_it_even_failed() {
        let d = desired();
        let hash = d.remote.config_hash.clone();
        for st in [1, 2, 3] {
            let mut s = known();
            let mut m = beat(1);
            m.remote_config_status = Some(status(&hash, st, "x"));
            assert!(handle(&mut s, &m, &with_desired(&d))
                .reply
                .remote_config
                .is_none());
            s.connection_started();
            assert!(handle(&mut s, &beat(2), &with_desired(&d))
                .reply
                .remote_config
                .is_none());
        }
    }

    #[test]
    fn remote_config_to_agent_without_status_reports_once_per_connection() {
        let d = desired();
        let caps = CAPS & !agent_caps::REPORTS_REMOTE_CONFIG;
        let mut s = fresh();
        let mut m = full(0);
        m.capabilities = caps;
        m.remote_config_status = None;
        assert!(handle(&mut s, &m, &with_desired(&d))
            .reply
            .remote_config
            .is_some());
        let mut m = beat(1);
        m.capabilities = caps;
        assert!(handle(&mut s, &m, &with_desired(&d))
            .reply
            .remote_config
            .is_none());
        s.connection_started();
        m.sequence_num = 2;
        assert!(handle(&mut s, &m, &with_desired(&d))
            .reply
            .remote_config
            .is_some());
    }

    #[test]
    fn an_offer_left_unanswered_is_made_again_on_the_same_connection() {
        let d = desired();
        let mut s = known();
        let first = with_desired(&d);
        assert!(handle(&mut s, &beat(1), &first)
            .reply
            .remote_config
            .is_some());
        // The offer may have been lost on the bus: heartbeats without a status about it...
        let mut soon = with_desired(&d);
        soon.now_ms = first.now_ms + REOFFER_AFTER_MS - 1;
        assert!(handle(&mut s, &beat(2), &soon)
            .reply
            .remote_config
            .is_none());
        let mut later = with_desired(&d);
        later.now_ms = first.now_ms + REOFFER_AFTER_MS;
        assert!(
            handle(&mut s, &beat(3), &later)
                .reply
                .remote_config
                .is_some(),
            "offered again once it went unanswered"
        );
        // A push counts as an offer the same way.
        let d2 = Desired::new(2, &files("c: 9"));
        assert!(push_config(&mut s, &d2, later.now_ms).is_some());
        assert!(push_config(&mut s, &d2, later.now_ms + 1).is_none());
        let mut after = with_desired(&d2);
        after.now_ms = later.now_ms + REOFFER_AFTER_MS;
        assert!(handle(&mut s, &beat(4), &after)
            .reply
            .remote_config
            .is_some());
    }

    #[test]
    fn new_desired_config_is_sent_on_same_connection() {
        let d1 = desired();
        let d2 = Desired::new(2, &files("c: 3"));
        let mut s = known();
        assert!(handle(&mut s, &beat(1), &with_desired(&d1))
            .reply
            .remote_config
            .is_some());
        let o = handle(&mut s, &beat(2), &with_desired(&d2));
        assert_eq!(
            o.reply.remote_config.map(|r| r.config_hash),
            Some(d2.remote.config_hash.clone())
        );
    }

    #[test]
    fn no_remote_config_without_accepts_remote_config() {
        let d = desired();
        let caps = CAPS & !agent_caps::ACCEPTS_REMOTE_CONFIG;
        let mut s = fresh();
        let mut m = full(0);
        m.capabilities = caps;
        let o = handle(&mut s, &m, &with_desired(&d));
        assert!(o.reply.remote_config.is_none());
        assert!(o.events.contains(&Event::CapMismatch {
            what: "remote_config"
        }));
        // Counted once per connection, not every heartbeat.
        let mut m = beat(1);
        m.capabilities = caps;
        let o = handle(&mut s, &m, &with_desired(&d));
        assert!(o.events.is_empty());
        assert!(o.reply.remote_config.is_none());
        // Gaining the capability later on the same connection gets the config.
        let mut m = beat(2);
        m.capabilities = CAPS;
        assert!(handle(&mut s, &m, &with_desired(&d))
            .reply
            .remote_config
            .is_some());
    }

    #[test]
    fn failed_event_carries_error() {
        let d = desired();
        let mut s = known();
        let mut m = beat(1);
        m.remote_config_status = Some(status(&d.remote.config_hash, 3, "bad yaml"));
        let o = handle(&mut s, &m, &with_desired(&d));
        assert!(o.changed);
        assert!(o.events.contains(&Event::ConfigFailed {
            hash: d.hash_hex.clone(),
            error: "bad yaml".into()
        }));
        let r = s.record.remote_config.clone();
        assert_eq!(r.as_ref().map(|r| r.status), Some(RemoteStatus::Failed));
        assert_eq!(r.map(|r| r.error_message), Some("bad yaml".into()));
        // The same status again (e.g. in a full-state resend) is not a new event.
        m.sequence_num = 2;
        let o = handle(&mut s, &m, &with_desired(&d));
        assert!(o.events.is_empty());
    }

    #[test]
    fn applied_event_sets_applied_effective_hash_from_same_message() {
        let d = desired();
        let mut s = known();
        let mut m = beat(1);
        m.remote_config_status = Some(status(&d.remote.config_hash, 1, ""));
        m.effective_config = Some(effective("b: 2"));
        let o = handle(&mut s, &m, &with_desired(&d));
        assert!(o.events.contains(&Event::ConfigApplied {
            hash: d.hash_hex.clone()
        }));
        let want = Some(hex::encode(config_hash(&files("b: 2"))));
        assert_eq!(s.record.applied_effective_hash, want);
        assert!(!s.applied_effective_pending);
    }

    #[test]
    fn applied_effective_hash_follows_effective_config_sent_after_applied() {
        let d = desired();
        let mut s = known();
        let mut m = beat(1);
        m.remote_config_status = Some(status(&d.remote.config_hash, 1, ""));
        handle(&mut s, &m, &with_desired(&d));
        assert_eq!(
            s.record.applied_effective_hash,
            s.record.effective_config_hash
        );
        let mut m = beat(2);
        m.effective_config = Some(effective("b: 2"));
        let o = handle(&mut s, &m, &with_desired(&d));
        assert!(o.changed);
        let after_apply = Some(hex::encode(config_hash(&files("b: 2"))));
        assert_eq!(s.record.applied_effective_hash, after_apply);
        // A later change without a new offer is drift: the baseline stays.
        let mut m = beat(3);
        m.effective_config = Some(effective("b: 3"));
        handle(&mut s, &m, &with_desired(&d));
        assert_eq!(s.record.applied_effective_hash, after_apply);
        s.record.assigned_config_hash = Some(d.hash_hex.clone());
        assert_eq!(
            s.record.config_state(),
            shared::domain::ConfigState::Drifted
        );
    }

    #[test]
    fn applied_for_another_hash_is_not_config_applied() {
        let d = desired();
        let mut s = known();
        let mut m = beat(1);
        m.remote_config_status = Some(status(b"other", 1, ""));
        let o = handle(&mut s, &m, &with_desired(&d));
        assert!(!o
            .events
            .iter()
            .any(|e| matches!(e, Event::ConfigApplied { .. })));
        assert!(s.record.applied_effective_hash.is_none());
    }

    #[test]
    fn applied_uses_assigned_hash_when_no_desired_given() {
        let d = desired();
        let mut s = known();
        s.record.assigned_config_hash = Some(d.hash_hex.clone());
        let mut m = beat(1);
        m.remote_config_status = Some(status(&d.remote.config_hash, 1, ""));
        let o = handle(&mut s, &m, &ctx());
        assert!(o
            .events
            .contains(&Event::ConfigApplied { hash: d.hash_hex }));
    }

    // ---- instance uid ----

    #[test]
    fn assign_uid_sends_agent_identification() {
        let new = InstanceUid([9; 16]);
        let mut s = AgentState::new(AgentRecord::new(new, 0));
        let mut m = full(0);
        m.instance_uid = vec![];
        m.flags = agent_flags::REQUEST_INSTANCE_UID;
        let c = Context {
            assign_uid: Some(new),
            ..ctx()
        };
        let o = handle(&mut s, &m, &c);
        assert_eq!(o.reply.instance_uid, Vec::<u8>::new());
        let id = o.reply.agent_identification.map(|a| a.new_instance_uid);
        assert_eq!(id, Some(vec![9; 16]));
        assert_eq!(s.record.instance_uid, new);
    }

    #[test]
    fn request_uid_without_assignment_is_answered_normally() {
        let mut s = known();
        let mut m = beat(1);
        m.flags = agent_flags::REQUEST_INSTANCE_UID;
        let o = handle(&mut s, &m, &ctx());
        assert!(o.reply.agent_identification.is_none());
        assert!(o.reply.error_response.is_none());
        assert_eq!(o.reply.capabilities, SERVER_CAPABILITIES);
    }

    // ---- heartbeat / connection settings ----

    fn offer() -> OpampOffer {
        OpampOffer {
            endpoint: "wss://ampora.example/v1/opamp".into(),
            heartbeat_interval_secs: 30,
        }
    }

    fn with_offer(o: &OpampOffer) -> Context<'_> {
        Context {
            opamp_offer: Some(o),
            identity: None,
            ..ctx()
        }
    }

    fn hb_beat(seq: u64) -> AgentToServer {
        let mut m = beat(seq);
        m.capabilities = CAPS | HB;
        m
    }

    fn identity(serial: &str, key: bool) -> IdentityOffer {
        IdentityOffer {
            serial: serial.into(),
            cert_pem: format!("CERT {serial}"),
            ca_pem: "CA".into(),
            private_key_pem: key.then(|| "KEY".into()),
        }
    }

    #[test]
    fn identity_is_offered_with_interval_and_repeated_under_the_same_hash() {
        let off = offer();
        let id = identity("4a01", true);
        let mut s = known();
        let mut msg = beat(1);
        // AcceptsOpAMPConnectionSettings alone suffices for a certificate offer.
        msg.capabilities = CAPS | agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS;
        let c = Context {
            opamp_offer: Some(&off),
            identity: Some(&id),
            ..ctx()
        };
        let first = handle(&mut s, &msg, &c).reply.connection_settings;
        let first = first.expect("offered");
        let op = first.opamp.clone().expect("opamp");
        assert_eq!(op.heartbeat_interval_seconds, 30, "never 0 (facts §4.6)");
        let cert = op.certificate.expect("certificate");
        assert_eq!(cert.cert, b"CERT 4a01");
        assert_eq!(cert.private_key, b"KEY");
        assert_eq!(cert.ca_cert, b"CA");
        assert_ne!(first.hash, off.hash(), "the certificate is in the hash");

        // Once per change: a new connection (an agent restarting on every offer, say) is not
        // offered the same settings again.
        s.connection_started();
        let repeat = identity("4a01", false);
        let c = Context {
            opamp_offer: Some(&off),
            identity: Some(&repeat),
            ..ctx()
        };
        msg.sequence_num = 2;
        let again = handle(&mut s, &msg, &c).reply.connection_settings;
        assert!(again.is_none(), "the same offer went out again: {again:?}");
        assert_eq!(
            s.record.settings_offered.as_deref(),
            Some(hex::encode(&first.hash).as_str())
        );

        // Rotation: a new certificate, a new hash.
        let rotated = identity("4a02", true);
        let c = Context {
            opamp_offer: Some(&off),
            identity: Some(&rotated),
            ..ctx()
        };
        msg.sequence_num = 3;
        let third = handle(&mut s, &msg, &c)
            .reply
            .connection_settings
            .expect("rotated");
        assert_ne!(third.hash, first.hash);
    }

    #[test]
    fn identity_offers_send_the_agent_to_tls() {
        let off = OpampOffer {
            endpoint: "ws://127.0.0.1:4320/v1/opamp".into(),
            heartbeat_interval_secs: 30,
        };
        let id = identity("4a01", false);
        let mut s = known();
        let mut msg = beat(1);
        msg.capabilities = CAPS | HB;
        let plain = handle(&mut s, &msg, &with_offer(&off)).reply;
        let plain = plain.connection_settings.and_then(|c| c.opamp);
        assert_eq!(
            plain.expect("heartbeat offer").destination_endpoint,
            off.endpoint,
            "without a certificate the endpoint is offered as configured"
        );
        s.connection_started();
        msg.sequence_num = 2;
        let c = Context {
            opamp_offer: Some(&off),
            identity: Some(&id),
            ..ctx()
        };
        let op = handle(&mut s, &msg, &c).reply.connection_settings;
        let op = op.and_then(|c| c.opamp).expect("identity offer");
        assert_eq!(op.destination_endpoint, "wss://127.0.0.1:4320/v1/opamp");
        let o = |e: &str| OpampOffer {
            endpoint: e.into(),
            heartbeat_interval_secs: 1,
        };
        let at = |e: &str, t, tls| o(e).for_agent(t, tls).endpoint;
        assert_eq!(
            at("HTTP://h:1/v1/opamp", Transport::Http, true),
            "https://h:1/v1/opamp"
        );
        assert_eq!(
            at("wss://h/v1/opamp", Transport::WebSocket, false),
            "wss://h/v1/opamp"
        );
        assert_eq!(
            at("ws://h/v1/opamp", Transport::Http, false),
            "http://h/v1/opamp",
            "a plain-HTTP agent is never sent to WebSocket"
        );
        assert_eq!(
            at("https://h/v1/opamp", Transport::WebSocket, false),
            "wss://h/v1/opamp"
        );
    }

    #[test]
    fn no_telemetry_without_group_settings_and_never_other_connections() {
        let off = offer();
        let mut s = known();
        let mut m = hb_beat(1);
        m.capabilities |= agent_caps::REPORTS_OWN_TRACES
            | agent_caps::REPORTS_OWN_METRICS
            | agent_caps::REPORTS_OWN_LOGS
            | agent_caps::ACCEPTS_OTHER_CONNECTION_SETTINGS;
        let o = handle(&mut s, &m, &with_offer(&off));
        let cs = o.reply.connection_settings.expect("the opamp settings");
        assert!(cs.opamp.is_some());
        assert!(cs.own_metrics.is_none() && cs.own_traces.is_none() && cs.own_logs.is_none());
        assert!(cs.other_connections.is_empty());
    }

    #[test]
    fn package_statuses_and_components_need_their_capabilities() {
        let mut s = fresh();
        let mut m = full(0);
        m.package_statuses = Some(proto::v1::PackageStatuses::default());
        m.available_components = Some(proto::v1::AvailableComponents {
            components: Default::default(),
            hash: vec![1; 32],
        });
        let o = handle(&mut s, &m, &ctx());
        for what in ["package_statuses", "available_components"] {
            assert!(o.events.contains(&Event::CapMismatch { what }), "{what}");
        }
        assert!(s.record.packages.is_none() && s.record.components_hash.is_none());
        assert_eq!(o.reply.flags & server_flags::REPORT_AVAILABLE_COMPONENTS, 0);
        // With ReportsAvailableComponents, an unknown hash is asked for; a known one is not.
        let mut s = fresh();
        m.capabilities |= agent_caps::REPORTS_AVAILABLE_COMPONENTS;
        m.package_statuses = None;
        let o = handle(&mut s, &m, &ctx());
        assert_ne!(o.reply.flags & server_flags::REPORT_AVAILABLE_COMPONENTS, 0);
        assert_eq!(
            s.record.components_hash.as_deref(),
            Some(hex::encode([1; 32]).as_str())
        );
        let known = Context {
            components_known: true,
            ..ctx()
        };
        m.sequence_num = 1;
        let o = handle(&mut s, &m, &known);
        assert_eq!(o.reply.flags & server_flags::REPORT_AVAILABLE_COMPONENTS, 0);
    }

    #[test]
    fn only_the_component_set_asked_for_is_taken() {
        let set = |hash: u8| proto::v1::AvailableComponents {
            components: [(
                "exporters".to_owned(),
                proto::v1::ComponentDetails {
                    metadata: Vec::new(),
                    sub_component_map: [("kafka".to_owned(), Default::default())].into(),
                },
            )]
            .into(),
            hash: vec![hash; 32],
        };
        let reported = |o: &Outcome| {
            o.events
                .iter()
                .any(|e| matches!(e, Event::ComponentsReported { .. }))
        };
        let mut s = fresh();
        let mut m = full(0);
        m.capabilities |= agent_caps::REPORTS_AVAILABLE_COMPONENTS;
        // Unasked: not taken (an agent cannot fill the store under made-up hashes).
        m.available_components = Some(set(2));
        let o = handle(&mut s, &m, &ctx());
        assert!(!reported(&o));
        assert!(o.events.contains(&Event::CapMismatch {
            what: "available_components_unasked"
        }));
        // Asked for hash 3 (its hash alone), then sent: taken once.
        m.sequence_num = 1;
        m.available_components = Some(proto::v1::AvailableComponents {
            components: Default::default(),
            hash: vec![3; 32],
        });
        handle(&mut s, &m, &ctx());
        m.sequence_num = 2;
        m.available_components = Some(set(3));
        assert!(reported(&handle(&mut s, &m, &ctx())));
        m.sequence_num = 3;
        assert!(
            !reported(&handle(&mut s, &m, &ctx())),
            "asked once, taken once"
        );
    }

    #[test]
    fn an_agents_custom_message_is_kept_only_when_relayed_declared_and_small() {
        let relayed = ["com.example.echo".to_owned()];
        let c = Context {
            custom_capabilities: &relayed,
            ..ctx()
        };
        let mut s = fresh();
        let mut m = full(0);
        m.custom_capabilities = Some(proto::v1::CustomCapabilities {
            capabilities: vec!["com.example.echo".into(), "com.example.other".into()],
        });
        let o = handle(&mut s, &m, &c);
        assert_eq!(
            o.reply.custom_capabilities.map(|c| c.capabilities),
            Some(relayed.to_vec()),
            "announced on the connection's first reply"
        );
        let msg = |cap: &str, len: usize| proto::v1::CustomMessage {
            capability: cap.into(),
            r#type: "t".into(),
            data: vec![b'x'; len],
        };
        for (i, (cap, len)) in [
            ("com.example.other", 10),
            ("com.example.echo", custom::MAX_KEPT_DATA + 1),
            ("com.example.echo", 10),
        ]
        .into_iter()
        .enumerate()
        {
            m.sequence_num = 1 + i as u64;
            m.custom_message = Some(msg(cap, len));
            let o = handle(&mut s, &m, &c);
            assert!(o.reply.custom_capabilities.is_none(), "announced once");
        }
        assert_eq!(s.record.custom_messages.len(), 1);
        assert_eq!(s.record.custom_messages[0].capability, "com.example.echo");
    }

    #[test]
    fn heartbeat_offer_needs_both_capabilities() {
        let off = offer();
        for caps in [
            CAPS,
            CAPS | agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS,
            CAPS | agent_caps::REPORTS_HEARTBEAT,
        ] {
            let mut s = known();
            let mut m = beat(1);
            m.capabilities = caps;
            let o = handle(&mut s, &m, &with_offer(&off));
            assert!(o.reply.connection_settings.is_none(), "{caps:#x}");
            assert!(o.events.is_empty());
        }
        let mut s = known();
        let o = handle(&mut s, &hb_beat(1), &with_offer(&off));
        let cs = o.reply.connection_settings.clone();
        let op = cs.as_ref().and_then(|c| c.opamp.clone());
        assert_eq!(cs.map(|c| c.hash), Some(off.hash()));
        assert_eq!(
            op.as_ref().map(|o| o.destination_endpoint.as_str()),
            Some("wss://ampora.example/v1/opamp")
        );
        assert_eq!(op.map(|o| o.heartbeat_interval_seconds), Some(30));
    }

    #[test]
    fn heartbeat_interval_is_never_zero() {
        let off = OpampOffer {
            heartbeat_interval_secs: 0,
            ..offer()
        };
        let mut s = known();
        let o = handle(&mut s, &hb_beat(1), &with_offer(&off));
        let secs = o
            .reply
            .connection_settings
            .and_then(|c| c.opamp)
            .map(|o| o.heartbeat_interval_seconds);
        assert_eq!(secs, Some(1));
    }

    #[test]
    fn settings_hash_is_stable_and_content_sensitive() {
        assert_eq!(offer().hash(), offer().hash());
        assert_eq!(offer().hash().len(), 32);
        let other_interval = OpampOffer {
            heartbeat_interval_secs: 60,
            ..offer()
        };
        let other_endpoint = OpampOffer {
            endpoint: "wss://elsewhere/v1/opamp".into(),
            ..offer()
        };
        assert_ne!(offer().hash(), other_interval.hash());
        assert_ne!(offer().hash(), other_endpoint.hash());
    }

    #[test]
    fn settings_are_offered_once_per_change_not_per_connection() {
        let off = offer();
        let mut s = known();
        assert!(handle(&mut s, &hb_beat(1), &with_offer(&off))
            .reply
            .connection_settings
            .is_some());
        assert!(handle(&mut s, &hb_beat(2), &with_offer(&off))
            .reply
            .connection_settings
            .is_none());
        s.connection_started();
        assert!(handle(&mut s, &hb_beat(3), &with_offer(&off))
            .reply
            .connection_settings
            .is_none());
        let changed = OpampOffer {
            heartbeat_interval_secs: 60,
            ..offer()
        };
        assert!(handle(&mut s, &hb_beat(4), &with_offer(&changed))
            .reply
            .connection_settings
            .is_some());
    }

    #[test]
    fn heartbeat_offer_skipped_when_agent_reports_our_hash() {
        let off = offer();
        let mut s = known();
        let mut m = hb_beat(1);
        m.capabilities |= agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS;
        m.connection_settings_status = Some(ConnectionSettingsStatus {
            last_connection_settings_hash: off.hash(),
            status: 1,
            error_message: String::new(),
        });
        assert!(handle(&mut s, &m, &with_offer(&off))
            .reply
            .connection_settings
            .is_none());
        // The (compressed) report is remembered across connections.
        s.connection_started();
        let mut m = hb_beat(2);
        m.capabilities |= agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS;
        assert!(handle(&mut s, &m, &with_offer(&off))
            .reply
            .connection_settings
            .is_none());
        // A changed offer goes out.
        let newer = OpampOffer {
            heartbeat_interval_secs: 15,
            ..offer()
        };
        m.sequence_num = 3;
        assert!(handle(&mut s, &m, &with_offer(&newer))
            .reply
            .connection_settings
            .is_some());
    }

    // ---- disconnect ----

    #[test]
    fn disconnect_marks_offline_stores_state_and_offers_nothing() {
        let d = desired();
        let off = offer();
        let mut s = fresh();
        let mut m = beat(0);
        m.capabilities = CAPS | HB;
        m.health = Some(healthy());
        m.agent_disconnect = Some(AgentDisconnect {});
        let c = Context {
            desired: Some(&d),
            opamp_offer: Some(&off),
            identity: None,
            ..ctx()
        };
        let o = handle(&mut s, &m, &c);
        assert!(o.events.contains(&Event::Disconnected));
        assert!(!s.record.connected);
        assert!(s.record.health.is_some());
        assert!(o.changed);
        assert_eq!(o.reply.flags, 0, "no full-state request to a leaving agent");
        assert!(o.reply.remote_config.is_none());
        assert!(o.reply.connection_settings.is_none());
        assert_eq!(o.reply.instance_uid, UID.to_vec());
        assert_eq!(o.reply.capabilities, SERVER_CAPABILITIES);
        assert!(s.offered_config.is_none());
    }

    #[test]
    fn reconnecting_flips_connected_and_is_a_change() {
        let mut s = known();
        let mut m = beat(1);
        m.agent_disconnect = Some(AgentDisconnect {});
        assert!(handle(&mut s, &m, &ctx()).changed);
        let o = handle(&mut s, &beat(2), &ctx());
        assert!(o.changed);
        assert!(s.record.connected);
    }

    #[test]
    fn transport_change_is_a_change() {
        let mut s = known();
        let c = Context {
            transport: Transport::Http,
            ..ctx()
        };
        assert!(handle(&mut s, &beat(1), &c).changed);
        assert_eq!(s.record.transport, Some(Transport::Http));
    }

    // ---- hashing and conversions ----

    #[test]
    fn config_hash_is_deterministic_and_content_sensitive() {
        assert_eq!(config_hash(&files("a")), config_hash(&files("a")));
        assert_ne!(config_hash(&files("a")), config_hash(&files("b")));
        let mut json = files("a");
        if let Some(f) = json.get_mut("collector.yaml") {
            f.content_type = "application/json".into();
        }
        assert_ne!(config_hash(&files("a")), config_hash(&json));
        let renamed = ConfigMap::from([(
            "other.yaml".to_string(),
            ConfigFile {
                body: "a".into(),
                content_type: "text/yaml".into(),
            },
        )]);
        assert_ne!(config_hash(&files("a")), config_hash(&renamed));
        // Length prefixes: moving bytes between fields changes the hash.
        let f = |n: &str, b: &str| {
            ConfigMap::from([(
                n.to_string(),
                ConfigFile {
                    body: b.into(),
                    content_type: String::new(),
                },
            )])
        };
        assert_ne!(config_hash(&f("ab", "c")), config_hash(&f("a", "bc")));
        // Empty map has a well-defined hash (SHA-256 of nothing).
        assert_eq!(
            hex::encode(config_hash(&ConfigMap::new())),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn desired_carries_raw_hash_and_files() {
        let d = desired();
        assert_eq!(d.remote.config_hash, config_hash(&files("b: 2")).to_vec());
        assert_eq!(d.hash_hex, hex::encode(&d.remote.config_hash));
        assert_eq!(d.config_id, 1);
        let back = d.remote.config.as_ref().map(config_map_from_proto);
        assert_eq!(back, Some(files("b: 2")));
    }

    #[test]
    fn config_map_body_is_lossy_utf8() {
        let m = AgentConfigMap {
            config_map: BTreeMap::from([(
                String::new(),
                AgentConfigFile {
                    body: vec![b'o', b'k', 0xFF],
                    content_type: "text/plain".into(),
                },
            )]),
        };
        let c = config_map_from_proto(&m);
        assert_eq!(c.get("").map(|f| f.body.as_str()), Some("ok\u{FFFD}"));
    }

    #[test]
    fn description_converts_every_any_value_kind() {
        use any_value::Value as V;
        let d = AgentDescription {
            identifying_attributes: vec![
                kv("s", V::StringValue("x".into())),
                kv("b", V::BoolValue(true)),
                kv("i", V::IntValue(-3)),
                kv("d", V::DoubleValue(1.5)),
                kv("nan", V::DoubleValue(f64::NAN)),
                kv(
                    "a",
                    V::ArrayValue(ArrayValue {
                        values: vec![
                            AnyValue {
                                value: Some(V::IntValue(1)),
                            },
                            AnyValue { value: None },
                        ],
                    }),
                ),
                kv(
                    "kv",
                    V::KvlistValue(KeyValueList {
                        values: vec![kv("k", V::StringValue("v".into()))],
                    }),
                ),
                kv("bytes", V::BytesValue(vec![0xde, 0xad])),
                KeyValue {
                    key: "unset".into(),
                    value: None,
                },
                KeyValue {
                    key: "empty".into(),
                    value: Some(AnyValue { value: None }),
                },
            ],
            non_identifying_attributes: vec![kv("env", V::StringValue("prod".into()))],
        };
        let got = description_from_proto(&d);
        let i = &got.identifying;
        assert_eq!(i["s"], json!("x"));
        assert_eq!(i["b"], json!(true));
        assert_eq!(i["i"], json!(-3));
        assert_eq!(i["d"], json!(1.5));
        assert_eq!(i["nan"], json!("NaN"));
        assert_eq!(i["a"], json!([1, null]));
        assert_eq!(i["kv"], json!({"k": "v"}));
        assert_eq!(i["bytes"], json!("dead"));
        assert_eq!(i["unset"], serde_json::Value::Null);
        assert_eq!(i["empty"], serde_json::Value::Null);
        assert_eq!(got.non_identifying["env"], json!("prod"));
    }

    #[test]
    fn deep_any_value_is_cut_off() {
        // Deeper than MAX_DEPTH (prost's own decode limit is 100).
        let mut v = AnyValue {
            value: Some(any_value::Value::StringValue("leaf".into())),
        };
        for _ in 0..200 {
            v = AnyValue {
                value: Some(any_value::Value::ArrayValue(ArrayValue { values: vec![v] })),
            };
        }
        let got = any_value_to_json(Some(&v), 0);
        let mut depth = 0;
        let mut cur = &got;
        while let serde_json::Value::Array(a) = cur {
            depth += 1;
            cur = &a[0];
        }
        assert_eq!(depth, MAX_DEPTH);
        assert_eq!(*cur, serde_json::Value::Null);
    }

    #[test]
    fn health_converts_recursively() {
        let h = ComponentHealth {
            healthy: false,
            start_time_unix_nano: 1,
            last_error: "e".into(),
            status: "degraded".into(),
            status_time_unix_nano: 2,
            component_health_map: BTreeMap::from([("pipeline".to_string(), healthy())]),
            attributes: vec![],
        };
        let got = health_from_proto(&h);
        assert!(!got.healthy);
        assert_eq!(got.start_time_unix_nano, 1);
        assert_eq!(got.status_time_unix_nano, 2);
        assert_eq!(got.last_error, "e");
        assert_eq!(
            got.components.get("pipeline").map(|c| c.healthy),
            Some(true)
        );
    }

    // ---- push and errors ----

    #[test]
    fn push_config_gating() {
        let d = desired();
        // Without AcceptsRemoteConfig: nothing.
        let mut s = known();
        s.record.capabilities = CAPS & !agent_caps::ACCEPTS_REMOTE_CONFIG;
        assert!(push_config(&mut s, &d, 1_000).is_none());
        // Normal: pushed once per connection.
        let mut s = known();
        let p = push_config(&mut s, &d, 1_000);
        assert_eq!(
            p.as_ref().map(|p| p.instance_uid.clone()),
            Some(UID.to_vec())
        );
        assert_eq!(
            p.as_ref().map(|p| p.capabilities),
            Some(SERVER_CAPABILITIES)
        );
        assert_eq!(
            p.and_then(|p| p.remote_config).map(|r| r.config_hash),
            Some(d.remote.config_hash.clone())
        );
        assert!(push_config(&mut s, &d, 1_000).is_none());
        // ...and the next reply does not repeat it.
        assert!(handle(&mut s, &beat(1), &with_desired(&d))
            .reply
            .remote_config
            .is_none());
        s.connection_started();
        assert!(push_config(&mut s, &d, 1_000).is_some());
        // Agent already reports the hash: nothing.
        let mut s = known();
        s.record.remote_config = Some(RemoteConfigReport {
            hash: d.hash_hex.clone(),
            status: RemoteStatus::Applied,
            error_message: String::new(),
        });
        assert!(push_config(&mut s, &d, 1_000).is_none());
    }

    #[test]
    fn error_reply_has_only_uid_and_error() {
        let e = error_reply(&UID, ServerErrorResponseType::BadRequest, "nope");
        let want = ServerToAgent {
            instance_uid: UID.to_vec(),
            error_response: Some(ServerErrorResponse {
                r#type: ServerErrorResponseType::BadRequest as i32,
                error_message: "nope".into(),
                details: None,
            }),
            ..Default::default()
        };
        assert_eq!(e, want);
        assert_eq!(e.capabilities, 0);
    }

    #[test]
    fn empty_and_odd_messages_do_not_panic() {
        let d = desired();
        let off = offer();
        let c = Context {
            desired: Some(&d),
            opamp_offer: Some(&off),
            identity: None,
            assign_uid: Some(InstanceUid([1; 16])),
            ..ctx()
        };
        let mut s = fresh();
        let o = handle(&mut s, &AgentToServer::default(), &c);
        assert!(full_flag(&o));
        let weird = AgentToServer {
            instance_uid: vec![0; 100],
            sequence_num: u64::MAX,
            capabilities: u64::MAX,
            flags: u64::MAX,
            effective_config: Some(EffectiveConfig { config_map: None }),
            remote_config_status: Some(status(&[0; 100], 99, "")),
            health: Some(ComponentHealth::default()),
            ..Default::default()
        };
        let o = handle(&mut s, &weird, &c);
        assert_eq!(s.record.capabilities, agent_caps::ALL);
        assert_eq!(s.record.effective_config, Some(ConfigMap::new()));
        assert_eq!(
            s.record.remote_config.as_ref().map(|r| r.status),
            Some(RemoteStatus::Unset)
        );
        assert!(o.reply.remote_config.is_some());
        assert!(o.reply.connection_settings.is_some());
    }
}
