//! Test support (feature `testsuite`): every storage test runs on both backends, a fresh database each time.
//!
//! PostgreSQL is the real server started by `scripts/infra.sh` (`make infra-up`); its admin URL comes from
//! `KEEL_DATABASE_URL` (`scripts/infra.sh env`). When it is not set the PostgreSQL half of a test fails with a
//! message saying so: tests never skip.

use crate::db::sqlx::{self, Connection};

/// One backend a test runs on.
#[derive(Clone, Debug)]
pub struct TestDatabase {
    /// `sqlite` or `postgres`, for assertion messages.
    pub backend: &'static str,
    /// A sqlx URL of a database nobody else uses.
    pub url: String,
}

/// A fresh SQLite file and a fresh PostgreSQL database.
///
/// # Panics
/// `KEEL_DATABASE_URL` is unset or PostgreSQL does not answer (start it with `make infra-up`).
pub async fn databases() -> Vec<TestDatabase> {
    vec![sqlite().await, postgres().await]
}

/// A fresh SQLite file under the system temp directory.
pub async fn sqlite() -> TestDatabase {
    let dir = std::env::temp_dir().join("keel-tests");
    std::fs::create_dir_all(&dir).expect("temp dir");
    let file = dir.join(format!("{}.db", uuid::Uuid::new_v4().simple()));
    TestDatabase {
        backend: "sqlite",
        url: format!("sqlite://{}?mode=rwc", file.display()),
    }
}

/// A fresh database on the real PostgreSQL server.
///
/// # Panics
/// As [`databases`].
pub async fn postgres() -> TestDatabase {
    let admin = std::env::var("KEEL_DATABASE_URL").expect(
        "KEEL_DATABASE_URL is not set: start PostgreSQL with `make infra-up` and run tests through `make test`",
    );
    let name = format!("keeltest_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {admin} does not answer ({e}): run `make infra-up`")
        });
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .expect("create test database");
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    TestDatabase {
        backend: "postgres",
        url: format!("{base}/{name}"),
    }
}

/// Opens `db` with `migrations` applied, and an outbox on an in-process bus whose relay is not running, so a
/// test can read what was queued with [`queued_events`].
///
/// # Panics
/// The database cannot be opened.
pub async fn open(
    db: &TestDatabase,
    migrations: &sqlx::migrate::Migrator,
) -> (sqlx::AnyPool, crate::outbox::Outbox) {
    let pool = crate::db::connect_url(&db.url, 4, std::time::Duration::from_secs(5), migrations)
        .await
        .unwrap_or_else(|e| panic!("{}: {e:#}", db.backend));
    let outbox = crate::outbox::Outbox::new(pool.clone(), crate::EventBus::in_process());
    (pool, outbox)
}

/// The payloads queued in the outbox for `topic`, oldest first.
///
/// # Panics
/// The query fails.
pub async fn queued_events(pool: &sqlx::AnyPool, topic: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    use sqlx::Row;
    sqlx::query("SELECT payload FROM keel_outbox WHERE topic = $1 ORDER BY id")
        .bind(topic)
        .fetch_all(pool)
        .await
        .expect("read outbox")
        .iter()
        .map(|r| {
            base64::engine::general_purpose::STANDARD
                .decode(r.get::<String, _>(0))
                .expect("base64 payload")
        })
        .collect()
}
