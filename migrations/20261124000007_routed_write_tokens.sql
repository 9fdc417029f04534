-- Routed writes, second version: the old row is checked as well as the new
-- one, a row changes home only through a row move, and each routed
-- transaction is tagged with its commit token id so a reader in another
-- region can wait for exactly that transaction.

-- A routed write's first statement (the client calls it in the transaction
-- it opened on the tenant's home store). Fences a stale placement like the
-- three-argument version, then tags the transaction with `p_token` (32 hex
-- digits) as a transactional logical decoding message, which travels with
-- the transaction's changes. Returns the transaction's id (for
-- pg_xact_status after an ambiguous commit) and the message's position (a
-- lower bound of the commit's).
CREATE FUNCTION meridian.begin_routed_write(
    p_tenant text, p_region text, p_epoch bigint, p_token text
) RETURNS TABLE (xid text, lsn bigint) LANGUAGE plpgsql AS $$
BEGIN
    PERFORM meridian.begin_routed_write(p_tenant, p_region, p_epoch);
    RETURN QUERY SELECT pg_current_xact_id()::text,
                        (pg_logical_emit_message(true, 'meridian.token', p_token) - '0/0')::bigint;
END $$;

-- Inside a routed write, every row the transaction inserts, updates or
-- deletes must be the tenant's: its home column, before and after, names
-- the tenant's home region. The one exception is a row move
-- (`meridian.move_to` set by the client's move_rows): an UPDATE may then
-- change a row's home from the tenant's home to that region. Attached as
-- `meridian_home_check BEFORE INSERT OR UPDATE OR DELETE ... FOR EACH ROW`.
-- Messages name tables, columns and regions, never other values.
CREATE OR REPLACE FUNCTION meridian.check_home() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    home text := coalesce(current_setting('meridian.home', true), '');
    move_to text := coalesce(current_setting('meridian.move_to', true), '');
    tenant text := current_setting('meridian.tenant', true);
    old_home text;
    new_home text;
BEGIN
    IF home = '' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_home := to_jsonb(OLD) ->> TG_ARGV[0];
        IF old_home IS DISTINCT FROM home THEN
            RAISE EXCEPTION USING ERRCODE = 'MR001',
                MESSAGE = format('%I.%I: %s of a row whose %s is %s, but tenant %s lives in region %s',
                                 TG_TABLE_SCHEMA, TG_TABLE_NAME, lower(TG_OP), TG_ARGV[0],
                                 coalesce(old_home, 'NULL'), tenant, home),
                HINT = 'a region''s copy of another region''s row is read-only: write it through a tenant whose home is that region';
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    new_home := to_jsonb(NEW) ->> TG_ARGV[0];
    IF new_home IS DISTINCT FROM home
       AND NOT (TG_OP = 'UPDATE' AND move_to <> '' AND new_home = move_to) THEN
        RAISE EXCEPTION USING ERRCODE = 'MR001',
            MESSAGE = format('%I.%I: the row''s %s is %s, but tenant %s lives in region %s',
                             TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0],
                             coalesce(new_home, 'NULL'), tenant, home),
            HINT = CASE WHEN TG_OP = 'UPDATE'
                        THEN 'a row changes home region only through a row move: client.tenant(..).move_rows(REGION, ..)'
                        ELSE 'write rows of another home region through that region''s tenant' END;
    END IF;
    RETURN NEW;
END $$;

-- Commit token ids of routed writes from other regions, recorded in the
-- transaction that applies (or dead-letters) them. A reader waiting for a
-- token finds its transaction's exact position here. Rows older than a day
-- are pruned by the agent; a token that old is waited for by position.
CREATE TABLE meridian.applied_tokens (
    source_region text NOT NULL,
    token uuid NOT NULL,
    end_lsn bigint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_region, token)
);
CREATE INDEX applied_tokens_applied_at ON meridian.applied_tokens (applied_at);
