//! The no-endpoint fast path: when discovery answered and found no healthy instance, a call fails at once
//! with UNAVAILABLE; a call made before discovery's first answer waits for it (within its deadline) and then
//! decides. (A call queued in the balancer with no endpoint would otherwise wait out its whole deadline.)

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{Request, Response};
use tokio::sync::watch;
use tonic::body::Body;
use tower::{BoxError, Service};

use crate::error::layer_status;

/// Fails fast with UNAVAILABLE when discovery found no healthy instance; holds a call made before discovery's
/// first answer until that answer (a call queued in the balancer with no endpoint would wait out its deadline).
#[derive(Clone, Debug)]
pub struct NoEndpointFastFail<S> {
    inner: S,
    endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    service: Arc<str>,
}

impl<S> NoEndpointFastFail<S> {
    /// `inner` (the balancer) for service `service`, whose instances `endpoints` publishes (`None` until
    /// discovery's first answer).
    pub fn new(
        inner: S,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
        service: Arc<str>,
    ) -> Self {
        Self {
            inner,
            endpoints,
            service,
        }
    }
}

impl<S> Service<Request<Body>> for NoEndpointFastFail<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.endpoints.borrow().as_ref().is_some_and(Vec::is_empty) {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let none = |service: &str| {
            Ok(
                layer_status::unavailable(format!("no healthy instance of service {service:?}"))
                    .into_http(),
            )
        };
        let answered = self.endpoints.borrow().as_ref().map(Vec::is_empty);
        match answered {
            Some(true) => {
                let r = none(&self.service);
                Box::pin(async move { r })
            }
            Some(false) => Box::pin(self.inner.call(req)),
            None => {
                let mut endpoints = self.endpoints.clone();
                let mut inner = self.inner.clone();
                let service = self.service.clone();
                Box::pin(async move {
                    let empty = endpoints
                        .wait_for(Option::is_some)
                        .await
                        .map(|v| v.as_ref().is_some_and(Vec::is_empty))
                        .unwrap_or(true);
                    if empty {
                        return none(&service);
                    }
                    use tower::ServiceExt;
                    inner.ready().await?.call(req).await
                })
            }
        }
    }
}
