//! What a node's configuration turns into, for both ways of running Ampora (`serve`, the
//! embedded default, and the cluster roles in `cluster`): the gateway's settings and
//! connection limits, the agent CA a coordinator signs with, the trust a gateway verifies
//! agents with, the proxy secret, and package hosting (the download key and base URL).
//! Both depend on this module, never on each other.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gateway::tls::{AgentCa, AgentTrust};
use gateway::GatewayConfig;

use crate::config::Config;

/// The gateway settings shared by both modes.
pub fn gateway_config(config: &Config) -> GatewayConfig {
    GatewayConfig {
        max_frame_bytes: usize::try_from(config.opamp.max_frame_bytes).unwrap_or(usize::MAX),
        request_timeout: Duration::from_secs(config.opamp.request_timeout_secs),
        write_queue: usize::try_from(config.opamp.write_queue).unwrap_or(16),
        bootstrap_plaintext_allowed: config.opamp.bootstrap_plaintext_allowed,
        ownership_refresh: Duration::from_secs(config.cluster.ownership_ttl_secs) / 3,
        bus_lost_drain: (config.cluster.bus_lost_drain_secs > 0)
            .then(|| Duration::from_secs(config.cluster.bus_lost_drain_secs)),
        // Out-of-range values saturate: a limit that large is no limit.
        admission: gateway::server::AdmissionConfig {
            max_connections: usize::try_from(config.admission.max_connections)
                .unwrap_or(usize::MAX),
            accept_rate_per_sec: u32::try_from(config.admission.accept_rate_per_sec)
                .unwrap_or(u32::MAX),
            accept_burst: u32::try_from(config.admission.accept_burst).unwrap_or(u32::MAX),
            warmup: Duration::from_secs(config.admission.warmup_secs),
            max_connections_per_ip: saturate(config.admission.max_connections_per_ip),
            max_connections_per_credential: saturate(
                config.admission.max_connections_per_credential,
            ),
            accept_rate_per_ip_per_sec: u32::try_from(config.admission.accept_rate_per_ip_per_sec)
                .unwrap_or(u32::MAX),
            accept_burst_per_ip: u32::try_from(config.admission.accept_burst_per_ip)
                .unwrap_or(u32::MAX),
            first_message_timeout: Duration::from_secs(config.admission.first_message_timeout_secs),
        },
        identity: None,
        client_cert_header: (!config.tls.client_cert_header.is_empty())
            .then(|| {
                axum::http::HeaderName::from_bytes(config.tls.client_cert_header.as_bytes()).ok()
            })
            .flatten(),
        trusted_proxies: config.tls.trusted_proxy_nets(),
        // A file to read: `gateway_proxy_secret`.
        proxy_secret: None,
        frame_limits: gateway::server::FrameLimits {
            attributes: usize::try_from(config.opamp.max_attributes).unwrap_or(usize::MAX),
            components: usize::try_from(config.opamp.max_components).unwrap_or(usize::MAX),
            config_files: usize::try_from(config.opamp.max_config_files).unwrap_or(usize::MAX),
            entries: usize::try_from(config.opamp.max_entries).unwrap_or(usize::MAX),
        },
        decode_budget_bytes: usize::try_from(config.opamp.decode_budget_bytes)
            .unwrap_or(usize::MAX),
        // Set by the embedded default, which hosts package artifacts.
        downloads: None,
        own_metrics_key: None,
    }
}

