//! What the KillrVideo services share, so each service's handlers stay thin adapters.
//!
//! - [`ids`]: `killrvideo.common.Uuid` / `TimeUuid` ↔ [`uuid::Uuid`], validated at the edge (INVALID_ARGUMENT
//!   naming the field). Canonical form on the wire and in storage: lowercase hyphenated.
//! - [`time`]: `google.protobuf.Timestamp` ↔ milliseconds since the Unix epoch. KillrVideo keeps millisecond
//!   precision (`shared/spec/killrvideo-semantics.md` §2.1): clients send returned dates back as inclusive
//!   start points.
//! - [`limits`]: the most one request may carry (lengths, counts), INVALID_ARGUMENT past them.
//! - [`paging`]: `page_size` validation and opaque, URL-safe paging tokens (§2.3).
//! - [`sql`]: dynamic SQL with numbered, bound parameters.
//! - [`topics`]: the Kafka topics of the KillrVideo events (§10.2); [`events`]: those events as domain values.
//! - `testsuite` (feature): a fresh database per test on SQLite and on the real PostgreSQL.

pub mod events;
pub mod ids;
pub mod limits;
pub mod paging;
pub mod sql;
pub mod time;
pub mod topics;

#[cfg(feature = "testsuite")]
pub mod testsuite;

/// Most ids any multi-get RPC accepts (GetUserProfile, GetVideoPreviews, GetNumberOfPlays; spec §3.3, §4.5, §7.2).
pub const MAX_IDS_PER_REQUEST: usize = 20;

/// INVALID_ARGUMENT "`<field>` should be provided for `<request>` request" when `value` is blank (spec §15).
///
/// # Errors
/// As above.
pub fn required_text<'a>(
    field: &str,
    value: &'a str,
    request: &str,
) -> Result<&'a str, keel_common::ServiceError> {
    if value.trim().is_empty() {
        Err(keel_common::ServiceError::invalid(
            field,
            format!("{field} should be provided for {request} request"),
        ))
    } else {
        Ok(value)
    }
}

/// Lowercase words (letters and digits) of `text`, in order, repeats kept.
pub fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
}
