//! Client-side gzip, gRPC's message compression (gRPC over HTTP/2: the `grpc-encoding` header and the
//! compressed flag of each length-prefixed message, <https://github.com/grpc/grpc/blob/master/doc/compression.md>):
//! every call says `grpc-accept-encoding: gzip` and a gzip-compressed answer is decompressed here, whichever typed
//! client sits on top (tonic's generated clients accept only what they were built to accept); requests to a
//! target named in `client.gzip` are sent compressed. A decompressed message may not exceed
//! [`MAX_DECOMPRESSED`] (a compressed bomb is RESOURCE_EXHAUSTED, not memory).

use std::{
    future::Future,
    io::{Read, Write},
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::body::Body;
use tower::{Layer, Service};

use crate::error::layer_status;

/// Largest message a compressed answer may decompress to (16 MiB, the server's default `grpc.max_response_bytes`).
pub const MAX_DECOMPRESSED: usize = 16 << 20;

const ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");
/// Header names as constants: a `&str` key is copied into a new name by every insert.
const ACCEPT: HeaderName = HeaderName::from_static("grpc-accept-encoding");

/// Client side: see the module docs.
#[derive(Clone, Debug)]
pub struct CompressionLayer {
    send_gzip: bool,
}

impl CompressionLayer {
    /// Compresses requests when `send_gzip`; decompresses gzip answers always.
    pub fn new(send_gzip: bool) -> Self {
        Self { send_gzip }
    }
}

impl<S> Layer<S> for CompressionLayer {
    type Service = Compression<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Compression {
            inner,
            send_gzip: self.send_gzip,
        }
    }
}

/// Service made by [`CompressionLayer`].
#[derive(Clone, Debug)]
pub struct Compression<S> {
    inner: S,
    send_gzip: bool,
}

impl<S> Service<Request<Body>> for Compression<S>
where
    S: Service<Request<Body>, Response = Response<Body>>,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = CompressionFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let (mut parts, body) = req.into_parts();
        parts
            .headers
            .entry(ACCEPT)
            .or_insert(HeaderValue::from_static("gzip"));
        // A request a typed client compressed itself is left as it is.
        let body = if self.send_gzip && !parts.headers.contains_key(ENCODING) {
            parts
                .headers
                .insert(ENCODING, HeaderValue::from_static("gzip"));
            Body::new(Reframe::new(body, Mode::Compress))
        } else {
            body
        };
        CompressionFuture {
            inner: self.inner.call(Request::from_parts(parts, body)),
        }
    }
}

pin_project! {
    /// The future of [`Compression`]: the inner call's answer, its body decompressed when it came gzip-encoded.
    /// Nothing is allocated for it.
    pub struct CompressionFuture<F> {
        #[pin]
        inner: F,
    }
}

impl<F, E> Future for CompressionFuture<F>
where
    F: Future<Output = Result<Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let resp = std::task::ready!(self.project().inner.poll(cx))?;
        Poll::Ready(Ok(
            if resp.headers().get(ENCODING).is_some_and(|v| v == "gzip") {
                let (mut parts, body) = resp.into_parts();
                parts.headers.remove(ENCODING);
                Response::from_parts(parts, Body::new(Reframe::new(body, Mode::Decompress)))
            } else {
                resp
            },
        ))
    }
}

/// Which way messages are rewritten.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Compress,
    Decompress,
}

pin_project! {
    /// A gRPC body whose length-prefixed messages are rewritten one by one (however the HTTP/2 frames cut
    /// them); trailers pass through.
    struct Reframe {
        #[pin]
        inner: Body,
        buf: BytesMut,
        mode: Mode,
        trailers: Option<HeaderMap>,
        ended: bool,
    }
}

impl Reframe {
    fn new(inner: Body, mode: Mode) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            mode,
            trailers: None,
            ended: false,
        }
    }
}

