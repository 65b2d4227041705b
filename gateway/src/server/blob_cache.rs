//! A gateway's disk cache of hosted package artifacts in cluster mode, where the blobs live in
//! the store: the first download of a blob on this gateway fetches it piece by piece from the
//! coordinators over the bus ([`CoordinatorRequest::BlobChunk`]) into a temporary file,
//! checks its SHA-256 against its address, and renames it into place; every later download
//! is served from the file. Concurrent first downloads of one blob wait for a single fetch,
//! so 100,000 agents cost the store one read of each blob per gateway. A fetch that fails
//! (store down, bytes that do not hash to the address) leaves nothing behind; the next
//! download tries again. The cache keeps at most `max_bytes`: after a fetch, the blobs
//! served least recently (by modification time, which each download refreshes) are removed
//! until it fits, never the one just fetched. A download already reading a removed blob
//! finishes (the file stays open); the next one fetches it again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use shared::bus::{BlobChunk, Bus, CoordinatorReply, CoordinatorRequest, Route};
use shared::packages::BLOB_CHUNK_BYTES;
use tokio::io::AsyncWriteExt;

use super::latency;

/// After a failed fetch, downloads of that blob fail at once for this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(2);

const FETCHES: &str = "ampora_gateway_blob_fetches_total";
const EVICTIONS: &str = "ampora_gateway_blob_cache_evictions_total";
const FETCH_BYTES: &str = "ampora_gateway_blob_fetch_bytes_total";
const OUTCOMES: [&str; 4] = ["stored", "not_found", "corrupt", "unavailable"];

pub(super) fn describe() {
    metrics::describe_counter!(
        FETCHES,
        "Blobs this gateway fetched from the store into its download cache, by outcome (stored, not_found, corrupt: the bytes did not hash to the address, unavailable)"
    );
    metrics::describe_counter!(
        FETCH_BYTES,
        metrics::Unit::Bytes,
        "Bytes of blobs fetched from the store into this gateway's download cache"
    );
    for outcome in OUTCOMES {
        metrics::counter!(FETCHES, "outcome" => outcome).absolute(0);
    }
    metrics::counter!(FETCH_BYTES).absolute(0);
    metrics::describe_counter!(
        EVICTIONS,
        "Blobs removed from this gateway's download cache to keep it under packages.cache_max_bytes"
    );
    metrics::counter!(EVICTIONS).absolute(0);
}

/// Whether a blob is in the cache after [`BlobCache::ensure`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Cached {
    Present,
    /// The store has no such blob.
    NotFound,
}

pub(super) struct BlobCache {
    dir: PathBuf,
    bus: Arc<dyn Bus>,
    timeout: Duration,
    max_bytes: u64,
    /// One lock per blob being (or once) fetched: the single-flight. It holds when the last
    /// fetch failed, so the downloads that waited on it fail at once rather than each trying
    /// again in turn. A few entries per imported version; never pruned.
    fills: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<Instant>>>>>,
    /// Blobs fetched whole into the cache by this gateway.
    stored: AtomicU64,
}

impl BlobCache {
    /// A cache in `dir`; temporary files of fetches a crash cut short are removed.
    pub(super) fn new(dir: PathBuf, bus: Arc<dyn Bus>, timeout: Duration, max_bytes: u64) -> Self {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(".fetch-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        Self {
            dir,
            bus,
            timeout,
            max_bytes,
            fills: Mutex::default(),
            stored: AtomicU64::new(0),
        }
    }

    pub(super) fn stored(&self) -> u64 {
        self.stored.load(Ordering::Relaxed)
    }

