//! Agent identities: client certificates issued from the agent CA, and their verification.
//!
//! * [`AgentCa`] — the CA with its key, on coordinators: signs an agent's CSR or a key pair
//!   it generates for agents that cannot make one (the OTel supervisor), and signs CRLs.
//! * [`AgentTrust`] — the CA certificate and the set of revoked serials, on gateways: the
//!   listener's client-certificate verifier ([`IdentityVerifier`]) and the check of
//!   certificates that arrive in a trusted proxy's header.
//!
//! An identity certificate names its agent twice: subject CN = the instance UID in canonical
//! UUID text, and a URI SAN `urn:uuid:<uid>`. Serials are 16 random bytes, shown as lowercase
//! hex without leading zero bytes ([`shared::tls::serial_hex`]) everywhere (store, API, CRL, bus).

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use sha2::{Digest, Sha256};
use shared::ids::InstanceUid;
use shared::tls::{parse_certs_pem, provider, serial_hex, TlsError};
use time::OffsetDateTime;

/// Identity certificates start a little in the past, so an agent whose clock is behind still
/// accepts one made a moment ago (the server's own clock decides at the handshake).
const BACKDATE: Duration = Duration::from_secs(3600);

/// How long a CRL is declared valid; it is signed afresh on every request.
const CRL_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// An identity certificate just issued.
#[derive(Debug, Clone)]
pub struct IssuedIdentity {
    pub cert_pem: String,
    /// The key pair generated for the agent (PKCS#8 PEM) when it sent no CSR.
    pub private_key_pem: Option<String>,
    pub serial: String,
    pub not_after_ms: i64,
    /// SHA-256 of the certificate DER, lowercase hex.
    pub fingerprint: String,
}

/// Why an identity could not be issued. `BadCsr` is the agent's fault (the spec's
/// `error_response{BadRequest}`); `Internal` is ours.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    #[error("issuing a certificate: {0}")]
    Internal(String),
}

/// The agent CA with its private key (coordinators only).
pub struct AgentCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate as given, sent to agents as `ca_cert`.
    pem: String,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa").finish_non_exhaustive()
    }
}

impl AgentCa {
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let cert_pem = std::fs::read_to_string(cert).map_err(|e| TlsError::io(cert, e))?;
        let key_pem = std::fs::read_to_string(key).map_err(|e| TlsError::io(key, e))?;
        Self::from_pem(&cert_pem, &key_pem)
    }

    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let der = parse_certs_pem(cert_pem.as_bytes())
            .map_err(|e| TlsError::Invalid(format!("agent CA certificate: {e}")))?
            .into_iter()
            .next()
            .ok_or_else(|| TlsError::Invalid("agent CA certificate: none in the PEM".into()))?;
        let key = KeyPair::from_pem(key_pem)?;
        // rcgen signs with a `Certificate`; rebuilt from the CA's own DER it carries the same
        // subject and key identifier, so what it signs chains to the CA certificate on disk.
        let params = CertificateParams::from_ca_cert_der(&der)?;
        let cert = params.self_signed(&key)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| TlsError::Invalid(format!("agent CA certificate: {e}")))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(TlsError::Invalid(
                "agent CA key does not belong to the agent CA certificate".into(),
            ));
        }
        Ok(Self {
            cert,
            key,
            pem: cert_pem.to_string(),
        })
    }

    /// The CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.pem
    }

    /// Issues a client certificate for `uid`, valid for `validity`: for the key of `csr_pem`
    /// (PEM PKCS#10, its signature checked; a UID it names must be `uid`, facts §5.4), or
    /// for a key pair generated here and returned with it.
    pub fn issue(
        &self,
        uid: InstanceUid,
        csr_pem: Option<&str>,
        validity: Duration,
    ) -> Result<IssuedIdentity, IssueError> {
        let internal = |e: rcgen::Error| IssueError::Internal(e.to_string());
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, uid.to_string());
        let urn = format!("urn:uuid:{uid}");
        params.subject_alt_names = vec![SanType::URI(urn.try_into().map_err(internal)?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut serial = *uuid::Uuid::new_v4().as_bytes();
        // Positive and without a leading zero byte, so every spelling of it is the same.
        serial[0] = (serial[0] & 0x7f) | 0x40;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = now - BACKDATE;
        params.not_after = now + validity;
        let (cert, private_key_pem) = match csr_pem {
            Some(pem) => {
                csr_public_key(pem)?;
                let csr = CertificateSigningRequestParams::from_pem(pem)
                    .map_err(|e| IssueError::BadCsr(e.to_string()))?;
                check_csr_names(&csr.params, uid)?;
                let csr = CertificateSigningRequestParams {
                    params,
                    public_key: csr.public_key,
                };
                (
                    csr.signed_by(&self.cert, &self.key).map_err(internal)?,
                    None,
                )
            }
            None => {
                let key = KeyPair::generate().map_err(internal)?;
                let cert = params
                    .signed_by(&key, &self.cert, &self.key)
                    .map_err(internal)?;
                (cert, Some(key.serialize_pem()))
            }
        };
        let not_after_ms =
            i64::try_from((now + validity).unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX);
        Ok(IssuedIdentity {
            cert_pem: cert.pem(),
            private_key_pem,
            serial: serial_hex(&serial),
            not_after_ms,
            fingerprint: hex::encode(Sha256::digest(cert.der())),
        })
    }

    /// A CRL naming `revoked` (serial hex, revocation time in ms), signed by this CA, DER.
    pub fn crl(&self, revoked: &[(String, i64)], crl_number: u64) -> Result<Vec<u8>, TlsError> {
        Ok(self.signed_crl(revoked, crl_number)?.der().to_vec())
    }

    /// [`AgentCa::crl`] as PEM (`-----BEGIN X509 CRL-----`).
    pub fn crl_pem(&self, revoked: &[(String, i64)], crl_number: u64) -> Result<String, TlsError> {
        Ok(self.signed_crl(revoked, crl_number)?.pem()?)
    }

    fn signed_crl(
        &self,
        revoked: &[(String, i64)],
        crl_number: u64,
    ) -> Result<rcgen::CertificateRevocationList, TlsError> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .filter_map(|(serial, at_ms)| {
                let bytes = hex::decode(serial).ok()?;
                let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(*at_ms) * 1_000_000)
                    .ok()?;
                Some(RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: at,
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + CRL_VALIDITY,
            crl_number: SerialNumber::from(crl_number),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?)
    }
}

