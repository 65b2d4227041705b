-- Upgrades are rollouts of a package version and refer to no config version, so
-- `rollouts.config_id` becomes nullable. SQLite cannot drop a NOT NULL in place, so the table
-- is rebuilt, inside the migration's transaction where foreign keys stay on: the two tables
-- referring to it are emptied into copies first (so dropping the old table breaks no
-- reference), then recreated as they were and refilled once the new table has its name.

CREATE TABLE rollouts_rebuilt (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    config_id  INTEGER REFERENCES config_versions (id), -- NULL: an upgrade
    state      TEXT    NOT NULL,
    rev        INTEGER NOT NULL,
    body       TEXT    NOT NULL, -- Rollout as JSON
    created_ms INTEGER NOT NULL
) STRICT;

INSERT INTO rollouts_rebuilt (id, config_id, state, rev, body, created_ms)
    SELECT id, config_id, state, rev, body, created_ms FROM rollouts;

CREATE TEMP TABLE members_copy AS SELECT * FROM rollout_members;
CREATE TEMP TABLE events_copy AS SELECT * FROM rollout_events;

DROP TABLE rollout_events;
DROP TABLE rollout_members;
DROP TABLE rollouts;

ALTER TABLE rollouts_rebuilt RENAME TO rollouts;

CREATE INDEX rollouts_config_id ON rollouts (config_id);

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

INSERT INTO rollout_members (rollout_id, members)
    SELECT rollout_id, members FROM members_copy;

INSERT INTO rollout_events (id, rollout_id, at_ms, kind, actor, stage, detail)
    SELECT id, rollout_id, at_ms, kind, actor, stage, detail FROM events_copy;

DROP TABLE members_copy;
DROP TABLE events_copy;
