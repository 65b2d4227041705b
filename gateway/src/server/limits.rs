//! Per-client admission limits, so one client (one address, one credential) cannot take what
//! the gateway-wide limits of `admission` leave for everyone:
//! - open WebSocket connections **per source address** (checked with the connection cap,
//!   before authentication) and **per credential** (bootstrap token id or certificate UID,
//!   checked right after authentication, before the upgrade); refused with 429 +
//!   `Retry-After`. The counts are held by the connection until it ends.
//! - an **accept-rate bucket per source address**, taken before the gateway-wide bucket so a
//!   flooding address spends only its own tokens, never everyone's. The map of buckets is
//!   bounded: at [`MAX_TRACKED_IPS`] the buckets that have refilled (the same as a fresh one)
//!   are dropped, and an address that still finds no room is left to the gateway-wide bucket.
//!
//! The source address is the request's origin: the peer, or the agent a trusted proxy names.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use shared::bus::Credential;
use shared::ids::InstanceUid;

use super::admission::{AdmissionConfig, Refusal};
use crate::serve::{CountGuard, Counts, IpSlot};

/// Most source addresses with an accept bucket at once (about 3 MiB of map).
pub(super) const MAX_TRACKED_IPS: usize = 65_536;

/// How often, at most, a full bucket map is swept for refilled buckets.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What a WebSocket connection is counted under for `max_connections_per_credential`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum CredentialKey {
    Token(String),
    Certificate(InstanceUid),
}

impl From<&Credential> for CredentialKey {
    fn from(c: &Credential) -> Self {
        match c {
            Credential::BootstrapToken { token_id, .. } => Self::Token(token_id.clone()),
            Credential::Certificate { uid, .. } => Self::Certificate(*uid),
        }
    }
}

/// The per-client limits of one gateway.
pub(super) struct ClientLimits {
    max_per_ip: usize,
    max_per_credential: usize,
    ws_per_ip: Arc<Counts<IpAddr>>,
    ws_per_credential: Arc<Counts<CredentialKey>>,
    /// `None`: no per-address rate.
    buckets: Option<IpBuckets>,
}

/// A counted WebSocket connection of a credential; held by its task, given back when it ends.
pub(super) type CredentialSlot = CountGuard<CredentialKey>;

impl ClientLimits {
    pub(super) fn new(cfg: &AdmissionConfig) -> Self {
        Self {
            max_per_ip: cfg.max_connections_per_ip,
            max_per_credential: cfg.max_connections_per_credential,
            ws_per_ip: Counts::new(),
            ws_per_credential: Counts::new(),
            buckets: IpBuckets::new(cfg.accept_rate_per_ip_per_sec, cfg.accept_burst_per_ip),
        }
    }

    /// One more WebSocket from `ip`, unless it has `max_connections_per_ip` open.
    pub(super) fn connection_from(&self, ip: IpAddr) -> Result<IpSlot, Refusal> {
        self.ws_per_ip
            .acquire(Some(ip), 0, self.max_per_ip)
            .map_err(|_| Refusal::IpConnectionCap)
    }

    /// One more WebSocket on `credential`, unless it has `max_connections_per_credential`.
    pub(super) fn connection_of(&self, credential: &Credential) -> Result<CredentialSlot, Refusal> {
        self.ws_per_credential
            .acquire(Some(credential.into()), 0, self.max_per_credential)
            .map_err(|_| Refusal::CredentialConnectionCap)
    }

    /// One accept token of `ip`'s bucket.
    pub(super) fn accept_from(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        match &self.buckets {
            None => Ok(()),
            Some(b) => b
                .try_acquire(ip, now)
                .map_err(|retry_after| Refusal::IpRate { retry_after }),
        }
    }
}

/// Token buckets by source address: `burst` tokens, refilled at `rate` per second, no warmup
/// (a restart does not make one address more dangerous).
struct IpBuckets {
    rate: f64,
    burst: f64,
    state: Mutex<BucketMap>,
}

struct BucketMap {
    /// `(tokens, last refill)` per address.
    buckets: HashMap<IpAddr, (f64, Instant)>,
    last_sweep: Option<Instant>,
}

