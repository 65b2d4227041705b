-- Agent packages: imported artifacts (metadata; the bytes live in the blob store, addressed by
-- their SHA-256) and package assignments. Each row's record is JSON (`body`), written once.

CREATE TABLE package_artifacts (
    name       TEXT    NOT NULL,
    version    TEXT    NOT NULL,
    platform   TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    body       TEXT    NOT NULL, -- Artifact as JSON
    created_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version, platform)
) STRICT;

CREATE TABLE package_assignments (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    body       TEXT    NOT NULL, -- PackageAssignment as JSON (its id is this row's)
    created_ms INTEGER NOT NULL
) STRICT;
