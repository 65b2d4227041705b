-- The components agents report (OpAMP AvailableComponents), one row per distinct set, under
-- the hash the agents report for it.
CREATE TABLE component_sets (
    hash TEXT PRIMARY KEY,
    body TEXT NOT NULL, -- kind -> component types, as JSON
    created_ms BIGINT NOT NULL
);
