//! Incarnations: the edges of a link's life that must never pass silently.
//!
//! - A source's slot gets an incarnation (a uuid) when the agent creates
//!   it, recorded in `meridian.slots`. A slot recorded there but missing or
//!   invalidated was lost: changes since it last confirmed may never reach
//!   the destination, so the link stops instead of making a new slot.
//! - A destination records the incarnation whose changes it applies per
//!   source (`meridian.source_incarnations`) and refuses a stream from
//!   another one.
//! - A destination that applied the source beyond the source's own WAL end
//!   is ahead of a source restored to an earlier point: the link stops.
//!
//! Each refusal names what happened and the way back: `meridian resync`.

use meridian_core::Lsn;
use sqlx::PgPool;

/// How a destination's incarnation refusal starts (a FailedPrecondition
/// status), so the source shows its link as stopped.
pub const PEER_PREFIX: &str = "lifecycle: ";

/// Why a link may not run. The text says what happened and what to do.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

fn resync(source: &str, destination: &str) -> String {
    format!(
        "rebuild {destination}'s copy of {source}'s rows with \
         `meridian resync --config FILE --link {source}:{destination}` (README, \"Lost slots and restores\")"
    )
}

/// Whether the link's slot was never made here (neither recorded nor
/// existing): [`prepare_slot`] will make it.
pub async fn slot_is_new(pool: &PgPool, slot: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM meridian.slots WHERE slot_name = $1)
            AND NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
    )
    .bind(slot)
    .fetch_one(pool)
    .await
}

