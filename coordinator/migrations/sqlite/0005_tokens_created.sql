-- Coordinators read the tokens created since their last look (`tokens_created_since`) on
-- every lease round. Mirrors migrations/postgres/0004_tokens_created.sql.
CREATE INDEX tokens_created_ms ON tokens (created_ms);
