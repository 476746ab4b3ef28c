//! KillrVideo `RatingsService` (spec `killrvideo-semantics.md` §6): RateVideo, GetRating, GetUserRating.
//!
//! - Ratings are 1..=5 (INVALID_ARGUMENT otherwise). A user rating a video again replaces their rating: the
//!   video's total moves by the difference and its count does not grow (the references double count; the
//!   spec allows either and this keeps averages right).
//! - Unknown videos and users answer zeros, never NOT_FOUND.
//! - `dry-run: true` metadata on the mutating call validates it and answers as it would, writing nothing.
//! - The per-user row, the totals and `UserRatedVideo` (`topic-kv-videoRating`) are one transaction.

use keel_common::{Platform, Server, ServiceError, db, outbox, outbox::Outbox};
use keel_protos::killrvideo::ratings::{
    GetRatingRequest, GetRatingResponse, GetUserRatingRequest, GetUserRatingResponse,
    RateVideoRequest, RateVideoResponse,
    events::UserRatedVideo,
    ratings_service_server::{RatingsService, RatingsServiceServer},
};
use killrvideo::{ids, time, topics};
use prost::Message;
use sqlx::{AnyPool, Row};
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Consul service name and database name.
pub const SERVICE: &str = "ratings";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The gRPC handler and its storage (three statements; no separate storage module needed).
#[derive(Clone, Debug)]
pub struct Ratings {
    pool: AnyPool,
    outbox: Outbox,
}

impl Ratings {
    /// The service over `pool` (already migrated), publishing through `outbox`.
    pub fn new(pool: AnyPool, outbox: Outbox) -> Self {
        Self { pool, outbox }
    }

    /// Opens this service's database (migrated) and starts its outbox relay.
    ///
    /// # Errors
    /// The database cannot be opened or migrated.
    pub async fn open(platform: &Platform) -> anyhow::Result<Self> {
        let (pool, outbox) = killrvideo::open_database(platform, SERVICE, &MIGRATIONS).await?;
        Ok(Self::new(pool, outbox))
    }

    /// Adds this service to `server`, with its database as a readiness check.
    pub fn add_to(self, server: Server) -> Server {
        let ping = db::ping(&self.pool);
        server
            .add_service(RatingsServiceServer::new(self))
            .readiness("ratings database", ping)
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
        sqlx::query(
            "INSERT INTO video_ratings (videoid, rating_counter, rating_total) VALUES ($1, 0, 0) \
             ON CONFLICT (videoid) DO NOTHING",
        )
        .bind(&v)
        .execute(&mut *tx)
        .await?;
        sqlx::query("UPDATE video_ratings SET rating_counter = rating_counter WHERE videoid = $1")
            .bind(&v)
            .execute(&mut *tx)
            .await?;
        let previous: Option<i64> = sqlx::query(
            "SELECT rating FROM video_ratings_by_user WHERE videoid = $1 AND userid = $2",
        )
        .bind(&v)
        .bind(&u)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get(0))
        .transpose()?;
        sqlx::query(
            "INSERT INTO video_ratings_by_user (videoid, userid, rating) VALUES ($1, $2, $3) \
             ON CONFLICT (videoid, userid) DO UPDATE SET rating = excluded.rating",
        )
        .bind(&v)
        .bind(&u)
        .bind(i64::from(rating))
        .execute(&mut *tx)
        .await?;
        let (count_delta, total_delta) = match previous {
            None => (1i64, i64::from(rating)),
            Some(p) => (0, i64::from(rating) - p),
        };
        sqlx::query(
            "INSERT INTO video_ratings (videoid, rating_counter, rating_total) VALUES ($1, $2, $3) \
             ON CONFLICT (videoid) DO UPDATE SET \
               rating_counter = video_ratings.rating_counter + excluded.rating_counter, \
               rating_total = video_ratings.rating_total + excluded.rating_total",
        )
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
        outbox::enqueue(&mut tx, topics::USER_RATED_VIDEO, &event.encode_to_vec()).await?;
        tx.commit().await?;
        self.outbox.wake();
        Ok(())
    }
}

/// The ratings server of `platform` (its own process).
///
/// # Errors
/// As [`Ratings::open`].
pub async fn build(platform: &Platform) -> anyhow::Result<Server> {
    Ok(Ratings::open(platform)
        .await?
        .add_to(Server::builder(platform)))
}

#[tonic::async_trait]
impl RatingsService for Ratings {
    async fn rate_video(
        &self,
        request: Request<RateVideoRequest>,
    ) -> Result<Response<RateVideoResponse>, Status> {
        let dry_run = keel_common::context::is_dry_run(&request);
        let r = request.into_inner();
        let video = ids::required("video_id", r.video_id.as_ref())?;
        let user = ids::required("user_id", r.user_id.as_ref())?;
        if !(1..=5).contains(&r.rating) {
            return Err(ServiceError::invalid(
                "rating",
                format!("rating should be between 1 and 5, got {}", r.rating),
            )
            .into());
        }
        if dry_run {
            return Ok(Response::new(RateVideoResponse {}));
        }
        self.rate(video, user, r.rating)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(RateVideoResponse {}))
    }

    async fn get_rating(
        &self,
        request: Request<GetRatingRequest>,
    ) -> Result<Response<GetRatingResponse>, Status> {
        let video = ids::required("video_id", request.get_ref().video_id.as_ref())?;
        let row = sqlx::query(
            "SELECT rating_counter, rating_total FROM video_ratings WHERE videoid = $1",
        )
        .bind(video.hyphenated().to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        let (count, total) = match row {
            Some(r) => (
                r.try_get::<i64, _>(0).map_err(ServiceError::from)?,
                r.try_get::<i64, _>(1).map_err(ServiceError::from)?,
            ),
            None => (0, 0),
        };
        Ok(Response::new(GetRatingResponse {
            video_id: Some(ids::uuid(video)),
            ratings_count: count,
            ratings_total: total,
        }))
    }

    async fn get_user_rating(
        &self,
        request: Request<GetUserRatingRequest>,
    ) -> Result<Response<GetUserRatingResponse>, Status> {
        let r = request.into_inner();
        let video = ids::required("video_id", r.video_id.as_ref())?;
        let user = ids::required("user_id", r.user_id.as_ref())?;
        let rating: i64 = sqlx::query(
            "SELECT rating FROM video_ratings_by_user WHERE videoid = $1 AND userid = $2",
        )
        .bind(video.hyphenated().to_string())
        .bind(user.hyphenated().to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(ServiceError::from)?
        .map(|r| r.try_get(0))
        .transpose()
        .map_err(ServiceError::from)?
        .unwrap_or(0);
        Ok(Response::new(GetUserRatingResponse {
            video_id: Some(ids::uuid(video)),
            user_id: Some(ids::uuid(user)),
            rating: rating as i32,
        }))
    }
}
