//! Importing a package artifact: the bytes streamed to a temporary file in the blob
//! directory while their SHA-256 and (for a signed artifact) the minisign signature are
//! computed over the same pass, checked against the operator's trust policy, and only then
//! moved to their content address and recorded. Nothing is held in memory whole, and a
//! refused import leaves no file behind. Ampora never holds a signing key: it only verifies.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use minisign_verify::{PublicKey, Signature};
use sha2::{Digest, Sha256};
use shared::now_ms;
use shared::packages::{valid_label, valid_platform, Artifact, PackageKind, BLOB_CHUNK_BYTES};
use tokio::io::AsyncWriteExt;

use super::{Coordinator, ServiceError};

/// An upload that sends nothing for this long is abandoned.
const IMPORT_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// Which signatures make an artifact importable.
#[derive(Clone)]
pub struct TrustPolicy {
    /// The minisign public keys (as configured, base64) and their decoded form.
    keys: Vec<(String, PublicKey)>,
    allow_unsigned: bool,
}

impl std::fmt::Debug for TrustPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<&str> = self.keys.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TrustPolicy")
            .field("keys", &keys)
            .field("allow_unsigned", &self.allow_unsigned)
            .finish()
    }
}

impl TrustPolicy {
    /// `keys`: minisign public keys, the base64 line of a `minisign.pub` file.
    pub fn new(keys: &[String], allow_unsigned: bool) -> Result<Self, String> {
        let keys = keys
            .iter()
            .map(|k| {
                PublicKey::from_base64(k.trim())
                    .map(|pk| (k.trim().to_owned(), pk))
                    .map_err(|e| {
                        format!("packages.trusted_keys: `{k}` is not a minisign public key: {e}")
                    })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            keys,
            allow_unsigned,
        })
    }
}

/// An artifact about to be imported.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub name: String,
    pub version: String,
    pub platform: String,
    pub kind: PackageKind,
    /// The minisign signature file's text.
    pub signature: Option<String>,
}

impl Coordinator {
    /// Whether `req` could be imported, judged before a byte of the build is read: what
    /// `POST /api/v1/packages/check` answers, so that a client learns why a build would be
    /// refused without sending it (a refusal mid-upload reaches many clients as a broken
    /// pipe, not as the answer).
    pub async fn check_import(&self, req: &ImportRequest) -> Result<(), ServiceError> {
        self.admissible(req).await.map(|_| ())
    }

    /// The checks that need no bytes: hosting on, names, the platform, the signature's form
    /// and a trusted key with its id, not imported before. Returns the hosting and the
    /// signature with the index of its key.
    async fn admissible(
        &self,
        req: &ImportRequest,
    ) -> Result<(&super::packages::PackageHosting, Option<(usize, Signature)>), ServiceError> {
        let Some(hosting) = self.cfg.packages.as_ref() else {
            return Err(ServiceError::Conflict(super::packages::HOSTING_OFF.into()));
        };
        if !valid_label(&req.name) || !valid_label(&req.version) || req.version.is_empty() {
            return Err(ServiceError::Invalid(
                "name and version: letters, digits and . - _ + ~ only, at most 128 bytes; the version not empty".into(),
            ));
        }
        if !valid_platform(&req.platform) {
            return Err(ServiceError::Invalid(format!(
                "platform `{}` is not os/arch, e.g. linux/amd64",
                req.platform.escape_default()
            )));
        }
        let trust = &hosting.trust;
        let sig = match &req.signature {
            None if trust.allow_unsigned => None,
            None => {
                return Err(ServiceError::Invalid(
                    "the artifact is unsigned, and the trust policy accepts only signed ones (packages.allow_unsigned)".into(),
                ))
            }
            Some(text) => {
                let sig = Signature::decode(text).map_err(|e| {
                    ServiceError::Invalid(format!("the signature is not a minisign signature: {e}"))
                })?;
                // The key whose id the signature names (minisign refuses the others at once).
                let key = trust
                    .keys
                    .iter()
                    .position(|(_, pk)| pk.verify_stream(&sig).is_ok())
                    .ok_or_else(|| {
                        ServiceError::Invalid(
                            "the signature is not by a key the trust policy trusts (packages.trusted_keys), or is a legacy (not prehashed) minisign signature".into(),
                        )
                    })?;
                Some((key, sig))
            }
        };
        let taken =
            self.store.list_artifacts().await?.iter().any(|a| {
                a.name == req.name && a.version == req.version && a.platform == req.platform
            });
        if taken {
            return Err(ServiceError::Conflict(format!(
                "package {:?} version {} for {} was imported before",
                req.name, req.version, req.platform
            )));
        }
        Ok((hosting, sig))
    }

