//! Small wire helpers shared by both transports: limits, gzip and `Retry-After`. The
//! WebSocket message header lives in [`shared::codec`], shared with the server.

use std::io::Read;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::ClientError;

/// Largest message we accept (after decompression); the spec's recommended default.
pub(crate) const MAX_MESSAGE: usize = 64 << 20;

/// Largest error body we keep from a refused request: enough for a reason, not for a dump.
pub(crate) const MAX_ERROR_BODY: usize = 4096;

pub(crate) fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(data.len() / 2 + 32),
        flate2::Compression::fast(),
    );
    // Writing into a Vec cannot fail.
    let _ = enc.write_all(data);
    enc.finish().unwrap_or_default()
}

/// Gunzips at most `limit` bytes; more is an error rather than a memory blow-up.
pub(crate) fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ClientError::Protocol(format!("bad gzip body: {e}")))?;
    if out.len() > limit {
        return Err(ClientError::Protocol(format!(
            "decompressed body exceeds {limit} bytes"
        )));
    }
    Ok(out)
}

/// `Retry-After`: delay-seconds or an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
/// Dates in the past mean "now"; anything unparsable is ignored (the caller backs off anyway).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = parse_imf_fixdate(value)?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(at.saturating_sub(now)))
}

/// Seconds since the Unix epoch for an IMF-fixdate.
fn parse_imf_fixdate(s: &str) -> Option<u64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let mut it = s.split_ascii_whitespace();
    let _weekday = it.next()?.strip_suffix(',')?;
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    let year: i64 = it.next()?.parse().ok()?;
    let mut hms = it.next()?.split(':');
    let h: u64 = hms.next()?.parse().ok()?;
    let m: u64 = hms.next()?.parse().ok()?;
    let sec: u64 = hms.next()?.parse().ok()?;
    if it.next()? != "GMT" || it.next().is_some() || !(1..=31).contains(&day) || h > 23 || m > 59 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let days = u64::try_from(days).ok()?;
    Some(days * 86_400 + h * 3600 + m * 60 + sec.min(60))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_round_trip_and_limit() {
        let data = b"hello hello hello hello".repeat(100);
        let z = gzip(&data);
        assert_eq!(gunzip(&z, data.len()).expect("fits"), data);
        assert!(gunzip(&z, data.len() - 1).is_err());
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("30"), Some(Duration::from_secs(30)));
        assert_eq!(
            parse_imf_fixdate("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon"), None);
    }
}
