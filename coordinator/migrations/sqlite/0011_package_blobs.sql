-- Hosted package artifacts stored in pieces (cluster mode keeps them in the store; the
-- embedded default serves them from its data directory, so this table stays empty there).
CREATE TABLE package_blobs (
    sha256 TEXT NOT NULL,
    idx INTEGER NOT NULL,
    bytes BLOB NOT NULL,
    PRIMARY KEY (sha256, idx)
);
