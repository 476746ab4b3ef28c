//! Accounts in the service's own database: names, quota counters and token digests, with the one conditional
//! UPDATE per reservation that keeps a quota exact however many cache instances reserve at once.

use keel_common::db;
use keel_common::db::Pool;
use sqlx::{Row, any::AnyRow};

/// The columns [`account`] reads, then the token digest: a macro, so each statement is one `&'static str`
/// (no SQL text made per call).
macro_rules! columns {
    () => {
        "id, name, max_cache_keys, used_cache_keys, token_hash"
    };
}

/// GetByToken's statement ($1: the token's SHA-256 digest, hex): the account's columns, then the digest.
/// Public so that `make bench`'s baselines (pgbench, the bare tonic server) run exactly it.
pub const BY_TOKEN_DIGEST: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM accounts WHERE token_hash = $1"
);

/// One account as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    /// UUIDv7, text.
    pub id: String,
    /// Display name, trimmed.
    pub name: String,
    /// Most keys its caches may hold at once.
    pub max_cache_keys: i64,
    /// Keys reserved now.
    pub used_cache_keys: i64,
}

/// What a reservation took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    /// Keys in use after it.
    pub used_cache_keys: i64,
    /// The account's limit.
    pub max_cache_keys: i64,
    /// Keys it took (at most the count asked).
    pub granted: i64,
}

fn account(r: &AnyRow) -> Result<Account, sqlx::Error> {
    Ok(Account {
        id: r.try_get(0)?,
        name: r.try_get(1)?,
        max_cache_keys: r.try_get(2)?,
        used_cache_keys: r.try_get(3)?,
    })
}

/// How long a reservation's or a release's idempotency key is remembered: far beyond any call's deadline and
/// a caller's retries (the cache gives up on a release after ~7 minutes: 5 of sleeps between attempts of 2 s).
pub const RETENTION: std::time::Duration = std::time::Duration::from_secs(600);

/// What a reservation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserved {
    /// Keys taken (or, for an id sent before, what the first call took).
    Taken(Reservation),
    /// Over the limit, or no such account.
    Refused,
    /// Its id was cancelled before it arrived: nothing taken.
    Cancelled,
    /// Its id belongs to another account's operation.
    IdInUse,
}

