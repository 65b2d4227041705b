//! Wire-neutral records: what stores keep and what the API shows.
//!
//! The coordinator converts OpAMP messages into these once, at the edge of the session core,
//! so storage and API code never see protobuf types.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::ids::InstanceUid;

/// How an agent talks to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    WebSocket,
    Http,
}

/// `AgentDescription`, with attribute values rendered to JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Description {
    pub identifying: BTreeMap<String, serde_json::Value>,
    pub non_identifying: BTreeMap<String, serde_json::Value>,
}

impl Description {
    /// Looks a key up in identifying, then non-identifying attributes, as a string.
    pub fn get_str(&self, key: &str) -> Option<String> {
        let v = self
            .identifying
            .get(key)
            .or_else(|| self.non_identifying.get(key))?;
        Some(match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }

    /// True when every `key=value` in `labels` is an attribute of this description.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        labels
            .iter()
            .all(|(k, v)| self.get_str(k).is_some_and(|have| &have == v))
    }
}

/// `ComponentHealth`, recursively.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub healthy: bool,
    pub status: String,
    pub last_error: String,
    pub start_time_unix_nano: u64,
    pub status_time_unix_nano: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub components: BTreeMap<String, Health>,
}

/// One file of an `AgentConfigMap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigFile {
    /// UTF-8 text when the body is valid UTF-8 (almost always); otherwise lossy.
    pub body: String,
    pub content_type: String,
}

/// An agent config: file name → file. A single-file config uses the name `""`.
pub type ConfigMap = BTreeMap<String, ConfigFile>;

/// `RemoteConfigStatuses`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RemoteStatus {
    Unset,
    Applied,
    Applying,
    Failed,
}

impl RemoteStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unset => "UNSET",
            Self::Applied => "APPLIED",
            Self::Applying => "APPLYING",
            Self::Failed => "FAILED",
        }
    }
}

/// The agent's last `RemoteConfigStatus`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteConfigReport {
    /// Hex of `last_remote_config_hash`.
    pub hash: String,
    pub status: RemoteStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_message: String,
}

/// What an agent said of the connection settings it uses (`ConnectionSettingsStatus`, whose
/// statuses have the same values as `RemoteConfigStatuses`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettingsReport {
    pub status: RemoteStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error_message: String,
}

/// Where an agent stands against the config assigned to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigState {
    /// No config is assigned.
    None,
    /// Assigned, not yet reported applied.
    Pending,
    /// The agent reported the assigned hash as applied.
    Applied,
    /// The agent reported the assigned hash as failed.
    Failed,
    /// The agent applied the assigned config, then its effective config changed without a new
    /// offer from us, or it reports a remote config we did not assign.
    Drifted,
}

impl ConfigState {
    pub const ALL: [Self; 5] = [
        Self::None,
        Self::Pending,
        Self::Applied,
        Self::Failed,
        Self::Drifted,
    ];

    /// The same name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Pending => "pending",
            Self::Applied => "applied",
            Self::Failed => "failed",
            Self::Drifted => "drifted",
        }
    }
}

/// Everything Ampora knows about one agent. Survives connections and restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub instance_uid: InstanceUid,
    pub description: Description,
    pub capabilities: u64,
    pub health: Option<Health>,
    pub effective_config: Option<ConfigMap>,
    /// Hex SHA-256 over the canonical form of `effective_config`.
    pub effective_config_hash: Option<String>,
    pub remote_config: Option<RemoteConfigReport>,
    /// The config version assigned to this agent, if any.
    pub assigned_config: Option<i64>,
    /// Hex hash of the assigned config version.
    pub assigned_config_hash: Option<String>,
    /// Effective config hash recorded when the agent reported the assigned config applied;
    /// a later different hash without a new offer is drift.
    pub applied_effective_hash: Option<String>,
    pub connected: bool,
    pub transport: Option<Transport>,
    pub gateway: Option<String>,
    pub sequence_num: u64,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Hash (hex) of the last connection settings offered to the agent: an offer goes out
    /// once per change, not once per connection (agents that restart on every offer would
    /// otherwise loop).
    #[serde(default)]
    pub settings_offered: Option<String>,
    /// Hash (hex) of the connection settings the agent has shown it uses: reported in
    /// `ConnectionSettingsStatus`, or the offer whose certificate it connected with.
    #[serde(default)]
    pub settings_in_use: Option<String>,
    /// What the agent said of `settings_in_use` when it reported it, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings_status: Option<SettingsReport>,
    /// Packages the agent reported and what was offered to it (boxed: most agents have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Box<crate::packages::AgentPackages>>,
    /// Hex of the `AvailableComponents.hash` the agent reported: its build's components are
    /// stored once under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub components_hash: Option<String>,
    /// When the agent's current (or last) connection began, Unix ms: a restart is over once
    /// it is later than the command.
    #[serde(default)]
    pub connected_ms: i64,
    /// Custom capabilities the agent announced (reverse-FQDN, optionally `/vN`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_capabilities: Vec<String>,
    /// The agent's recent custom messages for capabilities Ampora relays, oldest first (at
    /// most [`MAX_CUSTOM_MESSAGES`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub custom_messages: Vec<CustomMessageRecord>,
    /// The agent's own-metrics window, when it sends its own metrics to Ampora (boxed:
    /// most agents have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throughput: Option<Box<crate::own_telemetry::Throughput>>,
}

