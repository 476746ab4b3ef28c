//! Load shedding's answer: turns tower's `Overloaded` (the concurrency limit is reached) into
//! RESOURCE_EXHAUSTED before any handler ran, so a caller over the limit is told at once to back off instead of
//! queueing; any other error of the stack becomes an opaque INTERNAL, logged in full.

use std::{
    convert::Infallible,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use tonic::body::Body;
use tower::{BoxError, Layer, Service};

use crate::error::layer_status;

/// Turns load shedding's `Overloaded` into RESOURCE_EXHAUSTED before any handler ran.
#[derive(Clone, Debug)]
pub struct ShedToStatus<S> {
    inner: S,
}

/// Makes [`ShedToStatus`]; sits right above `LoadShed`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ShedToStatusLayer;

impl<S> Layer<S> for ShedToStatusLayer {
    type Service = ShedToStatus<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ShedToStatus { inner }
    }
}

impl<S, B> Service<Request<B>> for ShedToStatus<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // LoadShed is always ready (it sheds in `call`); any other readiness error surfaces on the call.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            Ok(match fut.await {
                Ok(resp) => resp,
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => {
                    layer_status::overloaded(
                        "server overloaded: concurrency limit reached; retry later",
                    )
                    .into_http()
                }
                Err(e) => {
                    layer_status::internal(anyhow::anyhow!("server stack error: {e}")).into_http()
                }
            })
        })
    }
}
