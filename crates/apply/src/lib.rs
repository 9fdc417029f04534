//! Apply: writes batches from a source region into this region's store.
//!
//! Contract: [`Applier::apply`] is the one apply-or-dead-letter step of both
//! transports. It runs the transactions in one destination transaction
//! together with their checkpoint (the source's watermark for gRPC links, a
//! partition's offset and position for Kafka links). Transactions at or
//! below the watermark are skipped, so a batch delivered twice changes
//! nothing the second time. The session carries a `meridian_*` replication
//! origin, so this region's capture never ships these changes back.
//!
//! What happens to data the store will not take is decided by
//! [`error::class`]:
//! - bad data (a value the column type refuses, a broken constraint) is set
//!   aside transaction by transaction in `meridian.dead_letters`, with a
//!   reason that names table, column and SQLSTATE but no value, in the same
//!   destination transaction as the checkpoint that moves past it; the rest
//!   applies. A dead letter stays `pending` until an operator replays or
//!   discards it ([`replay`]); commit tokens do not resolve past it;
//! - a destination schema that does not fit (missing table or column) is
//!   retried, after reloading the table shapes once, and never skipped;
//! - anything else is a store outage: retried.
//!
//! The SQL is built by [`statements`] from a pure [`meridian_core::plan::Plan`];
//! this module only executes it.

pub mod error;
pub mod replay;
pub mod statements;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use meridian_core::plan::{self, Plan};
use meridian_core::record::Position;
use meridian_core::{Lsn, Transaction, codec};
use sqlx::{Connection, PgConnection, PgPool};

pub use error::ApplyError;
pub use statements::TableShape;

/// Migrations for the `meridian` schema, embedded in the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Runs the embedded migrations against a store.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The futures of this crate are boxed so they are provably `Send` for every
/// lifetime; sqlx's executor bounds otherwise defeat the compiler when a
/// caller awaits them inside a spawned task.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Where an apply leaves its mark, in the same destination transaction as
/// the rows it covers.
#[derive(Clone, Copy, Debug)]
pub enum Checkpoint<'a> {
    /// gRPC links: the source's watermark becomes the end of the last
    /// transaction applied (or dead-lettered).
    Watermark,
    /// Kafka links: the partition's progress after each transaction (one
    /// entry per transaction); the source's watermark becomes just below the
    /// lowest position of all its partitions.
    Partition {
        topic: &'a str,
        partition: i32,
        after: &'a [RecordProgress],
    },
}

impl<'a> Checkpoint<'a> {
    /// The checkpoint of transactions `range` of the batch.
    fn slice(&self, range: std::ops::Range<usize>) -> Checkpoint<'a> {
        match *self {
            Checkpoint::Watermark => Checkpoint::Watermark,
            Checkpoint::Partition {
                topic,
                partition,
                after,
            } => Checkpoint::Partition {
                topic,
                partition,
                after: &after[range],
            },
        }
    }
}

/// A Kafka partition's progress after one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordProgress {
    /// The offset after the record.
    pub next_offset: i64,
    /// The record's source position.
    pub position: Position,
    /// Commit time of the record's transaction (PostgreSQL epoch, µs).
    pub commit_time: i64,
}

/// Outcome of [`Applier::apply`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Applied {
    /// The source's watermark after the call.
    pub watermark: Lsn,
    /// Row changes newly applied (0 for a duplicate batch).
    pub changes: usize,
    /// Transactions set aside in `meridian.dead_letters`, with the reason.
    pub dead_lettered: Vec<(Lsn, String)>,
}

/// Something that never reached the store as rows: an undecodable batch or
/// record, kept (payload only when it may be kept) for an operator.
#[derive(Clone, Copy, Debug)]
pub struct Letter<'a> {
    /// End position of the data's last transaction, as the source said.
    pub end_lsn: Lsn,
    pub reason: &'a str,
    pub payload: &'a [u8],
}

/// One source region's apply session on a destination store. Only one may
/// exist per (source, origin) at a time: PostgreSQL lets one session hold a
/// replication origin.
pub struct Applier {
    conn: PgConnection,
    source: String,
    shapes: HashMap<(String, String), TableShape>,
    /// The destination transaction of a fragmented source transaction,
    /// open across calls until its last fragment.
    open: Option<Open>,
    /// A fragmented transaction (by commit position) a unique constraint
    /// refused as sets: its next attempt applies change by change.
    in_source_order: Option<Lsn>,
    /// Kafka links: the other partitions of the topic that wait on a unique
    /// constraint themselves, each at the position of its refused record.
    others_waiting: Vec<(i32, Position)>,
}

