//! Logs: `tracing` events as JSON lines on stdout, and shipped to Kafka (topic `logs.<service>` by default).
//!
//! One line per event:
//! `{"timestamp":"2026-11-22T03:00:00.123456Z","level":"INFO","service":"echo","instance":"echo-host-5000-ab12",
//!   "target":"echo","message":"...","trace_id":"…","span":"grpc.request","fields":{...}}`.
//! `trace_id` comes from the nearest enclosing span that has one (the server's `grpc.request` span).
//!
//! Shipping never blocks the caller: lines go into a bounded queue (`log.buffer_lines`) drained by one thread
//! that owns the Kafka producer. What cannot be shipped is dropped and counted by reason ([`ShipperStats`]):
//! `queue_full` (the queue is full), `producer_full` (librdkafka's own queue is full), `delivery_failed`
//! (Kafka did not acknowledge within `log.delivery_timeout`, e.g. while it is down). While lines are being lost,
//! and `log.stdout` is off, they are written to stderr instead so nothing vanishes silently.
//! The Kafka client's own diagnostics (`rdkafka*` targets) and this module's are never shipped, which would
//! feed back into the producer. [`Telemetry::shutdown`] flushes what is queued before the process exits.

mod json;
mod kafka;
mod queue;
mod stdout;

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::{EnvFilter, prelude::*};

pub use self::kafka::{HEADER_LEVEL, HEADER_TRACE_ID};
use self::{json::JsonLayer, kafka::Shipper, stdout::Stdout};

use crate::config::{Reader, Settings};

/// Logs: JSON lines on stdout and shipped to Kafka.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// `tracing` filter directives (`log.level`, or `RUST_LOG`), default `info`.
    pub level: String,
    /// Write JSON lines to stdout (`log.stdout`), default true.
    pub stdout: bool,
    /// Kafka bootstrap servers (`kafka.brokers`, comma separated). Unset: logs are not shipped.
    pub kafka_brokers: Option<String>,
    /// Log topic (`log.topic`), default `logs.<service>`.
    pub topic: Option<String>,
    /// Lines queued for the stdout writer, and for the Kafka shipper, before new ones are dropped
    /// (`log.buffer_lines`); also the bound of the lines the Kafka producer holds unacknowledged.
    pub buffer_lines: usize,
    /// A line Kafka has not acknowledged within this time is dropped and counted (`log.delivery_timeout`).
    pub delivery_timeout: Duration,
    /// Partitions of the log topic when the service creates it (`log.topic_partitions`, default 3).
    pub topic_partitions: i32,
    /// Replication factor of the log topic when the service creates it (`log.topic_replication`, default 1:
    /// the single local broker; 3 on a production cluster).
    pub topic_replication: i32,
    /// How long Kafka keeps log lines (`log.retention`, default 7 days): the topic's `retention.ms`, set at
    /// every start, on a topic that already exists too.
    pub retention: Duration,
}

impl LogSettings {
    /// Reads the `log` section and `kafka.brokers` (`RUST_LOG` is layered in as the default `log.level`).
    pub fn read(r: &mut Reader) -> Self {
        let level = r.string("log.level", "info");
        if let Err(e) = EnvFilter::try_new(&level) {
            r.fail("log.level", format!("{level:?}: {e}"));
        }
        Self {
            level,
            stdout: r.bool("log.stdout", true),
            kafka_brokers: r.opt_string("kafka.brokers"),
            topic: r.opt_string("log.topic"),
            buffer_lines: r.positive("log.buffer_lines", 10_000usize),
            delivery_timeout: r.duration("log.delivery_timeout", Duration::from_secs(5)),
            topic_partitions: r.positive("log.topic_partitions", 3i32),
            topic_replication: r.positive("log.topic_replication", 1i32),
            retention: r.duration("log.retention", Duration::from_secs(7 * 24 * 3600)),
        }
    }
}

const SELF_TARGET: &str = module_path!();

/// Lines dropped and shipped, by reason. Shared between the logging layer and the shipper thread.
#[derive(Debug, Default)]
pub struct ShipperStats {
    /// Lines acknowledged by Kafka.
    pub shipped: AtomicU64,
    /// Dropped because the queue to the shipper thread was full.
    pub queue_full: AtomicU64,
    /// Dropped because librdkafka's queue was full.
    pub producer_full: AtomicU64,
    /// Dropped because Kafka did not acknowledge them in time (or refused them).
    pub delivery_failed: AtomicU64,
    /// Lines dropped because the queue to the stdout writer thread was full (stdout not read fast enough).
    pub stdout_full: AtomicU64,
}

