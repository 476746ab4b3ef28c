//! [`Pool`]: the connections of a service's database, a `deadpool` pool of sqlx `AnyConnection`s whose
//! query costs its own round trip and nothing more.
//!
//! sqlx's own pool adds two round trips to every query (`keel-bench db-path` measured a bare connection at
//! 2.2× its queries/s and 0.4× its CPU per query on PostgreSQL): a ping when a connection goes back, to
//! resynchronise one that a dropped call left mid-statement, and here the `SET statement_timeout` each call
//! made with what was left of its deadline. Instead:
//! - a connection left mid-statement is resynchronised by its next statement: sqlx's PostgreSQL connection
//!   first reads the rest of the interrupted answer (and flushes what it had not sent), and an SQLite
//!   connection's worker thread runs its commands in order;
//! - a [`Transaction`] dropped before its commit is rolled back at once in a task of its own (it may hold
//!   locks), and a connection that failed to roll back is closed;
//! - a connection whose statement failed on the connection itself (I/O, protocol, PostgreSQL's class 08 and
//!   57P0x) is closed instead of going back; one idle for [`IDLE_CHECK`] or more, or lent out by
//!   [`Pool::acquire`]/[`Pool::begin`] (whose statements the pool does not see), is pinged before its next
//!   use, and closed when the ping fails;
//! - on PostgreSQL each connection remembers the `statement_timeout` it has, and a call sets it only when
//!   what it needs (what is left of its deadline, never more than the pool's bound) is outside
//!   [`TIMEOUT_SLACK`] of it: callers with the same deadline share one setting.

use std::{
    fmt,
    ops::{Deref, DerefMut},
    time::Duration,
};

use deadpool::managed::{self, Metrics, Object, PoolError, RecycleError, RecycleResult};
use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use sqlx::{
    Any, AnyConnection, Connection as _, Either, Execute, Executor,
    any::{AnyQueryResult, AnyRow, AnyStatement, AnyTypeInfo},
};

use super::Backend;

/// A connection idle this long is pinged before its next use.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

/// A connection's `statement_timeout` is kept while it lies within this share of what a call needs, below or
/// above: from 0.9× to 1.25× (a statement a caller no longer waits for runs at most a quarter longer; one
/// it waits for is stopped at most a tenth before its deadline, when it was about to fail anyway).
pub const TIMEOUT_SLACK: (f64, f64) = (0.9, 1.25);

/// One pooled connection and what the pool knows of it.
#[derive(Debug)]
pub(crate) struct Pooled {
    raw: AnyConnection,
    /// The `statement_timeout` set on it, ms (PostgreSQL).
    timeout_ms: Option<u64>,
    /// A statement failed on the connection itself: close it.
    broken: bool,
    /// Lent out whole: ping it before its next use.
    unverified: bool,
}

impl Pooled {
    /// Notes `e`, an error of a statement on this connection.
    fn note(&mut self, e: &sqlx::Error) {
        if is_connection_error(e) {
            self.broken = true;
        }
    }
}

/// Whether `e` says the connection itself failed (not the statement).
fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(d) => d
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P0")),
        _ => false,
    }
}

/// Makes and checks the connections of one database.
#[derive(Debug)]
pub(crate) struct Manager {
    url: String,
    backend: Backend,
}

impl managed::Manager for Manager {
    type Type = Pooled;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<Pooled, sqlx::Error> {
        let mut raw = AnyConnection::connect(&self.url).await?;
        if self.backend == Backend::Sqlite {
            // WAL lets readers run beside the one writer; the busy timeout queues writers instead of failing
            // them with SQLITE_BUSY.
            raw.execute("PRAGMA journal_mode = WAL").await?;
            raw.execute("PRAGMA busy_timeout = 5000").await?;
        }
        Ok(Pooled {
            raw,
            timeout_ms: None,
            broken: false,
            unverified: false,
        })
    }

    async fn recycle(&self, c: &mut Pooled, m: &Metrics) -> RecycleResult<sqlx::Error> {
        if c.broken {
            return Err(RecycleError::message(
                "its last statement failed on the connection",
            ));
        }
        if c.unverified || m.last_used() >= IDLE_CHECK {
            c.raw.ping().await?;
            c.unverified = false;
        }
        Ok(())
    }
}

/// The connections of a service's database (see the module docs). Cheap to clone (one pool behind). `&Pool`
/// is a sqlx [`Executor`]: `sqlx::query(…).fetch_one(&pool)` runs on a connection taken for that statement.
#[derive(Clone)]
pub struct Pool {
    inner: managed::Pool<Manager>,
    backend: Backend,
    /// The longest `statement_timeout` (PostgreSQL), `None`: none set.
    bound: Option<Duration>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("backend", &self.backend)
            .field("status", &self.inner.status())
            .finish()
    }
}

