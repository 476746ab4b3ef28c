//! Key-affinity routing: each call goes to the one instance that owns its routing key, by rendezvous
//! (highest random weight) hashing over the instances discovery currently reports. Adding or removing an
//! instance moves only the keys it gains or loses; every client computes the same owner from the same
//! instance list, with no coordination. Used for sharded state such as the cache.
//!
//! The key travels as `x-routing-key` metadata ([`set_routing_key`]); a call without one goes to the owner of
//! the empty key. The weight is FNV-1a 64 of `key \0 address` through MurmurHash3's finaliser: stable across
//! processes, versions and platforms (unlike `std`'s `DefaultHasher`).

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::sync::watch;
use tonic::body::Body;
use tower::{Service, ServiceExt};

use crate::error::layer_status;

/// Metadata key carrying a call's routing key.
pub const ROUTING_KEY: &str = "x-routing-key";

/// Sets the routing key of `request` (a key that is not valid metadata ASCII is hashed into one that is).
pub fn set_routing_key<T>(request: &mut tonic::Request<T>, key: &str) {
    let value = if key.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        key.to_owned()
    } else {
        format!("{:016x}", fnv1a(key.as_bytes()))
    };
    if let Ok(v) = value.parse() {
        request.metadata_mut().insert(ROUTING_KEY, v);
    }
}

/// MurmurHash3's 64-bit finaliser: FNV-1a alone mixes its last bytes too little for weights of addresses that
/// differ only in their last digits.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// FNV-1a, 64 bits.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The owner of `key` among `endpoints`: the one with the highest weight for it; `None` when there is none.
pub fn owner(key: &str, endpoints: &[SocketAddr]) -> Option<SocketAddr> {
    endpoints.iter().copied().max_by_key(|addr| {
        let mut buf = Vec::with_capacity(key.len() + 24);
        buf.extend_from_slice(key.as_bytes());
        buf.push(0);
        buf.extend_from_slice(addr.to_string().as_bytes());
        (fmix64(fnv1a(&buf)), *addr)
    })
}

/// The innermost service of a keyed channel: picks the owner and calls it over its own connection.
#[derive(Clone)]
pub(crate) struct KeyRouter {
    pub(crate) service: Arc<str>,
    pub(crate) endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    pub(crate) channels: Arc<Mutex<HashMap<SocketAddr, crate::connect::Conn>>>,
    pub(crate) connect: crate::connect::Connector,
}

impl Service<Request<Body>> for KeyRouter {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let key = req
            .headers()
            .get(ROUTING_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::context::parse_grpc_timeout)
            .map(|t| std::time::Instant::now() + t);
        let mut endpoints = self.endpoints.clone();
        let this = self.clone();
        Box::pin(async move {
            // Before discovery's first answer, wait for it (the caller's deadline bounds the call).
            let list = match endpoints.wait_for(Option::is_some).await {
                Ok(v) => v.clone().unwrap_or_default(),
                Err(_) => Vec::new(),
            };
            let Some(addr) = owner(&key, &list) else {
                return Ok(layer_status::unavailable(format!(
                    "no healthy instance of service {:?}",
                    this.service
                ))
                .into_http());
            };
            let mut channel = {
                let mut channels = this.channels.lock().unwrap_or_else(|p| p.into_inner());
                channels.retain(|a, _| list.contains(a));
                channels
                    .entry(addr)
                    .or_insert_with(|| (this.connect)(addr))
                    .clone()
            };
            // A tonic channel is a buffer: it must be polled ready before each call.
            let ready = match channel.ready().await {
                Ok(c) => c,
                Err(e) => {
                    return Ok(layer_status::unavailable(format!(
                        "instance {addr} of {:?} unreachable: {e}",
                        this.service
                    ))
                    .into_http());
                }
            };
            Ok(match ready.call(req).await {
                Ok(resp) => resp,
                Err(e) => {
                    let e: tower::BoxError = e.into();
                    // tonic enforces the request's grpc-timeout itself, and a stream cut as the deadline passes
                    // surfaces as a transport error: either is the deadline, not a broken instance.
                    let at_deadline = deadline
                        .is_some_and(|d| std::time::Instant::now() + Duration::from_millis(5) >= d);
                    if crate::connect::is_timeout(&*e) || at_deadline {
                        layer_status::deadline_exceeded("deadline exceeded").into_http()
                    } else {
                        layer_status::unavailable(format!(
                            "instance {addr} of {:?} unreachable: {e}",
                            this.service
                        ))
                        .into_http()
                    }
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 7000 + i)))
            .collect()
    }

    #[test]
    fn removing_an_instance_moves_only_its_keys_and_adding_one_takes_a_fair_share() {
        let three = addrs(3);
        let keys: Vec<String> = (0..3000).map(|i| format!("account/key{i}")).collect();
        let before: Vec<SocketAddr> = keys.iter().map(|k| owner(k, &three).unwrap()).collect();
        for a in &three {
            let share = before.iter().filter(|o| *o == a).count();
            assert!((700..1300).contains(&share), "{a} owns {share} of 3000");
        }
        let two: Vec<SocketAddr> = three[..2].to_vec();
        for (k, was) in keys.iter().zip(&before) {
            let now = owner(k, &two).unwrap();
            if *was != three[2] {
                assert_eq!(now, *was, "{k} moved although its owner stayed");
            }
        }
        let four = addrs(4);
        let moved = keys
            .iter()
            .zip(&before)
            .filter(|(k, was)| owner(k, &four).unwrap() != **was)
            .count();
        assert!(
            (500..1000).contains(&moved),
            "a fourth instance takes about a quarter: {moved}"
        );
        assert_eq!(owner("k", &[]), None);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c, "FNV-1a reference value");
    }
}
