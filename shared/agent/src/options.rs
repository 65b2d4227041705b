//! What an agent is told to be and what it has seen: [`AgentOptions`] (its configuration,
//! including the opamp-go behaviours it can take on) and [`AgentStatus`] (published on a watch
//! channel so tests can wait on it). The agent task ([`crate::agent`]) and the protocol core
//! ([`crate::core`]) both read these; neither depends on the other for them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use proto::agent_caps;

use crate::tls::ClientTls;
use crate::url::Scheme;

/// ReportsStatus | AcceptsRemoteConfig | ReportsEffectiveConfig | ReportsHealth |
/// ReportsRemoteConfig | ReportsHeartbeat.
pub const DEFAULT_CAPABILITIES: u64 = agent_caps::REPORTS_STATUS
    | agent_caps::ACCEPTS_REMOTE_CONFIG
    | agent_caps::REPORTS_EFFECTIVE_CONFIG
    | agent_caps::REPORTS_HEALTH
    | agent_caps::REPORTS_REMOTE_CONFIG
    | agent_caps::REPORTS_HEARTBEAT;

/// How an agent runs: where it connects, with which credentials, what it reports, and which
/// of opamp-go's behaviours it takes on.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// `ws://…`, `wss://…`, `http://…` or `https://…`; the scheme picks the transport.
    pub endpoint: String,
    /// What to trust for `wss://` and `https://` (required for them: there is no built-in
    /// trust store), e.g. `ClientTls::from_ca_file("ampora-data/tls/ca.pem")`.
    pub tls: Option<ClientTls>,
    /// Sent as `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// `None`: ask the server for one (RequestInstanceUid) and adopt what it assigns.
    pub instance_uid: Option<[u8; 16]>,
    /// Identifying attributes (service.name, service.version, …).
    pub description: Vec<(String, String)>,
    /// Non-identifying attributes (host.name, os.type, labels, …).
    pub non_identifying: Vec<(String, String)>,
    pub capabilities: u64,
    /// WS heartbeat / HTTP poll interval (zero means the 30 s default). A non-zero
    /// `heartbeat_interval_seconds` offered by the server replaces it.
    pub heartbeat: Duration,
    /// Effective config reported at start (a single `text/yaml` file).
    pub initial_config: String,
    /// Report FAILED for every remote config instead of applying it.
    pub fail_configs: bool,
    /// Report FAILED (with [`crate::core::DISLIKED`]) for a remote config any of whose files
    /// contains this text, as a Collector refuses a config it cannot load.
    pub fail_configs_containing: Option<String>,
    /// Apply a remote config containing this text, then report unhealthy (with ReportsHealth),
    /// as a Collector whose exporter cannot reach its endpoint does; any other config makes it
    /// healthy again.
    pub unhealthy_configs_containing: Option<String>,
    /// Local address to connect from (the load generator spreads over 127.0.0.x).
    pub source_ip: Option<IpAddr>,
    /// On WebSocket reconnects, open with a compact message instead of the full state, as
    /// agents that trust the server to remember them do (the server must then ask for full
    /// state when its memory may be stale, e.g. after a move between gateways).
    pub compact_reconnect: bool,
    /// Declare AcceptsOpAMPConnectionSettings (0x100) and take up a client certificate the
    /// server offers in `connection_settings.opamp` (with its private key): reconnect with it
    /// (mTLS, no `Authorization` header from then on). Declaring 0x100 in `capabilities` does
    /// the same. Needs a `wss://` / `https://` endpoint.
    pub accept_identity: bool,
    /// Reconnect like opamp-go: every connection cycle starts a fresh back-off, so once an
    /// established WebSocket is closed by the server (or lost) the agent reconnects at once;
    /// a `ServerErrorResponse` (even Unavailable) is only recorded, never waited on. Failed
    /// attempts within a cycle (refusals at the upgrade: 401 / 403 / 429 / 503, connect
    /// errors) back off 0.5 s doubling to 60 s, at least the `Retry-After`. Plain HTTP: the
    /// same back-off for refused requests, none for error responses.
    pub reconnect_at_once_after_close: bool,
    /// Like the Collector's supervisor and opamp-go's example agent: on every
    /// `connection_settings.opamp` offer (certificate or not, new or repeated) tear the client
    /// down and start it again at once with the offered settings (a certificate with its key
    /// replaces the token; the offered endpoint when usable; settings it cannot use restart
    /// it with the previous ones, as the supervisor's failed start does). Never reports
    /// ConnectionSettingsStatus and keeps no offer's hash across the restart; a certificate
    /// that fails is retried, not reverted. Declares AcceptsOpAMPConnectionSettings.
    pub restart_on_settings_offer: bool,
    /// An offered certificate (and endpoint) lives only in the process's memory:
    /// [`Agent::restart_process`] brings the agent back on its bootstrap token, as a
    /// restarted supervisor comes back. Without it a restart keeps them (as if persisted).
    pub forget_identity_on_restart: bool,
    /// Pick WebSocket or plain HTTP from the scheme of an offered endpoint (`ws`/`wss` →
    /// WebSocket, `http`/`https` → HTTP), as opamp-go picks its client from the URL it is
    /// given. Without it an offered endpoint of the other transport is not taken.
    pub transport_from_offer_scheme: bool,
    /// Declare AcceptsPackages | ReportsPackageStatuses: fetch offered packages (checking
    /// their SHA-256), report their statuses, and run the version of an installed top-level
    /// package (as `service.version`, after a reconnect).
    pub accept_packages: bool,
    /// Report InstallFailed with this error for every package it would install (after the
    /// download and hash check), as a broken installer would.
    pub package_install_fails: Option<String>,
    /// Limits [`Self::package_install_fails`] to installs of this version (a build that is
    /// broken where the one before it was not).
    pub package_install_fails_version: Option<String>,
    /// The build's components, kind (`receivers`, …) → types (`otlp`, …), reported with
    /// ReportsAvailableComponents (set that bit in `capabilities`).
    pub available_components: BTreeMap<String, Vec<String>>,
    /// On a Restart command (with AcceptsRestartCommand declared), go away for good instead
    /// of coming back: a collector that fails to start again.
    pub restart_never_returns: bool,
    /// Custom capabilities announced in the full state.
    pub custom_capabilities: Vec<String>,
    /// Answer each custom message with the same capability and data, type `<type>.reply`.
    pub echo_custom_messages: bool,
    /// Answer own-telemetry settings FAILED with this error instead of APPLIED, as a
    /// supervisor does when the Collector cannot start with them.
    pub own_telemetry_fails: Option<String>,
}

