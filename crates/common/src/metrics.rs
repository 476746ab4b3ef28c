//! StatsD metrics for every RPC, recorded by a tower layer with no code in handlers.
//!
//! Names are dotted and Graphite-friendly (classic statsd→Graphite rejects DogStatsD tags), all under
//! `<statsd.prefix>.<service>.`:
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `grpc.<side>.<Service>.<Method>.requests` | counter | calls finished |
//! | `grpc.<side>.<Service>.<Method>.latency` | timer (ms) | time to the last byte of the response |
//! | `grpc.<side>.<Service>.<Method>.status.<CODE>` | counter | calls by gRPC status code name, e.g. `NOT_FOUND` |
//! | `grpc.<side>.inflight` | gauge | calls in progress |
//! | `telemetry.metrics_dropped`, `telemetry.logs_dropped` | gauge | totals dropped since start |
//! | `events.dead_letters` | gauge | events this process's consumers dead-lettered since start ([`crate::events`]) |
//! | `outbox.<service>.backlog`, `outbox.<service>.dead_letters` | gauge | events waiting in a service's outbox, and in its dead-letter table ([`crate::outbox`]) |
//!
//! `<side>` is `server` or `client`; `<Service>` is the proto service name without its package. Paths the
//! server does not serve (an unknown service, or a method of a served one answered UNIMPLEMENTED) are recorded
//! as `unknown.unknown` so a scanner cannot blow up the metric namespace.
//! Sending never blocks a request, and a call sends nothing: counters and the in-flight gauge are kept in
//! memory (atomics), latencies in a bounded per-method buffer ([`Latencies`]), all sent once per flush (every
//! second) by the flusher task, which packs them into UDP datagrams of up to [`DATAGRAM_BYTES`] and sends
//! them itself (no queue, no sender thread); a datagram the socket refuses is dropped and counted
//! ([`Metrics::dropped`]). StatsD sums counts per flush interval, so Graphite sees the same totals. StatsD
//! daemon (Etsy) then stores counters under `stats_counts.<name>` and timers under `stats.timers.<name>.*` in
//! Graphite.
//!
//! Above [`TIMER_SAMPLES`] calls of one method in one second, its latencies are sent as a uniform sample with
//! StatsD's sample rate (`|@<rate>`, [StatsD's metric types](https://github.com/statsd/statsd/blob/master/docs/metric_types.md)),
//! so the daemon's `count` stays the number of calls, its percentiles are those of the sample, and the slowest
//! and fastest call of the second are always among those sent (`upper` and `lower` stay exact).

use std::{
    collections::HashSet,
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use cadence::{BufferedUdpMetricSink, Counted, Gauged, NopMetricSink, StatsdClient, Timed};
use tonic::Code;

use crate::config::{Reader, Settings};

/// StatsD metrics.
#[derive(Clone, Debug)]
pub struct StatsdSettings {
    /// StatsD daemon address (`statsd.addr`), `host:port` (UDP). Unset: metrics are counted but not sent.
    pub addr: Option<String>,
    /// First segment of every metric name (`statsd.prefix`), default `keel`.
    pub prefix: String,
    /// Latencies of one method sent per flush (every second) before they are sampled
    /// (`statsd.timer_samples`, default [`TIMER_SAMPLES`]; module docs).
    pub timer_samples: usize,
}

impl StatsdSettings {
    /// Reads the `statsd` section.
    pub fn read(r: &mut Reader) -> Self {
        Self {
            addr: r.opt_string("statsd.addr"),
            prefix: r.string("statsd.prefix", "keel"),
            timer_samples: r.positive("statsd.timer_samples", TIMER_SAMPLES),
        }
    }
}

/// Which end of a call a metric describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// This process served the call.
    Server,
    /// This process made the call.
    Client,
}

impl Side {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Side::Server => "server",
            Side::Client => "client",
        }
    }
}

/// Default of `statsd.timer_samples`, the latencies of one method kept per flush before they are sampled
/// (module docs): at 1 s flushes, every call of a method up to this rate is sent.
pub const TIMER_SAMPLES: usize = 2048;

