//! The read model: videos with their tags, and who rated what.

use keel_protos::killrvideo::{
    ratings::events::UserRatedVideo, video_catalog::events::YouTubeVideoAdded,
};
use killrvideo::time;
use sqlx::{AnyPool, Row, any::AnyRow};

/// A rating counts as liking a video from this value up (the graph references' MIN_RATING).
pub const MIN_RATING: i64 = 3;

/// One suggested video.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    /// Canonical UUID text.
    pub video_id: String,
    /// Milliseconds since the epoch.
    pub added_ms: i64,
    /// Name.
    pub name: String,
    /// Thumbnail.
    pub preview_image_location: String,
    /// Uploader.
    pub user_id: String,
}

const COLUMNS: &str = "v.videoid, v.added_ms, v.name, v.preview_image_location, v.userid";

fn suggestion(r: &AnyRow) -> Result<Suggestion, sqlx::Error> {
    Ok(Suggestion {
        video_id: r.try_get(0)?,
        added_ms: r.try_get(1)?,
        name: r.try_get(2)?,
        preview_image_location: r.try_get(3)?,
        user_id: r.try_get(4)?,
    })
}

fn id_text(id: Option<&keel_protos::killrvideo::common::Uuid>) -> String {
    id.map(|v| v.value.trim().to_lowercase())
        .unwrap_or_default()
}

/// The model's tables.
#[derive(Clone, Debug)]
pub struct Model {
    pool: AnyPool,
}

impl Model {
    /// The model over a migrated `pool`.
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// The pool (for readiness checks).
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Records a video and its tags (idempotent).
    ///
    /// # Errors
    /// Database failures.
    pub async fn add_video(&self, e: &YouTubeVideoAdded) -> Result<(), sqlx::Error> {
        let video = id_text(e.video_id.as_ref());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sv_videos (videoid, userid, name, preview_image_location, added_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (videoid) DO UPDATE SET userid = excluded.userid, \
             name = excluded.name, preview_image_location = excluded.preview_image_location, \
             added_ms = excluded.added_ms",
        )
        .bind(&video)
        .bind(id_text(e.user_id.as_ref()))
        .bind(&e.name)
        .bind(&e.preview_image_location)
        .bind(e.added_date.as_ref().map(time::to_millis).unwrap_or_else(time::now_ms))
        .execute(&mut *tx)
        .await?;
        for tag in &e.tags {
            let tag = tag.trim().to_lowercase();
            if tag.is_empty() {
                continue;
            }
            sqlx::query("INSERT INTO sv_video_tags (videoid, tag) VALUES ($1, $2) ON CONFLICT (videoid, tag) DO NOTHING")
                .bind(&video)
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await
    }

    /// Records a user's rating (the latest one wins; idempotent).
    ///
    /// # Errors
    /// Database failures.
    pub async fn add_rating(&self, e: &UserRatedVideo) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO sv_ratings (userid, videoid, rating) VALUES ($1, $2, $3) \
             ON CONFLICT (userid, videoid) DO UPDATE SET rating = excluded.rating",
        )
        .bind(id_text(e.user_id.as_ref()))
        .bind(id_text(e.video_id.as_ref()))
        .bind(i64::from(e.rating))
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Up to `limit` other videos sharing tags with `video`: most shared tags first, then newest.
    ///
    /// # Errors
    /// Database failures.
    pub async fn related(&self, video: &str, limit: usize) -> Result<Vec<Suggestion>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM sv_video_tags s \
             JOIN sv_video_tags o ON o.tag = s.tag AND o.videoid <> s.videoid \
             JOIN sv_videos v ON v.videoid = o.videoid \
             WHERE s.videoid = $1 GROUP BY {COLUMNS} \
             ORDER BY COUNT(*) DESC, v.added_ms DESC, v.videoid LIMIT $2"
        )))
        .bind(video)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(suggestion)
        .collect()
    }

    /// Up to `limit` videos for `user`: what users who liked the same videos also liked (summed ratings), then,
    /// to fill up, the best-rated and newest videos; never a video the user rated already.
    ///
    /// # Errors
    /// Database failures.
    pub async fn for_user(&self, user: &str, limit: usize) -> Result<Vec<Suggestion>, sqlx::Error> {
        let mut out: Vec<Suggestion> = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM sv_ratings mine \
             JOIN sv_ratings peer ON peer.videoid = mine.videoid AND peer.userid <> mine.userid AND peer.rating >= $1 \
             JOIN sv_ratings theirs ON theirs.userid = peer.userid AND theirs.rating >= $2 \
             JOIN sv_videos v ON v.videoid = theirs.videoid \
             WHERE mine.userid = $3 AND mine.rating >= $4 \
               AND theirs.videoid NOT IN (SELECT videoid FROM sv_ratings WHERE userid = $5) \
             GROUP BY {COLUMNS} ORDER BY SUM(theirs.rating) DESC, v.added_ms DESC, v.videoid LIMIT $6"
        )))
        .bind(MIN_RATING)
        .bind(MIN_RATING)
        .bind(user)
        .bind(MIN_RATING)
        .bind(user)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(suggestion)
        .collect::<Result<_, _>>()?;
        if out.len() < limit {
            let fill: Vec<Suggestion> = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {COLUMNS} FROM sv_videos v LEFT JOIN sv_ratings r ON r.videoid = v.videoid \
                 WHERE v.videoid NOT IN (SELECT videoid FROM sv_ratings WHERE userid = $1) \
                 GROUP BY {COLUMNS} ORDER BY COALESCE(SUM(r.rating), 0) DESC, v.added_ms DESC, v.videoid LIMIT $2"
            )))
            .bind(user)
            .bind((limit * 2) as i64)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(suggestion)
            .collect::<Result<_, _>>()?;
            for s in fill {
                if out.len() == limit {
                    break;
                }
                if !out.iter().any(|o| o.video_id == s.video_id) {
                    out.push(s);
                }
            }
        }
        Ok(out)
    }
}
