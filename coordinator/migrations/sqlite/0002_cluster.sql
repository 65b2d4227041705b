-- Cluster mode: agents fall into fixed partitions, each served by the one coordinator that
-- holds its lease. The embedded server uses these tables too (a cluster of one).

-- The agent's partition (`InstanceUid::partition`), so a coordinator loads only its own.
-- It is FNV-1a over the uid, which SQL cannot compute: rows already here get -1 ("unknown")
-- and `SqliteStore::open` fills them in from Rust right after migrating; every write sets it.
ALTER TABLE agents ADD COLUMN partition INTEGER NOT NULL DEFAULT -1;

CREATE INDEX agents_partition ON agents (partition);

-- Coordinator membership: a node is alive while now < expires_ms (renewed by heartbeat).
CREATE TABLE coordinators (
    node       TEXT    NOT NULL PRIMARY KEY,
    expires_ms INTEGER NOT NULL
) STRICT;

-- One lease per partition. Rows are never deleted (a release only expires the lease), so
-- `fence` grows by one every time the partition changes hands and is never reused.
CREATE TABLE partition_leases (
    partition  INTEGER NOT NULL PRIMARY KEY CHECK (partition >= 0),
    holder     TEXT    NOT NULL,
    fence      INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
) STRICT;

CREATE INDEX partition_leases_holder ON partition_leases (holder);
