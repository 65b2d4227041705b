-- Group restarts (OpAMP Restart command in batches): the job as JSON, written whole by the
-- coordinator driving it and compared by revision.
CREATE TABLE restarts (
    id BIGSERIAL PRIMARY KEY,
    rev BIGINT NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX restarts_state ON restarts (state);
