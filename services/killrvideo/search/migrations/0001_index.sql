-- The search read model, built only from YouTubeVideoAdded events (this service never reads another's tables).
CREATE TABLE search_videos (
    videoid                TEXT PRIMARY KEY,
    userid                 TEXT NOT NULL,
    name                   TEXT NOT NULL,
    preview_image_location TEXT NOT NULL,
    added_ms               BIGINT NOT NULL
);

-- One row per (word, video): weight = 4 if the word is in the name + 2 if in a tag + 1 if in the description
-- (Solr's edismax `name^2 tags^1 description` spirit).
CREATE TABLE search_terms (
    term    TEXT NOT NULL,
    videoid TEXT NOT NULL,
    weight  BIGINT NOT NULL,
    PRIMARY KEY (term, videoid)
);
CREATE INDEX search_terms_by_video ON search_terms (videoid);

-- Query suggestions: lowercase tags and name words.
CREATE TABLE search_suggestions (
    term TEXT PRIMARY KEY
);
