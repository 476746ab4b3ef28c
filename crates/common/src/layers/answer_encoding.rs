//! Which callers get gzip-compressed answers (server side). The generated servers can compress every answer
//! for a caller whose `grpc-accept-encoding` lists gzip ([`keel_protos::ServerCodec::gzip`]); this layer
//! narrows that to the callers that compressed their own request (they asked for compression: gRPC Python,
//! C++ and our clients with `client.gzip` send gzip only when configured to), unless `grpc.gzip_responses`
//! compresses for every caller that accepts it. Most clients accept gzip always, so without the narrowing
//! every answer would pay a compressor (tonic makes a fresh gzip encoder, ~300 KB of zeroed state, per
//! compressed message) whatever the caller wanted.
//!
//! It does so by taking `grpc-accept-encoding` off a request sent uncompressed; nothing else reads it.

use std::task::{Context, Poll};

use http::{HeaderName, Request};
use tower::{Layer, Service};

/// Header names as constants: a `&str` key is copied into a new name by every insert.
const ACCEPT: HeaderName = HeaderName::from_static("grpc-accept-encoding");
const ENCODING: HeaderName = HeaderName::from_static("grpc-encoding");

/// Server side: see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct AnswerEncodingLayer {
    /// Compress for every caller that accepts gzip (`grpc.gzip_responses`), not only for those that compressed.
    every_accepting_caller: bool,
}

impl AnswerEncodingLayer {
    /// `every_accepting_caller`: `grpc.gzip_responses`.
    pub fn new(every_accepting_caller: bool) -> Self {
        Self {
            every_accepting_caller,
        }
    }
}

impl<S> Layer<S> for AnswerEncodingLayer {
    type Service = AnswerEncoding<S>;
    fn layer(&self, inner: S) -> Self::Service {
        AnswerEncoding {
            inner,
            every_accepting_caller: self.every_accepting_caller,
        }
    }
}

/// Service made by [`AnswerEncodingLayer`].
#[derive(Clone, Debug)]
pub struct AnswerEncoding<S> {
    inner: S,
    every_accepting_caller: bool,
}

impl<S, B> Service<Request<B>> for AnswerEncoding<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if !self.every_accepting_caller && !compressed(req.headers()) {
            req.headers_mut().remove(ACCEPT);
        }
        self.inner.call(req)
    }
}

/// Whether the request's messages are compressed (`grpc-encoding` other than `identity`).
fn compressed(headers: &http::HeaderMap) -> bool {
    headers
        .get(ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accepted(every: bool, encoding: Option<&str>) -> bool {
        let mut svc =
            AnswerEncodingLayer::new(every).layer(tower::service_fn(|r: Request<()>| async move {
                Ok::<_, std::convert::Infallible>(r.headers().contains_key(ACCEPT))
            }));
        let mut req = Request::new(());
        req.headers_mut()
            .insert(ACCEPT, "identity,deflate,gzip".parse().unwrap());
        if let Some(e) = encoding {
            req.headers_mut().insert(ENCODING, e.parse().unwrap());
        }
        futures::executor::block_on(svc.call(req)).unwrap()
    }

    #[test]
    fn only_a_compressed_request_keeps_its_accept_encoding_unless_every_caller_gets_gzip() {
        assert!(accepted(false, Some("gzip")));
        assert!(!accepted(false, None));
        assert!(!accepted(false, Some("identity")));
        assert!(accepted(true, None));
    }
}
