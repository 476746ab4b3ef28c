-- Named areas in WGS 84 (SRID 4326). The GiST index serves point-in-polygon searches (ST_Contains), the trigram
-- index case-insensitive name searches (ILIKE '%…%'). Both extensions ship with PostgreSQL + PostGIS.
CREATE EXTENSION IF NOT EXISTS postgis;
CREATE EXTENSION IF NOT EXISTS pg_trgm;

CREATE TABLE things (
    id         BIGSERIAL PRIMARY KEY,
    name       TEXT NOT NULL,
    geom       geometry(Geometry, 4326) NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX things_geom ON things USING gist (geom);
CREATE INDEX things_name ON things USING gin (name gin_trgm_ops);