/// What a pool error is as a sqlx error: waiting or connecting past the acquire timeout is
/// [`sqlx::Error::PoolTimedOut`], a closed pool [`sqlx::Error::PoolClosed`].
fn pool_error(e: PoolError<sqlx::Error>) -> sqlx::Error {
    match e {
        PoolError::Backend(e) => e,
        PoolError::Timeout(_) => sqlx::Error::PoolTimedOut,
        PoolError::Closed => sqlx::Error::PoolClosed,
        other => sqlx::Error::Configuration(other.to_string().into()),
    }
}

impl Pool {
    /// A pool of at most `max_connections` to `url` (connected as calls need them), waiting at most
    /// `acquire_timeout` for a free connection and as long for a new one; on PostgreSQL with `bound`, each
    /// statement's `statement_timeout` is what is left of its call's deadline, at most `bound`.
    ///
    /// # Errors
    /// Never in practice (a pool without a runtime); connecting happens on use.
    pub fn new(
        url: &str,
        max_connections: u32,
        acquire_timeout: Duration,
        bound: Option<Duration>,
    ) -> anyhow::Result<Self> {
        let backend = Backend::of_url(url);
        let inner = managed::Pool::builder(Manager {
            url: url.to_owned(),
            backend,
        })
        .max_size(max_connections as usize)
        .wait_timeout(Some(acquire_timeout))
        .create_timeout(Some(acquire_timeout))
        .recycle_timeout(Some(acquire_timeout))
        // The connection used last goes first: under a light load the same few stay warm (no ping).
        .queue_mode(managed::QueueMode::Lifo)
        .runtime(deadpool::Runtime::Tokio1)
        .build()?;
        Ok(Self {
            inner,
            backend,
            bound: bound.filter(|_| backend == Backend::Postgres),
        })
    }

    /// The engine it talks to.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes it: connections in use close when they come back, and taking one fails
    /// ([`sqlx::Error::PoolClosed`]).
    pub async fn close(&self) {
        self.inner.close();
    }

    /// A connection outside the pool (migrations), with the pool's connection settings.
    pub(crate) async fn connect_alone(&self) -> Result<AnyConnection, sqlx::Error> {
        use managed::Manager as _;
        Ok(self.inner.manager().create().await?.raw)
    }

    /// A connection ready for a statement of the current call: its `statement_timeout` set when needed.
    async fn take(&self) -> Result<Object<Manager>, sqlx::Error> {
        let wanted = self.bound.map(|bound| {
            let left = crate::context::current()
                .and_then(|c| c.remaining())
                .map_or(bound, |left| left.min(bound));
            left.as_millis().clamp(1, i32::MAX as u128) as u64
        });
        // Each failed SET closes a connection; a new one ends the loop at the latest.
        for _ in 0..=self.inner.status().max_size {
            let mut c = self.inner.get().await.map_err(pool_error)?;
            let Some(wanted) = wanted else {
                return Ok(c);
            };
            let kept = c.timeout_ms.is_some_and(|ms| {
                let (below, above) = TIMEOUT_SLACK;
                (ms as f64) >= wanted as f64 * below && (ms as f64) <= wanted as f64 * above
            });
            if kept {
                return Ok(c);
            }
            let set = format!("SET statement_timeout = {wanted}");
            // Unknown until the SET is answered: a call dropped meanwhile may leave either value.
            c.timeout_ms = None;
            match sqlx::raw_sql(sqlx::AssertSqlSafe(set))
                .execute(&mut c.raw)
                .await
            {
                Ok(_) => {
                    c.timeout_ms = Some(wanted);
                    return Ok(c);
                }
                Err(e) if is_connection_error(&e) => drop(Object::take(c)),
                Err(e) => return Err(e),
            }
        }
        Err(sqlx::Error::PoolTimedOut)
    }

    /// A connection of its own for several statements, back to the pool when dropped (pinged before its next
    /// use, its `statement_timeout` set again: the pool does not see how its statements ended, or what they
    /// changed).
    ///
    /// # Errors
    /// As a statement on the pool: no connection free in time, or the database unreachable.
    pub async fn acquire(&self) -> Result<PoolConnection, sqlx::Error> {
        let mut c = self.take().await?;
        c.unverified = true;
        // Its statements may change the session's settings: the next call sets its timeout again.
        c.timeout_ms = None;
        Ok(PoolConnection(c))
    }

