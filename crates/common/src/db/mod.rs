//! The service's own database: PostgreSQL in deployment, an SQLite file as the embedded default, behind one
//! [`Pool`] of sqlx `AnyConnection`s so a service's storage code and its test suite are the same for both.
//!
//! Portable SQL only: `$1`-style parameters (in ascending order of first use), `TEXT` and `BIGINT` columns
//! (UUIDs as canonical lowercase text, times as milliseconds since the Unix epoch), row-value comparisons,
//! `INSERT … ON CONFLICT`. Each service embeds its migrations with `sqlx::migrate!` and [`connect`] applies
//! them at start. A service never reads another service's tables: each has its own database (or file).

use std::{sync::Arc, time::Duration};

use sqlx::migrate::Migrator;

mod pool;
pub use pool::{IDLE_CHECK, Pool, PoolConnection, TIMEOUT_SLACK, Transaction};

use crate::{
    ServiceError,
    config::{Reader, Secret, Settings},
};

pub use sqlx;

/// The service's own database.
#[derive(Clone, Debug)]
pub struct DatabaseSettings {
    /// sqlx URL (`database.url`): `postgres://user:pass@host:port/db` in deployment, or
    /// `sqlite://path/file.db?mode=rwc`; `{service}` in it is replaced by the service's name, so one setting
    /// can give every service its own database. Default: `sqlite://<database.dir>/{service}.db?mode=rwc`,
    /// the embedded default.
    pub url: Option<Secret>,
    /// Directory of the default SQLite files (`database.dir`), default `var`.
    pub dir: String,
    /// Connections in the pool (`database.max_connections`), default 8.
    pub max_connections: u32,
    /// Longest wait for a free pooled connection, and for a new one to connect, before the call fails
    /// UNAVAILABLE (`database.acquire_timeout`).
    pub acquire_timeout: Duration,
}

impl DatabaseSettings {
    /// Reads the `database` section; the URL is reported with its password redacted.
    pub fn read(r: &mut Reader) -> Self {
        let url = r.secret("database.url");
        let this = Self {
            url: (!url.expose().is_empty()).then_some(url),
            dir: r.string("database.dir", "var"),
            max_connections: r.positive("database.max_connections", 8u32),
            acquire_timeout: r.duration("database.acquire_timeout", Duration::from_secs(3)),
        };
        r.report(
            "database.url",
            crate::config::redact_url(&this.url_pattern()),
        );
        this
    }

    /// `database.url`, or the SQLite default, with `{service}` still in it.
    pub fn url_pattern(&self) -> String {
        match &self.url {
            Some(url) => url.expose().to_owned(),
            None => format!(
                "sqlite://{}/{{service}}.db?mode=rwc",
                self.dir.trim_end_matches('/')
            ),
        }
    }
}

/// Key of the PostgreSQL advisory lock held while a database is migrated at start.
const MIGRATION_LOCK: i64 = 0x006b_6565_6c6d_6967;

/// Which engine a pool talks to, for the few statements that differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL.
    Postgres,
    /// SQLite.
    Sqlite,
}

impl Backend {
    /// The backend a sqlx URL names.
    pub fn of_url(url: &str) -> Self {
        if url.starts_with("sqlite:") {
            Self::Sqlite
        } else {
            Self::Postgres
        }
    }
}

/// Opens the pool of service `service`'s database (`settings.database_url_of(service)`), creating the SQLite
/// file's directory when needed, and applies `migrations` (plus the platform's own outbox table).
///
/// # Errors
/// The database cannot be reached or a migration fails; the message names the (redacted) URL.
pub async fn connect(
    settings: &Settings,
    service: &str,
    migrations: &Migrator,
) -> anyhow::Result<Pool> {
    let url = settings.database_url_of(service);
    open(
        &url,
        settings.database.max_connections,
        settings.database.acquire_timeout,
        Some(settings.grpc.request_timeout),
        migrations,
    )
    .await
    .map_err(|e| anyhow::anyhow!("database {}: {e:#}", crate::config::redact_url(&url)))
}

/// [`connect`] with explicit parameters.
///
/// # Errors
/// As [`connect`].
pub async fn connect_url(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
    migrations: &Migrator,
) -> anyhow::Result<Pool> {
    open(url, max_connections, acquire_timeout, None, migrations).await
}

