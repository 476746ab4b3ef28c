//! The transactional outbox of `crates/common` on the real PostgreSQL, shared by two instances of a service:
//! their relays run at the same time, yet every event is published exactly once and in order.

use std::sync::{Arc, Mutex};

use keel_common::{EventBus, outbox, testsuite};

#[tokio::test(flavor = "multi_thread")]
async fn instances_sharing_a_database_publish_each_event_once_in_order() {
    let db = testsuite::postgres().await;
    let (pool, _) = testsuite::open(&db, &sqlx::migrate::Migrator::DEFAULT).await;
    let mut conn = pool.acquire().await.unwrap();
    for i in 0..300u32 {
        outbox::enqueue(&mut conn, "outbox-test", "k", &i.to_be_bytes())
            .await
            .unwrap();
    }
    drop(conn);

    let bus = EventBus::in_process();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    bus.consume("outbox-test-consumer", &["outbox-test"], move |event| {
        sink.lock()
            .unwrap()
            .push(u32::from_be_bytes(event.payload[..].try_into().unwrap()));
        async { Ok(()) }
    })
    .unwrap();
    // Two instances: two pools on the one database, one relay each, racing batch after batch.
    let (second, _) = testsuite::open(&db, &sqlx::migrate::Migrator::DEFAULT).await;
    let relays = [
        outbox::Outbox::new(pool.clone(), bus.clone()),
        outbox::Outbox::new(second, bus.clone()),
    ];
    loop {
        let (a, b) = tokio::join!(relays[0].relay_once(), relays[1].relay_once());
        a.unwrap();
        b.unwrap();
        if relays[0].pending().await.unwrap() == 0 {
            break;
        }
    }
    let want: Vec<u32> = (0..300).collect();
    for _ in 0..100 {
        if seen.lock().unwrap().len() >= want.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(*seen.lock().unwrap(), want, "each event once, oldest first");
}
