//! Initial sync: copies the rows a source already holds into a link's
//! stream, at their true position (see [`meridian_core::snapshot`] for why
//! that is exact).
//!
//! What to copy lives in the source store: `meridian.sync_tables` (per link
//! destination and table: waiting, copying, done, or not copied) and
//! `meridian.sync_ranges` (a table's key ranges, each with the last key
//! whose chunk the next hop holds durably). A link session runs one
//! [`Copier`] beside its capture: it plans waiting tables into ranges,
//! reads ranges' chunks with [`COPIERS`] connections at once, and records a
//! chunk only once the link's acknowledged position passed it, so a kill of
//! either agent resumes from the last recorded chunk (a chunk read again is
//! read at a new position, and applying it again is an upsert of the
//! table's state there).
//!
//! A table is queued when its link is new (its slot is about to be made),
//! when it joins the topology of a running link, when a policy change
//! alters its route (`residency::queue_policy_changes`), and by `meridian
//! sync start` and `meridian resync`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use meridian_core::change::{Change, Column, Table, quote_ident};
use meridian_core::snapshot::{self, Mark, SyncTable};
use meridian_core::topology::TableSpec;
use meridian_core::{Lsn, Row};
use sqlx::{Connection, Executor, PgConnection, PgPool};
use tokio::sync::oneshot;

/// Connections reading chunks at once, per link.
pub const COPIERS: usize = 2;
/// Chunks a copier may have read but not yet seen acknowledged: bounds the
/// memory a copy holds (about a chunk's bytes each) while the link ships.
const OUTSTANDING_CHUNKS: usize = 8;
/// A range per this many rows, at most [`MAX_RANGES`].
const ROWS_PER_RANGE: i64 = 100_000;
const MAX_RANGES: i64 = 16;
/// How long a chunk's `LOCK TABLE` waits for the table's writers before
/// trying again (jittered): while it waits, new writers queue behind it,
/// so it never waits long.
const LOCK_WAIT: &str = "50ms";
/// After this many tries in a row, a lock wait shows as the copy's error.
const LOCK_WAITS_SHOWN: u32 = 40;
/// Any other statement of the copier waits at most this long for a lock.
const LOCK_TIMEOUT: &str = "2s";
/// Longest a chunk's read may hold the table's writers back.
const READ_TIMEOUT: &str = "30s";

/// A chunk read by this session's copiers, waiting for capture to reach its
/// mark.
struct Pending {
    changes: Vec<Change>,
    placed: oneshot::Sender<Lsn>,
}

/// The chunks a link session's copiers read and its capture places: shared
/// by the two, dropped with the session.
pub struct Chunks {
    destination: String,
    pending: Mutex<HashMap<u128, Pending>>,
}

impl Chunks {
    pub fn new(destination: &str) -> Arc<Chunks> {
        Arc::new(Chunks {
            destination: destination.to_owned(),
            pending: Mutex::new(HashMap::new()),
        })
    }

    /// Called by capture at a mark: the chunk's rows, to ship in place of
    /// the mark's transaction ending at `end_lsn`. None for another link's
    /// mark, or one this session did not read (an older session's, met
    /// again on a replay: that chunk was not recorded and is read again).
    pub fn place(&self, mark: &Mark, end_lsn: Lsn) -> Option<Vec<Change>> {
        if mark.destination != self.destination {
            return None;
        }
        let pending = self.pending.lock().expect("chunks").remove(&mark.chunk)?;
        let _ = pending.placed.send(end_lsn);
        Some(pending.changes)
    }

    fn add(&self, chunk: u128, changes: Vec<Change>) -> oneshot::Receiver<Lsn> {
        let (placed, rx) = oneshot::channel();
        self.pending
            .lock()
            .expect("chunks")
            .insert(chunk, Pending { changes, placed });
        rx
    }

    fn forget(&self, chunk: u128) {
        self.pending.lock().expect("chunks").remove(&chunk);
    }
}

