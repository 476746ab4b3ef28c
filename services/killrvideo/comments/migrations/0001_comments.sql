-- Comments newest first. `sortkey` is the comment id's 60-bit timestamp (15 hex digits) then the id: text order
-- is Cassandra's timeuuid order. Times are milliseconds since the Unix epoch.
CREATE TABLE comments_by_video (
    videoid    TEXT NOT NULL,
    sortkey    TEXT NOT NULL,
    commentid  TEXT NOT NULL,
    userid     TEXT NOT NULL,
    comment    TEXT NOT NULL,
    comment_ms BIGINT NOT NULL,
    PRIMARY KEY (videoid, sortkey)
);

CREATE TABLE comments_by_user (
    userid     TEXT NOT NULL,
    sortkey    TEXT NOT NULL,
    commentid  TEXT NOT NULL,
    videoid    TEXT NOT NULL,
    comment    TEXT NOT NULL,
    comment_ms BIGINT NOT NULL,
    PRIMARY KEY (userid, sortkey)
);
