-- Routed writes from the client library (meridian-client).
--
-- Each routed transaction starts with meridian.begin_routed_write, which
-- checks the tenant's placement as this store last heard it (fencing writers
-- whose cached placement is stale) and marks the transaction with the
-- tenant's home region. Triggers the agent attaches to the replicated tables
-- (meridian.check_home) and to global tables present here
-- (meridian.refuse_global_write) act only on marked transactions.

-- Placements as pushed to this store by `meridian placement set`. The global
-- database holds the truth (meridian.placements there); this copy lets the
-- store refuse a write routed with an older epoch.
CREATE TABLE meridian.placement_epochs (
    tenant text PRIMARY KEY,
    home_region text NOT NULL,
    epoch bigint NOT NULL CHECK (epoch > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- SQLSTATEs raised for the client, which maps them to typed errors:
--   MR001 row whose home column disagrees with the tenant's placement
--   MR002 write to a global table through the routed path
--   MR003 stale placement (the client refreshes and retries)
--   MR004 tenant this store has no placement for
CREATE FUNCTION meridian.begin_routed_write(
    p_tenant text, p_region text, p_epoch bigint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    known meridian.placement_epochs;
BEGIN
    -- FOR SHARE: a placement change waits for routed writes in flight here,
    -- and no routed write starts here after it.
    SELECT * INTO known FROM meridian.placement_epochs
        WHERE tenant = p_tenant FOR SHARE;
    -- Strict: a store that never heard of the tenant refuses, so a push that
    -- failed is noticed (rerun `meridian placement set`) instead of letting a
    -- stale writer through. A store behind the client's epoch accepts: the
    -- client read its placement from the global database, the truth.
    IF NOT FOUND THEN
        RAISE EXCEPTION USING ERRCODE = 'MR004',
            MESSAGE = format('tenant %s has no placement in region %s', p_tenant, p_region),
            HINT = 'create one with: meridian placement set --config FILE TENANT REGION';
    END IF;
    IF FOUND AND (known.epoch > p_epoch OR (known.epoch = p_epoch AND known.home_region <> p_region)) THEN
        RAISE EXCEPTION USING ERRCODE = 'MR003',
            MESSAGE = format('stale placement for tenant %s: epoch %s, but region %s knows epoch %s (home %s)',
                             p_tenant, p_epoch, p_region, known.epoch, known.home_region);
    END IF;
    PERFORM set_config('meridian.home', p_region, true);
    PERFORM set_config('meridian.tenant', p_tenant, true);
END $$;

-- Attached by the agent to every replicated table as
-- `meridian_home_check BEFORE INSERT OR UPDATE ... FOR EACH ROW`, with the
-- home column's name as argument. Outside routed writes it does nothing.
CREATE FUNCTION meridian.check_home() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    home text := coalesce(current_setting('meridian.home', true), '');
    row_home text;
BEGIN
    IF home = '' THEN
        RETURN NEW;
    END IF;
    row_home := to_jsonb(NEW) ->> TG_ARGV[0];
    IF row_home IS DISTINCT FROM home THEN
        RAISE EXCEPTION USING ERRCODE = 'MR001',
            MESSAGE = format('%I.%I: the row''s %s is %s, but tenant %s lives in region %s',
                             TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0],
                             coalesce(row_home, 'NULL'), current_setting('meridian.tenant', true), home),
            HINT = 'write rows of another home region through that region''s tenant';
    END IF;
    RETURN NEW;
END $$;

-- Attached by the agent to global tables that exist in a regional store
-- (they belong in the multi-region database).
CREATE FUNCTION meridian.refuse_global_write() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF coalesce(current_setting('meridian.home', true), '') <> '' THEN
        RAISE EXCEPTION USING ERRCODE = 'MR002',
            MESSAGE = format('%I.%I is a global table', TG_TABLE_SCHEMA, TG_TABLE_NAME),
            HINT = 'write it through the global path: client.global().transaction(...)';
    END IF;
    RETURN NULL;
END $$;
