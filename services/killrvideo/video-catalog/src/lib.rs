//! KillrVideo `VideoCatalogService` (spec `killrvideo-semantics.md` §4): SubmitYouTubeVideo, GetVideo,
//! GetVideoPreviews, GetLatestVideoPreviews, GetUserVideoPreviews; SubmitUploadedVideo is UNIMPLEMENTED, as in
//! the Python and Java references (uploads are not supported).
//!
//! - A YouTube video's `location` is the id exactly as submitted (not validated beyond non-blank: the
//!   integration suite submits full URLs) and its preview `//img.youtube.com/vi/<id>/hqdefault.jpg`.
//! - Lists are ordered `added_date DESC, video_id ASC`; a start point (`starting_added_date` +
//!   `starting_video_id`) is inclusive; `paging_state` continues strictly after the last row returned.
//! - "Latest videos" covers today and the 7 UTC days before it (8 buckets, §4.6); the window is frozen in the
//!   paging state so paging across midnight is stable.
//! - `dry-run: true` metadata on the mutating call validates it and answers as it would, writing nothing.
//! - The video, its list rows and `YouTubeVideoAdded` (`topic-kv-videoCreation`) are one transaction; a
//!   video_id that exists already is ALREADY_EXISTS and changes nothing.

mod storage;

use keel_common::db::Pool;
use keel_common::{Resources, Server, Service, ServiceError, Storage, outbox::Outbox};
use keel_protos::killrvideo::video_catalog::{
    GetLatestVideoPreviewsRequest, GetLatestVideoPreviewsResponse, GetUserVideoPreviewsRequest,
    GetUserVideoPreviewsResponse, GetVideoPreviewsRequest, GetVideoPreviewsResponse,
    GetVideoRequest, GetVideoResponse, SubmitUploadedVideoRequest, SubmitUploadedVideoResponse,
    SubmitYouTubeVideoRequest, SubmitYouTubeVideoResponse, VideoLocationType, VideoPreview,
    video_catalog_service_server::{VideoCatalogService, VideoCatalogServiceServer},
};
use killrvideo::{MAX_IDS_PER_REQUEST, ids, limits, paging, required_text, time};
use prost_types::Timestamp;
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

pub use storage::{Position, Preview, Store, Video, latest_window_start, statements};

/// Consul service name and database name.
pub const SERVICE: &str = "video-catalog";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The message of every UploadsService-era call (spec §11, C#).
pub const UPLOADS_UNSUPPORTED: &str = "Uploading videos is currently not supported";

/// The preview image of a YouTube video (identical in every reference implementation, spec §4.1).
pub fn youtube_preview(you_tube_video_id: &str) -> String {
    format!("//img.youtube.com/vi/{you_tube_video_id}/hqdefault.jpg")
}

/// The gRPC handler: a thin adapter over [`Store`].
#[derive(Clone, Debug)]
pub struct VideoCatalog {
    store: Store,
}

impl VideoCatalog {
    /// The service over `pool` (already migrated), publishing through `outbox`.
    pub fn new(pool: Pool, outbox: Outbox) -> Self {
        Self {
            store: Store::new(pool, outbox),
        }
    }
}

impl Service for VideoCatalog {
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
        server.add_service(VideoCatalogServiceServer::new(self))
    }
}

/// Paging scope of the latest-videos list.
const LATEST_SCOPE: &str = "video-catalog.latest";

/// Paging state of the user-videos list: the last row returned.
#[derive(Serialize, Deserialize)]
struct UserCursor {
    after: Position,
}

/// Paging state of the latest-videos list: the window (frozen at the first page) and the last row returned.
#[derive(Serialize, Deserialize)]
struct LatestCursor {
    since: i64,
    after: Position,
}

/// The start point of a list request: both fields, or neither.
fn start_point(
    date: Option<&Timestamp>,
    video: Option<&keel_protos::killrvideo::common::Uuid>,
) -> Result<Option<Position>, ServiceError> {
    let video = ids::optional("starting_video_id", video)?;
    match (date, video) {
        (Some(d), Some(v)) => Ok(Some((time::request_millis("starting_added_date", d)?, v))),
        (None, None) => Ok(None),
        (None, Some(_)) => Err(ServiceError::invalid(
            "starting_added_date",
            "starting_added_date should be provided with starting_video_id",
        )),
        (Some(_), None) => Err(ServiceError::invalid(
            "starting_video_id",
            "starting_video_id should be provided with starting_added_date",
        )),
    }
}

fn to_wire(p: Preview) -> VideoPreview {
    VideoPreview {
        video_id: Some(ids::uuid(p.video_id)),
        added_date: Some(time::to_timestamp(p.added_ms)),
        name: p.name,
        preview_image_location: p.preview_image_location,
        user_id: Some(ids::uuid(p.user_id)),
    }
}

/// Sorted, unique, non-blank tags (a Cassandra `set<text>`).
fn tag_set(tags: Vec<String>) -> Vec<String> {
    let mut tags: Vec<String> = tags
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    tags.sort();
    tags.dedup();
    tags
}

#[tonic::async_trait]
impl VideoCatalogService for VideoCatalog {
    async fn submit_uploaded_video(
        &self,
        _request: Request<SubmitUploadedVideoRequest>,
    ) -> Result<Response<SubmitUploadedVideoResponse>, Status> {
        Err(ServiceError::Unimplemented(UPLOADS_UNSUPPORTED.into()).into())
    }

