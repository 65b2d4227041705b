-- Ampora cluster store, initial schema. Mirrors the SQLite schema (migrations/sqlite) in
-- meaning; the differences are Postgres types and choices made for many concurrent writers.
--
-- JSON columns hold serde_json text of the shared domain types and use `json`, not `jsonb`:
-- they are only ever written and read whole, `json` keeps the text as written (cheaper to
-- write, no key reordering), and `jsonb` rejects the escape \u0000, which an agent could put
-- in any string it reports and so fail a whole batch of status writes.
--
-- Times are Unix milliseconds (BIGINT). Partitions are INTEGER because the API's partition
-- type is u16, which SMALLINT cannot hold.

-- One row per agent. `record` is the whole `AgentRecord`; `partition` (`InstanceUid::partition`)
-- lets a coordinator load only the partitions it holds; `connected` and `last_seen_ms`
-- duplicate two record fields so they can be filtered on without parsing JSON.
-- Agents are rewritten in batches all the time; the fill factor leaves room on each page so a
-- rewrite can stay on its page (a HOT update, which also spares the indexes), which is why
-- `connected` and `last_seen_ms` are not indexed here: no query filters on them yet, and an
-- index on a column that changes on every write rules HOT updates out.
CREATE TABLE agents (
    instance_uid BYTEA   NOT NULL PRIMARY KEY CHECK (octet_length(instance_uid) = 16),
    partition    INTEGER NOT NULL CHECK (partition >= 0),
    record       JSON    NOT NULL,
    connected    BOOLEAN NOT NULL,
    last_seen_ms BIGINT  NOT NULL
) WITH (fillfactor = 80);

CREATE INDEX agents_partition ON agents (partition);

-- Immutable config versions. Identity values come from a sequence, so ids are never reused
-- and only grow.
CREATE TABLE config_versions (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name       TEXT   NOT NULL,
    files      JSON   NOT NULL, -- ConfigMap
    hash       TEXT   NOT NULL,
    author     TEXT   NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE assignments (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    config_id  BIGINT NOT NULL REFERENCES config_versions (id),
    target     JSON   NOT NULL, -- Target
    author     TEXT   NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE INDEX assignments_config_id ON assignments (config_id);

-- Bootstrap tokens: only the SHA-256 of the token text is kept.
CREATE TABLE tokens (
    id          TEXT   NOT NULL PRIMARY KEY,
    name        TEXT   NOT NULL,
    prefix      TEXT   NOT NULL,
    hash        BYTEA  NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    created_ms  BIGINT NOT NULL,
    expires_ms  BIGINT NOT NULL,
    revoked_ms  BIGINT,
    redeemed_ms BIGINT,
    bound_uid   BYTEA CHECK (bound_uid IS NULL OR octet_length(bound_uid) = 16)
);

-- Operator API tokens.
CREATE TABLE api_tokens (
    id         TEXT   NOT NULL PRIMARY KEY,
    name       TEXT   NOT NULL,
    role       TEXT   NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    hash       BYTEA  NOT NULL UNIQUE CHECK (octet_length(hash) = 32),
    created_ms BIGINT NOT NULL
);

-- Append-only audit log. Queries filter by any of these columns and sort newest first by
-- (at_ms, id), so each filter index carries both as a suffix.
CREATE TABLE audit (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms        BIGINT NOT NULL,
    actor        TEXT   NOT NULL,
    action       TEXT   NOT NULL,
    instance_uid BYTEA CHECK (instance_uid IS NULL OR octet_length(instance_uid) = 16),
    source_ip    TEXT,
    reason       TEXT,
    detail       JSON   NOT NULL -- serde_json::Value
);

CREATE INDEX audit_at_ms ON audit (at_ms, id);
CREATE INDEX audit_instance_uid ON audit (instance_uid, at_ms, id);
CREATE INDEX audit_actor ON audit (actor, at_ms, id);
CREATE INDEX audit_reason ON audit (reason, at_ms, id);

-- Coordinator membership: a node is alive while now < expires_ms (renewed by heartbeat).
CREATE TABLE coordinators (
    node       TEXT   NOT NULL PRIMARY KEY,
    expires_ms BIGINT NOT NULL
);

-- One lease per partition. Rows are never deleted (a release only expires the lease), so
-- `fence` grows by one every time the partition changes hands and is never reused.
CREATE TABLE partition_leases (
    partition  INTEGER NOT NULL PRIMARY KEY CHECK (partition >= 0),
    holder     TEXT    NOT NULL,
    fence      BIGINT  NOT NULL,
    expires_ms BIGINT  NOT NULL
);

CREATE INDEX partition_leases_holder ON partition_leases (holder);
