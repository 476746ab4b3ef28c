//! Log shipping to Kafka: a bounded queue and one thread that owns the producer; never blocks the caller. What
//! cannot be shipped is dropped and counted by reason in [`ShipperStats`].
//!
//! Each message is one JSON line, keyed by the service instance (so one instance's lines stay in order on one
//! partition) with the headers [`HEADER_LEVEL`] and, when the line has one, [`HEADER_TRACE_ID`], so a consumer
//! can filter without parsing (`kcat -C -t logs.<service> -f '%k %h %s\n'`). The topic is the project's, not
//! left to auto-creation: the shipper creates it with `log.topic_partitions` and `log.topic_replication` and
//! sets its `retention.ms` to `log.retention` before it ships the first line (retried while Kafka is away).

use std::{
    io::Write,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use rdkafka::{
    ClientConfig, ClientContext,
    error::KafkaError,
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext},
    types::RDKafkaErrorCode,
};

use rdkafka::{
    admin::{
        AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
    },
    client::DefaultClientContext,
    message::{Header, OwnedHeaders},
};

use super::{LogSettings, ShipperStats, Worker, drain, queue::LineQueue};

/// Header of a shipped line: its level (`TRACE` … `ERROR`).
pub const HEADER_LEVEL: &str = "level";
/// Header of a shipped line: the trace id of the call it belongs to, when it belongs to one.
pub const HEADER_TRACE_ID: &str = "trace_id";

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
    queue: LineQueue,
    stats: Arc<ShipperStats>,
    stderr_fallback: bool,
}

impl Shipper {
    /// Starts the shipper thread, producing to `topic` on `brokers` as client `instance`; lines queue up to
    /// `log.buffer_lines`. [`Worker::stop`] stops it after it has drained its queue and flushed the producer.
    ///
    /// # Errors
    /// The Kafka producer cannot be configured (bad broker list), or the thread cannot start.
    pub(super) fn start(
        settings: &LogSettings,
        brokers: &str,
        topic: String,
        instance: &str,
        stats: Arc<ShipperStats>,
    ) -> anyhow::Result<(Self, Worker)> {
        let stderr_fallback = !settings.stdout;
        let producer: BaseProducer<DeliveryContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("client.id", instance)
            .set("linger.ms", "20")
            .set(
                "message.timeout.ms",
                settings.delivery_timeout.as_millis().max(1).to_string(),
            )
            // Lines waiting for Kafka (during an outage, up to `log.delivery_timeout`) are bounded like the
            // queue in front of it: past `log.buffer_lines`, new ones are dropped and counted.
            .set(
                "queue.buffering.max.messages",
                settings.buffer_lines.to_string(),
            )
            .set("socket.timeout.ms", "3000")
            .set("reconnect.backoff.max.ms", "1000")
            .set("log_level", "0")
            .create_with_context(DeliveryContext {
                stats: stats.clone(),
                stderr_fallback,
            })?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("log_level", "0")
            .create()?;
        let spec = TopicSpec {
            partitions: settings.topic_partitions,
            replication: settings.topic_replication,
            retention_ms: settings.retention.as_millis().to_string(),
        };
        // The lines themselves, copied one after another: nothing allocated per line nor before a line needs
        // it (std's `sync_channel` allocated and touched every slot at once, ~720 KB of an idle process).
        let queue = LineQueue::new(settings.buffer_lines);
        let lines = queue.clone();
        let thread_stats = stats.clone();
        let key = instance.to_owned();
        let worker = Worker::spawn("log-shipper", move |stop| {
            // Lines queue (up to `log.buffer_lines`) while the topic is being made.
            prepare_topic(&admin, &topic, &spec, stop);
            // A librdkafka client of its own (threads, buffers, a connection): not kept past its one job.
            drop(admin);
            drain(
                &lines,
                stop,
                &mut &producer,
                |producer, line, level| produce(producer, &topic, &key, &thread_stats, line, level),
                |producer| {
                    producer.poll(Duration::ZERO);
                },
            );
            finish(&producer, &thread_stats);
        })?;
        Ok((
            Self {
                queue,
                stats,
                stderr_fallback,
            },
            worker,
        ))
    }

