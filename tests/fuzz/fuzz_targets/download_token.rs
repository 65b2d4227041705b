//! Fuzz target `download_token`: the package download credential in `shared::download_token`,
//! the first thing the agent listener's download route parses.
//!
//! Asserts: arbitrary text never verifies under a key (without the key a MAC cannot be
//! produced); a token minted for a blob verifies for that blob and the agent it names, and
//! for no other blob; any one byte changed in a minted token makes it fail.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::download_token::DownloadKey;
use shared::ids::InstanceUid;

const SHA: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

fuzz_target!(|data: &[u8]| {
    let key = DownloadKey::new([7; 32]);
    if let Ok(text) = std::str::from_utf8(data) {
        assert!(key.verify(text, SHA, 0).is_err(), "{text:?} verified");
    }
    let mut uid = [0u8; 16];
    for (i, b) in data.iter().take(16).enumerate() {
        uid[i] = *b;
    }
    let uid = InstanceUid::from_slice(&uid).expect("16 bytes");
    let expires = data.get(16).map_or(1, |b| u64::from(*b) + 1);
    let token = key.mint(uid, SHA, expires);
    assert_eq!(key.verify(&token, SHA, 0), Ok(uid));
    assert!(key.verify(&token, OTHER, 0).is_err());
    if let Some(&at) = data.get(17) {
        let mut bytes = token.clone().into_bytes();
        let i = usize::from(at) % bytes.len();
        bytes[i] = if bytes[i] == b'0' { b'1' } else { b'0' };
        if let Ok(changed) = String::from_utf8(bytes) {
            if changed != token {
                assert!(
                    key.verify(&changed, SHA, 0).is_err(),
                    "{changed:?} verified"
                );
            }
        }
    }
});
