-- What each link's residency policy did, counted per table, rule, source,
-- destination and verdict, in the source region's store. Never values.
CREATE TABLE meridian.residency_audit (
    table_name text NOT NULL,
    rule text NOT NULL,            -- '-' when no rule matched (blocked by default)
    source_region text NOT NULL,
    destination_region text NOT NULL,
    verdict text NOT NULL CHECK (verdict IN ('passed', 'transformed', 'blocked')),
    changes bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (table_name, rule, source_region, destination_region, verdict)
);