    /// Makes sure `<dir>/<sha256>` holds the blob, fetching it if no other download has.
    /// `Err`: the store could not be read now (or sent bytes that are not the blob).
    pub(super) async fn ensure(&self, sha256: &str) -> Result<Cached, String> {
        let path = self.dir.join(sha256);
        if touch(&path).await {
            return Ok(Cached::Present);
        }
        let fill = self
            .fills
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(sha256.to_owned())
            .or_default()
            .clone();
        let mut turn = fill.lock().await;
        // Whoever held the turn before may have fetched it, or just failed to.
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            return Ok(Cached::Present);
        }
        if turn.is_some_and(|failed| failed.elapsed() < RETRY_AFTER_FAILURE) {
            return Err("the store could not be read a moment ago".into());
        }
        let outcome = self.fetch(sha256, &path).await;
        *turn = outcome.is_err().then(Instant::now);
        let label = match &outcome {
            Ok(Cached::Present) => "stored",
            Ok(Cached::NotFound) => "not_found",
            Err(Fault::Corrupt) => "corrupt",
            Err(Fault::Unavailable(_)) => "unavailable",
        };
        metrics::counter!(FETCHES, "outcome" => label).increment(1);
        if outcome == Ok(Cached::Present) {
            self.stored.fetch_add(1, Ordering::Relaxed);
            let (dir, max, keep) = (self.dir.clone(), self.max_bytes, sha256.to_owned());
            let removed = tokio::task::spawn_blocking(move || evict(&dir, max, &keep))
                .await
                .unwrap_or(0);
            metrics::counter!(EVICTIONS).increment(removed);
        }
        outcome.map_err(|f| match f {
            Fault::Corrupt => "the stored blob does not hash to its address".to_owned(),
            Fault::Unavailable(e) => e,
        })
    }

    async fn fetch(&self, sha256: &str, path: &Path) -> Result<Cached, Fault> {
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(|e| Fault::Unavailable(format!("cache directory: {e}")))?;
        let tmp = self
            .dir
            .join(format!(".fetch-{}", uuid::Uuid::new_v4().simple()));
        let res = self.fetch_into(sha256, &tmp).await;
        match res {
            Ok(true) => tokio::fs::rename(&tmp, path)
                .await
                .map(|()| Cached::Present)
                .map_err(|e| Fault::Unavailable(format!("cache file: {e}"))),
            Ok(false) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Ok(Cached::NotFound)
            }
            Err(f) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(f)
            }
        }
    }

    /// Writes the blob's pieces to `tmp`; false if the store has none of it.
    async fn fetch_into(&self, sha256: &str, tmp: &Path) -> Result<bool, Fault> {
        let io = |e: std::io::Error| Fault::Unavailable(format!("cache file: {e}"));
        let mut file = tokio::fs::File::create(tmp).await.map_err(io)?;
        let mut hash = Sha256::new();
        for index in 0u32.. {
            let req = CoordinatorRequest::BlobChunk {
                sha256: sha256.to_owned(),
                index,
            };
            let reply = tokio::time::timeout(
                self.timeout,
                latency::bus_request(&*self.bus, Route::Any, req),
            )
            .await;
            let bytes = match reply {
                Ok(Ok(CoordinatorReply::BlobChunk(BlobChunk::Bytes(b)))) => b,
                Ok(Ok(CoordinatorReply::BlobChunk(BlobChunk::Missing))) if index == 0 => {
                    return Ok(false)
                }
                // The blob was an exact number of pieces long.
                Ok(Ok(CoordinatorReply::BlobChunk(BlobChunk::Missing))) => break,
                Ok(Ok(CoordinatorReply::BlobChunk(BlobChunk::Error(e)))) => {
                    return Err(Fault::Unavailable(format!("store: {e}")))
                }
                Ok(Ok(_)) => return Err(Fault::Unavailable("unexpected reply".into())),
                Ok(Err(e)) => return Err(Fault::Unavailable(format!("bus: {e}"))),
                Err(_) => return Err(Fault::Unavailable("bus: timed out".into())),
            };
            hash.update(&bytes);
            file.write_all(&bytes).await.map_err(io)?;
            metrics::counter!(FETCH_BYTES).increment(bytes.len() as u64);
            if bytes.len() < BLOB_CHUNK_BYTES {
                break;
            }
        }
        file.sync_all().await.map_err(io)?;
        if hex::encode(hash.finalize()) != sha256 {
            return Err(Fault::Corrupt);
        }
        Ok(true)
    }
}

/// Marks a cached blob as just used (its modification time); false if it is not cached.
async fn touch(path: &Path) -> bool {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .is_ok()
    })
    .await
    .unwrap_or(false)
}

/// Removes the least recently used blobs of `dir` (never `keep`) until the rest fit in
/// `max` bytes; returns how many were removed.
fn evict(dir: &Path, max: u64, keep: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut blobs: Vec<(std::time::SystemTime, u64, PathBuf)> = entries
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((m.modified().ok()?, m.len(), e.path()))
        })
        .collect();
    let mut total: u64 = blobs.iter().map(|(_, len, _)| len).sum();
    blobs.sort();
    let mut removed = 0;
    for (_, len, path) in blobs {
        if total <= max {
            break;
        }
        if path.file_name().is_some_and(|n| n == keep) {
            continue;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
            removed += 1;
        }
    }
    removed
}

#[derive(Debug, PartialEq, Eq)]
enum Fault {
    Corrupt,
    Unavailable(String),
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::evict;

    #[test]
    fn the_least_recently_used_blobs_go_first_never_the_new_one() {
        let dir = tempfile::tempdir().expect("dir");
        let now = SystemTime::now();
        // Oldest first: a, b, c, then d (just fetched, and the oldest mtime of all would
        // not matter: it is kept).
        for (name, age) in [("a", 40), ("b", 30), ("c", 20), ("d", 50)] {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![0u8; 100]).expect("write");
            std::fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_modified(now - Duration::from_secs(age)))
                .expect("mtime");
        }
        std::fs::write(dir.path().join(".fetch-x"), vec![0u8; 1000]).expect("temp");
        assert_eq!(evict(dir.path(), 250, "d"), 2);
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".fetch-x", "c", "d"]);
        assert_eq!(evict(dir.path(), 1000, "d"), 0, "under the limit");
    }
}
