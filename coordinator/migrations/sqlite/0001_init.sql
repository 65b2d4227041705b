-- Ampora embedded store, initial schema.
--
-- Tables are STRICT so a wrongly typed bind fails loudly instead of being stored as-is.
-- JSON columns hold serde_json text of the shared domain types.

-- One row per agent. `record` is the whole `AgentRecord` as JSON; `connected` and
-- `last_seen_ms` duplicate two of its fields so they can be filtered on without parsing JSON.
CREATE TABLE agents (
    instance_uid BLOB    NOT NULL PRIMARY KEY CHECK (length(instance_uid) = 16),
    record       TEXT    NOT NULL,
    connected    INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
) STRICT;

CREATE INDEX agents_connected ON agents (connected);
CREATE INDEX agents_last_seen_ms ON agents (last_seen_ms);

-- Immutable config versions. AUTOINCREMENT: ids are never reused, so they only grow.
CREATE TABLE config_versions (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT    NOT NULL,
    files      TEXT    NOT NULL, -- ConfigMap as JSON
    hash       TEXT    NOT NULL,
    author     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE assignments (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    config_id  INTEGER NOT NULL REFERENCES config_versions (id),
    target     TEXT    NOT NULL, -- Target as JSON
    author     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;

CREATE INDEX assignments_config_id ON assignments (config_id);

-- Bootstrap tokens: only the SHA-256 of the token text is kept.
CREATE TABLE tokens (
    id          TEXT    NOT NULL PRIMARY KEY,
    name        TEXT    NOT NULL,
    prefix      TEXT    NOT NULL,
    hash        BLOB    NOT NULL UNIQUE CHECK (length(hash) = 32),
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    revoked_ms  INTEGER,
    redeemed_ms INTEGER,
    bound_uid   BLOB CHECK (bound_uid IS NULL OR length(bound_uid) = 16)
) STRICT;

-- Operator API tokens.
CREATE TABLE api_tokens (
    id         TEXT    NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL,
    role       TEXT    NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    hash       BLOB    NOT NULL UNIQUE CHECK (length(hash) = 32),
    created_ms INTEGER NOT NULL
) STRICT;

-- Append-only audit log. Queries filter by any of these columns and sort newest first, so
-- each filter index carries at_ms (and, implicitly, the rowid `id`) as a suffix.
CREATE TABLE audit (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms        INTEGER NOT NULL,
    actor        TEXT    NOT NULL,
    action       TEXT    NOT NULL,
    instance_uid BLOB CHECK (instance_uid IS NULL OR length(instance_uid) = 16),
    source_ip    TEXT,
    reason       TEXT,
    detail       TEXT    NOT NULL -- serde_json::Value as JSON
) STRICT;

CREATE INDEX audit_at_ms ON audit (at_ms);
CREATE INDEX audit_instance_uid ON audit (instance_uid, at_ms);
CREATE INDEX audit_actor ON audit (actor, at_ms);
CREATE INDEX audit_reason ON audit (reason, at_ms);
