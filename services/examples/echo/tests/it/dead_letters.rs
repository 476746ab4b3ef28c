//! Events that cannot be delivered or applied, on the real Kafka and PostgreSQL: they go to a dead-letter topic
//! (or the outbox's dead-letter table) with the reason, and the events after them flow on.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use keel_common::{
    EventBus,
    events::{HandlerError, dead_letter_topic, headers},
    outbox,
    testsuite::{self, TopicReader, infra_var, unique},
};

fn kafka_bus(max_attempts: u32) -> EventBus {
    EventBus::kafka(
        &infra_var("KEEL_KAFKA_BROKERS"),
        "dead-letter-test",
        Duration::from_secs(5),
        max_attempts,
    )
    .expect("kafka bus")
}

/// The consumer lag gauge: events piling up behind a handler that is stuck count as lag, and the lag drains to
/// 0 once it is unstuck.
#[tokio::test(flavor = "multi_thread")]
async fn consumer_lag_counts_the_events_a_group_has_not_consumed_yet() {
    let topic = unique("lag");
    let bus = kafka_bus(5);
    let (open, gate) = tokio::sync::watch::channel(false);
    let applied = Arc::new(Mutex::new(0usize));
    let count = applied.clone();
    bus.consume(&unique("lag-group"), &[&topic], move |_event| {
        let (mut gate, count) = (gate.clone(), count.clone());
        async move {
            let _ = gate.wait_for(|open| *open).await;
            *count.lock().unwrap() += 1;
            Ok(())
        }
    })
    .unwrap();
    for i in 0..11 {
        testsuite::eventually("kafka takes the event", Duration::from_secs(30), || async {
            bus.publish(&topic, Some("one-key"), format!("e{i}").as_bytes())
                .await
                .ok()
        })
        .await;
    }
    // The first event holds the handler; all of them are behind the group's (absent) committed offset.
    testsuite::eventually(
        "the lag shows the waiting events",
        Duration::from_secs(30),
        || async { (bus.consumer_lag() >= 10).then_some(()) },
    )
    .await;
    assert_eq!(*applied.lock().unwrap(), 0);
    open.send(true).unwrap();
    testsuite::eventually("the lag drains", Duration::from_secs(30), || async {
        (*applied.lock().unwrap() == 11 && bus.consumer_lag() == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_a_consumer_cannot_apply_go_to_the_dead_letter_topic_and_the_rest_flow_on() {
    let brokers = infra_var("KEEL_KAFKA_BROKERS");
    let topic = unique("dlt-consumer");
    let bus = kafka_bus(2);
    let applied = Arc::new(Mutex::new(Vec::new()));
    let sink = applied.clone();
    let group = unique("dlt-group");
    bus.consume(&group, &[&topic], move |event| {
        let result = match &event.payload[..] {
            b"poison" => Err(HandlerError::Failed(anyhow::anyhow!(
                "cannot apply this one"
            ))),
            b"garbage" => Err(HandlerError::Malformed("not a message".into())),
            other => {
                sink.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(other).into_owned());
                Ok(())
            }
        };
        async move { result }
    })
    .unwrap();
    // One key: one partition, so "after" is well defined; the poison must not hold up what follows it.
    for payload in ["a", "poison", "garbage", "b"] {
        testsuite::eventually("kafka takes the event", Duration::from_secs(30), || async {
            bus.publish(&topic, Some("video-1"), payload.as_bytes())
                .await
                .ok()
        })
        .await;
    }
    testsuite::eventually(
        "the good events are applied, in order",
        Duration::from_secs(60),
        || async { (*applied.lock().unwrap() == ["a", "b"]).then_some(()) },
    )
    .await;

    let (letters, _) = TopicReader::new(&brokers, &dead_letter_topic(&topic))
        .records(2, Duration::from_secs(30))
        .await;
    let poison = &letters[0];
    assert_eq!(poison.payload, b"poison");
    assert_eq!(poison.key.as_deref(), Some("video-1"));
    assert_eq!(poison.header(headers::ORIGINAL_TOPIC), Some(topic.as_str()));
    assert_eq!(
        poison.header(headers::ORIGINAL_CONSUMER_GROUP),
        Some(group.as_str())
    );
    assert_eq!(poison.header(headers::ATTEMPTS), Some("2"), "max_attempts");
    assert!(poison.header(headers::ORIGINAL_OFFSET).is_some());
    assert!(
        poison
            .header(headers::EXCEPTION_MESSAGE)
            .is_some_and(|m| m.contains("cannot apply this one")),
        "{poison:?}"
    );
    let garbage = &letters[1];
    assert_eq!(garbage.payload, b"garbage");
    assert_eq!(
        garbage.header(headers::ATTEMPTS),
        Some("1"),
        "malformed: once"
    );
    assert_eq!(bus.dead_letters(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_event_the_broker_refuses_is_kept_in_the_dead_letter_table_and_announced_without_its_payload()
 {
    let brokers = infra_var("KEEL_KAFKA_BROKERS");
    let topic = unique("dlt-outbox");
    let db = testsuite::postgres().await;
    let (pool, _) = testsuite::open(&db, &sqlx::migrate::Migrator::DEFAULT).await;
    // Larger than Kafka's default message.max.bytes (1 MB): refused for good, by the producer already.
    let huge = vec![7u8; 2_000_000];
    let mut conn = pool.acquire().await.unwrap();
    outbox::enqueue(&mut conn, &topic, "video-9", &huge)
        .await
        .unwrap();
    outbox::enqueue(&mut conn, &topic, "video-10", b"small")
        .await
        .unwrap();
    drop(conn);
    let relay = outbox::Outbox::new(pool.clone(), kafka_bus(5));
    testsuite::eventually("the outbox empties", Duration::from_secs(60), || async {
        let _ = relay.relay_once().await;
        (relay.pending().await.unwrap() == 0).then_some(())
    })
    .await;
    assert_eq!(
        relay.dead_letters().await.unwrap(),
        1,
        "the refused event is kept"
    );

    let (published, _) = TopicReader::new(&brokers, &topic)
        .records(1, Duration::from_secs(30))
        .await;
    assert_eq!(
        published[0].payload, b"small",
        "the event after it went out"
    );
    assert_eq!(
        published[0].key.as_deref(),
        Some("video-10"),
        "with the entity id as key"
    );
    let (letters, _) = TopicReader::new(&brokers, &dead_letter_topic(&topic))
        .records(1, Duration::from_secs(30))
        .await;
    let letter = &letters[0];
    assert!(letter.payload.is_empty());
    assert_eq!(letter.key.as_deref(), Some("video-9"));
    assert_eq!(letter.header(headers::PAYLOAD_OMITTED), Some("2000000"));
    assert!(
        letter
            .header(headers::EXCEPTION_MESSAGE)
            .is_some_and(|m| m.contains("too large")),
        "{letter:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn in_process_an_event_a_consumer_dead_letters_moves_to_the_dead_letter_table() {
    let db = testsuite::sqlite().await;
    let (pool, _) = testsuite::open(&db, &sqlx::migrate::Migrator::DEFAULT).await;
    let bus = EventBus::in_process();
    let applied = Arc::new(Mutex::new(Vec::new()));
    let sink = applied.clone();
    bus.consume("reader", &["t"], move |event| {
        let result = if event.payload == b"garbage" {
            Err(HandlerError::Malformed("not a message".into()))
        } else {
            sink.lock().unwrap().push(event.payload.clone());
            Ok(())
        };
        async move { result }
    })
    .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    for payload in [&b"garbage"[..], b"fine"] {
        outbox::enqueue(&mut conn, "t", "k", payload).await.unwrap();
    }
    drop(conn);
    let relay = outbox::Outbox::new(pool.clone(), bus.clone());
    assert_eq!(relay.relay_once().await.unwrap(), 2);
    assert_eq!(relay.pending().await.unwrap(), 0);
    assert_eq!(relay.dead_letters().await.unwrap(), 1);
    assert_eq!(*applied.lock().unwrap(), [b"fine".to_vec()]);
    assert_eq!(bus.dead_letters(), 1);
}