impl IpBuckets {
    fn new(rate: u32, burst: u32) -> Option<Self> {
        if rate == 0 {
            return None;
        }
        Some(Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            state: Mutex::new(BucketMap {
                buckets: HashMap::new(),
                last_sweep: None,
            }),
        })
    }

    fn try_acquire(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.buckets.contains_key(&ip) && state.buckets.len() >= MAX_TRACKED_IPS {
            self.sweep(&mut state, now);
            if state.buckets.len() >= MAX_TRACKED_IPS {
                // Every tracked address is busy: this one is left to the gateway-wide bucket
                // rather than growing the map or refusing an address that did nothing yet.
                return Ok(());
            }
        }
        let (tokens, last) = state.buckets.entry(ip).or_insert((self.burst, now));
        let now = now.max(*last);
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        let available = (*tokens + elapsed * self.rate).min(self.burst);
        *last = now;
        if available >= 1.0 {
            *tokens = available - 1.0;
            return Ok(());
        }
        *tokens = available;
        let wait = ((1.0 - available) / self.rate).ceil();
        // `as` saturates; NaN cannot occur (rate > 0), and `max(1)` keeps clients from
        // retrying at once.
        Err(Duration::from_secs((wait as u64).max(1)))
    }

    /// Drops the buckets that have refilled by `now`: a fresh one is the same.
    fn sweep(&self, state: &mut BucketMap, now: Instant) {
        if state
            .last_sweep
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        state.last_sweep = Some(now);
        let (rate, burst) = (self.rate, self.burst);
        state.buckets.retain(|_, (tokens, last)| {
            *tokens + now.saturating_duration_since(*last).as_secs_f64() * rate < burst
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn each_address_has_its_own_bucket() {
        let t0 = Instant::now();
        let b = IpBuckets::new(1, 3).expect("limited");
        for _ in 0..3 {
            assert!(b.try_acquire(ip(1), t0).is_ok());
        }
        assert_eq!(b.try_acquire(ip(1), t0), Err(Duration::from_secs(1)));
        assert!(
            b.try_acquire(ip(2), t0).is_ok(),
            "another address is unaffected"
        );
        assert!(b.try_acquire(ip(1), t0 + Duration::from_secs(1)).is_ok());
        assert!(IpBuckets::new(0, 3).is_none(), "0 is unlimited");
    }

    #[test]
    fn the_map_is_bounded_and_forgets_refilled_buckets() {
        let t0 = Instant::now();
        let b = IpBuckets::new(1, 2).expect("limited");
        let n = u32::try_from(MAX_TRACKED_IPS).expect("fits");
        for i in 0..n {
            assert!(b.try_acquire(ip(i), t0).is_ok());
        }
        // Full of busy buckets: a newcomer is not tracked (left to the global bucket).
        for _ in 0..5 {
            assert!(b.try_acquire(ip(n), t0).is_ok());
        }
        assert_eq!(b.state.lock().expect("lock").buckets.len(), MAX_TRACKED_IPS);
        // Once they refilled, a sweep makes room.
        let later = t0 + Duration::from_secs(2);
        assert!(b.try_acquire(ip(n), later).is_ok());
        assert_eq!(b.state.lock().expect("lock").buckets.len(), 1);
    }

    #[test]
    fn credentials_are_counted_by_token_or_certificate_uid() {
        let cfg = AdmissionConfig {
            max_connections_per_credential: 1,
            max_connections_per_ip: 2,
            ..AdmissionConfig::default()
        };
        let limits = ClientLimits::new(&cfg);
        let token = |id: &str| Credential::BootstrapToken {
            token_id: id.into(),
            bound_uid: None,
        };
        let held = limits.connection_of(&token("a")).expect("first");
        assert_eq!(
            limits.connection_of(&token("a")).err(),
            Some(Refusal::CredentialConnectionCap)
        );
        assert!(limits.connection_of(&token("b")).is_ok());
        drop(held);
        assert!(limits.connection_of(&token("a")).is_ok());

        let a = limits.connection_from(ip(1)).expect("1");
        let _b = limits.connection_from(ip(1)).expect("2");
        assert_eq!(
            limits.connection_from(ip(1)).err(),
            Some(Refusal::IpConnectionCap)
        );
        drop(a);
        assert!(limits.connection_from(ip(1)).is_ok());
    }
}
