//! Plain-HTTP OpAMP transport: one kept-alive HTTP/1.1 connection (TCP, or TLS for
//! `https://`), one request at a time.
//!
//! The hyper connection future is driven inline while a request is in flight instead of on a
//! spawned task, so an idle agent costs one socket and no task beyond its own.

use std::future::Future;
use std::net::IpAddr;

use bytes::Bytes;
use futures::FutureExt;
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE, HOST, RETRY_AFTER};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{Connection, SendRequest};
use hyper_util::rt::TokioIo;
use proto::Message;

use crate::error::ClientError;
use crate::tls::{ClientStream, ClientTls};
use crate::url::{missing_tls, Endpoint, Scheme};
use crate::wire::{gunzip, gzip, parse_retry_after, MAX_ERROR_BODY, MAX_MESSAGE};

const PROTOBUF: &str = "application/x-protobuf";
const INSTANCE_UID_HEADER: &str = "OpAMP-Instance-UID";

/// Polls `fut` to completion while also driving the hyper connection `conn`, which does the
/// actual socket I/O. `done` records the connection's end so it is never polled again.
pub(crate) async fn drive<C, F>(
    conn: &mut C,
    done: &mut Option<hyper::Result<()>>,
    fut: F,
) -> F::Output
where
    C: Future<Output = hyper::Result<()>> + Unpin,
    F: Future,
{
    tokio::pin!(fut);
    if done.is_none() {
        tokio::select! {
            biased;
            out = &mut fut => return out,
            end = &mut *conn => *done = Some(end),
        }
    }
    // The connection ended (cleanly after the response, or with an error that `fut` will
    // report as a cancelled request).
    fut.await
}

struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    conn: Connection<TokioIo<ClientStream>, Full<Bytes>>,
}

impl HttpConn {
    async fn open(
        ep: &Endpoint,
        source: Option<IpAddr>,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ClientError> {
        let stream = ep.open(source, tls).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        Ok(Self { sender, conn })
    }

    /// True when the server closed the idle connection since the last request.
    fn is_dead(&mut self) -> bool {
        self.sender.is_closed() || (&mut self.conn).now_or_never().is_some()
    }

    /// One request/response. Returns the response and whether the connection is reusable.
    async fn round_trip(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<((StatusCode, HeaderMap, Bytes), bool), ClientError> {
        let mut done = None;
        let sender = &mut self.sender;
        let work = async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = Limited::new(body, MAX_MESSAGE)
                .collect()
                .await
                .map_err(|e| ClientError::Protocol(format!("response body: {e}")))?
                .to_bytes();
            Ok::<_, ClientError>((parts.status, parts.headers, body))
        };
        let res = drive(&mut self.conn, &mut done, work).await?;
        Ok((res, done.is_none()))
    }
}

/// Plain-HTTP OpAMP client transport. Keeps one connection alive between polls and
/// reconnects transparently when the server has closed it.
pub struct HttpTransport {
    endpoint: Result<Endpoint, String>,
    headers: Vec<(String, String)>,
    gzip: bool,
    source_ip: Option<IpAddr>,
    /// Needed for `https://`.
    tls: Option<ClientTls>,
    conn: Option<HttpConn>,
    /// Connections this transport tried to open, and opened.
    opens: (u64, u64),
}

impl std::fmt::Debug for HttpTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpTransport")
            .field("endpoint", &self.endpoint)
            .field("gzip", &self.gzip)
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl HttpTransport {
    /// `headers` go on every request (e.g. Authorization). An invalid `url` is reported by the
    /// first request, so construction cannot fail. `https://` needs [`with_tls`](Self::with_tls).
    pub fn new(url: &str, headers: Vec<(String, String)>, gzip: bool) -> Self {
        let endpoint = Endpoint::parse(url).and_then(|e| match e.scheme {
            Scheme::Http => Ok(e),
            Scheme::Ws => Err(format!("{url}: not an http:// or https:// URL")),
        });
        Self {
            endpoint,
            headers,
            gzip,
            source_ip: None,
            tls: None,
            conn: None,
            opens: (0, 0),
        }
    }

    /// Like [`new`](Self::new) for an `https://` URL, trusting what `tls` trusts.
    pub fn new_tls(url: &str, headers: Vec<(String, String)>, gzip: bool, tls: ClientTls) -> Self {
        Self::new(url, headers, gzip).with_tls(Some(tls))
    }

    /// The agent's transport, from an endpoint already parsed (and known to be HTTP).
    pub(crate) fn from_endpoint(ep: Endpoint, headers: Vec<(String, String)>) -> Self {
        Self {
            endpoint: Ok(ep),
            headers,
            gzip: false,
            source_ip: None,
            tls: None,
            conn: None,
            opens: (0, 0),
        }
    }

    /// TLS settings for `https://` (ignored for `http://`).
    pub fn with_tls(mut self, tls: Option<ClientTls>) -> Self {
        self.tls = tls;
        self
    }

    /// Binds the local side of the connection to `ip` (load generator).
    pub fn with_source_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.source_ip = ip;
        self
    }