impl AgentOptions {
    /// The spec's default heartbeat and HTTP poll interval.
    pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(30);

    /// The error installing `version` fails with, if the installer is set to fail on it.
    pub fn install_error(&self, version: &str) -> Option<String> {
        let applies = self
            .package_install_fails_version
            .as_deref()
            .is_none_or(|v| v == version);
        self.package_install_fails.clone().filter(|_| applies)
    }
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            endpoint: "ws://127.0.0.1:4320/v1/opamp".into(),
            tls: None,
            token: None,
            instance_uid: None,
            description: Vec::new(),
            non_identifying: Vec::new(),
            capabilities: DEFAULT_CAPABILITIES,
            heartbeat: Self::DEFAULT_HEARTBEAT,
            initial_config: String::new(),
            fail_configs: false,
            fail_configs_containing: None,
            unhealthy_configs_containing: None,
            source_ip: None,
            compact_reconnect: false,
            accept_identity: false,
            reconnect_at_once_after_close: false,
            restart_on_settings_offer: false,
            forget_identity_on_restart: false,
            transport_from_offer_scheme: false,
            accept_packages: false,
            package_install_fails: None,
            package_install_fails_version: None,
            available_components: BTreeMap::new(),
            restart_never_returns: false,
            custom_capabilities: Vec::new(),
            echo_custom_messages: false,
            own_telemetry_fails: None,
        }
    }
}

