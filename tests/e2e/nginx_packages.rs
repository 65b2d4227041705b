//! Agent package downloads through the reference nginx template (`deploy/nginx`): plain
//! and TLS-terminating, with the token in the offer or the agent's certificate forwarded by
//! the proxy.

use agent::ClientTls;
use anyhow::Context as _;

use crate::nginx::{behind_tls_nginx, behind_tls_proxy, Nginx};

/// Package downloads through the reference proxy: the template routes `/v1/packages/` to the
/// gateways, streams the build whole and passes `Range` through (a resumed download).
#[tokio::test]
async fn package_downloads_pass_through_nginx_whole_and_in_ranges() -> anyhow::Result<()> {
    let signer = tests::packages::Signer::new();
    let server = crate::packages::serve_trusting(&signer).await?;
    crate::packages::import_version(&server, &signer, "0.2.0").await?;
    crate::packages::assign_to_all(&server, "0.2.0").await?;
    let nginx = Nginx::start(server.addr, "").await?;
    let token = server.api.token("nginx-download").await?;
    let reply = tests::packages::probe_reply(&nginx.ws_url(), &token).await?;
    let (url, auth) =
        tests::packages::download_of(&reply, "").context("an offer with a credential")?;
    let path = url.splitn(4, '/').nth(3).context("a path")?;
    let via = format!("http://{}/{path}", nginx.addr);
    let data = tests::packages::build("0.2.0");
    let http = reqwest::Client::new();
    let whole = http.get(&via).header("authorization", &auth).send().await?;
    assert_eq!(whole.status().as_u16(), 200);
    assert!(whole.bytes().await?.as_ref() == data.as_slice());
    let rest = http
        .get(&via)
        .header("authorization", &auth)
        .header("range", "bytes=1000-")
        .send()
        .await?;
    assert_eq!(rest.status().as_u16(), 206);
    assert!(rest.bytes().await?.as_ref() == &data[1000..]);
    let refused = http.get(&via).send().await?;
    assert_eq!(refused.status().as_u16(), 401, "no credential");
    server.stop().await
}

/// Behind a TLS-terminating proxy the agent's certificate still opens hosted builds: nginx
/// verifies it and forwards it with the proxy secret, and the gateway checks it against the
/// agent CA. Without a certificate or a token the download is refused.
#[tokio::test]
async fn an_agents_certificate_forwarded_by_tls_nginx_opens_hosted_builds() -> anyhow::Result<()> {
    let (server, nginx, _tls) = behind_tls_nginx(|c| {
        behind_tls_proxy(c);
        c.packages.allow_unsigned = true;
    })
    .await?;
    let data = tests::packages::build("0.2.0");
    let (status, body) =
        tests::packages::import(&server, "", "0.2.0", "linux/amd64", data.clone(), None).await?;
    assert_eq!(status, 200, "{body}");
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data));
    let ca = std::fs::read_to_string(server.dir.path().join("tls").join("ca.pem"))?;
    let token = server.api.token("tls-nginx-download").await?;
    let id = tests::identity::CsrIdentity::enroll(&nginx.ws_url(), &ca, &token).await?;
    let job = agent::PackageDownload {
        name: String::new(),
        version: "0.2.0".into(),
        hash: Vec::new(),
        url: format!("https://{}/v1/packages/{sha}", nginx.addr),
        content_hash: hex::decode(&sha)?,
        headers: Vec::new(),
        signature: Vec::new(),
    };
    let (bytes, got) = agent::download_package(&job, Some(&id.client_tls(&ca)?), None).await;
    assert_eq!(got, Ok(()), "the certificate, forwarded by nginx");
    assert_eq!(bytes, data.len() as u64);
    let (_, got) = agent::download_package(&job, Some(&ClientTls::from_ca_pem(&ca)?), None).await;
    assert!(
        got.as_ref().is_err_and(|e| e.contains("401")),
        "neither certificate nor token: {got:?}"
    );
    server.stop().await
}
