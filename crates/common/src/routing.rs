//! Picking the instance of each call ([`Picker`], the innermost service of every channel) by the target's
//! load-balancing policy ([`LbPolicy`]): p2c over PeakEWMA load, round robin, pick first and key affinity, all
//! from discovery's list under one lock, with no task between the caller and the instance's channel.
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
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http::{Request, Response};
use tokio::sync::watch;
use tonic::body::Body;
use tower::{BoxError, Service};

use crate::{error::layer_status, layers::Ejecting, service_config::LbPolicy};

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
    fnv1a_on(0xcbf2_9ce4_8422_2325, bytes)
}

/// FNV-1a, 64 bits, over more bytes: from `h`, the hash of what came before them.
fn fnv1a_on(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// FNV-1a of what is written to it (an address as `Display` writes it), with nothing allocated.
struct Fnv1aWriter(u64);

impl std::fmt::Write for Fnv1aWriter {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0 = fnv1a_on(self.0, s.as_bytes());
        Ok(())
    }
}

/// The weights of a key's instances: `fmix64(FNV-1a(key \0 address))`, the key's part hashed once.
struct Weights(u64);

impl Weights {
    fn of(key: &str) -> Self {
        Self(fnv1a_on(fnv1a(key.as_bytes()), &[0]))
    }

    /// The weight of `addr` (ties broken by the address).
    fn weight(&self, addr: SocketAddr) -> (u64, SocketAddr) {
        use std::fmt::Write;
        let mut h = Fnv1aWriter(self.0);
        let _ = write!(h, "{addr}");
        (fmix64(h.0), addr)
    }
}

/// The owner of `key` among `endpoints`: the one with the highest weight for it; `None` when there is none.
pub fn owner(key: &str, endpoints: &[SocketAddr]) -> Option<SocketAddr> {
    let weights = Weights::of(key);
    endpoints.iter().copied().max_by_key(|a| weights.weight(*a))
}

/// The owner of `key` among the `endpoints` that `usable` accepts: its owner when that one is usable, else
/// the next in rendezvous order (the instance that would own it without the owner), as ring-hash balancers
/// skip unhealthy hosts (Envoy's ring hash and Maglev). Only the keys of an unusable instance move, and only
/// while it is unusable. `None` when no instance is usable.
pub fn owner_among(
    key: &str,
    endpoints: &[SocketAddr],
    mut usable: impl FnMut(&SocketAddr) -> bool,
) -> Option<SocketAddr> {
    let weights = Weights::of(key);
    endpoints
        .iter()
        .copied()
        .filter(|a| usable(a))
        .max_by_key(|a| weights.weight(*a))
}

/// Makes the service of one instance (its connection's channel: [`crate::connect`]) from its address.
pub type Connect<E> = Arc<dyn Fn(SocketAddr) -> E + Send + Sync>;

/// The connections of one target's instances, shared by its picker's policies, so switching policy opens no
/// new connection.
pub(crate) struct Conns<E> {
    open: Arc<Mutex<HashMap<SocketAddr, E>>>,
    connect: Connect<E>,
}

impl<E> Clone for Conns<E> {
    fn clone(&self) -> Self {
        Self {
            open: self.open.clone(),
            connect: self.connect.clone(),
        }
    }
}

impl<E: Clone> Conns<E> {
    pub(crate) fn new(connect: Connect<E>) -> Self {
        Self {
            open: Arc::default(),
            connect,
        }
    }

