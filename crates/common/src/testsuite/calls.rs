//! gRPC calls driven through a tower service in process, with no socket: what tonic's server hands the
//! platform's stack for a unary call, and the whole answer read back. For measuring what a layer costs per call
//! apart from HTTP/2 and the network (the per-call allocation tests, `keel-bench layers`).

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Full};
use tonic::{Code, body::Body};
use tower::{Service, ServiceExt};

use crate::{routing::Picker, service_config::LbPolicy};

/// A unary gRPC request for `path` (`/keel.example.v1.Echo/Echo`) carrying `message`, with the headers grpc-go
/// and ghz send (`content-type: application/grpc`, `te: trailers`, a 20 s `grpc-timeout`), framed as the gRPC
/// wire format says: a zero compression flag, the length as 4 big-endian bytes, the message. Like every request
/// tonic's server hands on, it carries the connection's addresses (`TcpConnectInfo`, here 127.0.0.1).
///
/// # Panics
/// `path` is not a valid URI path.
pub fn unary(path: &'static str, message: &impl prost::Message) -> Request<Body> {
    let len = message.encoded_len();
    let mut frame = BytesMut::with_capacity(5 + len);
    frame.put_u8(0);
    frame.put_u32(u32::try_from(len).expect("a message under 4 GiB"));
    message
        .encode(&mut frame)
        .expect("the buffer was sized for the message");
    let mut request = Request::new(Body::new(Full::new(frame.freeze())));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = http::Uri::from_static(path);
    *request.version_mut() = http::Version::HTTP_2;
    let headers = request.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.insert("grpc-timeout", HeaderValue::from_static("20S"));
    request
        .extensions_mut()
        .insert(tonic::transport::server::TcpConnectInfo {
            local_addr: Some(SocketAddr::from(([127, 0, 0, 1], 50051))),
            remote_addr: Some(SocketAddr::from(([127, 0, 0, 1], 40000))),
        });
    request
}

/// Calls `service` with `request` once it is ready and reads the whole answer: the call's gRPC status (from the
/// trailers, or the headers of a trailers-only answer) and the response messages' bytes as framed.
///
/// # Errors
/// The service or the answer's body failed (a transport error, not a gRPC status).
pub async fn call<S>(
    service: &mut S,
    request: Request<Body>,
) -> Result<(Code, Bytes), tower::BoxError>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<tower::BoxError>,
{
    let answer = service
        .ready()
        .await
        .map_err(Into::into)?
        .call(request)
        .await
        .map_err(Into::into)?;
    let (head, body) = answer.into_parts();
    let collected = body.collect().await?;
    let status = collected
        .trailers()
        .and_then(crate::layers::grpc_status)
        .or_else(|| crate::layers::grpc_status(&head.headers))
        .unwrap_or(Code::Unknown);
    Ok((status, collected.to_bytes()))
}

/// Calls `service` `n` times, one after another, with a request from `request` each time, and reads every
/// answer to its end.
///
/// # Errors
/// The first call that fails or ends with a status other than OK (named in the error).
pub async fn repeat<S>(
    service: &mut S,
    n: u64,
    request: impl Fn() -> Request<Body>,
) -> Result<(), tower::BoxError>
where
    S: Service<Request<Body>, Response = Response<Body>>,
    S::Error: Into<tower::BoxError>,
{
    for i in 0..n {
        let (code, _) = call(service, request()).await?;
        if code != Code::Ok {
            return Err(format!("call {i} ended {code:?}").into());
        }
    }
    Ok(())
}

/// Two endpoints (127.0.0.1:50051 and :50052) for a picker over handlers in process: [`balanced`].
pub const ENDPOINTS: [SocketAddr; 2] = [
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50051),
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 50052),
];

/// A channel's picker over [`ENDPOINTS`] by p2c (the default of [`crate::ClientFactory::channel`]), each
/// endpoint a `handler()` in process behind the per-endpoint ejection a channel puts there. Must be called
/// inside a Tokio runtime.
pub fn balanced<S>(handler: impl Fn() -> S + Send + Sync + 'static) -> Picker<S>
where
    S: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<tower::BoxError>,
    S::Future: Send + 'static,
{
    let endpoints = tokio::sync::watch::channel(Some(ENDPOINTS.to_vec())).1;
    Picker::new(
        "echo",
        endpoints,
        std::sync::Arc::new(move |_| handler()),
        LbPolicy::P2c,
    )
}
