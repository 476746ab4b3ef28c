//! Picking the instance of each call ([`Picker`], the innermost service of every channel) by the target's
//! load-balancing policy ([`LbPolicy`]): p2c through tower's balancer, round robin, pick first and key
//! affinity here.
//!
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
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::sync::watch;
use tonic::body::Body;
use tower::{BoxError, Service, ServiceExt};

use crate::{
    connect::{Conn, Connector},
    error::layer_status,
    layers::Ejecting,
    service_config::LbPolicy,
};

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

/// The connections of one target's instances, shared by its picker's policies, so switching policy opens no
/// new connection.
#[derive(Clone)]
pub(crate) struct Conns {
    open: Arc<Mutex<HashMap<SocketAddr, Conn>>>,
    connect: Connector,
}

impl Conns {
    pub(crate) fn new(connect: Connector) -> Self {
        Self {
            open: Arc::default(),
            connect,
        }
    }

    /// The channel of the instance at `addr`, made on first use.
    pub(crate) fn get(&self, addr: SocketAddr) -> Conn {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.entry(addr)
            .or_insert_with(|| (self.connect)(addr))
            .clone()
    }

    /// Forgets the channels of instances not in `list` (their connections close once no policy holds them),
    /// so an instance that discovery lists again gets a new connection: the old one may be stalled (a machine
    /// cut off and back keeps TCP in its retransmission backoff for up to tens of seconds).
    pub(crate) fn retain(&self, list: &[SocketAddr]) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|a, _| list.contains(a));
    }
}

/// A call on its way to an instance.
type Sending = Pin<Box<dyn Future<Output = Result<Response<Body>, BoxError>> + Send>>;

/// The policies that pick an instance from the list itself (all but p2c, which is tower's balancer).
#[derive(Clone)]
pub(crate) struct Router {
    pub(crate) service: Arc<str>,
    pub(crate) endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    pub(crate) conns: Conns,
    /// The instances as discovery last listed them, rebuilt only when it answers anew.
    membership: Arc<Mutex<Membership>>,
    /// Round robin's turn.
    turn: Arc<AtomicUsize>,
    /// Pick first's instance, kept while it is listed and not ejected.
    first: Arc<Mutex<Option<SocketAddr>>>,
}

/// What a [`Router`] picks from: discovery's latest list, sorted, and each instance with its ejection state
/// (round robin and pick first skip ejected instances). A call locks it once and allocates nothing unless
/// discovery changed the list since the last call.
struct Membership {
    /// Discovery's answers (`has_changed` says when to rebuild).
    endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    /// The latest answer, sorted; `None` before the first.
    list: Option<Vec<SocketAddr>>,
    members: HashMap<SocketAddr, Ejecting<Conn>>,
}

impl Membership {
    /// Takes discovery's latest answer if it changed.
    fn refresh(&mut self, conns: &Conns) {
        if (self.endpoints.has_changed().unwrap_or(false) || self.list.is_none())
            && let Some(mut list) = self.endpoints.borrow_and_update().clone()
        {
            list.sort_unstable();
            conns.retain(&list);
            self.members.retain(|a, _| list.contains(a));
            for addr in &list {
                self.members
                    .entry(*addr)
                    .or_insert_with(|| Ejecting::new(*addr, conns.get(*addr)));
            }
            self.list = Some(list);
        }
    }
}

impl Router {
    pub(crate) fn new(
        service: Arc<str>,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
        conns: Conns,
    ) -> Self {
        Self {
            membership: Arc::new(Mutex::new(Membership {
                endpoints: endpoints.clone(),
                list: None,
                members: HashMap::new(),
            })),
            service,
            endpoints,
            conns,
            turn: Arc::default(),
            first: Arc::default(),
        }
    }