    /// Connections opened so far: (attempted, established), counting reopenings after the
    /// server closed a kept-alive one.
    pub fn connections(&self) -> (u64, u64) {
        self.opens
    }

    /// POSTs one `AgentToServer` and returns the decoded `ServerToAgent`.
    pub async fn exchange(
        &mut self,
        msg: &proto::AgentToServer,
    ) -> Result<proto::ServerToAgent, ClientError> {
        let mut body = msg.encode_to_vec();
        let mut headers = vec![
            (CONTENT_TYPE.as_str().to_string(), PROTOBUF.to_string()),
            (ACCEPT_ENCODING.as_str().to_string(), "gzip".to_string()),
        ];
        if let Ok(uid) = uuid::Uuid::from_slice(&msg.instance_uid) {
            headers.push((
                INSTANCE_UID_HEADER.to_string(),
                uid.hyphenated().to_string(),
            ));
        }
        if self.gzip {
            body = gzip(&body);
            headers.push((CONTENT_ENCODING.as_str().to_string(), "gzip".to_string()));
        }
        let (status, resp_headers, resp_body) = self.post(Bytes::from(body), &headers).await?;
        if status != StatusCode::OK {
            return Err(ClientError::Status {
                status: status.as_u16(),
                retry_after: resp_headers
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after),
                body: error_text(&resp_body),
            });
        }
        let gzipped = resp_headers
            .get(CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("gzip"));
        let decoded = if gzipped {
            proto::ServerToAgent::decode(gunzip(&resp_body, MAX_MESSAGE)?.as_slice())
        } else {
            proto::ServerToAgent::decode(resp_body)
        };
        decoded.map_err(|e| ClientError::Protocol(format!("bad ServerToAgent: {e}")))
    }

    /// POSTs `body` as is, with only the transport's headers plus `extra_headers` (no
    /// Content-Type unless given): for tests that send malformed input.
    pub async fn post_raw(
        &mut self,
        body: Vec<u8>,
        extra_headers: &[(String, String)],
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let (status, _, body) = self.post(Bytes::from(body), extra_headers).await?;
        Ok((status.as_u16(), body.to_vec()))
    }

    async fn post(
        &mut self,
        body: Bytes,
        extra: &[(String, String)],
    ) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
        let ep = self
            .endpoint
            .as_ref()
            .map_err(|e| ClientError::Url(e.clone()))?;
        if ep.tls && self.tls.is_none() {
            return Err(ClientError::Url(missing_tls(ep)));
        }
        let build = || {
            let mut req = Request::builder()
                .method(Method::POST)
                .uri(ep.path_and_query.as_str())
                .header(HOST, ep.authority.as_str());
            for (k, v) in self.headers.iter().chain(extra) {
                req = req.header(k.as_str(), v.as_str());
            }
            req.body(Full::new(body.clone()))
                .map_err(|e| ClientError::Protocol(format!("request: {e}")))
        };
        // Taken out for the duration of the request: if this future is dropped half-way, the
        // connection goes with it instead of being reused in an unknown state.
        let idle = self
            .conn
            .take()
            .and_then(|mut c| (!c.is_dead()).then_some(c));
        let (mut conn, was_reused) = match idle {
            Some(c) => (c, true),
            None => {
                self.opens.0 += 1;
                let c = HttpConn::open(ep, self.source_ip, self.tls.as_ref()).await?;
                self.opens.1 += 1;
                (c, false)
            }
        };
        let res = match conn.round_trip(build()?).await {
            Err(e) if was_reused => {
                // The server may have closed the kept-alive connection just as we reused it.
                // OpAMP tolerates a repeated message (same sequence number), so retry once.
                tracing::debug!("retrying on a fresh connection after: {e}");
                self.opens.0 += 1;
                conn = HttpConn::open(ep, self.source_ip, self.tls.as_ref()).await?;
                self.opens.1 += 1;
                conn.round_trip(build()?).await
            }
            other => other,
        };
        let (resp, reusable) = res?;
        if reusable {
            self.conn = Some(conn);
        }
        Ok(resp)
    }
}

/// A short, printable version of an error body.
pub(crate) fn error_text(body: &[u8]) -> String {
    let cut = &body[..body.len().min(MAX_ERROR_BODY)];
    String::from_utf8_lossy(cut).trim().to_string()
}
