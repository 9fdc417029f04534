-- Incarnations: a link's changes are only ever applied from the slot they
-- started from. A slot that disappears (dropped, invalidated by
-- max_slot_wal_keep_size, absent from a restored backup or a promoted
-- standby) and is created anew may have missed changes; both ends notice
-- and the link stops until `meridian resync` rebuilds the destination's copy.

-- This store's slots as the agent created them. A slot recorded here but
-- missing from pg_replication_slots, or invalidated, was lost.
CREATE TABLE meridian.slots (
    slot_name text PRIMARY KEY,
    incarnation uuid NOT NULL,
    -- the slot's consistent point when it was created
    created_lsn bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Per source region, the slot incarnation whose changes this store applies.
-- A stream from another incarnation is refused.
CREATE TABLE meridian.source_incarnations (
    source_region text PRIMARY KEY,
    incarnation uuid NOT NULL,
    accepted_at timestamptz NOT NULL DEFAULT now()
);