/// A destination transaction left open for the rest of a fragmented source
/// transaction.
struct Open {
    commit_lsn: Lsn,
    /// The source's watermark when it began (read under `FOR UPDATE`).
    watermark: Lsn,
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
        let conn = apply_session(url, origin).await?;
        Ok(Applier {
            conn,
            source: source.to_owned(),
            shapes: HashMap::new(),
            open: None,
            in_source_order: None,
            others_waiting: Vec::new(),
        })
    }

    /// Kafka links: tells which other partitions of the topic wait on a
    /// unique constraint (see [`ApplyError::Waiting`]), each at the position
    /// of its refused record, before the next [`Applier::apply`].
    pub fn others_waiting(&mut self, waiting: Vec<(i32, Position)>) {
        self.others_waiting = waiting;
    }

    /// The source's durable watermark in this store.
    pub fn watermark(&mut self) -> BoxFuture<'_, Result<Lsn, sqlx::Error>> {
        Box::pin(async move {
            let lsn: Option<i64> = sqlx::query_scalar(
                "SELECT end_lsn FROM meridian.watermarks WHERE source_region = $1",
            )
            .bind(&self.source)
            .fetch_optional(&mut self.conn)
            .await?;
            Ok(Lsn(lsn.unwrap_or(0) as u64))
        })
    }

    /// Applies the transactions (those past the watermark, for
    /// [`Checkpoint::Watermark`]) with their checkpoint, in one destination
    /// transaction. If the store rejects the data, each transaction is
    /// retried alone and the rejected ones are dead-lettered with their own
    /// checkpoint. Returns an error only for what must be retried
    /// ([`ApplyError::Schema`], [`ApplyError::Unavailable`]): then nothing
    /// of the call is applied.
    ///
    /// Fragments of a large transaction (gRPC links) are applied in one
    /// destination transaction that stays open from the first fragment to
    /// the last; the watermark moves only with the last. If the store rejects
    /// a fragment, nothing of that transaction is kept and the error is
    /// [`ApplyError::Blocked`] (too large to set aside: retried).
    pub fn apply<'a>(
        &'a mut self,
        transactions: &'a [Transaction],
        at: Checkpoint<'a>,
    ) -> BoxFuture<'a, Result<Applied, ApplyError>> {
        Box::pin(async move {
            if matches!(at, Checkpoint::Partition { .. })
                || (self.open.is_none() && !transactions.iter().any(|t| t.continues))
            {
                return self.apply_whole(transactions, at).await;
            }
            // runs of whole transactions, and runs of one transaction's fragments
            let mut outcome = Applied::default();
            let mut i = 0;
            while i < transactions.len() {
                let fragmented = self.open.is_some() || transactions[i].continues;
                let commit = self
                    .open
                    .as_ref()
                    .map_or(transactions[i].commit_lsn, |o| o.commit_lsn);
                let mut j = i;
                if fragmented {
                    while j < transactions.len() && transactions[j].commit_lsn == commit {
                        j += 1;
                        if !transactions[j - 1].continues {
                            break;
                        }
                    }
                    if j == i {
                        return Err(ApplyError::Rejected {
                            sqlstate: None,
                            reason: format!(
                                "a fragmented transaction (commit {commit}) ended without its last fragment"
                            ),
                        });
                    }
                } else {
                    while j < transactions.len() && !transactions[j].continues {
                        j += 1;
                    }
                }
                let run = &transactions[i..j];
                let applied = if fragmented {
                    self.apply_fragments(run).await?
                } else {
                    self.apply_whole(run, at).await?
                };
                outcome.watermark = outcome.watermark.max(applied.watermark);
                outcome.changes += applied.changes;
                outcome.dead_lettered.extend(applied.dead_lettered);
                i = j;
            }
            Ok(outcome)
        })
    }

    /// Rolls back the destination transaction of a fragmented source
    /// transaction, if one is open (its stream ended before the last
    /// fragment; the source sends it again from the watermark).
    pub fn abandon(&mut self) -> BoxFuture<'_, Result<(), sqlx::Error>> {
        Box::pin(async move {
            if self.open.take().is_some() {
                sqlx::query("ROLLBACK").execute(&mut self.conn).await?;
            }
            Ok(())
        })
    }

    /// Fragments of one transaction, in the destination transaction that
    /// stays open until the last.
    async fn apply_fragments(&mut self, fragments: &[Transaction]) -> Result<Applied, ApplyError> {
        let result = self.apply_fragments_inner(fragments).await;
        if let Err(e) = &result {
            self.shapes.clear();
            if is_uniqueness(e) {
                self.in_source_order = Some(fragments[0].commit_lsn);
            }
            if self.open.take().is_some() {
                // the transaction is aborted already; end it
                let _ = sqlx::query("ROLLBACK").execute(&mut self.conn).await;
            }
            if let ApplyError::Rejected { reason, .. } = e {
                return Err(ApplyError::Blocked(reason.clone()));
            }
        }
        result
    }

    async fn apply_fragments_inner(
        &mut self,
        fragments: &[Transaction],
    ) -> Result<Applied, ApplyError> {
        let first = &fragments[0];
        if self.open.is_none() {
            sqlx::query("BEGIN").execute(&mut self.conn).await?;
            let current: Option<i64> = sqlx::query_scalar(
                "SELECT end_lsn FROM meridian.watermarks WHERE source_region = $1 FOR UPDATE",
            )
            .bind(&self.source)
            .fetch_optional(&mut self.conn)
            .await?;
            self.open = Some(Open {
                commit_lsn: first.commit_lsn,
                watermark: Lsn(current.unwrap_or(0) as u64),
            });
        }
        let watermark = self.open.as_ref().expect("opened above").watermark;
        let mut changes = 0;
        let order = match self.in_source_order {
            Some(commit) if commit == first.commit_lsn => Order::Source,
            _ => Order::Collapsed,
        };
        let plans = plans(fragments, watermark, order).map_err(|e| ApplyError::Rejected {
            sqlstate: None,
            reason: e.to_string(),
        })?;
        for plan in &plans {
            load_shapes(&mut self.conn, plan, &mut self.shapes).await?;
            execute(&mut self.conn, plan, &self.shapes).await?;
            changes += plan.changes;
        }
        let last = fragments.last().expect("at least one fragment");
        if last.continues {
            return Ok(Applied {
                watermark,
                changes,
                dead_lettered: Vec::new(),
            });
        }
        let watermark = if last.end_lsn > watermark {
            record_tokens(&mut self.conn, &self.source, fragments).await?;
            raise_watermark(&mut self.conn, &self.source, last.end_lsn, last.commit_time).await?
        } else {
            watermark
        };
        self.open = None;
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        Ok(Applied {
            watermark,
            changes,
            dead_lettered: Vec::new(),
        })
    }

    /// Whole transactions (or Kafka records), with dead letters for the
    /// rejected ones.
    async fn apply_whole(
        &mut self,
        transactions: &[Transaction],
        at: Checkpoint<'_>,
    ) -> Result<Applied, ApplyError> {
        {
            match self.try_apply(transactions, at).await {
                Err(ApplyError::Rejected { .. }) => {}
                other => return other,
            }
            let mut outcome = Applied::default();
            for (i, t) in transactions.iter().enumerate() {
                let at = at.slice(i..i + 1);
                let single = std::slice::from_ref(t);
                match self.try_apply_alone(single, at).await {
                    Ok(applied) => {
                        outcome.watermark = outcome.watermark.max(applied.watermark);
                        outcome.changes += applied.changes;
                    }
                    Err(ApplyError::Rejected { sqlstate, reason }) => {
                        let watermark = self
                            .dead_letter_transaction(t, sqlstate.as_deref(), &reason, at)
                            .await?;
                        outcome.watermark = outcome.watermark.max(watermark);
                        outcome.dead_lettered.push((t.end_lsn, reason));
                    }
                    Err(e) => return Err(e),
                }
            }
            Ok(outcome)
        }
    }

    /// One transaction (or Kafka record) that failed in a batch. A unique or
    /// exclusion violation may come from applying its changes as a set
    /// (positions swapped under `UNIQUE (list, position)` through a
    /// temporary value): it is tried again change by change, in source
    /// order, where every step was valid at the source. A Kafka record that
    /// still violates one waits ([`ApplyError::Waiting`]) while another
    /// partition of its source is behind it: the row in the way may be the
    /// old half of a key change travelling there.
    async fn try_apply_alone(
        &mut self,
        single: &[Transaction],
        at: Checkpoint<'_>,
    ) -> Result<Applied, ApplyError> {
        let result = self.try_apply(single, at).await;
        if !result.as_ref().is_err_and(is_uniqueness) {
            return result;
        }
        let result = self.try_apply_in(single, at, Order::Source).await;
        let Checkpoint::Partition {
            topic,
            partition,
            after: [record],
        } = at
        else {
            return result;
        };
        if let Err(e) = &result
            && is_uniqueness(e)
        {
            let stored = partition_positions(&mut self.conn, topic).await?;
            if let Some(behind) =
                progressing_behind(partition, record.position, &stored, &self.others_waiting)
            {
                return Err(ApplyError::Waiting {
                    reason: format!(
                        "{e}; partition {behind} of {topic} has not yet applied the source's \
                         changes before this record (one may remove the row in the way), so \
                         partition {partition} waits for it"
                    ),
                    at: record.position,
                });
            }
        }
        result
    }

    /// One attempt, repeated once with the table shapes read anew if the
    /// store refused it (the cache may predate a schema change).
    async fn try_apply(
        &mut self,
        transactions: &[Transaction],
        at: Checkpoint<'_>,
    ) -> Result<Applied, ApplyError> {
        self.try_apply_in(transactions, at, Order::Collapsed).await
    }

    async fn try_apply_in(
        &mut self,
        transactions: &[Transaction],
        at: Checkpoint<'_>,
        order: Order,
    ) -> Result<Applied, ApplyError> {
        match self.apply_once(transactions, at, order).await {
            // an outage, or a unique constraint (no stale shape causes one:
            // the caller decides what to try next)
            Err(e) if matches!(e, ApplyError::Unavailable(_)) || is_uniqueness(&e) => Err(e),
            Err(_) => {
                self.shapes.clear();
                self.apply_once(transactions, at, order).await
            }
            ok => ok,
        }
    }

    async fn apply_once(
        &mut self,
        transactions: &[Transaction],
        at: Checkpoint<'_>,
        order: Order,
    ) -> Result<Applied, ApplyError> {
        let mut tx = self.conn.begin().await?;
        let applied = match at {
            Checkpoint::Watermark => {
                let current: Option<i64> = sqlx::query_scalar(
                    "SELECT end_lsn FROM meridian.watermarks WHERE source_region = $1 FOR UPDATE",
                )
                .bind(&self.source)
                .fetch_optional(&mut *tx)
                .await?;
                Lsn(current.unwrap_or(0) as u64)
            }
            Checkpoint::Partition { .. } => Lsn(0),
        };
        let plans = plans(transactions, applied, order).map_err(|e| ApplyError::Rejected {
            sqlstate: None,
            reason: e.to_string(),
        })?;
        let mut changes = 0;
        for plan in &plans {
            load_shapes(&mut tx, plan, &mut self.shapes).await?;
            execute(&mut tx, plan, &self.shapes).await?;
            changes += plan.changes;
        }
        if !plans.is_empty() {
            let new = transactions.iter().filter(|t| t.end_lsn > applied);
            record_tokens(&mut tx, &self.source, new).await?;
        }
        let plan = plans.last();
        let watermark = match (at, &plan) {
            (Checkpoint::Watermark, None) => {
                return Ok(Applied {
                    watermark: applied,
                    ..Applied::default()
                });
            }
            (Checkpoint::Watermark, Some(plan)) => {
                raise_watermark(&mut tx, &self.source, plan.end_lsn, plan.commit_time).await?
            }
            (
                Checkpoint::Partition {
                    topic,
                    partition,
                    after,
                },
                _,
            ) => match after.last() {
                Some(last) => {
                    record_partition(&mut tx, &self.source, topic, partition, last).await?
                }
                None => Lsn(0),
            },
        };
        tx.commit().await?;
        Ok(Applied {
            watermark,
            changes,
            dead_lettered: Vec::new(),
        })
    }

    /// Sets one rejected transaction aside and moves its checkpoint past it.
    async fn dead_letter_transaction(
        &mut self,
        t: &Transaction,
        sqlstate: Option<&str>,
        reason: &str,
        at: Checkpoint<'_>,
    ) -> Result<Lsn, ApplyError> {
        let payload = codec::encode(std::slice::from_ref(t));
        let letter = Letter {
            end_lsn: t.end_lsn,
            reason,
            payload: &payload,
        };
        Ok(self
            .record_dead_letter(letter, sqlstate, at, t.commit_time, Some(t))
            .await?)
    }

    /// Records data that never reached the store as rows (an undecodable
    /// batch or record) and moves the checkpoint past it, in one transaction.
    pub fn dead_letter<'a>(
        &'a mut self,
        letter: Letter<'a>,
        at: Checkpoint<'a>,
    ) -> BoxFuture<'a, Result<Lsn, sqlx::Error>> {
        Box::pin(self.record_dead_letter(letter, None, at, 0, None))
    }

    async fn record_dead_letter(
        &mut self,
        letter: Letter<'_>,
        sqlstate: Option<&str>,
        at: Checkpoint<'_>,
        commit_time: i64,
        transaction: Option<&Transaction>,
    ) -> Result<Lsn, sqlx::Error> {
        let mut tx = self.conn.begin().await?;
        // a reader waiting for its token learns where it went (and, from
        // the dead letter at that position, that it did not apply)
        record_tokens(&mut tx, &self.source, transaction).await?;
        let (transport, topic, partition, offset) = match at {
            Checkpoint::Watermark => ("grpc", None, None, None),
            Checkpoint::Partition {
                topic,
                partition,
                after,
            } => (
                "kafka",
                Some(topic),
                Some(partition),
                after.last().map(|p| p.next_offset - 1),
            ),
        };
        sqlx::query(
            "INSERT INTO meridian.dead_letters
               (source_region, end_lsn, reason, payload, sqlstate, transport,
                kafka_topic, kafka_partition, kafka_offset)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&self.source)
        .bind(letter.end_lsn.0 as i64)
        .bind(letter.reason)
        .bind(letter.payload)
        .bind(sqlstate)
        .bind(transport)
        .bind(topic)
        .bind(partition)
        .bind(offset)
        .execute(&mut *tx)
        .await?;
        let watermark = match at {
            Checkpoint::Watermark => {
                raise_watermark(&mut tx, &self.source, letter.end_lsn, commit_time).await?
            }
            Checkpoint::Partition {
                topic,
                partition,
                after,
            } => match after.last() {
                Some(last) => {
                    record_partition(&mut tx, &self.source, topic, partition, last).await?
                }
                None => Lsn(0),
            },
        };
        tx.commit().await?;
        Ok(watermark)
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

    /// The apply session's connection, for checks between applies (never
    /// while a fragmented transaction is open).
    pub fn connection(&mut self) -> &mut PgConnection {
        &mut self.conn
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
}

/// How a transaction's changes become statements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Order {
    /// Collapsed per row into set-based statements (the fast path).
    Collapsed,
    /// One change at a time, in source order (the fallback when a unique
    /// constraint other than the key refuses the set).
    Source,
}

