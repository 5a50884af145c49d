-- A route may be pinned to one node (NULL: every node listens). Lets nodes that share a host, or
-- that each own an address, serve different routes.
ALTER TABLE routes ADD COLUMN node TEXT;
