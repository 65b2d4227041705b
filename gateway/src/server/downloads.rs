//! Package downloads on the agent listener: `GET /v1/packages/<sha256>` serves an artifact
//! Ampora hosts, to the agent holding a download token for exactly that blob
//! (`Authorization: Bearer amp-dl.…`, `shared::download_token`). The bytes come from a local
//! directory of content-addressed files: the embedded default's data directory, or in
//! cluster mode this gateway's cache, filled from the store on a blob's first download
//! (`blob_cache`). They are streamed with `Content-Length`, a strong `ETag` (the blob's
//! SHA-256) and `Range` / 206, never held in memory whole. At most `max_in_flight`
//! downloads are sent at once; the others wait their turn rather than fail (a real client
//! turns any refusal into a failed install). An agent with an identity may present its
//! client certificate instead of the token, in the TLS handshake or through a trusted proxy
//! (as for OpAMP: `auth::presented_chain`): verified against the agent CA and the
//! revocations, it opens any hosted build, since every build is meant for the fleet. The token itself never reaches a log or a
//! metric: refusals are counted by reason, served downloads by status, with their bytes.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, ETAG, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use shared::bus::Bus;
use shared::download_token::{DownloadKey, DownloadRefusal};
use shared::packages::valid_sha256;
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// Where downloads are served from: the path prefix every download URL starts with.
pub const DOWNLOAD_PATH: &str = "/v1/packages";

const DOWNLOADS: &str = "ampora_package_downloads_total";
const DOWNLOAD_BYTES: &str = "ampora_package_download_bytes_total";
const IN_FLIGHT: &str = "ampora_package_downloads_in_flight";
const WAITING: &str = "ampora_package_downloads_waiting";
const OUTCOMES: [&str; 9] = [
    "full",
    "partial",
    "not_found",
    "unavailable",
    "bad_certificate",
    "malformed",
    "other_blob",
    "expired",
    "bad_mac",
];

/// What a gateway needs to serve downloads: the blob directory and the key tokens are
/// checked with.
#[derive(Debug, Clone)]
pub struct Downloads {
    pub dir: PathBuf,
    pub key: DownloadKey,
    /// Blobs not in `dir` are fetched from the store over the bus and kept there (cluster
    /// mode); otherwise `dir` holds every blob (the embedded default).
    pub fetch_missing: bool,
    /// Downloads sent at once by this gateway; more wait for a turn.
    pub max_in_flight: usize,
    /// With `fetch_missing`: the most bytes of blobs kept in `dir`.
    pub cache_max_bytes: u64,
}

/// The route's state: the settings, the cache (when fetching) and the turns.
pub(super) struct Hosted {
    d: Downloads,
    /// The gateway, for its agent CA and proxy trust: a verified client certificate is a
    /// download credential too. `None`: tokens only.
    gateway: Option<Arc<super::Inner>>,
    cache: Option<super::blob_cache::BlobCache>,
    turns: Arc<Semaphore>,
    /// Downloads waiting for a turn now (the gauge is process-wide; this is this gateway's).
    waiting: std::sync::atomic::AtomicUsize,
}

