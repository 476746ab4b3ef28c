//! Per-RPC metrics and the call log: every call through it is counted, timed and logged once, when it ends
//! however it ends (trailers, error, or the body dropped early: CANCELLED). Metric names: [`crate::metrics`].
//! The log line (target `keel::calls`, so `log.level` can quiet it: `info,keel::calls=warn`) gives side,
//! method, peer, duration, deadline, status, trace id, the gRPC messages sent and received (counted as the
//! bodies pass, so a stream's are), and the request's `grpc-encoding` when compressed;
//! failures at WARN, health checks at DEBUG.

use std::{
    collections::HashSet,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use bytes::Bytes;
use http::{
    Request, Response,
    uri::{Authority, PathAndQuery},
};
use http_body::{Body as HttpBody, Frame};
use pin_project_lite::pin_project;
use tonic::{Code, body::Body};
use tower::{Layer, Service};

use crate::metrics::{Metrics, Side, code_name};

/// Records count, latency, status and in-flight for every call through it.
#[derive(Clone, Debug)]
pub struct GrpcMetricsLayer {
    metrics: Metrics,
    side: Side,
    known: Arc<HashSet<String>>,
}

impl GrpcMetricsLayer {
    /// `known`: full names of the services served (server side), so unknown paths fold into one name.
    pub fn new(metrics: Metrics, side: Side, known: HashSet<String>) -> Self {
        Self {
            metrics,
            side,
            known: Arc::new(known),
        }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            layer: self.clone(),
        }
    }
}

/// Service made by [`GrpcMetricsLayer`].
#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
    layer: GrpcMetricsLayer,
}

/// Records once, when the call ends however it ends (trailers, error, or the body dropped early: CANCELLED).
struct CallRecord {
    /// The layer's metrics, side and served services.
    layer: GrpcMetricsLayer,
    /// `/package.Service/Method`: the metrics' method and the call log's `method` (shares the request's bytes).
    path: Option<PathAndQuery>,
    /// The remote address (server side: the caller; client side: the target's authority when known).
    peer: Peer,
    /// The deadline the call carried (`grpc-timeout`), in ms; logged so a call's budget can be traced hop by hop.
    deadline_ms: Option<f64>,
    /// The call's trace id (server side: the request context's; client side: the `x-trace-id` sent), logged
    /// with the line because the line is written when the body ends, after the request's span closed.
    trace_id: Option<Arc<str>>,
    /// The request's `grpc-encoding` (`gzip`) when it was compressed.
    encoding: Option<String>,
    /// gRPC messages of the request (counted by its body as it passes) and of the response.
    request_messages: Arc<AtomicU64>,
    response_messages: MessageCounter,
    start: Instant,
    code: Option<Code>,
}

/// Who is at the other end of a call, kept as it came and written into the call log line as text.
enum Peer {
    /// The caller's address (server side).
    Addr(std::net::SocketAddr),
    /// The target's authority (client side).
    Authority(Authority),
    Unknown,
}

impl Peer {
    /// The peer as the call log writes it (`127.0.0.1:40000`, `[::1]:40000`, a target's authority, or empty),
    /// written into `buf` when it is an address: an IPv4 one digit by digit (every call writes one), an IPv6 one
    /// through `fmt`.
    fn text<'a>(&'a self, buf: &'a mut PeerText) -> &'a str {
        match self {
            Peer::Addr(std::net::SocketAddr::V4(a)) => {
                let mut digits = itoa::Buffer::new();
                for (i, octet) in a.ip().octets().into_iter().enumerate() {
                    if i > 0 {
                        buf.push(b".");
                    }
                    buf.push(digits.format(octet).as_bytes());
                }
                buf.push(b":");
                buf.push(digits.format(a.port()).as_bytes());
                buf.as_str()
            }
            Peer::Addr(a) => {
                let _ = std::fmt::Write::write_fmt(buf, format_args!("{a}"));
                buf.as_str()
            }
            Peer::Authority(a) => a.as_str(),
            Peer::Unknown => "",
        }
    }
}

/// Room for a socket address as text: the longest, `[ffff:…:ffff%4294967295]:65535`, is 58 bytes.
struct PeerText {
    bytes: [u8; 64],
    len: usize,
}