/// Custom messages kept per agent.
pub const MAX_CUSTOM_MESSAGES: usize = 20;

/// A custom message an agent sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomMessageRecord {
    pub at_ms: i64,
    pub capability: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The payload, base64.
    pub data_base64: String,
}

impl AgentRecord {
    pub fn new(instance_uid: InstanceUid, now_ms: i64) -> Self {
        Self {
            instance_uid,
            description: Description::default(),
            capabilities: 0,
            health: None,
            effective_config: None,
            effective_config_hash: None,
            remote_config: None,
            assigned_config: None,
            assigned_config_hash: None,
            applied_effective_hash: None,
            connected: false,
            transport: None,
            gateway: None,
            sequence_num: 0,
            first_seen_ms: now_ms,
            last_seen_ms: now_ms,
            settings_offered: None,
            settings_in_use: None,
            settings_status: None,
            packages: None,
            components_hash: None,
            connected_ms: 0,
            custom_capabilities: Vec::new(),
            custom_messages: Vec::new(),
            throughput: None,
        }
    }

    /// This record without its effective config files (the hash stays), copied field by
    /// field so the files are never cloned (a new field fails to compile here until it is
    /// decided on).
    pub fn without_effective_config(&self) -> AgentRecord {
        AgentRecord {
            instance_uid: self.instance_uid,
            description: self.description.clone(),
            capabilities: self.capabilities,
            health: self.health.clone(),
            effective_config: None,
            effective_config_hash: self.effective_config_hash.clone(),
            remote_config: self.remote_config.clone(),
            assigned_config: self.assigned_config,
            assigned_config_hash: self.assigned_config_hash.clone(),
            applied_effective_hash: self.applied_effective_hash.clone(),
            connected: self.connected,
            transport: self.transport,
            gateway: self.gateway.clone(),
            sequence_num: self.sequence_num,
            first_seen_ms: self.first_seen_ms,
            last_seen_ms: self.last_seen_ms,
            settings_offered: self.settings_offered.clone(),
            settings_in_use: self.settings_in_use.clone(),
            settings_status: self.settings_status.clone(),
            packages: self.packages.clone(),
            components_hash: self.components_hash.clone(),
            connected_ms: self.connected_ms,
            custom_capabilities: self.custom_capabilities.clone(),
            custom_messages: self.custom_messages.clone(),
            throughput: self.throughput.clone(),
        }
    }

    pub fn config_state(&self) -> ConfigState {
        let Some(want) = &self.assigned_config_hash else {
            return ConfigState::None;
        };
        match &self.remote_config {
            Some(r) if &r.hash == want => match r.status {
                RemoteStatus::Applied => {
                    match (&self.applied_effective_hash, &self.effective_config_hash) {
                        (Some(a), Some(e)) if a != e => ConfigState::Drifted,
                        _ => ConfigState::Applied,
                    }
                }
                RemoteStatus::Failed => ConfigState::Failed,
                _ => ConfigState::Pending,
            },
            _ => ConfigState::Pending,
        }
    }
}

/// An immutable config version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigVersion {
    pub id: i64,
    pub name: String,
    pub files: ConfigMap,
    /// Hex SHA-256 over the canonical form of `files`; what agents echo back.
    pub hash: String,
    pub author: String,
    pub created_ms: i64,
}

/// Whom an assignment targets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    Agent(InstanceUid),
    Labels(BTreeMap<String, String>),
    All,
}

impl Target {
    pub fn matches(&self, agent: &AgentRecord) -> bool {
        match self {
            Self::Agent(uid) => *uid == agent.instance_uid,
            Self::Labels(l) => agent.description.matches(l),
            Self::All => true,
        }
    }
}

/// "This config version for these agents". The newest assignment matching an agent wins.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: i64,
    pub config_id: i64,
    pub target: Target,
    pub author: String,
    pub created_ms: i64,
}

/// A bootstrap token as stored: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    /// Non-secret prefix for recognising the token in lists.
    pub prefix: String,
    #[serde(skip)]
    pub hash: [u8; 32],
    pub created_ms: i64,
    pub expires_ms: i64,
    pub revoked_ms: Option<i64>,
    pub redeemed_ms: Option<i64>,
    /// The agent that redeemed the token; only it may use the token from then on.
    pub bound_uid: Option<InstanceUid>,
    /// Which agents may redeem the token; `None` admits any agent.
    #[serde(default)]
    pub scope: Option<TokenScope>,
}

