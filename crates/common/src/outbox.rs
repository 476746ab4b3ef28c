//! Transactional outbox: an event is written in the same database transaction as the state change it
//! announces, then relayed to the [`EventBus`] by a background task, so no event is lost when Kafka is down or
//! the process dies between the write and the publish.
//!
//! ```ignore
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO users …").execute(&mut *tx).await?;
//! outbox::enqueue(&mut tx, "topic-kv-userCreation", &user_id.to_string(), &event.encode_to_vec()).await?;
//! tx.commit().await?;
//! outbox.wake();
//! ```
//!
//! The relay publishes pending rows oldest first (ids are UUIDv7, time-ordered) and deletes each once the bus
//! acknowledged it; on a failed publish it stops the batch (keeping the order) and retries with backoff
//! (100 ms doubling to 5 s), so delivery resumes by itself when Kafka returns.
//!
//! An event that can never be delivered ([`PublishError::Refused`]: the broker refuses it for good, too large
//! say, or an in-process consumer dead-lettered it) does not block the ones after it: it moves to the
//! dead-letter table `keel_outbox_dead` with the reason, in the same transaction as its removal from the
//! outbox (nothing is lost), is logged at error level, and on Kafka a dead letter goes to the topic's
//! dead-letter topic ([`crate::events::dead_letter_topic`]; its payload omitted when too large). The relay
//! reports the outbox's backlog and the dead-letter table's size as StatsD gauges
//! `outbox.<service>.backlog` and `outbox.<service>.dead_letters` ([`Outbox::counts`]).
//!
//! Instances of a service share its PostgreSQL database, and so its outbox: one relay at a time works on it.
//! Each batch runs in a transaction holding `pg_try_advisory_xact_lock` on [`RELAY_LOCK`]; an instance that
//! does not get the lock skips the round (another one is relaying), so events are neither published twice
//! nor out of order between instances, and when the relaying instance dies its lock goes with its
//! transaction. (An SQLite file belongs to one process: no lock.) Delivery is still at least once — a crash
//! between the acknowledgement and the commit publishes again — which is why consumers are idempotent.

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use sqlx::{AnyConnection, Row};

use crate::db::Pool;
use tokio::sync::Notify;

use crate::{
    db::Backend,
    events::{EventBus, PublishError, headers},
};

/// Key of the PostgreSQL advisory lock a relay holds while it works on its database's outbox (advisory locks
/// are per database, so services never contend).
pub const RELAY_LOCK: i64 = 0x006b_6565_6c72_656c;

/// Queues `payload` for `topic` inside the caller's transaction, with `key`, the id of the entity the event is
/// about (the Kafka message key: one entity's events stay in order on one partition).
///
/// # Errors
/// The insert fails (the caller's transaction should then be rolled back).
pub async fn enqueue(
    conn: &mut AnyConnection,
    topic: &str,
    key: &str,
    payload: &[u8],
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO keel_outbox (id, topic, payload, created_ms, event_key) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(topic)
    .bind(STANDARD.encode(payload))
    .bind(crate::db::now_ms())
    .bind(key)
    .execute(conn)
    .await
    .map(drop)
}

/// How many events an outbox holds, as last counted by its relay ([`Outbox::counts`]).
#[derive(Debug, Default)]
pub struct Counts {
    /// Events written but not yet delivered (gauge `outbox.<service>.backlog`).
    pub backlog: std::sync::atomic::AtomicU64,
    /// Events in the dead-letter table (gauge `outbox.<service>.dead_letters`).
    pub dead_letters: std::sync::atomic::AtomicU64,
}

/// The relay of one service's outbox; cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: Pool,
    backend: Backend,
    bus: EventBus,
    wake: Arc<Notify>,
    counts: Arc<Counts>,
}

impl Outbox {
    /// The outbox in `pool`, relayed to `bus`.
    pub fn new(pool: Pool, bus: EventBus) -> Self {
        Self {
            backend: pool.backend(),
            pool,
            bus,
            wake: Arc::new(Notify::new()),
            counts: Arc::default(),
        }
    }

    /// Its backlog and dead letters, recounted by the relay task about once a second.
    pub fn counts(&self) -> Arc<Counts> {
        self.counts.clone()
    }

    /// Events in the dead-letter table.
    ///
    /// # Errors
    /// The query fails.
    pub async fn dead_letters(&self) -> sqlx::Result<i64> {
        sqlx::query("SELECT COUNT(*) FROM keel_outbox_dead")
            .fetch_one(&self.pool)
            .await?
            .try_get::<i64, _>(0)
    }

    async fn recount(&self) -> sqlx::Result<()> {
        use std::sync::atomic::Ordering::Relaxed;
        let backlog = self.pending().await?;
        let dead = self.dead_letters().await?;
        self.counts.backlog.store(backlog.max(0) as u64, Relaxed);
        self.counts.dead_letters.store(dead.max(0) as u64, Relaxed);
        Ok(())
    }

