//! Domain events: publish raw bytes on a topic, consume them in a consumer group.
//!
//! Two transports behind one [`EventBus`]:
//! - **Kafka** (`events.brokers`, default `kafka.brokers`): one topic per event type, the payload as given (the
//!   KillrVideo events are the raw serialized protobuf message, no key, as the reference services send them).
//!   A publish waits for the broker's acknowledgement (`acks=all`) at most `events.delivery_timeout`.
//!   Consumers join the group `Settings::consumer_group` names (the consumer's name, e.g. `search`, behind an
//!   optional `events.group_prefix`), so several instances of a service share
//!   the partitions; offsets are committed only after the handler succeeded (at-least-once delivery).
//! - **In-process**, when no brokers are configured: the embedded default, all services in one process. Each
//!   consumer group subscribed to a topic gets every event once, in publish order, and a publish returns only
//!   once every group has applied the event, so the outbox never lets go of one a consumer had merely queued
//!   (a crash at any moment loses nothing; an event may be applied again after a restart).
//!
//! Handlers must be idempotent: Kafka redelivers after a crash or a rebalance, and the outbox relay
//! ([`crate::outbox`]) publishes at least once. A handler error is retried with backoff (the event is never
//! skipped), except [`HandlerError::Malformed`], which is logged and skipped.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
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

use crate::config::{Reader, Settings};

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
    /// Kafka did not take the event (down, timed out, topic refused).
    #[error("kafka did not acknowledge the event on {topic}: {reason}")]
    Kafka {
        /// Topic.
        topic: String,
        /// librdkafka's reason.
        reason: String,
    },
}

/// Why a handler did not process an event.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// The payload cannot be decoded: logged and skipped (retrying cannot help).
    #[error("malformed event: {0}")]
    Malformed(String),
    /// Anything else (database down, say): retried with backoff until it succeeds.
    #[error(transparent)]
    Transient(#[from] anyhow::Error),
}

impl From<prost::DecodeError> for HandlerError {
    fn from(e: prost::DecodeError) -> Self {
        Self::Malformed(e.to_string())
    }
}

impl From<sqlx::Error> for HandlerError {
    fn from(e: sqlx::Error) -> Self {
        Self::Transient(e.into())
    }
}

/// One event as a handler sees it.
#[derive(Clone, Debug)]
pub struct Event {
    /// Topic it was published on.
    pub topic: String,
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
        match &*self.inner {
            Inner::Local(_) => f.write_str("EventBus(in-process)"),
            Inner::Kafka { brokers, .. } => write!(f, "EventBus(kafka {brokers})"),
        }
    }
}

/// An in-process delivery: the event, and who to tell once the group has applied it.
type Delivery = (Event, oneshot::Sender<()>);

/// In-process subscriptions: by topic, each consumer group's queue.
type LocalSubscriptions = Mutex<HashMap<String, Vec<(String, mpsc::UnboundedSender<Delivery>)>>>;

/// Longest an in-process publish waits for every subscribed group to apply the event before it reports a
/// failure (the outbox keeps the event and retries; handlers are idempotent).
pub const IN_PROCESS_APPLY_TIMEOUT: Duration = Duration::from_secs(10);

enum Inner {
    Local(LocalSubscriptions),
    Kafka {
        brokers: String,
        producer: FutureProducer,
        delivery_timeout: Duration,
    },
}