/// The public key (SubjectPublicKeyInfo DER) a PEM CSR asks to certify, once its type and
/// size are ones Ampora signs: ECDSA P-256 or P-384, Ed25519, or RSA of 2048 to 8192 bits.
pub fn csr_public_key(csr_pem: &str) -> Result<Vec<u8>, IssueError> {
    use x509_parser::prelude::FromDer;
    let bad = |m: String| IssueError::BadCsr(m);
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(csr_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&pem.contents)
            .map_err(|e| bad(e.to_string()))?;
    let spki = &csr.certification_request_info.subject_pki;
    check_key(spki)?;
    Ok(spki.raw.to_vec())
}

/// The public key (SubjectPublicKeyInfo DER) of a PEM certificate.
pub fn cert_public_key(cert_pem: &str) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).ok()?;
    Some(cert.public_key().raw.to_vec())
}

fn check_key(spki: &x509_parser::x509::SubjectPublicKeyInfo<'_>) -> Result<(), IssueError> {
    use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384, OID_SIG_ED25519};
    use x509_parser::public_key::PublicKey;
    const ACCEPTED: &str = "ECDSA P-256 or P-384, Ed25519, or RSA of 2048 to 8192 bits";
    if spki.algorithm.algorithm == OID_SIG_ED25519 {
        return Ok(());
    }
    match spki.parsed() {
        Ok(PublicKey::RSA(k)) if (2048..=8192).contains(&k.key_size()) => Ok(()),
        Ok(PublicKey::RSA(k)) => Err(IssueError::BadCsr(format!(
            "an RSA key of {} bits; accepted: {ACCEPTED}",
            k.key_size()
        ))),
        Ok(PublicKey::EC(_)) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            match curve {
                Some(c) if c == OID_EC_P256 || c == OID_NIST_EC_P384 => Ok(()),
                _ => Err(IssueError::BadCsr(format!(
                    "an elliptic curve key on another curve; accepted: {ACCEPTED}"
                ))),
            }
        }
        _ => Err(IssueError::BadCsr(format!(
            "an unsupported key type; accepted: {ACCEPTED}"
        ))),
    }
}

/// A CSR may name the agent (CN or `urn:uuid:` SAN); if it names a UUID, it must be `uid`.
fn check_csr_names(params: &CertificateParams, uid: InstanceUid) -> Result<(), IssueError> {
    let mut named = Vec::new();
    for (ty, value) in params.distinguished_name.iter() {
        if *ty == DnType::CommonName {
            match value {
                rcgen::DnValue::Utf8String(s) => named.push(s.clone()),
                rcgen::DnValue::PrintableString(s) => named.push(s.as_str().to_string()),
                rcgen::DnValue::Ia5String(s) => named.push(s.as_str().to_string()),
                _ => {}
            }
        }
    }
    for san in &params.subject_alt_names {
        if let SanType::URI(u) = san {
            if let Some(rest) = u.as_str().strip_prefix("urn:uuid:") {
                named.push(rest.to_string());
            }
        }
    }
    for name in named {
        if let Ok(named_uid) = name.trim().parse::<InstanceUid>() {
            if named_uid != uid {
                return Err(IssueError::BadCsr(format!(
                    "requests a certificate for {named_uid}, not for the agent {uid}"
                )));
            }
        }
    }
    Ok(())
}

