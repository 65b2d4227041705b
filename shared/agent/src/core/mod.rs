//! The agent's protocol state machine, without I/O.
//!
//! [`AgentCore`] turns `ServerToAgent` messages into the `AgentToServer` messages to send.
//! Keeping it free of sockets and timers lets the protocol rules (sequence numbers, full-state
//! resends, remote config status flow, uid adoption) be tested directly, and lets the WS and
//! HTTP loops share them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::v1::{
    any_value, server_error_response, AgentConfigFile, AgentConfigMap, AgentDescription,
    AgentDisconnect, AgentRemoteConfig, AnyValue, ComponentHealth, ConnectionSettingsStatus,
    ConnectionSettingsStatuses, EffectiveConfig, KeyValue, OpAmpConnectionSettings,
    RemoteConfigStatus, RemoteConfigStatuses, ServerErrorResponseType,
};
use proto::{agent_caps, agent_flags, server_flags, AgentToServer, ServerToAgent};
use tokio::sync::watch;

use crate::options::{AgentOptions, AgentStatus};
use crate::tls::ClientTls;
use crate::url::{Endpoint, Scheme};

/// Content type of the initial (local) effective config.
const INITIAL_CONTENT_TYPE: &str = "text/yaml";

/// Error message reported with FAILED when [`AgentOptions::fail_configs`] is set.
pub const REJECTED: &str = "rejected by test agent";

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
}