impl PeerText {
    fn new() -> Self {
        Self {
            bytes: [0; 64],
            len: 0,
        }
    }

    /// Appends `s`, or as much of it as fits (an address always does).
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn as_str(&self) -> &str {
        // Only whole `&str`s and ASCII digits are pushed, and an address fits whole: a cut cannot happen.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

impl std::fmt::Write for PeerText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

impl CallRecord {
    fn finish(&mut self, code: Code) {
        if self.code.is_none() {
            self.code = Some(code);
        }
    }
}

impl Drop for CallRecord {
    /// Records the metrics and logs one line per call (target `keel::calls`, so `log.level` can quiet it:
    /// `info,keel::calls=warn`): side, method, peer, duration, status; failures at WARN.
    fn drop(&mut self) {
        let code = self.code.unwrap_or(Code::Cancelled);
        let elapsed = self.start.elapsed();
        let (requests, responses) = (
            self.request_messages.load(Ordering::Relaxed),
            self.response_messages.count,
        );
        // Sent and received as this side sees them.
        let (messages_sent, messages_received) = match self.layer.side {
            Side::Server => (responses, requests),
            Side::Client => (requests, responses),
        };
        let method = self.path.as_ref().map_or("", |p| p.path());
        let layer = &self.layer;
        layer.metrics.record(
            layer.side,
            method,
            &layer.known,
            code,
            elapsed,
            (messages_sent, messages_received),
        );
        layer.metrics.inflight(layer.side, -1);
        // The peer is written only into a line that is logged (tracing evaluates fields behind its level check).
        let mut text = PeerText::new();
        let side = layer.side.as_str();
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        let status = code_name(code);
        let deadline_ms = self.deadline_ms;
        let trace_id = self.trace_id.as_deref();
        let encoding = self.encoding.as_deref();
        if code == Code::Ok && method.starts_with("/grpc.health.v1.Health/") {
            // Consul's GRPC check calls every few seconds: not worth a line each at INFO.
            tracing::debug!(target: "keel::calls", side, method, peer = self.peer.text(&mut text), duration_ms, deadline_ms, status, trace_id, encoding, messages_sent, messages_received, "grpc call");
        } else if matches!(
            code,
            Code::Ok | Code::NotFound | Code::AlreadyExists | Code::InvalidArgument
        ) {
            tracing::info!(target: "keel::calls", side, method, peer = self.peer.text(&mut text), duration_ms, deadline_ms, status, trace_id, encoding, messages_sent, messages_received, "grpc call");
        } else {
            tracing::warn!(target: "keel::calls", side, method, peer = self.peer.text(&mut text), duration_ms, deadline_ms, status, trace_id, encoding, messages_sent, messages_received, "grpc call");
        }
    }
}

impl<S, B> Service<Request<B>> for GrpcMetrics<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Send + 'static,
    S::Future: Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<tower::BoxError>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = MetricsFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let layer = self.layer.clone();
        layer.metrics.inflight(layer.side, 1);
        let peer = match req
            .extensions()
            .get::<tonic::transport::server::TcpConnectInfo>()
            .and_then(|i| i.remote_addr())
        {
            Some(addr) => Peer::Addr(addr),
            None => req
                .uri()
                .authority()
                .map_or(Peer::Unknown, |a| Peer::Authority(a.clone())),
        };
        let record = CallRecord {
            layer,
            path: req.uri().path_and_query().cloned(),
            peer,
            deadline_ms: crate::context::grpc_timeout(req.headers())
                .map(|d| d.as_secs_f64() * 1000.0),
            trace_id: req
                .extensions()
                .get::<crate::context::RequestContext>()
                .map(|c| c.trace_id.clone())
                .or_else(|| {
                    req.headers()
                        .get(crate::context::TRACE_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(Arc::from)
                }),
            encoding: req
                .headers()
                .get("grpc-encoding")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            request_messages: Arc::default(),
            response_messages: MessageCounter::default(),
            start: Instant::now(),
            code: None,
        };
        let counted = record.request_messages.clone();
        let req = req.map(|body| {
            Body::new(CountedBody {
                inner: body,
                counter: MessageCounter::default(),
                total: counted,
            })
        });
        MetricsFuture {
            inner: self.inner.call(req),
            record: Some(record),
        }
    }
}

pin_project! {
    /// The future of [`GrpcMetrics`]: the inner call's, then its answer's body carries the call's record (a
    /// call dropped before it answers is recorded as CANCELLED). Nothing is allocated for it.
    pub struct MetricsFuture<F> {
        #[pin]
        inner: F,
        record: Option<CallRecord>,
    }
}

impl<F, E> Future for MetricsFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let answered = std::task::ready!(this.inner.poll(cx));
        let mut record = this
            .record
            .take()
            .expect("MetricsFuture polled after it answered");
        Poll::Ready(match answered {
            Ok(resp) => {
                if let Some(code) = super::grpc_status(resp.headers()) {
                    record.finish(code); // trailers-only response
                }
                let (parts, body) = resp.into_parts();
                Ok(Response::from_parts(
                    parts,
                    Body::new(MeteredBody {
                        inner: body,
                        record,
                    }),
                ))
            }
            Err(e) => {
                record.finish(Code::Unavailable);
                Err(e)
            }
        })
    }
}

