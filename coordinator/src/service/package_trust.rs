//! Which signatures make a package build importable: the operator's trust policy and the
//! check of a signature over the bytes being imported. Two kinds of signature are known:
//!
//! - **minisign** (Ed25519, prehashed): the `.minisig` file; checked as the bytes stream in.
//! - **cosign with a key** (ECDSA P-256 over the file's SHA-256): the base64 signature
//!   `cosign sign-blob --key` writes, a Sigstore bundle (`messageSignature`, as
//!   `cosign sign-blob --bundle` writes), or an older cosign bundle (`base64Signature`).
//!   Checked against the import's SHA-256 once the last byte is in. Keyless bundles (a
//!   Fulcio certificate instead of a key) would need the public Sigstore roots and logs,
//!   which an air-gapped server cannot reach: they verify against no trusted key and are
//!   refused as such.
//!
//! Ampora never holds a signing key: it only verifies.

use base64::Engine as _;
use minisign_verify::{PublicKey, Signature, StreamVerifier};
use p256::ecdsa::signature::hazmat::PrehashVerifier;
use p256::ecdsa::{Signature as EcdsaSignature, VerifyingKey};
use p256::pkcs8::{DecodePublicKey, EncodePublicKey};
use sha2::{Digest, Sha256};

/// The operator's trust policy (`packages.trusted_keys`, `packages.trusted_cosign_keys`,
/// `packages.allow_unsigned`).
#[derive(Clone)]
pub struct TrustPolicy {
    /// The minisign public keys (as configured, base64) and their decoded form.
    minisign: Vec<(String, PublicKey)>,
    /// The cosign public keys: an id (`cosign:` and 16 hex digits of the SHA-256 of the key's
    /// DER) and the key.
    cosign: Vec<(String, VerifyingKey)>,
    pub allow_unsigned: bool,
}

impl std::fmt::Debug for TrustPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let minisign: Vec<&str> = self.minisign.iter().map(|(k, _)| k.as_str()).collect();
        let cosign: Vec<&str> = self.cosign.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("TrustPolicy")
            .field("minisign", &minisign)
            .field("cosign", &cosign)
            .field("allow_unsigned", &self.allow_unsigned)
            .finish()
    }
}

impl TrustPolicy {
    /// `minisign`: the base64 line of a `minisign.pub` file each. `cosign`: a PEM public
    /// key (`cosign.pub`) each, as text or as the path of a file holding it.
    pub fn new(
        minisign: &[String],
        cosign: &[String],
        allow_unsigned: bool,
    ) -> Result<Self, String> {
        let minisign = minisign
            .iter()
            .map(|k| {
                PublicKey::from_base64(k.trim())
                    .map(|pk| (k.trim().to_owned(), pk))
                    .map_err(|e| {
                        format!("packages.trusted_keys: `{k}` is not a minisign public key: {e}")
                    })
            })
            .collect::<Result<_, _>>()?;
        let cosign = cosign
            .iter()
            .map(|k| cosign_key(k))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            minisign,
            cosign,
            allow_unsigned,
        })
    }

    /// Judges a signature's form before any byte of the build is read; `None` for an
    /// unsigned build the policy allows.
    pub fn admit(&self, signature: Option<&str>) -> Result<Option<Pending>, String> {
        let Some(text) = signature else {
            return if self.allow_unsigned {
                Ok(None)
            } else {
                Err("the artifact is unsigned, and the trust policy accepts only signed ones (packages.allow_unsigned)".into())
            };
        };
        if text.trim_start().starts_with("untrusted comment:") {
            let sig = Signature::decode(text)
                .map_err(|e| format!("the signature is not a minisign signature: {e}"))?;
            // The key whose id the signature names (minisign refuses the others at once).
            let key = self
                .minisign
                .iter()
                .position(|(_, pk)| pk.verify_stream(&sig).is_ok())
                .ok_or("the signature is not by a key the trust policy trusts (packages.trusted_keys), or is a legacy (not prehashed) minisign signature")?;
            return Ok(Some(Pending::Minisign { key, sig }));
        }
        let cosign = parse_cosign(text)?;
        if self.cosign.is_empty() {
            return Err("a cosign signature, and the trust policy has no cosign key (packages.trusted_cosign_keys)".into());
        }
        Ok(Some(Pending::Cosign(cosign)))
    }

    /// The check that runs over the bytes as they are imported.
    pub fn verifier<'a>(&'a self, pending: &'a Option<Pending>) -> Result<Verifier<'a>, String> {
        Ok(match pending {
            None => Verifier::Unsigned,
            Some(Pending::Minisign { key, sig }) => {
                let (id, pk) = &self.minisign[*key];
                Verifier::Minisign {
                    id,
                    stream: Box::new(
                        pk.verify_stream(sig)
                            .map_err(|e| format!("signature check: {e}"))?,
                    ),
                }
            }
            Some(Pending::Cosign(c)) => Verifier::Cosign {
                policy: self,
                sig: c,
            },
        })
    }
}

