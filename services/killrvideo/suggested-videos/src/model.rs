//! The read model: videos with their tags, and who rated what.

use keel_common::db::Pool;
use killrvideo::{
    events::{VideoAdded, VideoRated},
    sql::uuid_at,
};
use sqlx::{Row, any::AnyRow};
use uuid::Uuid;

/// A rating counts as liking a video from this value up (the graph references' MIN_RATING).
pub const MIN_RATING: i64 = 3;

/// One suggested video.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suggestion {
    /// The video.
    pub video_id: Uuid,
    /// Milliseconds since the epoch.
    pub added_ms: i64,
    /// Name.
    pub name: String,
    /// Thumbnail.
    pub preview_image_location: String,
    /// Uploader.
    pub user_id: Uuid,
}

const COLUMNS: &str = "v.videoid, v.added_ms, v.name, v.preview_image_location, v.userid";

fn suggestion(r: &AnyRow) -> Result<Suggestion, sqlx::Error> {
    Ok(Suggestion {
        video_id: uuid_at(r, 0)?,
        added_ms: r.try_get(1)?,
        name: r.try_get(2)?,
        preview_image_location: r.try_get(3)?,
        user_id: uuid_at(r, 4)?,
    })
}

fn text(id: Uuid) -> String {
    id.hyphenated().to_string()
}

/// The model's tables.
#[derive(Clone, Debug)]
pub struct Model {
    pool: Pool,
}

impl Model {
    /// The model over a migrated `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// Records a video and its tags (idempotent).
    ///
    /// # Errors
    /// Database failures.
    pub async fn add_video(&self, e: &VideoAdded) -> Result<(), sqlx::Error> {
        let video = text(e.video_id);
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sv_videos (videoid, userid, name, preview_image_location, added_ms) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (videoid) DO UPDATE SET userid = excluded.userid, \
             name = excluded.name, preview_image_location = excluded.preview_image_location, \
             added_ms = excluded.added_ms",
        )
        .bind(&video)
        .bind(text(e.user_id))
        .bind(&e.name)
        .bind(&e.preview_image_location)
        .bind(e.added_ms)
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

    /// Records a user's rating: the one given last wins, whatever order the events arrive in (an older rating
    /// delivered late changes nothing); applying the same event again changes nothing.
    ///
    /// # Errors
    /// Database failures.
    pub async fn add_rating(&self, e: &VideoRated) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO sv_ratings (userid, videoid, rating, rated_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (userid, videoid) DO UPDATE SET rating = excluded.rating, rated_ms = excluded.rated_ms \
             WHERE excluded.rated_ms >= sv_ratings.rated_ms",
        )
        .bind(text(e.user_id))
        .bind(text(e.video_id))
        .bind(i64::from(e.rating))
        .bind(e.rated_ms)
        .execute(&self.pool)
        .await
        .map(drop)
    }

    /// Up to `limit` other videos sharing tags with `video`: most shared tags first, then newest.
    ///
    /// # Errors
    /// Database failures.
    pub async fn related(&self, video: Uuid, limit: usize) -> Result<Vec<Suggestion>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM sv_video_tags s \
             JOIN sv_video_tags o ON o.tag = s.tag AND o.videoid <> s.videoid \
             JOIN sv_videos v ON v.videoid = o.videoid \
             WHERE s.videoid = $1 GROUP BY {COLUMNS} \
             ORDER BY COUNT(*) DESC, v.added_ms DESC, v.videoid LIMIT $2"
        )))
        .bind(text(video))
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
    pub async fn for_user(&self, user: Uuid, limit: usize) -> Result<Vec<Suggestion>, sqlx::Error> {
        let user = text(user);
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
        .bind(&user)
        .bind(MIN_RATING)
        .bind(&user)
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
            .bind(&user)
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
