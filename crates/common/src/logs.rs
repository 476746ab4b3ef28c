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

use std::{
    collections::BTreeMap,
    fmt,
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError},
    },
    thread::JoinHandle,
    time::Duration,
};

use rdkafka::{
    ClientConfig, ClientContext,
    error::KafkaError,
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
    types::RDKafkaErrorCode,
};
use serde_json::{Map, Value};
use tracing::{Event, Subscriber, field::Field, span};
use tracing_subscriber::{EnvFilter, Layer, layer::Context, prelude::*, registry::LookupSpan};

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
    /// Lines buffered for the Kafka shipper before new ones are dropped (`log.buffer_lines`).
    pub buffer_lines: usize,
    /// A line Kafka has not acknowledged within this time is dropped and counted (`log.delivery_timeout`).
    pub delivery_timeout: Duration,
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
}

impl ShipperStats {
    /// All lines lost, whatever the reason.
    pub fn dropped(&self) -> u64 {
        self.queue_full.load(Ordering::Relaxed)
            + self.producer_full.load(Ordering::Relaxed)
            + self.delivery_failed.load(Ordering::Relaxed)
    }
}

struct DeliveryContext {
    stats: Arc<ShipperStats>,
    stderr_fallback: bool,
}

impl ClientContext for DeliveryContext {
    // librdkafka's own log lines stay out of `tracing` (and so out of the shipped stream).
    fn log(&self, _level: rdkafka::config::RDKafkaLogLevel, _fac: &str, _log_message: &str) {}
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.stats.shipped.fetch_add(1, Ordering::Relaxed);
            }
            Err((_, msg)) => {
                self.stats.delivery_failed.fetch_add(1, Ordering::Relaxed);
                if self.stderr_fallback {
                    use rdkafka::Message;
                    if let Some(p) = msg.payload() {
                        let mut err = std::io::stderr().lock();
                        let _ = err.write_all(p);
                        let _ = err.write_all(b"\n");
                    }
                }
            }
        }
    }
}

/// The Kafka side: a bounded queue and the thread that owns the producer.
struct Shipper {
    tx: SyncSender<Vec<u8>>,
    stats: Arc<ShipperStats>,
    stderr_fallback: bool,
}

impl Shipper {
    fn offer(&self, line: Vec<u8>) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(line)) | Err(TrySendError::Disconnected(line)) => {
                self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                if self.stderr_fallback {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(&line);
                    let _ = err.write_all(b"\n");
                }
            }
        }
    }
}

fn run_shipper(
    rx: Receiver<Vec<u8>>,
    producer: BaseProducer<DeliveryContext>,
    topic: String,
    stats: Arc<ShipperStats>,
    stop: Arc<AtomicBool>,
) {
    loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(line) => {
                let record: BaseRecord<'_, (), [u8]> = BaseRecord::to(&topic).payload(&line[..]);
                if let Err((e, _)) = producer.send(record) {
                    match e {
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                            stats.producer_full.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => stats.delivery_failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }
            // Stop once asked and the queue has been drained.
            Err(RecvTimeoutError::Timeout) if stop.load(Ordering::Acquire) => break,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
        producer.poll(Duration::ZERO);
    }
    // Flush on exit: whatever Kafka does not take in time is counted as failed by the delivery callback.
    let _ = producer.flush(Duration::from_secs(5));
    let left = producer.in_flight_count();
    if left > 0 {
        stats
            .delivery_failed
            .fetch_add(left as u64, Ordering::Relaxed);
    }
}

/// The `tracing` layer that renders JSON lines and hands them to stdout and the shipper.
struct JsonLayer {
    service: String,
    instance: String,
    stdout: bool,
    shipper: Option<Shipper>,
}

/// Fields recorded on a span, kept in its extensions.
#[derive(Default)]
struct SpanFields(Map<String, Value>);

struct Visitor<'a>(&'a mut Map<String, Value>);

impl tracing::field::Visit for Visitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::String(format!("{value:?}")));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), Value::String(value.to_owned()));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let mut chain = value.to_string();
        let mut src = value.source();
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        self.0.insert(field.name().to_owned(), Value::String(chain));
    }
}

