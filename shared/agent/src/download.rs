//! Package downloads for the agent task (facts §3.6): a GET of the offered file over HTTP(S),
//! hashed with SHA-256 as it streams in and then dropped (the agent installs nothing).
//!
//! Each download runs on a task of its own so that the connection keeps serving heartbeats
//! and replies meanwhile. [`Downloads`] belongs to the agent task, not to a connection: a
//! result that arrives after the connection dropped is reported on the next one, and
//! stopping the agent aborts what is still running.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, HOST};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::task::JoinSet;
use tokio::time::timeout;

use crate::core::{AgentCore, Outcome, PackageDownload};
use crate::http::drive;
use crate::tls::ClientTls;
use crate::url::{missing_tls, Endpoint, Scheme};

/// Largest package file accepted.
pub(crate) const MAX_DOWNLOAD: u64 = 1 << 30;
/// A server that sends nothing for this long is given up on (no overall limit: big files on
/// slow links are fine as long as they move).
const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// How a download ended: what [`AgentCore::package_downloaded`] needs.
#[derive(Debug)]
pub(crate) struct Finished {
    name: String,
    hash: Vec<u8>,
    bytes: u64,
    result: Result<(), String>,
}

impl Finished {
    /// Hands the result to the core; returns what it says to do.
    pub(crate) fn report(self, core: &mut AgentCore) -> Outcome {
        core.count_package_bytes(self.bytes);
        core.package_downloaded(&self.name, &self.hash, self.result)
    }
}

/// The agent's downloads under way. Costs nothing until the first one starts (the load
/// generator's agents never download).
#[derive(Debug, Default)]
pub(crate) struct Downloads {
    running: Option<JoinSet<Finished>>,
}

impl Downloads {
    /// Starts `jobs`, with the TLS trust and source address the agent is configured with.
    pub(crate) fn start(&mut self, core: &AgentCore, jobs: Vec<PackageDownload>) {
        for job in jobs {
            let (tls, source) = (core.options().tls.clone(), core.options().source_ip);
            let running = self.running.get_or_insert_with(JoinSet::new);
            running.spawn(async move {
                let (bytes, result) = fetch(&job, tls.as_ref(), source).await;
                Finished {
                    name: job.name,
                    hash: job.hash,
                    bytes,
                    result,
                }
            });
        }
    }

    /// The next download to end; never resolves while none is running.
    pub(crate) async fn next(&mut self) -> Finished {
        loop {
            match self.running.as_mut() {
                Some(set) if !set.is_empty() => {
                    // A download task cannot be cancelled but by dropping the set, and does
                    // not panic; should one, its package stays Downloading.
                    if let Some(Ok(done)) = set.join_next().await {
                        return done;
                    }
                }
                _ => std::future::pending::<()>().await,
            }
        }
    }
}

/// Fetches `job.url` (redirects are not followed: anything but 200 fails) and checks its
/// content against `job.content_hash` (when the offer has one), over `tls` for `https://`
/// (with its client certificate, if it has one). Returns the bytes received with the result.
pub async fn fetch(
    job: &PackageDownload,
    tls: Option<&ClientTls>,
    source: Option<IpAddr>,
) -> (u64, Result<(), String>) {
    let mut bytes = 0;
    let result = get(job, tls, source, &mut bytes)
        .await
        .map_err(|e| format!("download failed: {e}"));
    (bytes, result)
}