/// A client certificate taken from a `connection_settings.opamp` offer (facts §5.1).
#[derive(Debug, Clone)]
struct Identity {
    /// The offer's hash.
    hash: Vec<u8>,
    /// The certificate as offered (PEM), to recognise a repeat of it.
    cert: Vec<u8>,
    serial: String,
    /// The trust to use, presenting the certificate.
    tls: ClientTls,
    /// The offered endpoint, when it is one this agent can use with a certificate.
    endpoint: Option<Endpoint>,
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

/// One file of the effective config. The bodies live concatenated in
/// [`AgentStatus::effective_config`] (the only copy); this records how to split them again.
#[derive(Debug, Clone)]
struct FileLayout {
    name: String,
    content_type: String,
    len: usize,
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
    layout: Vec<FileLayout>,
    start_time_ns: u64,
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
    status: watch::Sender<AgentStatus>,
}

impl AgentCore {
    /// Builds the core and the status channel it publishes to. `opts.initial_config` is moved
    /// into the status, not copied.
    pub fn new(mut opts: AgentOptions) -> (Self, watch::Receiver<AgentStatus>) {
        if opts.accept_identity || opts.restart_on_settings_offer {
            opts.capabilities |= agent_caps::ACCEPTS_OPAMP_CONNECTION_SETTINGS;
        }
        let heartbeat = if opts.heartbeat.is_zero() {
            AgentOptions::DEFAULT_HEARTBEAT
        } else {
            opts.heartbeat
        };
        let initial = std::mem::take(&mut opts.initial_config);
        let layout = vec![FileLayout {
            name: String::new(),
            content_type: INITIAL_CONTENT_TYPE.into(),
            len: initial.len(),
        }];
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
            reconnecting: false,
            identity: None,
            candidate: None,
            settings_seen: None,
            settings_status: None,
            endpoint_override: None,
            settings_status_pending: false,
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
            msg.health = Some(ComponentHealth {
                healthy: true,
                start_time_unix_nano: self.start_time_ns,
                status: "running".into(),
                status_time_unix_nano: self.start_time_ns,
                ..ComponentHealth::default()
            });
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

    /// `destination` when this agent can use it: the transport it uses now (or either, with
    /// [`AgentOptions::transport_from_offer_scheme`]); TLS when `needs_tls` (a client
    /// certificate), and never TLS without something to trust.
    fn usable_endpoint(&self, destination: &str, needs_tls: bool) -> Option<Endpoint> {
        let current = self.current_endpoint();
        Endpoint::parse(destination).ok().filter(|e| {
            let transport = self.opts.transport_from_offer_scheme
                || Some(e.scheme) == current.as_ref().map(|c| c.scheme);
            let tls_ok = if e.tls {
                needs_tls || self.opts.tls.is_some()
            } else {
                !needs_tls
            };
            transport && tls_ok
        })
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

    /// Checks an offered certificate and builds the settings to try it with.
    fn candidate_from(
        &self,
        hash: &[u8],
        destination: &str,
        cert: &proto::v1::TlsCertificate,
    ) -> Result<Identity, String> {
        let cert_pem = std::str::from_utf8(&cert.cert)
            .map_err(|_| "the offered certificate is not PEM text".to_string())?;
        if cert.private_key.is_empty() {
            return Err(
                "the offered certificate comes without a private key and this agent sent no CSR"
                    .into(),
            );
        }
        let key_pem = std::str::from_utf8(&cert.private_key)
            .map_err(|_| "the offered private key is not PEM text".to_string())?;
        let serial = shared::tls::parse_certs_pem(cert_pem.as_bytes())
            .ok()
            .and_then(|c| c.into_iter().next())
            .and_then(|der| {
                x509_parser::parse_x509_certificate(&der)
                    .ok()
                    .map(|(_, c)| shared::tls::serial_hex(c.raw_serial()))
            })
            .ok_or_else(|| "the offered certificate does not parse".to_string())?;
        // The endpoint: the offered one when this agent can use it with a certificate (same
        // transport, TLS), else the one it uses now, which must be TLS.
        let current = self.current_endpoint();
        let offered = self.usable_endpoint(destination, true);
        let endpoint = offered.clone().or(current);
        if !endpoint.as_ref().is_some_and(|e| e.tls) {
            return Err("a client certificate needs a wss:// or https:// endpoint".into());
        }
        // Trust: what the agent was configured with, else the offered CA.
        let tls = match &self.opts.tls {
            Some(t) => t.with_identity(cert_pem, key_pem),
            None if !cert.ca_cert.is_empty() => {
                let ca = std::str::from_utf8(&cert.ca_cert)
                    .map_err(|_| "the offered CA is not PEM text".to_string())?;
                ClientTls::from_ca_pem_with_identity(ca, cert_pem, key_pem)
            }
            None => return Err("no CA to verify the server with".into()),
        }
        .map_err(|e| e.to_string())?;
        Ok(Identity {
            hash: hash.to_vec(),
            cert: cert.cert.clone(),
            serial,
            tls,
            endpoint: offered.or_else(|| {
                self.identity
                    .as_ref()
                    .and_then(|i| i.endpoint.clone())
                    .or_else(|| self.endpoint_override.clone())
            }),
        })
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

        let status = if self.opts.fail_configs {
            self.status
                .send_modify(|s| s.last_remote_config_hash = Some(hash.clone()));
            RemoteConfigStatus {
                last_remote_config_hash: hash,
                status: RemoteConfigStatuses::Failed as i32,
                error_message: REJECTED.into(),
            }
        } else {
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
        if msg.remote_config_status.is_some() || msg.effective_config.is_some() {
            send.push(msg);
        }
    }

    /// Adopts `map` as the effective config; its bodies move into the status string.
    fn set_effective(&mut self, map: AgentConfigMap) {
        let mut text = String::new();
        self.layout.clear();
        for (name, file) in map.config_map {
            let body = String::from_utf8(file.body)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
            self.layout.push(FileLayout {
                name,
                content_type: file.content_type,
                len: body.len(),
            });
            if text.is_empty() {
                text = body;
            } else {
                text.push_str(&body);
            }
        }
        self.status.send_modify(|s| s.effective_config = text);
    }

    /// Rebuilds the config map from the status string and the file layout.
    fn effective_config(&self) -> EffectiveConfig {
        let st = self.status.borrow();
        let text = st.effective_config.as_str();
        let mut pos = 0;
        let config_map = self
            .layout
            .iter()
            .map(|f| {
                let body = text.get(pos..pos + f.len).unwrap_or_default();
                pos += f.len;
                (
                    f.name.clone(),
                    AgentConfigFile {
                        body: body.as_bytes().to_vec(),
                        content_type: f.content_type.clone(),
                    },
                )
            })
            .collect();
        EffectiveConfig {
            config_map: Some(AgentConfigMap { config_map }),
        }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proto::v1::{
        AgentIdentification, ConnectionSettingsOffers, OpAmpConnectionSettings, RetryInfo,
        ServerErrorResponse,
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
        kvs.iter().find(|kv| kv.key == key).and_then(|kv| {
            match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            }
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
}