    /// Tells the relay a transaction with events committed (it also polls every second).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Events written but not yet acknowledged by the bus.
    ///
    /// # Errors
    /// The query fails.
    pub async fn pending(&self) -> sqlx::Result<i64> {
        sqlx::query("SELECT COUNT(*) FROM keel_outbox")
            .fetch_one(&self.pool)
            .await?
            .try_get::<i64, _>(0)
    }

    /// Publishes up to 100 pending events, oldest first; returns how many were published (0 as well when
    /// another instance holds the relay lock).
    ///
    /// # Errors
    /// The database or the bus failed; what was published before the failure is removed from the outbox.
    pub async fn relay_once(&self) -> anyhow::Result<usize> {
        if self.backend == Backend::Sqlite {
            // Autocommit: every delete commits on its own.
            let mut conn = self.pool.acquire().await?;
            let (sent, failure) = self.relay_batch(&mut conn).await?;
            return failure.map_or(Ok(sent), Err);
        }
        let mut tx = self.pool.begin().await?;
        let mine: bool = sqlx::query("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RELAY_LOCK)
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
        if !mine {
            return Ok(0);
        }
        let (sent, failure) = self.relay_batch(&mut tx).await?;
        // What was published leaves the outbox even when a later event failed.
        tx.commit().await?;
        failure.map_or(Ok(sent), Err)
    }

    /// Publishes the oldest 100 events on `conn`, deleting each once the bus has it, until one fails; returns
    /// how many went out and the failure of the one that did not (database errors end the batch at once).
    async fn relay_batch(
        &self,
        conn: &mut AnyConnection,
    ) -> anyhow::Result<(usize, Option<anyhow::Error>)> {
        let rows = sqlx::query(
            "SELECT id, topic, payload, event_key FROM keel_outbox ORDER BY id LIMIT 100",
        )
        .fetch_all(&mut *conn)
        .await?;
        let mut sent = 0;
        for row in rows {
            let id: String = row.try_get(0)?;
            let topic: String = row.try_get(1)?;
            let key: Option<String> = row.try_get(3)?;
            let bytes = STANDARD.decode(row.try_get::<String, _>(2)?.as_bytes())?;
            match self.bus.publish(&topic, key.as_deref(), &bytes).await {
                Ok(()) => {}
                Err(PublishError::Refused { reason, .. }) => {
                    // Announced on the dead-letter topic before it leaves the outbox: if Kafka is away now,
                    // the event stays and is tried again.
                    let why = [(headers::EXCEPTION_MESSAGE, reason.clone())];
                    if let Err(e) = self
                        .bus
                        .dead_letter(&topic, key.as_deref(), &bytes, &why)
                        .await
                    {
                        return Ok((sent, Some(e.into())));
                    }
                    self.bury(conn, &id, &reason).await?;
                    tracing::error!(topic, key, error = %reason, "event dead-lettered: kept in keel_outbox_dead");
                }
                Err(e) => return Ok((sent, Some(e.into()))),
            }
            sqlx::query("DELETE FROM keel_outbox WHERE id = $1")
                .bind(&id)
                .execute(&mut *conn)
                .await?;
            sent += 1;
        }
        Ok((sent, None))
    }

    /// Copies outbox row `id` into the dead-letter table with `error` (on the batch's connection: in its
    /// transaction on PostgreSQL, so the copy and the removal commit together).
    async fn bury(&self, conn: &mut AnyConnection, id: &str, error: &str) -> sqlx::Result<()> {
        sqlx::query(
            "INSERT INTO keel_outbox_dead (id, topic, payload, created_ms, event_key, failed_ms, error) \
             SELECT id, topic, payload, created_ms, event_key, $2, $3 FROM keel_outbox WHERE id = $1 \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(crate::db::now_ms())
        .bind(error)
        .execute(conn)
        .await
        .map(drop)
    }

    /// Starts the relay task: runs until the process ends.
    pub fn spawn_relay(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut failing = false;
            let mut counted = tokio::time::Instant::now() - Duration::from_secs(1);
            loop {
                if counted.elapsed() >= Duration::from_secs(1) {
                    counted = tokio::time::Instant::now();
                    if let Err(e) = this.recount().await {
                        tracing::debug!(error = %e, "outbox not counted");
                    }
                }
                match this.relay_once().await {
                    Ok(n) => {
                        if failing {
                            tracing::info!("outbox relay recovered");
                            failing = false;
                        }
                        backoff = Duration::from_millis(100);
                        if n == 100 {
                            continue;
                        }
                        tokio::select! {
                            _ = this.wake.notified() => {}
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(error = %e, "outbox relay failed; events stay queued and are retried");
                            failing = true;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        });
    }
}
