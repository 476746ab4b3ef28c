//! The server's request context: reads `x-trace-id` (or makes one) and `grpc-timeout`, answers a call whose
//! deadline has already passed with DEADLINE_EXCEEDED before any handler runs, puts the call's deadline on the
//! request ([`CallDeadline`]: its `grpc-timeout`, or `grpc.request_timeout` when the caller sent none) for the
//! layers inside, and runs them inside a `grpc.request` span with the [`RequestContext`] in a task-local
//! ([`crate::context::current`]).

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tokio::task::futures::TaskLocalFuture;
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::{Instrument, instrument::Instrumented};

use crate::{
    context::{CONTEXT, CallDeadline, RequestContext, TRACE_ID_HEADER, grpc_timeout, new_trace_id},
    error::layer_status,
};

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
    /// The inner call's future in the call's context and span (nothing allocated for it), or DEADLINE_EXCEEDED
    /// at once.
    type Future = Either<
        Ready<Result<Response<Body>, S::Error>>,
        TaskLocalFuture<RequestContext, Instrumented<S::Future>>,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let trace_id = req
            .headers()
            .get(TRACE_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(Arc::from)
            .unwrap_or_else(new_trace_id);
        let timeout = grpc_timeout(req.headers());
        let span = tracing::info_span!(
            "grpc.request",
            trace_id = &*trace_id,
            method = req.uri().path()
        );
        if timeout == Some(Duration::ZERO) {
            let _g = span.enter();
            tracing::debug!("deadline already passed; call not started");
            return Either::Left(ready(Ok(layer_status::deadline_exceeded(
                "deadline exceeded before the call started",
            )
            .into_http())));
        }
        let ctx = RequestContext {
            trace_id,
            deadline: timeout.map(|t| Instant::now() + t),
        };
        // The layers inside read the deadline from here instead of parsing `grpc-timeout` again; the
        // [`DeadlineLayer`](super::DeadlineLayer) stops the handler and the response stream at it.
        let limit = timeout.unwrap_or(self.default_timeout);
        req.extensions_mut()
            .insert(CallDeadline(tokio::time::Instant::now() + limit));
        // The call log (inside) logs the trace id when the response ends, outside this span.
        req.extensions_mut().insert(ctx.clone());
        Either::Right(CONTEXT.scope(ctx, self.inner.call(req).instrument(span)))
    }
}
