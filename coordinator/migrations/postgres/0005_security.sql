-- Coordinators re-read the tokens revoked since their last look every lease round.
-- Mirrors migrations/sqlite/0006_security.sql (Postgres needs no REPLACE guard: it has no
-- conflict resolution that deletes rows behind the triggers).
CREATE INDEX tokens_revoked_ms ON tokens (revoked_ms) WHERE revoked_ms IS NOT NULL;
