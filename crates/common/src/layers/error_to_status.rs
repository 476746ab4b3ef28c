//! Transport and balancer errors become UNAVAILABLE responses, so a caller sees one error type (a gRPC status)
//! and the channel itself never fails as a service. An answer to a call that never left the client (the
//! endpoint's connection could not be made, or the server refused its stream) carries [`NeverSent`], which
//! [`TransparentRetry`](super::TransparentRetry) retries at once.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{BoxError, Layer, Service};

use crate::{error::layer_status, layers::EndpointFailed};

/// Response extension of a synthesized UNAVAILABLE answer to a call no server processed, so safe to send again
/// whatever the method (gRPC proposal A6, "transparent retry"; RFC 9113 §8.7 on which HTTP/2 streams were not
/// processed):
/// - the connection to its endpoint was refused or its address unreachable (tonic's
///   [`ConnectError`](tonic::ConnectError) over such an I/O error among the causes; not a TLS handshake that
///   failed, which no other attempt would mend);
/// - the server refused the stream (`RST_STREAM` with `REFUSED_STREAM`), or its graceful `GOAWAY`
///   (`NO_ERROR`) left the stream out: sent after it, or numbered above the last stream it took, as when a
///   call races an instance's drain or its `max_connection_age`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NeverSent {
    /// The endpoint that failed it, when known (the balanced channels name it).
    pub endpoint: Option<SocketAddr>,
}

/// Whether `e` or one of its causes says no server processed the call (see [`NeverSent`]).
fn never_sent(e: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::{
        AddrNotAvailable, ConnectionRefused, HostUnreachable, NetworkUnreachable,
    };
    let causes = || std::iter::successors(Some(e), |e| e.source());
    let refused = causes().any(|e| e.is::<tonic::ConnectError>())
        && causes().any(|e| {
            e.downcast_ref::<std::io::Error>().is_some_and(|io| {
                matches!(
                    io.kind(),
                    ConnectionRefused | HostUnreachable | NetworkUnreachable | AddrNotAvailable
                )
            })
        });
    refused
        || causes().any(|e| {
            e.downcast_ref::<h2::Error>().is_some_and(|frame| {
                frame.is_remote()
                    && match frame.reason() {
                        Some(h2::Reason::REFUSED_STREAM) => frame.is_reset(),
                        Some(h2::Reason::NO_ERROR) => frame.is_go_away(),
                        _ => false,
                    }
            })
        })
}

/// The endpoint named among the causes of `e`, if any.
fn failed_endpoint(e: &(dyn std::error::Error + 'static)) -> Option<SocketAddr> {
    std::iter::successors(Some(e), |e| e.source())
        .find_map(|e| e.downcast_ref::<EndpointFailed>().map(|f| f.addr))
}

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
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ErrorToStatusFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // A failed balancer cannot recover; report it on the call instead of failing readiness.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        ErrorToStatusFuture {
            inner: self.inner.call(req),
        }
    }
}

pin_project! {
    /// The future of [`ErrorToStatus`]: the inner call's answer, or its error as an UNAVAILABLE answer
    /// ([`NeverSent`] among its extensions when the call never left the client). Nothing is allocated for it.
    pub struct ErrorToStatusFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, E> Future for ErrorToStatusFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let answered = std::task::ready!(self.project().inner.poll(cx));
        Poll::Ready(Ok(answered.unwrap_or_else(|e| {
            let e: BoxError = e.into();
            let mut resp = layer_status::unavailable(format!("transport: {e}")).into_http();
            if never_sent(&*e) {
                resp.extensions_mut().insert(NeverSent {
                    endpoint: failed_endpoint(&*e),
                });
            }
            resp
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connect_error_anywhere_among_the_causes_means_never_sent() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let connect: BoxError = Box::new(tonic::ConnectError(Box::new(refused())));
        assert!(never_sent(&*connect));
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BoxError);
        let wrapped = Outer(connect);
        assert!(never_sent(&wrapped));
        // A TLS handshake that failed: connecting, but no other attempt would mend it.
        let tls: BoxError = Box::new(tonic::ConnectError("invalid peer certificate".into()));
        assert!(!never_sent(&*tls));
        // Refused, but not while connecting.
        assert!(!never_sent(&refused()));
        // The endpoint that failed it, named by `Ejecting` below.
        let addr: SocketAddr = "10.0.0.7:5000".parse().unwrap();
        let failed = EndpointFailed {
            addr,
            source: Box::new(tonic::ConnectError(Box::new(refused()))),
        };
        assert!(never_sent(&failed));
        assert_eq!(failed_endpoint(&failed), Some(addr));
        assert_eq!(failed_endpoint(&refused()), None);
    }
}
