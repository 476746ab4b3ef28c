-- Tokens are stored as SHA-256 hex digests (they are 256-bit random secrets, so a fast hash is enough);
-- used_cache_keys is the quota counter every cache instance reserves from.
CREATE TABLE accounts (
    id              TEXT PRIMARY KEY,  -- UUIDv7: time ordered
    name            TEXT NOT NULL,
    token_hash      TEXT NOT NULL UNIQUE,
    max_cache_keys  BIGINT NOT NULL,
    used_cache_keys BIGINT NOT NULL,
    created_ms      BIGINT NOT NULL
);