    async fn submit_you_tube_video(
        &self,
        request: Request<SubmitYouTubeVideoRequest>,
    ) -> Result<Response<SubmitYouTubeVideoResponse>, Status> {
        const REQ: &str = "submit youtube video";
        let dry_run = keel_common::context::is_dry_run(&request);
        let r = request.into_inner();
        let video_id = ids::required("video_id", r.video_id.as_ref())?;
        let user_id = ids::required("user_id", r.user_id.as_ref())?;
        required_text("name", &r.name, REQ)?;
        required_text("description", &r.description, REQ)?;
        let yt = required_text("you_tube_video_id", &r.you_tube_video_id, REQ)?.trim();
        limits::chars("name", &r.name, limits::VIDEO_NAME_CHARS)?;
        limits::chars("description", &r.description, limits::DESCRIPTION_CHARS)?;
        limits::chars("you_tube_video_id", yt, limits::LOCATION_CHARS)?;
        limits::tags(&r.tags)?;
        let video = Video {
            video_id,
            user_id,
            name: r.name.clone(),
            description: r.description.clone(),
            location: yt.to_owned(),
            location_type: VideoLocationType::Youtube as i32,
            preview_image_location: youtube_preview(yt),
            tags: tag_set(r.tags),
            added_ms: time::now_ms(),
        };
        let stored = if dry_run {
            self.store
                .get(video_id)
                .await
                .map_err(ServiceError::from)?
                .is_none()
        } else {
            self.store
                .submit(&video)
                .await
                .map_err(ServiceError::from)?
        };
        if stored {
            Ok(Response::new(SubmitYouTubeVideoResponse {}))
        } else {
            Err(
                ServiceError::AlreadyExists(format!("Video with id {video_id} already exists"))
                    .into(),
            )
        }
    }

    async fn get_video(
        &self,
        request: Request<GetVideoRequest>,
    ) -> Result<Response<GetVideoResponse>, Status> {
        let id = ids::required("video_id", request.get_ref().video_id.as_ref())?;
        let v = self
            .store
            .get(id)
            .await
            .map_err(ServiceError::from)?
            .ok_or_else(|| ServiceError::NotFound(format!("Video with id {id} was not found")))?;
        Ok(Response::new(GetVideoResponse {
            video_id: Some(ids::uuid(v.video_id)),
            user_id: Some(ids::uuid(v.user_id)),
            name: v.name,
            description: v.description,
            location: v.location,
            location_type: v.location_type,
            tags: v.tags,
            added_date: Some(time::to_timestamp(v.added_ms)),
        }))
    }

    async fn get_video_previews(
        &self,
        request: Request<GetVideoPreviewsRequest>,
    ) -> Result<Response<GetVideoPreviewsResponse>, Status> {
        let r = request.into_inner();
        let ids = ids::required_list(
            "video_ids",
            &r.video_ids,
            &format!("Cannot fetch more than {MAX_IDS_PER_REQUEST} videos at once"),
        )?;
        let previews = self
            .store
            .previews(&ids)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(GetVideoPreviewsResponse {
            video_previews: previews.into_iter().map(to_wire).collect(),
        }))
    }

    async fn get_latest_video_previews(
        &self,
        request: Request<GetLatestVideoPreviewsRequest>,
    ) -> Result<Response<GetLatestVideoPreviewsResponse>, Status> {
        let r = request.into_inner();
        let size = paging::page_size(r.page_size, "get latest preview video request")?;
        let start = start_point(r.starting_added_date.as_ref(), r.starting_video_id.as_ref())?;
        let cursor: Option<LatestCursor> = paging::decode(LATEST_SCOPE, &r.paging_state)?;
        let since = cursor
            .as_ref()
            .map_or_else(|| latest_window_start(time::now_ms()), |c| c.since);
        let rows = self
            .store
            .latest(
                since,
                start.as_ref(),
                cursor.as_ref().map(|c| &c.after),
                size + 1,
            )
            .await
            .map_err(ServiceError::from)?;
        let (rows, paging_state) = paging::page(rows, size, LATEST_SCOPE, |p| LatestCursor {
            since,
            after: (p.added_ms, p.video_id),
        });
        Ok(Response::new(GetLatestVideoPreviewsResponse {
            video_previews: rows.into_iter().map(to_wire).collect(),
            paging_state,
        }))
    }

    async fn get_user_video_previews(
        &self,
        request: Request<GetUserVideoPreviewsRequest>,
    ) -> Result<Response<GetUserVideoPreviewsResponse>, Status> {
        let r = request.into_inner();
        let user = ids::required("user_id", r.user_id.as_ref())?;
        let size = paging::page_size(r.page_size, "get user videos preview request")?;
        let start = start_point(r.starting_added_date.as_ref(), r.starting_video_id.as_ref())?;
        // A token pages only the list it came from: this user's videos.
        let scope = format!("video-catalog.user_videos:{user}");
        let cursor: Option<UserCursor> = paging::decode(&scope, &r.paging_state)?;
        let rows = self
            .store
            .user_videos(
                user,
                start.as_ref(),
                cursor.as_ref().map(|c| &c.after),
                size + 1,
            )
            .await
            .map_err(ServiceError::from)?;
        let (rows, paging_state) = paging::page(rows, size, &scope, |p| UserCursor {
            after: (p.added_ms, p.video_id),
        });
        Ok(Response::new(GetUserVideoPreviewsResponse {
            user_id: Some(ids::uuid(user)),
            video_previews: rows.into_iter().map(to_wire).collect(),
            paging_state,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_window_is_today_and_the_seven_days_before() {
        let noon = 20_000 * storage::DAY_MS + 12 * 3_600_000;
        assert_eq!(latest_window_start(noon), 19_993 * storage::DAY_MS);
        assert_eq!(
            youtube_preview("zcryCEQfTwY"),
            "//img.youtube.com/vi/zcryCEQfTwY/hqdefault.jpg"
        );
        assert_eq!(
            tag_set(vec!["b".into(), " a ".into(), "b".into(), "".into()]),
            vec!["a", "b"]
        );
    }
}
