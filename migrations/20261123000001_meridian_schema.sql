-- Meridian's metadata in each regional store.
CREATE SCHEMA IF NOT EXISTS meridian;

-- How far this store has applied each source region's changes. Written in the
-- same transaction as the rows, so it is exactly as durable as they are.
CREATE TABLE meridian.watermarks (
    source_region text PRIMARY KEY,
    -- end LSN (pg_lsn as a 64-bit integer) of the last source transaction applied
    end_lsn bigint NOT NULL,
    -- source commit time of that transaction
    source_commit_time timestamptz NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- Batches that could not be applied (undecodable, or rejected by the store),
-- kept with the reason so nothing is silently lost. The link moves on.
CREATE TABLE meridian.dead_letters (
    id bigserial PRIMARY KEY,
    source_region text NOT NULL,
    end_lsn bigint NOT NULL,
    reason text NOT NULL,
    payload bytea NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now()
);