/// A verified agent certificate: who it names and its serial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertIdentity {
    pub uid: InstanceUid,
    pub serial: String,
}

/// Serials of revoked identities, shared by a gateway's verifier and request handler and
/// replaced whole by its refresh (or extended by a revocation broadcast).
#[derive(Debug, Default)]
pub struct RevokedSerials(RwLock<HashSet<String>>);

impl RevokedSerials {
    pub fn contains(&self, serial: &str) -> bool {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(serial)
    }

    pub fn insert(&self, serial: String) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(serial);
    }

    pub fn replace(&self, serials: HashSet<String>) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = serials;
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a gateway trusts as an agent identity: certificates chaining to the agent CA whose
/// serial is not revoked. Cheap to clone.
#[derive(Clone)]
pub struct AgentTrust {
    webpki: Arc<dyn ClientCertVerifier>,
    pub revoked: Arc<RevokedSerials>,
}

impl std::fmt::Debug for AgentTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentTrust")
            .field("revoked", &self.revoked.len())
            .finish_non_exhaustive()
    }
}

/// Why a client certificate is not an identity (bounded: a metric / audit reason).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRejection {
    /// Does not chain to the agent CA, expired, wrong usage, unparsable.
    Invalid,
    Revoked,
    /// Chains, but names no instance UID.
    NoUid,
}

impl CertRejection {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid => "invalid_certificate",
            Self::Revoked => "certificate_revoked",
            Self::NoUid => "certificate_without_uid",
        }
    }
}

impl AgentTrust {
    /// Trusts the CA certificates in `ca_pem`.
    pub fn from_ca_pem(ca_pem: &str) -> Result<Self, TlsError> {
        let certs = parse_certs_pem(ca_pem.as_bytes())
            .map_err(|e| TlsError::Invalid(format!("agent CA certificate: {e}")))?;
        if certs.is_empty() {
            return Err(TlsError::Invalid(
                "agent CA certificate: none in the PEM".into(),
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for c in certs {
            roots.add(c)?;
        }
        // Unauthenticated clients stay welcome: they are the bootstrap-token agents.
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .allow_unauthenticated()
            .build()
            .map_err(|e| TlsError::Invalid(format!("agent CA certificate: {e}")))?;
        Ok(Self {
            webpki,
            revoked: Arc::new(RevokedSerials::default()),
        })
    }

    pub fn from_ca_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read_to_string(path).map_err(|e| TlsError::io(path, e))?;
        Self::from_ca_pem(&pem)
    }

    /// The listener's client-certificate verifier over this trust.
    pub fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        Arc::new(IdentityVerifier {
            trust: self.clone(),
        })
    }

    /// Verifies a chain (leaf first) as the handshake does, and reads the identity it names.
    pub fn verify(&self, chain: &[CertificateDer<'_>]) -> Result<CertIdentity, CertRejection> {
        let (leaf, intermediates) = chain.split_first().ok_or(CertRejection::Invalid)?;
        let serial = leaf_serial(leaf).ok_or(CertRejection::Invalid)?;
        if self.revoked.contains(&serial) {
            return Err(CertRejection::Revoked);
        }
        let now = UnixTime::since_unix_epoch(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default(),
        );
        self.webpki
            .verify_client_cert(leaf, intermediates, now)
            .map_err(|_| CertRejection::Invalid)?;
        let uid = leaf_uid(leaf).ok_or(CertRejection::NoUid)?;
        Ok(CertIdentity { uid, serial })
    }
}

/// The serial of a certificate, as [`serial_hex`].
fn leaf_serial(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(serial_hex(cert.raw_serial()))
}

/// The instance UID a certificate names: its `urn:uuid:` URI SAN, else its CN.
fn leaf_uid(der: &CertificateDer<'_>) -> Option<InstanceUid> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                if let Some(uid) = u.strip_prefix("urn:uuid:").and_then(|s| s.parse().ok()) {
                    return Some(uid);
                }
            }
        }
    }
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok()?.parse().ok()
}

/// The listener's client verifier: rustls' WebPKI verifier over the agent CA (certificates
/// optional), with revoked serials refused at the handshake.
#[derive(Debug)]
struct IdentityVerifier {
    trust: AgentTrust,
}

