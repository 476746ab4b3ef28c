//! The request context: trace id and deadline, carried from an incoming call to every outgoing one.
//!
//! - Incoming: [`ServerContextLayer`](crate::layers::ServerContextLayer) reads `x-trace-id` (or makes one) and `grpc-timeout`, rejects a call whose
//!   deadline has already passed with DEADLINE_EXCEEDED before any handler runs, and runs the handler inside a
//!   `grpc.request` tracing span (so every log line of the call carries the trace id) with the context in a
//!   task-local ([`current`]).
//! - Outgoing: [`ClientContextLayer`](crate::layers::ClientContextLayer) stamps the same trace id and the *remaining* time of the incoming deadline
//!   (never more than the call's own `grpc-timeout` or the client default) as `grpc-timeout`, and fails the call
//!   locally with DEADLINE_EXCEEDED when that time runs out, waiting for an endpoint included.
//!
//! `grpc-timeout` format: at most 8 ASCII digits and a unit, `H M S m u n`
//! (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>).

use std::{
    future::Future,
    sync::Arc,
    time::{Duration, Instant},
};

use http::{HeaderName, HeaderValue};

/// Metadata key of the trace id.
pub const TRACE_ID_HEADER: &str = "x-trace-id";
pub(crate) const GRPC_TIMEOUT: &str = "grpc-timeout";
/// [`TRACE_ID_HEADER`] as a header name, to insert with: a `&str` key is parsed and its bytes copied into a
/// new name by every insert (an allocation per call), a `HeaderName` made from a static string is not.
pub(crate) const TRACE_ID_NAME: HeaderName = HeaderName::from_static(TRACE_ID_HEADER);
/// `grpc-timeout` as a header name, to insert with (see [`TRACE_ID_NAME`]).
pub(crate) const GRPC_TIMEOUT_NAME: HeaderName = HeaderName::from_static(GRPC_TIMEOUT);

/// The instant an incoming call must end by (its `grpc-timeout`, or `grpc.request_timeout` when it sent none),
/// put on the request by [`ServerContextLayer`](crate::layers::ServerContextLayer) for the layers inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallDeadline(pub tokio::time::Instant);

/// What a handler knows about the call it serves.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// Trace id: from `x-trace-id`, else a new 32-hex-digit id. Shared, not copied, by the context's clones
    /// (the task-local, the request's extension, the call log line, the calls a handler makes).
    pub trace_id: Arc<str>,
    /// When the caller stops waiting, from `grpc-timeout`; `None` when the caller sent none.
    pub deadline: Option<Instant>,
}

impl RequestContext {
    /// Time left before the deadline (zero once passed); `None` without a deadline.
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

tokio::task_local! {
    pub(crate) static CONTEXT: RequestContext;
}

/// The context of the call this task serves, if any.
pub fn current() -> Option<RequestContext> {
    CONTEXT.try_with(Clone::clone).ok()
}

/// Runs `fut` with `ctx` as its request context (for work spawned off a handler, or tests).
pub async fn scope<F: Future>(ctx: RequestContext, fut: F) -> F::Output {
    CONTEXT.scope(ctx, fut).await
}

/// A new trace id: 32 lowercase hex digits (a version 4 UUID, RFC 9562, without its dashes).
///
/// The random bytes come from `rand`'s thread-local generator (seeded once from the OS), not from a
/// `getrandom(2)` system call per id as `Uuid::new_v4` makes: this runs once per call served.
pub fn new_trace_id() -> Arc<str> {
    Arc::from(&*fresh_trace_id(&mut [0; uuid::fmt::Simple::LENGTH]))
}

/// [`new_trace_id`] as the value of an `x-trace-id` header, for a call that starts a trace: one allocation,
/// the header's, shared by its clones.
pub fn new_trace_id_value() -> HeaderValue {
    let mut digits = [0; uuid::fmt::Simple::LENGTH];
    fresh_trace_id(&mut digits);
    shared_value(digits, uuid::fmt::Simple::LENGTH)
}

/// The first `len` bytes of `text` (visible ASCII) as a header value in a buffer of its own that its clones
/// share (`Bytes::from_owner`): one allocation, and none for each clone. A value made from a `Vec` (what
/// `HeaderValue::from_str` makes) is copied into a shared buffer the first time it is cloned, as the
/// transparent retry layer clones a call's headers for every call.
fn shared_value<const N: usize>(text: [u8; N], len: usize) -> HeaderValue {
    /// The owner of the bytes: the array and how much of it is the value.
    struct Text<const N: usize>([u8; N], usize);
    impl<const N: usize> AsRef<[u8]> for Text<N> {
        fn as_ref(&self) -> &[u8] {
            &self.0[..self.1]
        }
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(Text(text, len)))
        .expect("visible ASCII is a valid header value")
}

/// A new trace id's digits, written into `digits`.
fn fresh_trace_id(digits: &mut [u8; uuid::fmt::Simple::LENGTH]) -> &mut str {
    uuid::Builder::from_random_bytes(rand::random())
        .into_uuid()
        .simple()
        .encode_lower(digits)
}

/// The call's timeout from its `grpc-timeout` header; `None` when it has none or it is malformed.
pub(crate) fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    headers
        .get(GRPC_TIMEOUT_NAME)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
}

