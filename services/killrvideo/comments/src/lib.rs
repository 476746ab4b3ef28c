//! KillrVideo `CommentsService` (spec `killrvideo-semantics.md` §5): CommentOnVideo, GetVideoComments,
//! GetUserComments.
//!
//! - The comment id is the client's version-1 time UUID; the comment's time is the time embedded in it
//!   (Cassandra's `dateOf(commentid)`, millisecond precision), always returned.
//! - Lists are newest first (time UUID order); `starting_comment_id` is inclusive; `paging_state`
//!   continues strictly after the last comment returned.
//! - `dry-run: true` metadata on the mutating call validates it and answers as it would, writing nothing.
//! - Both lists and `UserCommentedOnVideo` (`topic-kv-commentCreation`) are one transaction; the same comment
//!   id sent again (a retry) is accepted and changes nothing.

mod storage;

use keel_common::db::Pool;
use keel_common::{Resources, Server, Service, ServiceError, Storage, outbox::Outbox};
use keel_protos::killrvideo::comments::{
    CommentOnVideoRequest, CommentOnVideoResponse, GetUserCommentsRequest, GetUserCommentsResponse,
    GetVideoCommentsRequest, GetVideoCommentsResponse, UserComment, VideoComment,
    comments_service_server::{CommentsService, CommentsServiceServer},
};
use killrvideo::{ids, limits, paging, required_text, time};
use tonic::{Request, Response, Status};

pub use storage::{By, Comment, Store};

/// Consul service name and database name.
pub const SERVICE: &str = "comments";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The gRPC handler: a thin adapter over [`Store`].
#[derive(Clone, Debug)]
pub struct Comments {
    store: Store,
}

impl Comments {
    /// The service over `pool` (already migrated), publishing through `outbox`.
    pub fn new(pool: Pool, outbox: Outbox) -> Self {
        Self {
            store: Store::new(pool, outbox),
        }
    }

    async fn page(
        &self,
        by: By,
        id: uuid::Uuid,
        page_size: i32,
        start: Option<&keel_protos::killrvideo::common::TimeUuid>,
        paging_state: &str,
        what: &str,
    ) -> Result<(Vec<Comment>, String), ServiceError> {
        let size = paging::page_size(page_size, what)?;
        let start = ids::optional_time("starting_comment_id", start)?.map(|s| ids::v1_sort_key(&s));
        // A token pages only the list it came from: these comments, of this video or user.
        let scope = match by {
            By::Video => format!("comments.by_video:{id}"),
            By::User => format!("comments.by_user:{id}"),
        };
        let after: Option<String> = paging::decode(&scope, paging_state)?;
        let rows = self
            .store
            .list(by, id, start.as_deref(), after.as_deref(), size + 1)
            .await?;
        Ok(paging::page(rows, size, &scope, |c| c.sortkey.clone()))
    }
}

impl Service for Comments {
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
        server.add_service(CommentsServiceServer::new(self))
    }
}

#[tonic::async_trait]
impl CommentsService for Comments {
    async fn comment_on_video(
        &self,
        request: Request<CommentOnVideoRequest>,
    ) -> Result<Response<CommentOnVideoResponse>, Status> {
        let dry_run = keel_common::context::is_dry_run(&request);
        let r = request.into_inner();
        let video = ids::required("video_id", r.video_id.as_ref())?;
        let user = ids::required("user_id", r.user_id.as_ref())?;
        let comment_id = ids::required_time("comment_id", r.comment_id.as_ref())?;
        required_text("comment", &r.comment, "comment on video")?;
        limits::chars("comment", &r.comment, limits::COMMENT_CHARS)?;
        if dry_run {
            return Ok(Response::new(CommentOnVideoResponse {}));
        }
        self.store
            .add(video, user, comment_id, &r.comment)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(CommentOnVideoResponse {}))
    }

    async fn get_user_comments(
        &self,
        request: Request<GetUserCommentsRequest>,
    ) -> Result<Response<GetUserCommentsResponse>, Status> {
        let r = request.into_inner();
        let user = ids::required("user_id", r.user_id.as_ref())?;
        let (rows, paging_state) = self
            .page(
                By::User,
                user,
                r.page_size,
                r.starting_comment_id.as_ref(),
                &r.paging_state,
                "get user comments request",
            )
            .await?;
        Ok(Response::new(GetUserCommentsResponse {
            user_id: Some(ids::uuid(user)),
            comments: rows
                .into_iter()
                .map(|c| UserComment {
                    comment_id: Some(ids::time_uuid(c.comment_id)),
                    video_id: Some(ids::uuid(c.other_id)),
                    comment: c.comment,
                    comment_timestamp: Some(time::to_timestamp(c.comment_ms)),
                })
                .collect(),
            paging_state,
        }))
    }

    async fn get_video_comments(
        &self,
        request: Request<GetVideoCommentsRequest>,
    ) -> Result<Response<GetVideoCommentsResponse>, Status> {
        let r = request.into_inner();
        let video = ids::required("video_id", r.video_id.as_ref())?;
        let (rows, paging_state) = self
            .page(
                By::Video,
                video,
                r.page_size,
                r.starting_comment_id.as_ref(),
                &r.paging_state,
                "get video comments request",
            )
            .await?;
        Ok(Response::new(GetVideoCommentsResponse {
            video_id: Some(ids::uuid(video)),
            comments: rows
                .into_iter()
                .map(|c| VideoComment {
                    comment_id: Some(ids::time_uuid(c.comment_id)),
                    user_id: Some(ids::uuid(c.other_id)),
                    comment: c.comment,
                    comment_timestamp: Some(time::to_timestamp(c.comment_ms)),
                })
                .collect(),
            paging_state,
        }))
    }
}
