//! One endpoint's channel: a lazily connecting tonic channel per instance address (TLS when configured, TCP
//! no-delay, HTTP/2 keepalive of `client.keepalive_interval`/`client.keepalive_timeout`, idle connections
//! included), shared by the balanced and the keyed channels. A connection no call has used for
//! `client.idle_timeout` is closed (once its open streams end); the next call connects again.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use tonic::{body::Body, transport::Endpoint};
use tower::{Service, ServiceExt, util::Oneshot};

/// How endpoints are dialled (`client.*`).
#[derive(Clone, Debug)]
pub(crate) struct Dial {
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Zero: never closed for idleness.
    pub idle_timeout: Duration,
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// One endpoint's lazily (re)connecting channel; see the module docs. Always ready: a call takes the
/// connection's channel only for itself (tonic's buffer slot is awaited inside the call), so no handle lingers
/// in a balancer's ready set to keep an idle connection open.
#[derive(Clone)]
pub(crate) struct Conn {
    shared: Arc<Mutex<Shared>>,
    endpoint: Endpoint,
}

struct Shared {
    channel: Option<tonic::transport::Channel>,
    last_used: Instant,
}

impl Conn {
    fn channel(&self) -> tonic::transport::Channel {
        let mut s = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        s.last_used = Instant::now();
        s.channel
            .get_or_insert_with(|| self.endpoint.connect_lazy())
            .clone()
    }
}

/// Drops the shared handle of an endpoint idle for `idle`, checking every half of it, until the endpoint is
/// gone.
async fn close_when_idle(shared: Weak<Mutex<Shared>>, idle: Duration) {
    let mut tick = tokio::time::interval(idle / 2);
    loop {
        tick.tick().await;
        let Some(s) = shared.upgrade() else { return };
        let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
        if s.channel.is_some() && s.last_used.elapsed() >= idle {
            tracing::debug!("closing an idle connection");
            s.channel = None;
        }
    }
}

impl Service<Request<Body>> for Conn {
    type Response = Response<Body>;
    type Error = tonic::transport::Error;
    type Future = Oneshot<tonic::transport::Channel, Request<Body>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.channel().oneshot(req)
    }
}

/// The channel of the endpoint at `addr`. Must be called inside a Tokio runtime when `dial.idle_timeout` is
/// set (the idle check is a task).
pub(crate) fn connect(addr: SocketAddr, dial: &Dial) -> Conn {
    let scheme = if dial.tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .expect("socket address is a valid authority");
    if let Some(cfg) = &dial.tls {
        // Only fails for a non-https URI, which this is.
        endpoint = endpoint
            .tls_config(cfg.clone())
            .expect("https endpoint accepts TLS");
    }
    let endpoint = endpoint
        .connect_timeout(dial.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(dial.keepalive_interval)
        .keep_alive_timeout(dial.keepalive_timeout)
        .keep_alive_while_idle(true);
    let shared = Arc::new(Mutex::new(Shared {
        channel: None,
        last_used: Instant::now(),
    }));
    if !dial.idle_timeout.is_zero() {
        tokio::spawn(close_when_idle(Arc::downgrade(&shared), dial.idle_timeout));
    }
    Conn { shared, endpoint }
}

/// Whether `e` (or its cause) is tonic's `grpc-timeout` expiry: the caller's deadline, not a broken endpoint.
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
