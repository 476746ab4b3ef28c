//! Named areas in the service's own PostgreSQL + PostGIS database: a GiST index answers `ST_Contains`, a trigram
//! index answers name searches (migrations). Geometries are WGS 84 (SRID 4326), longitude first.

use keel_common::db;
use keel_common::db::Pool;
use sqlx::Row;

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

/// One stored area, as searches return it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Thing {
    /// Its id.
    pub id: i64,
    /// Its name.
    pub name: String,
}

/// One page of a search.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The things of the page, by name then id.
    pub things: Vec<Thing>,
    /// Whether a further page has at least one thing.
    pub has_more: bool,
}

/// What PostGIS makes of a WKT text.
#[derive(Clone, Debug, PartialEq)]
pub struct Shape {
    /// `GeometryType`, e.g. `POLYGON`.
    pub kind: String,
    /// `ST_IsValidReason`: `Valid Geometry`, or why not.
    pub validity: String,
    /// Bounding box: x min, x max, y min, y max (degrees).
    pub bounds: [f64; 4],
    /// `ST_NPoints`: its vertices.
    pub points: i64,
}

/// The things table.
#[derive(Clone, Debug)]
pub struct Store {
    pool: Pool,
}

impl Store {
    /// The store over a migrated PostgreSQL `pool`.
    pub fn new(pool: Pool) -> Self {
        Self { pool }
    }

    /// How many things are stored.
    ///
    /// # Errors
    /// Database failures.
    pub async fn count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query("SELECT COUNT(*) FROM things")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)
    }

    /// Parses `wkt` with PostGIS, repaired as [`Store::add`] would store it with `make_valid`: `Ok(Err(why))`
    /// when it is not WKT PostGIS can read.
    ///
    /// # Errors
    /// Database failures other than the text's.
    pub async fn inspect(
        &self,
        wkt: &str,
        make_valid: bool,
    ) -> Result<Result<Shape, String>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT GeometryType(g), ST_IsValidReason(g), \
             COALESCE(ST_XMin(g), 0), COALESCE(ST_XMax(g), 0), COALESCE(ST_YMin(g), 0), COALESCE(ST_YMax(g), 0), \
             ST_NPoints(g)::BIGINT FROM (SELECT CASE WHEN $2 AND NOT ST_IsValid(p) \
               THEN ST_CollectionExtract(ST_MakeValid(p), 3) ELSE p END AS g \
             FROM (SELECT ST_GeomFromText($1, 4326) AS p) AS parsed) AS t",
        )
        .bind(wkt)
        .bind(make_valid)
        .fetch_one(&self.pool)
        .await;
        let row = match row {
            Ok(row) => row,
            // The only input is the text: PostGIS could not parse it.
            Err(sqlx::Error::Database(d)) => return Ok(Err(d.message().to_owned())),
            Err(other) => return Err(other),
        };
        Ok(Ok(Shape {
            kind: row.try_get(0)?,
            validity: row.try_get(1)?,
            bounds: [
                row.try_get(2)?,
                row.try_get(3)?,
                row.try_get(4)?,
                row.try_get(5)?,
            ],
            points: row.try_get(6)?,
        }))
    }

    /// One page of the things matching `q`, by name then id; `has_more` from one extra row, not a second
    /// query.
    ///
    /// Each shape of search (a point, a name, both, neither) is a statement of its own, so that the prepared
    /// statement's generic plan uses the GiST or the trigram index (one statement with `($1 OR ST_Contains(…))`
    /// cannot: PostgreSQL planned it anew on every call).
    ///
    /// # Errors
    /// Database failures.
    pub async fn search(&self, q: &Query) -> Result<Page, sqlx::Error> {
        let query = match (&q.point, &q.name_pattern) {
            (Some((lng, lat)), None) => sqlx::query(
                "SELECT id, name FROM things \
                 WHERE ST_Contains(geom, ST_SetSRID(ST_MakePoint($3, $4), 4326)) \
                 ORDER BY name, id LIMIT $1 OFFSET $2",
            )
            .bind(q.limit + 1)
            .bind(q.offset)
            .bind(*lng)
            .bind(*lat),
            (None, Some(name)) => sqlx::query(
                "SELECT id, name FROM things WHERE name ILIKE $3 ORDER BY name, id LIMIT $1 OFFSET $2",
            )
            .bind(q.limit + 1)
            .bind(q.offset)
            .bind(name.clone()),
            (Some((lng, lat)), Some(name)) => sqlx::query(
                "SELECT id, name FROM things \
                 WHERE ST_Contains(geom, ST_SetSRID(ST_MakePoint($3, $4), 4326)) AND name ILIKE $5 \
                 ORDER BY name, id LIMIT $1 OFFSET $2",
            )
            .bind(q.limit + 1)
            .bind(q.offset)
            .bind(*lng)
            .bind(*lat)
            .bind(name.clone()),
            (None, None) => {
                sqlx::query("SELECT id, name FROM things ORDER BY name, id LIMIT $1 OFFSET $2")
                    .bind(q.limit + 1)
                    .bind(q.offset)
            }
        };
        let rows = query.fetch_all(&self.pool).await?;
        let mut things = rows
            .iter()
            .map(|r| {
                Ok(Thing {
                    id: r.try_get(0)?,
                    name: r.try_get(1)?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()?;
        let has_more = things.len() as i64 > q.limit;
        things.truncate(usize::try_from(q.limit).unwrap_or(0));
        Ok(Page { things, has_more })
    }

    /// Stores a thing named `name` covering `wkt` (already inspected), with `make_valid` as ST_MakeValid's
    /// polygons when it is invalid; returns its id.
    ///
    /// # Errors
    /// Database failures.
    pub async fn add(&self, name: &str, wkt: &str, make_valid: bool) -> Result<i64, sqlx::Error> {
        sqlx::query(
            "INSERT INTO things (name, geom, created_ms) \
             SELECT $1, CASE WHEN $3 AND NOT ST_IsValid(p) \
               THEN ST_CollectionExtract(ST_MakeValid(p), 3) ELSE p END, $4 \
             FROM (SELECT ST_GeomFromText($2, 4326) AS p) AS parsed \
             RETURNING id",
        )
        .bind(name)
        .bind(wkt)
        .bind(make_valid)
        .bind(db::now_ms())
        .fetch_one(&self.pool)
        .await?
        .try_get(0)
    }

    /// Whether thing `id` exists.
    ///
    /// # Errors
    /// Database failures.
    pub async fn exists(&self, id: i64) -> Result<bool, sqlx::Error> {
        Ok(sqlx::query("SELECT id FROM things WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Deletes thing `id`; false when there was none.
    ///
    /// # Errors
    /// Database failures.
    pub async fn delete(&self, id: i64) -> Result<bool, sqlx::Error> {
        Ok(sqlx::query("DELETE FROM things WHERE id = $1 RETURNING id")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }
}
