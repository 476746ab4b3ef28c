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
