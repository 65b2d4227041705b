//! Fuzz target `bootstrap_token`: the token formats in `shared::token`
//! (`check_bootstrap_token`, `is_api_token`, `display_prefix`).
//!
//! Asserts: an accepted bootstrap token is exactly `amp-bs.<lowercase base32>.<crc>` with the
//! CRC-32 of everything before the last dot in 8 lowercase hex digits; a token built that way
//! from any secret bytes is accepted; a display prefix is a prefix of the token, at most 11
//! characters, and shows at most 4 characters of a bootstrap token's secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::token::{check_bootstrap_token, display_prefix, is_api_token};

const PREFIX: &str = "amp-bs.";

fn is_base32_lower(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || (b'2'..=b'7').contains(&b))
}

fn check_display(token: &str) {
    let shown = display_prefix(token);
    let head = shown.strip_suffix('…').expect("ends with an ellipsis");
    assert!(
        token.starts_with(head),
        "{shown:?} is not a prefix of the token"
    );
    assert!(head.chars().count() <= 11, "{shown:?} is too long");
    if let Some(secret) = head.strip_prefix(PREFIX) {
        assert!(secret.chars().count() <= 4, "{shown:?} shows the secret");
    }
}

fuzz_target!(|data: &[u8]| {
    // Anything but UTF-8 never reaches these functions: header values are checked first.
    if let Ok(token) = std::str::from_utf8(data) {
        if let Ok(accepted) = check_bootstrap_token(token) {
            assert_eq!(accepted, token);
            let rest = token.strip_prefix(PREFIX).expect("prefix");
            let (secret, crc) = rest.rsplit_once('.').expect("a CRC after the last dot");
            assert!(
                !secret.is_empty() && is_base32_lower(secret),
                "secret {secret:?}"
            );
            let body = &token[..PREFIX.len() + secret.len()];
            assert_eq!(
                crc,
                format!("{:08x}", crc32fast::hash(body.as_bytes())),
                "{token:?}"
            );
        }
        if is_api_token(token) {
            assert!(token.len() > "amp-api.".len() && token.starts_with("amp-api."));
        }
        check_display(token);
    }

    // Every secret spelled the documented way is accepted, whatever its bytes.
    let secret = base32::encode(base32::Alphabet::Rfc4648Lower { padding: false }, data);
    if !secret.is_empty() {
        let body = format!("{PREFIX}{secret}");
        let token = format!("{body}.{:08x}", crc32fast::hash(body.as_bytes()));
        assert_eq!(check_bootstrap_token(&token), Ok(token.as_str()));
        check_display(&token);
    }
});
