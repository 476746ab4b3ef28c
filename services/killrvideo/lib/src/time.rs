//! `google.protobuf.Timestamp` ↔ milliseconds since the Unix epoch (UTC). KillrVideo timestamps have
//! millisecond precision (Cassandra `timestamp`, spec §2.1); finer parts of an incoming Timestamp are dropped.

use prost_types::Timestamp;

/// The Timestamp of `ms` milliseconds since the epoch (nanos a multiple of 1,000,000).
pub fn to_timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Earliest time a request may carry: 0001-01-01T00:00:00Z (the protobuf `Timestamp` range, which JSON clients
/// can print), in milliseconds since the epoch.
pub const MIN_MS: i64 = -62_135_596_800_000;
/// Latest: 9999-12-31T23:59:59.999Z.
pub const MAX_MS: i64 = 253_402_300_799_999;

/// Milliseconds since the epoch of the request's `field`, checked: seconds within 0001–9999 and nanos within
/// 0..1e9, as `google.protobuf.Timestamp` defines them.
///
/// # Errors
/// INVALID_ARGUMENT naming `field` for a time outside that range.
pub fn request_millis(field: &str, ts: &Timestamp) -> Result<i64, keel_common::ServiceError> {
    let ms = ts
        .seconds
        .checked_mul(1000)
        .and_then(|s| s.checked_add(i64::from(ts.nanos) / 1_000_000));
    match ms {
        Some(ms) if (0..1_000_000_000).contains(&ts.nanos) && (MIN_MS..=MAX_MS).contains(&ms) => {
            Ok(ms)
        }
        _ => Err(keel_common::ServiceError::invalid(
            field,
            "must be a time from 0001-01-01 to 9999-12-31 (google.protobuf.Timestamp)",
        )),
    }
}

/// Milliseconds since the epoch of `ts`, truncated to the millisecond.
pub fn to_millis(ts: &Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(ts.nanos.clamp(0, 999_999_999)) / 1_000_000)
}

/// Now, in milliseconds since the epoch.
pub fn now_ms() -> i64 {
    keel_common::db::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_times_outside_0001_to_9999_are_refused() {
        let ts = |seconds, nanos| Timestamp { seconds, nanos };
        assert_eq!(request_millis("t", &ts(10, 123_456_789)).ok(), Some(10_123));
        assert_eq!(
            request_millis("t", &to_timestamp(MIN_MS)).ok(),
            Some(MIN_MS)
        );
        assert_eq!(
            request_millis("t", &to_timestamp(MAX_MS)).ok(),
            Some(MAX_MS)
        );
        for bad in [
            ts(MIN_MS / 1000 - 1, 0),
            ts(MAX_MS / 1000 + 1, 0),
            ts(i64::MAX, 0),
            ts(i64::MIN, 0),
            ts(0, -1),
            ts(0, 1_000_000_000),
        ] {
            let err = request_millis("starting_added_date", &bad).unwrap_err();
            assert!(
                matches!(&err, keel_common::ServiceError::InvalidArgument { field, .. } if field == "starting_added_date"),
                "{bad:?}: {err:?}"
            );
        }
    }

    #[test]
    fn round_trips_at_millisecond_precision() {
        for ms in [0, 1, 999, 1_700_000_000_123, -1, -1001] {
            assert_eq!(to_millis(&to_timestamp(ms)), ms);
        }
        let ts = Timestamp {
            seconds: 10,
            nanos: 123_456_789,
        };
        assert_eq!(to_millis(&ts), 10_123);
        assert_eq!(to_timestamp(10_123).nanos, 123_000_000);
    }
}
