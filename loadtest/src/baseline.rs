//! `ampora-loadtest baseline`: a bare fastwebsockets server that holds the same WebSocket
//! connections and answers every binary message with a small binary message (an empty-ish
//! `ServerToAgent`, so the same agents can talk to it). What it costs per connection and how
//! many messages it answers is this machine's limit, against which Ampora is compared.
//!
//! With `--tls-dir` it speaks TLS only, with the handshake Ampora's agent port makes (see
//! [`server_config`]), so `compare --tls` sets Ampora's shipped configuration against a
//! baseline that pays for the same cryptography.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use fastwebsockets::{upgrade, Frame, OpCode, Payload, WebSocketError};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;

use crate::procs::{spawn_listening, Spawned};
use crate::tls::GatewayCerts;

/// Answered to plain GETs, so the harness can check that `--no-auth` targets a baseline.
pub const BANNER: &str = "ampora-loadtest baseline";

/// The reply: header 0x00 + `ServerToAgent { capabilities: 1 }`.
fn reply() -> Vec<u8> {
    shared::codec::encode_ws(&proto::ServerToAgent {
        capabilities: 1,
        ..Default::default()
    })
}

/// Accepts plaintext connections until the task is dropped.
pub async fn serve(listener: TcpListener) -> std::io::Result<()> {
    let reply = Bytes::from(reply());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        tokio::spawn(serve_connection(stream, reply.clone()));
    }
}

/// Accepts TLS connections until the task is dropped; each handshake runs in the
/// connection's own task, off the accept loop, as Ampora's listener does.
pub async fn serve_tls(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> std::io::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let reply = Bytes::from(reply());
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let reply = reply.clone();
        tokio::spawn(async move {
            if let Ok(tls) = acceptor.accept(stream).await {
                serve_connection(tls, reply).await;
            }
        });
    }
}

/// The TLS settings of Ampora's agent port (`gateway::tls` `server_config`, with the agent
/// trust `ampora serve` installs), rebuilt here on the same ring provider: the safe default
/// protocol versions, ALPN `http/1.1`, no session storage and no tickets (so every connect is
/// a full handshake), and a client certificate requested but optional, verified against the
/// same CA. `certs` come from [`GatewayCerts::create`], the local-CA kind `ampora serve`
/// makes for itself (ECDSA P-256).
pub fn server_config(certs: &GatewayCerts) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let read = |p: &Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let chain = CertificateDer::pem_slice_iter(&read(&certs.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .context("the server certificate")?;
    let key = PrivateKeyDer::from_pem_slice(&read(&certs.key_file)?).context("the server key")?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&read(&certs.ca_file)?) {
        roots.add(ca.context("the CA certificate")?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// `<exe> baseline --listen 127.0.0.1:0 --tls-dir DIR`: a TLS baseline whose local CA (and
/// log, `baseline.log`) is in `dir`; its [`Spawned::ca_file`] is the CA agents must trust.
pub async fn spawn_tls(exe: &Path, dir: &Path) -> anyhow::Result<Spawned> {
    let certs = GatewayCerts::create(dir)?;
    let mut cmd = Command::new(exe);
    cmd.args(["baseline", "--listen", "127.0.0.1:0", "--tls-dir"])
        .arg(dir);
    let mut s = spawn_listening(cmd, &dir.join("baseline.log"))
        .await
        .context("starting the TLS baseline")?;
    s.ca_file = Some(certs.ca_file);
    Ok(s)
}

/// The body of `GET url` from a `https://` server trusted by `ca_pem` (the banner check of a
/// TLS baseline; the API client has no TLS).
pub async fn get_https(url: &str, ca_pem: &str) -> anyhow::Result<String> {
    let uri: hyper::Uri = url.parse().with_context(|| format!("URL {url}"))?;
    let host = uri.host().context("a host in the URL")?.to_string();
    let port = uri.port_u16().unwrap_or(443);
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("connecting to {host}:{port}"))?;
    let connector =
        tokio_rustls::TlsConnector::from(crate::tls::client_tls(ca_pem)?.config().clone());
    let name = ServerName::try_from(host.clone())?;
    let stream = connector
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let req = Request::get(path)
        .header(hyper::header::HOST, host)
        .body(Empty::<Bytes>::new())?;
    let body = send.send_request(req).await?.into_body().collect().await?;
    Ok(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

/// HTTP/1.1 with upgrades on one connection, plaintext or TLS.
async fn serve_connection<S>(stream: S, reply: Bytes)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| handle(req, reply.clone()));
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades()
        .await;
}

async fn handle(
    mut req: Request<Incoming>,
    reply: Bytes,
) -> Result<Response<Full<Bytes>>, WebSocketError> {
    if !upgrade::is_upgrade_request(&req) {
        return Ok(Response::new(Full::new(Bytes::from_static(
            BANNER.as_bytes(),
        ))));
    }
    let (resp, fut) = upgrade::upgrade(&mut req)?;
    tokio::spawn(async move {
        if let Ok(mut ws) = fut.await {
            ws.set_auto_close(true);
            ws.set_auto_pong(true);
            loop {
                let frame = match ws.read_frame().await {
                    Ok(f) => f,
                    Err(_) => break,
                };
                match frame.opcode {
                    OpCode::Binary => {
                        let out = Frame::binary(Payload::Borrowed(&reply));
                        if ws.write_frame(out).await.is_err() {
                            break;
                        }
                    }
                    OpCode::Close => break,
                    _ => {}
                }
            }
        }
    });
    let (parts, _) = resp.into_parts();
    Ok(Response::from_parts(parts, Full::new(Bytes::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The TLS baseline answers the banner check through a client trusting only its CA, and
    /// offers no session ticket to resume (every agent's connect is a full handshake).
    #[tokio::test]
    async fn tls_baseline_answers_the_banner_over_tls() {
        let dir = tempfile::tempdir().expect("dir");
        let certs = GatewayCerts::create(dir.path()).expect("certs");
        let config = server_config(&certs).expect("config");
        assert_eq!(config.send_tls13_tickets, 0);
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve_tls(listener, config));
        let ca = std::fs::read_to_string(&certs.ca_file).expect("ca");
        let body = get_https(&format!("https://{addr}/"), &ca)
            .await
            .expect("GET");
        assert_eq!(body, BANNER);
        // A client trusting another CA is refused at the handshake.
        let other = tempfile::tempdir().expect("dir");
        let other = GatewayCerts::create(other.path()).expect("certs");
        let other_ca = std::fs::read_to_string(&other.ca_file).expect("ca");
        assert!(get_https(&format!("https://{addr}/"), &other_ca)
            .await
            .is_err());
        server.abort();
    }
}