/// Opens the pool. On PostgreSQL a statement's `statement_timeout` is what is left of the deadline of the call
/// it runs for ([`crate::context::current`]), never more than the longest a call may run (`grpc.request_timeout`,
/// also the bound of work outside any call: relays, consumers), so the database itself stops a statement no
/// caller waits for any more (it answers 57014, UNAVAILABLE); migrations run without it. How the pool keeps
/// that to one `SET` per change of deadline, not one per call: [`Pool`].
async fn open(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
    statement_timeout: Option<Duration>,
    migrations: &Migrator,
) -> anyhow::Result<Pool> {
    sqlx::any::install_default_drivers();
    let backend = Backend::of_url(url);
    if backend == Backend::Sqlite {
        let path = url
            .trim_start_matches("sqlite://")
            .trim_start_matches("sqlite:");
        let path = path.split('?').next().unwrap_or_default();
        if let Some(dir) = std::path::Path::new(path).parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir)?;
        }
    }
    let pool = Pool::new(url, max_connections, acquire_timeout, statement_timeout)?;
    // Instances of one service starting together would race on `CREATE TABLE IF NOT EXISTS` (PostgreSQL
    // reports a duplicate pg_type key): the first migrates under a session advisory lock, the others wait.
    // SQLite files belong to one process: a process-wide lock is enough there.
    static SQLITE_MIGRATION: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    let _sqlite_guard = match backend {
        Backend::Sqlite => Some(SQLITE_MIGRATION.lock().await),
        Backend::Postgres => None,
    };
    // A connection of its own, closed at the end: the pool's keep the statement_timeout they were given.
    let mut conn = pool.connect_alone().await?;
    if backend == Backend::Postgres {
        // Waiting for another instance's migration, and the migration itself, may take longer than a call.
        sqlx::query("SET statement_timeout = 0")
            .execute(&mut conn)
            .await?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut conn)
            .await?;
    }
    let migrated = async {
        migrations.run(&mut conn).await?;
        create_outbox_table(&mut conn).await?;
        anyhow::Ok(())
    }
    .await;
    if backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut conn)
            .await?;
    }
    migrated?;
    drop(conn);
    Ok(pool)
}

/// Creates the platform's outbox table (`keel_outbox`, used by [`crate::outbox`]) if missing, under the same
/// lock as the service's migrations. It lives here, with the schema, so storage never depends on the relay.
async fn create_outbox_table(conn: &mut sqlx::AnyConnection) -> sqlx::Result<()> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS keel_outbox (\
           id TEXT PRIMARY KEY, topic TEXT NOT NULL, payload TEXT NOT NULL, created_ms BIGINT NOT NULL, \
           event_key TEXT)",
    )
    .execute(&mut *conn)
    .await?;
    // Outboxes made before events had keys get the column (NULL: published without a key).
    if sqlx::query("SELECT event_key FROM keel_outbox LIMIT 0")
        .execute(&mut *conn)
        .await
        .is_err()
    {
        sqlx::query("ALTER TABLE keel_outbox ADD COLUMN event_key TEXT")
            .execute(&mut *conn)
            .await?;
    }
    // Events that can never be delivered (refused by the broker, or dead-lettered by an in-process consumer),
    // kept with the reason instead of blocking the ones after them.
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS keel_outbox_dead (\
           id TEXT PRIMARY KEY, topic TEXT NOT NULL, payload TEXT NOT NULL, created_ms BIGINT NOT NULL, \
           event_key TEXT, failed_ms BIGINT NOT NULL, error TEXT NOT NULL)",
    )
    .execute(&mut *conn)
    .await
    .map(drop)
}

