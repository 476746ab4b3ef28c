//! Domain events: publish raw bytes on a topic, consume them in a consumer group.
//!
//! Two transports behind one [`EventBus`]:
//! - **Kafka** (`events.brokers`, default `kafka.brokers`): one topic per event type, the payload as given (the
//!   KillrVideo events are the raw serialized protobuf message, as the reference services send them), the id of
//!   the entity it is about as the message key, so that the events of one entity land on one partition, in
//!   order. A publish waits for the broker's acknowledgement (`acks=all`) at most `events.delivery_timeout`.
//!   Consumers join the group `Settings::consumer_group` names (the consumer's name, e.g. `search`, behind an
//!   optional `events.group_prefix`), so several instances of a service share
//!   the partitions; offsets are committed only after the handler succeeded (at-least-once delivery).
//! - **In-process**, when no brokers are configured: the embedded default, all services in one process. Each
//!   consumer group subscribed to a topic gets every event once, in publish order, and a publish returns only
//!   once every group has applied the event, so the outbox never lets go of one a consumer had merely queued
//!   (a crash at any moment loses nothing; an event may be applied again after a restart).
//!
//! Handlers must be idempotent: Kafka redelivers after a crash or a rebalance, and the outbox relay
//! ([`crate::outbox`]) publishes at least once.
//!
//! ## When an event cannot be applied: dead letters
//! A handler's error says what retrying can do ([`HandlerError`]): a dependency that is away
//! ([`HandlerError::Unavailable`]) is waited for without limit (backoff 100 ms doubling to 5 s), so an outage
//! never throws events away; an event the handler fails on ([`HandlerError::Failed`]) is tried
//! `events.max_attempts` times; a payload it cannot decode ([`HandlerError::Malformed`]) once. Then the event
//! is *dead-lettered*, logged at error level and counted (gauge `events.dead_letters`), and the events after it
//! flow again instead of waiting behind it forever:
//! - on Kafka, it is produced to the topic's dead-letter topic [`dead_letter_topic`] (`<topic>-dlt`) with its
//!   key and payload and the headers of Spring Kafka's dead-letter publisher ([`headers`]: original topic,
//!   partition, offset, consumer group, error), and only then is its offset committed;
//! - in process, the publish reports [`PublishError::Refused`], and the outbox keeps the event in its
//!   dead-letter table (`keel_outbox_dead`, [`crate::outbox`]).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::BoxFuture;
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{CommitMode, Consumer, StreamConsumer},
    producer::{FutureProducer, FutureRecord},
};
use tokio::sync::{mpsc, oneshot};

use rdkafka::message::{Header, OwnedHeaders};

use crate::config::{Reader, Settings};

/// The dead-letter topic of `topic`: `<topic>-dlt`, Spring Kafka's convention (`DeadLetterPublishingRecoverer`).
pub fn dead_letter_topic(topic: &str) -> String {
    format!("{topic}-dlt")
}

/// Names of the Kafka headers a dead letter carries: those of Spring Kafka's `KafkaHeaders.DLT_*`, so tools
/// that read Spring's dead-letter topics read ours.
pub mod headers {
    /// Topic the event was first published on.
    pub const ORIGINAL_TOPIC: &str = "kafka_dlt-original-topic";
    /// Its partition there (decimal text), absent for an event the broker refused.
    pub const ORIGINAL_PARTITION: &str = "kafka_dlt-original-partition";
    /// Its offset there (decimal text), absent for an event the broker refused.
    pub const ORIGINAL_OFFSET: &str = "kafka_dlt-original-offset";
    /// The consumer group that could not apply it, absent for an event the broker refused.
    pub const ORIGINAL_CONSUMER_GROUP: &str = "kafka_dlt-original-consumer-group";
    /// Why (the handler's or the broker's error, cut like a status message: [`crate::error::bounded`]).
    pub const EXCEPTION_MESSAGE: &str = "kafka_dlt-exception-message";
    /// How many times the handler was tried (decimal text).
    pub const ATTEMPTS: &str = "keel_dlt-attempts";
    /// Set (to the payload's size in bytes) when the payload was too large to travel with the dead letter; the
    /// event itself is then in the producer's `keel_outbox_dead` table.
    pub const PAYLOAD_OMITTED: &str = "keel_dlt-payload-omitted";
}

