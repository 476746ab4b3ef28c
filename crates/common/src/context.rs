//! The request context: trace id and deadline, carried from an incoming call to every outgoing one.
//!
//! - Incoming: [`ServerContextLayer`] reads `x-trace-id` (or makes one) and `grpc-timeout`, rejects a call whose
//!   deadline has already passed with DEADLINE_EXCEEDED before any handler runs, and runs the handler inside a
//!   `grpc.request` tracing span (so every log line of the call carries the trace id) with the context in a
//!   task-local ([`current`]).
//! - Outgoing: [`ClientContextLayer`] stamps the same trace id and the *remaining* time of the incoming deadline
//!   (never more than the call's own `grpc-timeout` or the client default) as `grpc-timeout`, and fails the call
//!   locally with DEADLINE_EXCEEDED when that time runs out, waiting for an endpoint included.
//!
//! `grpc-timeout` format: at most 8 ASCII digits and a unit, `H M S m u n`
//! (<https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md>).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response};
use tonic::{Status, body::Body};
use tower::{Layer, Service};
use tracing::Instrument;

/// Metadata key of the trace id.
pub const TRACE_ID_HEADER: &str = "x-trace-id";
const GRPC_TIMEOUT: &str = "grpc-timeout";

/// What a handler knows about the call it serves.
#[derive(Clone, Debug)]
pub struct RequestContext {
    /// Trace id: from `x-trace-id`, else a new 32-hex-digit id.
    pub trace_id: String,
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
    static CONTEXT: RequestContext;
}

/// The context of the call this task serves, if any.
pub fn current() -> Option<RequestContext> {
    CONTEXT.try_with(Clone::clone).ok()
}

/// Runs `fut` with `ctx` as its request context (for work spawned off a handler, or tests).
pub async fn scope<F: Future>(ctx: RequestContext, fut: F) -> F::Output {
    CONTEXT.scope(ctx, fut).await
}

/// A new trace id: 32 lowercase hex digits.
pub fn new_trace_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Parses a `grpc-timeout` header value; `None` if malformed.
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
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
    const MAX: u128 = 99_999_999;
    let nanos = d.as_nanos();
    if nanos <= MAX {
        format!("{nanos}n")
    } else if d.as_micros() <= MAX {
        format!("{}u", d.as_micros())
    } else if d.as_millis() <= MAX {
        format!("{}m", d.as_millis())
    } else if u128::from(d.as_secs()) <= MAX {
        format!("{}S", d.as_secs())
    } else {
        format!("{}H", (d.as_secs() / 3600).min(MAX as u64))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Server side: see the module docs.
#[derive(Clone, Debug)]
pub struct ServerContextLayer {
    default_timeout: Duration,
}

impl ServerContextLayer {
    /// `default_timeout` bounds calls whose caller sent no deadline (`grpc.request_timeout`).
    pub fn new(default_timeout: Duration) -> Self {
        Self { default_timeout }
    }
}

impl<S> Layer<S> for ServerContextLayer {
    type Service = ServerContext<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerContext {
            inner,
            default_timeout: self.default_timeout,
        }
    }
}

/// Service made by [`ServerContextLayer`].
#[derive(Clone, Debug)]
pub struct ServerContext<S> {
    inner: S,
    default_timeout: Duration,
}

impl<S, B> Service<Request<B>> for ServerContext<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let trace_id = req
            .headers()
            .get(TRACE_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_owned)
            .unwrap_or_else(new_trace_id);
        let timeout = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let method = req.uri().path().to_owned();
        let span = tracing::info_span!("grpc.request", trace_id = %trace_id, method = %method);
        if timeout == Some(Duration::ZERO) {
            return Box::pin(async move {
                let _g = span.enter();
                tracing::debug!("deadline already passed; call not started");
                Ok(
                    Status::deadline_exceeded("deadline exceeded before the call started")
                        .into_http(),
                )
            });
        }
        let ctx = RequestContext {
            trace_id,
            deadline: timeout.map(|t| Instant::now() + t),
        };
        // The handler is stopped when the deadline passes, answering DEADLINE_EXCEEDED as a proper gRPC status
        // (not a reset stream, which a client would take for a broken endpoint).
        let limit = timeout.unwrap_or(self.default_timeout);
        let fut = CONTEXT.scope(ctx, self.inner.call(req).instrument(span.clone()));
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
                Err(_) => {
                    span.in_scope(
                        || tracing::info!(limit = ?limit, "deadline exceeded; handler stopped"),
                    );
                    Ok(Status::deadline_exceeded(format!(
                        "deadline of {limit:?} exceeded on the server"
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// Client side: see the module docs.
#[derive(Clone, Debug)]
pub struct ClientContextLayer {
    default_timeout: Duration,
}

impl ClientContextLayer {
    /// `default_timeout` bounds calls that have no deadline of their own nor an incoming one.
    pub fn new(default_timeout: Duration) -> Self {
        Self { default_timeout }
    }
}

impl<S> Layer<S> for ClientContextLayer {
    type Service = ClientContext<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientContext {
            inner,
            default_timeout: self.default_timeout,
        }
    }
}

/// Service made by [`ClientContextLayer`].
#[derive(Clone, Debug)]
pub struct ClientContext<S> {
    inner: S,
    default_timeout: Duration,
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

impl<S> Service<Request<Body>> for ClientContext<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let incoming = current();
        let own = req
            .headers()
            .get(GRPC_TIMEOUT)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_grpc_timeout);
        let timeout = outgoing_timeout(
            own,
            incoming.as_ref().and_then(RequestContext::remaining),
            self.default_timeout,
        );
        let trace_id = incoming.map(|c| c.trace_id).unwrap_or_else(new_trace_id);
        let headers = req.headers_mut();
        if !headers.contains_key(TRACE_ID_HEADER)
            && let Ok(v) = HeaderValue::from_str(&trace_id)
        {
            headers.insert(TRACE_ID_HEADER, v);
        }
        if timeout.is_zero() {
            return Box::pin(async {
                Ok(
                    Status::deadline_exceeded("deadline exceeded before the call was sent")
                        .into_http(),
                )
            });
        }
        headers.insert(
            GRPC_TIMEOUT,
            HeaderValue::from_str(&format_grpc_timeout(timeout)).expect("ascii"),
        );
        let fut = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Ok(Status::deadline_exceeded(format!(
                    "deadline of {timeout:?} exceeded"
                ))
                .into_http()),
            }
        })
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
        for bad in ["", "m", "12", "1x", "123456789m", "-1m"] {
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
