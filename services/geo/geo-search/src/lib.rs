//! The geo-search service of `shared/seeds/001_python_microservice_stack.txt`: named areas ("things", polygons
//! in WGS 84) in PostgreSQL + PostGIS, found by a point inside them and/or by part of their name.
//! Wire-compatible with the post's `search.proto` (no package: `/Search/search`, `/Search/monitor`), plus
//! `AddThing` and `DeleteThing` to maintain the data.
//!
//! - `search`: things whose polygon contains (`lat`, `lng`) — PostGIS `ST_Contains`, so a point exactly on the
//!   boundary is not inside — unless `any_location`; and whose name contains `query`, case-insensitive, when it
//!   is not empty. Ordered by name, then id; `page_number` from 1, `result_per_page` 1..=100 (0: 10). The post's
//!   server built `POINT(lat lng)`; WKT and PostGIS put longitude first, as here.
//! - `AddThing`: WKT `POLYGON` or `MULTIPOLYGON`, longitude first; anything else, an invalid polygon
//!   (PostGIS's `ST_IsValidReason` says why) or coordinates out of range is INVALID_ARGUMENT on field `wkt`.
//! - `dry-run: true` on AddThing/DeleteThing validates and answers without writing.
//!
//! PostGIS has no SQLite counterpart here: the service refuses to start on an SQLite `database.url`.

pub mod storage;

use keel_common::db::Pool;
use keel_common::{
    Resources, Server, Service, ServiceError, Settings, Storage, config::ConfigError,
    context::is_dry_run, db::Backend,
};
use keel_protos::geo::{
    AddThingRequest, AddThingResponse, DeleteThingRequest, MonitorResponse, SearchRequest,
    SearchResponse, SearchResponses,
    search_server::{Search, SearchServer},
};
use tonic::{Request, Response, Status};

pub use storage::{Page, Query, Shape, Store, Thing};

/// Consul service name and database name.
pub const SERVICE: &str = "geo-search";

/// The migrations of this service's database (they create the `postgis` and `pg_trgm` extensions).
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Longest name of a thing, in characters.
pub const MAX_NAME_CHARS: usize = 256;
/// Longest WKT text, in bytes (checked before PostGIS parses it).
pub const MAX_WKT_BYTES: usize = 1 << 20;
/// Most vertices of a thing's geometry (every search tests points against them).
pub const MAX_VERTICES: i64 = 10_000;

/// Results per page when the request asks for none.
pub const DEFAULT_PAGE: i32 = 10;
/// Most results per page.
pub const MAX_PAGE: i32 = 100;
/// Deepest result a search may page to (`page_number × result_per_page`): deeper OFFSETs cost the database
/// more than any client needs; narrow the search instead.
pub const MAX_DEPTH: i64 = 10_000;

/// The gRPC handler: a thin adapter over [`Store`].
#[derive(Clone, Debug)]
pub struct GeoSearch {
    store: Store,
}

impl Query {
    /// Validates `r`.
    ///
    /// # Errors
    /// INVALID_ARGUMENT naming the field: a coordinate out of range or not a number, a negative page, a page
    /// size over [`MAX_PAGE`], or a page deeper than [`MAX_DEPTH`].
    pub fn of(r: &SearchRequest) -> Result<Self, ServiceError> {
        let point = if r.any_location {
            None
        } else {
            let (lat, lng) = (f64::from(r.lat), f64::from(r.lng));
            if !(-90.0..=90.0).contains(&lat) {
                return Err(ServiceError::invalid(
                    "lat",
                    format!("{lat}: must be within -90..90 degrees"),
                ));
            }
            if !(-180.0..=180.0).contains(&lng) {
                return Err(ServiceError::invalid(
                    "lng",
                    format!("{lng}: must be within -180..180 degrees"),
                ));
            }
            Some((lng, lat))
        };
        let limit = match r.result_per_page {
            0 => DEFAULT_PAGE,
            n if (1..=MAX_PAGE).contains(&n) => n,
            n => {
                return Err(ServiceError::invalid(
                    "result_per_page",
                    format!("{n}: must be within 1..{MAX_PAGE} (0: {DEFAULT_PAGE})"),
                ));
            }
        };
        if r.page_number < 0 {
            return Err(ServiceError::invalid("page_number", "must not be negative"));
        }
        let offset = i64::from(r.page_number.max(1) - 1) * i64::from(limit);
        if offset + i64::from(limit) > MAX_DEPTH {
            return Err(ServiceError::invalid(
                "page_number",
                format!(
                    "page {} of {limit} goes past result {MAX_DEPTH}: narrow the search",
                    r.page_number
                ),
            ));
        }
        let query = r.query.trim();
        let name_pattern = (!query.is_empty()).then(|| {
            let escaped = query
                .replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_");
            format!("%{escaped}%")
        });
        Ok(Self {
            point,
            name_pattern,
            offset,
            limit: i64::from(limit),
        })
    }
}

impl GeoSearch {
    /// The service over `pool` (PostgreSQL with PostGIS, migrated).
    pub fn new(pool: Pool) -> Self {
        Self {
            store: Store::new(pool),
        }
    }