impl ClientCertVerifier for IdentityVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.trust.webpki.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        if leaf_serial(end_entity).is_some_and(|s| self.trust.revoked.contains(&s)) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        self.trust
            .webpki
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.webpki.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ca() -> (AgentCa, AgentTrust) {
        let dir = tempfile::tempdir().expect("dir");
        let local = super::super::LocalCa::new(dir.path(), vec!["localhost".into()]);
        local.ensure().expect("ca");
        let ca = AgentCa::from_files(&local.ca_cert_path, &local.ca_key_path).expect("agent ca");
        let trust = AgentTrust::from_ca_file(&local.ca_cert_path).expect("trust");
        (ca, trust)
    }

    fn chain(pem: &str) -> Vec<CertificateDer<'static>> {
        parse_certs_pem(pem.as_bytes()).expect("pem")
    }

    #[test]
    fn issued_certificates_verify_and_name_their_agent() {
        let (ca, trust) = ca();
        let uid = InstanceUid::new_v7();
        let issued = ca
            .issue(uid, None, Duration::from_secs(3600))
            .expect("issue");
        assert!(issued.private_key_pem.is_some());
        let id = trust.verify(&chain(&issued.cert_pem)).expect("verifies");
        assert_eq!(
            id,
            CertIdentity {
                uid,
                serial: issued.serial.clone()
            }
        );
        trust.revoked.insert(issued.serial.clone());
        assert_eq!(
            trust.verify(&chain(&issued.cert_pem)),
            Err(CertRejection::Revoked)
        );
        let (_, other) = self::ca();
        let foreign = other.verify(&chain(&issued.cert_pem));
        assert_eq!(foreign, Err(CertRejection::Invalid), "another CA's trust");
    }

    #[test]
    fn csrs_are_signed_for_their_key_and_only_for_their_agent() {
        let (ca, trust) = ca();
        let uid = InstanceUid::new_v7();
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, uid.to_string());
        let csr = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        let issued = ca
            .issue(uid, Some(&csr), Duration::from_secs(3600))
            .expect("issue");
        assert!(issued.private_key_pem.is_none());
        let certs = chain(&issued.cert_pem);
        let (_, parsed) = x509_parser::parse_x509_certificate(&certs[0]).expect("parse");
        assert_eq!(parsed.public_key().raw, key.public_key_der().as_slice());
        assert_eq!(trust.verify(&certs).expect("verifies").uid, uid);

        let other = ca.issue(InstanceUid::new_v7(), Some(&csr), Duration::from_secs(60));
        assert!(matches!(other, Err(IssueError::BadCsr(_))), "{other:?}");
        let garbage = ca.issue(uid, Some("not a csr"), Duration::from_secs(60));
        assert!(matches!(garbage, Err(IssueError::BadCsr(_))), "{garbage:?}");
    }

    #[test]
    fn crls_are_signed_der() {
        let (ca, _) = ca();
        let der = ca
            .crl(&[("4abc".into(), 1_700_000_000_000)], 1)
            .expect("crl");
        let (_, crl) = x509_parser::parse_x509_crl(&der).expect("parses");
        let serials: Vec<String> = crl
            .iter_revoked_certificates()
            .map(|r| serial_hex(r.raw_serial()))
            .collect();
        assert_eq!(serials, vec!["4abc".to_string()]);
    }

    /// A CSR made by the system's `openssl` (keys rcgen cannot generate).
    fn openssl_csr(newkey: &[&str]) -> String {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("k.pem");
        let out = std::process::Command::new("openssl")
            .args(["req", "-new", "-nodes", "-subj", "/CN=agent", "-keyout"])
            .arg(&key)
            .args(newkey)
            .output()
            .expect("openssl must be installed for this test");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).expect("pem")
    }

    #[test]
    fn csr_keys_must_be_of_an_accepted_type_and_size() {
        let uid = InstanceUid::new_v7();
        let (ca, _) = ca();
        let weak = openssl_csr(&["-newkey", "rsa:1024"]);
        let refused = ca.issue(uid, Some(&weak), Duration::from_secs(60));
        assert!(
            matches!(&refused, Err(IssueError::BadCsr(m)) if m.contains("1024 bits")),
            "{refused:?}"
        );
        let odd_curve = openssl_csr(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"]);
        assert!(matches!(
            ca.issue(uid, Some(&odd_curve), Duration::from_secs(60)),
            Err(IssueError::BadCsr(_))
        ));
        let good = openssl_csr(&["-newkey", "rsa:2048"]);
        assert!(ca.issue(uid, Some(&good), Duration::from_secs(60)).is_ok());
        // The key a CSR asks for is the key the certificate carries.
        let issued = ca
            .issue(uid, Some(&good), Duration::from_secs(60))
            .expect("issued");
        assert_eq!(
            cert_public_key(&issued.cert_pem),
            csr_public_key(&good).ok()
        );
    }
}
