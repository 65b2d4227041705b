//! The agent's protocol state machine, without I/O.
//!
//! [`AgentCore`] turns `ServerToAgent` messages into the `AgentToServer` messages to send.
//! Keeping it free of sockets and timers lets the protocol rules (sequence numbers, full-state
//! resends, remote config status flow, uid adoption) be tested directly, and lets the WS and
//! HTTP loops share them.
//!
//! Its pieces, which know nothing of [`AgentCore`]: [`effective`] (how the effective config's
//! files are laid out in the one copy of its text) and [`offer`] (checking a
//! connection-settings offer's endpoint and client certificate). [`packages`] adds the
//! package offers to the core.

mod commands;
mod components;
mod custom;
mod effective;
mod offer;
mod packages;
mod telemetry;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_packages;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::v1::{
    any_value, server_error_response, AgentConfigMap, AgentDescription, AgentDisconnect,
    AgentRemoteConfig, AnyValue, ComponentHealth, ConnectionSettingsStatus,
    ConnectionSettingsStatuses, EffectiveConfig, KeyValue, OpAmpConnectionSettings,
    RemoteConfigStatus, RemoteConfigStatuses, ServerErrorResponseType,
};
use proto::{agent_caps, agent_flags, server_flags, AgentToServer, ServerToAgent};
use tokio::sync::watch;

use self::effective::ConfigLayout;
use self::offer::Identity;
pub use self::packages::PackageDownload;
use self::packages::Packages;
use crate::options::{AgentOptions, AgentStatus};
use crate::tls::ClientTls;
use crate::url::{Endpoint, Scheme};

/// Error message reported with FAILED when [`AgentOptions::fail_configs`] is set.
pub const REJECTED: &str = "rejected by test agent";

/// Error message reported with FAILED for a config [`AgentOptions::fail_configs_containing`]
/// names.
pub const DISLIKED: &str = "config refused: it contains what this agent cannot load";

/// `last_error` of the health an agent reports after applying a config
/// [`AgentOptions::unhealthy_configs_containing`] names.
pub const SICKENED: &str = "exporter cannot reach its endpoint";

/// What the I/O loop must do after a server message.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Messages to send, in order.
    pub send: Vec<AgentToServer>,
    /// The server is unavailable (`error_response` Unavailable): disconnect and retry later.
    pub reconnect: bool,
    /// Delay the server asked for with `retry_info`, if any.
    pub retry_after: Option<Duration>,
    /// New connection settings were accepted (a client certificate): send `send`, close the
    /// connection and reconnect at once with [`AgentCore::connection`] (facts §5.1 step 4).
    pub switch: bool,
    /// [`AgentOptions::restart_on_settings_offer`]: a settings offer was taken; tear the
    /// client down (close the connection, drop what is queued), call
    /// [`AgentCore::client_restarted`] and start again at once with
    /// [`AgentCore::connection`].
    pub restart: bool,
    /// Package files to fetch; each result goes to [`AgentCore::package_downloaded`].
    pub downloads: Vec<PackageDownload>,
    /// A new top-level package was installed: send `send`, say goodbye and reconnect at once
    /// (the next connection opens with the full state, new `service.version` included), as
    /// the restarted Collector would.
    pub upgraded: bool,
    /// A Restart command with [`AgentOptions::restart_never_returns`]: say goodbye and stop.
    pub halt: bool,
}

/// How to open the next connection: [`AgentCore::connection`].
#[derive(Debug, Clone)]
pub struct Connection {
    /// `None`: the configured endpoint.
    pub endpoint: Option<Endpoint>,
    pub tls: Option<ClientTls>,
    /// `Authorization: Bearer <token>` until the agent is on a client certificate.
    pub headers: Vec<(String, String)>,
}

