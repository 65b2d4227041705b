-- Scoped bootstrap tokens, revocable API tokens, and an audit log the database keeps
-- append-only. Mirrors migrations/sqlite/0003_tokens_audit.sql.

-- The token's scope (`TokenScope`), NULL when the token admits any agent.
ALTER TABLE tokens ADD COLUMN scope JSON;

-- API tokens can be revoked; the row stays so the list and the audit log keep naming it.
ALTER TABLE api_tokens ADD COLUMN revoked_ms BIGINT;

-- The audit actor of an API token is `api:<name>`; unique names (never reused, revoked tokens
-- keep theirs) make that name one token for good. Before this migration only the admin token
-- could exist, so no database holds duplicates.
CREATE UNIQUE INDEX api_tokens_name ON api_tokens (name);

-- Append-only, enforced here rather than trusted to the code: no entry can be changed or
-- removed through SQL, whoever issues it (TRUNCATE included, which skips row triggers).
CREATE FUNCTION audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit log is append-only' USING ERRCODE = 'restrict_violation';
END;
$$;

CREATE TRIGGER audit_no_update_or_delete BEFORE UPDATE OR DELETE ON audit
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();

CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON audit
    FOR EACH STATEMENT EXECUTE FUNCTION audit_append_only();
