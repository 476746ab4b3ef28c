-- Credentials keyed by email: the primary key is what makes email uniqueness hold under concurrent creates.
CREATE TABLE user_credentials (
    email    TEXT PRIMARY KEY,
    password TEXT NOT NULL, -- argon2id PHC string
    userid   TEXT NOT NULL
);

CREATE TABLE users (
    userid     TEXT PRIMARY KEY,
    firstname  TEXT NOT NULL,
    lastname   TEXT NOT NULL,
    email      TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
