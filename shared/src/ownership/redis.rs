//! Ownership in Redis, for cluster mode: every gateway and coordinator sees the same table.
//!
//! # Keys
//! - `<prefix>:own:<uid>` (the uid as a hyphenated UUID) holds the owner as
//!   `<epoch>:<gateway id>`, e.g. `1718000000000123:gw-7`, with a TTL. The epoch comes first
//!   because it never contains a colon and gateway ids may. The encoding is canonical (decimal
//!   without sign or leading zeros), so "holds exactly this (gateway, epoch)" is a plain string
//!   comparison inside the scripts. Anything that does not decode and re-encode to the same
//!   bytes is malformed: logged and treated as no owner, never a panic.
//! - `<prefix>:own:epoch` is the epoch counter shared by the whole cluster. It has no TTL.
//!
//! # Scripts
//! Each operation that reads and writes is one Lua script, so it is atomic in Redis
//! ([`redis::Script`] sends `EVALSHA` and falls back to loading the script after a restart):
//! - claim: draw an epoch, read the previous owner, write the new one with `PX ttl`;
//! - release: delete only if the value is exactly the caller's `(gateway, epoch)`;
//! - refresh: for each key of a batch, `PEXPIRE` only if the value is exactly the caller's,
//!   and return the positions of the others.
//!
//! Lookups are a plain `GET`, or an `MGET` per [`LOOKUP_BATCH`] uids for `lookup_many`
//! (several batches pipelined like refreshes). All keys of a claim or a refresh batch are touched by one
//! script, so this targets one Redis primary (standalone or Sentinel), not Redis Cluster.
//!
//! # Epochs and fencing
//! Epochs fence deliveries: a gateway drops a delivery addressed to an epoch it does not hold.
//! That is only safe if an epoch is never handed out twice, even after Redis restarts and lost
//! data. Epochs are therefore Redis server microseconds, kept strictly increasing by the
//! counter: a claim computes `max(INCR counter, now_us)` and stores the result back. On first
//! use, and after a restart that lost the counter, this seeds it from the clock; after a
//! restart that restored an older snapshot (or a failover to a lagging replica) it jumps
//! forward to the clock instead of re-issuing epochs from the past. Epochs handed out before
//! the restart were at most the time they were handed out (plus one per claim beyond a million
//! claims a second), so the new ones are larger as long as the server clock did not go back by
//! more than the restart took. A plain counter seeded only when missing would get the first
//! case right but re-issue epochs in the second. Redis' own `TIME` is used rather than each
//! gateway's clock so that skew between gateways cannot matter. Values stay below 2^53, so
//! Lua's doubles hold them exactly (until the year 2255).
//!
//! # TTL and refresh
//! A claim lives for `ttl` unless refreshed; a gateway that dies loses its agents after at
//! most `ttl`. Gateways call [`Ownership::refresh`] for all their agents every `ttl / 3`, so
//! one slow round trip does not expire anything. A refresh is split into batches of
//! [`REFRESH_BATCH`] entries, one script call each, with up to [`REFRESH_CONCURRENCY`] batches
//! in flight on the multiplexed connection: 100k agents cost 100 script calls, not 100k round
//! trips, and no call keeps Redis (single-threaded) busy for more than a few milliseconds. The
//! cost on Redis is a few microseconds per entry, so the TTL sets the bill: 100k agents at a
//! 30 s TTL (refreshed every 10 s) are 10k entries a second.

use std::fmt;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::Script;
use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};

use super::{Claim, Owner, Ownership, OwnershipError};
use crate::ids::{GatewayId, InstanceUid};

/// Entries per refresh script call: large enough that 100k agents take 100 calls, small enough
/// that one call blocks Redis (single-threaded) for a few milliseconds at most.
pub const REFRESH_BATCH: usize = 1_000;

/// Keys per `MGET` of [`Ownership::lookup_many`]: one round trip for a rollout's thousand
/// pushes, while no single command keeps Redis busy for long.
pub const LOOKUP_BATCH: usize = 1_000;

/// Refresh batches in flight at once. They share the one multiplexed connection, so this
/// pipelines them and hides round-trip latency without flooding Redis.
pub const REFRESH_CONCURRENCY: usize = 4;

/// Bound on establishing a connection and on waiting for any one reply, so a hung Redis turns
/// into an error the gateway can act on instead of a stuck claim or refresh.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff (milliseconds): a few quick attempts, none more than a second apart,
/// so callers during an outage get errors promptly rather than after a long exponential wait.
const RECONNECT_RETRIES: usize = 5;
const RECONNECT_MAX_DELAY_MS: u64 = 1_000;