/// A signature whose form was admitted, to be checked over the bytes.
pub enum Pending {
    Minisign { key: usize, sig: Signature },
    Cosign(CosignSignature),
}

/// A cosign signature and, from a bundle, the digest it claims to sign.
#[derive(Debug)]
pub struct CosignSignature {
    sig: EcdsaSignature,
    claimed_sha256: Option<Vec<u8>>,
}

/// Checks a signature over the bytes of one import.
pub enum Verifier<'a> {
    Unsigned,
    Minisign {
        id: &'a str,
        // Boxed: the hash state is large beside the other variants.
        stream: Box<StreamVerifier<'a>>,
    },
    Cosign {
        policy: &'a TrustPolicy,
        sig: &'a CosignSignature,
    },
}

impl Verifier<'_> {
    pub fn update(&mut self, chunk: &[u8]) {
        if let Self::Minisign { stream, .. } = self {
            stream.update(chunk);
        }
    }

    /// After the last byte, with the file's SHA-256: the id of the key that signed it
    /// (`None`: unsigned, as allowed), or why the signature does not verify.
    pub fn finish(self, sha256: &[u8]) -> Result<Option<String>, String> {
        const NOT_SIGNED: &str =
            "the signature does not verify: the artifact is not what was signed";
        match self {
            Self::Unsigned => Ok(None),
            Self::Minisign { id, mut stream } => stream
                .finalize()
                .map(|()| Some(id.to_owned()))
                .map_err(|_| NOT_SIGNED.to_owned()),
            Self::Cosign { policy, sig } => {
                if sig.claimed_sha256.as_deref().is_some_and(|d| d != sha256) {
                    return Err("the bundle's message digest is not the artifact's SHA-256".into());
                }
                policy
                    .cosign
                    .iter()
                    .find(|(_, key)| key.verify_prehash(sha256, &sig.sig).is_ok())
                    .map(|(id, _)| Some(id.clone()))
                    .ok_or_else(|| {
                        "the cosign signature does not verify with a key the trust policy trusts (packages.trusted_cosign_keys): another key, another artifact, or a keyless bundle".to_owned()
                    })
            }
        }
    }
}

/// A cosign public key from PEM text or a file holding it.
fn cosign_key(k: &str) -> Result<(String, VerifyingKey), String> {
    let pem = if k.contains("-----BEGIN") {
        k.to_owned()
    } else {
        std::fs::read_to_string(k.trim())
            .map_err(|e| format!("packages.trusted_cosign_keys: reading {k}: {e}"))?
    };
    let key = VerifyingKey::from_public_key_pem(pem.trim()).map_err(|e| {
        format!("packages.trusted_cosign_keys: not an ECDSA P-256 public key (PEM): {e}")
    })?;
    let der = key
        .to_public_key_der()
        .map_err(|e| format!("packages.trusted_cosign_keys: {e}"))?;
    let id = hex::encode(Sha256::digest(der.as_bytes()));
    Ok((format!("cosign:{}", &id[..16]), key))
}

fn b64(what: &str, text: &str) -> Result<Vec<u8>, String> {
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| format!("{what} is not base64: {e}"))
}