/// Largest UDP datagram the flusher sends, bytes: several metrics per datagram, under the 1,500-byte Ethernet
/// MTU less IP and UDP headers (StatsD's own advice: <https://github.com/statsd/statsd/blob/master/docs/metric_types.md#multi-metric-packets>).
pub const DATAGRAM_BYTES: usize = 1432;

/// One method's latencies since the last flush, ms: every one while there are at most `cap`, then a uniform
/// sample of `cap` of them (reservoir sampling, Vitter's algorithm R), holding the extremes when taken.
#[derive(Debug, Default)]
pub struct Latencies {
    kept: Vec<u64>,
    seen: u64,
    slowest: u64,
    fastest: u64,
}

impl Latencies {
    /// Adds one call's latency, ms, keeping at most `cap` (≥ 2).
    pub fn add(&mut self, ms: u64, cap: usize) {
        self.seen += 1;
        if self.seen == 1 || ms > self.slowest {
            self.slowest = ms;
        }
        if self.seen == 1 || ms < self.fastest {
            self.fastest = ms;
        }
        if self.kept.len() < cap.max(2) {
            self.kept.push(ms);
        } else {
            let j = rand::random_range(0..self.seen);
            if let Some(slot) = self.kept.get_mut(j as usize) {
                *slot = ms;
            }
        }
    }

    /// What to send, and empties it: the latencies (ms) and the rate they were sampled at (1.0: every call).
    /// A sample holds the slowest and the fastest call (in place of two sampled ones).
    pub fn take(&mut self) -> (Vec<u64>, f64) {
        let seen = std::mem::take(&mut self.seen);
        let mut kept = std::mem::take(&mut self.kept);
        if seen as usize > kept.len() {
            let (slowest, fastest) = (self.slowest, self.fastest);
            for extreme in [slowest, fastest] {
                if !kept.contains(&extreme)
                    && let Some(slot) = kept.iter_mut().find(|v| **v != slowest && **v != fastest)
                {
                    *slot = extreme;
                }
            }
        }
        let rate = if seen == 0 {
            1.0
        } else {
            kept.len() as f64 / seen as f64
        };
        (kept, rate)
    }
}

/// One RPC's counters since the last flush, and its metric names (made once, on its first call).
struct MethodStats {
    base: String,
    latency: String,
    latencies: std::sync::Mutex<Latencies>,
    requests: AtomicU64,
    /// Calls by gRPC status code (0..=16).
    status: [AtomicU64; 17],
    /// gRPC messages sent and received by this side's calls.
    messages_sent: AtomicU64,
    messages_received: AtomicU64,
}

impl MethodStats {
    fn new(side: Side, method: &str) -> Self {
        let base = format!("grpc.{}.{}", side.as_str(), method);
        Self {
            latency: format!("{base}.latency"),
            latencies: Default::default(),
            base,
            requests: AtomicU64::new(0),
            status: Default::default(),
            messages_sent: AtomicU64::new(0),
            messages_received: AtomicU64::new(0),
        }
    }
}

/// Per side, per method (`Service.Method`) or per path.
type MethodTable = std::sync::RwLock<std::collections::HashMap<String, Arc<MethodStats>>>;

struct Inner {
    client: StatsdClient,
    /// `statsd.timer_samples`.
    timer_samples: usize,
    dropped: Arc<AtomicU64>,
    inflight: [AtomicI64; 2],
    methods: [MethodTable; 2],
    /// Per side, the stats of each path named so far (`/package.Service/Method`), so a call finds its
    /// method's without making its name.
    paths: [MethodTable; 2],
    /// Gauges sampled by the flusher: name (under the prefix) and how to read the value.
    gauges: std::sync::Mutex<Vec<(String, Sampler)>>,
}

/// Reads a gauge's current value.
type Sampler = Box<dyn Fn() -> u64 + Send + Sync>;

/// A cheap-to-clone handle on this process's StatsD client.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("dropped", &self.dropped())
            .finish()
    }
}

