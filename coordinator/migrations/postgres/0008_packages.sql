-- Agent packages: imported artifacts (metadata; the bytes live in the blob store, addressed by
-- their SHA-256) and package assignments. Each row's record is JSON (`body`), written once.

CREATE TABLE package_artifacts (
    name       TEXT   NOT NULL,
    version    TEXT   NOT NULL,
    platform   TEXT   NOT NULL,
    sha256     TEXT   NOT NULL,
    body       JSON   NOT NULL, -- Artifact
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (name, version, platform)
);

CREATE TABLE package_assignments (
    id         BIGSERIAL PRIMARY KEY,
    body       JSON   NOT NULL, -- PackageAssignment (its id is this row's)
    created_ms BIGINT NOT NULL
);