/// Sans-I/O OpAMP agent. The observable state lives in the [`AgentStatus`] watch channel,
/// which is also the single copy of the effective config.
#[derive(Debug)]
pub struct AgentCore {
    opts: AgentOptions,
    uid: [u8; 16],
    /// RequestInstanceUid is set on every message until the server assigns a uid.
    uid_pending: bool,
    next_seq: u64,
    heartbeat: Duration,
    remote_status: Option<RemoteConfigStatus>,
    /// The effective config's files; their bodies are the status's `effective_config`.
    layout: ConfigLayout,
    start_time_ns: u64,
    /// Why the agent reports itself unhealthy, if it does.
    sick: Option<&'static str>,
    /// A connection was opened before (see [`AgentOptions::compact_reconnect`]).
    reconnecting: bool,
    /// The client certificate in use (committed after a connection with it succeeded).
    identity: Option<Box<Identity>>,
    /// A client certificate offered and being tried on the next connection.
    candidate: Option<Box<Identity>>,
    /// Hash of the last connection-settings offer acted on (a repeat is skipped, like
    /// opamp-go does).
    settings_seen: Option<Vec<u8>>,
    /// What `connection_settings_status` says (agents with ReportsConnectionSettingsStatus).
    settings_status: Option<Box<ConnectionSettingsStatus>>,
    /// An offered endpoint taken without a certificate
    /// ([`AgentOptions::restart_on_settings_offer`]): used with the configured credentials.
    endpoint_override: Option<Endpoint>,
    /// `settings_status` changed and goes out with the next message.
    settings_status_pending: bool,
    /// Offered packages (agents with AcceptsPackages), from the first offer on.
    packages: Option<Box<Packages>>,
    status: watch::Sender<AgentStatus>,
}

impl AgentCore {
    /// Builds the core and the status channel it publishes to. `opts.initial_config` is moved
    /// into the status, not copied.
    pub fn new(mut opts: AgentOptions) -> (Self, watch::Receiver<AgentStatus>) {
        if opts.accept_identity || opts.restart_on_settings_offer {
            opts.capabilities |= agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS;
        }
        if opts.accept_packages {
            opts.capabilities |=
                agent_caps::ACCEPTS_PACKAGES | agent_caps::REPORTS_PACKAGE_STATUSES;
        }
        let heartbeat = if opts.heartbeat.is_zero() {
            AgentOptions::DEFAULT_HEARTBEAT
        } else {
            opts.heartbeat
        };
        let initial = std::mem::take(&mut opts.initial_config);
        let layout = ConfigLayout::initial(initial.len());
        let (uid, uid_pending) = match opts.instance_uid {
            Some(uid) => (uid, false),
            // Temporary uid: the server replaces it via new_instance_uid.
            None => (*uuid::Uuid::new_v4().as_bytes(), true),
        };
        let (status, rx) = watch::channel(AgentStatus {
            instance_uid: opts.instance_uid,
            effective_config: initial,
            heartbeat_secs: heartbeat.as_secs(),
            ..AgentStatus::default()
        });
        let core = Self {
            opts,
            uid,
            uid_pending,
            next_seq: 0,
            heartbeat,
            remote_status: None,
            layout,
            start_time_ns: now_ns(),
            sick: None,
            reconnecting: false,
            identity: None,
            candidate: None,
            settings_seen: None,
            settings_status: None,
            endpoint_override: None,
            settings_status_pending: false,
            packages: None,
            status,
        };
        (core, rx)
    }

    pub fn options(&self) -> &AgentOptions {
        &self.opts
    }

    /// The uid currently sent (temporary until the server assigns one).
    pub fn instance_uid(&self) -> [u8; 16] {
        self.uid
    }

