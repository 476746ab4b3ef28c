//! The video lab of `shared/seeds/002_grpc_concepts_video_lab.txt`: video records served by every kind of gRPC
//! call — `AddVideo` (unary), `ListVideos` (server streaming), `GetVideos` (client streaming), `GetVideo`
//! (bidirectional, one answer per request as it comes) — stored in its own database like every other service,
//! and served through the platform's stack (metrics, call log, deadlines, concurrency limit, shutdown).
//!
//! Limits: ids of at most [`MAX_ID_CHARS`] characters, titles/authors/URLs of at most [`MAX_TEXT_CHARS`]; a
//! client stream of at most [`MAX_IDS`] ids; `ListVideos` reads [`PAGE`] rows at a time into a channel of that
//! size, so a reader that stops reading holds the stream (HTTP/2 flow control), not the memory.

pub mod storage;

use futures::StreamExt;
use keel_common::db::Pool;
use keel_common::{Resources, Server, Service, ServiceError, Storage, limits};
use keel_protos::video_service::{
    ListVideosRequest, Video, VideoList, VideoRequest,
    video_service_server::{VideoService, VideoServiceServer},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// Consul service name and database name.
pub const SERVICE: &str = "video-lab";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Longest id, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Longest title, author or URL, in characters.
pub const MAX_TEXT_CHARS: usize = 2048;
/// Most ids one `GetVideos` stream may send.
pub const MAX_IDS: usize = 1000;
/// Rows read per query while `ListVideos` streams, and messages queued ahead of the reader.
pub const PAGE: usize = 64;

pub use storage::{Record, Store};

/// The handler.
#[derive(Clone, Debug)]
pub struct VideoLab {
    store: Store,
}

impl VideoLab {
    /// The service over a migrated `pool`.
    pub fn new(pool: Pool) -> Self {
        Self {
            store: Store::new(pool),
        }
    }

    async fn get(&self, id: &str) -> Result<Video, ServiceError> {
        check_id(id)?;
        self.store
            .get(id)
            .await?
            .map(Video::from)
            .ok_or_else(|| ServiceError::NotFound(format!("video {id:?}")))
    }
}

impl From<Record> for Video {
    fn from(r: Record) -> Self {
        Self {
            id: r.id,
            title: r.title,
            author: r.author,
            url: r.url,
            duration: r.duration,
        }
    }
}

fn check_id(id: &str) -> Result<(), ServiceError> {
    if id.is_empty() {
        return Err(ServiceError::invalid("id", "id should be provided"));
    }
    limits::chars("id", id, MAX_ID_CHARS)
}

impl Service for VideoLab {
    const NAME: &'static str = SERVICE;
    const SECTION: &'static str = "video_lab";
    type Settings = ();

    fn storage() -> Storage {
        Storage::database(&MIGRATIONS)
    }

    async fn open(r: Resources<()>) -> anyhow::Result<Self> {
        Ok(Self::new(r.database()?.pool))
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(VideoServiceServer::new(self))
    }
}

/// A stream of answers, fed by a task through a bounded channel.
type Answers = ReceiverStream<Result<Video, Status>>;

#[tonic::async_trait]
impl VideoService for VideoLab {
    async fn add_video(&self, request: Request<Video>) -> Result<Response<Video>, Status> {
        let v = request.into_inner();
        check_id(&v.id)?;
        for (field, value) in [("title", &v.title), ("author", &v.author), ("url", &v.url)] {
            limits::chars(field, value, MAX_TEXT_CHARS)?;
        }
        if v.duration < 0 {
            return Err(ServiceError::invalid(
                "duration",
                format!("{}: seconds, 0 or more", v.duration),
            )
            .into());
        }
        let record = Record {
            id: v.id.clone(),
            title: v.title.clone(),
            author: v.author.clone(),
            url: v.url.clone(),
            duration: v.duration,
        };
        if !self.store.add(&record).await.map_err(ServiceError::from)? {
            return Err(ServiceError::AlreadyExists(format!("video {:?}", v.id)).into());
        }
        Ok(Response::new(v))
    }

    type ListVideosStream = Answers;

    async fn list_videos(
        &self,
        _: Request<ListVideosRequest>,
    ) -> Result<Response<Answers>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(PAGE);
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut after = String::new();
            loop {
                let page = match store.page(&after, PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx.send(Err(ServiceError::from(e).into())).await;
                        return;
                    }
                };
                let last = page.len() < PAGE;
                for r in page {
                    after.clone_from(&r.id);
                    // The reader went away: stop reading the table.
                    if tx.send(Ok(Video::from(r))).await.is_err() {
                        return;
                    }
                }
                if last {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_videos(
        &self,
        request: Request<Streaming<VideoRequest>>,
    ) -> Result<Response<VideoList>, Status> {
        let mut ids = request.into_inner();
        let mut videos = Vec::new();
        while let Some(req) = ids.next().await {
            let req = req?;
            if videos.len() == MAX_IDS {
                return Err(
                    ServiceError::invalid("id", format!("at most {MAX_IDS} ids per call")).into(),
                );
            }
            videos.push(self.get(&req.id).await?);
        }
        Ok(Response::new(VideoList { videos }))
    }

    type GetVideoStream = Answers;

    async fn get_video(
        &self,
        request: Request<Streaming<VideoRequest>>,
    ) -> Result<Response<Answers>, Status> {
        let mut ids = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(PAGE);
        let lab = self.clone();
        tokio::spawn(async move {
            while let Some(req) = ids.next().await {
                let answer = match req {
                    Ok(r) => lab.get(&r.id).await.map_err(Status::from),
                    Err(s) => Err(s),
                };
                let end = answer.is_err();
                if tx.send(answer).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