/// Domain events: Kafka when `kafka.brokers` is set, otherwise an in-process bus.
#[derive(Clone, Debug)]
pub struct EventSettings {
    /// Kafka bootstrap servers for events (`events.brokers`), default `kafka.brokers`. Unset: in-process bus.
    pub brokers: Option<String>,
    /// Namespace of this process's consumer groups (`events.group_prefix`), default none. A consumer's group is
    /// `<prefix>.<consumer>` (or just `<consumer>`, e.g. `search`), so every instance of a service shares the
    /// partitions, and a test or a second environment on the same brokers can keep its own offsets.
    pub group_prefix: Option<String>,
    /// Longest wait for Kafka to acknowledge one event before the outbox retries it (`events.delivery_timeout`).
    pub delivery_timeout: Duration,
    /// How many times a consumer tries an event its handler fails on ([`HandlerError::Failed`]) before it
    /// dead-letters it (`events.max_attempts`, default 5, at least 1).
    pub max_attempts: u32,
}

impl EventSettings {
    /// Reads the `events` section; `events.brokers` defaults to `kafka_brokers` (`kafka.brokers`).
    pub fn read(r: &mut Reader, kafka_brokers: Option<&str>) -> Self {
        let brokers = r
            .opt_string("events.brokers")
            .or_else(|| kafka_brokers.map(str::to_owned));
        r.report(
            "events.brokers",
            brokers
                .clone()
                .unwrap_or_else(|| "(none: in-process bus)".into()),
        );
        Self {
            brokers,
            group_prefix: r.opt_string("events.group_prefix"),
            delivery_timeout: r.duration("events.delivery_timeout", Duration::from_secs(5)),
            max_attempts: r.positive("events.max_attempts", 5u32),
        }
    }
}

/// Why a publish failed; the outbox retries.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// In process: a subscribed group had not applied the event within the wait.
    #[error("in-process consumers did not apply the event on {topic} within {waited:?}")]
    NotApplied {
        /// Topic.
        topic: String,
        /// How long the publish waited.
        waited: Duration,
    },
    /// The event can never be delivered: the broker refused it for good (too large, an invalid record), or an
    /// in-process consumer dead-lettered it. The outbox moves it to its dead-letter table.
    #[error("the event on {topic} was refused: {reason}")]
    Refused {
        /// Topic.
        topic: String,
        /// The broker's or the consumer's reason.
        reason: String,
    },
    /// Kafka did not take the event for now (down, timed out): the outbox retries.
    #[error("kafka did not acknowledge the event on {topic}: {reason}")]
    Kafka {
        /// Topic.
        topic: String,
        /// librdkafka's reason.
        reason: String,
    },
}

/// Why a handler did not process an event, which says what retrying can do (see the module docs).
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The payload cannot be decoded or lacks what the handler needs: dead-lettered at once.
    #[error("malformed event: {0}")]
    Malformed(String),
    /// A dependency is away (the database unreachable, overloaded or shutting down): retried with backoff for
    /// as long as it takes, never dead-lettered.
    #[error("dependency unavailable: {0}")]
    Unavailable(anyhow::Error),
    /// Anything else: retried up to `events.max_attempts` times, then dead-lettered.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

impl From<prost::DecodeError> for HandlerError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Malformed(e.to_string())
    }
}

impl From<sqlx::Error> for HandlerError {
    /// [`HandlerError::Unavailable`] when the database is away ([`crate::db::is_unavailable`]), otherwise
    /// [`HandlerError::Failed`].
    fn from(e: sqlx::Error) -> Self {
        if crate::db::is_unavailable(&e) {
            Self::Unavailable(e.into())
        } else {
            Self::Failed(e.into())
        }
    }
}

/// One event as a handler sees it.
#[derive(Clone, Debug)]
pub struct Event {
    /// Topic it was published on.
    pub topic: String,
    /// The id of the entity it is about (the Kafka message key), when the publisher gave one.
    pub key: Option<String>,
    /// Payload bytes.
    pub payload: Vec<u8>,
}