    /// The channel of the instance at `addr`, made on first use.
    pub(crate) fn get(&self, addr: SocketAddr) -> E {
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

/// The round-trip time an instance is assumed to have before its first answer (Linkerd's and tower's
/// PeakEWMA default).
const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// How fast an instance's round-trip estimate forgets: its weight decays by e every this long.
const RTT_DECAY: Duration = Duration::from_secs(10);

/// Nanoseconds since the process's first look at the clock (the instants [`Load`] keeps in atomics).
fn clock_ns() -> u64 {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let base = *BASE.get_or_init(std::time::Instant::now);
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// One instance's load as p2c weighs it, PeakEWMA as Linkerd and tower define it: a moving average of its
/// round-trip times that jumps to a slower answer at once (the peak) and forgets over [`RTT_DECAY`], times the
/// calls it has outstanding plus one. In atomics, read and written by every caller without a lock: two
/// updates that race may lose one sample, which an average tolerates.
#[derive(Debug)]
pub(crate) struct Load {
    pending: AtomicU32,
    /// The estimate in nanoseconds (an `f64`'s bits).
    rtt_ns: AtomicU64,
    /// When the estimate was last updated ([`clock_ns`]).
    updated_ns: AtomicU64,
}

impl Default for Load {
    fn default() -> Self {
        Self {
            pending: AtomicU32::new(0),
            rtt_ns: AtomicU64::new((DEFAULT_RTT.as_nanos() as f64).to_bits()),
            updated_ns: AtomicU64::new(clock_ns()),
        }
    }
}

impl Load {
    /// The estimate decayed to `now` toward `sample` (0 when only time passed); a larger sample replaces it.
    fn estimate(&self, now: u64, sample: f64) -> f64 {
        let rtt = f64::from_bits(self.rtt_ns.load(Ordering::Relaxed));
        if sample > rtt {
            return sample;
        }
        let elapsed = now.saturating_sub(self.updated_ns.load(Ordering::Relaxed)) as f64;
        let decay = (-elapsed / RTT_DECAY.as_nanos() as f64).exp();
        rtt * decay + sample * (1.0 - decay)
    }

    /// The cost of sending one more call here now.
    fn cost(&self, now: u64) -> f64 {
        let pending = self.pending.load(Ordering::Relaxed);
        self.estimate(now, 0.0) * f64::from(pending + 1)
    }

    /// A call sent: counted until the guard drops, when its round trip is recorded.
    fn sent(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            started: clock_ns(),
        }
    }
}

/// A call counted in its instance's [`Load`] until it is answered (or given up).
struct InFlight {
    load: Arc<Load>,
    started: u64,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = clock_ns();
        let sample = now.saturating_sub(self.started) as f64;
        let next = self.load.estimate(now, sample);
        self.load.rtt_ns.store(next.to_bits(), Ordering::Relaxed);
        self.load.updated_ns.store(now, Ordering::Relaxed);
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks each call's instance from discovery's list by a load-balancing policy.
pub(crate) struct Router<E> {
    pub(crate) service: Arc<str>,
    pub(crate) endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    pub(crate) conns: Conns<E>,
    /// The instances as discovery last listed them, rebuilt only when it answers anew.
    membership: Arc<Mutex<Membership<E>>>,
    /// Round robin's turn.
    turn: Arc<AtomicUsize>,
    /// Pick first's instance, kept while it is listed and not ejected.
    first: Arc<Mutex<Option<SocketAddr>>>,
}

impl<E> Clone for Router<E> {
    fn clone(&self) -> Self {
        Self {
            service: self.service.clone(),
            endpoints: self.endpoints.clone(),
            conns: self.conns.clone(),
            membership: self.membership.clone(),
            turn: self.turn.clone(),
            first: self.first.clone(),
        }
    }
}

/// One listed instance: its channel behind its ejection, and its load.
struct Member<E> {
    ejecting: Ejecting<E>,
    load: Arc<Load>,
}

/// What a [`Router`] picks from: discovery's latest list, sorted, and each instance with its ejection state
/// (every policy skips ejected instances) and its load (p2c's). A call locks it once and allocates nothing
/// for the pick unless discovery changed the list since the last call.
struct Membership<E> {
    /// Discovery's answers (`has_changed` says when to rebuild).
    endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
    /// The latest answer, sorted; `None` before the first.
    list: Option<Vec<SocketAddr>>,
    members: HashMap<SocketAddr, Member<E>>,
}

impl<E: Clone> Membership<E> {
    /// Takes discovery's latest answer if it changed.
    fn refresh(&mut self, conns: &Conns<E>) {
        if (self.endpoints.has_changed().unwrap_or(false) || self.list.is_none())
            && let Some(mut list) = self.endpoints.borrow_and_update().clone()
        {
            list.sort_unstable();
            conns.retain(&list);
            self.members.retain(|a, _| list.contains(a));
            for addr in &list {
                self.members.entry(*addr).or_insert_with(|| Member {
                    ejecting: Ejecting::new(*addr, conns.get(*addr)),
                    load: Arc::default(),
                });
            }
            self.list = Some(list);
        }
    }
}

impl<E> Router<E>
where
    E: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    E::Error: Into<BoxError>,
    E::Future: Send + 'static,
{
    pub(crate) fn new(
        service: Arc<str>,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
        conns: Conns<E>,
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

    /// The call, sent to the instance `policy` picks from discovery's latest list; `None` when it is empty. A
    /// transport error of a call whose `deadline` has (all but) passed is the deadline's, not the instance's.
    fn send(
        &self,
        policy: LbPolicy,
        req: Request<Body>,
        deadline: Option<std::time::Instant>,
    ) -> Option<Sending> {
        let mut guard = self.membership.lock().unwrap_or_else(|p| p.into_inner());
        guard.refresh(&self.conns);
        let Membership { list, members, .. } = &mut *guard;
        let list = list.as_deref().unwrap_or_default();
        // Ready unless ejected (an instance's channel is always ready; only the ejection backoff waits).
        let mut ready = |addr: &SocketAddr| {
            let member = members.get_mut(addr).expect("listed");
            let mut cx = Context::from_waker(std::task::Waker::noop());
            member.ejecting.poll_ready(&mut cx).is_ready()
        };
        let pick = match policy {
            LbPolicy::KeyAffinity => {
                let key = req
                    .headers()
                    .get(ROUTING_KEY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                // An ejected owner (refused, reset, unreachable: gone, or about to leave discovery) hands its
                // keys to the next instance in rendezvous order until it is let in again, so a call racing
                // an instance's shutdown or crash is answered (a cache miss at worst), not failed.
                owner_among(key, list, |a| ready(a)).or_else(|| owner(key, list))
            }
            LbPolicy::P2c => {
                // Two instances at random, the cheaper of those that are ready (Mitzenmacher's power of two
                // choices); with neither ready, the first ready one from a random start.
                let n = list.len();
                let (i, j) = match n {
                    0 | 1 => (0, 0),
                    _ => {
                        let i = rand::random_range(0..n);
                        let j = (i + rand::random_range(1..n)) % n;
                        (i, j)
                    }
                };
                let mut two = [
                    list.get(i).copied(),
                    list.get(j).copied().filter(|_| j != i),
                ];
                for slot in &mut two {
                    *slot = slot.filter(|a| ready(a));
                }
                let other = match two {
                    [None, None] => (1..n).map(|k| list[(i + k) % n]).find(|a| ready(a)),
                    _ => None,
                };
                let now = clock_ns();
                let cost = |a: &SocketAddr| members[a].load.cost(now);
                match two {
                    [Some(a), Some(b)] => Some(if cost(&b) < cost(&a) { b } else { a }),
                    [Some(a), None] | [None, Some(a)] => Some(a),
                    [None, None] => other,
                }
            }
            LbPolicy::RoundRobin => {
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
        let _ = member.ejecting.poll_ready(&mut cx);
        let in_flight = member.load.sent();
        let sent = member.ejecting.call(req);
        drop(guard);
        Some(Box::pin(async move {
            let answer = sent.await;
            drop(in_flight);
            match answer {
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
        }))
    }
}

/// The innermost service of every channel: sends each call to the instance its load-balancing policy picks —
/// the call's own (from the target's service config, [`LbPolicy`] in its extensions) or the channel's default
/// — from discovery's list, over `E`, each instance's channel (made by the channel's [`Connect`], behind its
/// [`Ejecting`]). Every policy shares the instances' connections. One allocation per call (its future).
pub struct Picker<E> {
    default: LbPolicy,
    router: Router<E>,
}

impl<E> Clone for Picker<E> {
    fn clone(&self) -> Self {
        Self {
            default: self.default,
            router: self.router.clone(),
        }
    }
}

impl<E> Picker<E>
where
    E: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    E::Error: Into<BoxError>,
    E::Future: Send + 'static,
{
    /// The picker of `service`'s instances as `endpoints` lists them (`None` until discovery's first answer),
    /// each reached through `connect(addr)`, by `default` unless a call's service config says otherwise.
    pub fn new(
        service: &str,
        endpoints: watch::Receiver<Option<Vec<SocketAddr>>>,
        connect: Connect<E>,
        default: LbPolicy,
    ) -> Self {
        Self {
            default,
            router: Router::new(Arc::from(service), endpoints, Conns::new(connect)),
        }
    }
}

impl<E> Service<Request<Body>> for Picker<E>
where
    E: Service<Request<Body>, Response = Response<Body>> + Clone + Send + 'static,
    E::Error: Into<BoxError>,
    E::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = Sending;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let policy = req
            .extensions()
            .get::<LbPolicy>()
            .copied()
            .unwrap_or(self.default);
        let deadline =
            crate::context::grpc_timeout(req.headers()).map(|t| std::time::Instant::now() + t);
        let no_instance =
            |router: &Router<E>| Ok(layer_status::no_instance(&router.service).into_http());
        if self.router.endpoints.borrow().is_none() {
            // Before discovery's first answer, wait for it (the caller's deadline bounds the call).
            let router = self.router.clone();
            return Box::pin(async move {
                let _ = router.endpoints.clone().wait_for(Option::is_some).await;
                match router.send(policy, req, deadline) {
                    Some(sent) => sent.await,
                    None => no_instance(&router),
                }
            });
        }
        match self.router.send(policy, req, deadline) {
            Some(sent) => sent,
            None => Box::pin(std::future::ready(no_instance(&self.router))),
        }
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
        // An unusable owner's keys go where they would go without it; the others' stay.
        for (k, was) in keys.iter().zip(&before) {
            let usable = |a: &SocketAddr| *a != three[0];
            let now = owner_among(k, &three, usable).unwrap();
            assert_eq!(now, owner(k, &three[1..]).unwrap(), "{k}");
            if *was != three[0] {
                assert_eq!(now, *was, "{k} moved although its owner is usable");
            }
            assert_eq!(owner_among(k, &three, |_| true), Some(*was));
        }
        assert_eq!(owner_among("k", &three, |_| false), None);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c, "FNV-1a reference value");
        // The weights are the definition's, hashed in parts (owners are the same across versions).
        let v6: SocketAddr = "[fe80::1%7]:50202".parse().unwrap();
        for addr in three.iter().copied().chain([v6]) {
            for k in ["", "k", "account/key1"] {
                let whole = fmix64(fnv1a(format!("{k}\0{addr}").as_bytes()));
                assert_eq!(Weights::of(k).weight(addr), (whole, addr), "{k} {addr}");
            }
        }
    }
}

#[cfg(test)]
mod p2c_tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tower::ServiceExt;

    /// A handler in process (a fake endpoint) that answers after `delay`, counting its calls.
    fn endpoint(
        delay: Duration,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        Request<Body>,
        Response = Response<Body>,
        Error = std::convert::Infallible,
        Future = impl Send,
    > + Clone
    + Send
    + 'static {
        tower::service_fn(move |_: Request<Body>| {
            calls.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(delay).await;
                Ok(Response::new(Body::empty()))
            }
        })
    }

    #[tokio::test]
    async fn p2c_sends_most_calls_to_the_instance_that_answers_sooner_and_every_call_somewhere() {
        let fast: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let slow: SocketAddr = "127.0.0.1:7002".parse().unwrap();
        let counts = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
        let by = counts.clone();
        let connect: Connect<_> = Arc::new(move |addr: SocketAddr| {
            if addr == fast {
                endpoint(Duration::ZERO, by[0].clone())
            } else {
                endpoint(Duration::from_millis(20), by[1].clone())
            }
        });
        let (_tx, endpoints) = watch::channel(Some(vec![fast, slow]));
        let picker = Picker::new("svc", endpoints, connect, LbPolicy::P2c);
        for _ in 0..200 {
            let resp = picker
                .clone()
                .oneshot(Request::new(Body::empty()))
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
        let (f, s) = (
            counts[0].load(Ordering::Relaxed),
            counts[1].load(Ordering::Relaxed),
        );
        assert_eq!(f + s, 200);
        // Both start at the default estimate: the slow one gets a few calls until its answers set its own.
        assert!((1..=10).contains(&s), "fast {f}, slow {s}");

        // Calls in flight count too: an instance with two outstanding costs three times one with none.
        let load = Load::default();
        let held = Arc::new(Load::default());
        let _a = held.sent();
        let _b = held.sent();
        let now = clock_ns();
        assert!(held.cost(now) > 2.5 * load.cost(now));
    }
}