impl Hosted {
    pub(super) fn new(
        d: Downloads,
        gateway: Option<Arc<super::Inner>>,
        bus: Arc<dyn Bus>,
        timeout: std::time::Duration,
    ) -> Self {
        let cache = d.fetch_missing.then(|| {
            super::blob_cache::BlobCache::new(d.dir.clone(), bus, timeout, d.cache_max_bytes)
        });
        let turns = Arc::new(Semaphore::new(
            d.max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
        ));
        Self {
            d,
            gateway,
            cache,
            turns,
            waiting: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Blobs this gateway fetched whole from the store.
    pub(super) fn fetched(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.stored())
    }
}

pub(super) fn describe() {
    metrics::describe_counter!(
        DOWNLOADS,
        "Package download requests, by outcome (full, partial, not_found, unavailable: the store could not be read, or why the credential was refused: malformed, other_blob, expired, bad_mac, bad_certificate)"
    );
    metrics::describe_gauge!(
        WAITING,
        "Package downloads waiting for a turn (packages.max_downloads_per_gateway are sent at once)"
    );
    metrics::gauge!(WAITING).set(0.0);
    metrics::describe_counter!(
        DOWNLOAD_BYTES,
        metrics::Unit::Bytes,
        "Bytes of package artifacts served (Content-Length of full and partial answers)"
    );
    for outcome in OUTCOMES {
        metrics::counter!(DOWNLOADS, "outcome" => outcome).absolute(0);
    }
    metrics::counter!(DOWNLOAD_BYTES).absolute(0);
    metrics::describe_gauge!(
        IN_FLIGHT,
        "Package downloads being sent now (from the answer until its body is sent or dropped)"
    );
    metrics::gauge!(IN_FLIGHT).set(0.0);
}

/// Counts one download in flight for as long as it lives.
struct InFlight;

impl InFlight {
    fn start() -> Self {
        metrics::gauge!(IN_FLIGHT).increment(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        metrics::gauge!(IN_FLIGHT).decrement(1.0);
    }
}

pub(super) fn router(hosted: Arc<Hosted>) -> Router {
    Router::new()
        .route(&format!("{DOWNLOAD_PATH}/{{sha256}}"), get(serve))
        .with_state(hosted)
}

/// Counts one download waiting for its turn for as long as it waits.
struct Waiting<'a>(&'a Hosted);

impl<'a> Waiting<'a> {
    fn start(h: &'a Hosted) -> Self {
        metrics::gauge!(WAITING).increment(1.0);
        h.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(h)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        metrics::gauge!(WAITING).decrement(1.0);
        self.0
            .waiting
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn refused(why: DownloadRefusal) -> Response {
    metrics::counter!(DOWNLOADS, "outcome" => why.reason()).increment(1);
    (
        StatusCode::UNAUTHORIZED,
        [(WWW_AUTHENTICATE, "Bearer")],
        format!("download refused: {why}\n"),
    )
        .into_response()
}

async fn serve(State(h): State<Arc<Hosted>>, Path(sha256): Path<String>, req: Request) -> Response {
    if !valid_sha256(&sha256) {
        metrics::counter!(DOWNLOADS, "outcome" => "not_found").increment(1);
        return (StatusCode::NOT_FOUND, "no such artifact\n").into_response();
    }
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let certificate = h
        .gateway
        .as_ref()
        .filter(|_| token.is_empty())
        .and_then(|g| {
            let origin =
                super::auth::origin_of(&g.cfg.trusted_proxies, g.cfg.proxy_secret.as_ref(), &req);
            let chain = super::auth::presented_chain(g, &req, &origin)?;
            Some((g.cfg.identity.clone()?, chain))
        });
    let uid = match certificate {
        Some((trust, chain)) => match trust.verify(&chain) {
            Ok(id) => id.uid,
            Err(why) => {
                metrics::counter!(DOWNLOADS, "outcome" => "bad_certificate").increment(1);
                return (
                    StatusCode::UNAUTHORIZED,
                    format!("download refused: client certificate {}\n", why.as_str()),
                )
                    .into_response();
            }
        },
        None => match h.d.key.verify(token.trim(), &sha256, now_secs()) {
            Ok(uid) => uid,
            Err(why) => return refused(why),
        },
    };
    // The turn is taken before the cache is filled, so a cold cache never has more readers
    // of the store than downloads allowed at once.
    let turn = {
        let _waiting = Waiting::start(&h);
        match h.turns.clone().acquire_owned().await {
            Ok(t) => t,
            Err(_) => return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response(),
        }
    };
    if let Some(cache) = &h.cache {
        match cache.ensure(&sha256).await {
            Ok(super::blob_cache::Cached::Present) => {}
            Ok(super::blob_cache::Cached::NotFound) => {
                metrics::counter!(DOWNLOADS, "outcome" => "not_found").increment(1);
                return (StatusCode::NOT_FOUND, "no such artifact\n").into_response();
            }
            Err(e) => {
                tracing::warn!(sha256 = %sha256, error = %e, "filling the download cache failed");
                metrics::counter!(DOWNLOADS, "outcome" => "unavailable").increment(1);
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    [(http::header::RETRY_AFTER, "5")],
                    "the artifact cannot be read now\n",
                )
                    .into_response();
            }
        }
    }
    let path = h.d.dir.join(&sha256);
    if !tokio::fs::try_exists(&path).await.unwrap_or(false) {
        metrics::counter!(DOWNLOADS, "outcome" => "not_found").increment(1);
        return (StatusCode::NOT_FOUND, "no such artifact\n").into_response();
    }
    // tower-http answers Range (206, 416), HEAD and the length; the file is streamed in its
    // 64 KiB steps. 256 KiB steps were faster with 500 downloads at once (1.84x nginx's time
    // against 2.80x) but tripled the server's peak RSS (BENCHMARKS.md, "Agent packages").
    let served = tower_http::services::ServeFile::new(&path)
        .oneshot(req)
        .await;
    let in_flight = InFlight::start();
    let mut res = match served {
        // The body owns the count and the turn: both end when the body is sent whole or
        // dropped.
        Ok(res) => res.map(|b| {
            axum::body::Body::new(http_body_util::BodyExt::map_frame(b, move |f| {
                let _ = (&in_flight, &turn);
                f
            }))
        }),
        Err(e) => match e {},
    };
    let outcome = match res.status() {
        StatusCode::OK => "full",
        StatusCode::PARTIAL_CONTENT => "partial",
        _ => {
            return res;
        }
    };
    let bytes = res
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    metrics::counter!(DOWNLOADS, "outcome" => outcome).increment(1);
    metrics::counter!(DOWNLOAD_BYTES).increment(bytes);
    tracing::debug!(instance_uid = %uid, sha256 = %sha256, outcome, bytes, "package download");
    if let Ok(etag) = HeaderValue::from_str(&format!("\"{sha256}\"")) {
        res.headers_mut().insert(ETAG, etag);
    }
    res
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use http_body_util::BodyExt;
    use shared::bus::InProcessBus;
    use shared::ids::InstanceUid;

    use super::*;

    fn get(sha: &str, token: &str) -> Request {
        Request::builder()
            .uri(format!("{DOWNLOAD_PATH}/{sha}"))
            .header(AUTHORIZATION, format!("Bearer {token}"))
            .body(axum::body::Body::empty())
            .expect("request")
    }

    /// With one turn, a second download waits until the first one's body is done, then is
    /// served whole: a cap queues, it never refuses.
    #[tokio::test]
    async fn downloads_beyond_the_cap_wait_for_a_turn() {
        let dir = tempfile::tempdir().expect("dir");
        let data = vec![7u8; 300_000];
        let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
        std::fs::write(dir.path().join(&sha), &data).expect("blob");
        let key = DownloadKey::new([3; 32]);
        let hosted = Arc::new(Hosted::new(
            Downloads {
                dir: dir.path().to_path_buf(),
                key: key.clone(),
                fetch_missing: false,
                max_in_flight: 1,
                cache_max_bytes: u64::MAX,
            },
            None,
            Arc::new(InProcessBus::new()),
            std::time::Duration::from_secs(5),
        ));
        let app = router(hosted.clone());
        let token = key.mint(InstanceUid::new_v7(), &sha, now_secs() + 60);

        let first = app.clone().oneshot(get(&sha, &token)).await.expect("first");
        assert_eq!(first.status(), StatusCode::OK);
        let second = tokio::spawn(app.oneshot(get(&sha, &token)));
        // The second is parked on the turn the unread first body holds.
        let parked = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            while hosted.waiting.load(Ordering::Relaxed) == 0 {
                tokio::task::yield_now().await;
            }
        });
        assert!(parked.await.is_ok(), "the second download never waited");
        assert!(!second.is_finished());
        let body = first.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.len(), data.len());
        let second = second.await.expect("task").expect("second");
        assert_eq!(second.status(), StatusCode::OK);
        let body = second.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body.as_ref(), data.as_slice());
        assert_eq!(hosted.waiting.load(Ordering::Relaxed), 0);
    }
}
