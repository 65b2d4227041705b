//! Connection-settings offers (facts §5.1), the part that needs no state of the core: whether
//! an offered endpoint is one this agent can use, and checking an offered client certificate
//! to build the [`Identity`] to try it with. The core keeps which identity is in use and
//! which is being tried, and reports the offer's status.

use shared::tls::{parse_certs_pem, serial_hex};

use crate::options::AgentOptions;
use crate::tls::ClientTls;
use crate::url::Endpoint;

/// A client certificate taken from a `connection_settings.opamp` offer (facts §5.1).
#[derive(Debug, Clone)]
pub(super) struct Identity {
    /// The offer's hash.
    pub(super) hash: Vec<u8>,
    /// The certificate as offered (PEM), to recognise a repeat of it.
    pub(super) cert: Vec<u8>,
    pub(super) serial: String,
    /// The trust to use, presenting the certificate.
    pub(super) tls: ClientTls,
    /// The offered endpoint, when it is one this agent can use with a certificate.
    pub(super) endpoint: Option<Endpoint>,
}

/// `destination` when an agent with `opts` that uses `current` now can use it: the same
/// transport (or either, with [`AgentOptions::transport_from_offer_scheme`]); TLS when
/// `needs_tls` (a client certificate), and never TLS without something to trust.
pub(super) fn usable_endpoint(
    opts: &AgentOptions,
    current: Option<&Endpoint>,
    destination: &str,
    needs_tls: bool,
) -> Option<Endpoint> {
    Endpoint::parse(destination).ok().filter(|e| {
        let transport =
            opts.transport_from_offer_scheme || Some(e.scheme) == current.map(|c| c.scheme);
        let tls_ok = if e.tls {
            needs_tls || opts.tls.is_some()
        } else {
            !needs_tls
        };
        transport && tls_ok
    })
}

/// Checks an offered certificate and builds the settings to try it with. `current` is the
/// endpoint the agent uses now; `kept` the one the identity stays on when the offered
/// endpoint is not usable (of the certificate in use, else offered before; `None`: the
/// configured one).
pub(super) fn identity_from(
    opts: &AgentOptions,
    current: Option<Endpoint>,
    kept: Option<Endpoint>,
    hash: &[u8],
    destination: &str,
    cert: &proto::v1::TlsCertificate,
) -> Result<Identity, String> {
    let cert_pem = std::str::from_utf8(&cert.cert)
        .map_err(|_| "the offered certificate is not PEM text".to_string())?;
    if cert.private_key.is_empty() {
        return Err(
            "the offered certificate comes without a private key and this agent sent no CSR".into(),
        );
    }
    let key_pem = std::str::from_utf8(&cert.private_key)
        .map_err(|_| "the offered private key is not PEM text".to_string())?;
    let serial = parse_certs_pem(cert_pem.as_bytes())
        .ok()
        .and_then(|c| c.into_iter().next())
        .and_then(|der| {
            x509_parser::parse_x509_certificate(&der)
                .ok()
                .map(|(_, c)| serial_hex(c.raw_serial()))
        })
        .ok_or_else(|| "the offered certificate does not parse".to_string())?;
    // The endpoint: the offered one when this agent can use it with a certificate (same
    // transport, TLS), else the one it uses now, which must be TLS.
    let offered = usable_endpoint(opts, current.as_ref(), destination, true);
    let endpoint = offered.clone().or(current);
    if !endpoint.as_ref().is_some_and(|e| e.tls) {
        return Err("a client certificate needs a wss:// or https:// endpoint".into());
    }
    // Trust: what the agent was configured with, else the offered CA.
    let tls = match &opts.tls {
        Some(t) => t.with_identity(cert_pem, key_pem),
        None if !cert.ca_cert.is_empty() => {
            let ca = std::str::from_utf8(&cert.ca_cert)
                .map_err(|_| "the offered CA is not PEM text".to_string())?;
            ClientTls::from_ca_pem_with_identity(ca, cert_pem, key_pem)
        }
        None => return Err("no CA to verify the server with".into()),
    }
    .map_err(|e| e.to_string())?;
    Ok(Identity {
        hash: hash.to_vec(),
        cert: cert.cert.clone(),
        serial,
        tls,
        endpoint: offered.or(kept),
    })
}