pin_project! {
    /// A response body that reads `grpc-status` from the trailers as they pass.
    struct MeteredBody {
        #[pin]
        inner: Body,
        record: CallRecord,
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.record.response_messages.feed(data);
                }
                if let Some(code) = frame.trailers_ref().and_then(super::grpc_status) {
                    this.record.finish(code);
                }
            }
            Poll::Ready(Some(Err(_))) => this.record.finish(Code::Unknown),
            Poll::Ready(None) => this.record.finish(Code::Ok),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the length-prefixed gRPC messages of a body as its bytes pass, however frames cut them.
#[derive(Debug, Default)]
struct MessageCounter {
    header: [u8; 5],
    have: usize,
    remaining: usize,
    count: u64,
}

impl MessageCounter {
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
            } else {
                let n = (5 - self.have).min(data.len());
                self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
                self.have += n;
                data = &data[n..];
                if self.have == 5 {
                    self.count += 1;
                    self.have = 0;
                    let len = [
                        self.header[1],
                        self.header[2],
                        self.header[3],
                        self.header[4],
                    ];
                    self.remaining = u32::from_be_bytes(len) as usize;
                }
            }
        }
    }
}

pin_project! {
    /// A request body that counts its gRPC messages into `total` as they pass.
    struct CountedBody<B> {
        #[pin]
        inner: B,
        counter: MessageCounter,
        total: Arc<AtomicU64>,
    }
}

impl<B> HttpBody for CountedBody<B>
where
    B: HttpBody<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let before = this.counter.count;
            this.counter.feed(data);
            this.total
                .fetch_add(this.counter.count - before, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peer_is_written_as_std_writes_its_address() {
        let addrs: [std::net::SocketAddr; 5] = [
            "127.0.0.1:40000".parse().unwrap(),
            "0.0.0.0:0".parse().unwrap(),
            "255.255.255.255:65535".parse().unwrap(),
            "[::1]:40000".parse().unwrap(),
            std::net::SocketAddrV6::new(
                "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff".parse().unwrap(),
                65535,
                0,
                u32::MAX,
            )
            .into(),
        ];
        for addr in addrs {
            let mut text = PeerText::new();
            assert_eq!(Peer::Addr(addr).text(&mut text), addr.to_string());
        }
        let authority: Authority = "video-catalog.service.consul:50051".parse().unwrap();
        let mut text = PeerText::new();
        assert_eq!(
            Peer::Authority(authority).text(&mut text),
            "video-catalog.service.consul:50051"
        );
        assert_eq!(Peer::Unknown.text(&mut PeerText::new()), "");
    }

    #[test]
    fn messages_are_counted_however_frames_cut_them() {
        let message = |len: u32| {
            let mut m = vec![0u8];
            m.extend_from_slice(&len.to_be_bytes());
            m.extend(std::iter::repeat_n(7u8, len as usize));
            m
        };
        let stream: Vec<u8> = [message(10), message(0), message(300), message(1)].concat();
        for cut in [1, 2, 3, 5, 7, 64, stream.len()] {
            let mut c = MessageCounter::default();
            for chunk in stream.chunks(cut) {
                c.feed(chunk);
            }
            assert_eq!(c.count, 4, "cut every {cut} bytes");
            assert_eq!((c.have, c.remaining), (0, 0), "ends between messages");
        }
    }
}