impl Metrics {
    /// A client sending to `statsd.addr` under `<statsd.prefix>.<service>`; without an address, a client that
    /// sends nothing.
    ///
    /// # Errors
    /// The UDP socket cannot be made or the address does not resolve.
    pub fn new(settings: &Settings) -> std::io::Result<Self> {
        let prefix = format!(
            "{}.{}",
            settings.statsd.prefix,
            sanitize(&settings.service.name)
        );
        let dropped = Arc::new(AtomicU64::new(0));
        let on_error = {
            let dropped = dropped.clone();
            move |_err: cadence::MetricError| {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        };
        let client = match &settings.statsd.addr {
            Some(addr) => {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.set_nonblocking(true)?;
                // Sent by the flusher task itself: a queue and a sender thread in front of the socket cost
                // an idle process its slots (cadence's queue allocates all of them, ~320 KB at 10,000) and
                // bought nothing once a call stopped sending (module docs).
                let sink = BufferedUdpMetricSink::builder()
                    .with_capacity(DATAGRAM_BYTES)
                    .build(addr.clone(), socket)
                    .map_err(std::io::Error::other)?;
                StatsdClient::builder(&prefix, sink)
                    .with_error_handler(on_error)
                    .build()
            }
            None => StatsdClient::builder(&prefix, NopMetricSink)
                .with_error_handler(on_error)
                .build(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                client,
                timer_samples: settings.statsd.timer_samples,
                dropped,
                inflight: [AtomicI64::new(0), AtomicI64::new(0)],
                methods: Default::default(),
                paths: Default::default(),
                gauges: Default::default(),
            }),
        })
    }

    /// A client that sends nothing (tests, tools).
    pub fn disabled() -> Self {
        let client = StatsdClient::builder("keel", NopMetricSink).build();
        Self {
            inner: Arc::new(Inner {
                client,
                timer_samples: TIMER_SAMPLES,
                dropped: Arc::new(AtomicU64::new(0)),
                inflight: [AtomicI64::new(0), AtomicI64::new(0)],
                methods: Default::default(),
                paths: Default::default(),
                gauges: Default::default(),
            }),
        }
    }

    /// The underlying client, for a service's own domain metrics. It sends from the caller's thread: a
    /// metric is buffered, and the call that fills a datagram sends it (one `sendto(2)` per ~20 metrics); in a
    /// hot path, prefer a gauge read at each flush ([`Metrics::sample`]).
    pub fn client(&self) -> &StatsdClient {
        &self.inner.client
    }

    /// Sends that failed since start (each a datagram of metrics the socket refused).
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Sends the counters and in-flight gauges kept since the last flush, then what is buffered; called every
    /// second by [`Metrics::spawn_flusher`] and at shutdown.
    pub fn flush(&self) {
        let c = &self.inner.client;
        for side in [Side::Server, Side::Client] {
            let inflight = self.inner.inflight[side as usize].load(Ordering::Relaxed);
            let _ = c.gauge(INFLIGHT[side as usize], inflight.max(0) as u64);
            let methods = self.inner.methods[side as usize].read().expect("metrics");
            for m in methods.values() {
                let n = m.requests.swap(0, Ordering::Relaxed);
                if n > 0 {
                    let _ = c.count(&format!("{}.requests", m.base), n);
                }
                for (name, counter) in [
                    ("messages_sent", &m.messages_sent),
                    ("messages_received", &m.messages_received),
                ] {
                    let n = counter.swap(0, Ordering::Relaxed);
                    if n > 0 {
                        let _ = c.count(&format!("{}.{name}", m.base), n);
                    }
                }
                for (code, count) in m.status.iter().enumerate() {
                    let n = count.swap(0, Ordering::Relaxed);
                    if n > 0 {
                        let name = code_name(Code::from_i32(code as i32));
                        let _ = c.count(&format!("{}.status.{name}", m.base), n);
                    }
                }
                let (latencies, rate) = m.latencies.lock().expect("metrics").take();
                for ms in latencies {
                    let timer = c.time_with_tags(&m.latency, ms);
                    if rate < 1.0 {
                        timer.with_sampling_rate(rate).send();
                    } else {
                        timer.send();
                    }
                }
            }
        }
        let _ = c.flush();
    }

    /// Adds gauge `name` (under the prefix), read with `value` and sent by the flusher every period.
    pub fn sample(&self, name: impl Into<String>, value: impl Fn() -> u64 + Send + Sync + 'static) {
        self.inner
            .gauges
            .lock()
            .expect("gauges")
            .push((name.into(), Box::new(value)));
    }

    /// Sends every gauge added with [`Metrics::sample`] once, now.
    pub fn send_samples(&self) {
        let c = &self.inner.client;
        for (name, value) in self.inner.gauges.lock().expect("gauges").iter() {
            let _ = c.gauge(name, value());
        }
    }

    /// Every `period`, sends the drop totals and the sampled gauges and flushes, until the runtime stops.
    pub fn spawn_flusher(&self, period: Duration, logs_dropped: impl Fn() -> u64 + Send + 'static) {
        let metrics = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let c = &metrics.inner.client;
                let _ = c.gauge("telemetry.metrics_dropped", metrics.dropped());
                let _ = c.gauge("telemetry.logs_dropped", logs_dropped());
                metrics.send_samples();
                metrics.flush();
            }
        });
    }

    /// Counts a call starting (`delta` 1) or ending (-1); sent as a gauge at each flush.
    pub(crate) fn inflight(&self, side: Side, delta: i64) {
        self.inner.inflight[side as usize].fetch_add(delta, Ordering::Relaxed);
    }

    /// Records a finished call to `path` (`/package.Service/Method`) that sent and received `messages` (gRPC
    /// messages, as this side counts them): its latency and counters are sent at the next flush, under the
    /// name [`method_metric_name`] gives with `known`. A path is named once and then found by a lookup
    /// (no string is made per call). A path never named before whose call ended UNIMPLEMENTED is counted as
    /// `unknown.unknown` and not remembered, so a scanner calling made-up methods of a served service
    /// cannot grow the metric namespace (tonic answers an unknown method UNIMPLEMENTED).
    pub(crate) fn record(
        &self,
        side: Side,
        path: &str,
        known: &HashSet<String>,
        code: Code,
        elapsed: Duration,
        messages: (u64, u64),
    ) {
        let found = self.inner.paths[side as usize]
            .read()
            .expect("metrics")
            .get(path)
            .cloned();
        let stats = found.unwrap_or_else(|| {
            let name = if code == Code::Unimplemented {
                UNKNOWN_METHOD.to_owned()
            } else {
                method_metric_name(path, known)
            };
            let table = &self.inner.methods[side as usize];
            // Read first: paths that are not remembered (`unknown.unknown`) come here on every call.
            let existing = table.read().expect("metrics").get(&name).cloned();
            let stats = existing.unwrap_or_else(|| {
                table
                    .write()
                    .expect("metrics")
                    .entry(name.clone())
                    .or_insert_with(|| Arc::new(MethodStats::new(side, &name)))
                    .clone()
            });
            if name != UNKNOWN_METHOD {
                self.inner.paths[side as usize]
                    .write()
                    .expect("metrics")
                    .insert(path.to_owned(), stats.clone());
            }
            stats
        });
        stats.requests.fetch_add(1, Ordering::Relaxed);
        stats.status[(code as usize).min(16)].fetch_add(1, Ordering::Relaxed);
        stats.messages_sent.fetch_add(messages.0, Ordering::Relaxed);
        stats
            .messages_received
            .fetch_add(messages.1, Ordering::Relaxed);
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        stats
            .latencies
            .lock()
            .expect("metrics")
            .add(ms, self.inner.timer_samples);
    }
}

