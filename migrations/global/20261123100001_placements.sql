-- Meridian's metadata in the multi-region (global) database, run by the
-- client library's admin functions (`meridian placement ...`). Not a regional
-- store: its migrations are this folder's alone.
CREATE SCHEMA IF NOT EXISTS meridian;

-- Each tenant's home region: the truth. `epoch` grows with every change, so
-- a client or store holding an older placement can tell.
CREATE TABLE meridian.placements (
    tenant text PRIMARY KEY,
    home_region text NOT NULL,
    epoch bigint NOT NULL CHECK (epoch > 0),
    updated_at timestamptz NOT NULL DEFAULT now()
);