    /// The call, sent to the instance `policy` picks from discovery's latest list; `None` when it is empty.
    fn send(&self, policy: LbPolicy, req: Request<Body>) -> Option<Sending> {
        let mut guard = self.membership.lock().unwrap_or_else(|p| p.into_inner());
        guard.refresh(&self.conns);
        let Membership { list, members, .. } = &mut *guard;
        let list = list.as_deref().unwrap_or_default();
        // Ready unless ejected (an instance's channel is always ready; only the ejection backoff waits).
        let mut ready = |addr: &SocketAddr| {
            let member = members.get_mut(addr).expect("listed");
            let mut cx = Context::from_waker(std::task::Waker::noop());
            member.poll_ready(&mut cx).is_ready()
        };
        let pick = match policy {
            LbPolicy::KeyAffinity => {
                let key = req
                    .headers()
                    .get(ROUTING_KEY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                owner(key, list)
            }
            // p2c is tower's balancer's (the picker never hands it here).
            LbPolicy::RoundRobin | LbPolicy::P2c => {
                let start = self.turn.fetch_add(1, Ordering::Relaxed);
                (0..list.len())
                    .map(|i| list[(start + i) % list.len()])
                    .find(|a| ready(a))
            }
            LbPolicy::PickFirst => {
                let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
                let kept = first.filter(|a| list.contains(a) && ready(a));
                let pick = kept.or_else(|| list.iter().copied().find(|a| ready(a)));
                *first = pick;
                pick
            }
        };
        // Every instance ejected: try one anyway rather than fail a call no instance was asked about.
        let addr = pick.or_else(|| list.first().copied())?;
        let member = members.get_mut(&addr).expect("listed");
        let mut cx = Context::from_waker(std::task::Waker::noop());
        // Readiness is checked (and an ended backoff cleared) before each call, as tower's contract wants.
        let _ = member.poll_ready(&mut cx);
        Some(member.call(req))
    }
}

/// The innermost service of every channel: sends each call to the instance its load-balancing policy picks —
/// the call's own (from the target's service config, [`LbPolicy`] in its extensions) or the channel's default.
/// p2c goes through tower's balancer; the other policies through [`Router`]. Both share the instances'
/// connections.
#[derive(Clone)]
pub(crate) struct Picker<B> {
    pub(crate) default: LbPolicy,
    pub(crate) p2c: B,
    pub(crate) router: Router,
}

impl<B> Service<Request<Body>> for Picker<B>
where
    B: Service<Request<Body>, Response = Response<Body>, Error = BoxError> + Clone + Send + 'static,
    B::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Sending;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The balancer's readiness when it is the default: the common path costs what it did.
        if self.default == LbPolicy::P2c {
            self.p2c.poll_ready(cx)
        } else {
            Poll::Ready(Ok(()))
        }
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let policy = req
            .extensions()
            .get::<LbPolicy>()
            .copied()
            .unwrap_or(self.default);
        if policy == LbPolicy::P2c {
            if self.default == LbPolicy::P2c {
                return Box::pin(self.p2c.call(req));
            }
            return Box::pin(self.p2c.clone().oneshot(req));
        }
        let router = self.router.clone();
        let deadline = req
            .headers()
            .get("grpc-timeout")
            .and_then(|v| v.to_str().ok())
            .and_then(crate::context::parse_grpc_timeout)
            .map(|t| std::time::Instant::now() + t);
        Box::pin(async move {
            if router.endpoints.borrow().is_none() {
                // Before discovery's first answer, wait for it (the caller's deadline bounds the call).
                let _ = router.endpoints.clone().wait_for(Option::is_some).await;
            }
            let Some(sent) = router.send(policy, req) else {
                return Ok(layer_status::unavailable(format!(
                    "no healthy instance of service {:?}",
                    router.service
                ))
                .into_http());
            };
            match sent.await {
                Ok(resp) => Ok(resp),
                // A stream cut as the deadline passes surfaces as a transport error: the deadline, not a
                // broken instance.
                Err(_)
                    if deadline.is_some_and(|d| {
                        std::time::Instant::now() + Duration::from_millis(5) >= d
                    }) =>
                {
                    Ok(layer_status::deadline_exceeded("deadline exceeded").into_http())
                }
                Err(e) => Err(e),
            }
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
