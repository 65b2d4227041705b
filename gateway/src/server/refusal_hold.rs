//! How long a refused WebSocket is held open before the gateway closes it.
//!
//! Some refusals need the agent's first message (a token bound to another agent, a scope the
//! description does not match, a certificate naming another UID), so they come after the
//! upgrade, and clients built on opamp-go reconnect at once after a server close: without a
//! pause, one such agent costs a TLS handshake, a coordinator round trip and a refusal about
//! twenty times a second, forever. So the gateway answers the refusal at once but closes the
//! socket only after a delay that doubles with every refusal of the same source address and
//! credential (1 s up to 60 s, forgotten after ten quiet minutes): a looping client is refused
//! at most about once per delay, while one honest retry after a fix waits a second.
//!
//! The table is bounded; when full, refusals of new pairs are held for the longest delay.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::limits::CredentialKey;

/// The first refusal's hold.
const FIRST: Duration = Duration::from_secs(1);
/// The longest hold.
const LONGEST: Duration = Duration::from_secs(60);
/// A pair not refused for this long starts again from [`FIRST`].
const FORGET_AFTER: Duration = Duration::from_secs(600);
/// Most pairs remembered at once.
const MAX_PAIRS: usize = 65_536;

#[derive(Debug)]
struct Hold {
    delay: Duration,
    last: Instant,
}

/// Per gateway: the current hold of each (source address, credential) pair.
#[derive(Debug, Default)]
pub(crate) struct RefusalHolds {
    pairs: Mutex<HashMap<(IpAddr, CredentialKey), Hold>>,
}

impl RefusalHolds {
    /// How long to hold the connection of this refusal open before closing it.
    pub(crate) fn next(&self, ip: IpAddr, credential: CredentialKey) -> Duration {
        self.next_at(ip, credential, Instant::now())
    }

    fn next_at(&self, ip: IpAddr, credential: CredentialKey, now: Instant) -> Duration {
        let Ok(mut pairs) = self.pairs.lock() else {
            return LONGEST;
        };
        let key = (ip, credential);
        if !pairs.contains_key(&key) && pairs.len() >= MAX_PAIRS {
            pairs.retain(|_, h| now.duration_since(h.last) < FORGET_AFTER);
            if pairs.len() >= MAX_PAIRS {
                return LONGEST;
            }
        }
        let hold = pairs.entry(key).or_insert(Hold {
            delay: Duration::ZERO,
            last: now,
        });
        hold.delay = if hold.delay.is_zero() || now.duration_since(hold.last) >= FORGET_AFTER {
            FIRST
        } else {
            (hold.delay * 2).min(LONGEST)
        };
        hold.last = now;
        hold.delay
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: &str) -> CredentialKey {
        CredentialKey::Token(id.into())
    }

    #[test]
    fn holds_double_per_pair_up_to_a_minute_and_are_forgotten() {
        let h = RefusalHolds::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let t0 = Instant::now();
        let got: Vec<u64> = (0..8)
            .map(|i| {
                h.next_at(ip, token("a"), t0 + Duration::from_secs(i))
                    .as_secs()
            })
            .collect();
        assert_eq!(got, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        // Another credential from the same address, or another address: their own holds.
        assert_eq!(h.next_at(ip, token("b"), t0).as_secs(), 1);
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(h.next_at(other, token("a"), t0).as_secs(), 1);
        // Ten quiet minutes: from the start again.
        let later = t0 + Duration::from_secs(8) + FORGET_AFTER;
        assert_eq!(h.next_at(ip, token("a"), later).as_secs(), 1);
    }

    #[test]
    fn a_looping_client_is_refused_a_handful_of_times_a_minute() {
        // A client that reconnects the moment it is closed: each refusal starts when the
        // previous hold ends.
        let h = RefusalHolds::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let start = Instant::now();
        let (mut at, mut refusals) = (start, 0);
        while at < start + Duration::from_secs(60) {
            refusals += 1;
            at += h.next_at(ip, token("a"), at);
        }
        assert!(refusals <= 6, "{refusals} refusals in a minute");
    }
}