    /// Current WS heartbeat / HTTP poll interval (may have been set by the server).
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat
    }

    /// Whether WS heartbeats are due at all (only agents with ReportsHeartbeat send them).
    pub fn heartbeats_enabled(&self) -> bool {
        self.opts.capabilities & agent_caps::REPORTS_HEARTBEAT != 0
    }

    pub fn subscribe(&self) -> watch::Receiver<AgentStatus> {
        self.status.subscribe()
    }

    pub fn set_connected(&self, connected: bool) {
        self.status.send_if_modified(|s| {
            let changed = s.connected != connected;
            s.connected = connected;
            changed
        });
    }

    pub fn set_error(&self, error: String) {
        self.status.send_modify(|s| s.last_error = Some(error));
    }

    /// The header every message carries: uid, next sequence number, capabilities, flags;
    /// plus a connection-settings status not reported yet.
    fn base(&mut self) -> AgentToServer {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut msg = AgentToServer {
            instance_uid: self.uid.to_vec(),
            sequence_num: seq,
            capabilities: self.opts.capabilities,
            flags: if self.uid_pending {
                agent_flags::REQUEST_INSTANCE_UID
            } else {
                0
            },
            ..AgentToServer::default()
        };
        if self.settings_status_pending && self.reports_settings_status() {
            msg.connection_settings_status = self.settings_status.as_deref().cloned();
        }
        self.settings_status_pending = false;
        msg
    }

    /// Agents that restart on every offer never report it (like opamp-go's older releases,
    /// whose application is not told the offer's hash).
    fn reports_settings_status(&self) -> bool {
        self.opts.capabilities & agent_caps::REPORTS_CONNECTION_SETTINGS_STATUS != 0
            && !self.opts.restart_on_settings_offer
    }

    /// How to open the next connection: with the certificate being tried, else the one in
    /// use (no `Authorization` header then), else as configured.
    pub fn connection(&self) -> Connection {
        match self.candidate.as_ref().or(self.identity.as_ref()) {
            Some(id) => Connection {
                endpoint: id
                    .endpoint
                    .clone()
                    .or_else(|| self.endpoint_override.clone()),
                tls: Some(id.tls.clone()),
                headers: Vec::new(),
            },
            None => Connection {
                endpoint: self.endpoint_override.clone(),
                tls: self.opts.tls.clone(),
                headers: self
                    .opts
                    .token
                    .iter()
                    .map(|t| ("Authorization".to_string(), format!("Bearer {t}")))
                    .collect(),
            },
        }
    }

    /// A connection made with [`AgentCore::connection`] was accepted by the server (WebSocket
    /// upgraded, HTTP answered 200): a certificate being tried becomes the one in use and is
    /// reported APPLIED (facts §5.1 steps 6–8).
    pub fn connection_succeeded(&mut self) {
        let Some(id) = self.candidate.take() else {
            return;
        };
        self.set_settings_status(&id.hash, ConnectionSettingsStatuses::Applied, String::new());
        let serial = id.serial.clone();
        self.identity = Some(id);
        self.status
            .send_modify(|s| s.client_cert_serial = Some(serial));
    }

    /// A connection made with [`AgentCore::connection`] failed. With a certificate being
    /// tried, goes back to the previous settings and reports FAILED (facts §5.1 step 9); true
    /// when it did (the caller retries at once).
    ///
    /// An agent that restarts on every offer keeps trying the offered settings (as the
    /// supervisor does once its new client started): never reverts, false.
    pub fn connection_failed(&mut self, error: &str) -> bool {
        if self.opts.restart_on_settings_offer {
            return false;
        }
        let Some(id) = self.candidate.take() else {
            return false;
        };
        self.set_settings_status(
            &id.hash,
            ConnectionSettingsStatuses::Failed,
            format!("connecting with the offered client certificate failed: {error}"),
        );
        true
    }

    /// The transport the agent uses next: the scheme of [`AgentCore::connection`]'s
    /// endpoint, else of `configured`.
    pub fn next_scheme(&self, configured: &Endpoint) -> Scheme {
        self.candidate
            .as_ref()
            .or(self.identity.as_ref())
            .and_then(|id| id.endpoint.as_ref())
            .or(self.endpoint_override.as_ref())
            .unwrap_or(configured)
            .scheme
    }

    /// Counts connection attempts (WebSocket handshakes, HTTP connections opened) and the
    /// ones that were established (upgraded; connected), over `scheme`.
    pub fn count_connections(&self, attempted: u64, established: u64, scheme: Scheme) {
        if attempted == 0 && established == 0 {
            return;
        }
        self.status.send_modify(|s| {
            s.connections_attempted += attempted;
            s.connections_established += established;
            if established > 0 {
                s.transport = Some(scheme);
            }
        });
    }

    /// The server refused the connection before any OpAMP exchange: a status other than 101
    /// to the upgrade, or other than 200 to an HTTP request.
    pub fn count_upgrade_refusal(&self) {
        self.status.send_modify(|s| s.upgrade_refusals += 1);
    }

    /// The server closed the WebSocket: `"<code> <reason>"`.
    pub fn set_close_reason(&self, reason: String) {
        self.status
            .send_modify(|s| s.last_close_reason = Some(reason));
    }

    /// The client was torn down and started again in the same process
    /// ([`Outcome::restart`]): a new client numbers its messages from 0, opens with its full
    /// state and remembers no offer's hash. The offered settings stay.
    pub fn client_restarted(&mut self) {
        self.new_client();
        self.status.send_modify(|s| s.client_restarts += 1);
    }

    /// What a new client starts without: message numbers, an offer's hash, a status to report.
    fn new_client(&mut self) {
        self.next_seq = 0;
        self.reconnecting = false;
        self.settings_seen = None;
        self.settings_status = None;
        self.settings_status_pending = false;
        self.set_connected(false);
    }

    /// The agent's process restarted: what a new process has is its options, its instance
    /// UID and its config (which agents persist); an offered certificate too unless
    /// `forget_identity` (kept only in memory: the agent is back on its bootstrap token),
    /// nothing of offers being tried and no offer's hash. The status channel carries on.
    pub fn process_restarted(mut self, forget_identity: bool) -> Self {
        self.new_client();
        self.candidate = None;
        self.packages_after_restart();
        self.start_time_ns = now_ns();
        self.heartbeat = if self.opts.heartbeat.is_zero() {
            AgentOptions::DEFAULT_HEARTBEAT
        } else {
            self.opts.heartbeat
        };
        if forget_identity {
            self.identity = None;
            self.endpoint_override = None;
        }
        let (heartbeat, forgot) = (self.heartbeat.as_secs(), self.identity.is_none());
        self.status.send_modify(|s| {
            s.process_restarts += 1;
            s.heartbeat_secs = heartbeat;
            if forgot {
                s.client_cert_serial = None;
            }
        });
        self
    }

    fn set_settings_status(
        &mut self,
        hash: &[u8],
        status: ConnectionSettingsStatuses,
        error_message: String,
    ) {
        self.settings_status = Some(Box::new(ConnectionSettingsStatus {
            last_connection_settings_hash: hash.to_vec(),
            status: status as i32,
            error_message,
        }));
        self.settings_status_pending = true;
    }

    /// The first message of a connection: the full state, except on reconnects of an agent
    /// with [`AgentOptions::compact_reconnect`], which sends only the header and relies on
    /// the server to ask for the rest if it needs it.
    pub fn connect_message(&mut self) -> AgentToServer {
        let compact = self.reconnecting && self.opts.compact_reconnect;
        self.reconnecting = true;
        if compact {
            self.base()
        } else {
            self.full_state()
        }
    }

    /// A complete status report: sent first on every connection and whenever the server asks
    /// for it (ReportFullState), because the server may have no or stale state for us.
    pub fn full_state(&mut self) -> AgentToServer {
        let mut msg = self.base();
        let caps = self.opts.capabilities;
        msg.agent_description = Some(AgentDescription {
            identifying_attributes: key_values(&self.opts.description),
            non_identifying_attributes: key_values(&self.opts.non_identifying),
        });
        if caps & agent_caps::REPORTS_HEALTH != 0 {
            msg.health = Some(self.health());
        }
        if caps & agent_caps::REPORTS_EFFECTIVE_CONFIG != 0 {
            msg.effective_config = Some(self.effective_config());
        }
        if caps & agent_caps::REPORTS_REMOTE_CONFIG != 0 {
            // Before any remote config the status is UNSET: saying so makes the report
            // complete, so the server need not ask for full state again.
            msg.remote_config_status = Some(self.remote_status.clone().unwrap_or_default());
        }
        if self.reports_settings_status() {
            msg.connection_settings_status = self.settings_status.as_deref().cloned();
        }
        if caps & agent_caps::REPORTS_PACKAGE_STATUSES != 0 {
            msg.package_statuses = self.package_statuses();
        }
        msg.available_components = self.components_hash_only();
        msg.custom_capabilities = self.custom_capabilities();
        msg
    }

    /// A heartbeat (WS) or poll (HTTP): just the header, nothing changed.
    pub fn heartbeat_message(&mut self) -> AgentToServer {
        self.base()
    }

    /// The last message before closing: tells the server we leave on purpose.
    pub fn disconnect_message(&mut self) -> AgentToServer {
        let mut msg = self.base();
        msg.agent_disconnect = Some(AgentDisconnect {});
        msg
    }

    /// Processes one server message and returns what to send back.
    pub fn on_message(&mut self, msg: ServerToAgent) -> Outcome {
        let mut out = Outcome::default();
        self.status.send_modify(|s| {
            s.replies += 1;
            if msg.capabilities != 0 {
                s.server_capabilities = msg.capabilities;
            }
        });

        if let Some(err) = msg.error_response {
            // The proto says nothing else is set alongside an error.
            let kind = ServerErrorResponseType::try_from(err.r#type)
                .map(|k| k.as_str_name())
                .unwrap_or("unknown");
            self.set_error(format!("server error {kind}: {}", err.error_message));
            if err.r#type == ServerErrorResponseType::Unavailable as i32 {
                out.reconnect = true;
                out.retry_after = err.details.map(|d| match d {
                    server_error_response::Details::RetryInfo(r) => {
                        Duration::from_nanos(r.retry_after_nanoseconds)
                    }
                });
            }
            return out;
        }

        let mut full = false;
        if let Some(ident) = msg.agent_identification {
            match <[u8; 16]>::try_from(ident.new_instance_uid.as_slice()) {
                Ok(uid) => {
                    self.uid = uid;
                    self.uid_pending = false;
                    self.status.send_modify(|s| s.instance_uid = Some(uid));
                    // Introduce ourselves under the new uid right away instead of waiting for
                    // the next heartbeat, so the server sees the agent live on this stream.
                    full = true;
                }
                Err(_) => self.set_error(format!(
                    "ignored new_instance_uid of {} bytes",
                    ident.new_instance_uid.len()
                )),
            }
        }
        if msg.flags & server_flags::REPORT_FULL_STATE != 0 {
            self.status.send_modify(|s| s.full_state_requests += 1);
            full = true;
        }
        // Like opamp-go: the interval applies to agents that heartbeat; 0 is ignored (it would
        // disable WS heartbeats and is invalid as an HTTP poll interval).
        let accepts_opamp =
            self.opts.capabilities & agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS != 0;
        if let Some(cs) = &msg.connection_settings {
            let opamp_handled = cs.opamp.is_some() && accepts_opamp;
            self.on_telemetry_settings(cs, opamp_handled, &mut out);
        }
        let (hash, opamp) = msg
            .connection_settings
            .map(|c| (c.hash, c.opamp))
            .unwrap_or_default();
        if let Some(op) = &opamp {
            self.count_offer(op);
        }
        let interval = opamp
            .as_ref()
            .map(|o| o.heartbeat_interval_seconds)
            .unwrap_or(0);
        if interval > 0 && self.heartbeats_enabled() {
            self.heartbeat = Duration::from_secs(interval);
            self.status.send_modify(|s| s.heartbeat_secs = interval);
        }
        if full {
            out.send.push(self.full_state());
        }
        if msg.flags & server_flags::REPORT_AVAILABLE_COMPONENTS != 0 {
            if let Some(ac) = self.components_full() {
                let mut m = self.base();
                m.available_components = Some(ac);
                out.send.push(m);
            }
        }
        if let Some(opamp) = opamp {
            if self.opts.capabilities & agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS != 0 {
                self.on_opamp_settings(hash, opamp, &mut out);
            }
        }
        if let Some(rc) = msg.remote_config {
            if self.opts.capabilities & agent_caps::ACCEPTS_REMOTE_CONFIG != 0 {
                self.apply_remote_config(rc, &mut out.send);
            }
        }
        if let Some(offer) = msg.packages_available {
            if self.opts.capabilities & agent_caps::ACCEPTS_PACKAGES != 0 {
                self.on_packages(offer, &mut out);
            }
        }
        if let Some(cmd) = msg.command {
            self.on_command(cmd, &mut out);
        }
        if let Some(m) = msg.custom_message {
            self.on_custom_message(m, &mut out);
        }
        if let Some(cc) = msg.custom_capabilities {
            self.status
                .send_modify(|s| s.server_custom_capabilities = cc.capabilities);
        }
        out
    }

    /// An `opamp` connection-settings offer (facts §5.1): a client certificate (with its key,
    /// this agent sends no CSR) is tried on a new connection: APPLYING now, APPLIED or FAILED
    /// once that connection is made. A repeat of the certificate in use changes nothing.
    /// Offers without a hash are skipped, as opamp-go does; so are offers already acted on.
    fn on_opamp_settings(&mut self, hash: Vec<u8>, op: OpAmpConnectionSettings, out: &mut Outcome) {
        if self.opts.restart_on_settings_offer {
            self.restart_with(&hash, op, out);
            return;
        }
        if hash.is_empty() || self.settings_seen.as_ref() == Some(&hash) {
            return;
        }
        self.settings_seen = Some(hash.clone());
        let Some(cert) = op.certificate else {
            // Nothing this agent applies (the interval is taken above). A missing certificate
            // would mean "stop using one"; an agent on its certificate keeps it, as the
            // bootstrap token no longer admits it.
            self.report_settings(
                &hash,
                ConnectionSettingsStatuses::Applied,
                String::new(),
                out,
            );
            return;
        };
        if let Some(id) = self.identity.as_mut().filter(|id| id.cert == cert.cert) {
            // The certificate in use, repeated (facts §5.1: every offer must repeat it).
            id.hash = hash.clone();
            self.report_settings(
                &hash,
                ConnectionSettingsStatuses::Applied,
                String::new(),
                out,
            );
            return;
        }
        match self.candidate_from(&hash, &op.destination_endpoint, &cert) {
            Ok(id) => {
                self.candidate = Some(Box::new(id));
                self.report_settings(
                    &hash,
                    ConnectionSettingsStatuses::Applying,
                    String::new(),
                    out,
                );
                out.switch = true;
            }
            Err(e) => {
                self.set_error(format!("connection settings refused: {e}"));
                self.report_settings(&hash, ConnectionSettingsStatuses::Failed, e, out);
            }
        }
    }

    /// Counts an `opamp` offer in the status, whatever is done with it.
    fn count_offer(&self, op: &OpAmpConnectionSettings) {
        let with_key = op
            .certificate
            .as_ref()
            .is_some_and(|c| !c.private_key.is_empty());
        let endpoint = &op.destination_endpoint;
        self.status.send_modify(|s| {
            s.settings_offers += 1;
            s.settings_offers_with_key += u64::from(with_key);
            if !endpoint.is_empty() && !s.offered_endpoints.contains(endpoint) {
                s.offered_endpoints.push(endpoint.clone());
            }
        });
    }

    /// [`AgentOptions::restart_on_settings_offer`]: every offer (hash or not, the same as
    /// before or not) is taken and the client restarted with it, as the Collector's
    /// supervisor and opamp-go's example agent do. A certificate (with its key) replaces the
    /// token; an offer without one keeps the credentials and takes the offered endpoint when
    /// the agent can use it. Settings the agent cannot use (a certificate without its key,
    /// say) still restart it: the supervisor stops its client first and, when the new one
    /// does not start, starts it again with the previous settings.
    fn restart_with(&mut self, hash: &[u8], op: OpAmpConnectionSettings, out: &mut Outcome) {
        match op.certificate.filter(|c| !c.cert.is_empty()) {
            Some(cert) => match self.candidate_from(hash, &op.destination_endpoint, &cert) {
                Ok(id) => self.candidate = Some(Box::new(id)),
                Err(e) => self.set_error(format!("connection settings refused: {e}")),
            },
            None => {
                if let Some(ep) = self.usable_endpoint(&op.destination_endpoint, false) {
                    self.endpoint_override = Some(ep);
                }
            }
        }
        out.restart = true;
    }

    /// The endpoint the agent uses now: of its certificate, else offered before, else
    /// configured.
    fn current_endpoint(&self) -> Option<Endpoint> {
        self.identity
            .as_ref()
            .and_then(|i| i.endpoint.clone())
            .or_else(|| self.endpoint_override.clone())
            .or_else(|| Endpoint::parse(&self.opts.endpoint).ok())
    }

    /// `destination` when this agent can use it ([`offer::usable_endpoint`] from the endpoint
    /// it uses now).
    fn usable_endpoint(&self, destination: &str, needs_tls: bool) -> Option<Endpoint> {
        let current = self.current_endpoint();
        offer::usable_endpoint(&self.opts, current.as_ref(), destination, needs_tls)
    }

    /// Records the status and, for agents that report it, sends it now.
    fn report_settings(
        &mut self,
        hash: &[u8],
        status: ConnectionSettingsStatuses,
        error: String,
        out: &mut Outcome,
    ) {
        self.set_settings_status(hash, status, error);
        if self.reports_settings_status() {
            let msg = self.base();
            out.send.push(msg);
        } else {
            self.settings_status_pending = false;
        }
    }

    /// Checks an offered certificate and builds the settings to try it with
    /// ([`offer::identity_from`]): staying, when the offered endpoint is not usable, on the
    /// endpoint of the certificate in use, else one offered before.
    fn candidate_from(
        &self,
        hash: &[u8],
        destination: &str,
        cert: &proto::v1::TlsCertificate,
    ) -> Result<Identity, String> {
        let kept = self
            .identity
            .as_ref()
            .and_then(|i| i.endpoint.clone())
            .or_else(|| self.endpoint_override.clone());
        offer::identity_from(
            &self.opts,
            self.current_endpoint(),
            kept,
            hash,
            destination,
            cert,
        )
    }

    fn health(&self) -> ComponentHealth {
        ComponentHealth {
            healthy: self.sick.is_none(),
            start_time_unix_nano: self.start_time_ns,
            status: if self.sick.is_some() {
                "degraded"
            } else {
                "running"
            }
            .into(),
            last_error: self.sick.unwrap_or_default().into(),
            status_time_unix_nano: self.start_time_ns,
            ..ComponentHealth::default()
        }
    }

    /// APPLYING, then APPLIED with the new effective config (or FAILED when configured to).
    fn apply_remote_config(&mut self, rc: AgentRemoteConfig, send: &mut Vec<AgentToServer>) {
        let reports = self.opts.capabilities & agent_caps::REPORTS_REMOTE_CONFIG != 0;
        let done = |s: &RemoteConfigStatus| {
            s.status == RemoteConfigStatuses::Applied as i32
                || s.status == RemoteConfigStatuses::Failed as i32
        };
        let repeated = self
            .remote_status
            .as_ref()
            .is_some_and(|st| st.last_remote_config_hash == rc.config_hash && done(st));
        if repeated {
            // Same offer again (e.g. the server missed our report): repeat the outcome,
            // don't re-apply.
            if reports {
                let mut msg = self.base();
                msg.remote_config_status = self.remote_status.clone();
                send.push(msg);
            }
            return;
        }
        let hash = rc.config_hash;
        if reports {
            let mut msg = self.base();
            msg.remote_config_status = Some(RemoteConfigStatus {
                last_remote_config_hash: hash.clone(),
                status: RemoteConfigStatuses::Applying as i32,
                error_message: String::new(),
            });
            send.push(msg);
        }

        let contains = |marker: &Option<String>| {
            marker.as_deref().is_some_and(|m| {
                rc.config.as_ref().is_some_and(|c| {
                    c.config_map
                        .values()
                        .any(|f| String::from_utf8_lossy(&f.body).contains(m))
                })
            })
        };
        let refusal = if self.opts.fail_configs {
            Some(REJECTED)
        } else if contains(&self.opts.fail_configs_containing) {
            Some(DISLIKED)
        } else {
            None
        };
        let was_sick = self.sick;
        let status = if let Some(why) = refusal {
            self.status
                .send_modify(|s| s.last_remote_config_hash = Some(hash.clone()));
            RemoteConfigStatus {
                last_remote_config_hash: hash,
                status: RemoteConfigStatuses::Failed as i32,
                error_message: why.into(),
            }
        } else {
            self.sick = contains(&self.opts.unhealthy_configs_containing).then_some(SICKENED);
            self.set_effective(rc.config.unwrap_or_default());
            self.status.send_modify(|s| {
                s.last_remote_config_hash = Some(hash.clone());
                s.applied_configs += 1;
            });
            RemoteConfigStatus {
                last_remote_config_hash: hash,
                status: RemoteConfigStatuses::Applied as i32,
                error_message: String::new(),
            }
        };
        let applied = status.status == RemoteConfigStatuses::Applied as i32;
        self.remote_status = Some(status);
        let mut msg = self.base();
        if reports {
            msg.remote_config_status = self.remote_status.clone();
        }
        if applied && self.opts.capabilities & agent_caps::REPORTS_EFFECTIVE_CONFIG != 0 {
            msg.effective_config = Some(self.effective_config());
        }
        if self.sick != was_sick && self.opts.capabilities & agent_caps::REPORTS_HEALTH != 0 {
            msg.health = Some(self.health());
        }
        if msg.remote_config_status.is_some()
            || msg.effective_config.is_some()
            || msg.health.is_some()
        {
            send.push(msg);
        }
    }

    /// Adopts `map` as the effective config; its bodies move into the status string.
    fn set_effective(&mut self, map: AgentConfigMap) {
        let text = self.layout.adopt(map);
        self.status.send_modify(|s| s.effective_config = text);
    }

    /// Rebuilds the config map from the status string and the file layout.
    fn effective_config(&self) -> EffectiveConfig {
        self.layout.config(&self.status.borrow().effective_config)
    }
}

fn key_values(pairs: &[(String, String)]) -> Vec<KeyValue> {
    pairs
        .iter()
        .map(|(k, v)| KeyValue {
            key: k.clone(),
            value: Some(AnyValue {
                value: Some(any_value::Value::StringValue(v.clone())),
            }),
        })
        .collect()
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