/// The plans that apply the transactions past `applied`, in order.
fn plans(
    transactions: &[Transaction],
    applied: Lsn,
    order: Order,
) -> Result<Vec<Plan>, plan::ShapeError> {
    match order {
        Order::Collapsed => Ok(plan::plan(transactions, applied)?.into_iter().collect()),
        Order::Source => {
            let mut plans = Vec::new();
            for t in transactions.iter().filter(|t| t.end_lsn > applied) {
                for change in &t.changes {
                    let one = Transaction {
                        commit_lsn: t.commit_lsn,
                        end_lsn: t.end_lsn,
                        commit_time: t.commit_time,
                        changes: vec![change.clone()],
                        continues: false,
                        token: None,
                    };
                    plans.extend(plan::plan(std::slice::from_ref(&one), applied)?);
                }
            }
            Ok(plans)
        }
    }
}

/// A unique or exclusion violation (SQLSTATE 23505, 23P01).
fn is_uniqueness(e: &ApplyError) -> bool {
    matches!(e, ApplyError::Rejected { sqlstate: Some(s), .. } if s == "23505" || s == "23P01")
}

/// The applied position of every partition of `topic`.
async fn partition_positions(
    conn: &mut PgConnection,
    topic: &str,
) -> Result<Vec<(i32, Position)>, sqlx::Error> {
    let rows: Vec<(i32, i64, i64)> =
        sqlx::query_as("SELECT partition, lsn, idx FROM meridian.kafka_positions WHERE topic = $1")
            .bind(topic)
            .fetch_all(conn)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(p, lsn, idx)| {
            (
                p,
                Position {
                    lsn: Lsn(lsn as u64),
                    index: idx as u32,
                },
            )
        })
        .collect())
}