    /// Queues a copy of one JSON line (without its newline) at `level`; a full queue drops it (counted, and
    /// on stderr when stdout is off).
    pub(super) fn offer(&self, line: &[u8], level: &'static str) {
        if !self.queue.push(line, level) {
            self.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            if self.stderr_fallback {
                let mut err = std::io::stderr().lock();
                let _ = err.write_all(line);
                let _ = err.write_all(b"\n");
            }
        }
    }
}

/// The log topic's shape, as the project sets it.
struct TopicSpec {
    partitions: i32,
    replication: i32,
    retention_ms: String,
}

/// Creates `topic` per `spec` if missing and sets its retention; retried (1 s apart) until Kafka answers or the
/// shipper is asked to stop.
fn prepare_topic(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
    spec: &TopicSpec,
    stop: &AtomicBool,
) {
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let new = NewTopic::new(
        topic,
        spec.partitions,
        TopicReplication::Fixed(spec.replication),
    )
    .set("retention.ms", &spec.retention_ms);
    let alter =
        AlterConfig::new(ResourceSpecifier::Topic(topic)).set("retention.ms", &spec.retention_ms);
    while !stop.load(Ordering::Acquire) {
        let created = futures::executor::block_on(admin.create_topics([&new], &opts));
        let ok = match created {
            Ok(results) => results.iter().all(|r| match r {
                Ok(_) => true,
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    // Someone made it first (an earlier run, another instance): the retention is still ours.
                    futures::executor::block_on(admin.alter_configs([&alter], &opts))
                        .is_ok_and(|r| r.iter().all(Result::is_ok))
                }
                Err(_) => false,
            }),
            Err(_) => false,
        };
        if ok {
            return;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Hands one line to the producer; a refusal is counted.
fn produce(
    producer: &BaseProducer<DeliveryContext>,
    topic: &str,
    key: &str,
    stats: &ShipperStats,
    line: &[u8],
    level: &str,
) {
    let mut headers = OwnedHeaders::new_with_capacity(2).insert(Header {
        key: HEADER_LEVEL,
        value: Some(level),
    });
    // Read back on this thread, off the logging call's: borrowed from the line unless it was escaped.
    if let Some(id) = super::json::trace_id_value(line) {
        headers = headers.insert(Header {
            key: HEADER_TRACE_ID,
            value: Some(id.as_ref()),
        });
    }
    let record: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic)
        .key(key)
        .payload(line)
        .headers(headers);
    if let Err((e, _)) = producer.send(record) {
        match e {
            KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                stats.producer_full.fetch_add(1, Ordering::Relaxed)
            }
            _ => stats.delivery_failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Flushes the producer as the shipper ends, counting what Kafka did not take.
fn finish(producer: &BaseProducer<DeliveryContext>, stats: &ShipperStats) {
    // Flush on exit: whatever Kafka does not take in time is counted as failed by the delivery callback.
    let _ = producer.flush(Duration::from_secs(5));
    let left = producer.in_flight_count();
    if left > 0 {
        stats
            .delivery_failed
            .fetch_add(left as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_new_lines_and_counts_them() {
        let queue = LineQueue::new(3);
        let stats = Arc::new(ShipperStats::default());
        let shipper = Shipper {
            queue: queue.clone(),
            stats: stats.clone(),
            stderr_fallback: false,
        };
        let line = |n: usize| format!(r#"{{"n":{n}}}"#);
        for n in 0..5 {
            shipper.offer(line(n).as_bytes(), "INFO");
        }
        assert_eq!(stats.queue_full.load(Ordering::Relaxed), 2);
        let mut round = super::super::queue::Lines::default();
        queue.take(&mut round);
        let kept: Vec<(String, &str)> = round
            .iter()
            .map(|(l, level)| (String::from_utf8_lossy(l).into_owned(), level))
            .collect();
        let expected: Vec<(String, &str)> = (0..3).map(|n| (line(n), "INFO")).collect();
        assert_eq!(kept, expected);
        // Room again once the shipper took them.
        shipper.offer(line(5).as_bytes(), "WARN");
        queue.take(&mut round);
        assert_eq!(
            round.iter().collect::<Vec<_>>(),
            [(line(5).as_bytes(), "WARN")]
        );
        assert_eq!(stats.queue_full.load(Ordering::Relaxed), 2);
    }
}
