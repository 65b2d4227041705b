//! Times and durations as operators type them: `90`, `30s`, `15m`, `24h`, `7d`, or an RFC 3339
//! timestamp (parsed by the `time` crate); and timestamps printed back in that form.

use anyhow::{bail, Context as _};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Parses `90`, `30s`, `15m`, `24h`, `7d` into seconds.
pub fn parse_ttl(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().with_context(|| format!("bad duration `{s}`"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => bail!("bad duration unit in `{s}` (use s, m, h or d)"),
    };
    Ok(n * mult)
}

/// A point in time as Unix ms: an RFC 3339 timestamp, or a duration (`parse_ttl` form) before
/// `now_ms`.
pub fn parse_time(s: &str, now_ms: i64) -> anyhow::Result<i64> {
    let s = s.trim();
    if s.contains('-') || s.contains(':') {
        let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| {
            anyhow::anyhow!("`{s}` is not an RFC 3339 time such as 2025-06-01T12:00:00Z: {e}")
        })?;
        return i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
            .with_context(|| format!("`{s}` is out of range"));
    }
    let secs = parse_ttl(s).with_context(|| {
        format!("`{s}` is neither an RFC 3339 time nor a duration such as 15m, 1h or 7d")
    })?;
    let ms = i64::try_from(secs.saturating_mul(1_000)).unwrap_or(i64::MAX);
    Ok(now_ms.saturating_sub(ms))
}

/// Unix ms as an RFC 3339 UTC timestamp with milliseconds (`2025-06-01T12:00:00.250Z`: one
/// width, so a column of them lines up); the number itself when it is out of range.
pub fn format_ms(ms: i64) -> String {
    let form =
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(form).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90").expect("ok"), 90);
        assert_eq!(parse_ttl("15m").expect("ok"), 900);
        assert_eq!(parse_ttl("24h").expect("ok"), 86_400);
        assert_eq!(parse_ttl("7d").expect("ok"), 604_800);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let now = 1_750_000_000_000;
        assert_eq!(parse_time("1h", now).expect("ok"), now - 3_600_000);
        assert_eq!(parse_time("90", now).expect("ok"), now - 90_000);
        assert_eq!(parse_time("7d", now).expect("ok"), now - 604_800_000);
        assert_eq!(parse_time("1970-01-01T00:00:00Z", now).expect("ok"), 0);
        assert_eq!(
            parse_time("2025-06-01T12:00:00Z", now).expect("ok"),
            1_748_779_200_000
        );
        assert_eq!(
            parse_time("2025-06-01T14:00:00+02:00", now).expect("ok"),
            1_748_779_200_000
        );
        assert_eq!(
            parse_time("2025-06-01 11:30:00.25-00:30", now).expect("ok"),
            1_748_779_200_250
        );
        assert_eq!(
            parse_time("2024-02-29T00:00:00.123456Z", now).expect("ok"),
            1_709_164_800_123
        );
        assert_eq!(parse_time("1969-12-31T23:59:59Z", now).expect("ok"), -1_000);
        assert_eq!(format_ms(1_748_779_200_250), "2025-06-01T12:00:00.250Z");
        assert_eq!(format_ms(0), "1970-01-01T00:00:00.000Z");
        for bad in [
            "2025-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-06-01T24:00:00Z",
            "2025-06-01T12:00:00",
            "2025-06-01T12:00:00+2:00",
            "2025-06-01",
            "yesterday",
            "1w",
            "2025-06-01T12:00:00.Z",
        ] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }
}
