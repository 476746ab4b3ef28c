-- Times are milliseconds since the Unix epoch (KillrVideo keeps millisecond precision); ids canonical UUID text.
CREATE TABLE videos (
    videoid                TEXT PRIMARY KEY,
    userid                 TEXT NOT NULL,
    name                   TEXT NOT NULL,
    description            TEXT NOT NULL,
    location               TEXT NOT NULL,
    location_type          BIGINT NOT NULL,  -- VideoLocationType: 0 YOUTUBE, 1 UPLOAD
    preview_image_location TEXT NOT NULL,
    tags                   TEXT NOT NULL,    -- JSON array, sorted and unique (a Cassandra set<text>)
    added_ms               BIGINT NOT NULL
);

-- A user's videos, newest first (Cassandra: PRIMARY KEY (userid, added_date, videoid), added_date DESC).
CREATE TABLE user_videos (
    userid                 TEXT NOT NULL,
    added_ms               BIGINT NOT NULL,
    videoid                TEXT NOT NULL,
    name                   TEXT NOT NULL,
    preview_image_location TEXT NOT NULL,
    PRIMARY KEY (userid, added_ms, videoid)
);

-- Every video of the last 8 UTC days, newest first; older rows are deleted as new videos arrive (the
-- reference's 7-day TTL).
CREATE TABLE latest_videos (
    added_ms               BIGINT NOT NULL,
    videoid                TEXT NOT NULL,
    userid                 TEXT NOT NULL,
    name                   TEXT NOT NULL,
    preview_image_location TEXT NOT NULL,
    PRIMARY KEY (added_ms, videoid)
);
