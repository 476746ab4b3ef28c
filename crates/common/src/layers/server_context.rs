//! The server's request context: reads `x-trace-id` (or makes one) and `grpc-timeout`, answers a call whose
//! deadline has already passed with DEADLINE_EXCEEDED before any handler runs, and runs the handler inside a
//! `grpc.request` span with the [`RequestContext`] in a task-local ([`crate::context::current`]); the handler
//! is stopped at the deadline (or `grpc.request_timeout` when the caller sent none) with DEADLINE_EXCEEDED.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{
    context::{
        CONTEXT, CallDeadline, GRPC_TIMEOUT, RequestContext, TRACE_ID_HEADER, new_trace_id,
        parse_grpc_timeout,
    },
    error::layer_status,
};

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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
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
                    layer_status::deadline_exceeded("deadline exceeded before the call started")
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
        let deadline = tokio::time::Instant::now() + limit;
        // The layers inside read the deadline from here instead of parsing `grpc-timeout` again.
        req.extensions_mut().insert(CallDeadline(deadline));
        // The call log (inside) logs the trace id when the response ends, outside this span.
        req.extensions_mut().insert(ctx.clone());
        let fut = CONTEXT.scope(ctx, self.inner.call(req).instrument(span.clone()));
        Box::pin(async move {
            match tokio::time::timeout_at(deadline, fut).await {
                // The deadline bounds the response stream too, not only the handler.
                Ok(r) => r.map(|resp| {
                    resp.map(|body| {
                        Body::new(DeadlineBody {
                            inner: body,
                            deadline,
                            limit,
                            sleep: None,
                            expired: false,
                            span,
                        })
                    })
                }),
                Err(_) => {
                    span.in_scope(
                        || tracing::info!(limit = ?limit, "deadline exceeded; handler stopped"),
                    );
                    Ok(layer_status::deadline_exceeded(format!(
                        "deadline of {limit:?} exceeded on the server"
                    ))
                    .into_http())
                }
            }
        })
    }
}

pin_project! {
    /// A response body ended at the call's deadline with a DEADLINE_EXCEEDED status in its trailers, so a
    /// stream (a stalled reader's, say) never outlives the time its caller gave it. The timer is armed only if
    /// the body ever has to wait: a unary answer, ready at once, costs none.
    struct DeadlineBody {
        #[pin]
        inner: Body,
        deadline: tokio::time::Instant,
        limit: Duration,
        sleep: Option<Pin<Box<tokio::time::Sleep>>>,
        expired: bool,
        span: tracing::Span,
    }
}

impl HttpBody for DeadlineBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        if *this.expired {
            return Poll::Ready(None);
        }
        // Checked before each frame: a reader that stalled past the deadline gets what was already sent, then
        // the status, not the rest of the stream.
        let passed = tokio::time::Instant::now() >= *this.deadline;
        let polled = if passed {
            Poll::Pending
        } else {
            this.inner.poll_frame(cx)
        };
        match polled {
            Poll::Pending => {
                let deadline = *this.deadline;
                let sleep = this
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if !passed && sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                *this.expired = true;
                let limit = *this.limit;
                this.span.in_scope(
                    || tracing::info!(limit = ?limit, "deadline exceeded; response stream ended"),
                );
                let mut trailers = http::HeaderMap::new();
                let status = layer_status::deadline_exceeded(format!(
                    "deadline of {limit:?} exceeded on the server"
                ));
                if status.add_header(&mut trailers).is_err() {
                    return Poll::Ready(Some(Err(status)));
                }
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.expired || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