/// The signature out of what `cosign sign-blob` writes: a base64 DER signature, a Sigstore
/// bundle, or an older cosign bundle.
fn parse_cosign(text: &str) -> Result<CosignSignature, String> {
    let text = text.trim();
    let (sig_b64, claimed) = if text.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("the signature is not a Sigstore bundle (JSON): {e}"))?;
        if let Some(m) = v.get("messageSignature") {
            let sig = m["signature"]
                .as_str()
                .ok_or("the Sigstore bundle's messageSignature has no signature")?
                .to_owned();
            let digest = &m["messageDigest"];
            let claimed = match digest["digest"].as_str() {
                Some(d) if digest["algorithm"] == "SHA2_256" => {
                    Some(b64("the bundle's digest", d)?)
                }
                Some(_) => return Err("the Sigstore bundle's digest is not SHA2_256".into()),
                None => None,
            };
            (sig, claimed)
        } else if let Some(s) = v.get("base64Signature").and_then(|s| s.as_str()) {
            (s.to_owned(), None)
        } else if v.get("dsseEnvelope").is_some() {
            return Err(
                "a Sigstore bundle of an attestation (DSSE), not of a blob signature".into(),
            );
        } else {
            return Err(
                "a JSON signature that is neither a Sigstore bundle nor a cosign bundle".into(),
            );
        }
    } else {
        (text.to_owned(), None)
    };
    let der = b64("the cosign signature", &sig_b64)?;
    let sig = EcdsaSignature::from_der(&der)
        .or_else(|_| EcdsaSignature::from_slice(&der))
        .map_err(|_| {
            "the signature is neither minisign nor a cosign (ECDSA P-256) signature".to_owned()
        })?;
    Ok(CosignSignature {
        sig,
        claimed_sha256: claimed,
    })
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::hazmat::PrehashSigner;
    use p256::ecdsa::SigningKey;
    use p256::pkcs8::LineEnding;

    use super::*;

    fn keys(seed: u8) -> (SigningKey, String) {
        let sk = SigningKey::from_slice(&[seed; 32]).expect("key");
        let pem = sk
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        (sk, pem)
    }

    fn sign(sk: &SigningKey, data: &[u8]) -> String {
        let sig: EcdsaSignature = sk.sign_prehash(&Sha256::digest(data)).expect("sign");
        base64::engine::general_purpose::STANDARD.encode(sig.to_der().as_bytes())
    }

    fn check(policy: &TrustPolicy, sig: &str, data: &[u8]) -> Result<Option<String>, String> {
        let pending = policy.admit(Some(sig))?;
        let mut v = policy.verifier(&pending)?;
        v.update(data);
        v.finish(&Sha256::digest(data))
    }

    #[test]
    fn cosign_signatures_verify_against_trusted_keys_only() {
        let (sk, pem) = keys(7);
        let (other, _) = keys(9);
        let policy = TrustPolicy::new(&[], &[pem], false).expect("policy");
        let data = b"otelcol 0.2.0".as_slice();
        let raw = sign(&sk, data);
        let signer = check(&policy, &raw, data).expect("raw signature");
        assert!(signer.is_some_and(|s| s.starts_with("cosign:")));

        let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data));
        let bundle = serde_json::json!({
            "mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json",
            "verificationMaterial": { "publicKey": { "hint": "k" } },
            "messageSignature": {
                "messageDigest": { "algorithm": "SHA2_256", "digest": digest },
                "signature": raw,
            }
        })
        .to_string();
        assert!(check(&policy, &bundle, data).is_ok(), "Sigstore bundle");
        let legacy = serde_json::json!({ "base64Signature": raw }).to_string();
        assert!(check(&policy, &legacy, data).is_ok(), "cosign bundle");

        assert!(
            check(&policy, &raw, b"otelcol 0.2.1").is_err(),
            "other bytes"
        );
        assert!(
            check(&policy, &sign(&other, data), data).is_err(),
            "other key"
        );
        let lying = bundle.replace(
            &digest,
            &base64::engine::general_purpose::STANDARD.encode([0u8; 32]),
        );
        assert!(
            check(&policy, &lying, b"otelcol 0.2.0").is_err(),
            "digest claimed for other bytes"
        );
        let no_cosign = TrustPolicy::new(&[], &[], false).expect("policy");
        assert!(
            no_cosign.admit(Some(&raw)).is_err(),
            "no cosign key trusted"
        );
        assert!(policy.admit(Some("not a signature")).is_err());
        assert!(policy.admit(None).is_err(), "unsigned, not allowed");
    }
}
