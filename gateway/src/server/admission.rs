//! Admission control: how many WebSocket connections a gateway holds and how fast it takes on
//! new work, so a reconnect storm (tens of thousands of agents after a restart or a network
//! blip) is served at a pace the gateway and its coordinators can take instead of piling up
//! into timeouts.
//!
//! Two checks, both made by `handle` before authentication and before the upgrade, so a refusal
//! costs no bus request and no socket upgrade:
//! - a **connection cap** on open WebSocket connections, refused with 503 + `Retry-After`. The
//!   slot is reserved in the connection registry ([`Conns`]) under its lock, so concurrent
//!   upgrades cannot both take the last slot; the reservation lasts until the upgrade is
//!   answered, by which time an admitted connection is in `Conns::open`.
//! - an **accept-rate token bucket**: every new WebSocket upgrade and every plain-HTTP request
//!   takes one token; refused with 429 + `Retry-After` (when the next token will be there).
//!   For `warmup` after the gateway starts the refill rate ramps linearly from
//!   [`WARMUP_FLOOR`] of the full rate up to it, so a restarted gateway takes its agents back
//!   gradually. The bucket starts full: `burst` is by definition what the gateway takes at once.
//!
//! Per-client limits (connections per address and per credential, a bucket per address) are
//! in `limits`; they refuse with 429 + `Retry-After` and are counted under the same metric.
//!
//! The bucket is pure arithmetic over an explicit [`Instant`], so its tests need no sleeping.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{Conns, Inner};
use crate::serve::IpSlot;

/// Share of the full accept rate a gateway starts with when warming up.
pub const WARMUP_FLOOR: f64 = 0.1;

/// Admission limits of one gateway. Every limit is per gateway process.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionConfig {
    /// Most open WebSocket connections; upgrades beyond it get 503. 0: unlimited.
    pub max_connections: usize,
    /// Tokens per second for new WebSocket upgrades and plain-HTTP requests; beyond it they get
    /// 429. 0: unlimited.
    pub accept_rate_per_sec: u32,
    /// Bucket size: how many may arrive at once. Must be at least 1 when the rate is limited.
    pub accept_burst: u32,
    /// After start, the rate ramps from [`WARMUP_FLOOR`] to full over this time. Zero: none.
    pub warmup: Duration,
    /// Most open WebSocket connections from one source address (429 beyond). 0: unlimited.
    pub max_connections_per_ip: usize,
    /// Most open WebSocket connections on one credential, a bootstrap token or a certificate
    /// UID (429 beyond). 0: unlimited.
    pub max_connections_per_credential: usize,
    /// Tokens per second of each source address's own bucket, taken before the gateway's
    /// (429 beyond). 0: unlimited.
    pub accept_rate_per_ip_per_sec: u32,
    /// Size of each source address's bucket; at least 1 when its rate is limited.
    pub accept_burst_per_ip: u32,
    /// A WebSocket that sends no `AgentToServer` within this time is closed. Zero: no limit.
    pub first_message_timeout: Duration,
}