    /// Checks `wkt` as a polygon in range (with `make_valid`: as PostGIS repairs it).
    async fn validate(&self, wkt: &str, make_valid: bool) -> Result<(), ServiceError> {
        let bad = |why: String| ServiceError::invalid("wkt", why);
        if wkt.trim().is_empty() {
            return Err(bad("a WKT POLYGON or MULTIPOLYGON is required".into()));
        }
        keel_common::limits::bytes("wkt", wkt, MAX_WKT_BYTES)?;
        let shape = match self.store.inspect(wkt, make_valid).await? {
            Ok(shape) => shape,
            Err(why) => return Err(bad(format!("not WKT: {why}"))),
        };
        if shape.kind != "POLYGON" && shape.kind != "MULTIPOLYGON" {
            return Err(bad(format!(
                "{}: expected POLYGON or MULTIPOLYGON",
                shape.kind
            )));
        }
        if shape.points > MAX_VERTICES {
            return Err(bad(format!(
                "{} vertices: at most {MAX_VERTICES}",
                shape.points
            )));
        }
        if shape.points == 0 {
            return Err(bad("no area left once made valid".into()));
        }
        if shape.validity != "Valid Geometry" {
            return Err(bad(format!("invalid polygon: {}", shape.validity)));
        }
        let [x0, x1, y0, y1] = shape.bounds;
        if x0 < -180.0 || x1 > 180.0 || y0 < -90.0 || y1 > 90.0 {
            return Err(bad(format!(
                "coordinates must be longitude -180..180 then latitude -90..90; these span {x0}..{x1}, {y0}..{y1}"
            )));
        }
        Ok(())
    }
}

impl Service for GeoSearch {
    const NAME: &'static str = SERVICE;
    type Settings = ();

    /// `database.url` must be PostgreSQL (PostGIS): SQLite cannot answer `ST_Contains`.
    fn check(settings: &Settings) -> Vec<ConfigError> {
        if Backend::of_url(&settings.database_url_of(SERVICE)) == Backend::Postgres {
            return Vec::new();
        }
        vec![ConfigError {
            key: "database.url".into(),
            message: format!(
                "{SERVICE} needs PostgreSQL with PostGIS: set database.url (KEEL_DATABASE__URL) to a postgres:// URL"
            ),
        }]
    }

    fn storage() -> Storage {
        Storage::database(&MIGRATIONS)
    }

    async fn open(r: Resources<()>) -> anyhow::Result<Self> {
        Ok(Self::new(r.database()?.pool))
    }

    fn add_to(self, server: Server) -> Server {
        server.add_service(SearchServer::new(self))
    }
}

#[tonic::async_trait]
impl Search for GeoSearch {
    async fn monitor(&self, _: Request<()>) -> Result<Response<MonitorResponse>, Status> {
        let n = self.store.count().await.map_err(ServiceError::from)?;
        Ok(Response::new(MonitorResponse {
            n_things: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn search(
        &self,
        request: Request<SearchRequest>,
    ) -> Result<Response<SearchResponses>, Status> {
        let q = Query::of(request.get_ref())?;
        let page = self.store.search(&q).await.map_err(ServiceError::from)?;
        Ok(Response::new(SearchResponses {
            responses: page
                .things
                .into_iter()
                .map(|t| SearchResponse {
                    id: t.id,
                    response: t.name,
                })
                .collect(),
            has_more: page.has_more,
        }))
    }

    async fn add_thing(
        &self,
        request: Request<AddThingRequest>,
    ) -> Result<Response<AddThingResponse>, Status> {
        let dry_run = is_dry_run(&request);
        let r = request.into_inner();
        let name = r.name.trim();
        if name.is_empty() {
            return Err(ServiceError::invalid("name", "name should be provided").into());
        }
        keel_common::limits::chars("name", name, MAX_NAME_CHARS)?;
        self.validate(&r.wkt, r.make_valid).await?;
        if dry_run {
            return Ok(Response::new(AddThingResponse { id: 0 }));
        }
        let id = self
            .store
            .add(name, &r.wkt, r.make_valid)
            .await
            .map_err(ServiceError::from)?;
        Ok(Response::new(AddThingResponse { id }))
    }

    async fn delete_thing(
        &self,
        request: Request<DeleteThingRequest>,
    ) -> Result<Response<()>, Status> {
        let dry_run = is_dry_run(&request);
        let id = request.into_inner().id;
        let found = if dry_run {
            self.store.exists(id).await
        } else {
            self.store.delete(id).await
        }
        .map_err(ServiceError::from)?;
        if found {
            Ok(Response::new(()))
        } else {
            Err(ServiceError::NotFound(format!("no thing with id {id}")).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(f: impl FnOnce(&mut SearchRequest)) -> SearchRequest {
        let mut r = SearchRequest::default();
        f(&mut r);
        r
    }

    #[test]
    fn queries_are_validated_and_paged() {
        let q = Query::of(&req(|r| {
            r.lat = 48.85;
            r.lng = 2.35;
            r.query = " 50%_off\\ ".into();
            r.page_number = 3;
            r.result_per_page = 20;
        }))
        .unwrap();
        assert_eq!(
            q.point,
            Some((f64::from(2.35f32), f64::from(48.85f32))),
            "longitude first"
        );
        assert_eq!(q.name_pattern.as_deref(), Some("%50\\%\\_off\\\\%"));
        assert_eq!((q.offset, q.limit), (40, 20));
        let first = Query::of(&req(|r| r.any_location = true)).unwrap();
        assert_eq!(
            (first.point, first.name_pattern, first.offset, first.limit),
            (None, None, 0, 10)
        );

        let field = |r: SearchRequest| match Query::of(&r) {
            Err(ServiceError::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(req(|r| r.lat = 91.0)), "lat");
        assert_eq!(field(req(|r| r.lng = f32::NAN)), "lng");
        assert_eq!(field(req(|r| r.result_per_page = 101)), "result_per_page");
        assert_eq!(field(req(|r| r.page_number = -1)), "page_number");
        assert_eq!(
            field(req(|r| {
                r.page_number = 101;
                r.result_per_page = 100;
            })),
            "page_number"
        );
        assert!(
            Query::of(&req(|r| {
                r.lat = 91.0;
                r.any_location = true;
            }))
            .is_ok(),
            "the point is not read when any_location"
        );
    }
}
