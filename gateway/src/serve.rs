//! Serving the agent port: connection-level limits and the HTTP/1.1 loop.
//!
//! Owns what a client can hold before it has said anything useful, so that idle, silent or
//! slow connections can never stop the port for everyone (health, API, admitted agents):
//! - [`ConnectionLimits`]: the settings, shared with [`AgentListener`] (which applies the
//!   pending ones: pre-first-byte / pre-handshake budget, per peer address, first-byte and
//!   handshake deadlines, shedding the oldest when the budget is full).
//! - [`serve`]: hyper's HTTP/1.1 server with a timer, so a request's headers (and the wait for
//!   the next request on a keep-alive connection) are bounded by `header_read_timeout`, and a
//!   cap on open HTTP connections, in total and per peer address. A connection beyond a cap
//!   is closed at once: accepting never stops. Upgraded WebSockets leave these counts at the
//!   upgrade; admission (`server::admission`, `server::limits`) and OpAMP heartbeats govern
//!   them from there.
//! - `ampora_gateway_connections_closed_total{reason}`: every connection closed by a limit.
//!
//! The per-address limits here are on the TCP peer: a proxy's forwarding headers only exist
//! once a request has been read. Peers in `exempt` (the trusted proxies) are not limited per
//! address, since every agent behind them shares their address.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::watch;
use tower::Service as _;

use crate::net::IpNet;
use crate::tls::AgentListener;

const CONNECTIONS_CLOSED: &str = "ampora_gateway_connections_closed_total";

/// Why a limit closed (or refused) a connection: the `reason` label of
/// `ampora_gateway_connections_closed_total`. A closed set, so the label stays bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Sent nothing within `first_byte_timeout`.
    FirstByteTimeout,
    /// The oldest pending connection, closed to make room when the pending budget was full.
    PendingShed,
    /// Its peer address already had `max_pending_per_ip` pending connections.
    PendingPerIp,
    /// `max_connections` HTTP connections were open.
    MaxConnections,
    /// Its peer address already had `max_connections_per_ip` open.
    PerIp,
    /// Request headers not complete within `header_read_timeout` (also: idle keep-alive).
    HeaderTimeout,
    /// A WebSocket that sent no `AgentToServer` within the first-message deadline.
    FirstMessageTimeout,
}

impl CloseReason {
    pub const ALL: [CloseReason; 7] = [
        Self::FirstByteTimeout,
        Self::PendingShed,
        Self::PendingPerIp,
        Self::MaxConnections,
        Self::PerIp,
        Self::HeaderTimeout,
        Self::FirstMessageTimeout,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::FirstByteTimeout => "first_byte_timeout",
            Self::PendingShed => "pending_shed",
            Self::PendingPerIp => "pending_per_ip",
            Self::MaxConnections => "max_connections",
            Self::PerIp => "per_ip",
            Self::HeaderTimeout => "header_timeout",
            Self::FirstMessageTimeout => "first_message_timeout",
        }
    }
}

pub(crate) fn count_closed(reason: CloseReason) {
    metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
}

/// Registers the metric's description and creates every `reason` series at zero.
pub fn describe_metrics() {
    metrics::describe_counter!(
        CONNECTIONS_CLOSED,
        "Connections closed or refused by a connection limit, by reason (first_byte_timeout, pending_shed, pending_per_ip, max_connections, per_ip, header_timeout, first_message_timeout)"
    );
    for reason in CloseReason::ALL {
        metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(0);
    }
}

/// Connection-level limits of one listener. Every count is per process; 0 means unlimited.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectionLimits {
    /// Connections accepted but not yet ready (no first byte yet, or in the TLS handshake).
    /// When full, the oldest pending one is closed to make room: accepting never waits.
    pub max_pending: usize,
    /// Pending connections per peer address; beyond it a new one is closed at once.
    pub max_pending_per_ip: usize,
    /// How long a new connection may take to send its first byte (TLS listener).
    pub first_byte_timeout: Duration,
    /// How long, from the accept, the first byte plus the TLS handshake may take.
    pub handshake_timeout: Duration,
    /// How long a request's headers may take, counted from when the server starts waiting
    /// for them, so it also bounds an idle keep-alive connection. Zero: no limit.
    pub header_read_timeout: Duration,
    /// Open (not upgraded) HTTP connections on the listener.
    pub max_connections: usize,
    /// Open (not upgraded) HTTP connections per peer address.
    pub max_connections_per_ip: usize,
    /// Peers not limited per address (trusted proxies: all their agents share the address).
    pub exempt: Vec<IpNet>,
}

impl Default for ConnectionLimits {
    /// Matches the `[connections]` defaults of the server configuration (see its README block).
    fn default() -> Self {
        Self {
            max_pending: 4096,
            max_pending_per_ip: 256,
            first_byte_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            max_connections: 50_000,
            max_connections_per_ip: 5_000,
            exempt: Vec::new(),
        }
    }
}

impl ConnectionLimits {
    pub(crate) fn is_exempt(&self, ip: IpAddr) -> bool {
        self.exempt.iter().any(|n| n.contains(ip))
    }
}

