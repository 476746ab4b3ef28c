//! Database errors reach callers by what they mean, on the real PostgreSQL: the database being unavailable
//! (its SQLSTATE says overloaded, shutting down, or a statement timed out; a connection lost) is UNAVAILABLE
//! with RetryInfo, which callers retry; a value it refuses (a NUL in text) is INVALID_ARGUMENT; a wrong
//! statement is INTERNAL.

use keel_common::{
    ServiceError,
    db::{self, sqlx},
    error::is_retryable,
    testsuite,
};
use sqlx::Row;
use std::time::Duration;
use tonic::{Code, Status};

fn status(e: sqlx::Error) -> Status {
    ServiceError::from(e).into()
}

#[tokio::test]
async fn unavailable_databases_are_unavailable_and_wrong_statements_internal() {
    let pg = testsuite::postgres().await;
    let pool = db::connect_url(
        &pg.url,
        4,
        Duration::from_secs(5),
        &sqlx::migrate::Migrator::DEFAULT,
    )
    .await
    .unwrap();

    // 57014 query_canceled: a statement timeout.
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET statement_timeout = 50")
        .execute(&mut *conn)
        .await
        .unwrap();
    let timed_out = status(
        sqlx::query("SELECT pg_sleep(2)")
            .execute(&mut *conn)
            .await
            .unwrap_err(),
    );
    assert_eq!(timed_out.code(), Code::Unavailable, "{timed_out:?}");
    assert!(is_retryable(&timed_out));
    drop(conn);

    // 57P01 admin_shutdown (or the connection already gone): the server ended the session.
    let mut victim = pool.acquire().await.unwrap();
    let pid: i32 = sqlx::query("SELECT pg_backend_pid()")
        .fetch_one(&mut *victim)
        .await
        .unwrap()
        .get(0);
    sqlx::query("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .execute(&pool)
        .await
        .unwrap();
    let ended = status(
        sqlx::query("SELECT 1")
            .execute(&mut *victim)
            .await
            .unwrap_err(),
    );
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");

    // 22021: PostgreSQL refuses a NUL character in text, a value the caller sent.
    let nul = status(
        sqlx::query("SELECT $1::text")
            .bind("a\0b")
            .execute(&pool)
            .await
            .unwrap_err(),
    );
    assert_eq!(nul.code(), Code::InvalidArgument, "{nul:?}");

    let wrong = status(
        sqlx::query("SELEC nonsense")
            .execute(&pool)
            .await
            .unwrap_err(),
    );
    assert_eq!(wrong.code(), Code::Internal, "{wrong:?}");
    assert!(!is_retryable(&wrong));
}

/// On PostgreSQL every connection of a service's pool carries `statement_timeout` = `grpc.request_timeout`:
/// the database stops a statement no call can wait for any more (UNAVAILABLE), instead of running it on.
#[tokio::test]
async fn statements_stop_at_the_longest_a_call_may_run() {
    let pg = testsuite::postgres().await;
    let settings = keel_common::Settings::from_env(
        "echo",
        &keel_common::config::Env::default()
            .with("KEEL_DATABASE__URL", &pg.url)
            .with("KEEL_GRPC__REQUEST_TIMEOUT", "300ms"),
    )
    .unwrap();
    let pool = db::connect(&settings, "echo", &sqlx::migrate::Migrator::DEFAULT)
        .await
        .unwrap();
    let stopped = status(
        sqlx::query("SELECT pg_sleep(5)")
            .execute(&pool)
            .await
            .unwrap_err(),
    );
    assert_eq!(stopped.code(), Code::Unavailable, "{stopped:?}");
    sqlx::query("SELECT pg_sleep(0.05)")
        .execute(&pool)
        .await
        .expect("a statement within the time runs");
}

/// Within a call, a statement may run only for what is left of the call's deadline (here 300 ms of a 10 s
/// `grpc.request_timeout`): the database stops it (UNAVAILABLE). Outside any call, the bound is the
/// request timeout again, also on a connection a short call used before.
#[tokio::test]
async fn a_statement_runs_no_longer_than_what_is_left_of_its_call() {
    use keel_common::context::{RequestContext, scope};
    let pg = testsuite::postgres().await;
    let settings = keel_common::Settings::from_env(
        "echo",
        &keel_common::config::Env::default()
            .with("KEEL_DATABASE__URL", &pg.url)
            .with("KEEL_DATABASE__MAX_CONNECTIONS", "1")
            .with("KEEL_GRPC__REQUEST_TIMEOUT", "10s"),
    )
    .unwrap();
    let pool = db::connect(&settings, "echo", &sqlx::migrate::Migrator::DEFAULT)
        .await
        .unwrap();
    let timeout = |pool: keel_common::db::Pool| async move {
        let row = sqlx::query("SELECT current_setting('statement_timeout')")
            .fetch_one(&pool)
            .await
            .unwrap();
        row.get::<String, _>(0)
    };
    let call = || RequestContext {
        trace_id: "t".into(),
        deadline: Some(std::time::Instant::now() + Duration::from_millis(300)),
    };
    let stopped = scope(call(), async {
        sqlx::query("SELECT pg_sleep(5)").execute(&pool).await
    })
    .await
    .unwrap_err();
    assert_eq!(status(stopped).code(), Code::Unavailable);
    let within = scope(call(), timeout(pool.clone())).await;
    let ms: u64 = within.trim_end_matches("ms").parse().unwrap_or(u64::MAX);
    assert!(
        (1..=300).contains(&ms),
        "statement_timeout in a 300 ms call: {within}"
    );
    assert_eq!(
        timeout(pool.clone()).await,
        "10s",
        "outside a call, on the same connection"
    );
}
