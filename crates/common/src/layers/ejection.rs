//! Per-endpoint ejection: after a transport failure the endpoint reports not-ready for a backoff (1 s doubling
//! to 30 s), so the balancer stops picking it. When the backoff ends, a TCP connect probes the address first
//! (at most [`PROBE_TIMEOUT`]): refused, the endpoint stays out for the next backoff without a call spent on
//! it (an instance that crashed stays in DNS until its health check turns critical, several seconds); accepted,
//! calls go to it again (half-open) and success brings it back. It never returns an error from `poll_ready`,
//! which would make the balancer drop the endpoint for good (an endpoint leaves only when discovery says so).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use tonic::body::Body;
use tower::{BoxError, Service, load::Load};

use crate::{connect::is_timeout, error::layer_status};

#[derive(Debug, Default)]
struct EjectState {
    until: Option<Instant>,
    failures: u32,
}

/// One endpoint that takes itself out of rotation after a transport failure; see the module docs.
pub struct Ejecting<S> {
    inner: S,
    addr: SocketAddr,
    state: Arc<Mutex<EjectState>>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The connect probe running once a backoff ended: whether the address accepted.
    probe: Option<Pin<Box<dyn Future<Output = bool> + Send>>>,
}

/// The error of a call that failed on the transport of the endpoint at `addr` (what its channel returned, as
/// `source`), so the layers above know which instance failed: [`ErrorToStatus`](super::ErrorToStatus) names
/// it in the UNAVAILABLE message and in [`NeverSent`](super::NeverSent).
#[derive(Debug, thiserror::Error)]
#[error("{addr}: {source}")]
pub struct EndpointFailed {
    /// The endpoint's address.
    pub addr: SocketAddr,
    /// What its channel returned.
    #[source]
    pub source: BoxError,
}

/// The longest a probe's TCP connect may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

impl<S> Ejecting<S> {
    /// `inner`, the channel of the endpoint at `addr`.
    pub fn new(addr: SocketAddr, inner: S) -> Self {
        Self {
            inner,
            addr,
            state: Arc::default(),
            sleep: None,
            probe: None,
        }
    }
}

fn eject(state: &Mutex<EjectState>, addr: SocketAddr, why: &dyn std::fmt::Display) {
    let mut s = state.lock().expect("eject state");
    s.failures = s.failures.saturating_add(1);
    let backoff = Duration::from_secs(1) * 2u32.saturating_pow(s.failures.min(6) - 1);
    let backoff = backoff.min(Duration::from_secs(30));
    s.until = Some(Instant::now() + backoff);
    tracing::warn!(endpoint = %addr, error = %why, backoff = ?backoff, "endpoint ejected");
}

impl<S> Service<Request<Body>> for Ejecting<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            let until = self.state.lock().expect("eject state").until;
            if let Some(until) = until {
                let until = tokio::time::Instant::from_std(until);
                let sleep = self
                    .sleep
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                if sleep.deadline() != until {
                    sleep.as_mut().reset(until);
                }
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                // Backoff over: does the address accept connections at all?
                let addr = self.addr;
                let probe = self.probe.get_or_insert_with(|| {
                    Box::pin(async move {
                        let connect = tokio::net::TcpStream::connect(addr);
                        matches!(
                            tokio::time::timeout(PROBE_TIMEOUT, connect).await,
                            Ok(Ok(_))
                        )
                    })
                });
                let Poll::Ready(accepted) = probe.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                self.probe = None;
                self.sleep = None;
                if accepted {
                    // Half-open: let calls through until one fails again.
                    self.state.lock().expect("eject state").until = None;
                } else {
                    eject(
                        &self.state,
                        self.addr,
                        &"probe: the address does not accept connections",
                    );
                    continue;
                }
            }
            match self.inner.poll_ready(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => return Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => eject(&self.state, self.addr, &e.into()),
            }
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let fut = self.inner.call(req);
        let (state, addr) = (self.state.clone(), self.addr);
        Box::pin(async move {
            match fut.await {
                Ok(resp) => {
                    let mut s = state.lock().expect("eject state");
                    if s.failures > 0 {
                        tracing::info!(endpoint = %addr, "endpoint recovered");
                    }
                    s.failures = 0;
                    Ok(resp)
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    // tonic's channel enforces `grpc-timeout` itself and reports expiry as an error: that is the
                    // caller's deadline, not a broken endpoint.
                    if is_timeout(&*e) {
                        return Ok(layer_status::deadline_exceeded("deadline exceeded").into_http());
                    }
                    eject(&state, addr, &e);
                    Err(EndpointFailed { addr, source: e }.into())
                }
            }
        })
    }
}

impl<S: Load> Load for Ejecting<S> {
    type Metric = S::Metric;
    fn load(&self) -> Self::Metric {
        self.inner.load()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_backoff_doubles_and_caps() {
        let state = Mutex::new(EjectState::default());
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut seconds = Vec::new();
        for _ in 0..8 {
            let before = Instant::now();
            eject(&state, addr, &"refused");
            let d = state.lock().unwrap().until.unwrap() - before;
            seconds.push(d.as_secs_f64().round() as u64);
        }
        assert_eq!(seconds, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    use tower::ServiceExt;

    #[tokio::test]
    async fn after_a_backoff_a_refused_probe_keeps_the_endpoint_out_and_an_accepted_one_lets_calls_in()
     {
        let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = free.local_addr().unwrap();
        drop(free);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let mut e = Ejecting::new(
            addr,
            tower::service_fn(move |_: Request<Body>| {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                async { Ok::<_, std::convert::Infallible>(Response::new(Body::empty())) }
            }),
        );
        eject(&e.state, addr, &"refused");
        // The backoff (1 s) ends, nothing listens: out again, for 2 s, and no call was let through.
        let still_out = tokio::time::timeout(Duration::from_millis(1500), e.ready()).await;
        assert!(still_out.is_err());
        assert_eq!(e.state.lock().unwrap().failures, 2);
        // Something listens now: after the next backoff, calls go to it.
        let _listening = tokio::net::TcpListener::bind(addr).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), e.ready()).await;
        assert!(back.is_ok_and(|r| r.is_ok()));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
