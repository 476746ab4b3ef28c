//! Comments by video and by user in the service's own database.

use keel_common::db::Pool;
use keel_common::{outbox, outbox::Outbox};
use keel_protos::killrvideo::comments::events::UserCommentedOnVideo;
use killrvideo::{
    ids,
    sql::{Sql, uuid_at},
    time, topics,
};
use prost::Message;
use sqlx::Row;
use uuid::Uuid;

/// One stored comment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Comment {
    /// Sort key of the comment id ([`ids::v1_sort_key`]).
    pub sortkey: String,
    /// The comment id (a version-1 UUID).
    pub comment_id: Uuid,
    /// The other party: the user in a video's list, the video in a user's list.
    pub other_id: Uuid,
    /// Text.
    pub comment: String,
    /// The time embedded in the comment id, in milliseconds since the epoch.
    pub comment_ms: i64,
}

/// Which list.
#[derive(Clone, Copy, Debug)]
pub enum By {
    /// `comments_by_video`.
    Video,
    /// `comments_by_user`.
    User,
}

/// The comments tables.
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

    /// Writes the comment to both lists and queues UserCommentedOnVideo, in one transaction. A comment id
    /// already stored for this video changes nothing and publishes nothing (a client retry): returns false.
    ///
    /// # Errors
    /// Database failures.
    pub async fn add(
        &self,
        video: Uuid,
        user: Uuid,
        comment_id: Uuid,
        text: &str,
    ) -> Result<bool, sqlx::Error> {
        let key = ids::v1_sort_key(&comment_id);
        let ms = ids::v1_millis(&comment_id).unwrap_or_else(time::now_ms);
        let (video_s, user_s, id_s) = (
            video.hyphenated().to_string(),
            user.hyphenated().to_string(),
            comment_id.hyphenated().to_string(),
        );
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO comments_by_video (videoid, sortkey, commentid, userid, comment, comment_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (videoid, sortkey) DO NOTHING",
        )
        .bind(&video_s)
        .bind(&key)
        .bind(&id_s)
        .bind(&user_s)
        .bind(text)
        .bind(ms)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            tx.rollback().await?;
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO comments_by_user (userid, sortkey, commentid, videoid, comment, comment_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (userid, sortkey) DO NOTHING",
        )
        .bind(&user_s)
        .bind(&key)
        .bind(&id_s)
        .bind(&video_s)
        .bind(text)
        .bind(ms)
        .execute(&mut *tx)
        .await?;
        let event = UserCommentedOnVideo {
            user_id: Some(ids::uuid(user)),
            video_id: Some(ids::uuid(video)),
            comment_id: Some(ids::time_uuid(comment_id)),
            comment_timestamp: Some(time::to_timestamp(time::now_ms())),
        };
        outbox::enqueue(
            &mut tx,
            topics::USER_COMMENTED_ON_VIDEO,
            &video.to_string(),
            &event.encode_to_vec(),
        )
        .await?;
        tx.commit().await?;
        self.outbox.wake();
        Ok(true)
    }

    /// Up to `limit` comments of one video or user, newest first, from `start` (a sort key, inclusive) and
    /// after `after` (exclusive).
    ///
    /// # Errors
    /// Database failures.
    pub async fn list(
        &self,
        by: By,
        id: Uuid,
        start: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Comment>, sqlx::Error> {
        let mut sql = Sql::new(match by {
            By::Video => {
                "SELECT sortkey, commentid, userid, comment, comment_ms FROM comments_by_video WHERE videoid = "
            }
            By::User => {
                "SELECT sortkey, commentid, videoid, comment, comment_ms FROM comments_by_user WHERE userid = "
            }
        });
        let p = sql.bind(id);
        sql.push(&p);
        if let Some(s) = start {
            let p = sql.bind(s);
            sql.push(&format!(" AND sortkey <= {p}"));
        }
        if let Some(a) = after {
            let p = sql.bind(a);
            sql.push(&format!(" AND sortkey < {p}"));
        }
        let l = sql.bind(limit as i64);
        sql.push(&format!(" ORDER BY sortkey DESC LIMIT {l}"));
        sql.query()
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| {
                Ok(Comment {
                    sortkey: r.try_get(0)?,
                    comment_id: uuid_at(r, 1)?,
                    other_id: uuid_at(r, 2)?,
                    comment: r.try_get(3)?,
                    comment_ms: r.try_get(4)?,
                })
            })
            .collect()
    }
}