impl Default for AdmissionConfig {
    /// Matches the `[admission]` defaults of the server configuration (see its README block).
    fn default() -> Self {
        Self {
            max_connections: 100_000,
            accept_rate_per_sec: 2_000,
            accept_burst: 10_000,
            warmup: Duration::from_secs(30),
            max_connections_per_ip: 10_000,
            max_connections_per_credential: 8,
            accept_rate_per_ip_per_sec: 200,
            accept_burst_per_ip: 1_000,
            first_message_timeout: Duration::from_secs(15),
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// At `max_connections` (WebSocket only).
    ConnectionCap,
    /// No token; one will be there in `retry_after` (whole seconds, at least 1).
    Rate { retry_after: Duration },
    /// The source address has `max_connections_per_ip` open (WebSocket only).
    IpConnectionCap,
    /// The credential has `max_connections_per_credential` open (WebSocket only).
    CredentialConnectionCap,
    /// No token in the source address's own bucket.
    IpRate { retry_after: Duration },
}

impl Refusal {
    /// The `reason` label of `ampora_gateway_admission_refused_total`.
    pub(super) fn reason(self) -> &'static str {
        match self {
            Self::ConnectionCap => "connection_cap",
            Self::Rate { .. } => "rate",
            Self::IpConnectionCap => "ip_connection_cap",
            Self::CredentialConnectionCap => "credential_connection_cap",
            Self::IpRate { .. } => "ip_rate",
        }
    }
}

/// Every `reason` of `ampora_gateway_admission_refused_total`.
pub(super) const REFUSAL_REASONS: [&str; 5] = [
    "connection_cap",
    "rate",
    "ip_connection_cap",
    "credential_connection_cap",
    "ip_rate",
];

/// True when one more connection fits next to `in_use` (open plus reserved) under `max`.
fn cap_allows(max: usize, in_use: usize) -> bool {
    max == 0 || in_use < max
}

/// A token bucket whose refill rate ramps up during a warmup after `start`.
///
/// Lock-light: the mutex guards two numbers and is held for a few floating-point operations,
/// never across an await; at the rates involved (thousands per second) it is uncontended in
/// practice, and it keeps the check-and-take atomic without a compare-and-swap loop.
pub(super) struct TokenBucket {
    /// Full rate, tokens per second.
    rate: f64,
    /// Capacity.
    burst: f64,
    /// Warmup length in seconds; 0 means none.
    warmup: f64,
    /// The gateway's start: the warmup is measured from here.
    start: Instant,
    /// `(tokens, last refill)`: refilled lazily on each acquire.
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// `None` when the rate is unlimited (0).
    pub(super) fn new(cfg: &AdmissionConfig, start: Instant) -> Option<Self> {
        if cfg.accept_rate_per_sec == 0 {
            return None;
        }
        // A zero burst with a limited rate would refuse everything forever; the configuration
        // refuses it, and this keeps a hand-built config from doing that silently.
        let burst = f64::from(cfg.accept_burst.max(1));
        Some(Self {
            rate: f64::from(cfg.accept_rate_per_sec),
            burst,
            warmup: cfg.warmup.as_secs_f64(),
            start,
            state: Mutex::new((burst, start)),
        })
    }

    /// Takes one token at `now`, or says how long until one will be there.
    pub(super) fn try_acquire(&self, now: Instant) -> Result<(), Duration> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (tokens, last) = *state;
        // Callers read the clock before taking the lock, so `now` may be a hair older than the
        // last refill; time never runs backwards for the bucket.
        let now = now.max(last);
        let from = last.saturating_duration_since(self.start).as_secs_f64();
        let to = now.saturating_duration_since(self.start).as_secs_f64();
        let tokens = (tokens + self.accrued(to) - self.accrued(from)).min(self.burst);
        if tokens >= 1.0 {
            *state = (tokens - 1.0, now);
            return Ok(());
        }
        *state = (tokens, now);
        drop(state);
        // Seconds until the missing fraction of a token has accrued, at the current rate. During
        // warmup the rate only grows, so this is an upper bound; whole seconds because that is
        // what `Retry-After` carries, and at least 1 so clients do not retry at once.
        let wait = (1.0 - tokens) / self.rate_at(to);
        Err(Duration::from_secs(whole_secs(wait).max(1)))
    }

    /// Refill rate at `t` seconds after start.
    fn rate_at(&self, t: f64) -> f64 {
        if t >= self.warmup {
            self.rate
        } else {
            let floor = self.rate * WARMUP_FLOOR;
            floor + (self.rate - floor) * t / self.warmup
        }
    }

    /// Tokens accrued from start to `t` seconds after it, ignoring the capacity: the integral
    /// of [`rate_at`](Self::rate_at), exact for the linear ramp, so refills do not depend on how
    /// often the bucket is looked at.
    fn accrued(&self, t: f64) -> f64 {
        let floor = self.rate * WARMUP_FLOOR;
        let ramp = |x: f64| floor * x + (self.rate - floor) * x * x / (2.0 * self.warmup);
        if t >= self.warmup {
            // With no warmup both terms before the `+` are 0.
            let at_end = if self.warmup > 0.0 {
                ramp(self.warmup)
            } else {
                0.0
            };
            at_end + self.rate * (t - self.warmup)
        } else {
            ramp(t)
        }
    }
}

/// `ceil(secs)` as an integer, saturating (the input is finite and positive here).
fn whole_secs(secs: f64) -> u64 {
    // `as` saturates for out-of-range floats and maps NaN to 0, which `max(1)` then lifts.
    secs.ceil() as u64
}

/// A connection slot reserved by an admitted WebSocket upgrade, held until the upgrade is
/// answered. By then an admitted connection is in `Conns::open` (which counts it from there
/// on), so dropping the reservation never leaves it uncounted; a refused or failed upgrade
/// just gives the slot back.
pub(super) struct SlotReservation {
    inner: Arc<Inner>,
}