fn saturate(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// The `[connections]` limits of a listener; trusted proxies are exempt from the per-address
/// ones (every agent behind a proxy shares its address).
pub fn connection_limits(config: &Config) -> gateway::serve::ConnectionLimits {
    let c = &config.connections;
    gateway::serve::ConnectionLimits {
        max_pending: saturate(c.max_pending),
        max_pending_per_ip: saturate(c.max_pending_per_ip),
        first_byte_timeout: Duration::from_millis(c.first_byte_timeout_ms),
        handshake_timeout: Duration::from_millis(c.handshake_timeout_ms),
        header_read_timeout: Duration::from_secs(c.header_read_timeout_secs),
        max_connections: saturate(c.max_connections),
        max_connections_per_ip: saturate(c.max_connections_per_ip),
        exempt: config
            .tls
            .trusted_proxies
            .iter()
            .filter_map(|p| p.parse().ok())
            .collect(),
    }
}

/// A gateway's agent CA (`tls.agent_ca_cert_file`), for verifying client certificates;
/// `None` without one (identities off).
pub fn gateway_agent_trust(config: &Config) -> anyhow::Result<Option<AgentTrust>> {
    let cert = &config.tls.agent_ca_cert_file;
    if cert.as_os_str().is_empty() {
        return Ok(None);
    }
    Ok(Some(
        AgentTrust::from_ca_file(cert).context("loading the agent CA certificate")?,
    ))
}

/// The secret trusted proxies must present (`tls.trusted_proxy_secret_file`) to gateways and
/// to the API alike; `None` without one.
pub fn gateway_proxy_secret(
    config: &Config,
) -> anyhow::Result<Option<gateway::server::ProxySecret>> {
    let path = &config.tls.trusted_proxy_secret_file;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading tls.trusted_proxy_secret_file {}", path.display()))?;
    let secret = gateway::server::ProxySecret::parse(&text)
        .map_err(|e| anyhow::anyhow!("tls.trusted_proxy_secret_file {}: {e}", path.display()))?;
    Ok(Some(secret))
}

/// A coordinator's agent CA with its key; `None` unless both files are set.
pub fn coordinator_agent_ca(config: &Config) -> anyhow::Result<Option<Arc<AgentCa>>> {
    let (cert, key) = (
        &config.tls.agent_ca_cert_file,
        &config.tls.agent_ca_key_file,
    );
    if cert.as_os_str().is_empty() || key.as_os_str().is_empty() {
        return Ok(None);
    }
    Ok(Some(Arc::new(
        AgentCa::from_files(cert, key).context("loading the agent CA")?,
    )))
}

pub fn identity_validity(config: &Config) -> Duration {
    Duration::from_secs(config.tls.identity_validity_secs)
}

/// The origin agents download from, given the OpAMP endpoint they connect to:
/// `wss://h:p/v1/opamp` → `https://h:p/v1/packages`.
pub fn download_base(endpoint: &str) -> String {
    beside_opamp(endpoint, gateway::server::downloads::DOWNLOAD_PATH)
}

/// Where agents send their own metrics to Ampora: `wss://h:p/v1/opamp` →
/// `https://h:p/v1/metrics`.
pub fn metrics_endpoint(endpoint: &str) -> String {
    beside_opamp(endpoint, shared::own_telemetry::METRICS_PATH)
}

/// `path` on the listener of the OpAMP `endpoint`, over HTTP(S).
fn beside_opamp(endpoint: &str, path: &str) -> String {
    let base = endpoint
        .replacen("wss://", "https://", 1)
        .replacen("ws://", "http://", 1);
    let root = match base.strip_suffix("/v1/opamp") {
        Some(root) => root.to_owned(),
        None => base.trim_end_matches('/').to_owned(),
    };
    format!("{root}{path}")
}

/// The key own-metrics credentials are signed with on the embedded default: the shared
/// download key when one is configured, else one kept in `<data_dir>/own-metrics.key` (made
/// on first start), so credentials outlive restarts and agents are not offered new ones.
pub fn embedded_metrics_key(
    config: &Config,
    data_dir: &std::path::Path,
) -> anyhow::Result<shared::download_token::DownloadKey> {
    if let Some(key) = download_key(config)? {
        return Ok(key);
    }
    let path = data_dir.join("own-metrics.key");
    let read = std::fs::read_to_string(&path).ok().and_then(|t| {
        hex::decode(t.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
    });
    let bytes = match read {
        Some(b) => b,
        None => {
            let b: [u8; 32] = rand::random();
            std::fs::write(&path, hex::encode(b))
                .with_context(|| format!("writing {}", path.display()))?;
            b
        }
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("restricting {}", path.display()))?;
    }
    Ok(shared::download_token::DownloadKey::new(bytes))
}

/// The shared download key of cluster mode (`packages.download_key_file`: 64 hex digits);
/// `None` when unset (cluster nodes then host no packages).
pub fn download_key(
    config: &Config,
) -> anyhow::Result<Option<shared::download_token::DownloadKey>> {
    let path = &config.packages.download_key_file;
    if path.as_os_str().is_empty() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading packages.download_key_file {}", path.display()))?;
    let bytes = hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .with_context(|| {
            format!(
                "packages.download_key_file {}: must hold 64 hex digits (e.g. `openssl rand -hex 32`)",
                path.display()
            )
        })?;
    Ok(Some(shared::download_token::DownloadKey::new(bytes)))
}

/// A coordinator's package hosting: blobs in `dir` (or, `blobs_in_store`, imported through
/// `dir` into the store), offered at `download_base` with credentials signed by `key`.
pub fn package_hosting(
    config: &Config,
    dir: std::path::PathBuf,
    download_base: &str,
    key: shared::download_token::DownloadKey,
    blobs_in_store: bool,
) -> anyhow::Result<crate::service::packages::PackageHosting> {
    let p = &config.packages;
    let trust = crate::service::package_trust::TrustPolicy::new(
        &p.trusted_keys,
        &p.trusted_cosign_keys,
        p.allow_unsigned,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(crate::service::packages::PackageHosting {
        dir,
        blobs_in_store,
        key,
        download_base: download_base.to_owned(),
        token_ttl_secs: p.download_token_ttl_secs,
        max_attempts: p.max_install_attempts,
        max_concurrent_upgrades: saturate(p.max_concurrent_upgrades),
        trust,
        max_artifact_bytes: p.max_artifact_bytes,
        windows: p
            .maintenance_windows
            .iter()
            .map(|w| crate::service::maintenance::Window::parse(w))
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?,
    })
}

/// A cluster gateway's downloads (`None` without a download key): blobs fetched from the
/// store into `packages.cache_dir`.
pub fn gateway_downloads(
    config: &Config,
) -> anyhow::Result<Option<gateway::server::downloads::Downloads>> {
    let Some(key) = download_key(config)? else {
        return Ok(None);
    };
    let dir = if config.packages.cache_dir.as_os_str().is_empty() {
        config.server.data_dir.join("package-cache")
    } else {
        config.packages.cache_dir.clone()
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("creating packages.cache_dir {}", dir.display()))?;
    Ok(Some(gateway::server::downloads::Downloads {
        dir,
        key,
        fetch_missing: true,
        max_in_flight: saturate(config.packages.max_downloads_per_gateway),
        cache_max_bytes: config.packages.cache_max_bytes,
    }))
}