impl ShipperStats {
    /// All lines lost, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.queue_full.load(Ordering::Relaxed)
            + self.producer_full.load(Ordering::Relaxed)
            + self.delivery_failed.load(Ordering::Relaxed)
            + self.stdout_full.load(Ordering::Relaxed)
    }
}

/// The installed logging pipeline; [`Telemetry::shutdown`] (or dropping it) flushes stdout and Kafka.
pub struct Telemetry {
    stats: Arc<ShipperStats>,
    /// The Kafka shipper's thread, when logs are shipped (dropped, so stopped, before stdout's).
    shipper: Option<Worker>,
    /// The stdout writer's thread, when `log.stdout` is on.
    stdout: Option<Worker>,
    /// Swaps the level filter of the installed subscriber (`log.level` changed live).
    filter: Option<FilterHandle>,
}

/// Changes the level filter of the installed subscriber; see [`Telemetry::log_level`].
#[derive(Clone)]
pub struct LogLevel(Option<FilterHandle>);

impl LogLevel {
    /// Replaces the level filter (`log.level`'s syntax: `info`, `info,keel::calls=warn`); events already
    /// being logged are unaffected.
    ///
    /// # Errors
    /// The directives do not parse (the filter in place stays), or this process's subscriber was installed
    /// by someone else.
    pub fn set(&self, level: &str) -> Result<(), String> {
        let filter = EnvFilter::try_new(level).map_err(|e| e.to_string())?;
        match &self.0 {
            Some(h) => h.reload(filter).map_err(|e| e.to_string()),
            None => Err("this process's subscriber was installed elsewhere".into()),
        }
    }
}

/// The reload handle of the installed subscriber's level filter.
type FilterHandle = tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>;

impl fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Telemetry")
            .field("dropped", &self.stats.dropped())
            .finish()
    }
}

impl Telemetry {
    /// Installs the global subscriber: JSON lines on stdout and, with `kafka.brokers` set, shipped to
    /// [`Settings::log_topic`]. `instance` is the Consul service ID. Installing twice (tests) keeps the first
    /// subscriber and ships nothing from the second.
    ///
    /// # Errors
    /// The Kafka producer cannot be configured (bad broker list).
    pub fn init(settings: &Settings, instance: &str) -> anyhow::Result<Self> {
        let (subscriber, mut telemetry, handle) =
            Self::build(settings, instance, std::io::stdout())?;
        if subscriber.try_init().is_ok() {
            telemetry.filter = Some(handle);
        }
        Ok(telemetry)
    }

    /// The subscriber [`Telemetry::init`] installs, not installed, with the lines that would go to stdout
    /// written to `out` (with `log.stdout` on): for benches and tests that measure logging per call, through
    /// [`tracing::dispatcher::with_default`]. The returned [`Telemetry`] owns the writer threads.
    ///
    /// # Errors
    /// As [`Telemetry::init`].
    pub fn to_writer(
        settings: &Settings,
        instance: &str,
        out: impl std::io::Write + Send + 'static,
    ) -> anyhow::Result<(tracing::Dispatch, Self)> {
        let (subscriber, telemetry, _) = Self::build(settings, instance, out)?;
        Ok((tracing::Dispatch::new(subscriber), telemetry))
    }