impl EventBus {
    /// Kafka when `events.brokers` is set, otherwise in-process.
    ///
    /// # Errors
    /// The Kafka producer cannot be configured.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        match &settings.events.brokers {
            None => Ok(Self::in_process()),
            Some(brokers) => {
                let producer: FutureProducer = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .set("client.id", format!("{}-events", settings.service.name))
                    .set("acks", "all")
                    .set("enable.idempotence", "true")
                    .set(
                        "message.timeout.ms",
                        settings.events.delivery_timeout.as_millis().to_string(),
                    )
                    .set("socket.timeout.ms", "3000")
                    .set("reconnect.backoff.max.ms", "1000")
                    .set("log_level", "3")
                    .create()?;
                Ok(Self {
                    inner: Arc::new(Inner::Kafka {
                        brokers: brokers.clone(),
                        producer,
                        delivery_timeout: settings.events.delivery_timeout,
                    }),
                })
            }
        }
    }

    /// An in-process bus (the embedded default, and unit tests).
    pub fn in_process() -> Self {
        Self {
            inner: Arc::new(Inner::Local(Mutex::default())),
        }
    }

    /// Publishes `payload` on `topic` (no key); returns once Kafka acknowledged it (or, in-process, once every
    /// subscribed group has applied it).
    ///
    /// # Errors
    /// Kafka did not acknowledge within `events.delivery_timeout`; in process, a group had not applied it
    /// within [`IN_PROCESS_APPLY_TIMEOUT`].
    pub async fn publish(&self, topic: &str, payload: &[u8]) -> Result<(), PublishError> {
        match &*self.inner {
            Inner::Local(subs) => {
                let applied: Vec<oneshot::Receiver<()>> = {
                    let subs = subs.lock().expect("event bus");
                    subs.get(topic)
                        .into_iter()
                        .flatten()
                        .filter_map(|(_, tx)| {
                            let (done, applied) = oneshot::channel();
                            let event = Event {
                                topic: topic.to_owned(),
                                payload: payload.to_vec(),
                            };
                            // A closed receiver is a consumer that stopped with the process: nothing to wait for.
                            tx.send((event, done)).ok().map(|()| applied)
                        })
                        .collect()
                };
                // Acknowledged only once every group applied it (or skipped it as malformed): the outbox
                // deletes the event after this, so a crash never loses one that a consumer had only queued.
                let all = futures::future::join_all(applied);
                match tokio::time::timeout(IN_PROCESS_APPLY_TIMEOUT, all).await {
                    Ok(_) => Ok(()),
                    Err(_) => Err(PublishError::NotApplied {
                        topic: topic.to_owned(),
                        waited: IN_PROCESS_APPLY_TIMEOUT,
                    }),
                }
            }
            Inner::Kafka {
                producer,
                delivery_timeout,
                ..
            } => producer
                .send(
                    FutureRecord::<(), [u8]>::to(topic).payload(payload),
                    *delivery_timeout,
                )
                .await
                .map(drop)
                .map_err(|(e, _)| PublishError::Kafka {
                    topic: topic.to_owned(),
                    reason: e.to_string(),
                }),
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

    /// Consumes `topics` as consumer group `group`, calling `handler` for every event, until the process ends.
    /// Topics are created if missing (a missing topic is not an error).
    ///
    /// # Errors
    /// The Kafka consumer cannot be configured.
    pub fn subscribe(&self, group: &str, topics: &[&str], handler: Handler) -> anyhow::Result<()> {
        match &*self.inner {
            Inner::Local(subs) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let mut subs = subs.lock().expect("event bus");
                for t in topics {
                    subs.entry((*t).to_owned())
                        .or_default()
                        .push((group.to_owned(), tx.clone()));
                }
                let group = group.to_owned();
                tokio::spawn(async move {
                    while let Some((event, applied)) = rx.recv().await {
                        handle_until_done(&group, &handler, event).await;
                        let _ = applied.send(());
                    }
                });
                Ok(())
            }
            Inner::Kafka { brokers, .. } => {
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
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", brokers)
                    .create()?;
                let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
                let group = group.to_owned();
                tokio::spawn(async move {
                    ensure_topics(&admin, &topics).await;
                    consume(consumer, group, handler).await;
                });
                Ok(())
            }
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

async fn consume(consumer: StreamConsumer, group: String, handler: Handler) {
    loop {
        match consumer.recv().await {
            Ok(msg) => {
                let event = Event {
                    topic: msg.topic().to_owned(),
                    payload: msg.payload().unwrap_or_default().to_vec(),
                };
                handle_until_done(&group, &handler, event).await;
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

/// Runs `handler` until it succeeds (backoff 100 ms doubling to 5 s), or skips a malformed event.
async fn handle_until_done(group: &str, handler: &Handler, event: Event) {
    let mut wait = Duration::from_millis(100);
    loop {
        match handler(event.clone()).await {
            Ok(()) => return,
            Err(HandlerError::Malformed(why)) => {
                tracing::error!(group, topic = %event.topic, error = %why, "malformed event skipped");
                return;
            }
            Err(HandlerError::Transient(e)) => {
                tracing::warn!(group, topic = %event.topic, error = %e, retry_in = ?wait, "event handler failed");
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
                                return Err(HandlerError::Transient(anyhow::anyhow!("db down")));
                            }
                        }
                        seen.lock().unwrap().push((g, e.payload));
                        Ok(())
                    })
                }),
            )
            .unwrap();
        }
        bus.publish("t1", b"a").await.unwrap();
        bus.publish("t1", b"b").await.unwrap();
        bus.publish("other", b"x").await.unwrap();
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
}
