-- Dead letters become a queue an operator works through: each is pending
-- until it is replayed (applied after the cause was fixed) or discarded (by
-- someone, for a reason). A pending dead letter at or below a commit token's
-- position stops the token from resolving (meridian-client): read-your-writes
-- never passes a write that did not apply.
ALTER TABLE meridian.dead_letters
    ADD COLUMN sqlstate text,
    ADD COLUMN transport text NOT NULL DEFAULT 'grpc' CHECK (transport IN ('grpc', 'kafka')),
    ADD COLUMN kafka_topic text,
    ADD COLUMN kafka_partition integer,
    ADD COLUMN kafka_offset bigint,
    ADD COLUMN status text NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'replayed', 'discarded')),
    ADD COLUMN resolved_at timestamptz,
    ADD COLUMN resolved_by text,
    ADD COLUMN resolution_note text;

CREATE INDEX dead_letters_pending ON meridian.dead_letters (source_region, end_lsn)
    WHERE status = 'pending';

-- Attached by the agent to every replicated table as
-- `meridian_no_truncate BEFORE TRUNCATE ... FOR EACH STATEMENT`. Meridian
-- does not replicate TRUNCATE (a Kafka link cannot order it against the
-- rows of every partition, and a destination holds rows of several homes),
-- so it is refused where it happens instead of being silently ignored.
CREATE FUNCTION meridian.refuse_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'MR005',
        MESSAGE = format('TRUNCATE of %I.%I is not replicated by Meridian', TG_TABLE_SCHEMA, TG_TABLE_NAME),
        HINT = 'use DELETE, which every region applies; or, to empty only this store, '
               'run TRUNCATE in a session with SET session_replication_role = replica';
END $$;
