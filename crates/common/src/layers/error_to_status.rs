//! Transport and balancer errors become UNAVAILABLE responses, so a caller sees one error type (a gRPC status)
//! and the channel itself never fails as a service.

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

/// Turns transport and balancer errors into UNAVAILABLE responses.
#[derive(Clone, Debug)]
pub struct ErrorToStatus<S> {
    inner: S,
}

/// Makes [`ErrorToStatus`]; sits above whatever picks the endpoint.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorToStatusLayer;

impl<S> Layer<S> for ErrorToStatusLayer {
    type Service = ErrorToStatus<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ErrorToStatus { inner }
    }
}

impl<S> Service<Request<Body>> for ErrorToStatus<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A failed balancer cannot recover; report it on the call instead of failing readiness.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let fut = self.inner.call(req);
        Box::pin(async move {
            Ok(fut.await.unwrap_or_else(|e| {
                let e: BoxError = e.into();
                layer_status::unavailable(format!("transport: {e}")).into_http()
            }))
        })
    }
}
