-- Hosted package artifacts in cluster mode, in pieces the bus can carry; gateways fetch each
-- blob once into their disk cache. Written before the artifact row that refers to them.
CREATE TABLE package_blobs (
    sha256 TEXT NOT NULL,
    idx BIGINT NOT NULL,
    bytes BYTEA NOT NULL,
    PRIMARY KEY (sha256, idx)
);
