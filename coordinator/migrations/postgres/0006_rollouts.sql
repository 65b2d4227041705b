-- Groups and staged rollouts; mirrors migrations/sqlite/0007_rollouts.sql. A rollout's record
-- is JSON (`body`, always written whole); `state` and `rev` repeat two of its fields so that
-- writes can compare the revision and lists can filter without parsing JSON. Members are one
-- blob per rollout (26 bytes per agent), written once at creation.

CREATE TABLE agent_groups (
    name       TEXT   NOT NULL PRIMARY KEY,
    labels     JSON   NOT NULL,
    author     TEXT   NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE rollouts (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    config_id  BIGINT NOT NULL REFERENCES config_versions (id),
    state      TEXT   NOT NULL,
    rev        BIGINT NOT NULL,
    body       JSON   NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE INDEX rollouts_config_id ON rollouts (config_id);

-- Coordinators re-read the rollouts that still decide agents' configs by state.
CREATE INDEX rollouts_state ON rollouts (state);

CREATE TABLE rollout_members (
    rollout_id BIGINT NOT NULL PRIMARY KEY REFERENCES rollouts (id),
    members    BYTEA  NOT NULL
);

CREATE TABLE rollout_events (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    rollout_id BIGINT NOT NULL REFERENCES rollouts (id),
    at_ms      BIGINT NOT NULL,
    kind       TEXT   NOT NULL,
    actor      TEXT   NOT NULL,
    stage      BIGINT,
    detail     JSON   NOT NULL
);

CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);
