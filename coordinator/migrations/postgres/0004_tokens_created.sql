-- Coordinators read the tokens created since their last look (`tokens_created_since`) on
-- every lease round, so that a token created through another coordinator is in their cache
-- before its agent connects. Mirrors migrations/sqlite/0005_tokens_created.sql.
CREATE INDEX tokens_created_ms ON tokens (created_ms);