/// Why a link's tables were queued (or not) for a copy.
pub mod reason {
    pub const NEW_LINK: &str = "new link";
    pub const NEW_TABLE: &str = "table added to the topology";
    pub const REQUESTED: &str = "requested (meridian sync start)";
    pub const PREDATES: &str =
        "the link predates initial sync (run meridian sync start to copy existing rows)";
}

/// At agent start, before the link's slot is prepared: when the slot is
/// new (`new_link`), queues every table, so a kill between making the slot
/// and queueing cannot leave a new link uncopied.
pub async fn queue_new_link(
    pool: &PgPool,
    destination: &str,
    tables: &[TableSpec],
) -> Result<(), sqlx::Error> {
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    request(pool, destination, &names, reason::NEW_LINK).await
}

/// At agent start, once the link's slot exists: forgets copies of tables
/// no longer in the topology (one that comes back is copied again), queues
/// tables new to the topology, and records a link with no record at all
/// (it predates initial sync) as not copied. Tables of a new link
/// (`new_link`) that hold no row homed in `source` now need no copy: a row
/// written after the slot was made is streamed, and none was there before
/// that is not deleted since.
pub async fn queue_at_start(
    pool: &PgPool,
    source: &str,
    destination: &str,
    tables: &[TableSpec],
    new_link: bool,
) -> Result<(), sqlx::Error> {
    let names: Vec<String> = tables.iter().map(|t| t.name.clone()).collect();
    sqlx::query(
        "DELETE FROM meridian.sync_tables WHERE destination = $1 AND NOT (table_name = ANY($2))",
    )
    .bind(destination)
    .bind(&names)
    .execute(pool)
    .await?;
    let known: i64 =
        sqlx::query_scalar("SELECT count(*) FROM meridian.sync_tables WHERE destination = $1")
            .bind(destination)
            .fetch_one(pool)
            .await?;
    let (state, why) = match known {
        0 => ("not_copied", reason::PREDATES),
        _ => ("waiting", reason::NEW_TABLE),
    };
    sqlx::query(
        "INSERT INTO meridian.sync_tables (destination, table_name, state, reason)
         SELECT $1, t, $2, $3 FROM unnest($4::text[]) t
         ON CONFLICT (destination, table_name) DO NOTHING",
    )
    .bind(destination)
    .bind(state)
    .bind(why)
    .bind(&names)
    .execute(pool)
    .await?;
    if new_link {
        for t in tables {
            let (schema, name) = t.split_name();
            let home = quote_ident(&t.home_column);
            let holds: bool = sqlx::query_scalar(&format!(
                "SELECT EXISTS (SELECT 1 FROM {}.{} WHERE {home} = $1)",
                quote_ident(schema),
                quote_ident(name)
            ))
            .bind(source)
            .fetch_one(pool)
            .await?;
            if !holds {
                sqlx::query(
                    "UPDATE meridian.sync_tables
                        SET state = 'done', rows_expected = 0, started_at = now(),
                            finished_at = now()
                      WHERE destination = $1 AND table_name = $2 AND state = 'waiting'
                        AND reason = $3",
                )
                .bind(destination)
                .bind(&t.name)
                .bind(reason::NEW_LINK)
                .execute(pool)
                .await?;
            }
        }
    }
    Ok(())
}

/// Queues a (new) copy of `tables` to `destination`: any copy of them in
/// progress is abandoned, and the link's copier starts over.
pub async fn request(
    conn: impl sqlx::PgExecutor<'_>,
    destination: &str,
    tables: &[String],
    why: &str,
) -> Result<(), sqlx::Error> {
    // a copier still recording the old copy finds no range and stops
    sqlx::query(
        "WITH gone AS (DELETE FROM meridian.sync_ranges
                        WHERE destination = $1 AND table_name = ANY($3))
         INSERT INTO meridian.sync_tables (destination, table_name, state, reason)
         SELECT $1, t, 'waiting', $2 FROM unnest($3::text[]) t
         ON CONFLICT (destination, table_name) DO UPDATE
            SET state = 'waiting', reason = EXCLUDED.reason, copy_id = gen_random_uuid(),
                rows_expected = NULL, requested_at = now(), started_at = NULL,
                finished_at = NULL",
    )
    .bind(destination)
    .bind(why)
    .bind(tables)
    .execute(conn)
    .await?;
    Ok(())
}