/// A consumer's handler: called once per event (more than once after a failure or a redelivery).
pub type Handler = Arc<dyn Fn(Event) -> BoxFuture<'static, Result<(), HandlerError>> + Send + Sync>;

/// Publishes and consumes domain events; cheap to clone. See the module docs.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner.transport {
            Transport::Local(_) => f.write_str("EventBus(in-process)"),
            Transport::Kafka { brokers, .. } => write!(f, "EventBus(kafka {brokers})"),
        }
    }
}

/// An in-process delivery: the event, and who to tell once the group has applied it (or why it dead-lettered
/// it).
type Delivery = (Event, oneshot::Sender<Result<(), String>>);

/// In-process subscriptions: by topic, each consumer group's queue.
type LocalSubscriptions = Mutex<HashMap<String, Vec<(String, mpsc::UnboundedSender<Delivery>)>>>;

/// Longest an in-process publish waits for every subscribed group to apply the event before it reports a
/// failure (the outbox keeps the event and retries; handlers are idempotent).
pub const IN_PROCESS_APPLY_TIMEOUT: Duration = Duration::from_secs(10);

struct Inner {
    transport: Transport,
    /// `events.max_attempts`.
    max_attempts: u32,
    /// Events this process's consumers dead-lettered since start.
    dead_letters: std::sync::atomic::AtomicU64,
    /// Each Kafka consumer group's lag, as [`measure_lag`] last saw it.
    lags: Mutex<Vec<Arc<AtomicU64>>>,
}

/// How often a Kafka consumer's lag is measured (one ListOffsets request per assigned partition).
const LAG_PERIOD: Duration = Duration::from_secs(5);

/// A Kafka consumer group's lag in this process: the sum over the partitions assigned to it of the events
/// between its position (the next event it takes; before its first since the assignment, the group's
/// committed offset, else the partition's start, as `auto.offset.reset` is `earliest`) and the partition's end. Blocking (asks the broker for the ends);
/// `None` when the broker does not answer within a second.
fn measure_lag(consumer: &StreamConsumer) -> Option<u64> {
    let timeout = Duration::from_secs(1);
    let positions = consumer.position().ok()?;
    // A partition it has taken nothing from since it was assigned: from the group's committed offset.
    let unstarted = positions
        .elements()
        .iter()
        .any(|p| !matches!(p.offset(), rdkafka::Offset::Offset(_)));
    let committed = if unstarted {
        Some(consumer.committed(timeout).ok()?)
    } else {
        None
    };
    let mut lag = 0i64;
    for p in positions.elements() {
        let (low, high) = consumer
            .fetch_watermarks(p.topic(), p.partition(), timeout)
            .ok()?;
        let from = match p.offset() {
            rdkafka::Offset::Offset(o) => o,
            _ => match committed
                .as_ref()
                .and_then(|c| c.find_partition(p.topic(), p.partition()))
                .map(|c| c.offset())
            {
                Some(rdkafka::Offset::Offset(o)) => o,
                _ => low.max(0),
            },
        };
        lag += (high - from).max(0);
    }
    Some(lag as u64)
}

enum Transport {
    Local(LocalSubscriptions),
    Kafka {
        brokers: String,
        producer: LazyProducer,
        delivery_timeout: Duration,
    },
}

/// The bus's Kafka producer, made at its first event: a librdkafka client costs a process threads, buffers, a
/// connection and ~2 MB of memory, which a service that never publishes (echo, search, a consumer that
/// dead-letters nothing) should not pay.
struct LazyProducer {
    config: ClientConfig,
    made: std::sync::OnceLock<FutureProducer>,
}

impl LazyProducer {
    /// The producer, made now if this is the first event.
    fn get(&self) -> Result<&FutureProducer, rdkafka::error::KafkaError> {
        if let Some(p) = self.made.get() {
            return Ok(p);
        }
        let made: FutureProducer = self.config.create()?;
        // Two first events at once may both make one: the one kept is the first set, the other is dropped.
        Ok(self.made.get_or_init(|| made))
    }
}