    /// Begins a transaction on a connection of its own: [`Transaction::commit`] ends it; dropped
    /// uncommitted, it is rolled back at once. Its statements must leave the session's settings as they are
    /// (no `SET`: the pool keeps the connection's `statement_timeout` as it set it).
    ///
    /// # Errors
    /// As [`Pool::acquire`], or `BEGIN` failing.
    pub async fn begin(&self) -> Result<Transaction, sqlx::Error> {
        let mut c = self.take().await?;
        c.unverified = true;
        if let Err(e) = c.raw.execute("BEGIN").await {
            c.note(&e);
            return Err(e);
        }
        Ok(Transaction { conn: Some(c) })
    }
}

/// A connection lent out by [`Pool::acquire`]: a sqlx `AnyConnection` (`&mut *conn` runs statements).
#[derive(Debug)]
pub struct PoolConnection(Object<Manager>);

impl Deref for PoolConnection {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self.0.raw
    }
}

impl DerefMut for PoolConnection {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.0.raw
    }
}

/// A transaction begun by [`Pool::begin`]: a sqlx `AnyConnection` (`&mut *tx` runs statements) in a
/// transaction until [`Transaction::commit`] or [`Transaction::rollback`]; dropped before either, it is
/// rolled back at once in a task of its own.
#[derive(Debug)]
pub struct Transaction {
    conn: Option<Object<Manager>>,
}

impl Transaction {
    fn raw(&mut self) -> &mut Pooled {
        self.conn
            .as_mut()
            .expect("a transaction keeps its connection until it ends")
    }

    async fn end(mut self, statement: &'static str) -> Result<(), sqlx::Error> {
        let c = self.raw();
        let ended = c.raw.execute(statement).await;
        match &ended {
            Ok(_) => {
                // Every statement of the transaction ran to its end before this one: nothing to check.
                c.unverified = false;
                self.conn = None;
            }
            Err(e) => c.note(e),
        }
        ended.map(drop)
    }

    /// Commits it.
    ///
    /// # Errors
    /// `COMMIT` failed (the transaction is then rolled back).
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.end("COMMIT").await
    }

    /// Rolls it back.
    ///
    /// # Errors
    /// `ROLLBACK` failed (the connection is then closed).
    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.end("ROLLBACK").await
    }
}

impl Drop for Transaction {
    fn drop(&mut self) {
        let Some(mut c) = self.conn.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime to roll back on: closing the connection ends the transaction.
            drop(Object::take(c));
            return;
        };
        runtime.spawn(async move {
            if let Err(e) = c.raw.execute("ROLLBACK").await {
                tracing::warn!(error = %e, "rolling back a dropped transaction failed; closing its connection");
                drop(Object::take(c));
            }
        });
    }
}

impl Deref for Transaction {
    type Target = AnyConnection;
    fn deref(&self) -> &AnyConnection {
        &self
            .conn
            .as_ref()
            .expect("a transaction keeps its connection until it ends")
            .raw
    }
}

impl DerefMut for Transaction {
    fn deref_mut(&mut self) -> &mut AnyConnection {
        &mut self.raw().raw
    }
}

impl<'p> Executor<'p> for &'_ Pool {
    type Database = Any;

    fn fetch_many<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxStream<'e, Result<Either<AnyQueryResult, AnyRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        Box::pin(async_stream::try_stream! {
            let mut c = pool.take().await?;
            let mut failed = None;
            {
                let mut results = c.raw.fetch_many(query);
                while let Some(r) = results.next().await {
                    match r {
                        Ok(v) => yield v,
                        Err(e) => {
                            failed = Some(e);
                            break;
                        }
                    }
                }
            }
            if let Some(e) = failed {
                c.note(&e);
                Err(e)?;
            }
        })
    }

    fn fetch_optional<'e, 'q: 'e, E>(
        self,
        query: E,
    ) -> BoxFuture<'e, Result<Option<AnyRow>, sqlx::Error>>
    where
        E: 'q + Execute<'q, Any>,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut c = pool.take().await?;
            let r = c.raw.fetch_optional(query).await;
            if let Err(e) = &r {
                c.note(e);
            }
            r
        })
    }

    fn prepare_with<'e>(
        self,
        sql: sqlx::SqlStr,
        parameters: &'e [AnyTypeInfo],
    ) -> BoxFuture<'e, Result<AnyStatement, sqlx::Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut c = pool.take().await?;
            c.raw.prepare_with(sql, parameters).await
        })
    }

    fn describe<'e>(
        self,
        sql: sqlx::SqlStr,
    ) -> BoxFuture<'e, Result<sqlx::Describe<Any>, sqlx::Error>>
    where
        'p: 'e,
    {
        let pool = self.clone();
        Box::pin(async move {
            let mut c = pool.take().await?;
            c.raw.describe(sql).await
        })
    }
}
