CREATE TABLE video_ratings (
    videoid        TEXT PRIMARY KEY,
    rating_counter BIGINT NOT NULL,
    rating_total   BIGINT NOT NULL
);

CREATE TABLE video_ratings_by_user (
    videoid TEXT NOT NULL,
    userid  TEXT NOT NULL,
    rating  BIGINT NOT NULL,
    PRIMARY KEY (videoid, userid)
);
