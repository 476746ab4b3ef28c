CREATE TABLE videos (
    id       TEXT PRIMARY KEY,
    title    TEXT NOT NULL,
    author   TEXT NOT NULL,
    url      TEXT NOT NULL,
    duration INTEGER NOT NULL
);
