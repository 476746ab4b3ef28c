-- The suggestions read model, built only from YouTubeVideoAdded and UserRatedVideo events.
CREATE TABLE sv_videos (
    videoid                TEXT PRIMARY KEY,
    userid                 TEXT NOT NULL,
    name                   TEXT NOT NULL,
    preview_image_location TEXT NOT NULL,
    added_ms               BIGINT NOT NULL
);

CREATE TABLE sv_video_tags (
    videoid TEXT NOT NULL,
    tag     TEXT NOT NULL, -- lowercase
    PRIMARY KEY (videoid, tag)
);
CREATE INDEX sv_video_tags_by_tag ON sv_video_tags (tag);

-- A user's latest rating of a video.
CREATE TABLE sv_ratings (
    userid  TEXT NOT NULL,
    videoid TEXT NOT NULL,
    rating  BIGINT NOT NULL,
    PRIMARY KEY (userid, videoid)
);
CREATE INDEX sv_ratings_by_video ON sv_ratings (videoid);