/// A range of a table to copy, as recorded.
#[derive(Clone, Debug, sqlx::FromRow)]
struct Range {
    table: String,
    copy_id: String,
    range_no: i32,
    after: Option<Vec<String>>,
    upto: Option<Vec<String>>,
}

/// A chunk read and waiting to be recorded: once placed, at `end`.
struct Outstanding {
    placed: Option<oneshot::Receiver<Lsn>>,
    end: Option<Lsn>,
    last_key: Option<Vec<String>>,
    rows: usize,
    bytes: usize,
    last: bool,
}

/// What a link session needs to copy its destination's queued tables.
pub struct Copier {
    pub store: String,
    pub source: String,
    pub destination: String,
    pub tables: Vec<TableSpec>,
    pub chunks: Arc<Chunks>,
    /// The link's acknowledged position: a chunk at or below it is durable
    /// at the next hop.
    pub acked: Arc<AtomicU64>,
}

impl Copier {
    /// Copies queued tables until the session ends; failures are logged and
    /// retried (the link itself is never stopped by a copy).
    pub async fn run(self) {
        let this = Arc::new(self);
        // one connection looks for work, kept across passes
        let mut conn: Option<PgConnection> = None;
        loop {
            let pass = async {
                let c = match &mut conn {
                    Some(c) => c,
                    None => conn.insert(connect(&this.store).await?),
                };
                this.clone().pass(c).await
            };
            match pass.await {
                Ok(true) => continue,
                Ok(false) => tokio::time::sleep(Duration::from_secs(1)).await,
                Err(e) => {
                    conn = None;
                    tracing::warn!(source = %this.source, destination = %this.destination,
                        error = %describe(&e), "initial sync interrupted; retrying in 5 s");
                    this.record_error(&e).await;
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
    }

    /// Shows why the copy failed in `meridian sync status` until a chunk is
    /// recorded ([`describe`]: names, never values).
    async fn record_error(&self, e: &anyhow::Error) {
        self.record_error_of(None, e).await
    }

    /// [`Copier::record_error`] for one table only (`Some`), or for every
    /// pending table of the link (`None`).
    async fn record_error_of(&self, table: Option<&str>, e: &anyhow::Error) {
        let recorded = async {
            let mut conn = PgConnection::connect(&self.store).await?;
            sqlx::query(
                "UPDATE meridian.sync_tables
                    SET last_error = $2, last_error_table_only = $3::text IS NOT NULL
                  WHERE destination = $1 AND state IN ('waiting', 'copying')
                    AND ($3::text IS NULL OR table_name = $3)",
            )
            .bind(&self.destination)
            .bind(describe(e))
            .bind(table)
            .execute(&mut conn)
            .await?;
            Ok::<_, sqlx::Error>(())
        };
        if let Err(e) = recorded.await {
            tracing::warn!(destination = %self.destination, error = %e,
                "could not record why the initial sync failed");
        }
    }

    /// One pass over the queue: plans waiting tables, copies every range
    /// not done, marks finished tables done. True if it copied anything.
    async fn pass(self: Arc<Self>, conn: &mut PgConnection) -> anyhow::Result<bool> {
        let waiting: Vec<(String,)> = sqlx::query_as(
            "SELECT table_name FROM meridian.sync_tables
              WHERE destination = $1 AND state = 'waiting' ORDER BY table_name",
        )
        .bind(&self.destination)
        .fetch_all(&mut *conn)
        .await?;
        for (table,) in waiting {
            self.plan(conn, &table).await?;
        }
        let queue: VecDeque<Range> = sqlx::query_as(
            "SELECT r.table_name AS \"table\", r.copy_id::text, r.range_no, r.after_key AS after,
                    r.upto_key AS upto
                   FROM meridian.sync_ranges r JOIN meridian.sync_tables t
                     ON t.destination = r.destination AND t.table_name = r.table_name
                    AND t.copy_id = r.copy_id
                  WHERE r.destination = $1 AND t.state = 'copying' AND NOT r.done
                  ORDER BY r.table_name, r.range_no",
        )
        .bind(&self.destination)
        .fetch_all(&mut *conn)
        .await?
        .into();
        let ranges = queue.len();
        let queue = Arc::new(Mutex::new(queue));
        let copiers = (0..COPIERS.min(ranges)).map(|_| {
            let (this, queue) = (self.clone(), queue.clone());
            async move {
                let mut conn = connect(&this.store).await?;
                loop {
                    let Some(range) = queue.lock().expect("queue").pop_front() else {
                        return Ok::<_, anyhow::Error>(());
                    };
                    this.copy_range(&mut conn, range).await?;
                }
            }
        });
        for result in futures::future::join_all(copiers).await {
            result?;
        }
        sqlx::query(
            "UPDATE meridian.sync_tables t SET state = 'done', finished_at = now()
              WHERE t.destination = $1 AND t.state = 'copying'
                AND NOT EXISTS (SELECT 1 FROM meridian.sync_ranges r
                                 WHERE r.destination = t.destination
                                   AND r.table_name = t.table_name
                                   AND r.copy_id = t.copy_id AND NOT r.done)",
        )
        .bind(&self.destination)
        .execute(&mut *conn)
        .await?;
        Ok(ranges > 0)
    }

    /// The table as capture would describe it, from the store's catalog.
    async fn shape(&self, conn: &mut PgConnection, name: &str) -> anyhow::Result<SyncTable> {
        let spec = self.spec(name)?;
        let (schema, table) = spec.split_name();
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let columns: Vec<(String, i64, String)> = sqlx::query_as(
            "SELECT a.attname::text, a.atttypid::bigint, format_type(a.atttypid, a.atttypmod)
               FROM pg_attribute a
              WHERE a.attrelid = $1::regclass AND a.attnum > 0 AND NOT a.attisdropped
                AND a.attgenerated = ''
              ORDER BY a.attnum",
        )
        .bind(&qualified)
        .fetch_all(conn)
        .await?;
        let table = Table {
            schema: schema.to_owned(),
            name: table.to_owned(),
            columns: columns
                .iter()
                .map(|(name, oid, _)| Column {
                    name: name.clone(),
                    type_oid: *oid as u32,
                    key: spec.primary_key.contains(name),
                })
                .collect(),
        };
        Ok(SyncTable {
            table: Arc::new(table),
            types: columns.into_iter().map(|(_, _, t)| t).collect(),
            home_column: spec.home_column.clone(),
        })
    }

    /// Counts a waiting table's rows homed here and splits them into key
    /// ranges; the table is then copying.
    async fn plan(&self, conn: &mut PgConnection, name: &str) -> anyhow::Result<()> {
        let table = self.shape(conn, name).await?;
        let rows: i64 = sqlx::query_scalar(&table.count_query(&self.source))
            .fetch_one(&mut *conn)
            .await?;
        let ranges = (rows / ROWS_PER_RANGE).clamp(1, MAX_RANGES);
        let mut splits: Vec<Vec<String>> = Vec::new();
        if ranges > 1 {
            let step = (rows / ranges) as u64;
            let query = table.split_query(&self.source, step, ranges as u64 - 1);
            let keys = copy_rows(conn, &query).await?;
            for key in snapshot::parse_copy_text(&keys, table.key_indexes().len())? {
                let key: Option<Vec<String>> = key
                    .into_iter()
                    .map(|v| match v {
                        meridian_core::Value::Text(t) => Some(t),
                        _ => None,
                    })
                    .collect();
                splits.extend(key);
            }
        }
        let mut tx = conn.begin().await?;
        let copy_id: Option<String> = sqlx::query_scalar(
            "UPDATE meridian.sync_tables SET state = 'copying', rows_expected = $3,
                    started_at = now()
              WHERE destination = $1 AND table_name = $2 AND state = 'waiting'
              RETURNING copy_id::text",
        )
        .bind(&self.destination)
        .bind(name)
        .bind(rows)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(copy_id) = copy_id else {
            return Ok(()); // requested again meanwhile: the next pass plans it
        };
        sqlx::query("DELETE FROM meridian.sync_ranges WHERE destination = $1 AND table_name = $2")
            .bind(&self.destination)
            .bind(name)
            .execute(&mut *tx)
            .await?;
        // range i: after split i-1 (the start for the first), up to split i
        // (the end for the last)
        for i in 0..=splits.len() {
            let after = i.checked_sub(1).map(|j| &splits[j]);
            let upto = splits.get(i);
            sqlx::query(
                "INSERT INTO meridian.sync_ranges
                    (destination, table_name, copy_id, range_no, after_key, upto_key)
                 VALUES ($1, $2, $3::uuid, $4, $5, $6)",
            )
            .bind(&self.destination)
            .bind(name)
            .bind(&copy_id)
            .bind(i as i32)
            .bind(after)
            .bind(upto)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        tracing::info!(source = %self.source, destination = %self.destination, table = name,
            rows, ranges = splits.len() + 1, "initial sync planned");
        Ok(())
    }

    /// Copies one range chunk by chunk, recording each once durable.
    async fn copy_range(&self, conn: &mut PgConnection, range: Range) -> anyhow::Result<()> {
        let mut after = range.after.clone();
        let mut largest = 0;
        let mut outstanding: VecDeque<Outstanding> = VecDeque::new();
        let mut read_all = false;
        loop {
            if !read_all && outstanding.len() < OUTSTANDING_CHUNKS {
                let limit = snapshot::next_chunk_rows(largest);
                let (chunk, chunk_largest) = self
                    .read_chunk(
                        conn,
                        &range.table,
                        after.as_deref(),
                        range.upto.as_deref(),
                        limit,
                    )
                    .await?;
                read_all = chunk.last;
                largest = largest.max(chunk_largest);
                if chunk.last_key.is_some() {
                    after = chunk.last_key.clone();
                }
                outstanding.push_back(chunk);
                continue;
            }
            let Some(front) = outstanding.front_mut() else {
                return Ok(());
            };
            if front.end.is_none() {
                match front.placed.take() {
                    Some(placed) => front.end = Some(placed.await?),
                    None => front.end = Some(Lsn(0)),
                }
            }
            let end = front.end.expect("set above");
            while self.acked.load(Ordering::Acquire) < end.0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let done = outstanding.pop_front().expect("front");
            let recorded = sqlx::query(
                "UPDATE meridian.sync_ranges
                    SET after_key = coalesce($5, after_key), rows = rows + $6,
                        bytes = bytes + $7, chunks = chunks + $8, done = $9,
                        updated_at = now()
                  WHERE destination = $1 AND table_name = $2 AND copy_id = $3::uuid
                    AND range_no = $4",
            )
            .bind(&self.destination)
            .bind(&range.table)
            .bind(&range.copy_id)
            .bind(range.range_no)
            .bind(&done.last_key)
            .bind(done.rows as i64)
            .bind(done.bytes as i64)
            .bind(i64::from(done.rows > 0))
            .bind(done.last)
            .execute(&mut *conn)
            .await?;
            if recorded.rows_affected() == 0 {
                // a new copy of the table was requested: this one is over
                // (chunks already marked still ship: rows at their position)
                return Ok(());
            }
            // the copy moves: an earlier failure of the link, or of this
            // table, is history
            sqlx::query(
                "UPDATE meridian.sync_tables SET last_error = NULL
                  WHERE destination = $1 AND last_error IS NOT NULL
                    AND (NOT last_error_table_only OR table_name = $2)",
            )
            .bind(&self.destination)
            .bind(&range.table)
            .execute(&mut *conn)
            .await?;
        }
    }

    /// Reads the next chunk of a range under the table's lock and marks its
    /// position in the WAL; capture places it there. The table's shape is
    /// read under the lock too (no column can change meanwhile), so the
    /// rows carry every column the table has at that position. Returns the
    /// chunk and its largest row's bytes.
    async fn read_chunk(
        &self,
        conn: &mut PgConnection,
        name: &str,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
    ) -> anyhow::Result<(Outstanding, usize)> {
        let chunk: u128 = uuid::Uuid::new_v4().as_u128();
        let mut waits = 0u32;
        loop {
            conn.execute("BEGIN").await?;
            let read = async {
                // wait briefly: writers queue behind a waiting SHARE request
                conn.execute(format!("SET LOCAL lock_timeout = '{LOCK_WAIT}'").as_str())
                    .await?;
                let spec = self.spec(name)?;
                let (schema, table) = spec.split_name();
                conn.execute(snapshot::lock_statement(schema, table).as_str())
                    .await?;
                // writers wait for the read: bound it
                conn.execute(
                    format!(
                        "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; \
                         SET LOCAL statement_timeout = '{READ_TIMEOUT}'"
                    )
                    .as_str(),
                )
                .await?;
                let table = self.shape(conn, name).await?;
                let query = table.chunk_query(&self.source, after, upto, limit);
                let data = copy_rows(conn, &query).await?;
                let rows: Vec<Row> = snapshot::parse_copy_text(&data, table.table.columns.len())?;
                drop(data);
                let sizes = rows.iter().map(meridian_core::change::row_bytes);
                let bytes: usize = sizes.clone().sum();
                let largest = sizes.max().unwrap_or(0);
                let last_key = rows.last().and_then(|r| table.key_of(r));
                let count = rows.len();
                let placed = match count {
                    0 => None,
                    _ => {
                        let placed = self.chunks.add(chunk, table.inserts(rows));
                        let mark = Mark {
                            destination: self.destination.clone(),
                            chunk,
                        };
                        sqlx::query("SELECT pg_logical_emit_message(true, $1, $2)")
                            .bind(snapshot::MARK_PREFIX)
                            .bind(mark.content())
                            .execute(&mut *conn)
                            .await?;
                        Some(placed)
                    }
                };
                let read = Outstanding {
                    placed,
                    end: None,
                    last_key,
                    rows: count,
                    bytes,
                    last: count < limit,
                };
                Ok::<_, anyhow::Error>((read, largest))
            }
            .await;
            match read {
                Ok(read) => {
                    if let Err(e) = conn.execute("COMMIT").await {
                        self.chunks.forget(chunk);
                        return Err(e.into());
                    }
                    return Ok(read);
                }
                Err(e) => {
                    self.chunks.forget(chunk);
                    let _ = conn.execute("ROLLBACK").await;
                    if !is_lock_timeout(&e) {
                        return Err(e);
                    }
                    waits += 1;
                    tracing::debug!(
                        table = name,
                        waits,
                        "initial sync waits for the table's writers; trying again"
                    );
                    // a wait that lasts shows in status, retried all the same
                    if waits.is_multiple_of(LOCK_WAITS_SHOWN) {
                        self.record_error_of(
                            Some(name),
                            &e.context(format!(
                                "{name}: the copy could not lock the table in {waits} tries \
                             (a long transaction writes it, or holds a stronger lock; \
                             see pg_locks); it keeps trying"
                            )),
                        )
                        .await;
                    }
                    // jittered, so copies of several links do not wait in step
                    let jitter = (chunk.wrapping_add(waits as u128) % 200) as u64;
                    tokio::time::sleep(Duration::from_millis(100 + jitter)).await;
                }
            }
        }
    }

    /// A replicated table's topology entry.
    fn spec(&self, name: &str) -> anyhow::Result<&TableSpec> {
        self.tables.iter().find(|t| t.name == name).ok_or_else(|| {
            anyhow::anyhow!(
                "table {name} is queued for a copy to {} but is not in this agent's topology; \
                 it is forgotten at the agent's next start",
                self.destination
            )
        })
    }
}

/// An error as the copier logs and records it: its own contexts (names of
/// tables and regions), and of a store error only its SQLSTATE and the
/// names it points at, never its message (which may quote a value).
pub fn describe(e: &anyhow::Error) -> String {
    let mut parts = Vec::new();
    for cause in e.chain() {
        if let Some(sqlx::Error::Database(db)) = cause.downcast_ref::<sqlx::Error>() {
            parts.push(meridian_apply::error::data_reason(
                db.table().unwrap_or("the store"),
                db.code().as_deref().unwrap_or("?"),
                None,
                db.constraint(),
            ));
            // its sources are the server's message itself
            break;
        }
        parts.push(cause.to_string());
    }
    parts.join(": ")
}

/// A connection for the copier: no statement waits for a lock longer than
/// [`LOCK_TIMEOUT`], so a table someone holds shows as a failing copy
/// instead of a silent wait (and never queues writers behind the copy).
async fn connect(store: &str) -> Result<PgConnection, sqlx::Error> {
    let mut conn = PgConnection::connect(store).await?;
    conn.execute(format!("SET lock_timeout = '{LOCK_TIMEOUT}'").as_str())
        .await?;
    conn.execute("SET application_name = 'meridian-sync'")
        .await?;
    Ok(conn)
}

/// What `COPY (query) TO STDOUT` writes.
async fn copy_rows(conn: &mut PgConnection, query: &str) -> anyhow::Result<Vec<u8>> {
    let mut stream = conn
        .copy_out_raw(&format!("COPY ({query}) TO STDOUT"))
        .await?;
    let mut data = Vec::new();
    while let Some(bytes) = stream.next().await {
        data.extend_from_slice(&bytes?);
    }
    Ok(data)
}

fn is_lock_timeout(e: &anyhow::Error) -> bool {
    e.downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .and_then(|e| e.code())
        .is_some_and(|code| code == "55P03")
}

/// One table's copy to one destination, as recorded in the source store.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TableReport {
    pub destination: String,
    pub table_name: String,
    /// waiting, copying, done or not_copied.
    pub state: String,
    pub reason: String,
    /// Rows homed in the source when the copy started.
    pub rows_expected: Option<i64>,
    /// Rows and bytes (values, before the policy) recorded as durable at
    /// the next hop.
    pub rows: i64,
    pub bytes: i64,
    pub chunks: i64,
    pub ranges: i64,
    pub ranges_done: i64,
    /// Seconds since the copy started (until it finished, once done).
    pub elapsed_seconds: Option<f64>,
    /// Why the copy last failed, while it is retried.
    pub last_error: Option<String>,
    /// Seconds since a chunk was last recorded (or the copy started).
    pub idle_seconds: Option<f64>,
}

impl TableReport {
    /// Fraction, rate and time left ([`snapshot::progress`]); None before
    /// the copy started (or for a table never copied).
    pub fn progress(&self) -> Option<snapshot::Progress> {
        let expected = match self.state.as_str() {
            "done" => self.rows.max(0) as u64,
            "copying" => self.rows_expected?.max(0) as u64,
            _ => return None,
        };
        Some(snapshot::progress(
            self.rows.max(0) as u64,
            expected,
            self.elapsed_seconds.unwrap_or(0.0),
        ))
    }
}

/// Every copy recorded in a source store, by destination and table.
pub async fn report(conn: impl sqlx::PgExecutor<'_>) -> Result<Vec<TableReport>, sqlx::Error> {
    sqlx::query_as(
        "SELECT t.destination, t.table_name, t.state, t.reason, t.rows_expected,
                coalesce(sum(r.rows), 0)::bigint AS rows,
                coalesce(sum(r.bytes), 0)::bigint AS bytes,
                coalesce(sum(r.chunks), 0)::bigint AS chunks,
                count(r.range_no) AS ranges,
                count(r.range_no) FILTER (WHERE r.done) AS ranges_done,
                extract(epoch FROM coalesce(t.finished_at, now()) - t.started_at)::float8
                    AS elapsed_seconds,
                t.last_error,
                extract(epoch FROM now() - greatest(coalesce(t.started_at, t.requested_at),
                                                    max(r.updated_at)))::float8
                    AS idle_seconds
           FROM meridian.sync_tables t
           LEFT JOIN meridian.sync_ranges r
             ON r.destination = t.destination AND r.table_name = t.table_name
            AND r.copy_id = t.copy_id
          GROUP BY t.destination, t.table_name
          ORDER BY t.destination, t.table_name",
    )
    .fetch_all(conn)
    .await
}
