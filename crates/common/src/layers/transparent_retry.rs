//! Client side, below the metrics: gRPC's transparent retries as proposal A6 defines them
//! (<https://github.com/grpc/proposal/blob/master/A6-client-retries.md>), for the unary methods of the protos
//! (their request is one message, buffered to be sent again):
//! - a call no server processed ([`NeverSent`]: its endpoint refused the connection, or the server refused
//!   its stream) is sent again at once, whatever the method and with or without a `retryPolicy`, up to
//!   [`NEVER_SENT_RETRIES`] times, while discovery lists an instance other than the one that failed it: that
//!   one is ejected by then, so the balancer picks another (A6's transparent retry of an RPC that never left
//!   the client; here not counted as attempts, drawing on no budget);
//! - for calls whose service config has a `retryPolicy` ([`AttemptPolicy`](super::AttemptPolicy)), an attempt
//!   is retried only when its answer is trailers-only (the server committed to nothing: the status comes in
//!   the headers) with a status of `retryableStatusCodes`; the wait is random below
//!   `min(initialBackoff · multiplier^(n-1), maxBackoff)`, or exactly the server's `grpc-retry-pushback-ms` (a
//!   negative or malformed pushback stops retrying); every such retry draws on the process's retry budget.
//!
//! None starts past the call's deadline, which covers all attempts (each is sent with what is left of it, and
//! `grpc-previous-rpc-attempts`).

use std::{
    collections::HashSet,
    convert::Infallible,
    future::Future,
    pin::Pin,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Duration,
};

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use prost::Message;
use rand::RngExt;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::body::Body;
use tower::{BoxError, Layer, Service, ServiceExt};

use crate::{
    context::{GRPC_TIMEOUT_NAME, grpc_timeout, grpc_timeout_value},
    error::layer_status,
    layers::{AttemptPolicy, NeverSent},
    retry::RetryBudget,
};

/// How many times one call that never left the client is sent again before its UNAVAILABLE is the answer.
pub const NEVER_SENT_RETRIES: u32 = 4;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// `/package.Service/Method` of every unary method of the protos.
fn unary_methods() -> &'static HashSet<String> {
    static METHODS: OnceLock<HashSet<String>> = OnceLock::new();
    METHODS.get_or_init(|| {
        let set = prost_types::FileDescriptorSet::decode(keel_protos::FILE_DESCRIPTOR_SET)
            .expect("the protos' descriptor set");
        let mut out = HashSet::new();
        for file in set.file {
            for svc in &file.service {
                let full = match file.package() {
                    "" => svc.name().to_owned(),
                    p => format!("{p}.{}", svc.name()),
                };
                for m in &svc.method {
                    if !m.client_streaming() && !m.server_streaming() {
                        out.insert(format!("/{full}/{}", m.name()));
                    }
                }
            }
        }
        out
    })
}

/// What discovery lists (`None` before its first answer).
type Endpoints = watch::Receiver<Option<Vec<SocketAddr>>>;

/// Client side: see the module docs.
#[derive(Clone, Debug)]
pub struct TransparentRetryLayer {
    budget: Arc<RetryBudget>,
    endpoints: Option<Endpoints>,
}

impl TransparentRetryLayer {
    /// Retries draw on `budget` (the process's, shared with the typed call-site retries).
    pub fn new(budget: Arc<RetryBudget>) -> Self {
        Self {
            budget,
            endpoints: None,
        }
    }

    /// A call that never left the client is sent again only while `endpoints` lists an instance other than
    /// the one that failed it: with that one alone, the answer is its UNAVAILABLE at once (another attempt
    /// would wait for the same ejected instance).
    pub fn with_endpoints(mut self, endpoints: Endpoints) -> Self {
        self.endpoints = Some(endpoints);
        self
    }
}

impl<S> Layer<S> for TransparentRetryLayer {
    type Service = TransparentRetry<S>;
    fn layer(&self, inner: S) -> Self::Service {
        TransparentRetry {
            inner,
            budget: self.budget.clone(),
            endpoints: self.endpoints.clone(),
        }
    }
}

/// Service made by [`TransparentRetryLayer`].
#[derive(Clone, Debug)]
pub struct TransparentRetry<S> {
    inner: S,
    budget: Arc<RetryBudget>,
    endpoints: Option<Endpoints>,
}

/// Whether discovery's `listed` instances include one other than `failed` (with `failed` unknown: more than
/// one instance).
fn another_listed(listed: &[SocketAddr], failed: Option<SocketAddr>) -> bool {
    match failed {
        Some(f) => listed.iter().any(|a| *a != f),
        None => listed.len() > 1,
    }
}

/// What the server's `grpc-retry-pushback-ms` says: `None` without one, `Some(None)` for "do not retry".
fn pushback(resp: &Response<Body>) -> Option<Option<Duration>> {
    let v = resp.headers().get("grpc-retry-pushback-ms")?;
    Some(crate::retry::pushback_wait(v.as_bytes()))
}

/// The whole of a request's body, kept to be sent again: its one data frame as it came (a unary request's
/// framed message, as tonic's client encodes it: nothing copied), or its data frames joined.
async fn whole(mut body: Body) -> Result<Bytes, BoxError> {
    let mut first = Bytes::new();
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        match &mut joined {
            Some(joined) => joined.extend_from_slice(&data),
            None if first.is_empty() => first = data,
            None => {
                let mut both = BytesMut::from(first.as_ref());
                both.extend_from_slice(&data);
                joined = Some(both);
            }
        }
    }
    Ok(joined.map_or(first, BytesMut::freeze))
}

