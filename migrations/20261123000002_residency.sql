-- Batches a receiver refused because its residency policy forbids something
-- in them. No row values are kept here: the data may not be allowed in this
-- region. The source keeps the batch (its slot is not confirmed) until the
-- sender's policy is fixed.
CREATE TABLE meridian.policy_violations (
    id bigserial PRIMARY KEY,
    source_region text NOT NULL,
    end_lsn bigint NOT NULL,
    sender_policy_version bigint NOT NULL,
    receiver_policy_version bigint NOT NULL,
    reason text NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now()
);
