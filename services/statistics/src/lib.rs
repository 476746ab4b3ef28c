//! KillrVideo `StatisticsService` (spec `killrvideo-semantics.md` §7): RecordPlaybackStarted,
//! GetNumberOfPlays.
//!
//! GetNumberOfPlays answers one `PlayStats` per requested id, in request order, with 0 views for ids never
//! played (the web breaks otherwise); more than 20 ids is INVALID_ARGUMENT. No events. `dry-run: true` metadata
//! on RecordPlaybackStarted validates it and counts nothing.

use keel_common::{Platform, Server, ServiceError, db};
use keel_protos::killrvideo::statistics::{
    GetNumberOfPlaysRequest, GetNumberOfPlaysResponse, PlayStats, RecordPlaybackStartedRequest,
    RecordPlaybackStartedResponse,
    statistics_service_server::{StatisticsService, StatisticsServiceServer},
};
use killrvideo::{MAX_IDS_PER_REQUEST, ids, sql::Sql};
use sqlx::{AnyPool, Row};
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// Consul service name and database name.
pub const SERVICE: &str = "statistics";

/// The migrations of this service's database.
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The gRPC handler and its storage.
#[derive(Clone, Debug)]
pub struct Statistics {
    pool: AnyPool,
}

impl Statistics {
    /// The service over `pool` (already migrated).
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Opens this service's database (migrated).
    ///
    /// # Errors
    /// The database cannot be opened or migrated.
    pub async fn open(platform: &Platform) -> anyhow::Result<Self> {
        let (pool, _outbox) = killrvideo::open_database(platform, SERVICE, &MIGRATIONS).await?;
        Ok(Self::new(pool))
    }

    /// Adds this service to `server`, with its database as a readiness check.
    pub fn add_to(self, server: Server) -> Server {
        let ping = db::ping(&self.pool);
        server
            .add_service(StatisticsServiceServer::new(self))
            .readiness("statistics database", ping)
    }

    /// Views of each of `ids` (0 when never played), in order.
    ///
    /// # Errors
    /// Database failures.
    pub async fn plays(&self, ids: &[Uuid]) -> Result<Vec<(Uuid, i64)>, sqlx::Error> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql =
            Sql::new("SELECT videoid, views FROM video_playback_stats WHERE videoid IN (");
        let list = sql.bind_list(ids.iter().copied());
        sql.push(&list).push(")");
        let rows = sql.query().fetch_all(&self.pool).await?;
        let mut found = std::collections::HashMap::new();
        for r in rows {
            found.insert(r.try_get::<String, _>(0)?, r.try_get::<i64, _>(1)?);
        }
        Ok(ids
            .iter()
            .map(|id| {
                (
                    *id,
                    found
                        .get(&id.hyphenated().to_string())
                        .copied()
                        .unwrap_or(0),
                )
            })
            .collect())
    }
}

/// The statistics server of `platform` (its own process).
///
/// # Errors
/// As [`Statistics::open`].
pub async fn build(platform: &Platform) -> anyhow::Result<Server> {
    Ok(Statistics::open(platform)
        .await?
        .add_to(Server::builder(platform)))
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
        sqlx::query(
            "INSERT INTO video_playback_stats (videoid, views) VALUES ($1, 1) \
             ON CONFLICT (videoid) DO UPDATE SET views = video_playback_stats.views + 1",
        )
        .bind(video.hyphenated().to_string())
        .execute(&self.pool)
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