    fn build(
        settings: &Settings,
        instance: &str,
        out: impl std::io::Write + Send + 'static,
    ) -> anyhow::Result<(
        impl tracing::Subscriber + Send + Sync + 'static,
        Self,
        FilterHandle,
    )> {
        let stats = Arc::new(ShipperStats::default());
        let (shipper, shipper_worker) = match &settings.log.kafka_brokers {
            Some(brokers) => {
                let (shipper, worker) = Shipper::start(
                    &settings.log,
                    brokers,
                    settings.log_topic(),
                    instance,
                    stats.clone(),
                )?;
                (Some(shipper), Some(worker))
            }
            None => (None, None),
        };
        let (stdout, stdout_worker) = if settings.log.stdout {
            let (stdout, worker) = Stdout::start(out, settings.log.buffer_lines, stats.clone())?;
            (Some(stdout), Some(worker))
        } else {
            (None, None)
        };
        let layer = JsonLayer::new(&settings.service.name, instance, stdout, shipper);
        let filter =
            EnvFilter::try_new(&settings.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
        let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
        Ok((
            tracing_subscriber::registry().with(filter).with(layer),
            Self {
                stats,
                shipper: shipper_worker,
                stdout: stdout_worker,
                filter: None,
            },
            handle,
        ))
    }

    /// A handle that changes the level filter of the running subscriber (`log.level` changed live).
    pub fn log_level(&self) -> LogLevel {
        LogLevel(self.filter.clone())
    }

    /// Lines lost so far, all reasons.
    pub fn dropped(&self) -> u64 {
        self.stats.dropped()
    }

    /// Counters by reason, shared (for the metrics flusher).
    pub fn stats(&self) -> Arc<ShipperStats> {
        self.stats.clone()
    }

    /// Flushes queued lines to Kafka (up to 5 s) and stops the shipper thread. Logs a summary to stdout first.
    pub fn shutdown(mut self) {
        let s = &self.stats;
        tracing::info!(
            target: SELF_TARGET,
            shipped = s.shipped.load(Ordering::Relaxed),
            dropped = s.dropped(),
            queue_full = s.queue_full.load(Ordering::Relaxed),
            producer_full = s.producer_full.load(Ordering::Relaxed),
            delivery_failed = s.delivery_failed.load(Ordering::Relaxed),
            "log shipper stopping"
        );
        // The global layer keeps its senders for the life of the process, so the threads are told to stop:
        // the shipper drains its queue, flushes the producer (at most 5 s) and exits.
        if let Some(shipper) = self.shipper.take() {
            shipper.stop();
        }
        // Last: the stdout thread writes what is queued, then stops.
        if let Some(stdout) = self.stdout.take() {
            stdout.stop();
        }
    }
}

/// How often the writer threads (stdout, the Kafka shipper) take what has queued for them.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

/// The loop of a writer thread: every [`DRAIN_INTERVAL`], takes what has queued in `queue` and hands each line
/// and its level to `each`, then calls `round`, both with the thread's `sink`; returns once `stop` is set and
/// the queue drained, or once the logging side is gone and its last lines handed on.
///
/// Taking what has queued instead of waiting on the queue spares a logging call a sleeping writer to wake
/// (a futex wake and a context switch per line, measured at ~10% of a busy process's CPU), and hands the
/// writer its lines in batches.
fn drain<S>(
    queue: &queue::LineQueue,
    stop: &AtomicBool,
    sink: &mut S,
    mut each: impl FnMut(&mut S, &[u8], &'static str),
    mut round: impl FnMut(&mut S),
) {
    let mut lines = queue::Lines::default();
    loop {
        let stopping = stop.load(Ordering::Acquire) || !queue.has_writers();
        queue.take(&mut lines);
        for (line, level) in lines.iter() {
            each(sink, line, level);
        }
        round(sink);
        if stopping {
            return;
        }
        std::thread::sleep(DRAIN_INTERVAL);
    }
}

/// A writer thread and the flag that stops it; dropping it stops the thread (it writes what is queued first)
/// and waits for it, so the lines logged last (an error before exiting) are not lost.
struct Worker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Worker {
    /// Starts thread `name` running `body` with the flag that [`Worker::stop`] sets.
    ///
    /// # Errors
    /// The thread cannot be started.
    fn spawn(name: &str, body: impl FnOnce(&AtomicBool) + Send + 'static) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || body(&stop))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop (it writes what is queued first) and waits for it.
    fn stop(self) {
        drop(self);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Spawns a task that logs (stdout only, never shipped) how many lines were dropped each time the total grows,
/// so an operator tailing stdout sees Kafka trouble without reading Graphite.
pub fn spawn_drop_reporter(stats: Arc<ShipperStats>, period: Duration) {
    tokio::spawn(async move {
        let mut last = 0;
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let now = stats.dropped();
            if now > last {
                tracing::warn!(
                    target: SELF_TARGET,
                    dropped = now,
                    queue_full = stats.queue_full.load(Ordering::Relaxed),
                    producer_full = stats.producer_full.load(Ordering::Relaxed),
                    delivery_failed = stats.delivery_failed.load(Ordering::Relaxed),
                    "log lines dropped"
                );
                last = now;
            }
        }
    });
}
