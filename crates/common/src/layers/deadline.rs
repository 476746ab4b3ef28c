//! The end of a server call: its handler is stopped, and its response stream ended, at the call's deadline
//! ([`CallDeadline`], put on the request by [`ServerContextLayer`](super::ServerContextLayer)) with
//! DEADLINE_EXCEEDED, or at the end of a graceful shutdown's drain (the server cancels `closing` when
//! `grpc.drain_timeout` passes) with UNAVAILABLE "server shutting down". Either is a proper gRPC status in
//! the trailers (a reset stream would read as a broken instance), sent after whatever the stream already
//! sent; UNAVAILABLE tells the client the call may go to another instance.
//!
//! Inside the metrics layer, so the call log and the StatsD status counters record the status the client got.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::{context::CallDeadline, error::layer_status};

/// The message of the UNAVAILABLE status that ends the calls still running when the drain timeout passes.
pub const SHUTTING_DOWN: &str = "server shutting down";

/// Server side: see the module docs.
#[derive(Clone, Debug)]
pub struct DeadlineLayer {
    default_timeout: Duration,
    closing: CancellationToken,
}

impl DeadlineLayer {
    /// `closing` ends every call still running when cancelled; `default_timeout` bounds a call that reached
    /// this layer without a [`CallDeadline`] (`grpc.request_timeout`).
    pub fn new(default_timeout: Duration, closing: CancellationToken) -> Self {
        Self {
            default_timeout,
            closing,
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            default_timeout: self.default_timeout,
            closing: self.closing.clone(),
        }
    }
}

/// Service made by [`DeadlineLayer`].
#[derive(Clone, Debug)]
pub struct Deadline<S> {
    inner: S,
    default_timeout: Duration,
    closing: CancellationToken,
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let now = tokio::time::Instant::now();
        let deadline = req
            .extensions()
            .get::<CallDeadline>()
            .map_or(now + self.default_timeout, |d| d.0);
        // For the message: the time the call had when it arrived, to the millisecond.
        let limit =
            Duration::from_millis(deadline.saturating_duration_since(now).as_millis() as u64);
        DeadlineFuture {
            inner: self.inner.call(req),
            deadline,
            limit,
            sleep: None,
            closing: Some(self.closing.clone()),
            closed: None,
        }
    }
}

pin_project! {
    /// The handler's answer, or DEADLINE_EXCEEDED at the call's deadline, or UNAVAILABLE at the drain's end;
    /// the answer's body is bounded the same way ([`BoundedBody`]). The timer and the shutdown watch are
    /// armed only if the handler has to wait: a handler ready at its first poll costs neither.
    pub struct DeadlineFuture<F> {
        #[pin]
        inner: F,
        deadline: tokio::time::Instant,
        limit: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        // Handed to the answer's body when the handler answers.
        closing: Option<CancellationToken>,
        closed: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    }
}

impl<F, E> Future for DeadlineFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let limit = *this.limit;
        // The handler first: an answer ready when its deadline passes is still the answer.
        if let Poll::Ready(r) = this.inner.poll(cx) {
            let closing = this
                .closing
                .take()
                .expect("DeadlineFuture polled after it completed");
            let deadline = *this.deadline;
            // Polled inside the request's span (the context layer instruments this future).
            let span = tracing::Span::current();
            return Poll::Ready(r.map(|resp| {
                resp.map(|body| {
                    Body::new(BoundedBody {
                        inner: body,
                        deadline,
                        limit,
                        sleep: None,
                        closing,
                        closed: None,
                        ended: false,
                        span,
                    })
                })
            }));
        }
        let deadline = *this.deadline;
        if this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
            .as_mut()
            .poll(cx)
            .is_ready()
        {
            tracing::info!(limit = ?limit, "deadline exceeded; handler stopped");
            return Poll::Ready(Ok(exceeded(limit).into_http()));
        }
        let closing = this
            .closing
            .as_ref()
            .expect("DeadlineFuture polled after it completed");
        if this
            .closed
            .get_or_insert_with(|| Box::pin(closing.clone().cancelled_owned()))
            .as_mut()
            .poll(cx)
            .is_ready()
        {
            tracing::info!("server shutting down; handler stopped");
            return Poll::Ready(Ok(layer_status::unavailable(SHUTTING_DOWN).into_http()));
        }
        Poll::Pending
    }
}

fn exceeded(limit: Duration) -> tonic::Status {
    layer_status::deadline_exceeded(format!("deadline of {limit:?} exceeded on the server"))
}

pin_project! {
    /// A response body ended at the call's deadline or at the drain's end, with the status in its trailers.
    /// The timer and the shutdown watch are armed only if the body ever has to wait: a unary answer, ready at
    /// once, costs neither.
    struct BoundedBody {
        #[pin]
        inner: Body,
        deadline: tokio::time::Instant,
        limit: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        closing: CancellationToken,
        closed: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
        ended: bool,
        span: tracing::Span,
    }
}

impl HttpBody for BoundedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        // Checked before each frame: a reader that stalled past the deadline gets what was already sent, then
        // the status, not the rest of the stream; a stream that never waits still ends at the drain's end.
        let mut expired = tokio::time::Instant::now() >= *this.deadline;
        let mut closed = this.closing.is_cancelled();
        if !expired && !closed {
            let polled = this.inner.poll_frame(cx);
            if polled.is_ready() {
                return polled;
            }
            let deadline = *this.deadline;
            expired = this
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)))
                .as_mut()
                .poll(cx)
                .is_ready();
            let token = &*this.closing;
            closed = this
                .closed
                .get_or_insert_with(|| Box::pin(token.clone().cancelled_owned()))
                .as_mut()
                .poll(cx)
                .is_ready();
            if !expired && !closed {
                return Poll::Pending;
            }
        }
        *this.ended = true;
        let limit = *this.limit;
        let status = if expired {
            this.span.in_scope(
                || tracing::info!(limit = ?limit, "deadline exceeded; response stream ended"),
            );
            exceeded(limit)
        } else {
            this.span
                .in_scope(|| tracing::info!("server shutting down; response stream ended"));
            layer_status::unavailable(SHUTTING_DOWN)
        };
        let mut trailers = http::HeaderMap::new();
        if status.add_header(&mut trailers).is_err() {
            return Poll::Ready(Some(Err(status)));
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
