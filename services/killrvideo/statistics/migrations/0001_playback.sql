CREATE TABLE video_playback_stats (
    videoid TEXT PRIMARY KEY,
    views   BIGINT NOT NULL
);