    /// Imports `body` as the artifact `req` describes (see the module docs).
    pub async fn import_artifact<S, E>(
        &self,
        req: ImportRequest,
        body: S,
        author: &str,
    ) -> Result<Artifact, ServiceError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let (hosting, sig) = self.admissible(&req).await?;
        let trust = &hosting.trust;
        let (signer, mut verifier) = match &sig {
            Some((i, sig)) => {
                let (text, pk) = &trust.keys[*i];
                let v = pk
                    .verify_stream(sig)
                    .map_err(|e| ServiceError::Internal(format!("signature check: {e}")))?;
                (Some(text.clone()), Some(v))
            }
            None => (None, None),
        };

        tokio::fs::create_dir_all(&hosting.dir)
            .await
            .map_err(|e| ServiceError::Internal(format!("blob directory: {e}")))?;
        let tmp = hosting
            .dir
            .join(format!(".import-{}", uuid::Uuid::new_v4().simple()));
        let written = async {
            let mut file = tokio::fs::File::create(&tmp)
                .await
                .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
            let mut sha = Sha256::new();
            let mut size: u64 = 0;
            let mut body = std::pin::pin!(body);
            loop {
                // A stalled upload would otherwise hold its API slot for ever.
                let next = tokio::time::timeout(IMPORT_IDLE, body.next())
                    .await
                    .map_err(|_| {
                        ServiceError::Invalid(format!(
                            "no data from the client for {} s: the import is abandoned",
                            IMPORT_IDLE.as_secs()
                        ))
                    })?;
                let Some(chunk) = next else { break };
                let chunk = chunk
                    .map_err(|e| ServiceError::Invalid(format!("reading the artifact: {e}")))?;
                size += chunk.len() as u64;
                if size > hosting.max_artifact_bytes {
                    return Err(ServiceError::Invalid(format!(
                        "the artifact is larger than packages.max_artifact_bytes ({})",
                        hosting.max_artifact_bytes
                    )));
                }
                sha.update(&chunk);
                if let Some(v) = verifier.as_mut() {
                    v.update(&chunk);
                }
                file.write_all(&chunk)
                    .await
                    .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
            }
            file.sync_all()
                .await
                .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
            if let Some(v) = verifier.as_mut() {
                v.finalize().map_err(|_| {
                    ServiceError::Invalid(
                        "the signature does not verify: the artifact is not what was signed".into(),
                    )
                })?;
            }
            Ok::<_, ServiceError>((hex::encode(sha.finalize()), size))
        }
        .await;
        let (sha256, size) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if hosting.blobs_in_store {
            let stored = self.store_blob(&tmp, &sha256).await;
            let _ = tokio::fs::remove_file(&tmp).await;
            stored?;
        } else {
            // The same bytes imported twice land on the same address.
            tokio::fs::rename(&tmp, hosting.dir.join(&sha256))
                .await
                .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
        }
        let artifact = Artifact {
            name: req.name,
            version: req.version,
            platform: req.platform,
            kind: req.kind,
            sha256,
            size,
            signature: req.signature,
            signer,
            author: author.to_owned(),
            created_ms: now_ms(),
        };
        if !self.store.create_artifact(&artifact).await? {
            return Err(ServiceError::Conflict(format!(
                "package {:?} version {} for {} was imported before",
                artifact.name, artifact.version, artifact.platform
            )));
        }
        self.audit_op(
            author,
            "package.import",
            None,
            serde_json::json!({
                "name": artifact.name,
                "version": artifact.version,
                "platform": artifact.platform,
                "sha256": artifact.sha256,
                "size": artifact.size,
                "signer": artifact.signer,
            }),
        )
        .await?;
        self.packages_changed().await;
        Ok(artifact)
    }

    /// Copies the verified file at `path` into the store, piece by piece, before the artifact
    /// row exists: no gateway can be sent for a blob that is not whole.
    async fn store_blob(&self, path: &std::path::Path, sha256: &str) -> Result<(), ServiceError> {
        use tokio::io::AsyncReadExt;
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
        let mut buf = vec![0u8; BLOB_CHUNK_BYTES];
        for index in 0u32.. {
            let mut filled = 0;
            while filled < buf.len() {
                let n = file
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            // An empty last piece is never written: a reader stops at the first short or
            // missing one.
            if filled > 0 {
                self.store
                    .put_blob_chunk(sha256, index, &buf[..filled])
                    .await?;
            }
            if filled < buf.len() {
                break;
            }
        }
        Ok(())
    }
}