/// A partition other than `own` that is behind `at` (it may still apply
/// the change that removes the row in the way) and can make progress, if
/// any. A partition that waits on a unique constraint itself makes
/// progress only if one it waits for does, and so on: when every partition
/// behind `at` waits, directly or through others, on a partition that
/// waits, nothing can move (two real conflicts, or a reorder across
/// partitions) and the record is a dead letter, not a wait forever.
fn progressing_behind(
    own: i32,
    at: Position,
    stored: &[(i32, Position)],
    waiting: &[(i32, Position)],
) -> Option<i32> {
    let mut targets = vec![at];
    let mut seen = std::collections::HashSet::from([own]);
    while let Some(target) = targets.pop() {
        for &(p, applied) in stored {
            if applied >= target || !seen.insert(p) {
                continue;
            }
            match waiting.iter().find(|(w, _)| *w == p) {
                Some(&(_, blocked_at)) => targets.push(blocked_at),
                None => return Some(p),
            }
        }
    }
    None
}

/// A connection set up to apply: no user triggers and no FK ordering (like
/// PostgreSQL's apply workers), durable commits whatever the store's default
/// (the source confirms its slot on our word), and the replication origin
/// `origin` (a `meridian_*` name, which capture skips). Joins are nested
/// loops: a batch's keys find their rows through the key's index, never by
/// hashing the whole table (what the planner picks for a few thousand keys,
/// at a cost that grows with the table, not the batch).
pub(crate) fn apply_session<'a>(
    url: &'a str,
    origin: &'a str,
) -> BoxFuture<'a, Result<PgConnection, sqlx::Error>> {
    Box::pin(apply_session_inner(url, origin))
}

