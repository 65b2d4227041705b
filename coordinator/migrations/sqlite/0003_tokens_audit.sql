-- Scoped bootstrap tokens, revocable API tokens, and an audit log the database keeps
-- append-only.

-- The token's scope as JSON (`TokenScope`), NULL when the token admits any agent.
ALTER TABLE tokens ADD COLUMN scope TEXT;

-- API tokens can be revoked; the row stays so the list and the audit log keep naming it.
ALTER TABLE api_tokens ADD COLUMN revoked_ms INTEGER;

-- The audit actor of an API token is `api:<name>`; unique names (never reused, revoked tokens
-- keep theirs) make that name one token for good. Before this migration only the admin token
-- could exist, so no database holds duplicates.
CREATE UNIQUE INDEX api_tokens_name ON api_tokens (name);

-- Append-only, enforced here rather than trusted to the code: no entry can be changed or
-- removed through SQL, whoever issues it.
CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;

CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
BEGIN
    SELECT RAISE(ABORT, 'audit log is append-only');
END;
