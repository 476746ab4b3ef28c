//! Ratings in the service's own database: the per-user rating and each video's count and total, kept in step
//! in one transaction with the `UserRatedVideo` event.

use keel_common::db::Pool;
use keel_common::{outbox, outbox::Outbox};
use keel_protos::killrvideo::ratings::events::UserRatedVideo;
use killrvideo::{ids, time, topics};
use prost::Message;
use sqlx::Row;
use uuid::Uuid;

/// The statements of a rating, in the order [`Store::rate`] runs them in one transaction; public so that
/// `make bench`'s SQLite baseline runs exactly them.
pub mod statements {
    /// The video's totals row, created if missing ($1 video).
    pub const CREATE_TOTALS: &str = "INSERT INTO video_ratings (videoid, rating_counter, rating_total) VALUES ($1, 0, 0) \
             ON CONFLICT (videoid) DO NOTHING";
    /// A no-op update that takes the totals row's lock (SQLite's write lock) first ($1 video).
    pub const LOCK_TOTALS: &str =
        "UPDATE video_ratings SET rating_counter = rating_counter WHERE videoid = $1";
    /// The user's previous rating, if any ($1 video, $2 user).
    pub const USER_RATING: &str =
        "SELECT rating FROM video_ratings_by_user WHERE videoid = $1 AND userid = $2";
    /// The user's rating, inserted or replaced ($1 video, $2 user, $3 rating).
    pub const PUT_USER_RATING: &str = "INSERT INTO video_ratings_by_user (videoid, userid, rating) VALUES ($1, $2, $3) \
             ON CONFLICT (videoid, userid) DO UPDATE SET rating = excluded.rating";
    /// The totals moved by a rating ($1 video, $2 count delta, $3 total delta).
    pub const ADD_TO_TOTALS: &str = "INSERT INTO video_ratings (videoid, rating_counter, rating_total) VALUES ($1, $2, $3) \
             ON CONFLICT (videoid) DO UPDATE SET \
               rating_counter = video_ratings.rating_counter + excluded.rating_counter, \
               rating_total = video_ratings.rating_total + excluded.rating_total";
}

/// The ratings tables.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
    outbox: Outbox,
}

impl Store {
    /// The store over a migrated `pool`, publishing through `outbox`.
    pub fn new(pool: Pool, outbox: Outbox) -> Self {
        Self { pool, outbox }
    }

    /// Stores `user`'s rating of `video` and queues UserRatedVideo.
    ///
    /// # Errors
    /// Database failures.
    pub async fn rate(&self, video: Uuid, user: Uuid, rating: i32) -> Result<(), sqlx::Error> {
        let (v, u) = (
            video.hyphenated().to_string(),
            user.hyphenated().to_string(),
        );
        let mut tx = self.pool.begin().await?;
        // Lock first, read second: the totals row is created if missing and then updated (a no-op), which
        // takes SQLite's write lock at once (a read-then-write transaction would fail with SQLITE_BUSY when a
        // concurrent writer commits in between) and PostgreSQL's row lock, so concurrent ratings of one video
        // see each other's per-user rows and never double count.
        sqlx::query(statements::CREATE_TOTALS)
            .bind(&v)
            .execute(&mut *tx)
            .await?;
        sqlx::query(statements::LOCK_TOTALS)
            .bind(&v)
            .execute(&mut *tx)
            .await?;
        let previous: Option<i64> = sqlx::query(statements::USER_RATING)
            .bind(&v)
            .bind(&u)
            .fetch_optional(&mut *tx)
            .await?
            .map(|r| r.try_get(0))
            .transpose()?;
        sqlx::query(statements::PUT_USER_RATING)
            .bind(&v)
            .bind(&u)
            .bind(i64::from(rating))
            .execute(&mut *tx)
            .await?;
        let (count_delta, total_delta) = match previous {
            None => (1i64, i64::from(rating)),
            Some(p) => (0, i64::from(rating) - p),
        };
        sqlx::query(statements::ADD_TO_TOTALS)
            .bind(&v)
            .bind(count_delta)
            .bind(total_delta)
            .execute(&mut *tx)
            .await?;
        let event = UserRatedVideo {
            video_id: Some(ids::uuid(video)),
            user_id: Some(ids::uuid(user)),
            rating,
            rating_timestamp: Some(time::to_timestamp(time::now_ms())),
        };
        outbox::enqueue(
            &mut tx,
            topics::USER_RATED_VIDEO,
            &video.to_string(),
            &event.encode_to_vec(),
        )
        .await?;
        tx.commit().await?;
        self.outbox.wake();
        Ok(())
    }

    /// The number of users who rated `video` and the sum of their ratings; zeros for a video never rated.
    ///
    /// # Errors
    /// Database failures.
    pub async fn totals(&self, video: Uuid) -> Result<(i64, i64), sqlx::Error> {
        let row = sqlx::query(
            "SELECT rating_counter, rating_total FROM video_ratings WHERE videoid = $1",
        )
        .bind(video.hyphenated().to_string())
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok((r.try_get(0)?, r.try_get(1)?)),
            None => Ok((0, 0)),
        }
    }

    /// `user`'s rating of `video` (1..=5), 0 when they never rated it.
    ///
    /// # Errors
    /// Database failures.
    pub async fn user_rating(&self, video: Uuid, user: Uuid) -> Result<i32, sqlx::Error> {
        let rating: Option<i64> = sqlx::query(
            "SELECT rating FROM video_ratings_by_user WHERE videoid = $1 AND userid = $2",
        )
        .bind(video.hyphenated().to_string())
        .bind(user.hyphenated().to_string())
        .fetch_optional(&self.pool)
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
        // Stored ratings are 1..=5 (validated at the edge).
        Ok(rating.map_or(0, |r| r as i32))
    }
}
