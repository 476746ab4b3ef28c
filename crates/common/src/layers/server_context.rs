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

use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};
use tracing::Instrument;

use crate::{
    context::{
        CONTEXT, GRPC_TIMEOUT, RequestContext, TRACE_ID_HEADER, new_trace_id, parse_grpc_timeout,
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
        let fut = CONTEXT.scope(ctx, self.inner.call(req).instrument(span.clone()));
        Box::pin(async move {
            match tokio::time::timeout(limit, fut).await {
                Ok(r) => r,
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
