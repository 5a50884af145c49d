-- Agents and their handshake keys. The secret is kept as-is because HMAC verification needs it;
-- revoked agents keep their row (audit) with revoked_at_ms set.
-- BYTEA because this file runs on Postgres and SQLite alike: SQLite gives the column NUMERIC
-- affinity, which stores a blob value as given (store::contract checks the bytes round-trip).
CREATE TABLE IF NOT EXISTS agents (
    name          TEXT PRIMARY KEY,
    key_id        TEXT NOT NULL,
    secret        BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    revoked_at_ms BIGINT
);
CREATE INDEX IF NOT EXISTS agents_revoked_at ON agents (revoked_at_ms);