/// What an agent has seen so far; published on a watch channel so tests can wait on it.
#[derive(Debug, Clone, Default)]
pub struct AgentStatus {
    /// `None` until the server assigned one when the agent started without a uid.
    pub instance_uid: Option<[u8; 16]>,
    pub connected: bool,
    /// ServerToAgent messages received.
    pub replies: u64,
    pub last_remote_config_hash: Option<Vec<u8>>,
    pub applied_configs: u64,
    /// Bodies of the effective config files, concatenated (just the body for one file).
    pub effective_config: String,
    /// Last connect/transport/server error, e.g. "401: unknown token". Kept after recovery.
    pub last_error: Option<String>,
    pub heartbeat_secs: u64,
    pub server_capabilities: u64,
    pub full_state_requests: u64,
    /// Serial (lowercase hex) of the client certificate the agent connects with, once a
    /// connection with an offered certificate succeeded; `None` on the bootstrap token.
    pub client_cert_serial: Option<String>,
    /// Connections attempted: WebSocket handshakes started, HTTP connections opened.
    pub connections_attempted: u64,
    /// Of those, established: upgraded (101), or connected (HTTP).
    pub connections_established: u64,
    /// The transport of the last established connection.
    pub transport: Option<Scheme>,
    /// Refused before any OpAMP exchange: the upgrade answered with a status other than 101,
    /// an HTTP request with one other than 200 (401, 403, 429, 503, …).
    pub upgrade_refusals: u64,
    /// The server's last WebSocket Close: `"<code> <reason>"`.
    pub last_close_reason: Option<String>,
    /// `connection_settings.opamp` offers received (whether acted on or not).
    pub settings_offers: u64,
    /// Of those, offers whose certificate carried a private key.
    pub settings_offers_with_key: u64,
    /// Every distinct non-empty `destination_endpoint` offered, in order of first offer.
    pub offered_endpoints: Vec<String>,
    /// Client restarts on settings offers ([`AgentOptions::restart_on_settings_offer`]).
    pub client_restarts: u64,
    /// Simulated process restarts ([`Agent::restart_process`]).
    pub process_restarts: u64,
    /// The agent's packages by name, from the last offer on.
    pub packages: BTreeMap<String, PackageView>,
    /// `packages_available` offers received (repeats included).
    pub package_offers: u64,
    /// Package downloads started.
    pub package_downloads: u64,
    /// Bytes of package files received (of failed downloads too).
    pub package_bytes_downloaded: u64,
    /// Times the server asked for the whole component set (ReportAvailableComponents).
    pub components_requests: u64,
    /// Restart commands taken.
    pub restart_commands: u64,
    /// Custom messages received for declared capabilities: (capability, type, data).
    pub custom_messages: Vec<(String, String, Vec<u8>)>,
    /// The custom capabilities the server announced last.
    pub server_custom_capabilities: Vec<String>,
    /// Own-telemetry destinations offered last (`own_metrics`, `own_traces`, `own_logs`),
    /// for the signals this agent declares it reports.
    pub own_metrics: Option<OwnTelemetryOffer>,
    pub own_traces: Option<OwnTelemetryOffer>,
    pub own_logs: Option<OwnTelemetryOffer>,
    /// The signals the last offer carried (`metrics`, `traces`, `logs`), declared or not:
    /// what the server sent, before this agent kept only what it reports.
    pub own_signals_offered: Vec<&'static str>,
}

/// Where the server asked the agent to send one signal of its own telemetry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OwnTelemetryOffer {
    /// The full OTLP/HTTP URL.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    /// PEM of the CA to trust for `endpoint`, if given.
    pub ca_pem: Option<String>,
}

/// One of [`AgentStatus::packages`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PackageView {
    /// The version the agent has (empty before it installed one).
    pub version: String,
    /// The version last offered.
    pub offered_version: String,
    /// `Installed`, `InstallFailed`, `Downloading`, … (the proto's names without prefix).
    pub status: &'static str,
    pub error: Option<String>,
}
