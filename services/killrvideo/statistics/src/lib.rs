//! KillrVideo `StatisticsService` (spec `killrvideo-semantics.md` §7): RecordPlaybackStarted,
//! GetNumberOfPlays.
//!
//! GetNumberOfPlays answers one `PlayStats` per requested id, in request order, with 0 views for ids never
//! played (the web breaks otherwise); more than 20 ids is INVALID_ARGUMENT. No events. `dry-run: true` metadata
//! on RecordPlaybackStarted validates it and counts nothing.

mod storage;

use keel_common::db::Pool;
use keel_common::{Resources, Server, Service, ServiceError, Storage};
use keel_protos::killrvideo::statistics::{
    GetNumberOfPlaysRequest, GetNumberOfPlaysResponse, PlayStats, RecordPlaybackStartedRequest,
    RecordPlaybackStartedResponse,
    statistics_service_server::{StatisticsService, StatisticsServiceServer},
};
use killrvideo::{MAX_IDS_PER_REQUEST, ids};
use tonic::{Request, Response, Status};

pub use storage::Store;

/// Consul service name and database name.
pub const SERVICE: &str = "statistics";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The gRPC handler: a thin adapter over [`Store`].
#[derive(Clone, Debug)]
pub struct Statistics {
    store: Store,
}

impl Statistics {
    /// The service over `pool` (already migrated).
    pub fn new(pool: Pool) -> Self {
        Self {
            store: Store::new(pool),
        }
    }
}

impl Service for Statistics {
    const NAME: &'static str = SERVICE;
    type Settings = ();

    fn storage() -> Storage {
        Storage::database(&MIGRATIONS)
    }

    async fn open(r: Resources<()>) -> anyhow::Result<Self> {
        let db = r.database()?;
        Ok(Self::new(db.pool))
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(StatisticsServiceServer::new(self))
    }
}

#[tonic::async_trait]
impl StatisticsService for Statistics {
    async fn record_playback_started(
        &self,
        request: Request<RecordPlaybackStartedRequest>,
    ) -> Result<Response<RecordPlaybackStartedResponse>, Status> {
        let video = ids::required("video_id", request.get_ref().video_id.as_ref())?;
        if keel_common::context::is_dry_run(&request) {
            return Ok(Response::new(RecordPlaybackStartedResponse {}));
        }
        self.store
            .record_play(video)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(RecordPlaybackStartedResponse {}))
    }

    async fn get_number_of_plays(
        &self,
        request: Request<GetNumberOfPlaysRequest>,
    ) -> Result<Response<GetNumberOfPlaysResponse>, Status> {
        let r = request.into_inner();
        let ids = ids::required_list(
            "video_ids",
            &r.video_ids,
            &format!("Cannot do a get more than {MAX_IDS_PER_REQUEST} videos at once"),
        )?;
        let stats = self
            .store
            .plays(&ids)
            .await
            .map_err(ServiceError::from)?
            .into_iter()
            .map(|(id, views)| PlayStats {
                video_id: Some(ids::uuid(id)),
                views,
            })
            .collect();
        Ok(Response::new(GetNumberOfPlaysResponse { stats }))
    }
}