impl<S> Service<Request<Body>> for TransparentRetry<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<Body>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if !unary_methods().contains(req.uri().path()) {
            return Box::pin(self.inner.call(req));
        }
        let policy = req
            .extensions()
            .get::<AttemptPolicy>()
            .map(|AttemptPolicy(p)| p.clone());
        // The readied service takes the first attempt; a clone stays for the next call.
        let clone = self.inner.clone();
        let mut svc = std::mem::replace(&mut self.inner, clone);
        let budget = self.budget.clone();
        let endpoints = self.endpoints.clone();
        let elsewhere = move |failed: &NeverSent| {
            endpoints.as_ref().is_none_or(|e| {
                e.borrow()
                    .as_deref()
                    .is_some_and(|listed| another_listed(listed, failed.endpoint))
            })
        };
        Box::pin(async move {
            if policy.is_some() {
                budget.deposit();
            }
            let (parts, body) = req.into_parts();
            let deadline = grpc_timeout(&parts.headers).map(|t| Instant::now() + t);
            let message = match whole(body).await {
                Ok(message) => message,
                Err(e) => {
                    return Ok(layer_status::unavailable(format!("request body: {e}")).into_http());
                }
            };
            // Attempt `n` (1: the first to reach a server), sent again (`again`) or for the first time.
            let attempt_request = |n: u32, again: bool| {
                let mut r = Request::new(Body::new(Full::new(message.clone())));
                *r.method_mut() = parts.method.clone();
                *r.uri_mut() = parts.uri.clone();
                *r.version_mut() = parts.version;
                *r.headers_mut() = parts.headers.clone();
                *r.extensions_mut() = parts.extensions.clone();
                let h = r.headers_mut();
                if n > 1 {
                    h.insert("grpc-previous-rpc-attempts", HeaderValue::from(n - 1));
                }
                if (again || n > 1)
                    && let Some(d) = deadline
                {
                    let left = d.saturating_duration_since(Instant::now());
                    h.insert(GRPC_TIMEOUT_NAME, grpc_timeout_value(left));
                }
                r
            };
            let (mut n, mut never_sent) = (1, 0);
            let mut resp = svc.call(attempt_request(n, false)).await?;
            loop {
                if let Some(failed) = resp.extensions().get::<NeverSent>()
                    && never_sent < NEVER_SENT_RETRIES
                    && deadline.is_none_or(|d| Instant::now() < d)
                    && elsewhere(failed)
                {
                    never_sent += 1;
                    tracing::debug!(retry = never_sent, "sending again a call that never left");
                    resp = svc.ready().await?.call(attempt_request(n, true)).await?;
                    continue;
                }
                let Some(policy) = &policy else {
                    return Ok(resp);
                };
                // Trailers-only (the status among the headers): the server committed to nothing.
                let Some(code) = super::grpc_status(resp.headers()) else {
                    return Ok(resp);
                };
                if n >= policy.max_attempts || !policy.retryable_status_codes.contains(&code) {
                    return Ok(resp);
                }
                let wait = match pushback(&resp) {
                    Some(None) => return Ok(resp),
                    Some(Some(w)) => w,
                    None => {
                        let bound = policy.backoff_bound(n);
                        rand::rng().random_range(Duration::ZERO..=bound)
                    }
                };
                if deadline.is_some_and(|d| Instant::now() + wait >= d) || !budget.withdraw() {
                    return Ok(resp);
                }
                tracing::debug!(attempt = n, wait = ?wait, code = ?code, "retrying per the service config");
                tokio::time::sleep(wait).await;
                n += 1;
                resp = svc.ready().await?.call(attempt_request(n, false)).await?;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_body_of_one_frame_is_kept_as_it_came_and_one_of_several_is_joined() {
        let one = Bytes::from_static(b"\0\0\0\0\x02hi");
        let kept = whole(Body::new(Full::new(one.clone()))).await.unwrap();
        assert_eq!(kept, one);
        assert_eq!(kept.as_ptr(), one.as_ptr(), "not copied");
        let frames = futures::stream::iter(["ab", "", "cd", "e"].map(|s| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                s.as_bytes(),
            )))
        }));
        let joined = whole(Body::new(http_body_util::StreamBody::new(frames)))
            .await
            .unwrap();
        assert_eq!(joined, "abcde");
        assert_eq!(whole(Body::empty()).await.unwrap(), "");
    }

    #[test]
    fn a_call_is_sent_again_only_while_discovery_lists_another_instance_than_the_one_that_failed_it()
     {
        let a: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:5000".parse().unwrap();
        // The failed instance left discovery (its drain began) while the call went to it: the other is listed.
        assert!(another_listed(&[b], Some(a)));
        assert!(another_listed(&[a, b], Some(a)));
        // Only the instance that failed it: another attempt would wait for it.
        assert!(!another_listed(&[a], Some(a)));
        assert!(!another_listed(&[], Some(a)));
        // Which instance failed it unknown: only with more than one listed.
        assert!(another_listed(&[a, b], None));
        assert!(!another_listed(&[a], None));
    }
}