/// The next whole message of `buf`, rewritten; `None` until one is complete.
fn next_message(buf: &mut BytesMut, mode: Mode) -> Result<Option<Bytes>, tonic::Status> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    let flag = buf[0];
    let mut message = buf.split_to(5 + len);
    message.advance(5);
    let (flag, payload) = match (mode, flag) {
        (Mode::Compress, 0) => {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(len / 2 + 32),
                flate2::Compression::fast(),
            );
            gz.write_all(&message).map_err(|e| {
                layer_status::compression(format!("compressing a request: {e}"), false)
            })?;
            let out = gz.finish().map_err(|e| {
                layer_status::compression(format!("compressing a request: {e}"), false)
            })?;
            (1, Bytes::from(out))
        }
        (Mode::Decompress, 1) => (0, gunzip(&message)?),
        (_, flag) => (flag, message.freeze()),
    };
    let mut out = BytesMut::with_capacity(5 + payload.len());
    out.put_u8(flag);
    out.put_u32(payload.len() as u32);
    out.put(payload);
    Ok(Some(out.freeze()))
}

/// Decompresses one message, at most [`MAX_DECOMPRESSED`] bytes.
fn gunzip(data: &[u8]) -> Result<Bytes, tonic::Status> {
    let mut out = Vec::new();
    let read = flate2::read::GzDecoder::new(data)
        .take(MAX_DECOMPRESSED as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| {
            layer_status::compression(format!("a gzip answer does not decompress: {e}"), false)
        })?;
    if read > MAX_DECOMPRESSED {
        return Err(layer_status::compression(
            format!("a gzip answer decompresses to more than {MAX_DECOMPRESSED} bytes"),
            true,
        ));
    }
    Ok(Bytes::from(out))
}

impl HttpBody for Reframe {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let mut this = self.project();
        loop {
            match next_message(this.buf, *this.mode) {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(Frame::data(message)))),
                Ok(None) => {}
                Err(status) => return Poll::Ready(Some(Err(status))),
            }
            if *this.ended {
                if !this.buf.is_empty() {
                    this.buf.clear();
                    return Poll::Ready(Some(Err(layer_status::compression(
                        "a gRPC message was cut short",
                        false,
                    ))));
                }
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            match this.inner.as_mut().poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => *this.ended = true,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => this.buf.extend_from_slice(&data),
                    Err(frame) => {
                        if let Ok(t) = frame.into_trailers() {
                            *this.trailers = Some(t);
                        }
                        *this.ended = true;
                    }
                },
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.buf.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(flag: u8, payload: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_u8(flag);
        b.put_u32(payload.len() as u32);
        b.put_slice(payload);
        b
    }

    #[test]
    fn messages_compress_and_decompress_back_whatever_the_cuts() {
        let payload = vec![b'k'; 10_000];
        let mut buf = framed(0, &payload);
        let compressed = next_message(&mut buf, Mode::Compress).unwrap().unwrap();
        assert_eq!(compressed[0], 1, "flagged compressed");
        assert!(compressed.len() < 200, "{}", compressed.len());
        assert!(buf.is_empty());

        // Arriving in two pieces: nothing until the message is whole.
        let mut buf = BytesMut::from(&compressed[..7]);
        assert!(next_message(&mut buf, Mode::Decompress).unwrap().is_none());
        buf.extend_from_slice(&compressed[7..]);
        let back = next_message(&mut buf, Mode::Decompress).unwrap().unwrap();
        assert_eq!(&back[..], &framed(0, &payload)[..]);

        // An uncompressed message in a gzip stream passes as it is.
        let mut plain = framed(0, b"as is");
        let same = next_message(&mut plain, Mode::Decompress).unwrap().unwrap();
        assert_eq!(&same[..], &framed(0, b"as is")[..]);
    }

    #[test]
    fn a_compressed_bomb_is_refused_not_inflated() {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; MAX_DECOMPRESSED + 1]).unwrap();
        let mut buf = framed(1, &gz.finish().unwrap());
        let err = next_message(&mut buf, Mode::Decompress).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        let mut garbage = framed(1, b"not gzip");
        assert_eq!(
            next_message(&mut garbage, Mode::Decompress)
                .unwrap_err()
                .code(),
            tonic::Code::Internal
        );
    }
}
