//! Log shipping to Kafka: a bounded queue and one thread that owns the producer; never blocks the caller. What
//! cannot be shipped is dropped and counted by reason in [`ShipperStats`].

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
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

use super::{LogSettings, ShipperStats};

pub(super) struct DeliveryContext {
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
pub(super) struct Shipper {
    tx: SyncSender<Vec<u8>>,
    stats: Arc<ShipperStats>,
    stderr_fallback: bool,
}

impl Shipper {
    /// Starts the shipper thread, producing to `topic` on `brokers` as client `instance`; lines queue up to
    /// `log.buffer_lines`. Stops (after draining and flushing) once `stop` is set.
    ///
    /// # Errors
    /// The Kafka producer cannot be configured (bad broker list), or the thread cannot start.
    pub(super) fn start(
        settings: &LogSettings,
        brokers: &str,
        topic: String,
        instance: &str,
        stats: Arc<ShipperStats>,
        stop: Arc<AtomicBool>,
    ) -> anyhow::Result<(Self, JoinHandle<()>)> {
        let stderr_fallback = !settings.stdout;
        let producer: BaseProducer<DeliveryContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", instance)
            .set("linger.ms", "20")
            .set(
                "message.timeout.ms",
                settings.delivery_timeout.as_millis().max(1).to_string(),
            )
            .set("queue.buffering.max.messages", "100000")
            .set("socket.timeout.ms", "3000")
            .set("reconnect.backoff.max.ms", "1000")
            .set("log_level", "0")
            .create_with_context(DeliveryContext {
                stats: stats.clone(),
                stderr_fallback,
            })?;
        let (tx, rx) = mpsc::sync_channel(settings.buffer_lines);
        let thread_stats = stats.clone();
        let handle = std::thread::Builder::new()
            .name("log-shipper".into())
            .spawn(move || run_shipper(rx, producer, topic, thread_stats, stop))?;
        Ok((
            Self {
                tx,
                stats,
                stderr_fallback,
            },
            handle,
        ))
    }

    /// Queues one line; a full queue drops it (counted, and on stderr when stdout is off).
    pub(super) fn offer(&self, line: Vec<u8>) {
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
