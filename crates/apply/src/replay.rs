//! The operator's way back from `meridian.dead_letters`: list what is
//! pending, look at one, replay it once the cause is fixed, or discard it
//! (recording who did and why).
//!
//! Replay applies the dead-lettered transaction as it arrived, in one
//! transaction that also marks the dead letter `replayed`. It does not touch
//! the watermark (already past it). Rows the source changed again after the
//! dead-lettered transaction are overwritten with its older images: replay
//! dead letters oldest first, and before later changes of the same rows when
//! it matters (`list` shows them in source order).

use std::collections::HashMap;

use meridian_core::change::ChangeKind;
use meridian_core::pgoutput::Keys;
use meridian_core::{Lsn, codec, plan};
use sqlx::{Connection, PgConnection};

use crate::{ApplyError, apply_session, execute, load_shapes};

/// One row of `meridian.dead_letters`, without its payload.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub source_region: String,
    pub end_lsn: i64,
    pub reason: String,
    pub sqlstate: Option<String>,
    pub transport: String,
    pub kafka_topic: Option<String>,
    pub kafka_partition: Option<i32>,
    pub kafka_offset: Option<i64>,
    pub status: String,
    pub received_at: String,
    pub resolved_at: Option<String>,
    pub resolved_by: Option<String>,
    pub resolution_note: Option<String>,
    pub payload_bytes: i32,
}

const COLUMNS: &str = "id, source_region, end_lsn, reason, sqlstate, transport, kafka_topic,
    kafka_partition, kafka_offset, status, received_at::text AS received_at,
    resolved_at::text AS resolved_at, resolved_by, resolution_note,
    octet_length(payload) AS payload_bytes";

/// What a dead letter holds: per table, how many inserts, updates, deletes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Contents {
    pub transactions: usize,
    pub tables: Vec<(String, [usize; 3])>,
}

/// Why a dead-letter command failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("dead letter {0} does not exist")]
    NotFound(i64),
    #[error("dead letter {id} is already {status}")]
    Resolved { id: i64, status: String },
    #[error(
        "dead letter {0} has no payload (it could not be checked against the residency policy, so it was not kept); discard it and copy the rows again from the source"
    )]
    NoPayload(i64),
    #[error("dead letter {id}: the payload cannot be decoded: {reason}")]
    Undecodable { id: i64, reason: String },
    #[error("dead letter {id} is not replayed: {reason}")]
    OutsideTopology { id: i64, reason: String },
    #[error("replay failed, the dead letter stays pending: {0}")]
    Apply(#[from] ApplyError),
    #[error("store: {0}")]
    Store(#[from] sqlx::Error),
}

/// Dead letters in source order; only pending ones unless `all`.
pub async fn list(conn: &mut PgConnection, all: bool) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM meridian.dead_letters
          WHERE $1 OR status = 'pending' ORDER BY source_region, end_lsn, id"
    ))
    .bind(all)
    .fetch_all(conn)
    .await
}

/// Pending dead letters per source region.
pub async fn pending_counts(conn: &mut PgConnection) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT source_region, count(*) FROM meridian.dead_letters
          WHERE status = 'pending' GROUP BY source_region ORDER BY source_region",
    )
    .fetch_all(conn)
    .await
}

/// One dead letter and a summary of what it holds (no values).
pub async fn show(
    conn: &mut PgConnection,
    id: i64,
) -> Result<(DeadLetter, Option<Contents>), ReplayError> {
    let letter: DeadLetter = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM meridian.dead_letters WHERE id = $1"
    ))
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or(ReplayError::NotFound(id))?;
    let payload: Vec<u8> =
        sqlx::query_scalar("SELECT payload FROM meridian.dead_letters WHERE id = $1")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
    let contents = codec::decode(&payload).ok().map(|txs| {
        let mut tables: HashMap<String, [usize; 3]> = HashMap::new();
        for change in txs.iter().flat_map(|t| &t.changes) {
            let counts = tables
                .entry(format!("{}.{}", change.table.schema, change.table.name))
                .or_default();
            counts[match change.kind {
                ChangeKind::Insert { .. } => 0,
                ChangeKind::Update { .. } => 1,
                ChangeKind::Delete { .. } => 2,
            }] += 1;
        }
        let mut tables: Vec<_> = tables.into_iter().collect();
        tables.sort();
        Contents {
            transactions: txs.len(),
            tables,
        }
    });
    Ok((letter, contents.filter(|_| !payload.is_empty())))
}

/// Applies a pending dead letter to the store at `url` and marks it
/// replayed by `by`, in one transaction. `origin` is the replication origin
/// of the session (a `meridian_*` name, so capture does not ship the rows
/// again). Only tables of `keys` (the topology's), keyed by their key
/// columns, are written: a payload that says otherwise is refused, as a
/// peer's batch would be. Returns the row changes applied.
pub async fn replay(
    url: &str,
    origin: &str,
    id: i64,
    by: &str,
    keys: &Keys,
) -> Result<usize, ReplayError> {
    let mut conn = apply_session(url, origin).await?;
    let mut tx = conn.begin().await?;
    let row: Option<(String, Vec<u8>)> = sqlx::query_as(
        "SELECT status, payload FROM meridian.dead_letters WHERE id = $1 FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    let (status, payload) = row.ok_or(ReplayError::NotFound(id))?;
    if status != "pending" {
        return Err(ReplayError::Resolved { id, status });
    }
    if payload.is_empty() {
        return Err(ReplayError::NoPayload(id));
    }
    let transactions = codec::decode(&payload).map_err(|e| ReplayError::Undecodable {
        id,
        reason: e.to_string(),
    })?;
    if let Some(reason) = meridian_core::scope::outside_topology(&transactions, keys) {
        return Err(ReplayError::OutsideTopology { id, reason });
    }
    let mut changes = 0;
    if let Some(plan) = plan::plan(&transactions, Lsn(0)).map_err(|e| ReplayError::Undecodable {
        id,
        reason: e.to_string(),
    })? {
        let mut shapes = HashMap::new();
        load_shapes(&mut tx, &plan, &mut shapes).await?;
        execute(&mut tx, &plan, &shapes).await?;
        changes = plan.changes;
    }
    resolve(&mut tx, id, "replayed", by, None).await?;
    tx.commit().await?;
    Ok(changes)
}

/// Marks a pending dead letter discarded by `by`, with a note.
pub async fn discard(
    conn: &mut PgConnection,
    id: i64,
    by: &str,
    note: Option<&str>,
) -> Result<(), ReplayError> {
    let mut tx = conn.begin().await?;
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM meridian.dead_letters WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
    match status.as_deref() {
        None => return Err(ReplayError::NotFound(id)),
        Some("pending") => {}
        Some(other) => {
            return Err(ReplayError::Resolved {
                id,
                status: other.to_owned(),
            });
        }
    }
    resolve(&mut tx, id, "discarded", by, note).await?;
    tx.commit().await?;
    Ok(())
}

async fn resolve(
    conn: &mut PgConnection,
    id: i64,
    status: &str,
    by: &str,
    note: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE meridian.dead_letters
            SET status = $2, resolved_at = now(), resolved_by = $3, resolution_note = $4
          WHERE id = $1",
    )
    .bind(id)
    .bind(status)
    .bind(by)
    .bind(note)
    .execute(conn)
    .await
    .map(|_| ())
}