/// The accounts table.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// The store over a migrated `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// The account whose token has SHA-256 hex digest `digest`, with the digest as stored (for the caller's
    /// constant-time comparison).
    ///
    /// # Errors
    /// Database failures.
    pub async fn by_token_digest(
        &self,
        digest: &str,
    ) -> Result<Option<(Account, String)>, sqlx::Error> {
        let row = sqlx::query(BY_TOKEN_DIGEST)
            .bind(digest)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| Ok((account(&r)?, r.try_get(4)?))).transpose()
    }

    /// The account `id`, if it exists.
    ///
    /// # Errors
    /// Database failures.
    pub async fn by_id(&self, id: &str) -> Result<Option<Account>, sqlx::Error> {
        sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM accounts WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| account(&r))
        .transpose()
    }

    /// Stores a new account (its `used_cache_keys` start at 0) with its token's digest.
    ///
    /// # Errors
    /// Database failures.
    pub async fn create(&self, account: &Account, token_digest: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO accounts (id, name, token_hash, max_cache_keys, used_cache_keys, created_ms) \
             VALUES ($1, $2, $3, $4, 0, $5)",
        )
        .bind(&account.id)
        .bind(&account.name)
        .bind(token_digest)
        .bind(account.max_cache_keys)
        .bind(db::now_ms())
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Sets the name and limit of `account.id`.
    ///
    /// # Errors
    /// Database failures.
    pub async fn update(&self, account: &Account) -> Result<(), sqlx::Error> {
        sqlx::query("UPDATE accounts SET name = $1, max_cache_keys = $2 WHERE id = $3")
            .bind(&account.name)
            .bind(account.max_cache_keys)
            .bind(&account.id)
            .execute(&self.pool)
            .await
            .map(drop)
    }

    /// Up to `limit` accounts with ids after `after` (`""`: from the first), in id order.
    ///
    /// # Errors
    /// Database failures.
    pub async fn list(&self, after: &str, limit: usize) -> Result<Vec<Account>, sqlx::Error> {
        sqlx::query(concat!(
            "SELECT ",
            columns!(),
            " FROM accounts WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(account)
        .collect()
    }

    /// Reserves `count` keys of account `id` in one conditional UPDATE (concurrent reservations from every
    /// cache instance serialise on the row); with `up_to`, takes what is left when fewer remain.
    ///
    /// With a `reservation_id` (an idempotency key) the UPDATE runs in one transaction with a row of
    /// `quota_operations`: the same id sent again takes nothing more and answers what the first took, and an id
    /// cancelled first ([`Store::cancel_reservation`]) takes nothing.
    ///
    /// # Errors
    /// Database failures.
    pub async fn reserve(
        &self,
        id: &str,
        count: i64,
        up_to: bool,
        reservation_id: Option<&str>,
    ) -> Result<Reserved, sqlx::Error> {
        let Some(reservation_id) = reservation_id else {
            let mut conn = self.pool.acquire().await?;
            return Ok(Self::take(&mut conn, id, count, up_to)
                .await?
                .map_or(Reserved::Refused, Reserved::Taken));
        };
        // BEGIN, the UPDATE, the INSERT of the id with what it took, COMMIT: four round trips. The id's row is
        // written after the UPDATE, so a second transaction with the same id waits on the account's row, then
        // on the id's key, and finds it taken: it rolls back what it took and answers the first one's outcome.
        let mut tx = self.pool.begin().await?;
        let taken = Self::take(&mut tx, id, count, up_to).await?;
        let granted = taken.map_or(0, |t| t.granted);
        if Self::record(&mut tx, reservation_id, id, granted).await? {
            tx.commit().await?;
            return Ok(taken.map_or(Reserved::Refused, Reserved::Taken));
        }
        // Sent before (or cancelled first): undo this take, then answer what that one did, as committed.
        tx.rollback().await?;
        let row = sqlx::query(
            "SELECT o.key_count, o.cancelled, a.used_cache_keys, a.max_cache_keys \
             FROM quota_operations o JOIN accounts a ON a.id = o.account_id \
             WHERE o.id = $1 AND o.account_id = $2",
        )
        .bind(reservation_id)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(Reserved::IdInUse);
        };
        let (granted, cancelled): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        Ok(match (cancelled, granted) {
            (1, _) => Reserved::Cancelled,
            (_, 0) => Reserved::Refused,
            _ => Reserved::Taken(Reservation {
                used_cache_keys: row.try_get(2)?,
                max_cache_keys: row.try_get(3)?,
                granted,
            }),
        })
    }

    /// The conditional UPDATE of [`Store::reserve`] on `conn`. `None`: refused (over the limit, or no such
    /// account).
    async fn take(
        conn: &mut sqlx::AnyConnection,
        id: &str,
        count: i64,
        up_to: bool,
    ) -> Result<Option<Reservation>, sqlx::Error> {
        // SET expressions see the row before the update, so `last_granted` is what this call took.
        let query = if up_to {
            sqlx::query(
                "UPDATE accounts SET \
                   used_cache_keys = CASE WHEN used_cache_keys + $1 <= max_cache_keys \
                     THEN used_cache_keys + $2 ELSE max_cache_keys END, \
                   last_granted = CASE WHEN used_cache_keys + $3 <= max_cache_keys \
                     THEN $4 ELSE max_cache_keys - used_cache_keys END \
                 WHERE id = $5 AND used_cache_keys < max_cache_keys \
                 RETURNING used_cache_keys, max_cache_keys, last_granted",
            )
            .bind(count)
            .bind(count)
            .bind(count)
            .bind(count)
            .bind(id)
        } else {
            sqlx::query(
                "UPDATE accounts SET used_cache_keys = used_cache_keys + $1, last_granted = $2 \
                 WHERE id = $3 AND used_cache_keys + $4 <= max_cache_keys \
                 RETURNING used_cache_keys, max_cache_keys, last_granted",
            )
            .bind(count)
            .bind(count)
            .bind(id)
            .bind(count)
        };
        query
            .fetch_optional(&mut *conn)
            .await?
            .map(|row| {
                Ok(Reservation {
                    used_cache_keys: row.try_get(0)?,
                    max_cache_keys: row.try_get(1)?,
                    granted: row.try_get(2)?,
                })
            })
            .transpose()
    }

    /// Gives `count` keys of account `id` back (never below zero); false when there is no such account. With a
    /// `release_id` (an idempotency key), the same id sent again gives nothing more back.
    ///
    /// # Errors
    /// Database failures.
    pub async fn release(
        &self,
        id: &str,
        count: i64,
        release_id: Option<&str>,
    ) -> Result<bool, sqlx::Error> {
        let Some(release_id) = release_id else {
            let mut conn = self.pool.acquire().await?;
            return Self::give_back(&mut conn, id, count).await;
        };
        let mut tx = self.pool.begin().await?;
        if !Self::record(&mut tx, release_id, id, count).await? {
            return Ok(true);
        }
        if !Self::give_back(&mut tx, id, count).await? {
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Undoes reservation `reservation_id` of account `id`: gives back the keys it took, or, when it has not
    /// arrived, records it as cancelled so it takes none ([`Reserved::Cancelled`]). Idempotent. False when
    /// there is no such account.
    ///
    /// # Errors
    /// Database failures.
    pub async fn cancel_reservation(
        &self,
        id: &str,
        reservation_id: &str,
    ) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // A reservation in flight holds its row until it commits: the upsert waits for it, then sees what it took.
        let taken: Option<i64> = sqlx::query_scalar(
            "INSERT INTO quota_operations (id, account_id, key_count, cancelled, created_ms) \
             VALUES ($1, $2, 0, 1, $3) \
             ON CONFLICT (id) DO UPDATE SET cancelled = 1 \
             WHERE quota_operations.cancelled = 0 AND quota_operations.account_id = $4 \
             RETURNING key_count",
        )
        .bind(reservation_id)
        .bind(id)
        .bind(db::now_ms())
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let found = match taken {
            Some(n) if n > 0 => Self::give_back(&mut tx, id, n).await?,
            _ => sqlx::query("SELECT 1 FROM accounts WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?
                .is_some(),
        };
        if found {
            tx.commit().await?;
        }
        Ok(found)
    }

    /// Records operation `operation_id` of account `id` moving `key_count` keys, on `conn` (in the transaction
    /// that applies it); false when that id was recorded before (then nothing is to be applied again). Two
    /// transactions recording one id serialise on its primary key: the second waits for the first's outcome.
    async fn record(
        conn: &mut sqlx::AnyConnection,
        operation_id: &str,
        id: &str,
        key_count: i64,
    ) -> Result<bool, sqlx::Error> {
        Ok(sqlx::query(
            "INSERT INTO quota_operations (id, account_id, key_count, cancelled, created_ms) \
             VALUES ($1, $2, $3, 0, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(operation_id)
        .bind(id)
        .bind(key_count)
        .bind(db::now_ms())
        .execute(&mut *conn)
        .await?
        .rows_affected()
            == 1)
    }

    /// The UPDATE giving `count` keys of `id` back, on `conn`; false when there is no such account.
    async fn give_back(
        conn: &mut sqlx::AnyConnection,
        id: &str,
        count: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE accounts SET used_cache_keys = CASE WHEN used_cache_keys >= $1 \
             THEN used_cache_keys - $2 ELSE 0 END WHERE id = $3",
        )
        .bind(count)
        .bind(count)
        .bind(id)
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes the idempotency records older than [`RETENTION`]; how many went.
    ///
    /// # Errors
    /// Database failures.
    pub async fn purge_operations(&self) -> Result<u64, sqlx::Error> {
        let before = db::now_ms() - RETENTION.as_millis() as i64;
        Ok(
            sqlx::query("DELETE FROM quota_operations WHERE created_ms < $1")
                .bind(before)
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