/// Parses a `grpc-timeout` header value; `None` if malformed.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // ASCII only: the unit is the last byte, so a multi-byte last character must not be split (found by
    // the `events` fuzz target; header values reach here through `HeaderValue::to_str`, but callers may not).
    if v.len() < 2 || v.len() > 9 || !v.is_ascii() {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Formats a duration as a `grpc-timeout` value, in the finest unit that fits 8 digits.
pub fn format_grpc_timeout(d: Duration) -> String {
    let (amount, unit) = grpc_timeout_parts(d);
    format!("{amount}{unit}")
}

/// [`format_grpc_timeout`] as a header value: one allocation, the header's, shared by its clones.
pub fn grpc_timeout_value(d: Duration) -> HeaderValue {
    let (amount, unit) = grpc_timeout_parts(d);
    let mut digits = itoa::Buffer::new();
    let mut text = [0u8; 9];
    let amount = digits.format(amount).as_bytes();
    text[..amount.len()].copy_from_slice(amount);
    text[amount.len()] = unit as u8;
    shared_value(text, amount.len() + 1)
}

/// A timeout as gRPC's wire format gives it: at most 8 digits and the finest unit they can hold
/// (`n`, `u`, `m`, `S`, `H`; <https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>).
fn grpc_timeout_parts(d: Duration) -> (u64, char) {
    const MAX: u64 = 99_999_999;
    let fits = |n: u128| u64::try_from(n).ok().filter(|n| *n <= MAX);
    if let Some(n) = fits(d.as_nanos()) {
        (n, 'n')
    } else if let Some(n) = fits(d.as_micros()) {
        (n, 'u')
    } else if let Some(n) = fits(d.as_millis()) {
        (n, 'm')
    } else if d.as_secs() <= MAX {
        (d.as_secs(), 'S')
    } else {
        ((d.as_secs() / 3600).min(MAX), 'H')
    }
}

/// The time an outgoing call may take: the least of its own `grpc-timeout`, what is left of the incoming
/// deadline, and the default.
pub fn outgoing_timeout(
    own: Option<Duration>,
    incoming_remaining: Option<Duration>,
    default: Duration,
) -> Duration {
    let base = own.unwrap_or(default);
    incoming_remaining.map_or(base, |left| left.min(base))
}

/// The token of `authorization: Bearer <token>` metadata, trimmed; `None` without one.
pub fn bearer_token(metadata: &tonic::metadata::MetadataMap) -> Option<&str> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// Sets `authorization: Bearer <token>` on an outgoing request (nothing for an empty secret).
pub fn set_bearer_token<T>(request: &mut tonic::Request<T>, token: &crate::config::Secret) {
    if let Ok(v) = format!("Bearer {}", token.expose()).parse()
        && !token.is_empty()
    {
        request.metadata_mut().insert("authorization", v);
    }
}

/// Metadata key asking a mutating call to validate and report what it would do, with no side effect.
pub const DRY_RUN: &str = "dry-run";

/// Whether `request` carries `dry-run: true` (case-insensitive). Every service with mutating calls honours it:
/// validation and authorisation run, nothing is written, and the answer says what would have happened.
pub fn is_dry_run<T>(request: &tonic::Request<T>) -> bool {
    request
        .metadata()
        .get(DRY_RUN)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_are_distinct_version_4_uuids_in_32_lowercase_hex_digits() {
        let ids: std::collections::HashSet<Arc<str>> = (0..1000).map(|_| new_trace_id()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
                "{id}"
            );
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 4, "{id}");
            assert_eq!(uuid.get_variant(), uuid::Variant::RFC4122, "{id}");
        }
    }

    #[test]
    fn grpc_timeout_round_trips() {
        for d in [
            Duration::from_millis(50),
            Duration::from_secs(30),
            Duration::from_nanos(7),
            Duration::from_secs(400_000),
        ] {
            let s = format_grpc_timeout(d);
            assert!(s.len() <= 9, "{s}");
            let back = parse_grpc_timeout(&s).unwrap();
            assert!(
                back <= d && d - back < Duration::from_secs(1),
                "{d:?} -> {s} -> {back:?}"
            );
        }
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        for bad in ["", "m", "12", "1x", "123456789m", "-1m", "1é", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn outgoing_deadline_is_the_least_of_own_incoming_and_default() {
        let s = Duration::from_secs;
        assert_eq!(outgoing_timeout(None, None, s(10)), s(10));
        assert_eq!(outgoing_timeout(Some(s(3)), None, s(10)), s(3));
        assert_eq!(outgoing_timeout(None, Some(s(2)), s(10)), s(2));
        assert_eq!(outgoing_timeout(Some(s(5)), Some(s(1)), s(10)), s(1));
        assert_eq!(
            outgoing_timeout(Some(s(20)), None, s(10)),
            s(20),
            "an explicit per-call timeout may exceed the default"
        );
    }
}