/// An agent's mTLS identity: a client certificate the coordinator issued from the agent CA.
/// Issued after a bootstrap-token connection; once `confirmed_ms` is set (the agent connected
/// with it) bootstrap tokens are refused for `instance_uid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityRecord {
    /// The certificate's serial number, lowercase hex (what CRLs and revocations name).
    pub serial: String,
    pub instance_uid: InstanceUid,
    pub created_ms: i64,
    /// The certificate's notAfter.
    pub not_after_ms: i64,
    /// When the agent first connected with this certificate.
    pub confirmed_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
    /// SHA-256 of the certificate's DER, lowercase hex.
    pub fingerprint: String,
    /// The certificate (PEM), repeated in every later offer; never the private key.
    pub cert_pem: String,
}

/// A bootstrap token's scope: the agent redeeming it must describe itself with every one of
/// these labels, matched as assignment labels are ([`Description::matches`]). It is checked
/// once, when the token is bound; the binding then stands whatever the agent reports later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenScope {
    pub labels: BTreeMap<String, String>,
}

impl TokenScope {
    /// True when `description` has every label of the scope.
    pub fn admits(&self, description: &Description) -> bool {
        description.matches(&self.labels)
    }
}

/// Outcome of an atomic redemption attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Redemption {
    /// This call bound the token to the agent.
    Bound,
    /// The token was already bound to this same agent (a reconnect with a static header).
    AlreadyBoundToSame,
    /// Another agent redeemed it first.
    BoundToOther,
    Revoked,
    Expired,
    NotFound,
}

/// Operator roles, least to most privileged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

/// An operator API token as stored: never the token itself. Its name is unique among all API
/// tokens ever created (revoked ones included), so `api:<name>` names one actor in the audit
/// log for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    #[serde(skip)]
    pub hash: [u8; 32],
    pub created_ms: i64,
}

/// An API token as listed: the record and, once revoked, when. (Lookups for authentication
/// never return revoked tokens, so they need no such field.)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiTokenListing {
    #[serde(flatten)]
    pub token: ApiTokenRecord,
    pub revoked_ms: Option<i64>,
}

/// One append-only audit entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: i64,
    pub at_ms: i64,
    /// Who acted: `api:<API token name>`, `agent`, or `system`.
    pub actor: String,
    /// What happened, e.g. `token.create`, `token.redeem`, `auth.failed`.
    pub action: String,
    pub instance_uid: Option<InstanceUid>,
    pub source_ip: Option<IpAddr>,
    /// Bounded reason code for failures (`malformed_token`, `revoked`, …).
    pub reason: Option<String>,
    pub detail: serde_json::Value,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentRecord {
        let mut a = AgentRecord::new(InstanceUid([1; 16]), 0);
        a.description
            .identifying
            .insert("service.name".into(), "otelcol".into());
        a.description
            .non_identifying
            .insert("env".into(), "prod".into());
        a
    }

    #[test]
    fn labels_match_both_attribute_kinds() {
        let a = agent();
        let l = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(Target::Labels(l("env", "prod")).matches(&a));
        assert!(Target::Labels(l("service.name", "otelcol")).matches(&a));
        assert!(!Target::Labels(l("env", "dev")).matches(&a));
        assert!(Target::All.matches(&a));
    }

    #[test]
    fn scopes_admit_matching_descriptions_only() {
        let a = agent();
        let scope = |pairs: &[(&str, &str)]| TokenScope {
            labels: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        assert!(scope(&[("env", "prod"), ("service.name", "otelcol")]).admits(&a.description));
        assert!(!scope(&[("env", "prod"), ("region", "eu")]).admits(&a.description));
        assert!(!scope(&[("env", "prod")]).admits(&Description::default()));
    }

    #[test]
    fn config_state_follows_reports() {
        let mut a = agent();
        assert_eq!(a.config_state(), ConfigState::None);
        a.assigned_config_hash = Some("aa".into());
        assert_eq!(a.config_state(), ConfigState::Pending);
        a.remote_config = Some(RemoteConfigReport {
            hash: "aa".into(),
            status: RemoteStatus::Failed,
            error_message: "bad".into(),
        });
        assert_eq!(a.config_state(), ConfigState::Failed);
        a.remote_config = Some(RemoteConfigReport {
            hash: "aa".into(),
            status: RemoteStatus::Applied,
            error_message: String::new(),
        });
        a.effective_config_hash = Some("e1".into());
        a.applied_effective_hash = Some("e1".into());
        assert_eq!(a.config_state(), ConfigState::Applied);
        a.effective_config_hash = Some("e2".into());
        assert_eq!(a.config_state(), ConfigState::Drifted);
    }
}
