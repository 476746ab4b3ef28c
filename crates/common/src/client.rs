//! The client channel factory: given only a service name, a channel that finds the service's instances through
//! Consul DNS (or the static list) and balances calls across them.
//!
//! The stack of one [`Channel`], outermost first, and why each layer sits where it does:
//! 1. [`ClientContextLayer`]: trace id and the remaining deadline go out as metadata; the deadline also bounds
//!    the wait for a ready endpoint, so a call never hangs past it.
//! 2. [`GrpcMetricsLayer`] (client side): count, latency, status per method, as the caller experiences them.
//! 3. errors of the layers below become UNAVAILABLE statuses, so callers see one error type.
//! 4. no-endpoint fast path: when discovery answered and found no healthy instance, fail fast with UNAVAILABLE;
//!    a call made before the first answer waits for it (within its deadline) and then decides.
//! 5. `Buffer`: makes the balancer cloneable and shareable between tasks.
//! 6. `Balance` (power of two choices) over `PeakEwma` load: picks the less loaded of two random endpoints,
//!    by a peak-sensitive moving average of round-trip time times outstanding requests.
//! 7. per endpoint, [`Ejecting`]: after a transport failure the endpoint reports not-ready for a backoff
//!    (1 s doubling to 30 s), so the balancer stops picking it; after the backoff one call tries it again
//!    (half-open), and success brings it back. It never returns an error from `poll_ready`, which would make
//!    the balancer drop the endpoint for good.
//! 8. a lazily connecting `tonic` channel per endpoint.
//!
//! Endpoint sets come from [`discovery::watch`]: added instances are inserted, vanished ones removed.

use std::{
    collections::{BTreeSet, HashSet},
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use http::{Request, Response};
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::{Status, body::Body, transport::Endpoint};
use tower::{
    BoxError, Service, ServiceBuilder,
    balance::p2c::Balance,
    buffer::Buffer,
    discover::Change,
    load::{CompleteOnResponse, Load, PeakEwmaDiscover},
    util::BoxCloneSyncService,
};

use crate::{
    config::Settings,
    context::ClientContextLayer,
    discovery::{self, Source, SrvResolver},
    metrics::{GrpcMetricsLayer, Metrics, Side},
    retry::{RetryBudget, RetryPolicy},
};

/// A balanced, discovered channel to one service; give it to a generated client (`EchoClient::new(channel)`).
/// It never fails as a service: every failure arrives as a gRPC status in the response.
pub type Channel = BoxCloneSyncService<Request<Body>, Response<Body>, Infallible>;

/// Why a channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Consul DNS is off and `client.static_endpoints` has no entry for the service.
    #[error(
        "no endpoints configured for service {0:?}: enable Consul DNS or set client.static_endpoints"
    )]
    NoEndpoints(String),
    /// The client TLS files (`tls.ca_file`, `tls.cert_file`, `tls.key_file`) cannot be used.
    #[error("client TLS: {0}")]
    Tls(String),
}

/// Makes [`Channel`]s; one per process, cheap to clone.
#[derive(Clone, Debug)]
pub struct ClientFactory {
    settings: Arc<Settings>,
    metrics: Metrics,
    resolver: Option<SrvResolver>,
    budget: Arc<RetryBudget>,
    /// `Ok(None)`: plaintext; `Err`: the TLS files could not be read (reported by [`Self::channel`]).
    tls: Result<Option<tonic::transport::ClientTlsConfig>, String>,
}

impl ClientFactory {
    /// A factory using Consul DNS when `consul.dns_enabled`, else `client.static_endpoints`.
    pub fn new(settings: &Settings, metrics: Metrics) -> Self {
        let resolver = settings
            .consul
            .dns_enabled
            .then(|| SrvResolver::new(settings.consul.dns_addr));
        Self {
            settings: Arc::new(settings.clone()),
            metrics,
            resolver,
            budget: Arc::new(RetryBudget::default()),
            tls: crate::tls::client_config(&settings.tls).map_err(|e| e.to_string()),
        }
    }

    /// The retry policy for calls made through this factory's channels (one shared budget per process).
    pub fn retry_policy(&self) -> RetryPolicy {
        RetryPolicy::new(self.settings.client.max_attempts, self.budget.clone())
    }

    /// A channel to Consul service `service`. Must be called inside a Tokio runtime.
    ///
    /// # Errors
    /// [`ClientError::NoEndpoints`] when Consul DNS is off and no static list names the service.
    pub fn channel(&self, service: &str) -> Result<Channel, ClientError> {
        let endpoints = self.watch(service)?;
        self.tls.as_ref().map_err(|e| ClientError::Tls(e.clone()))?;
        Ok(self.balanced(service, endpoints))
    }

    /// A channel to Consul service `service` that sends each call to the instance owning its routing key
    /// ([`crate::routing`]: rendezvous hashing over the discovered instances), for sharded services. The same
    /// context and metrics layers as [`Self::channel`]; no balancing, and a call whose owner is unreachable
    /// fails UNAVAILABLE (the owner changes once discovery drops it).
    ///
    /// # Errors
    /// As [`Self::channel`].
    pub fn keyed_channel(&self, service: &str) -> Result<Channel, ClientError> {
        let endpoints = self.watch(service)?;
        let router = crate::routing::KeyRouter {
            service: Arc::from(service),
            endpoints,
            channels: Arc::default(),
            connect: self.connector()?,
        };
        Ok(self.outer(router))
    }