/// The name of every path that is not a method served (module docs).
const UNKNOWN_METHOD: &str = "unknown.unknown";

/// The in-flight gauges' names, by [`Side`].
const INFLIGHT: [&str; 2] = ["grpc.server.inflight", "grpc.client.inflight"];

/// `SCREAMING_SNAKE` name of a gRPC status code, as in the gRPC spec (`NOT_FOUND`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Keeps a metric path segment to `[A-Za-z0-9_-]`.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `/pkg.sub.Service/Method` → `Service.Method` when `Service` is one of `known` (full names), else
/// `unknown.unknown`. An empty `known` accepts every well-formed path (client side).
pub fn method_metric_name(path: &str, known: &HashSet<String>) -> String {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return UNKNOWN_METHOD.into();
    };
    if method.is_empty() || method.contains('/') || (!known.is_empty() && !known.contains(service))
    {
        return UNKNOWN_METHOD.into();
    }
    let short = service.rsplit('.').next().unwrap_or(service);
    format!("{}.{}", sanitize(short), sanitize(method))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_latency_is_sent_up_to_the_cap() {
        let mut l = Latencies::default();
        for ms in 1..=100 {
            l.add(ms, 100);
        }
        let (kept, rate) = l.take();
        assert_eq!(kept, (1..=100).collect::<Vec<_>>());
        assert_eq!(rate, 1.0);
        assert_eq!(l.take(), (vec![], 1.0), "taken: empty until the next call");
    }

    #[test]
    fn above_the_cap_a_sample_is_sent_at_its_rate_with_the_extremes() {
        let mut l = Latencies::default();
        // The extremes arrive early, so the reservoir has had every chance to drop them.
        l.add(500, 16);
        l.add(0, 16);
        for i in 0..998 {
            l.add(10 + i % 50, 16);
        }
        let (kept, rate) = l.take();
        assert_eq!(kept.len(), 16);
        assert_eq!(
            rate,
            16.0 / 1000.0,
            "StatsD counts each sent latency 1/rate times"
        );
        assert!(kept.contains(&500) && kept.contains(&0), "{kept:?}");
        assert!(
            kept.iter()
                .all(|ms| *ms == 0 || *ms == 500 || (10..60).contains(ms)),
            "{kept:?}"
        );
        // The next interval starts afresh: its extremes are its own.
        l.add(7, 16);
        assert_eq!(l.take(), (vec![7], 1.0));
    }

    #[test]
    fn an_extreme_already_sampled_is_not_replaced_by_the_other() {
        let mut l = Latencies {
            kept: vec![5, 500, 7],
            seen: 10,
            slowest: 500,
            fastest: 1,
        };
        let (kept, rate) = l.take();
        assert_eq!(kept, vec![1, 500, 7]);
        assert_eq!(rate, 0.3);
    }

    #[test]
    fn method_names_are_dotted_and_bounded() {
        let known: HashSet<String> = ["killrvideo.ratings.RatingsService".to_owned()].into();
        assert_eq!(
            method_metric_name("/killrvideo.ratings.RatingsService/GetRating", &known),
            "RatingsService.GetRating"
        );
        assert_eq!(
            method_metric_name("/evil.Scanner/Probe", &known),
            "unknown.unknown"
        );
        assert_eq!(
            method_metric_name("/favicon.ico", &known),
            "unknown.unknown"
        );
        assert_eq!(method_metric_name("/a.B/C", &HashSet::new()), "B.C");
    }

    #[test]
    fn made_up_methods_of_a_served_service_fold_into_unknown_and_are_not_remembered() {
        let m = Metrics::disabled();
        let known: HashSet<String> = ["keel.example.v1.Echo".to_owned()].into();
        let ms = Duration::from_millis(1);
        for i in 0..100 {
            let path = format!("/keel.example.v1.Echo/Probe{i}");
            m.record(Side::Server, &path, &known, Code::Unimplemented, ms, (0, 1));
        }
        m.record(
            Side::Server,
            "/keel.example.v1.Echo/Echo",
            &known,
            Code::Ok,
            ms,
            (1, 1),
        );
        // Once named, a path keeps its name whatever its calls end with.
        m.record(
            Side::Server,
            "/keel.example.v1.Echo/Echo",
            &known,
            Code::Unimplemented,
            ms,
            (0, 1),
        );
        let methods = m.inner.methods[Side::Server as usize].read().unwrap();
        let mut names: Vec<_> = methods.keys().cloned().collect();
        names.sort();
        assert_eq!(names, ["Echo.Echo", "unknown.unknown"]);
        assert_eq!(
            methods["unknown.unknown"].requests.load(Ordering::Relaxed),
            100
        );
        assert_eq!(methods["Echo.Echo"].requests.load(Ordering::Relaxed), 2);
        assert_eq!(
            methods["Echo.Echo"].status[Code::Unimplemented as usize].load(Ordering::Relaxed),
            1
        );
        assert_eq!(
            m.inner.paths[Side::Server as usize].read().unwrap().len(),
            1
        );
    }

    #[test]
    fn code_names_follow_the_grpc_spec() {
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::from(14)), "UNAVAILABLE");
    }
}
