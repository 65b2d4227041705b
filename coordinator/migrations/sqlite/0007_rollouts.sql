-- Groups and staged rollouts. A rollout's record is JSON (`body`, the whole `Rollout`, always
-- written whole); `state` and `rev` repeat two of its fields so that writes can compare the
-- revision and lists can filter without parsing JSON. Members are one blob per rollout
-- (26 bytes per agent, see `shared::rollout::encode_members`), written once at creation.

CREATE TABLE agent_groups (
    name       TEXT    NOT NULL PRIMARY KEY,
    labels     TEXT    NOT NULL, -- BTreeMap<String, String> as JSON
    author     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;

CREATE TABLE rollouts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    config_id  INTEGER NOT NULL REFERENCES config_versions (id),
    state      TEXT    NOT NULL,
    rev        INTEGER NOT NULL,
    body       TEXT    NOT NULL, -- Rollout as JSON
    created_ms INTEGER NOT NULL
) STRICT;

CREATE INDEX rollouts_config_id ON rollouts (config_id);

-- Coordinators re-read the rollouts that still decide agents' configs by state.
CREATE INDEX rollouts_state ON rollouts (state);

CREATE TABLE rollout_members (
    rollout_id INTEGER NOT NULL PRIMARY KEY REFERENCES rollouts (id),
    members    BLOB    NOT NULL
) STRICT;

CREATE TABLE rollout_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    rollout_id INTEGER NOT NULL REFERENCES rollouts (id),
    at_ms      INTEGER NOT NULL,
    kind       TEXT    NOT NULL,
    actor      TEXT    NOT NULL,
    stage      INTEGER,
    detail     TEXT    NOT NULL -- JSON
) STRICT;

CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);