impl Drop for SlotReservation {
    fn drop(&mut self) {
        let mut conns = self.inner.conns();
        conns.admitting = conns.admitting.saturating_sub(1);
    }
}

impl Conns {
    /// Connections counted against the cap: open ones and admitted upgrades not answered yet.
    /// Between `open_conn` and the end of its upgrade's reservation a connection is counted
    /// twice, which errs on the safe side for the few microseconds it lasts.
    fn in_use(&self) -> usize {
        self.open.len().saturating_add(self.admitting)
    }

    /// True when the cap leaves room for one more open connection (`open_conn`'s backstop: an
    /// upgrade that came through `handle` already holds a reservation, so this always holds
    /// for it).
    pub(super) fn has_room_to_open(&self, max: usize) -> bool {
        cap_allows(max, self.open.len())
    }
}

impl Inner {
    /// Admission of a new WebSocket upgrade from `ip`: a connection slot (checked and reserved
    /// under the registry lock, so it cannot race), one of `ip`'s connections, and then an
    /// accept token. The caps go first so a full gateway does not spend tokens on upgrades it
    /// cannot take. The address's slot is the connection's to hold until it ends.
    pub(super) fn admit_upgrade(
        self: &Arc<Self>,
        ip: IpAddr,
        now: Instant,
    ) -> Result<(SlotReservation, IpSlot), Refusal> {
        let ip_slot = self.clients.connection_from(ip)?;
        {
            let mut conns = self.conns();
            if !cap_allows(self.cfg.admission.max_connections, conns.in_use()) {
                return Err(Refusal::ConnectionCap);
            }
            conns.admitting += 1;
        }
        let slot = SlotReservation {
            inner: self.clone(),
        };
        // On refusal both slots are dropped here and given back.
        self.admit_request(ip, now)?;
        Ok((slot, ip_slot))
    }

