-- Where each group's agents send their own telemetry (OpAMP own_metrics / own_traces /
-- own_logs), as JSON.
CREATE TABLE group_telemetry (
    group_name TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);
