//! One endpoint's channel: a lazily connecting tonic channel per instance address (TLS when configured, TCP
//! no-delay, HTTP/2 keepalive of `client.keepalive_interval`/`client.keepalive_timeout`, idle connections
//! included, and `TCP_USER_TIMEOUT` of `client.keepalive_timeout`), shared by the balanced and the keyed
//! channels.
//!
//! `TCP_USER_TIMEOUT` (Linux, RFC 5482's local timeout) closes a connection whose sent bytes stay
//! unacknowledged that long, as gRPC's own libraries do with their keepalive timeout (gRFC A18). Without it, a
//! connection to a machine that was cut off stays in TCP's retransmission backoff, which doubles up to two
//! minutes: once the network is back, calls on it wait for the next retransmission (often longer than their
//! deadline) while a new connection would be answered at once. A connection no call has used for
//! `client.idle_timeout` is closed (once its open streams end); the next call connects again.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use http::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
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
    tcp: HttpConnector,
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
            .get_or_insert_with(|| self.endpoint.connect_with_connector_lazy(self.tcp.clone()))
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
    Conn {
        shared,
        endpoint,
        tcp: tcp_connector(dial),
    }
}

/// How the TCP connection under each channel is made: what tonic's own connector does (no-delay, any URI
/// scheme, as TLS is layered above it by the endpoint), and `TCP_USER_TIMEOUT` of the keepalive timeout (see
/// the module docs). The connect timeout is the endpoint's.
#[cfg_attr(
    not(any(target_os = "android", target_os = "fuchsia", target_os = "linux")),
    allow(unused_variables)
)]
fn tcp_connector(dial: &Dial) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    // The option is Linux's (hyper-util offers it there only); elsewhere the connector is tonic's own.
    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    http.set_tcp_user_timeout(Some(dial.keepalive_timeout));
    http
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

#[cfg(test)]
mod tests {
    use super::*;
    use tower::Service;

    #[cfg(any(target_os = "android", target_os = "fuchsia", target_os = "linux"))]
    #[tokio::test]
    async fn a_dialled_connection_gives_up_on_unacknowledged_bytes_after_the_keepalive_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dial = Dial {
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_millis(7_500),
            idle_timeout: Duration::ZERO,
            tls: None,
        };
        let stream = tcp_connector(&dial)
            .call(format!("http://{addr}").parse().unwrap())
            .await
            .unwrap();
        let socket = socket2::SockRef::from(stream.inner());
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_millis(7_500))
        );
        assert!(socket.tcp_nodelay().unwrap());
    }
}
