//! The platform's connection pool (`db::Pool`) on the real databases: what it saves (no `SET` while calls
//! need about the same statement timeout) and what it must still do without a ping per query (roll back a
//! dropped transaction at once, close a connection the database ended, resynchronise one a call abandoned).

use std::time::Duration;

use keel_common::{
    context::{RequestContext, scope},
    db::{self, Pool, sqlx},
    testsuite,
};
use sqlx::Row;

/// The pool `db::connect` opens on `url`, with `connections` connections and a 10 s request timeout.
async fn pool(url: &str, connections: u32) -> Pool {
    let settings = keel_common::Settings::from_env(
        "echo",
        &keel_common::config::Env::default()
            .with("KEEL_DATABASE__URL", url)
            .with("KEEL_DATABASE__MAX_CONNECTIONS", connections.to_string())
            .with("KEEL_GRPC__REQUEST_TIMEOUT", "10s"),
    )
    .unwrap();
    db::connect(&settings, "echo", &sqlx::migrate::Migrator::DEFAULT)
        .await
        .unwrap()
}

/// The `statement_timeout` a statement of a call with `deadline` runs under.
async fn timeout_in_call(pool: &Pool, deadline: std::time::Instant) -> String {
    let call = RequestContext {
        trace_id: "t".into(),
        deadline: Some(deadline),
    };
    scope(call, async {
        sqlx::query("SELECT current_setting('statement_timeout')")
            .fetch_one(pool)
            .await
            .unwrap()
            .get::<String, _>(0)
    })
    .await
}

#[tokio::test]
async fn a_connection_keeps_its_statement_timeout_while_calls_need_about_the_same() {
    let pg = testsuite::postgres().await;
    let pool = pool(&pg.url, 1).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let first = timeout_in_call(&pool, deadline).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // 100 ms less is left of the same deadline: within the slack, the setting of the first statement is kept.
    let second = timeout_in_call(&pool, deadline).await;
    assert_eq!(
        first, second,
        "no SET for a statement needing about the same"
    );
    // A call with much less time left sets its own.
    let short = timeout_in_call(
        &pool,
        std::time::Instant::now() + Duration::from_millis(500),
    )
    .await;
    let ms: u64 = short.trim_end_matches("ms").parse().unwrap_or(u64::MAX);
    assert!((1..=500).contains(&ms), "a 500 ms call: {short}");
}

#[tokio::test]
async fn a_transaction_dropped_before_its_commit_is_rolled_back_at_once() {
    for d in testsuite::databases().await {
        let pool = pool(&d.url, 2).await;
        sqlx::query("CREATE TABLE counters (k TEXT PRIMARY KEY, v BIGINT NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("INSERT INTO counters VALUES ('a', 0)")
            .execute(&pool)
            .await
            .unwrap();
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("UPDATE counters SET v = 1 WHERE k = 'a'")
            .execute(&mut *tx)
            .await
            .unwrap();
        drop(tx);
        // The row (PostgreSQL) or the database (SQLite) is free again without the dropped transaction's
        // connection being used: another transaction writes it at once.
        let writes = async {
            let mut tx = pool.begin().await?;
            sqlx::query("UPDATE counters SET v = v + 10 WHERE k = 'a'")
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        };
        tokio::time::timeout(Duration::from_secs(3), writes)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{}: the dropped transaction still holds its lock",
                    d.backend
                )
            })
            .unwrap();
        let v: i64 = sqlx::query("SELECT v FROM counters WHERE k = 'a'")
            .fetch_one(&pool)
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, 10, "{}: the dropped update was rolled back", d.backend);
    }
}

#[tokio::test]
async fn a_connection_the_database_ended_is_not_used_again() {
    let pg = testsuite::postgres().await;
    let pool = pool(&pg.url, 1).await;
    let pid = |pool: Pool| async move {
        sqlx::query("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .map(|r| r.get::<i32, _>(0))
    };
    let before = pid(pool.clone()).await.unwrap();
    let mut admin = <sqlx::AnyConnection as sqlx::Connection>::connect(&pg.url)
        .await
        .unwrap();
    let ended: bool = sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(before)
        .fetch_one(&mut admin)
        .await
        .unwrap()
        .get(0);
    assert!(ended);
    // Until the server has ended it (it answers the signal at once, the test does not race it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The one statement that finds it ended fails (UNAVAILABLE to its caller); every one after runs on a
    // new connection.
    let mut failed = 0;
    let mut after = None;
    for _ in 0..5 {
        match pid(pool.clone()).await {
            Ok(p) => after = Some(p),
            Err(_) => failed += 1,
        }
    }
    assert!(
        failed <= 1,
        "{failed} statements failed after the end of their connection"
    );
    assert_ne!(after, Some(before));
    assert!(after.is_some());
}

#[tokio::test]
async fn a_statement_abandoned_midway_leaves_its_connection_usable() {
    let pg = testsuite::postgres().await;
    let pool = pool(&pg.url, 1).await;
    let abandoned = tokio::time::timeout(
        Duration::from_millis(20),
        sqlx::query("SELECT pg_sleep(0.3)").execute(&pool),
    )
    .await;
    assert!(abandoned.is_err(), "the statement was abandoned");
    // The same (only) connection answers the next statement with its own answer.
    let v: i32 = sqlx::query("SELECT 7")
        .fetch_one(&pool)
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 7);
}
