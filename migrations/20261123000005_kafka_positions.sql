-- Kafka links: how far this store has applied each partition of each
-- inbound topic. Written in the same transaction as the rows, so the
-- position is exactly as durable as they are (the broker's consumer-group
-- offsets are never relied on).
CREATE TABLE meridian.kafka_positions (
    topic text NOT NULL,
    partition integer NOT NULL,
    source_region text NOT NULL,
    -- the next offset to consume
    next_offset bigint NOT NULL,
    -- the source position (transaction end LSN, change index) of the last
    -- applied record; replays at or below it are skipped
    lsn bigint NOT NULL,
    idx bigint NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition)
);
