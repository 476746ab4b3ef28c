//! KillrVideo `SuggestedVideoService` (spec `killrvideo-semantics.md` §9): GetRelatedVideos and
//! GetSuggestedForUser over a read model of its own, built from `YouTubeVideoAdded`
//! (`topic-kv-videoCreation`) and `UserRatedVideo` (`topic-kv-videoRating`) consumed in consumer group
//! `suggested-videos`.
//!
//! - GetRelatedVideos: other videos sharing at least one tag with the video, most shared tags first, then
//!   newest; `page_size` of them (4, the C# reference's count, when `page_size` is 0); unknown video → empty.
//! - GetSuggestedForUser: collaborative filtering as the graph references do it: videos liked (rating ≥ 3)
//!   by users who liked what this user liked, by summed rating; filled up with the best-rated and newest
//!   videos the user has not rated, so a new user gets sensible suggestions too. Never an error for an unknown
//!   user.
//! - `paging_state` is always "" (one page), as in the tag-based reference.
//! - Event handling is idempotent: a redelivered event leaves the model as it was.

mod model;

use keel_common::db::Pool;
use keel_common::{
    Resources, Server, Service, ServiceError, Storage,
    events::{Event, HandlerError},
};
use keel_protos::killrvideo::suggested_videos::{
    GetRelatedVideosRequest, GetRelatedVideosResponse, GetSuggestedForUserRequest,
    GetSuggestedForUserResponse, SuggestedVideoPreview,
    suggested_video_service_server::{SuggestedVideoService, SuggestedVideoServiceServer},
};
use killrvideo::{
    events::{VideoAdded, VideoRated},
    ids, time, topics,
};
use tonic::{Request, Response, Status};

pub use model::{Model, Suggestion};

/// Consul service name, database name and consumer group.
pub const SERVICE: &str = "suggested-videos";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Related videos returned when the request's `page_size` is 0 (C# `RelatedVideosToReturn`).
pub const DEFAULT_RELATED: usize = 4;
/// Suggestions returned when the request's `page_size` is 0 (the graph references' NUM_RECOMMENDATIONS).
pub const DEFAULT_SUGGESTIONS: usize = 5;
/// Most videos one answer carries.
pub const MAX_PAGE: usize = 100;

/// The gRPC handler and the event handler, over one [`Model`].
#[derive(Clone, Debug)]
pub struct SuggestedVideos {
    model: Model,
}

impl SuggestedVideos {
    /// The service over `pool` (already migrated).
    pub fn new(pool: Pool) -> Self {
        Self {
            model: Model::new(pool),
        }
    }
}

impl Service for SuggestedVideos {
    const NAME: &'static str = SERVICE;
    type Settings = ();

    fn storage() -> Storage {
        Storage::database(&MIGRATIONS)
    }

    fn consumes() -> &'static [&'static str] {
        &[topics::YOUTUBE_VIDEO_ADDED, topics::USER_RATED_VIDEO]
    }

    async fn open(r: Resources<()>) -> anyhow::Result<Self> {
        let db = r.database()?;
        Ok(Self::new(db.pool))
    }

    /// Applies one event to the model.
    ///
    /// # Errors
    /// [`HandlerError::Malformed`] for an undecodable event, one without valid ids, or an unknown topic;
    /// database failures are transient.
    async fn handle(&self, event: Event) -> Result<(), HandlerError> {
        match event.topic.as_str() {
            topics::YOUTUBE_VIDEO_ADDED => {
                self.model
                    .add_video(&VideoAdded::decode(&event.payload)?)
                    .await?;
            }
            topics::USER_RATED_VIDEO => {
                self.model
                    .add_rating(&VideoRated::decode(&event.payload)?)
                    .await?;
            }
            other => return Err(HandlerError::Malformed(format!("unexpected topic {other}"))),
        }
        Ok(())
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(SuggestedVideoServiceServer::new(self))
    }
}

fn size(page_size: i32, default: usize) -> Result<usize, ServiceError> {
    match page_size {
        0 => Ok(default),
        n if n < 0 => Err(ServiceError::invalid(
            "page_size",
            "page size should not be negative",
        )),
        n => Ok((n as usize).min(MAX_PAGE)),
    }
}

fn to_wire(s: Suggestion) -> SuggestedVideoPreview {
    SuggestedVideoPreview {
        video_id: Some(ids::uuid(s.video_id)),
        added_date: Some(time::to_timestamp(s.added_ms)),
        name: s.name,
        preview_image_location: s.preview_image_location,
        user_id: Some(ids::uuid(s.user_id)),
    }
}

#[tonic::async_trait]
impl SuggestedVideoService for SuggestedVideos {
    async fn get_related_videos(
        &self,
        request: Request<GetRelatedVideosRequest>,
    ) -> Result<Response<GetRelatedVideosResponse>, Status> {
        let r = request.into_inner();
        let video = ids::required("video_id", r.video_id.as_ref())?;
        let n = size(r.page_size, DEFAULT_RELATED)?;
        let videos = self
            .model
            .related(video, n)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(GetRelatedVideosResponse {
            video_id: Some(ids::uuid(video)),
            videos: videos.into_iter().map(to_wire).collect(),
            paging_state: String::new(),
        }))
    }

    async fn get_suggested_for_user(
        &self,
        request: Request<GetSuggestedForUserRequest>,
    ) -> Result<Response<GetSuggestedForUserResponse>, Status> {
        let r = request.into_inner();
        let user = ids::required("user_id", r.user_id.as_ref())?;
        let n = size(r.page_size, DEFAULT_SUGGESTIONS)?;
        let videos = self
            .model
            .for_user(user, n)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(GetSuggestedForUserResponse {
            user_id: Some(ids::uuid(user)),
            videos: videos.into_iter().map(to_wire).collect(),
            paging_state: String::new(),
        }))
    }
}
