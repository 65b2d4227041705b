//! Endpoint URL parsing (`ws://host:port/path`, `http://host:port/path`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::Uri;
use tokio::net::{TcpSocket, TcpStream};

/// Which OpAMP transport an endpoint selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Ws,
    Http,
}

/// A parsed OpAMP endpoint. Only plain-text schemes: there is no TLS in the client yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: Scheme,
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
    /// Parses `url`; `wss`/`https` are refused explicitly rather than silently sent in clear.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("ws") => Scheme::Ws,
            Some("http") => Scheme::Http,
            Some(s @ ("wss" | "https")) => {
                return Err(format!(
                    "{url}: scheme {s} needs TLS, which is not supported yet"
                ))
            }
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
            host,
            port: authority.port_u16().unwrap_or(80),
            authority: authority.as_str().to_string(),
            path_and_query,
        })
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
    fn refuses_tls_unknown_and_relative() {
        for bad in [
            "wss://h/v1/opamp",
            "https://h/v1/opamp",
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
