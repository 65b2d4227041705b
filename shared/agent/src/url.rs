//! Endpoint URL parsing (`ws://`, `wss://`, `http://`, `https://` `host:port/path`) and
//! connection establishment.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::Uri;
use shared::tls::MaybeTls;
use tokio::net::{TcpSocket, TcpStream};

use crate::tls::{ClientStream, ClientTls};

/// Which OpAMP transport an endpoint selects (`ws`/`wss`: WebSocket, `http`/`https`: plain
/// HTTP).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Ws,
    Http,
}

/// A parsed OpAMP endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
    /// `wss://` or `https://`: TLS over the TCP connection.
    pub tls: bool,
    /// Host name or IP address, without IPv6 brackets (what a resolver wants).
    pub host: String,
    pub port: u16,
    /// Value for the `Host` header: host and port exactly as written in the URL.
    pub authority: String,
    /// Origin-form request target (`/v1/opamp?x=y`); `/` when the URL has no path.
    pub path_and_query: String,
}

/// Bounds connection establishment so a black-holed address cannot stall an agent forever.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Endpoint {
    /// Parses `url` (`ws`, `wss`, `http` or `https`).
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let (scheme, tls) = match uri.scheme_str() {
            Some("ws") => (Scheme::Ws, false),
            Some("wss") => (Scheme::Ws, true),
            Some("http") => (Scheme::Http, false),
            Some("https") => (Scheme::Http, true),
            Some(s) => return Err(format!("{url}: unsupported scheme {s}")),
            None => return Err(format!("{url}: missing scheme (ws:// or http://)")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url}: missing host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("{url}: credentials in the URL are not supported"));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(format!("{url}: missing host"));
        }
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        let path_and_query = match uri.path_and_query() {
            Some(pq) if !pq.as_str().is_empty() => {
                if pq.as_str().starts_with('/') {
                    pq.as_str().to_string()
                } else {
                    format!("/{}", pq.as_str())
                }
            }
            _ => "/".to_string(),
        };
        Ok(Self {
            scheme,
            tls,
            host,
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_string(),
            path_and_query,
        })
    }

    /// Opens the connection: TCP, then the TLS handshake for `wss://` / `https://`, which
    /// needs `tls` (the CA to trust).
    pub(crate) async fn open(
        &self,
        source: Option<IpAddr>,
        tls: Option<&ClientTls>,
    ) -> std::io::Result<ClientStream> {
        if !self.tls {
            return Ok(MaybeTls::Plain(self.connect(source).await?));
        }
        let Some(tls) = tls else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                missing_tls(self),
            ));
        };
        let tcp = self.connect(source).await?;
        tokio::time::timeout(CONNECT_TIMEOUT, tls.connect(&self.host, tcp))
            .await
            .map_err(|_| {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "tls handshake timed out")
            })?
    }

    /// Opens a TCP connection, optionally from a given local address (the load generator
    /// spreads agents over 127.0.0.x to get past the per-source-address port limit).
    pub(crate) async fn connect(&self, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
        let fut = async {
            let mut last_err = None;
            for addr in tokio::net::lookup_host((self.host.as_str(), self.port)).await? {
                if source.is_some_and(|s| s.is_ipv4() != addr.is_ipv4()) {
                    continue;
                }
                match connect_one(addr, source).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last_err = Some(e),
                }
            }
            Err(last_err.unwrap_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{}: no usable address", self.host),
                )
            }))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, fut)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }
}

/// The error for a TLS endpoint without TLS settings.
pub(crate) fn missing_tls(ep: &Endpoint) -> String {
    format!(
        "{}:{}: a TLS endpoint needs client TLS settings (the CA to trust)",
        ep.host, ep.port
    )
}

async fn connect_one(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(addr).await?;
    // OpAMP messages are small and latency-sensitive (status → reply); don't batch them.
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ws_with_port_and_path() {
        let e = Endpoint::parse("ws://127.0.0.1:4320/v1/opamp").expect("valid");
        assert_eq!(e.scheme, Scheme::Ws);
        assert_eq!(e.host, "127.0.0.1");
        assert_eq!(e.port, 4320);
        assert_eq!(e.authority, "127.0.0.1:4320");
        assert_eq!(e.path_and_query, "/v1/opamp");
    }

    #[test]
    fn parses_http_defaults() {
        let e = Endpoint::parse("http://example.com").expect("valid");
        assert_eq!(e.scheme, Scheme::Http);
        assert_eq!(e.host, "example.com");
        assert_eq!(e.port, 80);
        assert_eq!(e.authority, "example.com");
        assert_eq!(e.path_and_query, "/");
    }

    #[test]
    fn keeps_query_and_strips_ipv6_brackets() {
        let e = Endpoint::parse("http://[::1]:8080/v1/opamp?tenant=a").expect("valid");
        assert_eq!(e.host, "::1");
        assert_eq!(e.port, 8080);
        assert_eq!(e.authority, "[::1]:8080");
        assert_eq!(e.path_and_query, "/v1/opamp?tenant=a");
    }

    #[test]
    fn parses_tls_schemes_with_default_port() {
        let e = Endpoint::parse("wss://h/v1/opamp").expect("valid");
        assert_eq!((e.scheme, e.tls, e.port), (Scheme::Ws, true, 443));
        let e = Endpoint::parse("https://h:4320/v1/opamp").expect("valid");
        assert_eq!((e.scheme, e.tls, e.port), (Scheme::Http, true, 4320));
        let e = Endpoint::parse("ws://h/v1/opamp").expect("valid");
        assert!(!e.tls);
    }

    #[test]
    fn refuses_unknown_and_relative() {
        for bad in [
            "ftp://h/",
            "/v1/opamp",
            "h:4320",
            "ws://user:pw@h/",
            "not a url",
        ] {
            assert!(Endpoint::parse(bad).is_err(), "{bad} must be refused");
        }
    }
}
