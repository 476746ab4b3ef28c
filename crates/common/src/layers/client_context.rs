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
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::{
    context::{
        GRPC_TIMEOUT_NAME, RequestContext, TRACE_ID_HEADER, TRACE_ID_NAME, current, grpc_timeout,
        grpc_timeout_value, new_trace_id_value, outgoing_timeout,
    },
    error::layer_status,
    live::LiveDuration,
};

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
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = ClientContextFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let incoming = current();
        let own = grpc_timeout(req.headers());
        let timeout = outgoing_timeout(
            own,
            incoming.as_ref().and_then(RequestContext::remaining),
            self.default_timeout.get(),
        );
        let headers = req.headers_mut();
        if !headers.contains_key(TRACE_ID_HEADER) {
            let trace_id = match incoming {
                Some(c) => HeaderValue::from_str(&c.trace_id).ok(),
                None => Some(new_trace_id_value()),
            };
            if let Some(v) = trace_id {
                headers.insert(TRACE_ID_NAME, v);
            }
        }
        if timeout.is_zero() {
            return ClientContextFuture::Expired {
                answer: Some(
                    layer_status::deadline_exceeded("deadline exceeded before the call was sent")
                        .into_http(),
                ),
            };
        }
        headers.insert(GRPC_TIMEOUT_NAME, grpc_timeout_value(timeout));
        ClientContextFuture::Sent {
            call: tokio::time::timeout(timeout, self.inner.call(req)),
            timeout,
        }
    }
}

pin_project! {
    /// The future of [`ClientContext`]: the call bounded by its deadline, or the answer to a call whose
    /// deadline had passed before it was sent. Nothing is allocated for it.
    #[project = Projected]
    pub enum ClientContextFuture<F> {
        /// Sent, with the time it may take.
        Sent {
            #[pin]
            call: tokio::time::Timeout<F>,
            timeout: Duration,
        },
        /// Not sent: DEADLINE_EXCEEDED.
        Expired { answer: Option<Response<Body>> },
    }
}

impl<F, E> Future for ClientContextFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = Result<Response<Body>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            Projected::Sent { call, timeout } => match std::task::ready!(call.poll(cx)) {
                Ok(answered) => Poll::Ready(answered),
                Err(_) => Poll::Ready(Ok(layer_status::deadline_exceeded(format!(
                    "deadline of {timeout:?} exceeded"
                ))
                .into_http())),
            },
            Projected::Expired { answer } => Poll::Ready(Ok(answer
                .take()
                .expect("ClientContextFuture polled after it answered"))),
        }
    }
}
