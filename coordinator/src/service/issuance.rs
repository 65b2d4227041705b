//! When an agent may be issued a new identity.
//!
//! Issuing costs a signature, a stored certificate, an audit row and, once superseded, an
//! entry in the revoked set every gateway and CRL carries. So a certificate is issued only
//! when the agent needs one (none current, renewal due, a CSR for a key other than the
//! current certificate's, or a generated key that was lost), and at most
//! [`ISSUE_BURST`] times per [`ISSUE_WINDOW_MS`] per agent whatever it sends.

use gateway::tls::{cert_public_key, csr_public_key};

/// Identities one agent may be issued within [`ISSUE_WINDOW_MS`].
pub const ISSUE_BURST: usize = 3;
/// The window of the issuance limit: ten minutes.
pub const ISSUE_WINDOW_MS: i64 = 10 * 60 * 1000;

/// Whether another identity may be issued now, given the times of the last ones (pruned to
/// the window here).
pub fn allowed(issued_ms: &mut Vec<i64>, now_ms: i64) -> bool {
    issued_ms.retain(|t| now_ms - *t < ISSUE_WINDOW_MS);
    issued_ms.len() < ISSUE_BURST
}

/// Checks a CSR's key (type and size) without signing anything; `Err` is for the agent.
pub fn check_csr(csr_pem: &str) -> Result<(), String> {
    csr_public_key(csr_pem).map(drop).map_err(|e| e.to_string())
}

/// Whether `csr_pem` asks for the key `cert_pem` already certifies. `Err` for a bad CSR.
pub fn same_key(csr_pem: &str, cert_pem: &str) -> Result<bool, String> {
    let wanted = csr_public_key(csr_pem).map_err(|e| e.to_string())?;
    Ok(cert_public_key(cert_pem).is_some_and(|have| have == wanted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issuance_is_limited_per_window() {
        let mut issued = Vec::new();
        for i in 0..ISSUE_BURST {
            assert!(allowed(&mut issued, 1_000 + i as i64), "issue {i}");
            issued.push(1_000 + i as i64);
        }
        assert!(!allowed(&mut issued, 2_000), "the burst is used up");
        assert!(
            allowed(&mut issued, 1_000 + ISSUE_WINDOW_MS),
            "the oldest leaves the window"
        );
    }
}
