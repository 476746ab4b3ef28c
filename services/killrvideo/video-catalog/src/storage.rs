//! Videos, user video lists and the latest-videos window in the service's own database.

use keel_common::db::Pool;
use keel_common::{outbox, outbox::Outbox};
use keel_protos::killrvideo::video_catalog::events::YouTubeVideoAdded;
use killrvideo::{
    ids,
    sql::{Sql, uuid_at},
    time, topics,
};
use prost::Message;
use sqlx::{Row, any::AnyRow};
use uuid::Uuid;

/// The statements of a submission (in the order [`Store::submit`] runs them in one transaction) and of
/// GetVideo; public so that `make bench`'s SQLite baseline runs exactly them.
pub mod statements {
    /// The video, unless one with its id exists ($1 video, $2 user, $3 name, $4 description, $5 location, $6 location type, $7 preview, $8 tags as JSON, $9 added ms).
    pub const INSERT_VIDEO: &str = "INSERT INTO videos (videoid, userid, name, description, location, location_type, \
             preview_image_location, tags, added_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) \
             ON CONFLICT (videoid) DO NOTHING";
    /// The video in its user's list ($1 user, $2 added ms, $3 video, $4 name, $5 preview).
    pub const INSERT_USER_VIDEO: &str = "INSERT INTO user_videos (userid, added_ms, videoid, name, preview_image_location) \
             VALUES ($1, $2, $3, $4, $5)";
    /// The video in the latest list ($1 added ms, $2 video, $3 user, $4 name, $5 preview).
    pub const INSERT_LATEST_VIDEO: &str = "INSERT INTO latest_videos (added_ms, videoid, userid, name, preview_image_location) \
             VALUES ($1, $2, $3, $4, $5)";
    /// The latest list's rows older than its window ($1 the window's start, ms).
    pub const TRIM_LATEST: &str = "DELETE FROM latest_videos WHERE added_ms < $1";
    /// One video by id ($1 video).
    pub const GET_VIDEO: &str = "SELECT videoid, userid, name, description, location, location_type, preview_image_location, \
             tags, added_ms FROM videos WHERE videoid = $1";
}

/// A video as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Video {
    /// Its id.
    pub video_id: Uuid,
    /// Uploader.
    pub user_id: Uuid,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// The YouTube id as submitted (YOUTUBE) or the video URL (UPLOAD).
    pub location: String,
    /// 0 YOUTUBE, 1 UPLOAD.
    pub location_type: i32,
    /// Thumbnail URL.
    pub preview_image_location: String,
    /// Tags, sorted and unique.
    pub tags: Vec<String>,
    /// Milliseconds since the epoch.
    pub added_ms: i64,
}

/// What lists show of a video.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Preview {
    /// Its id.
    pub video_id: Uuid,
    /// Milliseconds since the epoch.
    pub added_ms: i64,
    /// Name.
    pub name: String,
    /// Thumbnail URL.
    pub preview_image_location: String,
    /// Uploader.
    pub user_id: Uuid,
}

/// A position in a list ordered by `added DESC, videoid ASC`: a start point (inclusive) or a paging cursor
/// (exclusive).
pub type Position = (i64, Uuid);

/// Milliseconds in a day.
pub const DAY_MS: i64 = 86_400_000;

/// How many UTC days "latest videos" covers: today and the 7 before it (spec §4.6, 8 buckets).
pub const LATEST_DAYS: i64 = 8;

/// Start of the oldest UTC day in the latest-videos window at `now_ms`.
pub fn latest_window_start(now_ms: i64) -> i64 {
    now_ms.div_euclid(DAY_MS) * DAY_MS - (LATEST_DAYS - 1) * DAY_MS
}

/// The video-catalog tables.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    outbox: Outbox,
}

impl Store {
    /// The store over a migrated `pool`.
    pub fn new(pool: Pool, outbox: Outbox) -> Self {
        Self { pool, outbox }
    }

