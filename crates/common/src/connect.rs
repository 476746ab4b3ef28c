//! One endpoint's channel: a lazily connecting tonic channel per instance address (TLS when configured, TCP
//! no-delay, HTTP/2 keepalive), shared by the balanced and the keyed channels.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tonic::transport::Endpoint;

/// Makes one endpoint's channel.
pub(crate) type Connector = Arc<dyn Fn(SocketAddr) -> tonic::transport::Channel + Send + Sync>;

pub(crate) fn connect(
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
