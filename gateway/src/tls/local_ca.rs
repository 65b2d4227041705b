//! A local certificate authority for `ampora serve` when no certificate is configured: TLS
//! that works on first start, with one file (the CA certificate) for agents to trust.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use shared::tls::TlsError;
use time::{Duration, OffsetDateTime};

/// The CA lives ten years, the server certificate one; each is replaced a month before it
/// expires (the server certificate by the running server, see `ServerTls::from_local_ca`).
const CA_LIFETIME: Duration = Duration::days(3650);
const SERVER_LIFETIME: Duration = Duration::days(365);
const RENEW_BEFORE: Duration = Duration::days(30);
/// Certificates start an hour in the past, so a client whose clock is a little behind accepts
/// a certificate made a moment ago.
const BACKDATE: Duration = Duration::hours(1);

/// A CA and the server certificate it signed, in one directory:
///
/// | file | what | mode |
/// |---|---|---|
/// | `ca.pem` | the CA certificate agents must trust | 0644 |
/// | `ca-key.pem` | its private key | 0600 |
/// | `server.pem` | the server certificate, then the CA certificate | 0644 |
/// | `server-key.pem` | the server's private key | 0600 |
#[derive(Debug, Clone)]
pub struct LocalCa {
    pub dir: PathBuf,
    /// The CA certificate: what agents must trust.
    pub ca_cert_path: PathBuf,
    /// The CA's private key: what signs agent identities in `ampora serve`.
    pub ca_key_path: PathBuf,
    /// The server's certificate chain and key, what the listener serves.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    /// Host names and IP addresses the server certificate must be valid for.
    names: Vec<String>,
}

/// What [`LocalCa::ensure`] had to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ensured {
    /// A new CA: agents must trust the new `ca.pem`.
    pub new_ca: bool,
    /// A new server certificate (always with a new CA).
    pub new_server_cert: bool,
}

impl LocalCa {
    /// The CA in `dir` for a server certificate valid for `names` (DNS names or IP
    /// addresses). Nothing is read or written until [`ensure`](Self::ensure).
    pub fn new(dir: &Path, names: Vec<String>) -> Self {
        Self {
            dir: dir.to_path_buf(),
            ca_cert_path: dir.join("ca.pem"),
            ca_key_path: dir.join("ca-key.pem"),
            cert_path: dir.join("server.pem"),
            key_path: dir.join("server-key.pem"),
            names,
        }
    }

    /// `localhost`, `127.0.0.1`, `::1` and `host` (when it is a usable, different name).
    pub fn default_names(host: &str) -> Vec<String> {
        let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
            .into_iter()
            .map(String::from)
            .collect();
        let host = host.trim();
        if !host.is_empty() && !names.iter().any(|n| n.eq_ignore_ascii_case(host)) {
            names.push(host.to_string());
        }
        names
    }

