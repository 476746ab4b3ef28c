//! Accounts in the service's own database: names, quota counters and token digests, with the one conditional
//! UPDATE per reservation that keeps a quota exact however many cache instances reserve at once.

use keel_common::db;
use sqlx::{AnyPool, Row, any::AnyRow};

const COLUMNS: &str = "id, name, max_cache_keys, used_cache_keys, token_hash";

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

/// The accounts table.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
}

impl Store {
    /// The store over a migrated `pool`.
    pub fn new(pool: AnyPool) -> Self {
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
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM accounts WHERE token_hash = $1"
        )))
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
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM accounts WHERE id = $1"
        )))
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
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM accounts WHERE id > $1 ORDER BY id LIMIT $2"
        )))
        .bind(after)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(account)
        .collect()
    }

    /// Reserves `count` keys of account `id` in one conditional UPDATE (concurrent reservations from every
    /// cache instance serialise on the row); with `up_to`, takes what is left when fewer remain. `None`:
    /// refused (over the limit, or no such account).
    ///
    /// # Errors
    /// Database failures.
    pub async fn reserve(
        &self,
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
            .fetch_optional(&self.pool)
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

    /// Gives `count` keys of account `id` back (never below zero); false when there is no such account.
    ///
    /// # Errors
    /// Database failures.
    pub async fn release(&self, id: &str, count: i64) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE accounts SET used_cache_keys = CASE WHEN used_cache_keys >= $1 \
             THEN used_cache_keys - $2 ELSE 0 END WHERE id = $3",
        )
        .bind(count)
        .bind(count)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }
}
