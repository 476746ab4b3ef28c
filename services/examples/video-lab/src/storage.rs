//! All of the video lab's SQL: [`Record`]s in, [`Record`]s out; the same statements on SQLite and PostgreSQL.

use keel_common::db::Pool;
use sqlx::Row;

/// One video as stored.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// Its id, the key.
    pub id: String,
    /// Title.
    pub title: String,
    /// Author.
    pub author: String,
    /// Where the video is.
    pub url: String,
    /// Seconds.
    pub duration: i32,
}

/// The videos table.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

fn record(r: &sqlx::any::AnyRow) -> Record {
    Record {
        id: r.get("id"),
        title: r.get("title"),
        author: r.get("author"),
        url: r.get("url"),
        duration: r.get::<i32, _>("duration"),
    }
}

impl Store {
    /// The store over a migrated `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Stores `v`; `false` when its id is taken (nothing changed).
    ///
    /// # Errors
    /// The database fails.
    pub async fn add(&self, v: &Record) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(
            "INSERT INTO videos (id, title, author, url, duration) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(&v.id)
        .bind(&v.title)
        .bind(&v.author)
        .bind(&v.url)
        .bind(v.duration)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The video `id`, if stored.
    ///
    /// # Errors
    /// The database fails.
    pub async fn get(&self, id: &str) -> Result<Option<Record>, sqlx::Error> {
        let row = sqlx::query("SELECT id, title, author, url, duration FROM videos WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.as_ref().map(record))
    }

    /// Up to `n` videos with ids after `after` (from the first with `""`), in id order.
    ///
    /// # Errors
    /// The database fails.
    pub async fn page(&self, after: &str, n: usize) -> Result<Vec<Record>, sqlx::Error> {
        let rows = sqlx::query(
            "SELECT id, title, author, url, duration FROM videos WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(n as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(record).collect())
    }
}