async fn get(
    job: &PackageDownload,
    tls: Option<&ClientTls>,
    source: Option<IpAddr>,
    bytes: &mut u64,
) -> Result<(), String> {
    let ep = Endpoint::parse(&job.url)?;
    if ep.scheme != Scheme::Http {
        return Err(format!("{}: not an http:// or https:// URL", job.url));
    }
    if ep.tls && tls.is_none() {
        return Err(missing_tls(&ep));
    }
    let stream = ep
        .open(source, tls)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, mut conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(ep.path_and_query.as_str())
        .header(HOST, ep.authority.as_str());
    for (k, v) in &job.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let req = req
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let stalled = |_| format!("nothing received for {}s", STALL_TIMEOUT.as_secs());
    let work = async {
        let resp = timeout(STALL_TIMEOUT, sender.send_request(req))
            .await
            .map_err(stalled)?
            .map_err(|e| e.to_string())?;
        if resp.status() != StatusCode::OK {
            return Err(format!("HTTP {}", resp.status().as_u16()));
        }
        let announced = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if announced.is_some_and(|n| n > MAX_DOWNLOAD) {
            return Err(format!("file larger than {MAX_DOWNLOAD} bytes"));
        }
        let mut body = resp.into_body();
        let mut sha = Sha256::new();
        while let Some(frame) = timeout(STALL_TIMEOUT, body.frame())
            .await
            .map_err(stalled)?
        {
            let frame = frame.map_err(|e| e.to_string())?;
            if let Ok(data) = frame.into_data() {
                *bytes += data.len() as u64;
                if *bytes > MAX_DOWNLOAD {
                    return Err(format!("file larger than {MAX_DOWNLOAD} bytes"));
                }
                sha.update(&data);
            }
        }
        let got = sha.finalize();
        if !job.content_hash.is_empty() && got.as_slice() != job.content_hash {
            return Err(format!(
                "content hash mismatch: expected {}, got {}",
                hex(&job.content_hash),
                hex(&got)
            ));
        }
        Ok(())
    };
    drive(&mut conn, &mut None, work).await
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::task::JoinHandle;

    use super::*;

    const BODY: &[u8] = b"the package's bytes";

    /// A one-request HTTP server on loopback answering `status` with `body`; its task
    /// returns the request head it received.
    async fn serve_once(status: &'static str, body: &'static [u8]) -> (String, JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!(
            "http://{}/pkg/v2.tar.gz",
            listener.local_addr().expect("addr")
        );
        let task = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = tcp.read(&mut buf).await.expect("read");
                assert!(n > 0, "request cut short");
                head.extend_from_slice(&buf[..n]);
            }
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            tcp.write_all(resp.as_bytes()).await.expect("write");
            tcp.write_all(body).await.expect("write");
            String::from_utf8_lossy(&head).to_lowercase()
        });
        (url, task)
    }

    fn job(url: String, content: &[u8]) -> PackageDownload {
        PackageDownload {
            name: "p".into(),
            version: "2.0".into(),
            hash: vec![1],
            url,
            content_hash: Sha256::digest(content).to_vec(),
            headers: vec![("Authorization".into(), "Bearer dl-token".into())],
            signature: Vec::new(),
        }
    }

    #[tokio::test]
    async fn right_bytes_pass_and_the_offered_headers_are_sent() {
        let (url, server) = serve_once("200 OK", BODY).await;
        let (bytes, result) = fetch(&job(url, BODY), None, None).await;
        assert_eq!(result, Ok(()));
        assert_eq!(bytes, BODY.len() as u64);
        let head = server.await.expect("server");
        assert!(
            head.starts_with("get /pkg/v2.tar.gz http/1.1\r\n"),
            "{head}"
        );
        assert!(
            head.contains("\r\nauthorization: bearer dl-token\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn wrong_bytes_fail_with_a_hash_mismatch() {
        let (url, server) = serve_once("200 OK", b"something else").await;
        let (bytes, result) = fetch(&job(url, BODY), None, None).await;
        let err = result.expect_err("mismatch");
        assert!(err.contains("content hash mismatch"), "{err}");
        assert_eq!(bytes, 14, "counted all the same");
        server.await.expect("server");
    }

    #[tokio::test]
    async fn any_status_but_200_fails_with_it() {
        for (status, code) in [("401 Unauthorized", "401"), ("302 Found", "302")] {
            let (url, server) = serve_once(status, b"no").await;
            let (_, result) = fetch(&job(url, BODY), None, None).await;
            assert_eq!(result, Err(format!("download failed: HTTP {code}")));
            server.await.expect("server");
        }
    }

    #[tokio::test]
    async fn unusable_urls_fail_without_connecting() {
        let (_, result) = fetch(&job("ftp://h/x".into(), BODY), None, None).await;
        assert!(result.is_err_and(|e| e.contains("unsupported scheme")));
        let (_, result) = fetch(&job("https://h/x".into(), BODY), None, None).await;
        assert!(result.is_err_and(|e| e.starts_with("download failed: ")));
    }

    #[tokio::test]
    async fn downloads_report_through_the_core() {
        use proto::v1::{DownloadableFile, PackageAvailable, PackagesAvailable};
        use proto::ServerToAgent;
        use std::collections::BTreeMap;

        let (url, server) = serve_once("200 OK", BODY).await;
        let (mut core, rx) = AgentCore::new(crate::AgentOptions {
            accept_packages: true,
            ..crate::AgentOptions::default()
        });
        let out = core.on_message(ServerToAgent {
            packages_available: Some(PackagesAvailable {
                packages: BTreeMap::from([(
                    "p".to_string(),
                    PackageAvailable {
                        r#type: 1,
                        version: "2.0".into(),
                        file: Some(DownloadableFile {
                            download_url: url,
                            content_hash: Sha256::digest(BODY).to_vec(),
                            ..DownloadableFile::default()
                        }),
                        hash: vec![1],
                    },
                )]),
                all_packages_hash: vec![9],
            }),
            ..ServerToAgent::default()
        });
        let mut dl = Downloads::default();
        dl.start(&core, out.downloads);
        let out = dl.next().await.report(&mut core);
        assert_eq!(out.send.len(), 1);
        let st = rx.borrow().clone();
        assert_eq!(st.packages["p"].status, "Installed");
        assert_eq!(st.package_bytes_downloaded, BODY.len() as u64);
        server.await.expect("server");
    }
}