/// A readiness check for [`crate::Server::readiness`]: `SELECT 1` on a connection of its own to `url` (made
/// again after an error), not one of the pool's: a database that went away is seen at once (a refused
/// connect fails in microseconds), where the pool would keep retrying its connects until its
/// `acquire_timeout`.
pub fn ping(
    url: &str,
) -> impl Fn() -> futures::future::BoxFuture<'static, Result<(), String>> + use<> {
    use sqlx::Connection;
    let url: Arc<str> = Arc::from(url);
    let conn: Arc<tokio::sync::Mutex<Option<sqlx::AnyConnection>>> = Arc::default();
    move || {
        let (url, conn) = (url.clone(), conn.clone());
        Box::pin(async move {
            let mut held = conn.lock().await;
            if held.is_none() {
                *held = Some(
                    sqlx::AnyConnection::connect(&url)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let c = held.as_mut().expect("connected above");
            let answer = sqlx::query("SELECT 1").execute(&mut *c).await;
            if answer.is_err() {
                *held = None;
            }
            answer.map(drop).map_err(|e| e.to_string())
        })
    }
}

/// Whether a database error is the database being unavailable rather than the statement being wrong, by its
/// SQLSTATE (PostgreSQL, <https://www.postgresql.org/docs/current/errcodes-appendix.html>) or SQLite result
/// code: connection exceptions (class 08), insufficient resources (53, e.g. 53300 too_many_connections),
/// operator intervention (57P01 admin_shutdown, 57P02 crash_shutdown, 57P03 cannot_connect_now, 57014
/// query_canceled by a statement timeout), transaction rollbacks a retry resolves (40001 serialization_failure,
/// 40P01 deadlock_detected); SQLite 5 (BUSY) and 6 (LOCKED).
pub fn is_transient(code: &str) -> bool {
    code.starts_with("08")
        || code.starts_with("53")
        || code.starts_with("57P")
        || matches!(code, "57014" | "40001" | "40P01" | "5" | "6")
}

/// Whether `e` is the database being away (unreachable, no connection free, overloaded, shutting down,
/// [`is_transient`]) rather than something wrong with the statement or the data: what a caller may wait out.
pub fn is_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::Io(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(d) => d.code().as_deref().is_some_and(is_transient),
        _ => false,
    }
}

impl From<sqlx::Error> for ServiceError {
    /// UNAVAILABLE with `RetryInfo` (the caller may retry) when the database is unreachable, overloaded,
    /// shutting down or timed the statement out ([`is_transient`]); INVALID_ARGUMENT for a data exception
    /// (SQLSTATE class 22: a value of the request the database refuses, such as a NUL character in text);
    /// anything else is INTERNAL, logged in full.
    fn from(e: sqlx::Error) -> Self {
        let unavailable = |why: &str| ServiceError::Unavailable {
            message: format!("database unavailable: {why}"),
            retry_after: Duration::from_millis(500),
        };
        match e {
            sqlx::Error::PoolTimedOut => unavailable("no connection free in time"),
            sqlx::Error::Io(_) | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
                unavailable("connection lost")
            }
            // Class 22, data exception: a value of the request the database cannot take (a NUL character in
            // text, say, which PostgreSQL refuses) is the caller's to fix, not an internal error.
            sqlx::Error::Database(d)
                if d.code().as_deref().is_some_and(|c| c.starts_with("22")) =>
            {
                tracing::info!(code = ?d.code(), error = %d, "database refused a value of the request");
                ServiceError::invalid(
                    "request",
                    format!(
                        "a value cannot be stored (SQLSTATE {}): text may not contain NUL characters",
                        d.code().unwrap_or_default()
                    ),
                )
            }
            sqlx::Error::Database(d) if d.code().as_deref().is_some_and(is_transient) => {
                tracing::warn!(code = ?d.code(), error = %d, "database refused the statement for now");
                unavailable(&format!("SQLSTATE {}", d.code().unwrap_or_default()))
            }
            other => ServiceError::Internal(other.into()),
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use crate::config::{Env, Settings};

    #[test]
    fn transient_sqlstates_are_the_unavailable_ones() {
        for code in [
            "08006", "53300", "57P01", "57P03", "57014", "40001", "40P01", "5", "6",
        ] {
            assert!(super::is_transient(code), "{code}");
        }
        for code in ["42601", "23505", "22P02", "1", "19"] {
            assert!(!super::is_transient(code), "{code}");
        }
    }

    #[test]
    fn database_defaults_to_an_sqlite_file_per_service_and_events_follow_kafka() {
        let s = Settings::from_env("comments", &Env::default()).unwrap();
        assert_eq!(s.database_url(), "sqlite://var/comments.db?mode=rwc");
        assert_eq!(
            s.database_url_of("ratings"),
            "sqlite://var/ratings.db?mode=rwc"
        );
        assert_eq!(s.events.brokers, None);
        assert_eq!(s.events.group_prefix, None);
        let s = Settings::from_env(
            "comments",
            &Env::default()
                .with(
                    "KEEL_DATABASE__URL",
                    "postgres://kv:hunter2@127.0.0.1:15432/comments",
                )
                .with("KEEL_KAFKA__BROKERS", "127.0.0.1:19092"),
        )
        .unwrap();
        assert_eq!(
            s.database_url_redacted(),
            "postgres://kv:***@127.0.0.1:15432/comments"
        );
        assert!(!format!("{s:?}").contains("hunter2"));
        assert_eq!(s.events.brokers.as_deref(), Some("127.0.0.1:19092"));
    }
}
