-- TCP routes: a gateway listen address mapped to one agent's named service.
CREATE TABLE IF NOT EXISTS routes (
    listen        TEXT PRIMARY KEY,
    agent         TEXT NOT NULL,
    service       TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
