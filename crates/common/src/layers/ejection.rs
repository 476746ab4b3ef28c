//! Per-endpoint ejection: after a transport failure the endpoint reports not-ready for a backoff (1 s doubling
//! to 30 s), so the channel's picker (every policy) stops picking it. When the backoff ends, a TCP connect probes the address first
//! (at most [`PROBE_TIMEOUT`]): refused, the endpoint stays out for the next backoff without a call spent on
//! it (an instance that crashed stays in DNS until its health check turns critical, several seconds); accepted,
//! calls go to it again (half-open) and success brings it back. It never returns an error from `poll_ready`:
//! an endpoint leaves only when discovery says so.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{BoxError, Service};

use crate::{connect::is_timeout, error::layer_status};

#[derive(Debug, Default)]
struct Ejection {
    until: Option<Instant>,
    failures: u32,
}

/// An endpoint's ejection, shared by its clones and its calls' futures.
#[derive(Debug, Default)]
struct EjectState {
    ejection: Mutex<Ejection>,
    /// Whether `ejection` holds anything (failures, or a backoff): written under its lock, read without it, so a
    /// healthy endpoint's calls and readiness checks take no lock (both workers make them).
    troubled: AtomicBool,
}

impl EjectState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Ejection> {
        self.ejection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The end of the endpoint's backoff, when it is out.
    fn until(&self) -> Option<Instant> {
        if self.troubled.load(Ordering::Acquire) {
            self.lock().until
        } else {
            None
        }
    }

    /// Half-open: the backoff is over and the address accepts connections.
    fn let_in(&self) {
        let mut e = self.lock();
        e.until = None;
        self.troubled.store(e.failures > 0, Ordering::Release);
    }

    /// A call succeeded: the failures in a row are over.
    fn succeeded(&self, addr: SocketAddr) {
        if !self.troubled.load(Ordering::Acquire) {
            return;
        }
        let mut e = self.lock();
        if e.failures > 0 {
            tracing::info!(endpoint = %addr, "endpoint recovered");
        }
        e.failures = 0;
        self.troubled.store(e.until.is_some(), Ordering::Release);
    }
}

/// One endpoint that takes itself out of rotation after a transport failure; see the module docs.
pub struct Ejecting<S> {
    inner: S,
    addr: SocketAddr,
    state: Arc<EjectState>,
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

fn eject(state: &EjectState, addr: SocketAddr, why: &dyn std::fmt::Display) {
    let mut s = state.lock();
    s.failures = s.failures.saturating_add(1);
    let backoff = Duration::from_secs(1) * 2u32.saturating_pow(s.failures.min(6) - 1);
    let backoff = backoff.min(Duration::from_secs(30));
    s.until = Some(Instant::now() + backoff);
    state.troubled.store(true, Ordering::Release);
    drop(s);
    tracing::warn!(endpoint = %addr, error = %why, backoff = ?backoff, "endpoint ejected");
}

impl<S> Service<Request<Body>> for Ejecting<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = EjectingFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            if let Some(until) = self.state.until() {
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
                    self.state.let_in();
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
        EjectingFuture {
            inner: self.inner.call(req),
            state: self.state.clone(),
            addr: self.addr,
        }
    }
}

pin_project! {
    /// The future of [`Ejecting`]: the endpoint's answer; a transport error ejects it (and becomes
    /// [`EndpointFailed`]), a success ends its failures. Nothing is allocated for it.
    pub struct EjectingFuture<F> {
        #[pin]
        inner: F,
        state: Arc<EjectState>,
        addr: SocketAddr,
    }
}

impl<F, E> Future for EjectingFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match std::task::ready!(this.inner.poll(cx)) {
            Ok(resp) => {
                this.state.succeeded(*this.addr);
                Ok(resp)
            }
            Err(e) => {
                let e: BoxError = e.into();
                // tonic's channel enforces `grpc-timeout` itself and reports expiry as an error: that is the
                // caller's deadline, not a broken endpoint.
                if is_timeout(&*e) {
                    return Poll::Ready(Ok(
                        layer_status::deadline_exceeded("deadline exceeded").into_http()
                    ));
                }
                eject(this.state, *this.addr, &e);
                Err(EndpointFailed {
                    addr: *this.addr,
                    source: e,
                }
                .into())
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_backoff_doubles_and_caps() {
        let state = EjectState::default();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let mut seconds = Vec::new();
        for _ in 0..8 {
            let before = Instant::now();
            eject(&state, addr, &"refused");
            let d = state.lock().until.unwrap() - before;
            seconds.push(d.as_secs_f64().round() as u64);
        }
        assert_eq!(seconds, [1, 2, 4, 8, 16, 30, 30, 30]);
    }

    #[test]
    fn a_success_during_the_backoff_ends_the_failures_but_not_the_backoff() {
        let state = EjectState::default();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(state.until(), None, "a new endpoint is in rotation");
        eject(&state, addr, &"refused");
        let until = state.until().expect("out for its backoff");
        // A call sent before the ejection answers OK.
        state.succeeded(addr);
        assert_eq!(state.lock().failures, 0);
        assert_eq!(
            state.until(),
            Some(until),
            "still out until its backoff ends"
        );
        state.let_in();
        assert_eq!(state.until(), None);
        assert!(
            !state.troubled.load(Ordering::Acquire),
            "healthy again: no lock on the call path"
        );
        // Half-open after a failure: in rotation, but the next success is what ends the failures.
        eject(&state, addr, &"refused");
        state.let_in();
        assert_eq!(state.until(), None);
        assert!(state.troubled.load(Ordering::Acquire));
        state.succeeded(addr);
        assert!(!state.troubled.load(Ordering::Acquire));
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
        assert_eq!(e.state.lock().failures, 2);
        // Something listens now: after the next backoff, calls go to it.
        let _listening = tokio::net::TcpListener::bind(addr).await.unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), e.ready()).await;
        assert!(back.is_ok_and(|r| r.is_ok()));
        assert_eq!(calls.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
