//! Times as RFC 3339 text, the one form every Signet piece writes and reads.

pub use time::OffsetDateTime;

use time::format_description::well_known::Rfc3339;

/// `t` as RFC 3339 in its own offset (`Z` for UTC), sub-seconds only when it has
/// them; empty for a time RFC 3339 cannot write (a year outside 0..=9999).
pub fn format(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// The time now, RFC 3339 in UTC.
pub fn now() -> String {
    format(OffsetDateTime::now_utc())
}

/// Unix seconds as RFC 3339 in UTC, or the number itself if RFC 3339 cannot write it.
pub fn from_unix_seconds(t: i64) -> String {
    OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| d.format(&Rfc3339).ok())
        .unwrap_or_else(|| t.to_string())
}

/// Milliseconds since the epoch as RFC 3339 in UTC, whole seconds
/// (`1970-01-01T00:00:00Z`); empty if out of range.
pub fn whole_seconds_from_ms(ms: u64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(|t| {
            format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            )
        })
        .unwrap_or_default()
}

/// `t` in UTC with exactly three digits of milliseconds (`...T10:00:00.000Z`): one
/// text for one instant, as the audit log's canonical form needs.
pub fn millis(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

/// The time now in the form of [`millis`].
pub fn now_millis() -> String {
    millis(OffsetDateTime::now_utc())
}

/// An RFC 3339 time, any offset.
pub fn parse(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn forms() {
        assert_eq!(whole_seconds_from_ms(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            whole_seconds_from_ms(1_795_000_000_123),
            "2026-11-18T11:06:40Z"
        );
        let t = parse("2026-11-18T12:06:40.5+01:00").unwrap();
        assert_eq!(millis(t), "2026-11-18T11:06:40.500Z");
        assert_eq!(format(t), "2026-11-18T12:06:40.5+01:00");
        assert_eq!(from_unix_seconds(1_795_000_000), "2026-11-18T11:06:40Z");
        assert_eq!(from_unix_seconds(i64::MAX), i64::MAX.to_string());
        assert!(parse("yesterday").is_none());
        assert!(parse(&now()).is_some());
        assert!(parse(&now_millis()).is_some());
    }
}