async fn apply_session_inner(url: &str, origin: &str) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect(url).await?;
    for setting in [
        "SET session_replication_role = replica",
        "SET synchronous_commit = on",
        "SET enable_hashjoin = off",
        "SET enable_mergejoin = off",
    ] {
        sqlx::query(setting).execute(&mut conn).await?;
    }
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
    Ok(conn)
}

/// Records the commit token ids the transactions carry, with their
/// positions (already recorded ones stay).
async fn record_tokens(
    conn: &mut PgConnection,
    source: &str,
    transactions: impl IntoIterator<Item = &Transaction>,
) -> Result<(), sqlx::Error> {
    let (tokens, ends): (Vec<String>, Vec<i64>) = transactions
        .into_iter()
        .filter_map(|t| Some((format!("{:032x}", t.token?), t.end_lsn.0 as i64)))
        .unzip();
    if tokens.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO meridian.applied_tokens (source_region, token, end_lsn)
         SELECT $1, t::uuid, e FROM unnest($2::text[], $3::bigint[]) AS u(t, e)
         ON CONFLICT DO NOTHING",
    )
    .bind(source)
    .bind(tokens)
    .bind(ends)
    .execute(conn)
    .await?;
    Ok(())
}

/// Raises the source's watermark to `end` (never lowers it); returns it.
async fn raise_watermark(
    conn: &mut PgConnection,
    source: &str,
    end: Lsn,
    commit_time: i64,
) -> Result<Lsn, sqlx::Error> {
    let watermark: i64 = sqlx::query_scalar(
        "INSERT INTO meridian.watermarks (source_region, end_lsn, source_commit_time)
         VALUES ($1, $2, timestamptz '2000-01-01 UTC' + $3 * interval '1 microsecond')
         ON CONFLICT (source_region) DO UPDATE
            SET end_lsn = greatest(meridian.watermarks.end_lsn, EXCLUDED.end_lsn),
                source_commit_time = CASE WHEN EXCLUDED.end_lsn >= meridian.watermarks.end_lsn
                                          THEN EXCLUDED.source_commit_time
                                          ELSE meridian.watermarks.source_commit_time END,
                applied_at = now()
         RETURNING end_lsn",
    )
    .bind(source)
    .bind(end.0 as i64)
    .bind(commit_time as f64)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Lsn(watermark as u64))
}

