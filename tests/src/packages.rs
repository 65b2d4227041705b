//! What the package tests share (the e2e and metrics binaries): a minisign signer, test
//! builds, importing one through the API, a package-taking agent's first message, and reading
//! the download URL and credential out of an offer.

use base64::Engine as _;
use proto::v1::{
    any_value, AgentDescription, AnyValue, KeyValue, PackageStatus, PackageStatuses,
    PackagesAvailable,
};
use proto::ServerToAgent;
use serde_json::Value;
use shared::ids::InstanceUid;

use crate::{Api, TestServer};

/// ReportsStatus | AcceptsPackages | ReportsPackageStatuses.
pub const PKG_CAPS: u64 = 0x1 | 0x8 | 0x10;

/// A minisign key pair made for the test, and its public key as `packages.trusted_keys`
/// takes it.
pub struct Signer {
    kp: minisign::KeyPair,
}

impl Default for Signer {
    fn default() -> Self {
        Self::new()
    }
}

impl Signer {
    pub fn new() -> Self {
        Self {
            kp: minisign::KeyPair::generate_unencrypted_keypair().expect("key pair"),
        }
    }

    pub fn public(&self) -> String {
        self.kp.pk.to_base64()
    }

    /// The `.minisig` file of `data`.
    pub fn sign(&self, data: &[u8]) -> String {
        minisign::sign(
            Some(&self.kp.pk),
            &self.kp.sk,
            std::io::Cursor::new(data),
            Some("test build"),
            None,
        )
        .expect("sign")
        .to_string()
    }
}

pub fn build(version: &str) -> Vec<u8> {
    // A few hundred KiB, so a download takes more than one read.
    let mut b = format!("otelcol {version}\n").into_bytes();
    b.extend((0..300_000u32).map(|i| (i % 251) as u8));
    b
}

/// `POST /api/v1/packages` of a top-level package with `data` and, if given, the
/// signature; status and body.
pub async fn import(
    server: &TestServer,
    name: &str,
    version: &str,
    platform: &str,
    data: Vec<u8>,
    signature: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    import_kind(
        server,
        name,
        version,
        platform,
        "top_level",
        data,
        signature,
    )
    .await
}

pub async fn import_kind(
    server: &TestServer,
    name: &str,
    version: &str,
    platform: &str,
    kind: &str,
    data: Vec<u8>,
    signature: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    import_via(&server.api, name, version, platform, kind, data, signature).await
}

/// [`import_kind`] through any node's API (a cluster coordinator's).
pub async fn import_via(
    api: &Api,
    name: &str,
    version: &str,
    platform: &str,
    kind: &str,
    data: Vec<u8>,
    signature: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let mut req = reqwest::Client::new()
        .post(format!("{}/api/v1/packages", api.base))
        .query(&[
            ("name", name),
            ("version", version),
            ("platform", platform),
            ("kind", kind),
        ])
        .bearer_auth(&api.token)
        .body(data);
    if let Some(sig) = signature {
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig);
        req = req.header("x-ampora-signature", b64);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().await.unwrap_or(Value::Null)))
}

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
    }
}

/// The first message of a package-taking agent on `platform` (`os/arch`).
pub fn packaged_hello(uid: InstanceUid, caps: u64, platform: &str) -> proto::AgentToServer {
    let (os, arch) = platform.split_once('/').expect("os/arch");
    proto::AgentToServer {
        instance_uid: uid.0.to_vec(),
        capabilities: caps,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                kv("service.name", "otelcol"),
                kv("service.version", "0.1.0"),
            ],
            non_identifying_attributes: vec![kv("os.type", os), kv("host.arch", arch)],
        }),
        ..Default::default()
    }
}

/// The download URL and `Authorization` value of package `name` in `reply`'s offer.
pub fn download_of(reply: &ServerToAgent, name: &str) -> Option<(String, String)> {
    let file = reply
        .packages_available
        .as_ref()?
        .packages
        .get(name)?
        .file
        .clone()?;
    let auth = file
        .headers?
        .headers
        .into_iter()
        .find(|h| h.key.eq_ignore_ascii_case("authorization"))?
        .value;
    Some((file.download_url, auth))
}

/// Agent `uid`'s report (message `seq`) on the top-level package of `offer`: the wire
/// `status` (0 Installed, 3 InstallFailed, …) of the offered version, echoing `echo` as the
/// aggregate it was given.
pub fn top_level_report(
    uid: InstanceUid,
    seq: u64,
    offer: &PackagesAvailable,
    status: i32,
    echo: Vec<u8>,
) -> proto::AgentToServer {
    let top = offer.packages.get("").cloned().unwrap_or_default();
    proto::AgentToServer {
        instance_uid: uid.0.to_vec(),
        capabilities: PKG_CAPS,
        sequence_num: seq,
        package_statuses: Some(PackageStatuses {
            packages: std::collections::BTreeMap::from([(
                String::new(),
                PackageStatus {
                    agent_has_version: top.version,
                    agent_has_hash: top.hash,
                    status,
                    error_message: if status == 3 {
                        "disk full".into()
                    } else {
                        String::new()
                    },
                    ..Default::default()
                },
            )]),
            server_provided_all_packages_hash: echo,
            error_message: String::new(),
        }),
        ..Default::default()
    }
}
