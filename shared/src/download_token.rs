//! Download credentials for package artifacts Ampora hosts: `amp-dl.<uid>.<sha256>.<expiry>.<mac>`,
//! an HMAC-SHA256 under a key the coordinator that mints them and the gateway that checks them
//! share. A token names one agent and one blob and expires ([`MAX_TTL_SECS`] at most): one
//! for another blob or agent opens nothing, and nothing is stored, so there is no table of
//! tokens to leak. The gateway learns the agent it was minted for from the token itself and
//! puts it in its log and metrics, never the token.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ids::InstanceUid;

const PREFIX: &str = "amp-dl.";

/// The longest a download token lives (the bound: 15 minutes).
pub const MAX_TTL_SECS: u64 = 15 * 60;

/// The shared secret. Debug never shows it.
#[derive(Clone)]
pub struct DownloadKey([u8; 32]);

impl std::fmt::Debug for DownloadKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DownloadKey(..)")
    }
}

/// Why a presented token opens nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DownloadRefusal {
    #[error("not a download token")]
    Malformed,
    #[error("the token is for another artifact")]
    OtherBlob,
    #[error("the token has expired")]
    Expired,
    #[error("the token's signature does not verify")]
    BadMac,
}

impl DownloadRefusal {
    /// A bounded metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Malformed => "malformed",
            Self::OtherBlob => "other_blob",
            Self::Expired => "expired",
            Self::BadMac => "bad_mac",
        }
    }
}

impl DownloadKey {
    pub fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn random() -> Self {
        Self(rand::random())
    }

    fn mac(&self, body: &str) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).expect("HMAC takes any key");
        m.update(body.as_bytes());
        m
    }

    /// HMAC-SHA256 of `body` under this key: the other credentials signed with the shared
    /// key (`own_telemetry::MetricsCredential`) use it, with their own prefix in `body`.
    pub fn sign(&self, body: &str) -> Vec<u8> {
        self.mac(body).finalize().into_bytes().to_vec()
    }

    /// Whether `mac` is [`DownloadKey::sign`] of `body` (in constant time).
    pub fn verify_signed(&self, body: &str, mac: &[u8]) -> bool {
        self.mac(body).verify_slice(mac).is_ok()
    }

    /// A token for `uid` to fetch blob `sha256` (lowercase hex) until `expires_secs` (Unix).
    pub fn mint(&self, uid: InstanceUid, sha256: &str, expires_secs: u64) -> String {
        let body = format!(
            "{PREFIX}{}.{sha256}.{expires_secs}",
            hex::encode(uid.as_bytes())
        );
        let mac = hex::encode(self.mac(&body).finalize().into_bytes());
        format!("{body}.{mac}")
    }

    /// The agent `token` was minted for, if it opens blob `sha256` at `now_secs`.
    pub fn verify(
        &self,
        token: &str,
        sha256: &str,
        now_secs: u64,
    ) -> Result<InstanceUid, DownloadRefusal> {
        let (body, mac) = token.rsplit_once('.').ok_or(DownloadRefusal::Malformed)?;
        let mut parts = body
            .strip_prefix(PREFIX)
            .ok_or(DownloadRefusal::Malformed)?
            .split('.');
        let (Some(uid), Some(blob), Some(exp), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(DownloadRefusal::Malformed);
        };
        let uid = hex::decode(uid)
            .ok()
            .and_then(|b| InstanceUid::from_slice(&b))
            .ok_or(DownloadRefusal::Malformed)?;
        let exp: u64 = exp.parse().map_err(|_| DownloadRefusal::Malformed)?;
        let mac = hex::decode(mac).map_err(|_| DownloadRefusal::Malformed)?;
        // The MAC first: nothing about a forged token is told apart from another.
        self.mac(body)
            .verify_slice(&mac)
            .map_err(|_| DownloadRefusal::BadMac)?;
        if blob != sha256 {
            return Err(DownloadRefusal::OtherBlob);
        }
        if now_secs >= exp {
            return Err(DownloadRefusal::Expired);
        }
        Ok(uid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn uid(b: u8) -> InstanceUid {
        InstanceUid::from_slice(&[b; 16]).expect("16 bytes")
    }

    #[test]
    fn a_token_opens_its_blob_until_it_expires() {
        let k = DownloadKey::random();
        let t = k.mint(uid(1), SHA, 1_000);
        assert_eq!(k.verify(&t, SHA, 999), Ok(uid(1)));
        assert_eq!(k.verify(&t, SHA, 1_000), Err(DownloadRefusal::Expired));
        let other = SHA.replace('0', "f");
        assert_eq!(k.verify(&t, &other, 999), Err(DownloadRefusal::OtherBlob));
    }

    #[test]
    fn a_changed_or_foreign_token_opens_nothing() {
        let k = DownloadKey::random();
        let t = k.mint(uid(1), SHA, 1_000);
        // Another agent's uid, or a later expiry, put into a genuine token.
        let forged = t.replacen(&hex::encode([1u8; 16]), &hex::encode([2u8; 16]), 1);
        assert_eq!(k.verify(&forged, SHA, 1), Err(DownloadRefusal::BadMac));
        let later = t.replacen(".1000.", ".9999999999.", 1);
        assert_eq!(k.verify(&later, SHA, 1), Err(DownloadRefusal::BadMac));
        // Minted under another key.
        let foreign = DownloadKey::random().mint(uid(1), SHA, 1_000);
        assert_eq!(k.verify(&foreign, SHA, 1), Err(DownloadRefusal::BadMac));
        for junk in [
            "",
            "amp-dl.",
            "amp-bs.x.y",
            "amp-dl.a.b.c.d",
            &format!("{t}.x"),
        ] {
            assert!(k.verify(junk, SHA, 1).is_err(), "{junk:?} must not verify");
        }
    }
}