/// Stores a partition's progress and raises the source's watermark to just
/// below the lowest position of its topic's partitions; returns it.
async fn record_partition(
    conn: &mut PgConnection,
    source: &str,
    topic: &str,
    partition: i32,
    at: &RecordProgress,
) -> Result<Lsn, sqlx::Error> {
    sqlx::query(
        "INSERT INTO meridian.kafka_positions (topic, partition, source_region, next_offset, lsn, idx)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (topic, partition) DO UPDATE
            SET next_offset = EXCLUDED.next_offset, lsn = EXCLUDED.lsn, idx = EXCLUDED.idx,
                updated_at = now()",
    )
    .bind(topic)
    .bind(partition)
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
    .bind(topic)
    .bind(at.commit_time as f64)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Lsn(watermark as u64))
}

/// Reads the destination shape of every table the plan touches that is not
/// cached yet.
pub(crate) async fn load_shapes(
    conn: &mut PgConnection,
    plan: &Plan,
    shapes: &mut HashMap<(String, String), TableShape>,
) -> Result<(), ApplyError> {
    for (table, _) in &plan.tables {
        let key = (table.schema.clone(), table.name.clone());
        if let std::collections::hash_map::Entry::Vacant(slot) = shapes.entry(key) {
            slot.insert(statements::load_shape(conn, &table.schema, &table.name).await?);
        }
    }
    Ok(())
}