    /// The layers every channel shares (1–3 of the module docs) on top of `routing`, what picks the endpoint.
    fn outer<S>(&self, routing: S) -> Channel
    where
        S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let svc = ServiceBuilder::new()
            .layer(ClientContextLayer::new(
                self.settings.client.default_timeout,
            ))
            .layer(GrpcMetricsLayer::new(
                self.metrics.clone(),
                Side::Client,
                HashSet::new(),
            ))
            .layer_fn(|inner| ErrorToStatus { inner })
            .service(routing);
        BoxCloneSyncService::new(svc)
    }

    /// Makes the lazily connecting channel of one endpoint (TLS when configured).
    fn connector(&self) -> Result<Connector, ClientError> {
        let tls = self.tls.clone().map_err(ClientError::Tls)?;
        let timeout = self.settings.client.connect_timeout;
        Ok(Arc::new(move |addr| connect(addr, timeout, tls.as_ref())))
    }

    fn watch(
        &self,
        service: &str,
    ) -> Result<watch::Receiver<Option<Vec<SocketAddr>>>, ClientError> {
        let source = match (
            &self.resolver,
            self.settings.client.static_endpoints.get(service),
        ) {
            (Some(r), _) => Source::Consul(Box::new(r.clone())),
            (None, Some(list)) => Source::Static(list.clone()),
            (None, None) => return Err(ClientError::NoEndpoints(service.to_owned())),
        };
        Ok(discovery::watch(
            service.to_owned(),
            source,
            self.settings.consul.discovery_interval,
        ))
    }

    /// A channel over the endpoints published by `endpoints` (tests and custom discovery).
    pub fn balanced(
        &self,
        service: &str,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    ) -> Channel {
        let connect_timeout = self.settings.client.connect_timeout;
        let tls = self.tls.clone().ok().flatten();
        let changes = WatchStream::new(endpoints.clone())
            .filter_map(|v| async move { v })
            .scan(BTreeSet::<SocketAddr>::new(), move |known, list| {
                let next: BTreeSet<SocketAddr> = list.into_iter().collect();
                let mut changes: Vec<Change<SocketAddr, Ejecting<tonic::transport::Channel>>> =
                    Vec::new();
                for gone in known.difference(&next) {
                    changes.push(Change::Remove(*gone));
                }
                for new in next.difference(known) {
                    changes.push(Change::Insert(
                        *new,
                        Ejecting::new(*new, connect(*new, connect_timeout, tls.as_ref())),
                    ));
                }
                *known = next;
                futures::future::ready(Some(stream::iter(changes)))
            })
            .flatten()
            .map(Ok::<_, Infallible>)
            .boxed();
        let discover = PeakEwmaDiscover::new(
            changes,
            Duration::from_millis(30),
            Duration::from_secs(10),
            CompleteOnResponse::default(),
        );
        let balance = Balance::new(discover);
        let buffer = Buffer::new(balance, 1024);
        self.outer(NoEndpointFastFail {
            inner: buffer,
            endpoints,
            service: Arc::from(service),
        })
    }
}

/// Makes one endpoint's channel.
pub(crate) type Connector = Arc<dyn Fn(SocketAddr) -> tonic::transport::Channel + Send + Sync>;

fn connect(
    addr: SocketAddr,
    connect_timeout: Duration,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> tonic::transport::Channel {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .expect("socket address is a valid authority");
    if let Some(cfg) = tls {
        // Only fails for a non-https URI, which this is.
        endpoint = endpoint
            .tls_config(cfg.clone())
            .expect("https endpoint accepts TLS");
    }
    endpoint
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true)
        .connect_lazy()
}

/// Turns transport and balancer errors into UNAVAILABLE responses.
#[derive(Clone)]
struct ErrorToStatus<S> {
    inner: S,
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
                let status = Status::unavailable(format!("transport: {e}"));
                status.into_http()
            }))
        })
    }
}

/// Fails fast with UNAVAILABLE when discovery found no healthy instance; holds a call made before discovery's
/// first answer until that answer (a call queued in the balancer with no endpoint would wait out its deadline).
#[derive(Clone)]
struct NoEndpointFastFail<S> {
    inner: S,
    endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    service: Arc<str>,
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
                Status::unavailable(format!("no healthy instance of service {service:?}"))
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
}

impl<S> Ejecting<S> {
    fn new(addr: SocketAddr, inner: S) -> Self {
        Self {
            inner,
            addr,
            state: Arc::default(),
            sleep: None,
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
                // Backoff over: half-open, let calls through until one fails again.
                self.state.lock().expect("eject state").until = None;
                self.sleep = None;
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
                        return Ok(Status::deadline_exceeded("deadline exceeded").into_http());
                    }
                    eject(&state, addr, &e);
                    Err(e)
                }
            }
        })
    }
}

pub(crate) fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<tonic::TimeoutExpired>() {
            return true;
        }
        cur = err.source();
    }
    false
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
}