    /// Creates what is missing, unreadable as a certificate, expired or about to expire: the
    /// CA (and then a new server certificate), or just the server certificate (also when it
    /// is not the current CA's or does not cover every name). Keeps everything else.
    pub fn ensure(&self) -> Result<Ensured, TlsError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| TlsError::io(&self.dir, e))?;
        let now = OffsetDateTime::now_utc();
        let (ca, new_ca) = match self.load_ca(now)? {
            Some(ca) => (ca, false),
            None => (self.create_ca(now)?, true),
        };
        let new_server_cert = new_ca || !self.server_cert_is_current(&ca, now)?;
        if new_server_cert {
            self.issue_server_cert(&ca, now)?;
        }
        Ok(Ensured {
            new_ca,
            new_server_cert,
        })
    }

    /// The CA, if both files are there, belong together and the CA is not about to expire.
    fn load_ca(&self, now: OffsetDateTime) -> Result<Option<Ca>, TlsError> {
        let (Some(cert_pem), Some(key_pem)) = (
            read_optional(&self.ca_cert_path)?,
            read_optional(&self.ca_key_path)?,
        ) else {
            return Ok(None);
        };
        let parsed = first_cert_der(&cert_pem).and_then(|der| {
            let info = CertInfo::parse(&der)?;
            let key = KeyPair::from_pem(&String::from_utf8_lossy(&key_pem)).ok()?;
            (info.public_key == key.public_key_der()).then_some((der, info, key))
        });
        let Some((der, info, key)) = parsed else {
            tracing::warn!(dir = %self.dir.display(), "local CA files unusable; creating a new CA");
            return Ok(None);
        };
        if info.not_after - now < RENEW_BEFORE {
            tracing::warn!(dir = %self.dir.display(), "local CA expires; creating a new one (agents must trust the new ca.pem)");
            return Ok(None);
        }
        // rcgen signs with a `Certificate`; rebuilt from the file, it carries the same subject
        // and key identifier, so what it signs chains to the CA certificate on disk.
        let params = CertificateParams::from_ca_cert_der(&der.into())?;
        let cert = params.self_signed(&key)?;
        Ok(Some(Ca {
            cert,
            key,
            pem: String::from_utf8_lossy(&cert_pem).into_owned(),
            info,
        }))
    }

    fn create_ca(&self, now: OffsetDateTime) -> Result<Ca, TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        // A random suffix makes every CA's name unique, so a server certificate of an earlier
        // CA is recognised as such by its issuer name.
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("Ampora local CA {suffix}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Ampora");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        let info = CertInfo::parse(cert.der())
            .ok_or_else(|| TlsError::Invalid("generated CA certificate does not parse".into()))?;
        // Key first: a crash between the two writes leaves a key without a certificate, which
        // `load_ca` treats as no CA.
        write_atomic(&self.ca_key_path, key.serialize_pem().as_bytes(), true)?;
        write_atomic(&self.ca_cert_path, pem.as_bytes(), false)?;
        tracing::info!(ca_cert = %self.ca_cert_path.display(), "created a local CA");
        Ok(Ca {
            cert,
            key,
            pem,
            info,
        })
    }

    /// True when the server certificate and key are there, belong together, were issued by
    /// `ca`, cover every name and are not about to expire.
    fn server_cert_is_current(&self, ca: &Ca, now: OffsetDateTime) -> Result<bool, TlsError> {
        let (Some(cert_pem), Some(key_pem)) = (
            read_optional(&self.cert_path)?,
            read_optional(&self.key_path)?,
        ) else {
            return Ok(false);
        };
        let Some(info) = first_cert_der(&cert_pem).and_then(|der| CertInfo::parse(&der)) else {
            return Ok(false);
        };
        let key_matches = KeyPair::from_pem(&String::from_utf8_lossy(&key_pem))
            .is_ok_and(|k| k.public_key_der() == info.public_key);
        Ok(key_matches
            && info.issuer == ca.info.subject
            && info.not_after - now >= RENEW_BEFORE
            && self.names.iter().all(|n| info.covers(n)))
    }

    fn issue_server_cert(&self, ca: &Ca, now: OffsetDateTime) -> Result<(), TlsError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(self.names.clone())?;
        let cn = self
            .names
            .iter()
            .rev()
            .find(|n| n.parse::<std::net::IpAddr>().is_err())
            .map_or("localhost", String::as_str);
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Ampora");
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        params.not_before = now - BACKDATE;
        params.not_after = (now + SERVER_LIFETIME).min(ca.info.not_after);
        let cert = params.signed_by(&key, &ca.cert, &ca.key)?;
        let chain = format!("{}{}", cert.pem(), ca.pem);
        // Key first, then the certificate: a reload between the two sees a mismatched pair,
        // keeps the old one, and loads the new pair once the certificate is written.
        write_atomic(&self.key_path, key.serialize_pem().as_bytes(), true)?;
        write_atomic(&self.cert_path, chain.as_bytes(), false)?;
        tracing::info!(cert = %self.cert_path.display(), names = ?self.names, "issued a server certificate from the local CA");
        Ok(())
    }
}

/// A loaded or created CA, ready to sign.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The certificate as on disk (appended to the server chain).
    pem: String,
    info: CertInfo,
}

/// What `ensure` needs to know about a certificate.
struct CertInfo {
    not_after: OffsetDateTime,
    subject: Vec<u8>,
    issuer: Vec<u8>,
    /// DER SubjectPublicKeyInfo.
    public_key: Vec<u8>,
    dns_names: Vec<String>,
    ips: Vec<std::net::IpAddr>,
}

impl CertInfo {
    fn parse(der: &[u8]) -> Option<Self> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let not_after =
            OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp()).ok()?;
        let mut dns_names = Vec::new();
        let mut ips = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(n) => dns_names.push(n.to_ascii_lowercase()),
                    GeneralName::IPAddress(b) => {
                        if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                            ips.push(std::net::IpAddr::from(v4));
                        } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                            ips.push(std::net::IpAddr::from(v6));
                        }
                    }
                    _ => {}
                }
            }
        }
        Some(Self {
            not_after,
            subject: cert.subject().as_raw().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
            public_key: cert.public_key().raw.to_vec(),
            dns_names,
            ips,
        })
    }

    fn covers(&self, name: &str) -> bool {
        match name.parse::<std::net::IpAddr>() {
            Ok(ip) => self.ips.contains(&ip),
            Err(_) => self.dns_names.contains(&name.to_ascii_lowercase()),
        }
    }
}

fn first_cert_der(pem: &[u8]) -> Option<Vec<u8>> {
    shared::tls::parse_certs_pem(pem)
        .ok()?
        .into_iter()
        .next()
        .map(|c| c.as_ref().to_vec())
}

/// The file's contents, `None` when it does not exist; other errors (permissions) are errors,
/// not a reason to replace the file.
fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TlsError::io(path, e)),
    }
}