/// Creates the link's slot if this store never had it (recording its
/// incarnation); a slot recorded before is never made again here. True if
/// it made the slot (the link is new).
pub async fn prepare_slot(pool: &PgPool, slot: &str) -> Result<bool, sqlx::Error> {
    let recorded: Option<(i64,)> =
        sqlx::query_as("SELECT 1::bigint FROM meridian.slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await?;
    let exists: Option<(i64,)> =
        sqlx::query_as("SELECT 1::bigint FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await?;
    match (exists, recorded) {
        (None, None) => create_slot(pool, slot).await.map(|()| true),
        // a slot made by an agent that predates incarnations
        (Some(_), None) => {
            sqlx::query(
                "INSERT INTO meridian.slots (slot_name, incarnation, created_lsn)
                 SELECT $1, gen_random_uuid(), (confirmed_flush_lsn - '0/0')::bigint
                   FROM pg_replication_slots WHERE slot_name = $1
                 ON CONFLICT DO NOTHING",
            )
            .bind(slot)
            .execute(pool)
            .await?;
            Ok(false)
        }
        // fine, or lost: the link's sessions tell which
        (_, Some(_)) => Ok(false),
    }
}

/// Creates the slot and records its incarnation. Fails if it exists.
pub async fn create_slot(pool: &PgPool, slot: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO meridian.slots (slot_name, incarnation, created_lsn)
         SELECT $1, gen_random_uuid(), (lsn - '0/0')::bigint
           FROM pg_create_logical_replication_slot($1, 'pgoutput')
         ON CONFLICT (slot_name) DO UPDATE
            SET incarnation = EXCLUDED.incarnation, created_lsn = EXCLUDED.created_lsn,
                created_at = now()",
    )
    .bind(slot)
    .execute(pool)
    .await?;
    Ok(())
}

/// The incarnation of a link's slot, or why the link must stop.
pub async fn slot_incarnation(
    pool: &PgPool,
    slot: &str,
    source: &str,
    destination: &str,
) -> Result<Result<String, Refusal>, sqlx::Error> {
    let recorded: Option<(String, i64)> = sqlx::query_as(
        "SELECT incarnation::text, created_lsn FROM meridian.slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    let state: Option<(String, String)> = sqlx::query_as(
        "SELECT plugin::text, coalesce(wal_status, 'lost') FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(pool)
    .await?;
    Ok(match (recorded, state) {
        (Some((incarnation, _)), Some((plugin, wal_status))) => {
            if plugin != "pgoutput" {
                Err(Refusal(format!(
                    "slot {slot} uses plugin {plugin}; Meridian needs pgoutput: drop the slot, then {}",
                    resync(source, destination)
                )))
            } else if wal_status == "lost" {
                Err(Refusal(format!(
                    "slot {slot} was invalidated (its WAL was removed, max_slot_wal_keep_size): \
                     changes of {source} not yet applied by {destination} are gone; {}",
                    resync(source, destination)
                )))
            } else {
                Ok(incarnation)
            }
        }
        (Some((_, created)), None) => Err(Refusal(format!(
            "slot {slot} (created at {}) is missing from {source}'s store: it was dropped, or the \
             store was restored from a backup or promoted from a standby. Changes of {source} \
             since {destination} last applied may be missing there, so the link stops; {}",
            Lsn(created as u64),
            resync(source, destination)
        ))),
        (None, _) => Err(Refusal(format!(
            "slot {slot} has no recorded incarnation (the store's meridian.slots was reset); {}",
            resync(source, destination)
        ))),
    })
}

/// Checks a link's slot from a fresh connection to the source store: its
/// incarnation, or the link's stop.
pub async fn check_link(
    store: &str,
    slot: &str,
    source: &str,
    destination: &str,
) -> Result<(String, PgPool), crate::link::LinkError> {
    use crate::link::LinkError;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(store)
        .await
        .map_err(|e| LinkError::Capture(e.into()))?;
    let incarnation = slot_incarnation(&pool, slot, source, destination)
        .await
        .map_err(|e| LinkError::Capture(e.into()))??;
    Ok((incarnation, pool))
}

/// Compares what the destination applied (`applied`, from its Welcome)
/// with the source. Applied past the source's WAL end: the source went back
/// in time (restored to an earlier point). The slot confirmed past what the
/// destination applied (and past the slot's creation): changes between were
/// never applied there, because the slot was made anew or the destination
/// went back in time. Either stops the link.
pub async fn check_positions(
    pool: &PgPool,
    slot: &str,
    applied: Lsn,
    source: &str,
    destination: &str,
) -> Result<Result<(), Refusal>, sqlx::Error> {
    let (end, confirmed, created): (i64, Option<i64>, Option<i64>) = sqlx::query_as(
        "SELECT (pg_current_wal_lsn() - '0/0')::bigint,
                (SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots
                  WHERE slot_name = $1),
                (SELECT created_lsn FROM meridian.slots WHERE slot_name = $1)",
    )
    .bind(slot)
    .fetch_one(pool)
    .await?;
    let (confirmed, created) = (confirmed.unwrap_or(0) as u64, created.unwrap_or(0) as u64);
    if confirmed > applied.0 && confirmed > created {
        return Ok(Err(Refusal(format!(
            "slot {slot} is confirmed up to {}, but {destination} applied {source} only up to \
             {applied}: the changes between never reached {destination} (the slot was dropped and \
             made anew, or {destination}'s store went back to an earlier point), so the link stops; {}",
            Lsn(confirmed),
            resync(source, destination)
        ))));
    }
    if applied.0 > end as u64 {
        return Ok(Err(Refusal(format!(
            "{destination} applied {source}'s changes up to {applied}, but {source}'s WAL ends at {}: \
             {source}'s store went back in time (restored to an earlier point?). New changes would \
             be skipped as applied, so the link stops; {}",
            Lsn(end as u64),
            resync(source, destination)
        ))));
    }
    Ok(Ok(()))
}

/// At a destination: accepts a stream from `source`'s slot `incarnation`
/// if it is the one applied so far (or the first), refuses it otherwise.
/// An empty incarnation (an agent that predates them, whose batches carry
/// no seal) is accepted only from a source that never sent one.
pub async fn accept_incarnation(
    pool: &mut sqlx::PgConnection,
    source: &str,
    destination: &str,
    incarnation: &str,
) -> Result<Result<(), Refusal>, sqlx::Error> {
    if incarnation.is_empty() {
        let known: Option<String> = sqlx::query_scalar(
            "SELECT incarnation::text FROM meridian.source_incarnations WHERE source_region = $1",
        )
        .bind(source)
        .fetch_optional(pool)
        .await?;
        // the recorded incarnation is logged here, never told to the peer
        return Ok(match known {
            None => Ok(()),
            Some(known) => {
                tracing::error!(source, incarnation = %known,
                    "refused a stream without a slot incarnation from a source that sent one");
                Err(Refusal(format!(
                    "{source} sends without a slot incarnation (an agent older than its own \
                     slot), but {destination} applied one from it: run this release's agent \
                     in {source}"
                )))
            }
        });
    }
    let known: String = sqlx::query_scalar(
        "INSERT INTO meridian.source_incarnations (source_region, incarnation)
         VALUES ($1, $2::uuid)
         ON CONFLICT (source_region) DO UPDATE SET source_region = EXCLUDED.source_region
         RETURNING incarnation::text",
    )
    .bind(source)
    .bind(incarnation)
    .fetch_one(pool)
    .await?;
    if known != incarnation {
        tracing::error!(source, sent = %incarnation, applied = %known,
            "refused a stream from another slot incarnation");
        return Ok(Err(Refusal(format!(
            "{source} sends from slot incarnation {incarnation}, not the one {destination} \
             applied (its log names it): {source}'s slot was lost and made anew, and changes \
             between may be missing here; {}",
            resync(source, destination)
        ))));
    }
    Ok(Ok(()))
}
