//! Token formats.
//!
//! A bootstrap token reads `amp-bs.<base32 secret>.<crc>`: 20 random bytes in unpadded lowercase
//! RFC 4648 base32, then the CRC-32 of the text before the last dot as 8 lowercase hex digits.
//! The CRC is checked before any lookup, so a truncated or mistyped token is reported as
//! malformed without touching the store. Only the SHA-256 of the whole token is ever stored.
//!
//! Operator API tokens read `amp-api.<base32 secret>` and are stored the same way.

use rand::RngCore;
use sha2::{Digest, Sha256};

const BOOTSTRAP_PREFIX: &str = "amp-bs.";
const API_PREFIX: &str = "amp-api.";
const ALPHABET: base32::Alphabet = base32::Alphabet::Rfc4648Lower { padding: false };

/// SHA-256 of a token's full text: the only form in which tokens are stored.
pub type TokenHash = [u8; 32];

pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

fn random_secret() -> String {
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    base32::encode(ALPHABET, &bytes)
}

/// A new bootstrap token in its full text form. Show it once; store [`hash_token`] of it.
pub fn new_bootstrap_token() -> String {
    let body = format!("{BOOTSTRAP_PREFIX}{}", random_secret());
    let crc = crc32fast::hash(body.as_bytes());
    format!("{body}.{crc:08x}")
}

/// A new operator API token.
pub fn new_api_token() -> String {
    format!("{API_PREFIX}{}", random_secret())
}

/// Why a bootstrap token's text is not acceptable, judged without any lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("malformed token")]
    Malformed,
}

/// Checks shape and CRC; returns the token unchanged when it is well-formed.
pub fn check_bootstrap_token(token: &str) -> Result<&str, TokenFormatError> {
    let rest = token
        .strip_prefix(BOOTSTRAP_PREFIX)
        .ok_or(TokenFormatError::Malformed)?;
    let (secret, crc) = rest.rsplit_once('.').ok_or(TokenFormatError::Malformed)?;
    if secret.is_empty() || base32::decode(ALPHABET, secret).is_none() || crc.len() != 8 {
        return Err(TokenFormatError::Malformed);
    }
    // Digits checked first: `from_str_radix` also takes uppercase and a leading `+`, spellings
    // no issued token has.
    if !crc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(TokenFormatError::Malformed);
    }
    let body = &token[..BOOTSTRAP_PREFIX.len() + secret.len()];
    let want = u32::from_str_radix(crc, 16).map_err(|_| TokenFormatError::Malformed)?;
    if crc32fast::hash(body.as_bytes()) != want {
        return Err(TokenFormatError::Malformed);
    }
    Ok(token)
}

/// True when the text looks like an API token (cheap pre-check before a lookup).
pub fn is_api_token(token: &str) -> bool {
    token
        .strip_prefix(API_PREFIX)
        .is_some_and(|s| !s.is_empty())
}

/// A short, non-secret display prefix of a token, e.g. `amp-bs.k3jd…`.
pub fn display_prefix(token: &str) -> String {
    let cut = token.char_indices().nth(11).map_or(token.len(), |(i, _)| i);
    format!("{}…", &token[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_are_well_formed() {
        let t = new_bootstrap_token();
        assert!(t.starts_with("amp-bs."));
        assert_eq!(check_bootstrap_token(&t), Ok(t.as_str()));
        assert_eq!(t.split('.').count(), 3);
    }

    #[test]
    fn truncation_and_typos_are_malformed() {
        let t = new_bootstrap_token();
        assert_eq!(
            check_bootstrap_token(&t[..t.len() - 1]),
            Err(TokenFormatError::Malformed)
        );
        let cut = t.find('.').expect("dot") + 5;
        let truncated_secret = format!("{}{}", &t[..cut], &t[t.rfind('.').expect("dot")..]);
        assert_eq!(
            check_bootstrap_token(&truncated_secret),
            Err(TokenFormatError::Malformed)
        );
        assert_eq!(
            check_bootstrap_token("Bearer x"),
            Err(TokenFormatError::Malformed)
        );
    }

    /// Fuzzing finding (tests/fuzz/corpus/bootstrap_token/found-crc-spelling): the CRC was
    /// parsed as a number, so `0BAEE47D` and `+baee47d` passed for `0baee47d`. A token differing
    /// from the issued one only in that spelling hashes differently: it must be reported as
    /// malformed, not looked up as an unknown token.
    #[test]
    fn crc_is_eight_lowercase_hex_digits() {
        let good = "amp-bs.goodgood.0baee47d";
        assert_eq!(check_bootstrap_token(good), Ok(good));
        for bad in [
            "amp-bs.goodgood.0baee47D",
            "amp-bs.goodgood.0BAEE47D",
            "amp-bs.goodgood.+baee47d",
        ] {
            assert_eq!(
                check_bootstrap_token(bad),
                Err(TokenFormatError::Malformed),
                "{bad}"
            );
        }
    }

    #[test]
    fn hashes_differ_per_token() {
        assert_ne!(
            hash_token(&new_bootstrap_token()),
            hash_token(&new_bootstrap_token())
        );
    }
}
