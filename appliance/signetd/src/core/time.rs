//! Times as the records and the wire write them (pure: the clock is read by the
//! adapters, `adapters::store::now_ms`).

/// Milliseconds since the epoch as RFC 3339 (UTC, whole seconds).
pub use signet_api::rfc3339::whole_seconds_from_ms as rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_read_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_000_000_123), "2026-11-18T11:06:40Z");
    }
}
