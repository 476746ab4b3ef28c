//! The no-endpoint fast path: when discovery answered and found no healthy instance, a call fails at once
//! with UNAVAILABLE; a call made before discovery's first answer waits for it (within its deadline) and then
//! decides. (A call queued in the balancer with no endpoint would otherwise wait out its whole deadline.)
//!
//! Wait-for-ready (gRPC's call option, <https://github.com/grpc/grpc/blob/master/doc/wait-for-ready.md>): a call
//! that asks for it ([`WaitForReady`] in its extensions), or any call to a service named in
//! `client.wait_for_ready`, waits instead for an instance to appear, within its deadline (DEADLINE_EXCEEDED
//! when none does in time).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::Either;
use http::{Request, Response};
use tokio::sync::watch;
use tonic::body::Body;
use tower::{BoxError, Service};

use crate::error::layer_status;

/// gRPC's wait-for-ready call option: put it in a request's extensions
/// (`request.extensions_mut().insert(WaitForReady)`) and the call waits, within its deadline, for an instance
/// of the service to appear instead of failing with UNAVAILABLE when there is none.
#[derive(Clone, Copy, Debug, Default)]
pub struct WaitForReady;

/// Fails fast with UNAVAILABLE when discovery found no healthy instance; holds a call made before discovery's
/// first answer until that answer (a call queued in the balancer with no endpoint would wait out its deadline).
/// With wait-for-ready, waits for an instance instead.
#[derive(Clone, Debug)]
pub struct NoEndpointFastFail<S> {
    inner: S,
    endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    service: Arc<str>,
    wait_for_ready: bool,
}

impl<S> NoEndpointFastFail<S> {
    /// `inner` (the balancer) for service `service`, whose instances `endpoints` publishes (`None` until
    /// discovery's first answer); `wait_for_ready`: every call waits for an instance (else only those with
    /// [`WaitForReady`]).
    pub fn new(
        inner: S,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
        service: Arc<str>,
        wait_for_ready: bool,
    ) -> Self {
        Self {
            inner,
            endpoints,
            service,
            wait_for_ready,
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
    /// The balancer's own future when discovery lists instances (every call but the first few, nothing
    /// allocated); boxed when the call waits for discovery or fails without an instance.
    type Future =
        Either<S::Future, Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.endpoints.borrow().as_ref().is_some_and(Vec::is_empty) {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let none = |service: &str| Ok(layer_status::no_instance(service).into_http());
        let answered = self.endpoints.borrow().as_ref().map(Vec::is_empty);
        let wait = self.wait_for_ready || req.extensions().get::<WaitForReady>().is_some();
        if wait && answered != Some(false) {
            let mut endpoints = self.endpoints.clone();
            let mut inner = self.inner.clone();
            return Either::Right(Box::pin(async move {
                // Bounded by the call's deadline, which the client context layer outside enforces.
                let _ = endpoints
                    .wait_for(|v| v.as_ref().is_some_and(|l| !l.is_empty()))
                    .await;
                use tower::ServiceExt;
                inner.ready().await?.call(req).await
            }));
        }
        match answered {
            Some(true) => {
                let r = none(&self.service);
                Either::Right(Box::pin(async move { r }))
            }
            Some(false) => Either::Left(self.inner.call(req)),
            None => {
                let mut endpoints = self.endpoints.clone();
                let mut inner = self.inner.clone();
                let service = self.service.clone();
                Either::Right(Box::pin(async move {
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
                }))
            }
        }
    }
}