/// Runs a plan: every merge first (each reads the rows as they were before
/// the batch), then every delete, then every upsert.
pub(crate) async fn execute(
    conn: &mut PgConnection,
    plan: &Plan,
    shapes: &HashMap<(String, String), TableShape>,
) -> Result<(), ApplyError> {
    // a table whose merges come in several shapes: each shape's merges read
    // a copy of their source rows taken before any of them writes
    let mut merge_shapes: HashMap<(&str, &str), usize> = HashMap::new();
    for (table, ops) in &plan.tables {
        if !ops.merges.is_empty() {
            *merge_shapes
                .entry((&table.schema, &table.name))
                .or_default() += 1;
        }
    }
    let mut phases: [Vec<(String, statements::Statement)>; 4] = Default::default();
    for (i, (table, ops)) in plan.tables.iter().enumerate() {
        let name = format!("{}.{}", table.schema, table.name);
        let shape = &shapes[&(table.schema.clone(), table.name.clone())];
        let copy = format!("meridian_merge_source_{i}");
        let merge_source = if merge_shapes.get(&(&*table.schema, &*table.name)) > Some(&1) {
            let from: Vec<_> = ops.merges.iter().map(|m| &m.from).collect();
            let snapshot = statements::merge_snapshot(table, shape, &from, &copy)
                .map_err(|e| build_error(&name, e))?;
            phases[0].extend(snapshot.map(|s| (name.clone(), s)));
            Some(meridian_core::change::quote_ident(&copy))
        } else {
            None
        };
        let built = statements::build(table, shape, ops, merge_source.as_deref())
            .map_err(|e| build_error(&name, e))?;
        phases[1].extend(built.merges.into_iter().map(|s| (name.clone(), s)));
        phases[2].extend(built.deletes.into_iter().map(|s| (name.clone(), s)));
        phases[3].extend(built.upserts.into_iter().map(|s| (name.clone(), s)));
    }
    for (phase, statements) in phases.into_iter().enumerate() {
        for (table, statement) in statements {
            let mut query = sqlx::query(&statement.sql);
            for param in statement.params {
                query = match param {
                    statements::Param::Column(values) => query.bind(values),
                    statements::Param::Flags(flags) => query.bind(flags),
                };
            }
            let done = query
                .execute(&mut *conn)
                .await
                .map_err(|e| error::classify(&table, e))?;
            if phase == 1 && (done.rows_affected() as usize) < statement.rows {
                tracing::warn!(table = %table, missing = statement.rows - done.rows_affected() as usize,
                    "updates whose unchanged (TOAST) values this store has no row to take from; \
                     their rows stay as they are until the next full image");
            }
        }
    }
    Ok(())
}