    /// Admission of a plain-HTTP request from `ip` (and the rate half of an upgrade's): one
    /// token of the address's bucket, then one of the gateway's, so a flooding address spends
    /// only its own.
    pub(super) fn admit_request(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        self.clients.accept_from(ip, now)?;
        match &self.accept {
            None => Ok(()),
            Some(bucket) => bucket
                .try_acquire(now)
                .map_err(|retry_after| Refusal::Rate { retry_after }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: u32, burst: u32, warmup_secs: u64) -> AdmissionConfig {
        AdmissionConfig {
            max_connections: 0,
            accept_rate_per_sec: rate,
            accept_burst: burst,
            warmup: Duration::from_secs(warmup_secs),
            ..AdmissionConfig::default()
        }
    }

    fn bucket(rate: u32, burst: u32, warmup_secs: u64, t0: Instant) -> TokenBucket {
        TokenBucket::new(&cfg(rate, burst, warmup_secs), t0).expect("rate is limited")
    }

    /// How many tokens can be taken at `at`, taking them.
    fn drain(b: &TokenBucket, at: Instant) -> usize {
        let mut n = 0;
        while b.try_acquire(at).is_ok() {
            n += 1;
            assert!(n <= 1_000_000, "bucket never runs dry");
        }
        n
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn unlimited_rate_has_no_bucket() {
        assert!(TokenBucket::new(&cfg(0, 10, 30), Instant::now()).is_none());
    }

    #[test]
    fn starts_full_and_takes_the_burst_at_once() {
        let t0 = Instant::now();
        let b = bucket(5, 10, 0, t0);
        assert_eq!(drain(&b, t0), 10);
    }

    #[test]
    fn refills_at_the_rate_up_to_the_burst() {
        let t0 = Instant::now();
        let b = bucket(5, 10, 0, t0);
        drain(&b, t0);
        assert!(b.try_acquire(t0 + ms(100)).is_err(), "half a token");
        assert!(
            b.try_acquire(t0 + ms(200)).is_ok(),
            "one token after 1/rate"
        );
        assert!(b.try_acquire(t0 + ms(200)).is_err());
        assert_eq!(drain(&b, t0 + ms(1200)), 5, "one second is `rate` tokens");
        assert_eq!(
            drain(&b, t0 + Duration::from_secs(3600)),
            10,
            "capped at burst"
        );
    }

    #[test]
    fn zero_burst_is_treated_as_one() {
        let t0 = Instant::now();
        let b = bucket(5, 0, 0, t0);
        assert_eq!(drain(&b, t0), 1);
    }

    #[test]
    fn a_stale_clock_reading_neither_panics_nor_refills() {
        let t0 = Instant::now();
        let b = bucket(5, 1, 0, t0);
        assert!(b.try_acquire(t0 + Duration::from_secs(1)).is_ok());
        assert!(b.try_acquire(t0).is_err(), "older than the last refill");
        assert!(b.try_acquire(t0 + ms(1100)).is_err(), "still half a token");
        assert!(b.try_acquire(t0 + ms(1200)).is_ok());
    }

    #[test]
    fn retry_after_is_whole_seconds_until_the_next_token_and_at_least_one() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        // 5/s: the next token is 200 ms away, rounded up to 1 s.
        let b = bucket(5, 1, 0, t0);
        drain(&b, t0);
        assert_eq!(b.try_acquire(t0), Err(secs(1)));
        // 1/s with a quarter token accrued: 0.75 s, rounded up.
        let b = bucket(1, 1, 0, t0);
        drain(&b, t0);
        assert_eq!(b.try_acquire(t0 + ms(250)), Err(secs(1)));
        // During warmup the current (lower) rate counts: 1/s starts at 0.1/s, so 10 s.
        let b = bucket(1, 1, 100, t0);
        drain(&b, t0);
        assert_eq!(b.try_acquire(t0), Err(secs(10)));
        // Half-way through the warmup the rate is 0.55/s: with the bucket just emptied, the next
        // token is 1 / 0.55 ≈ 1.8 s away.
        let b = bucket(1, 1, 100, t0);
        drain(&b, t0 + secs(50));
        assert_eq!(b.try_acquire(t0 + secs(50)), Err(secs(2)));
    }

    #[test]
    fn warmup_ramps_the_rate_linearly_from_the_floor() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        // 100/s, warmup 10 s: 10/s at start, 55/s half-way, 100/s from 10 s on.
        let b = bucket(100, 1_000, 10, t0);
        assert!((b.rate_at(0.0) - 10.0).abs() < 1e-9);
        assert!((b.rate_at(5.0) - 55.0).abs() < 1e-9);
        assert!((b.rate_at(10.0) - 100.0).abs() < 1e-9);
        assert!((b.rate_at(60.0) - 100.0).abs() < 1e-9);
        // Accrued over the warmup: the trapezoid (10 + 100) / 2 * 10 = 550.
        assert!((b.accrued(10.0) - 550.0).abs() < 1e-9);
        assert!((b.accrued(11.0) - 650.0).abs() < 1e-9);

        // The bucket starts full; afterwards the first second refills 10 + 90 / 20 = 14.5.
        assert_eq!(drain(&b, t0), 1_000);
        assert_eq!(drain(&b, t0 + secs(1)), 14);
        // From 1 s to 6 s: accrued(6) − accrued(1) = 222 − 14.5, plus the 0.5 left over.
        assert_eq!(drain(&b, t0 + secs(6)), 208);
        // After the warmup, one second is the full rate.
        drain(&b, t0 + secs(20));
        assert_eq!(drain(&b, t0 + secs(21)), 100);
    }

    #[test]
    fn refill_does_not_depend_on_how_often_the_bucket_is_read() {
        let t0 = Instant::now();
        let often = bucket(100, 1_000, 10, t0);
        let once = bucket(100, 1_000, 10, t0);
        drain(&often, t0);
        drain(&once, t0);
        let mut taken = 0;
        for step in 1..=80 {
            taken += drain(&often, t0 + ms(step * 100));
        }
        let at_once = drain(&once, t0 + ms(8_000));
        // The frequent reader loses at most the fractional token of its last look.
        assert!(taken.abs_diff(at_once) <= 1, "{taken} vs {at_once}");
    }

    #[test]
    fn cap_counts_open_and_reserved() {
        assert!(cap_allows(0, usize::MAX), "0 is unlimited");
        assert!(cap_allows(3, 2));
        assert!(!cap_allows(3, 3));
        let conns = Conns {
            admitting: 2,
            ..Conns::default()
        };
        assert_eq!(conns.in_use(), 2);
        assert!(
            conns.has_room_to_open(1),
            "reservations are not open connections"
        );
    }

    #[test]
    fn refusal_reasons_are_the_metric_labels() {
        let rate = Refusal::Rate {
            retry_after: Duration::from_secs(1),
        };
        let ip_rate = Refusal::IpRate {
            retry_after: Duration::from_secs(1),
        };
        assert_eq!(
            [
                Refusal::ConnectionCap.reason(),
                rate.reason(),
                Refusal::IpConnectionCap.reason(),
                Refusal::CredentialConnectionCap.reason(),
                ip_rate.reason(),
            ],
            REFUSAL_REASONS
        );
    }
}