impl<S> Layer<S> for JsonLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        let mut fields = SpanFields::default();
        attrs.record(&mut Visitor(&mut fields.0));
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(fields);
        }
    }

    fn on_record(&self, id: &span::Id, values: &span::Record<'_>, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id)
            && let Some(fields) = span.extensions_mut().get_mut::<SpanFields>()
        {
            values.record(&mut Visitor(&mut fields.0));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut fields = Map::new();
        event.record(&mut Visitor(&mut fields));
        let message = fields
            .remove("message")
            .unwrap_or(Value::String(String::new()));
        let mut line = BTreeMap::new();
        line.insert(
            "timestamp",
            Value::String(
                humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            ),
        );
        line.insert("level", Value::String(meta.level().to_string()));
        line.insert("service", Value::String(self.service.clone()));
        line.insert("instance", Value::String(self.instance.clone()));
        line.insert("target", Value::String(meta.target().to_owned()));
        line.insert("message", message);
        if let Some(scope) = ctx.event_scope(event) {
            let mut first = true;
            for span in scope {
                if first {
                    line.insert("span", Value::String(span.name().to_owned()));
                    first = false;
                }
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    for (k, v) in &f.0 {
                        if k == "trace_id" {
                            line.entry("trace_id").or_insert_with(|| v.clone());
                        } else {
                            fields.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                }
            }
        }
        if !fields.is_empty() {
            line.insert("fields", Value::Object(fields));
        }
        let Ok(bytes) = serde_json::to_vec(&line) else {
            return;
        };
        if self.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(&bytes);
            let _ = out.write_all(b"\n");
        }
        let target = meta.target();
        if let Some(shipper) = &self.shipper
            && !target.starts_with("rdkafka")
            && !target.starts_with(SELF_TARGET)
        {
            shipper.offer(bytes);
        }
    }
}

/// The installed logging pipeline; call [`Telemetry::shutdown`] before exiting to flush Kafka.
pub struct Telemetry {
    stats: Arc<ShipperStats>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

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
        let stats = Arc::new(ShipperStats::default());
        let stderr_fallback = !settings.log.stdout;
        let stop = Arc::new(AtomicBool::new(false));
        let (shipper, thread) = match &settings.log.kafka_brokers {
            Some(brokers) => {
                let producer: BaseProducer<DeliveryContext> = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .set("client.id", instance)
                    .set("linger.ms", "20")
                    .set(
                        "message.timeout.ms",
                        settings.log.delivery_timeout.as_millis().max(1).to_string(),
                    )
                    .set("queue.buffering.max.messages", "100000")
                    .set("socket.timeout.ms", "3000")
                    .set("reconnect.backoff.max.ms", "1000")
                    .set("log_level", "0")
                    .create_with_context(DeliveryContext {
                        stats: stats.clone(),
                        stderr_fallback,
                    })?;
                let (tx, rx) = mpsc::sync_channel(settings.log.buffer_lines);
                let topic = settings.log_topic();
                let (thread_stats, thread_stop) = (stats.clone(), stop.clone());
                let handle = std::thread::Builder::new()
                    .name("log-shipper".into())
                    .spawn(move || run_shipper(rx, producer, topic, thread_stats, thread_stop))?;
                (
                    Some(Shipper {
                        tx,
                        stats: stats.clone(),
                        stderr_fallback,
                    }),
                    Some(handle),
                )
            }
            None => (None, None),
        };
        let layer = JsonLayer {
            service: settings.service.name.clone(),
            instance: instance.to_owned(),
            stdout: settings.log.stdout,
            shipper,
        };
        let filter =
            EnvFilter::try_new(&settings.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
        let _ = tracing_subscriber::registry()
            .with(filter)
            .with(layer)
            .try_init();
        Ok(Self {
            stats,
            stop,
            thread,
        })
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
        // The global layer keeps its sender for the life of the process, so the thread is told to stop; it
        // drains the queue, flushes the producer (at most 5 s) and exits.
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
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