/// 16 random bytes, the top bit clear so the DER integer is positive.
fn random_serial() -> SerialNumber {
    let mut b = *uuid::Uuid::new_v4().as_bytes();
    b[0] &= 0x7f;
    SerialNumber::from_slice(&b)
}

/// Writes `path` through a temporary file and a rename, so a reader (the reload task, a
/// restart after a crash) never sees half a file. `private`: readable by the owner only.
fn write_atomic(path: &Path, contents: &[u8], private: bool) -> Result<(), TlsError> {
    let tmp = path.with_extension("pem.tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let write = || -> std::io::Result<()> {
        let mut f = opts.open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| TlsError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        LocalCa::default_names("box.example")
    }

    #[test]
    fn default_names_cover_loopback_and_host() {
        assert_eq!(
            LocalCa::default_names("box.example"),
            ["localhost", "127.0.0.1", "::1", "box.example"]
        );
        assert_eq!(LocalCa::default_names(" localhost\n").len(), 3);
        assert_eq!(LocalCa::default_names("").len(), 3);
    }

    #[test]
    fn creates_once_then_keeps() {
        let dir = tempfile_dir();
        let ca = LocalCa::new(dir.path(), names());
        let first = ca.ensure().expect("ensure");
        assert_eq!(
            first,
            Ensured {
                new_ca: true,
                new_server_cert: true
            }
        );
        let ca_pem = std::fs::read(&ca.ca_cert_path).expect("ca");
        let server_pem = std::fs::read(&ca.cert_path).expect("server");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            for key in [&ca.ca_key_path, &ca.key_path] {
                let mode = std::fs::metadata(key).expect("key").permissions().mode();
                assert_eq!(mode & 0o777, 0o600, "{}", key.display());
            }
        }
        let again = ca.ensure().expect("ensure");
        assert_eq!(
            again,
            Ensured {
                new_ca: false,
                new_server_cert: false
            }
        );
        assert_eq!(std::fs::read(&ca.ca_cert_path).expect("ca"), ca_pem);
        assert_eq!(std::fs::read(&ca.cert_path).expect("server"), server_pem);

        // The chain is leaf then CA, and the leaf covers every name.
        let chain = shared::tls::parse_certs_pem(&server_pem).expect("pem");
        assert_eq!(chain.len(), 2);
        let leaf = CertInfo::parse(&chain[0]).expect("leaf");
        for n in names() {
            assert!(leaf.covers(&n), "{n}");
        }
        let days = (leaf.not_after - OffsetDateTime::now_utc()).whole_days();
        assert!((360..=366).contains(&days), "{days}");
    }

    #[test]
    fn a_new_name_reissues_the_server_cert_with_the_same_ca() {
        let dir = tempfile_dir();
        LocalCa::new(dir.path(), names()).ensure().expect("ensure");
        let mut more = names();
        more.push("other.example".into());
        let ca = LocalCa::new(dir.path(), more);
        assert_eq!(
            ca.ensure().expect("ensure"),
            Ensured {
                new_ca: false,
                new_server_cert: true
            }
        );
        // And the new server certificate still chains to the CA on disk.
        let ca_pem = std::fs::read(&ca.ca_cert_path).expect("ca");
        let chain = shared::tls::parse_certs_pem(&std::fs::read(&ca.cert_path).expect("chain"))
            .expect("pem");
        let ca_info = CertInfo::parse(&first_cert_der(&ca_pem).expect("ca der")).expect("ca");
        let leaf = CertInfo::parse(&chain[0]).expect("leaf");
        assert_eq!(leaf.issuer, ca_info.subject);
        assert!(leaf.covers("other.example"));
    }

    #[test]
    fn an_expiring_server_cert_is_renewed_and_a_broken_ca_replaced() {
        let dir = tempfile_dir();
        let ca = LocalCa::new(dir.path(), names());
        ca.ensure().expect("ensure");
        // Reissue with a lifetime inside the renewal window.
        let now = OffsetDateTime::now_utc();
        let loaded = ca.load_ca(now).expect("load").expect("ca");
        let mut params = CertificateParams::new(names()).expect("params");
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(3);
        let key = KeyPair::generate().expect("key");
        let cert = params
            .signed_by(&key, &loaded.cert, &loaded.key)
            .expect("sign");
        write_atomic(&ca.key_path, key.serialize_pem().as_bytes(), true).expect("key");
        write_atomic(&ca.cert_path, cert.pem().as_bytes(), false).expect("cert");
        assert_eq!(
            ca.ensure().expect("ensure"),
            Ensured {
                new_ca: false,
                new_server_cert: true
            }
        );

        std::fs::write(&ca.ca_cert_path, "not a certificate").expect("write");
        assert_eq!(
            ca.ensure().expect("ensure"),
            Ensured {
                new_ca: true,
                new_server_cert: true
            }
        );
    }

    fn tempfile_dir() -> tempfile::TempDir {
        tempfile::tempdir().expect("temp dir")
    }
}
