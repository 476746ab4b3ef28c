//! `killrvideo.common.Uuid` and `TimeUuid` at the edge: parse (INVALID_ARGUMENT naming the field when absent or
//! not a UUID) and emit (canonical lowercase hyphenated text, as the reference services do).

use keel_common::ServiceError;
use keel_protos::killrvideo::common::{TimeUuid, Uuid as PbUuid};
use uuid::Uuid;

/// The UUID in a required `Uuid` field.
///
/// # Errors
/// INVALID_ARGUMENT "`<field>` should be provided" when absent or blank, "… is not a UUID" when malformed.
pub fn required(field: &str, value: Option<&PbUuid>) -> Result<Uuid, ServiceError> {
    parse(field, value.map(|v| v.value.as_str()))
}

/// The UUID in a required `TimeUuid` field; it must be a version-1 (time-based) UUID (spec §2.1).
///
/// # Errors
/// As [`required`], and INVALID_ARGUMENT when it is not a version-1 UUID.
pub fn required_time(field: &str, value: Option<&TimeUuid>) -> Result<Uuid, ServiceError> {
    let id = parse(field, value.map(|v| v.value.as_str()))?;
    if id.get_version_num() != 1 {
        return Err(ServiceError::invalid(
            field,
            format!("{id} is not a time-based (version 1) UUID"),
        ));
    }
    Ok(id)
}

/// An optional `TimeUuid` start point: `None` when absent or blank.
///
/// # Errors
/// INVALID_ARGUMENT when present but not a version-1 UUID.
pub fn optional_time(field: &str, value: Option<&TimeUuid>) -> Result<Option<Uuid>, ServiceError> {
    match value.filter(|v| !v.value.trim().is_empty()) {
        None => Ok(None),
        Some(v) => required_time(field, Some(v)).map(Some),
    }
}

/// An optional `Uuid`: `None` when absent or blank.
///
/// # Errors
/// INVALID_ARGUMENT when present but malformed.
pub fn optional(field: &str, value: Option<&PbUuid>) -> Result<Option<Uuid>, ServiceError> {
    match value.filter(|v| !v.value.trim().is_empty()) {
        None => Ok(None),
        Some(v) => required(field, Some(v)).map(Some),
    }
}

fn parse(field: &str, value: Option<&str>) -> Result<Uuid, ServiceError> {
    let raw = value.map(str::trim).unwrap_or_default();
    if raw.is_empty() {
        return Err(ServiceError::invalid(
            field,
            format!("{field} should be provided"),
        ));
    }
    Uuid::parse_str(raw).map_err(|_| ServiceError::invalid(field, format!("{raw:?} is not a UUID")))
}

/// The UUIDs of a repeated `Uuid` field of a multi-get (GetUserProfile, GetVideoPreviews, GetNumberOfPlays):
/// at most [`crate::MAX_IDS_PER_REQUEST`].
///
/// # Errors
/// INVALID_ARGUMENT `too_many` (the reference's message) for more ids, or naming the field for a bad id.
pub fn required_list(
    field: &str,
    values: &[PbUuid],
    too_many: &str,
) -> Result<Vec<Uuid>, ServiceError> {
    if values.len() > crate::MAX_IDS_PER_REQUEST {
        return Err(ServiceError::invalid(field, too_many));
    }
    values.iter().map(|v| required(field, Some(v))).collect()
}

/// The wire form of `id`.
pub fn uuid(id: Uuid) -> PbUuid {
    PbUuid {
        value: id.hyphenated().to_string(),
    }
}

/// The wire form of a time-based id.
pub fn time_uuid(id: Uuid) -> TimeUuid {
    TimeUuid {
        value: id.hyphenated().to_string(),
    }
}

/// Milliseconds since the Unix epoch embedded in a version-1 UUID (Cassandra's `dateOf(commentid)`).
pub fn v1_millis(id: &Uuid) -> Option<i64> {
    /// 100 ns ticks from the Gregorian epoch (1582-10-15) to the Unix epoch.
    const UNIX_EPOCH_TICKS: i64 = 0x01B2_1DD2_1381_4000;
    // Signed: a time before 1970 is a negative number of milliseconds (the uuid crate's `to_unix` wraps
    // around there, which made a 1969 comment come back dated in the year ~60,000). 60-bit ticks fit an i64.
    id.get_timestamp().map(|ts| {
        let ticks = ts.to_gregorian().0 as i64;
        (ticks - UNIX_EPOCH_TICKS).div_euclid(10_000)
    })
}

/// A sortable key of a version-1 UUID: its 60-bit timestamp (100 ns since 1582) as 15 hex digits, then the
/// UUID. Text order of the key is time order, ties broken by the UUID, the way Cassandra orders `timeuuid`.
pub fn v1_sort_key(id: &Uuid) -> String {
    let ticks = id.get_timestamp().map(|t| t.to_gregorian().0).unwrap_or(0);
    format!("{ticks:015x}-{}", id.hyphenated())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn v1_times_before_1970_are_negative_milliseconds() {
        let at = |ms: i64| {
            let ticks = (ms * 10_000 + 0x01B2_1DD2_1381_4000) as u64;
            Uuid::new_v1(
                uuid::Timestamp::from_gregorian_time(ticks, 0),
                &[1, 2, 3, 4, 5, 6],
            )
        };
        for ms in [1_700_000_000_123, 0, -1, -86_400_000, -12_219_292_800_000] {
            assert_eq!(v1_millis(&at(ms)), Some(ms));
        }
        assert_eq!(v1_millis(&Uuid::new_v4()), None);
    }

    #[test]
    fn parse_errors_name_the_field() {
        let status: tonic::Status = required("user_id", None).unwrap_err().into();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(
            status.message().contains("user_id should be provided"),
            "{}",
            status.message()
        );
        let bad = PbUuid {
            value: "nope".into(),
        };
        let status: tonic::Status = required("video_id", Some(&bad)).unwrap_err().into();
        assert!(status.message().contains("is not a UUID"));
        let v4 = TimeUuid {
            value: Uuid::new_v4().to_string(),
        };
        let status: tonic::Status = required_time("comment_id", Some(&v4)).unwrap_err().into();
        assert!(status.message().contains("version 1"));
    }

    #[test]
    fn uppercase_input_is_canonicalised() {
        let id = Uuid::new_v4();
        let upper = PbUuid {
            value: id.to_string().to_uppercase(),
        };
        assert_eq!(
            uuid(required("x", Some(&upper)).unwrap()).value,
            id.to_string()
        );
    }

    #[test]
    fn v1_sort_keys_follow_time_order() {
        let ctx = uuid::timestamp::context::ContextV1::new(7);
        let node = [1, 2, 3, 4, 5, 6];
        let early = Uuid::new_v1(
            uuid::Timestamp::from_unix(&ctx, 1_600_000_000, 5_000_000),
            &node,
        );
        let late = Uuid::new_v1(uuid::Timestamp::from_unix(&ctx, 1_700_000_000, 0), &node);
        assert!(v1_sort_key(&early) < v1_sort_key(&late));
        assert_eq!(v1_millis(&early), Some(1_600_000_000_005));
    }
}