/// Counts per key under one lock; a key leaves the map when its count drops to zero, so the
/// map never holds more entries than there are live guards.
pub(crate) struct Counts<K: Eq + Hash + Clone> {
    state: Mutex<(usize, HashMap<K, usize>)>,
}

/// Why [`Counts::acquire`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    Total,
    Key,
}

impl<K: Eq + Hash + Clone> Counts<K> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new((0, HashMap::new())),
        })
    }

    /// One more for `key` (`None`: counted in the total only), unless the total is at
    /// `max_total` or the key at `max_per_key` (0: unlimited).
    pub(crate) fn acquire(
        self: &Arc<Self>,
        key: Option<K>,
        max_total: usize,
        max_per_key: usize,
    ) -> Result<CountGuard<K>, Full> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let (total, per_key) = &mut *state;
        if max_total > 0 && *total >= max_total {
            return Err(Full::Total);
        }
        if let Some(k) = &key {
            let n = per_key.entry(k.clone()).or_insert(0);
            if max_per_key > 0 && *n >= max_per_key {
                return Err(Full::Key);
            }
            *n += 1;
        }
        *total += 1;
        Ok(CountGuard {
            counts: self.clone(),
            key,
        })
    }

    /// Open count of `key`.
    #[cfg(test)]
    pub(crate) fn of(&self, key: &K) -> usize {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.1.get(key).copied().unwrap_or(0)
    }
}

/// One counted connection; gives its count back when dropped.
pub(crate) struct CountGuard<K: Eq + Hash + Clone> {
    counts: Arc<Counts<K>>,
    key: Option<K>,
}

/// A connection counted against its peer address.
pub(crate) type IpSlot = CountGuard<IpAddr>;

impl<K: Eq + Hash + Clone> Drop for CountGuard<K> {
    fn drop(&mut self) {
        let mut state = self
            .counts
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, per_key) = &mut *state;
        *total = total.saturating_sub(1);
        if let Some(k) = &self.key {
            if let Some(n) = per_key.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    per_key.remove(k);
                }
            }
        }
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish
/// (graceful shutdown of each connection) and returns once every connection task is done.
/// Upgraded connections live in their own tasks and are not waited for.
pub async fn serve(
    mut listener: AgentListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    use axum::serve::Listener as _;

    let open: Arc<Counts<IpAddr>> = Counts::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new()).keep_alive(true);
    // `None` turns the timeout off; hyper's own default (30 s) would otherwise apply.
    http.header_read_timeout(
        (!limits.header_read_timeout.is_zero()).then_some(limits.header_read_timeout),
    );
    // Every connection task holds a receiver: the sender's `closed()` says they are all done.
    let (stop_tx, stop_rx) = watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (io, peer) = tokio::select! {
            conn = listener.accept() => conn,
            () = &mut shutdown => break,
        };
        let ip = peer.addr.ip();
        let key = (!limits.is_exempt(ip)).then_some(ip);
        let slot = match open.acquire(key, limits.max_connections, limits.max_connections_per_ip) {
            Ok(slot) => slot,
            Err(full) => {
                count_closed(match full {
                    Full::Total => CloseReason::MaxConnections,
                    Full::Key => CloseReason::PerIp,
                });
                continue;
            }
        };
        let router = app.clone();
        let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer.clone()));
            // Router's service is always ready and never fails.
            router.clone().call(req)
        });
        let conn = http.serve_connection(TokioIo::new(io), svc).with_upgrades();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            tokio::pin!(conn);
            let done = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = done {
                if e.is_timeout() {
                    count_closed(CloseReason::HeaderTimeout);
                }
                tracing::trace!(error = %e, "http connection ended");
            }
            drop(slot);
            drop(stop);
        });
    }
    drop(listener);
    drop(stop_rx);
    // `send` only fails without receivers, when every connection is done already.
    let _ = stop_tx.send(());
    stop_tx.closed().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_cap_total_and_per_key_and_forget_empty_keys() {
        let counts: Arc<Counts<u8>> = Counts::new();
        let a1 = counts.acquire(Some(1), 3, 2).expect("first");
        let _a2 = counts.acquire(Some(1), 3, 2).expect("second");
        assert_eq!(counts.acquire(Some(1), 3, 2).err(), Some(Full::Key));
        let _b = counts.acquire(Some(2), 3, 2).expect("other key");
        assert_eq!(counts.acquire(None, 3, 2).err(), Some(Full::Total));
        drop(a1);
        assert_eq!(counts.of(&1), 1);
        let _unkeyed = counts.acquire(None, 3, 2).expect("room again");
        let unlimited: Arc<Counts<u8>> = Counts::new();
        let held: Vec<_> = (0..100)
            .map(|_| unlimited.acquire(Some(7), 0, 0).expect("0 is unlimited"))
            .collect();
        assert_eq!(unlimited.of(&7), 100);
        drop(held);
        assert_eq!(unlimited.of(&7), 0);
        assert!(unlimited.state.lock().expect("lock").1.is_empty());
    }
}
