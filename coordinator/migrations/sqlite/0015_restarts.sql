-- Group restarts (OpAMP Restart command in batches): the job as JSON, written whole by the
-- coordinator driving it and compared by revision.
CREATE TABLE restarts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    rev INTEGER NOT NULL,
    state TEXT NOT NULL,
    body TEXT NOT NULL,
    created_ms INTEGER NOT NULL
) STRICT;
CREATE INDEX restarts_state ON restarts (state);
