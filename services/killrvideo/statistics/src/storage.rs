//! Play counts in the service's own database: one row per video ever played.

use keel_common::db::Pool;
use killrvideo::sql::Sql;
use sqlx::Row;
use uuid::Uuid;

/// The play-count table.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// The store over a migrated `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Counts one more play of `video`.
    ///
    /// # Errors
    /// Database failures.
    pub async fn record_play(&self, video: Uuid) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO video_playback_stats (videoid, views) VALUES ($1, 1) \
             ON CONFLICT (videoid) DO UPDATE SET views = video_playback_stats.views + 1",
        )
        .bind(video.hyphenated().to_string())
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Views of each of `ids` (0 when never played), in order.
    ///
    /// # Errors
    /// Database failures.
    pub async fn plays(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql =
            Sql::new("SELECT videoid, views FROM video_playback_stats WHERE videoid IN (");
        let list = sql.bind_list(ids.iter().copied());
        sql.push(&list).push(")");
        let rows = sql.query().fetch_all(&self.pool).await?;
        let mut found = std::collections::HashMap::new();
        for r in rows {
            found.insert(r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?);
        }
        Ok(ids
            .iter()
            .map(|id| {
                (
                    *id,
                    found
                        .get(&id.hyphenated().to_string())
                        .copied()
                        .unwrap_or(0),
                )
            })
            .collect())
    }
}
