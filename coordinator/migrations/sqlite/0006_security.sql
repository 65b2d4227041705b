-- `INSERT OR REPLACE` would delete an audit row and insert another under its id without the
-- delete trigger firing (SQLite fires delete triggers for REPLACE only with recursive
-- triggers on): refuse any insert that names an existing id.
CREATE TRIGGER audit_no_replace BEFORE INSERT ON audit
WHEN EXISTS (SELECT 1 FROM audit WHERE id = NEW.id)
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;

-- Coordinators re-read the tokens revoked since their last look every lease round.
CREATE INDEX tokens_revoked_ms ON tokens (revoked_ms) WHERE revoked_ms IS NOT NULL;