impl EventBus {
    /// Kafka when `events.brokers` is set, otherwise in-process.
    ///
    /// # Errors
    /// The Kafka producer cannot be configured.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let events = &settings.events;
        match &events.brokers {
            None => Ok(Self::in_process_with(events.max_attempts)),
            Some(brokers) => Self::kafka(
                brokers,
                &format!("{}-events", settings.service.name),
                events.delivery_timeout,
                events.max_attempts,
            ),
        }
    }

    /// A bus on the Kafka cluster `brokers` (bootstrap servers), as client `client_id`; a publish waits at most
    /// `delivery_timeout`, a failing event is tried `max_attempts` times.
    ///
    /// # Errors
    /// The producer cannot be configured.
    pub fn kafka(
        brokers: &str,
        client_id: &str,
        delivery_timeout: Duration,
        max_attempts: u32,
    ) -> anyhow::Result<Self> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("client.id", client_id)
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set(
                "message.timeout.ms",
                delivery_timeout.as_millis().to_string(),
            )
            .set("socket.timeout.ms", "3000")
            .set("reconnect.backoff.max.ms", "1000")
            .set("log_level", "3");
        // Checked now (a setting librdkafka refuses fails the start), made at the first event.
        drop(config.create::<FutureProducer>()?);
        Ok(Self::with(
            Transport::Kafka {
                brokers: brokers.to_owned(),
                producer: LazyProducer {
                    config,
                    made: std::sync::OnceLock::new(),
                },
                delivery_timeout,
            },
            max_attempts,
        ))
    }

    /// An in-process bus (the embedded default, and unit tests); a failing event is tried 5 times.
    pub fn in_process() -> Self {
        Self::in_process_with(5)
    }

    fn in_process_with(max_attempts: u32) -> Self {
        Self::with(Transport::Local(Mutex::default()), max_attempts)
    }

    fn with(transport: Transport, max_attempts: u32) -> Self {
        Self {
            inner: Arc::new(Inner {
                transport,
                max_attempts: max_attempts.max(1),
                dead_letters: Default::default(),
                lags: Default::default(),
            }),
        }
    }

    /// Events this process's consumers dead-lettered since it started (the gauge `events.dead_letters`).
    pub fn dead_letters(&self) -> u64 {
        self.inner
            .dead_letters
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Events not yet consumed by this process's Kafka consumer groups, summed (the gauge
    /// `events.consumer_lag`; 0 in process, where a publish returns only once every group applied the event).
    pub fn consumer_lag(&self) -> u64 {
        self.inner
            .lags
            .lock()
            .expect("event bus")
            .iter()
            .map(|l| l.load(Ordering::Relaxed))
            .sum()
    }

    /// Publishes `payload` on `topic` with `key` (the id of the entity it is about; Kafka's message key);
    /// returns once Kafka acknowledged it (or, in-process, once every subscribed group has applied it).
    ///
    /// # Errors
    /// [`PublishError::Refused`]: never deliverable (the broker refuses it for good, or an in-process group
    /// dead-lettered it). [`PublishError::Kafka`]: Kafka did not acknowledge within `events.delivery_timeout`;
    /// [`PublishError::NotApplied`]: in process, a group had not applied it within [`IN_PROCESS_APPLY_TIMEOUT`].
    pub async fn publish(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
    ) -> Result<(), PublishError> {
        match &self.inner.transport {
            Transport::Local(subs) => {
                let applied: Vec<oneshot::Receiver<Result<(), String>>> = {
                    let subs = subs.lock().expect("event bus");
                    subs.get(topic)
                        .into_iter()
                        .flatten()
                        .filter_map(|(_, tx)| {
                            let (done, applied) = oneshot::channel();
                            let event = Event {
                                topic: topic.to_owned(),
                                key: key.map(str::to_owned),
                                payload: payload.to_vec(),
                            };
                            // A closed receiver is a consumer that stopped with the process: nothing to wait for.
                            tx.send((event, done)).ok().map(|()| applied)
                        })
                        .collect()
                };
                // Acknowledged only once every group applied it (or dead-lettered it): the outbox deletes the
                // event after this, so a crash never loses one that a consumer had only queued.
                let all = futures::future::join_all(applied);
                let outcomes = tokio::time::timeout(IN_PROCESS_APPLY_TIMEOUT, all)
                    .await
                    .map_err(|_| PublishError::NotApplied {
                        topic: topic.to_owned(),
                        waited: IN_PROCESS_APPLY_TIMEOUT,
                    })?;
                let refusals: Vec<String> =
                    outcomes.into_iter().filter_map(|o| o.ok()?.err()).collect();
                if refusals.is_empty() {
                    Ok(())
                } else {
                    Err(PublishError::Refused {
                        topic: topic.to_owned(),
                        reason: refusals.join("; "),
                    })
                }
            }
            Transport::Kafka {
                producer,
                delivery_timeout,
                ..
            } => {
                let producer = producer.get().map_err(|e| kafka_publish_error(topic, &e))?;
                let mut record = FutureRecord::<str, [u8]>::to(topic).payload(payload);
                if let Some(key) = key {
                    record = record.key(key);
                }
                producer
                    .send(record, *delivery_timeout)
                    .await
                    .map(drop)
                    .map_err(|(e, _)| kafka_publish_error(topic, &e))
            }
        }
    }

    /// Produces a dead letter for an event of `topic` that can never be delivered or applied: to
    /// [`dead_letter_topic`] with `key`, `payload` and `headers` (plus [`headers::ORIGINAL_TOPIC`]). A payload
    /// the broker refuses as too large goes without it ([`headers::PAYLOAD_OMITTED`]). On the in-process bus
    /// there is no dead-letter topic: nothing is produced (the outbox's table keeps the event).
    ///
    /// # Errors
    /// Kafka did not acknowledge the dead letter.
    pub async fn dead_letter(
        &self,
        topic: &str,
        key: Option<&str>,
        payload: &[u8],
        headers: &[(&str, String)],
    ) -> Result<(), PublishError> {
        let Transport::Kafka {
            producer,
            delivery_timeout,
            ..
        } = &self.inner.transport
        else {
            return Ok(());
        };
        let dlt = dead_letter_topic(topic);
        let producer = producer.get().map_err(|e| kafka_publish_error(&dlt, &e))?;
        let mut all: Vec<(&str, &str)> = vec![(headers::ORIGINAL_TOPIC, topic)];
        all.extend(headers.iter().map(|(k, v)| (*k, v.as_str())));
        let size = payload.len().to_string();
        let sent = producer
            .send(dlt_record(&dlt, key, payload, &all), *delivery_timeout)
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err((e, _)) if is_too_large(&e) => {
                all.push((headers::PAYLOAD_OMITTED, &size));
                producer
                    .send(dlt_record(&dlt, key, &[], &all), *delivery_timeout)
                    .await
                    .map(drop)
                    .map_err(|(e, _)| kafka_publish_error(&dlt, &e))
            }
            Err((e, _)) => Err(kafka_publish_error(&dlt, &e)),
        }
    }

    /// [`Self::subscribe`] with an async closure as the handler.
    ///
    /// # Errors
    /// As [`Self::subscribe`].
    pub fn consume<F, Fut>(&self, group: &str, topics: &[&str], handler: F) -> anyhow::Result<()>
    where
        F: Fn(Event) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        self.subscribe(group, topics, Arc::new(move |e| Box::pin(handler(e))))
    }

    /// Consumes `topics` as consumer group `group`, calling `handler` for every event, until the process ends;
    /// an event the handler cannot apply is dead-lettered (module docs). Topics are created if missing (a
    /// missing topic is not an error).
    ///
    /// # Errors
    /// The Kafka consumer cannot be configured.
    pub fn subscribe(&self, group: &str, topics: &[&str], handler: Handler) -> anyhow::Result<()> {
        match &self.inner.transport {
            Transport::Local(subs) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let mut subs = subs.lock().expect("event bus");
                for t in topics {
                    subs.entry((*t).to_owned())
                        .or_default()
                        .push((group.to_owned(), tx.clone()));
                }
                let group = group.to_owned();
                let bus = self.clone();
                tokio::spawn(async move {
                    while let Some((event, applied)) = rx.recv().await {
                        let outcome = match bus.apply(&group, &handler, &event).await {
                            Ok(()) => Ok(()),
                            Err(failure) => {
                                bus.count_dead_letter(&group, &event.topic, &failure);
                                Err(format!(
                                    "consumer group {group} dead-lettered it after {} attempt(s): {}",
                                    failure.attempts, failure.error
                                ))
                            }
                        };
                        let _ = applied.send(outcome);
                    }
                });
                Ok(())
            }
            Transport::Kafka { brokers, .. } => {
                let lag = Arc::new(AtomicU64::new(0));
                self.inner.lags.lock().expect("event bus").push(lag.clone());
                let consumer: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .set("group.id", group)
                    .set("enable.auto.commit", "false")
                    .set("auto.offset.reset", "earliest")
                    .set("session.timeout.ms", "10000")
                    .set("socket.timeout.ms", "3000")
                    .set("reconnect.backoff.max.ms", "1000")
                    .set("topic.metadata.refresh.interval.ms", "2000")
                    .set("log_level", "3")
                    .create()?;
                consumer.subscribe(topics)?;
                let consumer = Arc::new(consumer);
                let measured = Arc::downgrade(&consumer);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(LAG_PERIOD);
                    loop {
                        tick.tick().await;
                        let Some(c) = measured.upgrade() else { break };
                        if let Ok(Some(l)) =
                            tokio::task::spawn_blocking(move || measure_lag(&c)).await
                        {
                            lag.store(l, Ordering::Relaxed);
                        }
                    }
                });
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()?;
                let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
                let group = group.to_owned();
                let bus = self.clone();
                tokio::spawn(async move {
                    ensure_topics(&admin, &topics).await;
                    // A librdkafka client of its own: not kept for the life of the consumer.
                    drop(admin);
                    bus.consume_kafka(consumer, group, handler).await;
                });
                Ok(())
            }
        }
    }

    async fn consume_kafka(&self, consumer: Arc<StreamConsumer>, group: String, handler: Handler) {
        loop {
            match consumer.recv().await {
                Ok(msg) => {
                    let event = Event {
                        topic: msg.topic().to_owned(),
                        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: msg.payload().unwrap_or_default().to_vec(),
                    };
                    if let Err(failure) = self.apply(&group, &handler, &event).await {
                        self.count_dead_letter(&group, &event.topic, &failure);
                        let headers = [
                            (headers::ORIGINAL_PARTITION, msg.partition().to_string()),
                            (headers::ORIGINAL_OFFSET, msg.offset().to_string()),
                            (headers::ORIGINAL_CONSUMER_GROUP, group.clone()),
                            (
                                headers::EXCEPTION_MESSAGE,
                                crate::error::bounded(&failure.error),
                            ),
                            (headers::ATTEMPTS, failure.attempts.to_string()),
                        ];
                        // The offset is committed only once the dead letter is safely on its topic.
                        let mut wait = Duration::from_millis(100);
                        while let Err(e) = self
                            .dead_letter(
                                &event.topic,
                                event.key.as_deref(),
                                &event.payload,
                                &headers,
                            )
                            .await
                        {
                            tracing::warn!(group, error = %e, retry_in = ?wait, "dead letter not produced yet");
                            tokio::time::sleep(wait).await;
                            wait = (wait * 2).min(Duration::from_secs(5));
                        }
                    }
                    if let Err(e) = consumer.commit_message(&msg, CommitMode::Async) {
                        tracing::warn!(error = %e, "offset commit failed; the event may be redelivered");
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "kafka consumer error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Runs `handler` on `event` until it succeeds (backoff 100 ms doubling to 5 s): without limit while a
    /// dependency is unavailable, `max_attempts` times when it fails, once when the event is malformed.
    async fn apply(&self, group: &str, handler: &Handler, event: &Event) -> Result<(), Failure> {
        let mut wait = Duration::from_millis(100);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let error = match handler(event.clone()).await {
                Ok(()) => return Ok(()),
                Err(HandlerError::Malformed(why)) => {
                    return Err(Failure {
                        attempts,
                        error: format!("malformed event: {why}"),
                    });
                }
                Err(HandlerError::Unavailable(e)) => {
                    // Waiting for a dependency is not an attempt at the event.
                    attempts -= 1;
                    e
                }
                Err(HandlerError::Failed(e)) if attempts >= self.inner.max_attempts => {
                    return Err(Failure {
                        attempts,
                        error: format!("{e:#}"),
                    });
                }
                Err(HandlerError::Failed(e)) => e,
            };
            tracing::warn!(group, topic = %event.topic, error = %error, attempts, retry_in = ?wait, "event handler failed");
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_secs(5));
        }
    }

    fn count_dead_letter(&self, group: &str, topic: &str, failure: &Failure) {
        self.inner
            .dead_letters
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::error!(group, topic, attempts = failure.attempts, error = %failure.error, "event dead-lettered");
    }
}

/// A record for dead-letter topic `dlt`.
fn dlt_record<'r>(
    dlt: &'r str,
    key: Option<&'r str>,
    payload: &'r [u8],
    headers: &[(&str, &str)],
) -> FutureRecord<'r, str, [u8]> {
    let h = headers.iter().fold(OwnedHeaders::new(), |h, (k, v)| {
        h.insert(Header {
            key: k,
            value: Some(*v),
        })
    });
    let r = FutureRecord::to(dlt).payload(payload).headers(h);
    match key {
        Some(key) => r.key(key),
        None => r,
    }
}

