//! KillrVideo `RatingsService` (spec `killrvideo-semantics.md` §6): RateVideo, GetRating, GetUserRating.
//!
//! - Ratings are 1..=5 (INVALID_ARGUMENT otherwise). A user rating a video again replaces their rating: the
//!   video's total moves by the difference and its count does not grow (the references double count; the
//!   spec allows either and this keeps averages right).
//! - Unknown videos and users answer zeros, never NOT_FOUND.
//! - `dry-run: true` metadata on the mutating call validates it and answers as it would, writing nothing.
//! - The per-user row, the totals and `UserRatedVideo` (`topic-kv-videoRating`) are one transaction.

mod storage;

use keel_common::db::Pool;
use keel_common::{Resources, Server, Service, ServiceError, Storage, outbox::Outbox};
use keel_protos::killrvideo::ratings::{
    GetRatingRequest, GetRatingResponse, GetUserRatingRequest, GetUserRatingResponse,
    RateVideoRequest, RateVideoResponse,
    ratings_service_server::{RatingsService, RatingsServiceServer},
};
use killrvideo::ids;
use tonic::{Request, Response, Status};

pub use storage::{Store, statements};

/// Consul service name and database name.
pub const SERVICE: &str = "ratings";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The gRPC handler: a thin adapter over [`Store`].
#[derive(Clone, Debug)]
pub struct Ratings {
    store: Store,
}

impl Ratings {
    /// The service over `pool` (already migrated), publishing through `outbox`.
    pub fn new(pool: Pool, outbox: Outbox) -> Self {
        Self {
            store: Store::new(pool, outbox),
        }
    }
}

impl Service for Ratings {
    const NAME: &'static str = SERVICE;
    type Settings = ();

    fn storage() -> Storage {
        Storage::with_outbox(&MIGRATIONS)
    }

    async fn open(r: Resources<()>) -> anyhow::Result<Self> {
        let db = r.database()?;
        Ok(Self::new(db.pool, db.outbox))
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(RatingsServiceServer::new(self))
    }
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
        self.store
            .rate(video, user, r.rating)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(RateVideoResponse {}))
    }

    async fn get_rating(
        &self,
        request: Request<GetRatingRequest>,
    ) -> Result<Response<GetRatingResponse>, Status> {
        let video = ids::required("video_id", request.get_ref().video_id.as_ref())?;
        let (count, total) = self.store.totals(video).await.map_err(ServiceError::from)?;
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
        let rating = self
            .store
            .user_rating(video, user)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(GetUserRatingResponse {
            video_id: Some(ids::uuid(video)),
            user_id: Some(ids::uuid(user)),
            rating,
        }))
    }
}
