-- The directory's first schema. Values are protobuf-encoded messages of exchange_proto::v1, as in the sled
-- backend, so the wire contract is the stored format; the columns beside them are what queries filter,
-- order or check on. Text keys sort as bytes (COLLATE "C") so every listing comes out in the same order
-- as sled's byte-ordered keys, whatever the database's default collation.
-- Only BIGINT, TEXT, BOOLEAN and BYTEA (BIGINT even for small numbers: CockroachDB's INTEGER is 8 bytes).

-- One row per change log: the last version handed out (grant_ids: the last grant sequence number).
-- Every writer of a log updates its row first, which serialises that log's writers until they commit,
-- so versions become visible in order and without gaps.
CREATE TABLE gx_log_heads (
    log TEXT COLLATE "C" PRIMARY KEY,
    version BIGINT NOT NULL
);
INSERT INTO gx_log_heads (log, version) VALUES ('catalog', 0), ('revocations', 0), ('grants', 0), ('grant_ids', 0);

-- Live entries and tombstones (withdrawn = true): a code stays bound to provider_code.
CREATE TABLE gx_catalog_entries (
    resource_code TEXT COLLATE "C" PRIMARY KEY,
    provider_code TEXT COLLATE "C" NOT NULL,
    withdrawn BOOLEAN NOT NULL,
    version BIGINT NOT NULL,
    entry BYTEA NOT NULL
);

-- The catalog change log: CatalogChange with the entry as it was after the change.
CREATE TABLE gx_catalog_changes (
    version BIGINT PRIMARY KEY,
    change BYTEA NOT NULL
);

-- Registered nodes. The audit anchor's upto_seq has a column of its own so that "an anchor never moves
-- back" is one conditional UPDATE.
CREATE TABLE gx_nodes (
    department TEXT COLLATE "C" NOT NULL,
    node_name TEXT COLLATE "C" NOT NULL,
    address TEXT NOT NULL,
    software_version TEXT NOT NULL,
    registered_at_unix_ms BIGINT NOT NULL,
    last_heartbeat_unix_ms BIGINT NOT NULL,
    lease_expires_unix_ms BIGINT NOT NULL,
    audit_verifying_key_hex TEXT NOT NULL,
    anchor_upto_seq BIGINT,
    audit_anchor BYTEA,
    PRIMARY KEY (department, node_name)
);

-- Revocations are never changed, so the table is its own log (read by version).
CREATE TABLE gx_revocations (
    serial_hex TEXT COLLATE "C" PRIMARY KEY,
    version BIGINT NOT NULL UNIQUE,
    revocation BYTEA NOT NULL
);

-- Grants by sequence number (grant id G<seq>); the state column is the Grant as last written.
CREATE TABLE gx_grants (
    seq BIGINT PRIMARY KEY,
    grant_id TEXT COLLATE "C" NOT NULL UNIQUE,
    consumer_code TEXT COLLATE "C" NOT NULL,
    resource_code TEXT COLLATE "C" NOT NULL,
    provider_code TEXT COLLATE "C" NOT NULL,
    status BIGINT NOT NULL,
    version BIGINT NOT NULL,
    grant_state BYTEA NOT NULL
);
-- for_consumer, the pending check, and list(department) on the consumer side.
CREATE INDEX gx_grants_by_consumer ON gx_grants (consumer_code, resource_code, seq);
-- list(department) on the provider side.
CREATE INDEX gx_grants_by_provider ON gx_grants (provider_code, seq);

-- The grant change log: GrantChange with the grant as it was after the change.
CREATE TABLE gx_grant_changes (
    version BIGINT PRIMARY KEY,
    change BYTEA NOT NULL
);

-- What the admin port's `store` readiness check writes.
CREATE TABLE gx_probe (
    id TEXT PRIMARY KEY,
    written_at_unix_ms BIGINT NOT NULL
);
