-- Initial sync: the copy of rows a source held before a link streamed them
-- (crates/agent/src/sync.rs). Kept in the source store, per link
-- destination and table.

CREATE TABLE meridian.sync_tables (
    destination text NOT NULL,
    table_name text NOT NULL,
    -- waiting: queued; copying: split into ranges, being copied; done;
    -- not_copied: the link predates initial sync, nothing was queued
    state text NOT NULL CHECK (state IN ('waiting', 'copying', 'done', 'not_copied')),
    -- why it was queued (or not)
    reason text NOT NULL,
    -- a new id per requested copy: a copier recording for an older copy
    -- finds no range and stops
    copy_id uuid NOT NULL DEFAULT gen_random_uuid(),
    -- rows homed in the source when the copy started
    rows_expected bigint,
    requested_at timestamptz NOT NULL DEFAULT now(),
    started_at timestamptz,
    finished_at timestamptz,
    -- why the copy last failed (it is retried), until a chunk is recorded:
    -- of this table when the error is the table's own (a lock it cannot
    -- get), of any table of the link otherwise
    last_error text,
    last_error_table_only boolean NOT NULL DEFAULT false,
    PRIMARY KEY (destination, table_name)
);

-- A copying table's key ranges. A range covers keys after `after_key` (from
-- the start when NULL) up to `upto_key` (inclusive; to the end when NULL);
-- `after_key` moves to a chunk's last key once the link's next hop holds
-- the chunk durably, so a copy resumes from the last recorded chunk.
CREATE TABLE meridian.sync_ranges (
    destination text NOT NULL,
    table_name text NOT NULL,
    copy_id uuid NOT NULL,
    range_no int NOT NULL,
    after_key text[],
    upto_key text[],
    done boolean NOT NULL DEFAULT false,
    rows bigint NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    chunks bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, table_name, range_no),
    FOREIGN KEY (destination, table_name)
        REFERENCES meridian.sync_tables ON DELETE CASCADE
);

-- The residency policy (its text) the copies were last queued for: a policy
-- changed while the agent was down, or whose copies could not be queued at
-- its reload, is compared with it at the next start or reload.
CREATE TABLE meridian.sync_policy (
    one boolean PRIMARY KEY DEFAULT true CHECK (one),
    -- false until the agent first records the policy in force
    recorded boolean NOT NULL DEFAULT false,
    -- NULL: no policy
    policy text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO meridian.sync_policy DEFAULT VALUES;
