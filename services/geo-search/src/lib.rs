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

use keel_common::{
    Platform, Server, ServiceError,
    context::is_dry_run,
    db::{self, Backend},
};
use keel_protos::geo::{
    AddThingRequest, AddThingResponse, DeleteThingRequest, MonitorResponse, SearchRequest,
    SearchResponse, SearchResponses,
    search_server::{Search, SearchServer},
};
use sqlx::{AnyPool, Row};
use tonic::{Request, Response, Status};

/// Consul service name and database name.
pub const SERVICE: &str = "geo-search";

/// The migrations of this service's database (they create the `postgis` and `pg_trgm` extensions).
pub static MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Results per page when the request asks for none.
pub const DEFAULT_PAGE: i32 = 10;
/// Most results per page.
pub const MAX_PAGE: i32 = 100;
/// Deepest result a search may page to (`page_number × result_per_page`): deeper OFFSETs cost the database
/// more than any client needs; narrow the search instead.
pub const MAX_DEPTH: i64 = 10_000;

/// The gRPC handler and its storage.
#[derive(Clone, Debug)]
pub struct GeoSearch {
    pool: AnyPool,
}

/// A search, validated.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// (longitude, latitude) the things must contain; `None`: anywhere.
    pub point: Option<(f64, f64)>,
    /// Part of the name, as a LIKE pattern (`%`, `_` and `\` escaped); `None`: any name.
    pub name_pattern: Option<String>,
    /// Rows to skip.
    pub offset: i64,
    /// Rows of the page.
    pub limit: i64,
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
    pub fn new(pool: AnyPool) -> Self {
        Self { pool }
    }

    /// Opens this service's database (migrated).
    ///
    /// # Errors
    /// `database.url` is not PostgreSQL, or the database cannot be opened or migrated (PostGIS missing).
    pub async fn open(platform: &Platform) -> anyhow::Result<Self> {
        let url = platform.settings.database_url_of(SERVICE);
        if Backend::of_url(&url) != Backend::Postgres {
            anyhow::bail!(
                "{SERVICE} needs PostgreSQL with PostGIS: set database.url (KEEL_DATABASE__URL) to a postgres:// URL"
            );
        }
        Ok(Self::new(
            db::connect(&platform.settings, SERVICE, &MIGRATIONS).await?,
        ))
    }

    /// Adds this service to `server`, with its database as a readiness check.
    pub fn add_to(self, server: Server) -> Server {
        let ping = db::ping(&self.pool);
        server
            .add_service(SearchServer::new(self))
            .readiness("geo-search database", ping)
    }

    /// Checks `wkt` as a polygon in range.
    async fn validate(&self, wkt: &str) -> Result<(), ServiceError> {
        let bad = |why: String| ServiceError::invalid("wkt", why);
        if wkt.trim().is_empty() {
            return Err(bad("a WKT POLYGON or MULTIPOLYGON is required".into()));
        }
        let row = sqlx::query(
            "SELECT GeometryType(g), ST_IsValidReason(g), ST_XMin(g), ST_XMax(g), ST_YMin(g), ST_YMax(g) \
             FROM (SELECT ST_GeomFromText($1, 4326) AS g) AS t",
        )
        .bind(wkt)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| match e {
            // The only input is the text: PostGIS could not parse it.
            sqlx::Error::Database(d) => bad(format!("not WKT: {}", d.message())),
            other => other.into(),
        })?;
        let kind: String = row.try_get(0)?;
        if kind != "POLYGON" && kind != "MULTIPOLYGON" {
            return Err(bad(format!("{kind}: expected POLYGON or MULTIPOLYGON")));
        }
        let reason: String = row.try_get(1)?;
        if reason != "Valid Geometry" {
            return Err(bad(format!("invalid polygon: {reason}")));
        }
        let (x0, x1, y0, y1): (f64, f64, f64, f64) = (
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
            row.try_get(5)?,
        );
        if x0 < -180.0 || x1 > 180.0 || y0 < -90.0 || y1 > 90.0 {
            return Err(bad(format!(
                "coordinates must be longitude -180..180 then latitude -90..90; these span {x0}..{x1}, {y0}..{y1}"
            )));
        }
        Ok(())
    }
}

/// The geo-search server of `platform` (its own process).
///
/// # Errors
/// As [`GeoSearch::open`].
pub async fn build(platform: &Platform) -> anyhow::Result<Server> {
    Ok(GeoSearch::open(platform)
        .await?
        .add_to(Server::builder(platform)))
}

#[tonic::async_trait]
impl Search for GeoSearch {
    async fn monitor(&self, _: Request<()>) -> Result<Response<MonitorResponse>, Status> {
        let n: i64 = sqlx::query("SELECT COUNT(*) FROM things")
            .fetch_one(&self.pool)
            .await
            .and_then(|r| r.try_get(0))
            .map_err(ServiceError::from)?;
        Ok(Response::new(MonitorResponse {
            n_things: i32::try_from(n).unwrap_or(i32::MAX),
        }))
    }

    async fn search(
        &self,
        request: Request<SearchRequest>,
    ) -> Result<Response<SearchResponses>, Status> {
        let q = Query::of(request.get_ref())?;
        let (lng, lat) = q.point.unwrap_or_default();
        let rows = sqlx::query(
            "SELECT id, name FROM things \
             WHERE ($1 OR ST_Contains(geom, ST_SetSRID(ST_MakePoint($2, $3), 4326))) \
               AND ($4 OR name ILIKE $5) \
             ORDER BY name, id LIMIT $6 OFFSET $7",
        )
        .bind(q.point.is_none())
        .bind(lng)
        .bind(lat)
        .bind(q.name_pattern.is_none())
        .bind(q.name_pattern.clone().unwrap_or_default())
        .bind(q.limit + 1)
        .bind(q.offset)
        .fetch_all(&self.pool)
        .await
        .map_err(ServiceError::from)?;
        let mut responses = rows
            .iter()
            .map(|r| {
                Ok(SearchResponse {
                    id: r.try_get(0)?,
                    response: r.try_get(1)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(ServiceError::from)?;
        let has_more = responses.len() as i64 > q.limit;
        responses.truncate(q.limit as usize);
        Ok(Response::new(SearchResponses {
            responses,
            has_more,
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
        self.validate(&r.wkt).await?;
        if dry_run {
            return Ok(Response::new(AddThingResponse { id: 0 }));
        }
        let id: i64 = sqlx::query(
            "INSERT INTO things (name, geom, created_ms) VALUES ($1, ST_GeomFromText($2, 4326), $3) \
             RETURNING id",
        )
        .bind(name)
        .bind(&r.wkt)
        .bind(db::now_ms())
        .fetch_one(&self.pool)
        .await
        .and_then(|row| row.try_get(0))
        .map_err(ServiceError::from)?;
        Ok(Response::new(AddThingResponse { id }))
    }

    async fn delete_thing(
        &self,
        request: Request<DeleteThingRequest>,
    ) -> Result<Response<()>, Status> {
        let dry_run = is_dry_run(&request);
        let id = request.into_inner().id;
        let sql = if dry_run {
            "SELECT id FROM things WHERE id = $1"
        } else {
            "DELETE FROM things WHERE id = $1 RETURNING id"
        };
        let found = sqlx::query(sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(ServiceError::from)?;
        match found {
            Some(_) => Ok(Response::new(())),
            None => Err(ServiceError::NotFound(format!("no thing with id {id}")).into()),
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
