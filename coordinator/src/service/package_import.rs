//! Importing a package artifact: the bytes streamed to a temporary file in the blob
//! directory while their SHA-256 and (for a signed artifact) the signature are checked over
//! the same pass against the operator's trust policy (`package_trust`), and only then moved
//! to their content address (or into the store) and recorded. Nothing is held in memory whole, and a
//! refused import leaves no file behind. Ampora never holds a signing key: it only verifies.

use bytes::Bytes;
use futures::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use shared::now_ms;
use shared::packages::{valid_label, valid_platform, Artifact, PackageKind, BLOB_CHUNK_BYTES};
use tokio::io::AsyncWriteExt;

use super::package_trust::Pending;
use super::{Coordinator, ServiceError};

/// An upload that sends nothing for this long is abandoned.
const IMPORT_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// An artifact about to be imported.
#[derive(Debug, Clone)]
pub struct ImportRequest {
    pub name: String,
    pub version: String,
    pub platform: String,
    pub kind: PackageKind,
    /// The signature file's text: minisign, or cosign (base64, or a Sigstore bundle).
    pub signature: Option<String>,
    /// Hosted by the operator at this URL ([`Coordinator::import_external`]).
    pub url: Option<String>,
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
    ) -> Result<(&super::packages::PackageHosting, Option<Pending>), ServiceError> {
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
        if let Some(url) = &req.url {
            let ok = reqwest::Url::parse(url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            if !ok {
                return Err(ServiceError::Invalid(format!(
                    "url `{}` is not an http(s) URL",
                    url.escape_default()
                )));
            }
        }
        let sig = hosting
            .trust
            .admit(req.signature.as_deref())
            .map_err(ServiceError::Invalid)?;
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

    /// Imports the build the operator hosts at `req.url`: fetched once, streamed through the
    /// same checks as an upload (size, SHA-256, signature), and not kept. Agents are offered
    /// the URL itself; if the file there changes, their hash check fails the install.
    pub async fn import_external(
        &self,
        req: ImportRequest,
        author: &str,
    ) -> Result<Artifact, ServiceError> {
        self.admissible(&req).await?;
        let url = req.url.clone().unwrap_or_default();
        let resp = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| ServiceError::Internal(format!("http client: {e}")))?
            .get(&url)
            .send()
            .await
            .map_err(|e| ServiceError::Invalid(format!("fetching {url}: {e}")))?;
        if !resp.status().is_success() {
            return Err(ServiceError::Invalid(format!(
                "fetching {url}: the server answered {}",
                resp.status()
            )));
        }
        self.import_artifact(req, resp.bytes_stream(), author).await
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
        let mut verifier = hosting
            .trust
            .verifier(&sig)
            .map_err(ServiceError::Internal)?;

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
                verifier.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
            }
            file.sync_all()
                .await
                .map_err(|e| ServiceError::Internal(format!("blob file: {e}")))?;
            let digest = sha.finalize();
            let signer = verifier.finish(&digest).map_err(ServiceError::Invalid)?;
            Ok::<_, ServiceError>((hex::encode(digest), size, signer))
        }
        .await;
        let (sha256, size, signer) = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        if req.url.is_some() {
            // Checked, not kept: agents download it from where the operator hosts it.
            let _ = tokio::fs::remove_file(&tmp).await;
        } else if hosting.blobs_in_store {
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
            url: req.url,
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
                "url": artifact.url,
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
