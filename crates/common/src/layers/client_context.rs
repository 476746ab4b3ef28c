//! The client's request context: stamps the incoming call's trace id (or a new one) and the *remaining* time of
//! its deadline (never more than the call's own `grpc-timeout` or `client.default_timeout`) on every outgoing
//! call as `x-trace-id` and `grpc-timeout`, and fails the call locally with DEADLINE_EXCEEDED when that time
//! runs out, the wait for a ready endpoint included.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use http::{HeaderValue, Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::{
    context::{
        GRPC_TIMEOUT, RequestContext, TRACE_ID_HEADER, current, format_grpc_timeout, new_trace_id,
        outgoing_timeout, parse_grpc_timeout,
    },
    error::layer_status,
    live::LiveDuration,
};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Client side: see the module docs.
#[derive(Clone, Debug)]
pub struct ClientContextLayer {
    default_timeout: LiveDuration,
}

impl ClientContextLayer {
    /// `default_timeout` bounds calls that have no deadline of their own nor an incoming one.
    pub fn new(default_timeout: Duration) -> Self {
        Self::live(LiveDuration::new(default_timeout))
    }

    /// [`Self::new`] with a default timeout read at each call (`client.default_timeout`, changed live).
    pub fn live(default_timeout: LiveDuration) -> Self {
        Self { default_timeout }
    }
}

impl<S> Layer<S> for ClientContextLayer {
    type Service = ClientContext<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientContext {
            inner,
            default_timeout: self.default_timeout.clone(),
        }
    }
}

/// Service made by [`ClientContextLayer`].
#[derive(Clone, Debug)]
pub struct ClientContext<S> {
    inner: S,
    default_timeout: LiveDuration,
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
            self.default_timeout.get(),
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
                    layer_status::deadline_exceeded("deadline exceeded before the call was sent")
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
                Err(_) => Ok(layer_status::deadline_exceeded(format!(
                    "deadline of {timeout:?} exceeded"
                ))
                .into_http()),
            }
        })
    }
}
