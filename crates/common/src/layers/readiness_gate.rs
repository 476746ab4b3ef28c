//! Server side: while a readiness check fails (the database is down, say), every call but health checks and
//! reflection is answered UNAVAILABLE at once, naming the dependency, instead of waiting on it until the
//! caller's deadline: a fast, typed failure the client can retry elsewhere, while Consul takes the instance out
//! of DNS (the health status is NOT_SERVING by then). Calls pass again as soon as the checks do.
//!
//! The answer carries `grpc-retry-pushback-ms: 0` (gRPC proposal A6): a caller that retries sends its next
//! attempt at once, to another instance, instead of waiting out a backoff for a dependency this instance
//! cannot reach.
//!
//! Shutdown is not a failed check: an instance draining keeps serving the calls of clients that have not yet
//! seen it leave DNS.

use std::{
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use futures::future::{Either, Ready, ready};
use http::{Request, Response};
use tonic::body::Body;
use tower::{Layer, Service};

use crate::error::layer_status;

/// What the readiness checks last found: `None` when every one passes, else what failed.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<RwLock<Option<Arc<str>>>>);

impl Readiness {
    /// Records the outcome of a round of checks: `None` when all passed, else the failures.
    pub fn set(&self, failed: Option<String>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = failed.map(Arc::from);
    }

    /// What failed, if anything.
    pub fn failed(&self) -> Option<Arc<str>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Server side: see the module docs.
#[derive(Clone, Debug)]
pub struct ReadinessGateLayer {
    readiness: Readiness,
}

impl ReadinessGateLayer {
    /// Calls are refused while `readiness` records a failure.
    pub fn new(readiness: Readiness) -> Self {
        Self { readiness }
    }
}

impl<S> Layer<S> for ReadinessGateLayer {
    type Service = ReadinessGate<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ReadinessGate {
            inner,
            readiness: self.readiness.clone(),
        }
    }
}

/// Service made by [`ReadinessGateLayer`].
#[derive(Clone, Debug)]
pub struct ReadinessGate<S> {
    inner: S,
    readiness: Readiness,
}

/// Health checks and reflection are answered whatever the dependencies do.
fn always_served(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.") || path.starts_with("/grpc.reflection.")
}

impl<S, B> Service<Request<B>> for ReadinessGate<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    /// The handler's own future when served (nothing allocated per call), the refusal ready at once when not.
    type Future = Either<Ready<Result<Response<Body>, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        if let Some(failed) = self.readiness.failed()
            && !always_served(req.uri().path())
        {
            let mut status = layer_status::unavailable(format!("not ready: {failed}"));
            status.metadata_mut().insert(
                "grpc-retry-pushback-ms",
                tonic::metadata::MetadataValue::from_static("0"),
            );
            return Either::Left(ready(Ok(status.into_http())));
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn calls_are_refused_while_a_check_fails_and_health_checks_never() {
        let readiness = Readiness::default();
        let svc = ReadinessGateLayer::new(readiness.clone()).layer(tower::service_fn(
            |_: Request<()>| async {
                Ok::<_, std::convert::Infallible>(Response::new(Body::empty()))
            },
        ));
        let status = |path: &'static str| {
            let svc = svc.clone();
            async move {
                let resp = svc
                    .oneshot(Request::builder().uri(path).body(()).unwrap())
                    .await
                    .unwrap();
                (
                    crate::layers::grpc_status(resp.headers()),
                    resp.headers().get("grpc-retry-pushback-ms").cloned(),
                )
            }
        };
        assert_eq!(status("/pkg.Svc/Call").await, (None, None), "served");
        readiness.set(Some("video-catalog database: pool timed out".into()));
        assert_eq!(
            status("/pkg.Svc/Call").await,
            (
                Some(tonic::Code::Unavailable),
                Some(http::HeaderValue::from_static("0"))
            ),
            "refused, to be retried at once elsewhere"
        );
        assert_eq!(status("/grpc.health.v1.Health/Check").await.0, None);
        readiness.set(None);
        assert_eq!(status("/pkg.Svc/Call").await.0, None, "served again");
    }
}
