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

/// A cosign (ECDSA P-256) key made for the test: what `cosign generate-key-pair` and
/// `cosign sign-blob --key` would give.
pub struct CosignSigner {
    sk: p256::ecdsa::SigningKey,
}

impl CosignSigner {
    /// A key from `seed` (tests need no randomness to tell two keys apart).
    pub fn new(seed: u8) -> Self {
        Self {
            sk: p256::ecdsa::SigningKey::from_slice(&[seed.max(1); 32]).expect("key"),
        }
    }

    /// The `cosign.pub` PEM.
    pub fn public_pem(&self) -> String {
        use p256::pkcs8::EncodePublicKey as _;
        self.sk
            .verifying_key()
            .to_public_key_pem(p256::pkcs8::LineEnding::LF)
            .expect("pem")
    }

    /// `cosign sign-blob --key`'s output: the base64 DER signature over the SHA-256.
    pub fn sign(&self, data: &[u8]) -> String {
        use p256::ecdsa::signature::hazmat::PrehashSigner as _;
        use sha2::Digest as _;
        let sig: p256::ecdsa::Signature = self
            .sk
            .sign_prehash(&sha2::Sha256::digest(data))
            .expect("sign");
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    }

    /// `cosign sign-blob --key --bundle`'s output: a Sigstore bundle with the signature and
    /// the file's digest.
    pub fn bundle(&self, data: &[u8]) -> String {
        use sha2::Digest as _;
        let digest = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(data));
        serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": { "publicKey": { "hint": "test" } },
            "messageSignature": {
                "messageDigest": { "algorithm": "SHA2_256", "digest": digest },
                "signature": self.sign(data),
            }
        })
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

/// The `service.name` of the generic opamp-go agent the package tests play (not a Collector,
/// so offers keep names and signatures as imported).
pub const GENERIC_AGENT: &str = "example-agent";

/// The first message of a package-taking generic agent on `platform` (`os/arch`).
pub fn packaged_hello(uid: InstanceUid, caps: u64, platform: &str) -> proto::AgentToServer {
    packaged_hello_as(uid, caps, platform, GENERIC_AGENT)
}

/// The first message of a package-taking agent named `service_name` on `platform`.
pub fn packaged_hello_as(
    uid: InstanceUid,
    caps: u64,
    platform: &str,
    service_name: &str,
) -> proto::AgentToServer {
    let (os, arch) = platform.split_once('/').expect("os/arch");
    proto::AgentToServer {
        instance_uid: uid.0.to_vec(),
        capabilities: caps,
        agent_description: Some(AgentDescription {
            identifying_attributes: vec![
                kv("service.name", service_name),
                kv("service.version", "0.1.0"),
            ],
            non_identifying_attributes: vec![kv("os.type", os), kv("host.arch", arch)],
        }),
        ..Default::default()
    }
}

/// The first reply to a new linux/amd64 agent that takes packages, connecting to `ws_url`
/// with bootstrap `token`: where its offer is read from.
pub async fn probe_reply(ws_url: &str, token: &str) -> anyhow::Result<ServerToAgent> {
    let mut conn = agent::WsConnection::connect(ws_url, &crate::bearer(token)).await?;
    conn.send(&packaged_hello(
        InstanceUid::new_v7(),
        PKG_CAPS,
        "linux/amd64",
    ))
    .await?;
    let reply = conn.recv().await?.unwrap_or_default();
    conn.close(1000, "done").await;
    Ok(reply)
}

/// The top-level package's file in `reply`'s offer.
pub fn top_level_file(reply: ServerToAgent) -> anyhow::Result<proto::v1::DownloadableFile> {
    reply
        .packages_available
        .and_then(|p| p.packages.get("").cloned())
        .and_then(|p| p.file)
        .ok_or_else(|| anyhow::anyhow!("no offer of the top-level package"))
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

/// A plain static file server for one file, as an operator's own artifact host: `GET /<name>`
/// answers `data`, anything else 404. It counts the requests it served.
pub struct FileHost {
    pub url: String,
    pub served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FileHost {
    pub async fn start(name: &str, data: Vec<u8>) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/{name}", listener.local_addr()?);
        let path = format!("/{name}");
        let data = bytes::Bytes::from(data);
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (data, path, counter) = (data.clone(), path.clone(), counter.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (data, path, counter) =
                                (data.clone(), path.clone(), counter.clone());
                            async move {
                                let found = req.uri().path() == path;
                                if found {
                                    counter.fetch_add(1, Ordering::Relaxed);
                                }
                                let body = if found { data } else { bytes::Bytes::new() };
                                let mut resp =
                                    hyper::Response::new(http_body_util::Full::new(body));
                                if !found {
                                    *resp.status_mut() = hyper::StatusCode::NOT_FOUND;
                                }
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { url, served, task })
    }
}

impl Drop for FileHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The history of a two-stage rollout promoted past each soak: every step once.
pub const TWO_STAGES_PROMOTED: [&str; 8] = [
    "created",
    "stage_started",
    "stage_settled",
    "promoted",
    "stage_started",
    "stage_settled",
    "promoted",
    "succeeded",
];

/// The kinds of rollout `id`'s events, oldest first, with the whole history for messages.
pub async fn event_kinds(api: &Api, id: i64) -> anyhow::Result<(Vec<String>, Value)> {
    let history = api.get(&format!("/api/v1/rollouts/{id}/events")).await?;
    let kinds = history
        .as_array()
        .map(|h| {
            h.iter()
                .filter_map(|e| e["kind"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok((kinds, history))
}