    /// Writes the video, its user-list and latest-list rows and the YouTubeVideoAdded event in one transaction.
    /// Returns false (and writes nothing) when a video with this id exists.
    ///
    /// # Errors
    /// Database failures.
    pub async fn submit(&self, v: &Video) -> Result<bool, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(statements::INSERT_VIDEO)
            .bind(v.video_id.hyphenated().to_string())
            .bind(v.user_id.hyphenated().to_string())
            .bind(&v.name)
            .bind(&v.description)
            .bind(&v.location)
            .bind(i64::from(v.location_type))
            .bind(&v.preview_image_location)
            .bind(serde_json::to_string(&v.tags).unwrap_or_else(|_| "[]".into()))
            .bind(v.added_ms)
            .execute(&mut *tx)
            .await?;
        if inserted.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(statements::INSERT_USER_VIDEO)
            .bind(v.user_id.hyphenated().to_string())
            .bind(v.added_ms)
            .bind(v.video_id.hyphenated().to_string())
            .bind(&v.name)
            .bind(&v.preview_image_location)
            .execute(&mut *tx)
            .await?;
        sqlx::query(statements::INSERT_LATEST_VIDEO)
            .bind(v.added_ms)
            .bind(v.video_id.hyphenated().to_string())
            .bind(v.user_id.hyphenated().to_string())
            .bind(&v.name)
            .bind(&v.preview_image_location)
            .execute(&mut *tx)
            .await?;
        sqlx::query(statements::TRIM_LATEST)
            .bind(latest_window_start(time::now_ms()))
            .execute(&mut *tx)
            .await?;
        let event = YouTubeVideoAdded {
            video_id: Some(ids::uuid(v.video_id)),
            user_id: Some(ids::uuid(v.user_id)),
            name: v.name.clone(),
            description: v.description.clone(),
            location: v.location.clone(),
            preview_image_location: v.preview_image_location.clone(),
            tags: v.tags.clone(),
            added_date: Some(time::to_timestamp(v.added_ms)),
            timestamp: Some(time::to_timestamp(v.added_ms)),
        };
        outbox::enqueue(
            &mut tx,
            topics::YOUTUBE_VIDEO_ADDED,
            &v.video_id.to_string(),
            &event.encode_to_vec(),
        )
        .await?;
        tx.commit().await?;
        self.outbox.wake();
        Ok(true)
    }

    /// One video.
    ///
    /// # Errors
    /// Database failures.
    pub async fn get(&self, id: Uuid) -> Result<Option<Video>, sqlx::Error> {
        let row = sqlx::query(statements::GET_VIDEO)
            .bind(id.hyphenated().to_string())
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            let tags: String = r.try_get(7)?;
            Ok(Video {
                video_id: uuid_at(&r, 0)?,
                user_id: uuid_at(&r, 1)?,
                name: r.try_get(2)?,
                description: r.try_get(3)?,
                location: r.try_get(4)?,
                location_type: r.try_get::<i64, _>(5)? as i32,
                preview_image_location: r.try_get(6)?,
                tags: serde_json::from_str(&tags).unwrap_or_default(),
                added_ms: r.try_get(8)?,
            })
        })
        .transpose()
    }

    /// Previews of those of `ids` that exist, in request order.
    ///
    /// # Errors
    /// Database failures.
    pub async fn previews(&self, ids: &[Uuid]) -> Result<Vec<Preview>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new(
            "SELECT videoid, added_ms, name, preview_image_location, userid FROM videos WHERE videoid IN (",
        );
        let list = sql.bind_list(ids.iter().copied());
        sql.push(&list).push(")");
        let mut found = sql
            .query()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(preview)
            .collect::<Result<Vec<_>, _>>()?;
        found.sort_by_key(|p| ids.iter().position(|o| *o == p.video_id));
        Ok(found)
    }

    /// Up to `limit` of `user`'s videos, newest first, from `start` (inclusive) and after `after`.
    ///
    /// # Errors
    /// Database failures.
    pub async fn user_videos(
        &self,
        user: Uuid,
        start: Option<&Position>,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Vec<Preview>, sqlx::Error> {
        let mut sql = Sql::new(
            "SELECT videoid, added_ms, name, preview_image_location, userid FROM user_videos WHERE userid = ",
        );
        let u = sql.bind(user);
        sql.push(&u);
        self.list(sql, start, after, limit).await
    }

    /// Up to `limit` videos added since `since_ms`, newest first, from `start` (inclusive) and after `after`.
    ///
    /// # Errors
    /// Database failures.
    pub async fn latest(
        &self,
        since_ms: i64,
        start: Option<&Position>,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Vec<Preview>, sqlx::Error> {
        let mut sql = Sql::new(
            "SELECT videoid, added_ms, name, preview_image_location, userid FROM latest_videos \
             WHERE added_ms >= ",
        );
        let s = sql.bind(since_ms);
        sql.push(&s);
        self.list(sql, start, after, limit).await
    }

    /// Adds the start point, the cursor, the order (`added DESC, videoid ASC`) and the limit to `sql`.
    async fn list(
        &self,
        mut sql: Sql,
        start: Option<&Position>,
        after: Option<&Position>,
        limit: usize,
    ) -> Result<Vec<Preview>, sqlx::Error> {
        if let Some((added, video)) = start {
            // Cassandra's `(added_date, videoid) <= (?, ?)`: a comparison of values, inclusive.
            let (a1, a2, v) = (sql.bind(*added), sql.bind(*added), sql.bind(*video));
            sql.push(&format!(
                " AND (added_ms < {a1} OR (added_ms = {a2} AND videoid <= {v}))"
            ));
        }
        if let Some((added, video)) = after {
            // Strictly after the last row returned, in list order.
            let (a1, a2, v) = (sql.bind(*added), sql.bind(*added), sql.bind(*video));
            sql.push(&format!(
                " AND (added_ms < {a1} OR (added_ms = {a2} AND videoid > {v}))"
            ));
        }
        let l = sql.bind(limit as i64);
        sql.push(&format!(" ORDER BY added_ms DESC, videoid ASC LIMIT {l}"));
        sql.query()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(preview)
            .collect()
    }
}

fn preview(r: &AnyRow) -> Result<Preview, sqlx::Error> {
    Ok(Preview {
        video_id: uuid_at(r, 0)?,
        added_ms: r.try_get(1)?,
        name: r.try_get(2)?,
        preview_image_location: r.try_get(3)?,
        user_id: uuid_at(r, 4)?,
    })
}
