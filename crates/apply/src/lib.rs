//! Apply: writes batches from a source region into this region's store.
//!
//! Contract: [`Applier::apply`] runs one batch in one transaction together with
//! the source's watermark (`meridian.watermarks`). Transactions at or below the
//! watermark are skipped, so a batch delivered twice changes nothing the second
//! time. The session carries the replication origin `meridian_from_<source>`,
//! so this region's capture never ships these changes back.
//!
//! The SQL is built by [`statements`] from a pure [`meridian_core::plan::Plan`];
//! this module only executes it.

pub mod statements;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use meridian_core::plan::{self, Plan};
use meridian_core::record::Position;
use meridian_core::{Lsn, Transaction};
use sqlx::{Connection, PgConnection, PgPool};

pub use statements::TableShape;

/// Migrations for the `meridian` schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Runs the embedded migrations against a store.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// Why a batch was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The store rejected the data (bad value, missing table or column, ...).
    /// Retrying will not help: the batch belongs in the dead-letter table.
    #[error("store rejected the batch: {0}")]
    Rejected(String),
    /// The store was unreachable or failed; retry later.
    #[error("store unavailable: {0}")]
    Unavailable(#[from] sqlx::Error),
}

fn classify(e: sqlx::Error) -> ApplyError {
    if let sqlx::Error::Database(db) = &e {
        let code = db.code().unwrap_or_default();
        // 22 data exception, 23 integrity violation, 42 syntax/undefined object, 0A not supported
        if ["22", "23", "42", "0A"].iter().any(|c| code.starts_with(c)) {
            return ApplyError::Rejected(format!("{} (SQLSTATE {code})", db.message()));
        }
    }
    ApplyError::Unavailable(e)
}

/// The futures of this crate are boxed so they are provably `Send` for every
/// lifetime; sqlx's executor bounds otherwise defeat the compiler when a
/// caller awaits them inside a spawned task.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Outcome of [`Applier::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// The source's watermark after the call.
    pub watermark: Lsn,
    /// Row changes newly applied (0 for a duplicate batch).
    pub changes: usize,
}

/// One source region's apply session on a destination store. Only one may
/// exist per (source, store) at a time: PostgreSQL lets one session hold a
/// replication origin.
pub struct Applier {
    conn: PgConnection,
    source: String,
    shapes: HashMap<(String, String), TableShape>,
}