fn build_error(table: &str, e: statements::BuildError) -> ApplyError {
    match e {
        statements::BuildError::Schema(m) => ApplyError::Schema(m),
        statements::BuildError::Data(m) => ApplyError::Rejected {
            sqlstate: None,
            reason: format!("{table}: {m}"),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use meridian_core::change::{Change, ChangeKind, Column, Table, Value};

    use super::*;

    fn at(lsn: u64, index: u32) -> Position {
        Position {
            lsn: Lsn(lsn),
            index,
        }
    }

    /// Waiting for a partition behind the record holds only while that
    /// partition can move: not for one that waits itself on partitions
    /// that wait (two real conflicts, a reorder across partitions).
    #[test]
    fn a_record_waits_only_for_partitions_that_can_move() {
        let stored = [(0, at(90, 0)), (1, at(90, 0)), (2, at(120, 0))];
        // partition 1 is behind and free: wait for it
        assert_eq!(progressing_behind(0, at(100, 3), &stored, &[]), Some(1));
        // nobody behind: dead-letter
        assert_eq!(progressing_behind(0, at(80, 0), &stored, &[]), None);
        // 1 waits at (100, 1), and only 0 (us) is behind that: a deadlock
        assert_eq!(
            progressing_behind(0, at(100, 3), &stored, &[(1, at(100, 1))]),
            None
        );
        // if 2 is behind 1's record and free, 1 may move, and free us
        let stored = [(0, at(90, 0)), (1, at(90, 0)), (2, at(95, 0))];
        assert_eq!(
            progressing_behind(0, at(100, 3), &stored, &[(1, at(100, 1))]),
            Some(2)
        );
        // ...unless 2 waits too, on a position only waiting partitions are behind
        assert_eq!(
            progressing_behind(0, at(100, 3), &stored, &[(1, at(100, 1)), (2, at(96, 0))]),
            None
        );
    }

    fn update(table: &Arc<Table>, id: &str, pos: &str) -> Change {
        Change {
            table: table.clone(),
            kind: ChangeKind::Update {
                old: None,
                new: vec![Value::Text(id.into()), Value::Text(pos.into())],
            },
        }
    }

    /// A swap through a temporary value: collapsed, the first row's final
    /// image comes first (which a unique position refuses while the second
    /// row holds it); in source order every step is its own plan, in order.
    #[test]
    fn source_order_plans_each_change_in_turn() {
        let table = Arc::new(Table {
            schema: "public".into(),
            name: "slots".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    key: true,
                },
                Column {
                    name: "pos".into(),
                    type_oid: 23,
                    key: false,
                },
            ],
        });
        let swap = Transaction {
            commit_lsn: Lsn(9),
            end_lsn: Lsn(10),
            commit_time: 1,
            changes: vec![
                update(&table, "1", "-1"),
                update(&table, "2", "1"),
                update(&table, "1", "2"),
            ],
            continues: false,
            token: Some(7),
        };
        let rows = |p: &Plan| p.tables[0].1.upserts.clone();
        let collapsed = plans(std::slice::from_ref(&swap), Lsn(0), Order::Collapsed).unwrap();
        assert_eq!(collapsed.len(), 1);
        assert_eq!(collapsed[0].changes, 3);
        assert_eq!(rows(&collapsed[0])[0][1], Value::Text("2".into()));

        let ordered = plans(std::slice::from_ref(&swap), Lsn(0), Order::Source).unwrap();
        let steps: Vec<_> = ordered.iter().map(rows).collect();
        let text = |s: &str| Value::Text(s.into());
        assert_eq!(
            steps,
            vec![
                vec![vec![text("1"), text("-1")]],
                vec![vec![text("2"), text("1")]],
                vec![vec![text("1"), text("2")]],
            ]
        );
        assert!(
            ordered
                .iter()
                .all(|p| p.end_lsn == Lsn(10) && p.changes == 1)
        );
        // already applied: nothing in either order
        assert!(
            plans(std::slice::from_ref(&swap), Lsn(10), Order::Source)
                .unwrap()
                .is_empty()
        );
    }
}
