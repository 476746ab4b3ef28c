-- Reservations and releases sent with an idempotency key (ReserveKeysReq.reservation_id,
-- ReleaseKeysReq.release_id), so a call retried, or undone by a caller that never heard its answer, changes
-- used_cache_keys exactly once. Rows older than ten minutes are deleted (accounts::storage::RETENTION).
CREATE TABLE quota_operations (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    key_count  BIGINT NOT NULL,  -- keys the reservation took, or the release gave back
    cancelled  BIGINT NOT NULL,  -- 1: a reservation undone, or cancelled before it arrived
    created_ms BIGINT NOT NULL
);
CREATE INDEX quota_operations_created ON quota_operations (created_ms);