impl Applier {
    /// Opens the apply session for `source` on the store at `url`.
    pub fn connect<'a>(
        url: &'a str,
        source: &'a str,
        origin: &'a str,
    ) -> BoxFuture<'a, Result<Applier, sqlx::Error>> {
        Box::pin(Self::connect_inner(url, source, origin))
    }

    async fn connect_inner(url: &str, source: &str, origin: &str) -> Result<Applier, sqlx::Error> {
        let mut conn = PgConnection::connect(url).await?;
        // like PostgreSQL's apply workers: no user triggers, no FK ordering
        sqlx::query("SET session_replication_role = replica")
            .execute(&mut conn)
            .await?;
        sqlx::query(
            "SELECT pg_replication_origin_create($1)
              WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
        )
        .bind(origin)
        .execute(&mut conn)
        .await?;
        sqlx::query("SELECT pg_replication_origin_session_setup($1)")
            .bind(origin)
            .execute(&mut conn)
            .await?;
        Ok(Applier {
            conn,
            source: source.to_owned(),
            shapes: HashMap::new(),
        })
    }

    /// The source's durable watermark in this store.
    pub fn watermark(&mut self) -> BoxFuture<'_, Result<Lsn, sqlx::Error>> {
        Box::pin(self.watermark_inner())
    }

    async fn watermark_inner(&mut self) -> Result<Lsn, sqlx::Error> {
        let lsn: Option<i64> =
            sqlx::query_scalar("SELECT end_lsn FROM meridian.watermarks WHERE source_region = $1")
                .bind(&self.source)
                .fetch_optional(&mut self.conn)
                .await?;
        Ok(Lsn(lsn.unwrap_or(0) as u64))
    }

    /// Applies the transactions past the watermark, in one transaction with
    /// the new watermark.
    pub fn apply<'a>(
        &'a mut self,
        transactions: &'a [Transaction],
    ) -> BoxFuture<'a, Result<Applied, ApplyError>> {
        Box::pin(self.apply_inner(transactions))
    }

    async fn apply_inner(&mut self, transactions: &[Transaction]) -> Result<Applied, ApplyError> {
        let mut tx = self.conn.begin().await?;
        let current: Option<i64> = sqlx::query_scalar(
            "SELECT end_lsn FROM meridian.watermarks WHERE source_region = $1 FOR UPDATE",
        )
        .bind(&self.source)
        .fetch_optional(&mut *tx)
        .await?;
        let watermark = Lsn(current.unwrap_or(0) as u64);
        let Some(plan) = plan::plan(transactions, watermark) else {
            return Ok(Applied {
                watermark,
                changes: 0,
            });
        };
        for (table, _) in &plan.tables {
            let key = (table.schema.clone(), table.name.clone());
            if let std::collections::hash_map::Entry::Vacant(slot) = self.shapes.entry(key) {
                let shape = statements::load_shape(&mut tx, &table.schema, &table.name)
                    .await
                    .map_err(classify)?;
                slot.insert(shape);
            }
        }
        execute(&mut tx, &plan, &self.shapes).await?;
        sqlx::query(
            "INSERT INTO meridian.watermarks (source_region, end_lsn, source_commit_time)
             VALUES ($1, $2, timestamptz '2000-01-01 UTC' + $3 * interval '1 microsecond')
             ON CONFLICT (source_region) DO UPDATE
                SET end_lsn = EXCLUDED.end_lsn, source_commit_time = EXCLUDED.source_commit_time,
                    applied_at = now()",
        )
        .bind(&self.source)
        .bind(plan.end_lsn.0 as i64)
        .bind(plan.commit_time as f64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Applied {
            watermark: plan.end_lsn,
            changes: plan.changes,
        })
    }

    /// Kafka links: the stored `(next offset, position)` of every partition
    /// of `topic` (0 and the zero position for partitions not seen yet,
    /// which are recorded so that the source's watermark waits for them).
    pub fn partitions<'a>(
        &'a mut self,
        topic: &'a str,
        count: i32,
    ) -> BoxFuture<'a, Result<Vec<(i64, Position)>, sqlx::Error>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO meridian.kafka_positions (topic, partition, source_region, next_offset, lsn, idx)
                 SELECT $1, p, $2, 0, 0, 0 FROM generate_series(0, $3 - 1) AS p
                 ON CONFLICT (topic, partition) DO NOTHING",
            )
            .bind(topic)
            .bind(&self.source)
            .bind(count)
            .execute(&mut self.conn)
            .await?;
            let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
                "SELECT next_offset, lsn, idx FROM meridian.kafka_positions
                  WHERE topic = $1 AND partition < $2 ORDER BY partition",
            )
            .bind(topic)
            .bind(count)
            .fetch_all(&mut self.conn)
            .await?;
            Ok(rows
                .into_iter()
                .map(|(offset, lsn, idx)| {
                    (
                        offset,
                        Position {
                            lsn: Lsn(lsn as u64),
                            index: idx as u32,
                        },
                    )
                })
                .collect())
        })
    }

    /// Kafka links: applies one partition's records (already past its stored
    /// position) and stores the partition's new offset and position, in one
    /// transaction. The source's watermark becomes just below the lowest
    /// position of all its partitions: every transaction at or below it has
    /// been applied whole.
    pub fn apply_partition<'a>(
        &'a mut self,
        transactions: &'a [Transaction],
        at: &'a PartitionProgress<'a>,
    ) -> BoxFuture<'a, Result<Applied, ApplyError>> {
        Box::pin(async move {
            let mut tx = self.conn.begin().await?;
            let mut changes = 0;
            if let Some(plan) = plan::plan(transactions, Lsn(0)) {
                for (table, _) in &plan.tables {
                    let key = (table.schema.clone(), table.name.clone());
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.shapes.entry(key)
                    {
                        let shape = statements::load_shape(&mut tx, &table.schema, &table.name)
                            .await
                            .map_err(classify)?;
                        slot.insert(shape);
                    }
                }
                execute(&mut tx, &plan, &self.shapes).await?;
                changes = plan.changes;
            }
            let watermark = record_partition(&mut tx, &self.source, at).await?;
            tx.commit().await?;
            Ok(Applied { watermark, changes })
        })
    }

    /// Kafka links: records a record that cannot be applied (the payload
    /// only when `payload` is given) and moves the partition past it.
    pub fn dead_letter_partition<'a>(
        &'a mut self,
        at: &'a PartitionProgress<'a>,
        reason: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            self.shapes.clear();
            let mut tx = self.conn.begin().await?;
            sqlx::query(
                "INSERT INTO meridian.dead_letters (source_region, end_lsn, reason, payload)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(&self.source)
            .bind(at.position.lsn.0 as i64)
            .bind(reason)
            .bind(payload)
            .execute(&mut *tx)
            .await?;
            record_partition(&mut tx, &self.source, at).await?;
            tx.commit().await
        })
    }

    /// Records a batch that cannot be applied, and moves the watermark past
    /// it, in one transaction. The table shapes are reloaded afterwards, in
    /// case the cause was a schema change.
    pub fn dead_letter<'a>(
        &'a mut self,
        end_lsn: Lsn,
        reason: &'a str,
        payload: &'a [u8],
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(self.dead_letter_inner(end_lsn, reason, payload))
    }

    /// Records a batch refused by the residency policy (no values kept).
    pub fn record_violation<'a>(
        &'a mut self,
        end_lsn: Lsn,
        sender_version: u64,
        receiver_version: u64,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), sqlx::Error>> {
        Box::pin(async move {
            sqlx::query(
                "INSERT INTO meridian.policy_violations
                   (source_region, end_lsn, sender_policy_version, receiver_policy_version, reason)
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&self.source)
            .bind(end_lsn.0 as i64)
            .bind(sender_version as i64)
            .bind(receiver_version as i64)
            .bind(reason)
            .execute(&mut self.conn)
            .await
            .map(|_| ())
        })
    }

    async fn dead_letter_inner(
        &mut self,
        end_lsn: Lsn,
        reason: &str,
        payload: &[u8],
    ) -> Result<(), sqlx::Error> {
        self.shapes.clear();
        let mut tx = self.conn.begin().await?;
        sqlx::query(
            "INSERT INTO meridian.dead_letters (source_region, end_lsn, reason, payload)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(&self.source)
        .bind(end_lsn.0 as i64)
        .bind(reason)
        .bind(payload)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO meridian.watermarks (source_region, end_lsn, source_commit_time)
             VALUES ($1, $2, now())
             ON CONFLICT (source_region) DO UPDATE
                SET end_lsn = greatest(meridian.watermarks.end_lsn, EXCLUDED.end_lsn), applied_at = now()",
        )
        .bind(&self.source)
        .bind(end_lsn.0 as i64)
        .execute(&mut *tx)
        .await?;
        tx.commit().await
    }
}

