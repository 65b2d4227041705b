-- Agent identities: client certificates the coordinator issued from the agent CA. Rows are
-- never deleted: a revoked identity stays, so CRLs and the audit trail keep naming it.
CREATE TABLE identities (
    serial       TEXT   NOT NULL PRIMARY KEY,
    instance_uid BYTEA  NOT NULL CHECK (octet_length(instance_uid) = 16),
    created_ms   BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    -- First mTLS connection seen with this certificate: from then on bootstrap tokens are
    -- refused for the agent.
    confirmed_ms BIGINT,
    revoked_ms   BIGINT,
    -- The certificate (PEM), so every later offer can repeat it (facts §5.1); never the key.
    cert_pem     TEXT    NOT NULL,
    fingerprint  TEXT   NOT NULL
);

CREATE INDEX identities_instance_uid ON identities (instance_uid, created_ms);
CREATE INDEX identities_revoked ON identities (revoked_ms) WHERE revoked_ms IS NOT NULL;