/// Why a consumer gave an event up.
struct Failure {
    attempts: u32,
    error: String,
}

/// Whether Kafka refused a record for its size.
fn is_too_large(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode as C;
    matches!(
        e.rdkafka_error_code(),
        Some(C::MessageSizeTooLarge | C::InvalidMessageSize | C::MessageBatchTooLarge)
    )
}

/// [`PublishError::Refused`] for what no retry can change (a record too large or invalid, a topic name Kafka
/// does not accept), [`PublishError::Kafka`] for the rest.
fn kafka_publish_error(topic: &str, e: &rdkafka::error::KafkaError) -> PublishError {
    use rdkafka::types::RDKafkaErrorCode as C;
    let permanent = is_too_large(e)
        || matches!(
            e.rdkafka_error_code(),
            Some(C::InvalidRecord | C::InvalidMessage | C::InvalidTopic)
        );
    if permanent {
        PublishError::Refused {
            topic: topic.to_owned(),
            reason: e.to_string(),
        }
    } else {
        PublishError::Kafka {
            topic: topic.to_owned(),
            reason: e.to_string(),
        }
    }
}

/// Partitions of a topic this platform creates: several instances of a consumer group share them.
pub const TOPIC_PARTITIONS: i32 = 3;

/// Creates missing topics ([`TOPIC_PARTITIONS`] partitions, replication 1: a single-broker default; create them
/// beforehand for a real cluster); retried until Kafka answers, since consumers may start before Kafka is up.
async fn ensure_topics(admin: &AdminClient<DefaultClientContext>, topics: &[String]) {
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| NewTopic::new(t, TOPIC_PARTITIONS, TopicReplication::Fixed(1)))
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(5)));
    let mut wait = Duration::from_millis(200);
    loop {
        match admin.create_topics(&new, &opts).await {
            Ok(results) => {
                for r in results {
                    if let Err((topic, code)) = r
                        && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
                    {
                        tracing::warn!(topic, error = %code, "could not create topic");
                    }
                }
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "kafka unreachable; creating topics later");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_process_bus_delivers_to_each_group_once_in_order_and_retries_failures() {
        let bus = EventBus::in_process();
        type Seen = Arc<Mutex<Vec<(String, Vec<u8>)>>>;
        let seen: Seen = Arc::default();
        let failures_left = Arc::new(Mutex::new(1));
        for group in ["search", "suggested-videos"] {
            let seen = seen.clone();
            let failures_left = failures_left.clone();
            let group_name = group.to_owned();
            bus.subscribe(
                group,
                &["t1"],
                Arc::new(move |e: Event| {
                    let seen = seen.clone();
                    let failures_left = failures_left.clone();
                    let g = group_name.clone();
                    Box::pin(async move {
                        {
                            let mut f = failures_left.lock().unwrap();
                            if *f > 0 {
                                *f -= 1;
                                return Err(HandlerError::Failed(anyhow::anyhow!("deadlock")));
                            }
                        }
                        seen.lock().unwrap().push((g, e.payload));
                        Ok(())
                    })
                }),
            )
            .unwrap();
        }
        bus.publish("t1", Some("k"), b"a").await.unwrap();
        bus.publish("t1", None, b"b").await.unwrap();
        bus.publish("other", None, b"x").await.unwrap();
        for _ in 0..100 {
            if seen.lock().unwrap().len() == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{seen:?}");
        for g in ["search", "suggested-videos"] {
            let mine: Vec<_> = seen
                .iter()
                .filter(|(n, _)| n == g)
                .map(|(_, p)| p.clone())
                .collect();
            assert_eq!(mine, vec![b"a".to_vec(), b"b".to_vec()], "group {g}");
        }
    }

    /// A bus with one group on `t` whose handler answers `outcome(attempt)`; returns the bus and the attempts.
    fn one_group(
        max_attempts: u32,
        outcome: fn(u32) -> Result<(), HandlerError>,
    ) -> (EventBus, Arc<Mutex<u32>>) {
        let bus = EventBus::in_process_with(max_attempts);
        let attempts = Arc::new(Mutex::new(0));
        let counter = attempts.clone();
        bus.consume("g", &["t"], move |_| {
            let n = {
                let mut n = counter.lock().unwrap();
                *n += 1;
                *n
            };
            async move { outcome(n) }
        })
        .unwrap();
        (bus, attempts)
    }

    #[tokio::test]
    async fn an_event_a_handler_keeps_failing_on_is_dead_lettered_after_max_attempts() {
        let (bus, attempts) = one_group(3, |_| {
            Err(HandlerError::Failed(anyhow::anyhow!("constraint")))
        });
        let err = bus.publish("t", Some("v1"), b"a").await.unwrap_err();
        assert!(
            matches!(&err, PublishError::Refused { reason, .. } if reason.contains("group g") && reason.contains("3 attempt") && reason.contains("constraint")),
            "{err}"
        );
        assert_eq!(*attempts.lock().unwrap(), 3);
        assert_eq!(bus.dead_letters(), 1);
    }

    #[tokio::test]
    async fn a_malformed_event_is_dead_lettered_at_once() {
        let (bus, attempts) = one_group(5, |_| Err(HandlerError::Malformed("not protobuf".into())));
        let err = bus.publish("t", None, b"\xff").await.unwrap_err();
        assert!(
            matches!(&err, PublishError::Refused { reason, .. } if reason.contains("not protobuf")),
            "{err}"
        );
        assert_eq!(*attempts.lock().unwrap(), 1);
        assert_eq!(bus.dead_letters(), 1);
    }

    #[tokio::test]
    async fn waiting_for_an_unavailable_dependency_is_not_an_attempt() {
        // One attempt allowed, yet three answers of "unavailable" do not use it up: the event is applied.
        let (bus, attempts) = one_group(1, |n| {
            if n <= 3 {
                Err(HandlerError::Unavailable(anyhow::anyhow!("database down")))
            } else {
                Ok(())
            }
        });
        bus.publish("t", None, b"a").await.unwrap();
        assert_eq!(*attempts.lock().unwrap(), 4);
        assert_eq!(bus.dead_letters(), 0);
    }

    #[test]
    fn database_errors_say_whether_to_wait_or_to_count_an_attempt() {
        assert!(matches!(
            HandlerError::from(sqlx::Error::PoolTimedOut),
            HandlerError::Unavailable(_)
        ));
        assert!(matches!(
            HandlerError::from(sqlx::Error::RowNotFound),
            HandlerError::Failed(_)
        ));
    }

    #[test]
    fn dead_letter_topics_follow_spring_kafka() {
        assert_eq!(
            dead_letter_topic("topic-kv-videoCreation"),
            "topic-kv-videoCreation-dlt"
        );
    }
}