/// Where a Kafka partition's apply leaves its mark.
#[derive(Clone, Copy, Debug)]
pub struct PartitionProgress<'a> {
    pub topic: &'a str,
    pub partition: i32,
    /// The offset after the last record handled.
    pub next_offset: i64,
    /// The source position of the last record handled.
    pub position: Position,
    /// Commit time of that record's transaction (PostgreSQL epoch, µs).
    pub commit_time: i64,
}

/// Stores a partition's progress and raises the source's watermark to just
/// below the lowest position of its topic's partitions; returns it.
async fn record_partition(
    conn: &mut PgConnection,
    source: &str,
    at: &PartitionProgress<'_>,
) -> Result<Lsn, sqlx::Error> {
    sqlx::query(
        "INSERT INTO meridian.kafka_positions (topic, partition, source_region, next_offset, lsn, idx)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (topic, partition) DO UPDATE
            SET next_offset = EXCLUDED.next_offset, lsn = EXCLUDED.lsn, idx = EXCLUDED.idx,
                updated_at = now()",
    )
    .bind(at.topic)
    .bind(at.partition)
    .bind(source)
    .bind(at.next_offset)
    .bind(at.position.lsn.0 as i64)
    .bind(i64::from(at.position.index))
    .execute(&mut *conn)
    .await?;
    let watermark: i64 = sqlx::query_scalar(
        "INSERT INTO meridian.watermarks (source_region, end_lsn, source_commit_time)
         SELECT $1, greatest(min(lsn) - 1, 0),
                timestamptz '2000-01-01 UTC' + $3 * interval '1 microsecond'
           FROM meridian.kafka_positions WHERE topic = $2
         ON CONFLICT (source_region) DO UPDATE
            SET end_lsn = greatest(meridian.watermarks.end_lsn, EXCLUDED.end_lsn),
                source_commit_time = EXCLUDED.source_commit_time, applied_at = now()
         RETURNING end_lsn",
    )
    .bind(source)
    .bind(at.topic)
    .bind(at.commit_time as f64)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Lsn(watermark as u64))
}

async fn execute(
    conn: &mut PgConnection,
    plan: &Plan,
    shapes: &HashMap<(String, String), TableShape>,
) -> Result<(), ApplyError> {
    for (table, ops) in &plan.tables {
        let shape = &shapes[&(table.schema.clone(), table.name.clone())];
        for statement in statements::build(table, shape, ops).map_err(ApplyError::Rejected)? {
            let mut query = sqlx::query(&statement.sql);
            for param in statement.params {
                query = match param {
                    statements::Param::Column(values) => query.bind(values),
                    statements::Param::Value(value) => query.bind(value),
                };
            }
            query.execute(&mut *conn).await.map_err(classify)?;
        }
    }
    Ok(())
}