/// Longest malformed value quoted in a log line.
const LOGGED_VALUE_BYTES: usize = 64;

/// KEYS[1] the epoch counter, KEYS[2] the owner key; ARGV[1] the gateway id, ARGV[2] the TTL
/// in milliseconds. Returns `{epoch, previous value or nil}`.
const CLAIM_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local epoch = redis.call('INCR', KEYS[1])
if epoch < now then
  -- First use, lost counter, or restored older snapshot: never reuse an epoch from the past.
  epoch = now
  redis.call('SET', KEYS[1], string.format('%.0f', epoch))
end
local previous = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], string.format('%.0f', epoch) .. ':' .. ARGV[1], 'PX', ARGV[2])
return {epoch, previous}
";

/// KEYS[1] the owner key; ARGV[1] the exact value to delete. Returns 1 if deleted, else 0.
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// KEYS[i] owner keys; ARGV[1] the TTL in milliseconds, ARGV[i + 1] the value the caller
/// believes KEYS[i] holds. Extends the TTL of the keys that hold exactly that; returns the
/// (1-based) positions of the others.
const REFRESH_SCRIPT: &str = r"
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  else
    lost[#lost + 1] = i
  end
end
return lost
";

/// [`Ownership`] in Redis with TTLs; see the module docs for keys, scripts and fencing.
///
/// Cheap to clone: clones share one multiplexed connection, which reconnects by itself after
/// Redis restarts (calls made while it is down fail with [`OwnershipError`]).
#[derive(Clone)]
pub struct RedisOwnership {
    conn: ConnectionManager,
    /// `<prefix>:own:` — every key is this plus a uid, or `epoch`.
    key_base: String,
    epoch_key: String,
    ttl: Duration,
    /// `ttl` in whole milliseconds (at least 1), as `PX` / `PEXPIRE` take it.
    ttl_ms: u64,
    claim_script: Script,
    release_script: Script,
    refresh_script: Script,
}

impl fmt::Debug for RedisOwnership {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisOwnership")
            .field("key_base", &self.key_base)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl RedisOwnership {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`) and fails if Redis is not reachable.
    /// Claims expire `ttl` after their claim or last refresh; `ttl` must be at least 1 ms.
    pub async fn connect(
        url: &str,
        key_prefix: &str,
        ttl: Duration,
    ) -> Result<Self, OwnershipError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        if ttl_ms == 0 {
            return Err(OwnershipError("ownership ttl must be at least 1 ms".into()));
        }
        let client = ::redis::Client::open(url)
            .map_err(|e| OwnershipError(format!("invalid redis url: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY_MS);
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| OwnershipError(format!("connecting to redis: {e}")))?;
        let key_base = format!("{key_prefix}:own:");
        Ok(Self {
            conn,
            epoch_key: format!("{key_base}epoch"),
            key_base,
            ttl,
            ttl_ms,
            claim_script: Script::new(CLAIM_SCRIPT),
            release_script: Script::new(RELEASE_SCRIPT),
            refresh_script: Script::new(REFRESH_SCRIPT),
        })
    }

    /// How long a claim lives without a refresh; gateways refresh every third of it.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn owner_key(&self, uid: InstanceUid) -> String {
        format!("{}{uid}", self.key_base)
    }

    /// Decodes a stored owner; anything malformed is logged and read as no owner, so a bad
    /// value (another writer, a manual edit) cannot wedge an agent: the next claim overwrites it.
    fn decode_logged(&self, uid: InstanceUid, raw: Option<Vec<u8>>) -> Option<Owner> {
        let raw = raw?;
        let owner = decode(&raw);
        if owner.is_none() {
            let shown = &raw[..raw.len().min(LOGGED_VALUE_BYTES)];
            tracing::warn!(
                %uid,
                key = %self.owner_key(uid),
                value = %String::from_utf8_lossy(shown),
                len = raw.len(),
                "malformed ownership value in redis; treating as no owner"
            );
        }
        owner
    }

    /// One `MGET` for up to [`LOOKUP_BATCH`] uids; the owners in the same order.
    async fn lookup_batch(
        &self,
        batch: &[InstanceUid],
    ) -> Result<Vec<Option<Owner>>, OwnershipError> {
        let mut mget = ::redis::cmd("MGET");
        for uid in batch {
            mget.arg(self.owner_key(*uid));
        }
        let raw: Vec<Option<Vec<u8>>> = mget
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| OwnershipError(format!("looking up ownership in redis: {e}")))?;
        if raw.len() != batch.len() {
            return Err(OwnershipError(format!(
                "redis MGET returned {} values for {} keys",
                raw.len(),
                batch.len()
            )));
        }
        Ok(batch
            .iter()
            .zip(raw)
            .map(|(uid, raw)| self.decode_logged(*uid, raw))
            .collect())
    }

    /// One script call for up to [`REFRESH_BATCH`] entries; returns the lost uids.
    async fn refresh_batch(
        &self,
        batch: &[(InstanceUid, Owner)],
    ) -> Result<Vec<InstanceUid>, OwnershipError> {
        let mut invocation = self.refresh_script.prepare_invoke();
        invocation.arg(self.ttl_ms);
        for (uid, owner) in batch {
            invocation.key(self.owner_key(*uid)).arg(encode(owner));
        }
        let lost: Vec<usize> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| OwnershipError(format!("refreshing ownership in redis: {e}")))?;
        lost.into_iter()
            .map(|position| {
                position
                    .checked_sub(1)
                    .and_then(|i| batch.get(i))
                    .map(|(uid, _)| *uid)
                    .ok_or_else(|| {
                        OwnershipError(format!(
                            "redis refresh returned position {position} for a batch of {}",
                            batch.len()
                        ))
                    })
            })
            .collect()
    }
}

#[async_trait]
impl Ownership for RedisOwnership {
    async fn claim(&self, uid: InstanceUid, gateway: &GatewayId) -> Result<Claim, OwnershipError> {
        let (epoch, previous): (u64, Option<Vec<u8>>) = self
            .claim_script
            .key(&self.epoch_key)
            .key(self.owner_key(uid))
            .arg(&gateway.0)
            .arg(self.ttl_ms)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| OwnershipError(format!("claiming ownership in redis: {e}")))?;
        Ok(Claim {
            epoch,
            previous: self.decode_logged(uid, previous),
        })
    }

    async fn lookup(&self, uid: InstanceUid) -> Result<Option<Owner>, OwnershipError> {
        let raw: Option<Vec<u8>> = ::redis::cmd("GET")
            .arg(self.owner_key(uid))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(|e| OwnershipError(format!("looking up ownership in redis: {e}")))?;
        Ok(self.decode_logged(uid, raw))
    }

    /// `MGET` per [`LOOKUP_BATCH`] uids, a few batches in flight at once.
    async fn lookup_many(
        &self,
        uids: &[InstanceUid],
    ) -> Result<Vec<Option<Owner>>, OwnershipError> {
        // Built up front for the same `Send` reason as in `refresh`; `buffered` keeps order.
        let batches: Vec<_> = uids
            .chunks(LOOKUP_BATCH)
            .map(|batch| self.lookup_batch(batch))
            .collect();
        let owners: Vec<Vec<Option<Owner>>> = futures::stream::iter(batches)
            .buffered(REFRESH_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(owners.concat())
    }

    async fn release(&self, uid: InstanceUid, owner: &Owner) -> Result<bool, OwnershipError> {
        let deleted: u64 = self
            .release_script
            .key(self.owner_key(uid))
            .arg(encode(owner))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(|e| OwnershipError(format!("releasing ownership in redis: {e}")))?;
        Ok(deleted > 0)
    }

    async fn refresh(
        &self,
        held: &[(InstanceUid, Owner)],
    ) -> Result<Vec<InstanceUid>, OwnershipError> {
        // The futures are built up front (they do nothing until polled) because a closure in
        // the stream type trips the compiler's `Send` check of the `async_trait` future.
        // `buffered` keeps batch order, so the lost uids come back in `held` order.
        let batches: Vec<_> = held
            .chunks(REFRESH_BATCH)
            .map(|batch| self.refresh_batch(batch))
            .collect();
        let lost: Vec<Vec<InstanceUid>> = futures::stream::iter(batches)
            .buffered(REFRESH_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(lost.concat())
    }
}

/// `<epoch>:<gateway id>`, the one encoding the scripts compare byte for byte.
fn encode(owner: &Owner) -> String {
    format!("{}:{}", owner.epoch, owner.gateway)
}

/// The inverse of [`encode`]; `None` unless `raw` is exactly what `encode` would produce.
fn decode(raw: &[u8]) -> Option<Owner> {
    let text = std::str::from_utf8(raw).ok()?;
    let (epoch, gateway) = text.split_once(':')?;
    let owner = Owner {
        gateway: GatewayId(gateway.to_owned()),
        epoch: epoch.parse().ok()?,
    };
    // Rejects `+5`, `05` and the like, which parse but would never match in a script.
    (encode(&owner) == text).then_some(owner)
}

#[cfg(test)]
mod tests {
    /// Pause between two lookups while waiting for an expiry.
    const LOOKUP_POLL: Duration = Duration::from_millis(20);

    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::ownership::conformance;

    /// Claims in conformance runs must not expire mid-run.
    const LONG_TTL: Duration = Duration::from_secs(60);

    fn redis_url() -> String {
        std::env::var("AMPORA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    /// Connects with a fresh key prefix, so tests neither see each other's keys nor share an
    /// epoch counter. Fails loudly when Redis is not there: these tests must not pass silently.
    async fn connect(ttl: Duration) -> RedisOwnership {
        connect_prefix(
            &format!("ampora-test-{}", uuid::Uuid::new_v4().simple()),
            ttl,
        )
        .await
    }

    async fn connect_prefix(prefix: &str, ttl: Duration) -> RedisOwnership {
        let url = redis_url();
        RedisOwnership::connect(&url, prefix, ttl)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "redis is required for these tests and is not reachable at {url} \
                     (start it, or set AMPORA_TEST_REDIS_URL): {e}"
                )
            })
    }

    /// Deletes every key of this instance's prefix (the epoch counter never expires by itself).
    async fn cleanup(own: &RedisOwnership) {
        let mut conn = own.conn.clone();
        let pattern = format!("{}*", own.key_base);
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = ::redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .expect("scan");
            if !keys.is_empty() {
                let _: u64 = ::redis::cmd("DEL")
                    .arg(&keys)
                    .query_async(&mut conn)
                    .await
                    .expect("del");
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }

    async fn set_raw(own: &RedisOwnership, key: &str, value: &[u8]) {
        let _: () = ::redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut own.conn.clone())
            .await
            .expect("set");
    }

    /// Polls `lookup` until it returns `want` or `within` passes; returns whether it did.
    async fn lookup_becomes(
        own: &RedisOwnership,
        uid: InstanceUid,
        want: Option<&Owner>,
        within: Duration,
    ) -> bool {
        crate::testing::poll(within, LOOKUP_POLL, || async move {
            (own.lookup(uid).await.expect("lookup").as_ref() == want).then_some(())
        })
        .await
        .is_some()
    }

    #[test]
    fn encoding_round_trips_and_rejects_non_canonical_values() {
        let owner = Owner {
            gateway: GatewayId("gw:with:colons".into()),
            epoch: 1_718_000_000_000_123,
        };
        assert_eq!(encode(&owner), "1718000000000123:gw:with:colons");
        assert_eq!(decode(encode(&owner).as_bytes()), Some(owner));
        for bad in [
            &b"garbage"[..],
            b"",
            b":gw",
            b"12x:gw",
            b"+12:gw",
            b"012:gw",
            b"-1:gw",
            b"99999999999999999999999:gw",
            b"12:\xff\xfe",
        ] {
            assert_eq!(decode(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn redis_ownership_conforms() {
        let own = connect(LONG_TTL).await;
        conformance(Arc::new(own.clone())).await;
        cleanup(&own).await;
    }

    #[tokio::test]
    async fn zero_ttl_is_refused() {
        let err = RedisOwnership::connect(&redis_url(), "ampora-test", Duration::from_micros(10))
            .await
            .expect_err("a ttl below 1 ms must be refused");
        assert!(err.0.contains("ttl"), "{err}");
    }

    #[tokio::test]
    async fn unclaimed_claim_expires_after_its_ttl() {
        let ttl = Duration::from_millis(300);
        let own = connect(ttl).await;
        let uid = InstanceUid::new_v7();
        let gw = GatewayId("gw-a".into());
        let claim = own.claim(uid, &gw).await.expect("claim");
        let owner = Owner {
            gateway: gw,
            epoch: claim.epoch,
        };
        assert_eq!(own.lookup(uid).await.expect("lookup"), Some(owner.clone()));
        assert!(
            lookup_becomes(&own, uid, None, ttl * 10).await,
            "claim still present long after its ttl"
        );
        assert_eq!(
            own.refresh(&[(uid, owner.clone())]).await.expect("refresh"),
            vec![uid],
            "an expired claim is lost"
        );
        // An expired claim is no previous owner, and the epoch still grows.
        let next = own
            .claim(uid, &GatewayId("gw-b".into()))
            .await
            .expect("claim");
        assert_eq!(next.previous, None);
        assert!(next.epoch > owner.epoch);
        cleanup(&own).await;
    }

    #[tokio::test]
    async fn refreshed_claim_outlives_its_ttl() {
        let ttl = Duration::from_millis(500);
        let own = connect(ttl).await;
        let uid = InstanceUid::new_v7();
        let gw = GatewayId("gw-a".into());
        let claim = own.claim(uid, &gw).await.expect("claim");
        let held = [(
            uid,
            Owner {
                gateway: gw,
                epoch: claim.epoch,
            },
        )];
        // Refresh well within the ttl for three ttls; the claim must never lapse. The sleep
        // is the refresh cadence under test, not a wait for some other event.
        let until = Instant::now() + ttl * 3;
        while Instant::now() < until {
            assert_eq!(own.refresh(&held).await.expect("refresh"), Vec::new());
            assert_eq!(
                own.lookup(uid).await.expect("lookup").as_ref(),
                Some(&held[0].1)
            );
            tokio::time::sleep(ttl / 5).await;
        }
        // And once refreshes stop, it does expire.
        assert!(lookup_becomes(&own, uid, None, ttl * 10).await);
        cleanup(&own).await;
    }

    #[tokio::test]
    async fn malformed_values_read_as_no_owner() {
        let own = connect(LONG_TTL).await;
        let gw = GatewayId("gw-a".into());
        for garbage in [&b"garbage"[..], b"12x:gw-a", b"007:gw-a", b"\xff\x00"] {
            let uid = InstanceUid::new_v7();
            set_raw(&own, &own.owner_key(uid), garbage).await;
            assert_eq!(own.lookup(uid).await.expect("lookup"), None);
            assert_eq!(
                own.lookup_many(&[uid]).await.expect("lookup_many"),
                vec![None]
            );
            // Not held by anyone: refresh reports it lost, release finds nothing to release.
            let pretend = Owner {
                gateway: gw.clone(),
                epoch: 7,
            };
            assert_eq!(
                own.refresh(&[(uid, pretend.clone())])
                    .await
                    .expect("refresh"),
                vec![uid]
            );
            assert!(!own.release(uid, &pretend).await.expect("release"));
            // A claim overwrites it and reports no previous owner.
            let claim = own.claim(uid, &gw).await.expect("claim");
            assert_eq!(claim.previous, None);
            assert_eq!(
                own.lookup(uid).await.expect("lookup"),
                Some(Owner {
                    gateway: gw.clone(),
                    epoch: claim.epoch
                })
            );
        }
        cleanup(&own).await;
    }

    #[tokio::test]
    async fn instances_sharing_a_prefix_share_owners_and_epochs() {
        let prefix = format!("ampora-test-{}", uuid::Uuid::new_v4().simple());
        let one = connect_prefix(&prefix, LONG_TTL).await;
        let two = connect_prefix(&prefix, LONG_TTL).await;
        let uid = InstanceUid::new_v7();
        let mut last = 0;
        for round in 0..20 {
            let (own, other, gw) = if round % 2 == 0 {
                (&one, &two, "gw-one")
            } else {
                (&two, &one, "gw-two")
            };
            let claim = own.claim(uid, &GatewayId(gw.into())).await.expect("claim");
            assert!(claim.epoch > last, "epoch {} after {last}", claim.epoch);
            last = claim.epoch;
            assert_eq!(
                other.lookup(uid).await.expect("lookup"),
                Some(Owner {
                    gateway: GatewayId(gw.into()),
                    epoch: claim.epoch
                })
            );
        }
        cleanup(&one).await;
    }

    /// A restart that lost the counter, or restored an older one, must not re-issue epochs.
    #[tokio::test]
    async fn epochs_survive_a_lost_or_stale_counter() {
        let own = connect(LONG_TTL).await;
        let gw = GatewayId("gw-a".into());
        let first = own.claim(InstanceUid::new_v7(), &gw).await.expect("claim");
        // Seeded from the server clock in microseconds (well after 2020-01-01).
        assert!(first.epoch > 1_577_836_800_000_000, "epoch {}", first.epoch);

        let _: u64 = ::redis::cmd("DEL")
            .arg(&own.epoch_key)
            .query_async(&mut own.conn.clone())
            .await
            .expect("del");
        let after_loss = own.claim(InstanceUid::new_v7(), &gw).await.expect("claim");
        assert!(after_loss.epoch > first.epoch);

        set_raw(&own, &own.epoch_key, b"1000").await;
        let after_stale = own.claim(InstanceUid::new_v7(), &gw).await.expect("claim");
        assert!(after_stale.epoch > after_loss.epoch);

        // A counter ahead of the clock (e.g. a burst of claims) keeps counting from there.
        let ahead = after_stale.epoch + 1_000_000_000;
        set_raw(&own, &own.epoch_key, ahead.to_string().as_bytes()).await;
        let after_ahead = own.claim(InstanceUid::new_v7(), &gw).await.expect("claim");
        assert_eq!(after_ahead.epoch, ahead + 1);
        cleanup(&own).await;
    }
}
