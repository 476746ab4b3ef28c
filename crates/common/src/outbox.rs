//! Transactional outbox: an event is written in the same database transaction as the state change it
//! announces, then relayed to the [`EventBus`] by a background task, so no event is lost when Kafka is down or
//! the process dies between the write and the publish.
//!
//! ```ignore
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO users …").execute(&mut *tx).await?;
//! outbox::enqueue(&mut tx, "topic-kv-userCreation", &event.encode_to_vec()).await?;
//! tx.commit().await?;
//! outbox.wake();
//! ```
//!
//! The relay publishes pending rows oldest first (ids are UUIDv7, time-ordered) and deletes each once the bus
//! acknowledged it; on a failed publish it stops the batch (keeping the order) and retries with backoff
//! (100 ms doubling to 5 s), so delivery resumes by itself when Kafka returns.
//!
//! Instances of a service share its PostgreSQL database, and so its outbox: one relay at a time works on it.
//! Each batch runs in a transaction holding `pg_try_advisory_xact_lock` on [`RELAY_LOCK`]; an instance that
//! does not get the lock skips the round (another one is relaying), so events are neither published twice
//! nor out of order between instances, and when the relaying instance dies its lock goes with its
//! transaction. (An SQLite file belongs to one process: no lock.) Delivery is still at least once — a crash
//! between the acknowledgement and the commit publishes again — which is why consumers are idempotent.

use std::{sync::Arc, time::Duration};

use base64::{Engine, engine::general_purpose::STANDARD};
use sqlx::{AnyConnection, AnyPool, Row};
use tokio::sync::Notify;

use crate::{db::Backend, events::EventBus};

/// Key of the PostgreSQL advisory lock a relay holds while it works on its database's outbox (advisory locks
/// are per database, so services never contend).
pub const RELAY_LOCK: i64 = 0x006b_6565_6c72_656c;

/// Queues `payload` for `topic` inside the caller's transaction.
///
/// # Errors
/// The insert fails (the caller's transaction should then be rolled back).
pub async fn enqueue(conn: &mut AnyConnection, topic: &str, payload: &[u8]) -> sqlx::Result<()> {
    sqlx::query("INSERT INTO keel_outbox (id, topic, payload, created_ms) VALUES ($1, $2, $3, $4)")
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(topic)
        .bind(STANDARD.encode(payload))
        .bind(crate::db::now_ms())
        .execute(conn)
        .await
        .map(drop)
}

/// The relay of one service's outbox; cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    pool: AnyPool,
    backend: Backend,
    bus: EventBus,
    wake: Arc<Notify>,
}

impl Outbox {
    /// The outbox in `pool`, relayed to `bus`.
    pub fn new(pool: AnyPool, bus: EventBus) -> Self {
        Self {
            backend: Backend::of_url(pool.connect_options().database_url.as_str()),
            pool,
            bus,
            wake: Arc::new(Notify::new()),
        }
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
        let rows = sqlx::query("SELECT id, topic, payload FROM keel_outbox ORDER BY id LIMIT 100")
            .fetch_all(&mut *conn)
            .await?;
        let mut sent = 0;
        for row in rows {
            if let Err(e) = self.publish(&row).await {
                return Ok((sent, Some(e)));
            }
            sqlx::query("DELETE FROM keel_outbox WHERE id = $1")
                .bind(row.try_get::<String, _>(0)?)
                .execute(&mut *conn)
                .await?;
            sent += 1;
        }
        Ok((sent, None))
    }

    async fn publish(&self, row: &sqlx::any::AnyRow) -> anyhow::Result<()> {
        let topic: String = row.try_get(1)?;
        let payload: String = row.try_get(2)?;
        let bytes = STANDARD.decode(payload.as_bytes())?;
        self.bus.publish(&topic, &bytes).await?;
        Ok(())
    }

    /// Starts the relay task: runs until the process ends.
    pub fn spawn_relay(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            let mut failing = false;
            loop {
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
