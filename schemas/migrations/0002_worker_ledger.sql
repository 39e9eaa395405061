-- The worker's own tables: the receipt ledger (exactly-once effect), first arrivals (time
-- bounds of retried and replayed invocations) and the operators' audit trail.

CREATE TABLE forge_worker.receipts (
    task_cid       TEXT PRIMARY KEY,
    invocation_cid TEXT NOT NULL,
    receipt        BYTEA NOT NULL,          -- the signed receipt, byte for byte as sent
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX receipts_invocation_cid_idx ON forge_worker.receipts (invocation_cid);

CREATE TABLE forge_worker.arrivals (
    invocation_cid TEXT PRIMARY KEY,
    first_seen_at  TIMESTAMPTZ NOT NULL
);

CREATE TABLE forge_worker.audit (
    id              BIGSERIAL PRIMARY KEY,
    at              TIMESTAMPTZ NOT NULL DEFAULT now(),
    action          TEXT NOT NULL,          -- replay, purge, ...
    message_id      TEXT NULL,
    invocation_cids TEXT[] NOT NULL DEFAULT '{}',
    detail          JSONB NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_at_idx ON forge_worker.audit (at);
