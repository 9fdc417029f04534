//! The outbound side of one replication link (this region -> one peer).
//!
//! Delivery: at-least-once. Each session starts the slot at the peer's durable
//! watermark (from its `Welcome`) and the peer skips anything at or below it, so
//! the effect at the peer is exactly-once. The slot is confirmed only past
//! positions the peer acknowledged as durably applied. At most `window`
//! batches are unacknowledged at a time (back-pressure: capture waits). Any
//! failure (peer down, corrupted batch refused, store restart) ends the
//! session; the next one starts again from the peer's watermark, with
//! exponential backoff, so there is never a gap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use meridian_capture::{CaptureError, ReplicationStream};
use meridian_core::change::{ChangeKind, Value};
use meridian_core::pgoutput::FRAGMENT_BYTES;
use meridian_core::pgoutput::Keys;
use meridian_core::{Lsn, Transaction, codec};
use meridian_proto::replication::{
    Batch, Hello, SourceMessage, destination_message, replication_client::ReplicationClient,
    source_message,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::reselect::Reselect;
use crate::residency::{self, Audit, SharedPolicy};
use crate::telemetry::{self, LinkState, Telemetry};
use crate::wire;
use std::sync::Arc;

/// A batch is closed once its values reach about this many bytes (or
/// `batch_max_changes` changes). Transactions larger than that come as
/// fragments (see [`meridian_core::Transaction`]), so a batch, a message and
/// the memory behind them stay bounded whatever the transaction's size.
const BATCH_MAX_BYTES: usize = meridian_core::topology::Tuning::BATCH_BYTES;

/// Captured transactions waiting to be shipped, at most: deep enough that
/// a link catching up on single-row transactions ships full batches
/// (`batch_max_changes`), never just what fits in a few slots.
const QUEUE_TRANSACTIONS: usize = 100_000;
/// Bytes of captured transactions waiting to be shipped, at most (about;
/// counted as [`Transaction::approx_bytes`]), so memory stays bounded.
const QUEUE_BYTES: usize = 32 << 20;

/// Memory a captured change takes beyond its values' bytes (the change, its
/// row vectors and value headers), charged to the queue's byte budget.
const CHANGE_OVERHEAD_BYTES: usize = 160;

/// A captured transaction on its way from capture to the link, holding its
/// share of the queue's byte budget until dropped.
pub(crate) struct Captured {
    pub transaction: Transaction,
    _budget: tokio::sync::OwnedSemaphorePermit,
}

/// The queue between a link's capture task and its shipping loop, bounded
/// by [`QUEUE_TRANSACTIONS`] and [`QUEUE_BYTES`].
pub(crate) fn capture_queue() -> (CaptureQueue, mpsc::Receiver<Captured>) {
    let (tx, rx) = mpsc::channel(QUEUE_TRANSACTIONS);
    let budget = Arc::new(tokio::sync::Semaphore::new(QUEUE_BYTES >> 10));
    (CaptureQueue { tx, budget }, rx)
}

/// The capture side of [`capture_queue`].
pub(crate) struct CaptureQueue {
    tx: mpsc::Sender<Captured>,
    budget: Arc<tokio::sync::Semaphore>,
}

/// Why a link session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach peer agent: {0}")]
    Connect(#[from] tonic::transport::Error),
    #[error("peer agent: {} ({:?})", .0.message(), .0.code())]
    Peer(#[from] tonic::Status),
    #[error("peer refused batch {seq}: {reason}")]
    Refused { seq: u64, reason: String },
    #[error("peer closed the stream")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("capture: {0}")]
    Capture(#[from] CaptureError),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("destination: {0}")]
    Store(#[from] meridian_apply::ApplyError),
    /// The link must not run until an operator acts (a lost slot, another
    /// incarnation, a source gone back in time).
    #[error("stopped: {0}")]
    Lifecycle(#[from] crate::lifecycle::Refusal),
    /// A change the configuration does not let travel (larger than
    /// `max_change_bytes`): the link waits at it until an operator raises
    /// the limit.
    #[error("stopped: {0}")]
    TooLarge(String),
}

/// One link's configuration.
#[derive(Clone)]
pub struct Link {
    pub source: String,
    pub destination: String,
    /// The source store URL (secret).
    pub store: String,
    pub peer_addr: String,
    /// This agent's mTLS credentials: the peer must prove it is
    /// `destination`. None only under `[security] plaintext = true`.
    pub tls: Option<Arc<meridian_trust::tls::Live>>,
    pub slot: String,
    pub publication: String,
    pub batch_max_changes: usize,
    /// Largest batch message either way
    /// ([`meridian_core::topology::Tuning::message_limit`]).
    pub message_limit: usize,
    /// Largest single change shipped (`max_change_bytes`).
    pub max_change_bytes: usize,
    pub window: usize,
    /// Compress batches (zstd) when the peer reads it.
    pub compress: bool,
    /// Residency policy: applied to every batch before it is encoded.
    pub policy: SharedPolicy,
    /// Where the policy's verdicts are counted.
    pub audit: Arc<Audit>,
    /// Primary key columns per table, from the topology.
    pub keys: Keys,
    /// Where the link's state, shipping and errors are counted.
    pub telemetry: Arc<Telemetry>,
    /// Highest position the peer acknowledged as applied, across sessions.
    pub acked: Arc<AtomicU64>,
    /// The replicated tables (what an initial sync copies).
    pub tables: Vec<meridian_core::topology::TableSpec>,
}

impl LinkError {
    /// The error's kind, as the `meridian_errors_total` metric labels it.
    pub fn kind(&self) -> &'static str {
        match self {
            LinkError::Connect(_) => "connect",
            LinkError::Peer(_) => "peer",
            LinkError::Refused { .. } => "refused",
            LinkError::Closed => "closed",
            LinkError::Protocol(_) => "protocol",
            LinkError::Capture(_) => "capture",
            LinkError::Kafka(_) => "kafka",
            LinkError::Store(meridian_apply::ApplyError::Schema(_)) => "schema",
            LinkError::Store(meridian_apply::ApplyError::Blocked(_)) => "blocked",
            LinkError::Store(meridian_apply::ApplyError::Waiting { .. }) => "waiting",
            LinkError::Store(_) => "store_unavailable",
            LinkError::Lifecycle(_) => "lifecycle",
            LinkError::TooLarge(_) => "too_large",
        }
    }

    /// Whether the link waits for an operator (it then shows as stopped).
    fn needs_operator(&self) -> bool {
        match self {
            LinkError::Lifecycle(_) | LinkError::TooLarge(_) => true,
            // the destination refused this source's incarnation
            LinkError::Peer(status) => {
                status.code() == tonic::Code::FailedPrecondition
                    && status.message().starts_with(crate::lifecycle::PEER_PREFIX)
            }
            _ => false,
        }
    }
}

/// Runs `session` until shutdown, backing off between failures (100 ms
/// doubling to 5 s; 10 s after a capture error retrying will not fix), and
/// keeps the link's state and errors in `telemetry`.
pub(crate) async fn supervise<F, Fut>(
    source: &str,
    destination: &str,
    telemetry: &Telemetry,
    mut shutdown: watch::Receiver<bool>,
    mut session: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), LinkError>>,
{
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = std::time::Instant::now();
        let result = tokio::select! {
            r = session() => r,
            _ = shutdown.wait_for(|s| *s) => {
                telemetry.set_link_state(destination, LinkState::Stopped, None);
                return;
            }
        };
        if let Err(e) = result {
            telemetry.error(source, destination, e.kind());
            let state = match e.needs_operator() {
                true => LinkState::Stopped,
                false => LinkState::Retrying,
            };
            telemetry.set_link_state(destination, state, Some(with_causes(&e)));
            if started.elapsed() > Duration::from_secs(10) {
                backoff = Duration::from_millis(100);
            }
            tracing::warn!(source, destination, error = %e,
                retry_in_ms = backoff.as_millis() as u64, "link interrupted");
            if e.needs_operator() || matches!(&e, LinkError::Capture(c) if !c.is_retryable()) {
                backoff = Duration::from_secs(10);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The outbound side of a link, whatever carries it: ships this region's
/// changes to one peer until shutdown, confirming the slot only past what the
/// transport made durable. Implemented by [`Link`] (gRPC to the peer's agent)
/// and [`crate::kafka::KafkaLink`] (a Kafka topic); the topology chooses per
/// link.
pub trait Outbound: Send + 'static {
    /// Runs sessions until shutdown, backing off between failures.
    fn run(self, shutdown: watch::Receiver<bool>) -> impl std::future::Future<Output = ()> + Send;
}

impl Outbound for Link {
    async fn run(self, shutdown: watch::Receiver<bool>) {
        let telemetry = self.telemetry.clone();
        supervise(
            &self.source,
            &self.destination,
            &telemetry,
            shutdown,
            || self.session(),
        )
        .await
    }
}

/// Longest wait for a TCP connection to the peer, and for its Welcome.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Link {
    async fn session(&self) -> Result<(), LinkError> {
        let (incarnation, source_pool) =
            crate::lifecycle::check_link(&self.store, &self.slot, &self.source, &self.destination)
                .await?;
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://{}", self.peer_addr))
                .map_err(|e| LinkError::Protocol(format!("peer address {}: {e}", self.peer_addr)))?
                .connect_timeout(HANDSHAKE_TIMEOUT)
                .http2_keep_alive_interval(crate::KEEPALIVE_INTERVAL)
                .keep_alive_timeout(crate::KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true)
                .tcp_keepalive(Some(crate::KEEPALIVE_INTERVAL));
        let tls = match &self.tls {
            Some(live) => Some(
                live.current()
                    .client_config(meridian_trust::Identity::Region(self.destination.clone()))
                    .map_err(|e| LinkError::Protocol(format!("{e:#}")))?,
            ),
            None => None,
        };
        let channel =
            meridian_trust::net::dial(endpoint, &self.peer_addr, tls, HANDSHAKE_TIMEOUT).await?;
        let mut client = ReplicationClient::new(channel)
            .max_decoding_message_size(self.message_limit)
            .max_encoding_message_size(self.message_limit);
        let (outbound, rx) = mpsc::channel(self.window + 1);
        let hello = SourceMessage {
            kind: Some(source_message::Kind::Hello(Hello {
                source_region: self.source.clone(),
                destination_region: self.destination.clone(),
                incarnation: incarnation.clone(),
            })),
        };
        outbound.send(hello).await.map_err(|_| LinkError::Closed)?;
        let handshake = async {
            let mut inbound = client
                .replicate(ReceiverStream::new(rx))
                .await?
                .into_inner();
            let welcome = inbound.next().await;
            Ok::<_, LinkError>((inbound, welcome))
        };
        let (mut inbound, welcome) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                LinkError::Protocol(format!(
                    "no Welcome from {} within {HANDSHAKE_TIMEOUT:?}; reconnecting",
                    self.destination
                ))
            })??;
        let (applied, compression) = match welcome.ok_or(LinkError::Closed)??.kind {
            Some(destination_message::Kind::Welcome(w)) => {
                let zstd = self.compress && w.compressions.iter().any(|c| c == wire::ZSTD);
                (Lsn(w.applied_lsn), if zstd { wire::ZSTD } else { "" })
            }
            other => {
                return Err(LinkError::Protocol(format!(
                    "expected Welcome, got {other:?}"
                )));
            }
        };
        crate::lifecycle::check_positions(
            &source_pool,
            &self.slot,
            applied,
            &self.source,
            &self.destination,
        )
        .await
        .map_err(|e| LinkError::Capture(e.into()))??;
        let stream = ReplicationStream::start(
            &self.store,
            &self.slot,
            &self.publication,
            applied,
            self.keys.clone(),
        )
        .await?;
        let confirmed = stream.confirmed();
        let sent = stream.sent();
        confirmed.fetch_max(applied.0, Ordering::AcqRel);
        self.acked.fetch_max(applied.0, Ordering::AcqRel);
        self.telemetry
            .set_link_state(&self.destination, LinkState::Connected, None);
        tracing::info!(source = %self.source, destination = %self.destination,
            resume_from = %applied, "link connected");

        // capture runs in its own task so a slow peer never stalls the
        // replication connection's status reports
        let (mut changes, mut capture, _tasks) = start_capture(
            stream,
            &self.store,
            &self.source,
            &self.destination,
            &self.tables,
            &self.acked,
        );

        let mut in_flight: VecDeque<u64> = VecDeque::new();
        let mut seq = 0u64;
        // the source's flushed WAL end, read again when a batch ends past it
        let mut wal_end = 0u64;
        let mut pending: Option<Captured> = None;
        loop {
            tokio::select! {
                biased;
                reply = inbound.next() => {
                    match reply.ok_or(LinkError::Closed)??.kind {
                        Some(destination_message::Kind::Ack(ack)) => {
                            while in_flight.front().is_some_and(|&s| s <= ack.seq) {
                                in_flight.pop_front();
                            }
                            confirmed.fetch_max(ack.applied_lsn, Ordering::AcqRel);
                            self.acked.fetch_max(ack.applied_lsn, Ordering::AcqRel);
                        }
                        Some(destination_message::Kind::Nack(n)) => {
                            return Err(LinkError::Refused { seq: n.seq, reason: n.reason });
                        }
                        other => return Err(LinkError::Protocol(format!("unexpected {other:?}"))),
                    }
                }
                ended = &mut capture => {
                    return match ended {
                        Ok(Err(e)) => Err(e.into()),
                        _ => Err(LinkError::Protocol("capture stopped".into())),
                    };
                }
                first = changes.recv(), if in_flight.len() < self.window && pending.is_none() => {
                    let Some(first) = first else { return Err(LinkError::Closed) };
                    pending = Some(first);
                }
            }
            if let Some(first) = pending.take() {
                let mut size = first.transaction.changes.len();
                let mut bytes = first.transaction.approx_bytes();
                let mut batch = vec![first.transaction];
                while size < self.batch_max_changes && bytes < BATCH_MAX_BYTES {
                    match changes.try_recv() {
                        Ok(Captured { transaction: t, .. }) => {
                            size += t.changes.len();
                            bytes += t.approx_bytes();
                            batch.push(t);
                        }
                        Err(_) => break,
                    }
                }
                // nothing the policy forbids for this destination is encoded
                let (batch, policy_version) = match residency::current(&self.policy) {
                    Some(policy) => {
                        let (filtered, counts) =
                            policy.filter(&self.source, &self.destination, &batch);
                        self.audit.record(&self.destination, counts);
                        (filtered, policy.version())
                    }
                    None => (batch, 0),
                };
                if let Some(why) = too_large(&batch, self.max_change_bytes) {
                    return Err(LinkError::TooLarge(why));
                }
                // what the policy made larger than a message carries goes as several
                for (transactions, payload) in
                    fit(batch, compression, self.message_limit).map_err(LinkError::TooLarge)?
                {
                    seq += 1;
                    let end_lsn = transactions.last().map_or(0, |t| t.end_lsn.0);
                    // a position the source flushed: what capture saw, else asked
                    wal_end = wal_end.max(sent.load(Ordering::Acquire));
                    if end_lsn > wal_end {
                        wal_end = flushed_wal_end(&source_pool).await?;
                        if end_lsn > wal_end {
                            return Err(LinkError::Protocol(format!(
                                "batch {seq} ends at {}, past the source store's flushed WAL end {}",
                                Lsn(end_lsn),
                                Lsn(wal_end)
                            )));
                        }
                    }
                    let claims = codec::Claims {
                        crc32: codec::checksum(&payload),
                        seq,
                        end_lsn,
                        source_wal_end: wal_end,
                        compression,
                        policy_version,
                        incarnation: &incarnation,
                    };
                    self.telemetry.shipped(
                        &self.destination,
                        &telemetry::changes_per_table(&transactions),
                        payload.len(),
                    );
                    let message = SourceMessage {
                        kind: Some(source_message::Kind::Batch(Batch {
                            seq,
                            end_lsn,
                            crc32: claims.crc32,
                            payload,
                            policy_version,
                            compression: compression.to_owned(),
                            source_wal_end: wal_end,
                            seal: Some(claims.seal()),
                        })),
                    };
                    outbound
                        .send(message)
                        .await
                        .map_err(|_| LinkError::Closed)?;
                    in_flight.push_back(seq);
                }
            }
        }
    }
}

/// Transactions and the payload that carries them.
type Piece = (Vec<Transaction>, Vec<u8>);

/// Room a batch message needs beyond its payload (the other fields).
const MESSAGE_FRAMING_BYTES: usize = 1 << 10;

/// `batch` encoded (and compressed as `compression` says) in as many
/// payloads as keep each message, and its rows once decoded
/// ([`codec::decode_within`]), within `limit`: halved at transaction
/// boundaries while too large (a policy's hashes and redactions can make a
/// batch larger than its capture). One transaction too large alone is an
/// error naming its table.
fn fit(batch: Vec<Transaction>, compression: &str, limit: usize) -> Result<Vec<Piece>, String> {
    let payload = codec::encode(&batch);
    let payload = match compression {
        "" => payload,
        _ => wire::compress(&payload),
    };
    // the receiver bounds both: the message, and its rows once decoded
    let rows: usize = batch.iter().map(Transaction::approx_bytes).sum();
    if payload.len() + MESSAGE_FRAMING_BYTES <= limit && rows <= limit {
        return Ok(vec![(batch, payload)]);
    }
    if batch.len() < 2 {
        let tables: std::collections::BTreeSet<String> = batch
            .iter()
            .flat_map(|t| &t.changes)
            .map(|c| format!("{}.{}", c.table.schema, c.table.name))
            .collect();
        return Err(format!(
            "a piece of a transaction ending at {} encodes to {} bytes (tables {}), more than a \
             message may carry ({limit}); raise [replication] max_change_bytes on every agent \
             (receivers first) and restart them: the link waits there, nothing is skipped",
            batch.first().map_or(Lsn(0), |t| t.end_lsn),
            payload.len(),
            tables.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    let mut first = batch;
    let second = first.split_off(first.len() / 2);
    let mut parts = fit(first, compression, limit)?;
    parts.extend(fit(second, compression, limit)?);
    Ok(parts)
}

/// The source store's flushed WAL position: every transaction capture has
/// decoded ends at or before it.
async fn flushed_wal_end(pool: &sqlx::PgPool) -> Result<u64, LinkError> {
    let end: i64 = sqlx::query_scalar("SELECT (pg_current_wal_flush_lsn() - '0/0')::bigint")
        .fetch_one(pool)
        .await
        .map_err(|e| LinkError::Capture(e.into()))?;
    Ok(end as u64)
}

/// Why a batch cannot be sent, if it cannot: a change larger than
/// `max_change_bytes`, named by table and transaction position (no values),
/// with what to raise. Such a change would make a message the receiver
/// refuses ([`meridian_core::topology::Tuning::message_limit`]).
fn too_large(batch: &[Transaction], max_change_bytes: usize) -> Option<String> {
    let (end, change, bytes) = batch
        .iter()
        .flat_map(|t| {
            t.changes
                .iter()
                .map(move |c| (t.end_lsn, c, c.kind.approx_bytes()))
        })
        .find(|(_, _, bytes)| *bytes > max_change_bytes)?;
    Some(format!(
        "a change to {}.{} in the transaction ending at {end} takes about {bytes} bytes, more than \
         [replication] max_change_bytes = {max_change_bytes}; raise it on every agent (receivers \
         first) and restart them: the link waits at that change, nothing is skipped",
        change.table.schema, change.table.name
    ))
}

/// A link session's capture task and initial-sync copier: aborted when
/// dropped, with the session.
pub(crate) struct SessionTasks {
    _aborts: [AbortOnDrop; 2],
}

/// Starts a link session's capture from `stream` (into a queue bounded by
/// [`capture_queue`]) and its initial-sync copier, whose chunks the capture
/// places ([`crate::sync`]). Returns the queue, the capture task (it ends
/// only on an error), and what keeps both running.
pub(crate) fn start_capture(
    stream: ReplicationStream,
    store: &str,
    source: &str,
    destination: &str,
    tables: &[meridian_core::topology::TableSpec],
    acked: &Arc<AtomicU64>,
) -> (
    mpsc::Receiver<Captured>,
    tokio::task::JoinHandle<Result<(), CaptureError>>,
    SessionTasks,
) {
    let (queue, changes) = capture_queue();
    let chunks = crate::sync::Chunks::new(destination);
    let capture = tokio::spawn(capture(stream, queue, store.to_owned(), chunks.clone()));
    let copier = tokio::spawn(
        crate::sync::Copier {
            store: store.to_owned(),
            source: source.to_owned(),
            destination: destination.to_owned(),
            tables: tables.to_vec(),
            chunks,
            acked: acked.clone(),
        }
        .run(),
    );
    let tasks = SessionTasks {
        _aborts: [
            AbortOnDrop(capture.abort_handle()),
            AbortOnDrop(copier.abort_handle()),
        ],
    };
    (changes, capture, tasks)
}

/// Reads committed transactions from the slot into `out`, keeping the
/// replication connection's status reports going while `out` is full. Values
/// an update left unchanged (TOAST) are read back from the store first
/// ([`Reselect`]); what that fills is handed on in fragments of at most
/// [`FRAGMENT_BYTES`], so memory stays bounded however large the values.
/// At an initial-sync chunk's mark, the chunk's rows `chunks` holds take
/// the (empty) marking transaction's place.
pub(crate) async fn capture(
    mut stream: ReplicationStream,
    out: CaptureQueue,
    store: String,
    chunks: Arc<crate::sync::Chunks>,
) -> Result<(), CaptureError> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_lazy(&store)?;
    let mut reselect = Reselect::new(pool);
    loop {
        let meridian_capture::Next {
            mut transaction,
            snapshot,
        } = stream.next().await?;
        if let Some(rows) = snapshot.and_then(|m| chunks.place(&m, transaction.end_lsn)) {
            transaction.changes = rows;
        }
        let unchanged = transaction.changes.iter().any(|c| {
            matches!(&c.kind, ChangeKind::Update { new, .. } if new.contains(&Value::Unchanged))
        });
        let oversized = transaction.changes.len() > meridian_core::pgoutput::FRAGMENT_CHANGES
            || transaction.approx_bytes() > FRAGMENT_BYTES;
        if !unchanged && !oversized {
            if !hand_on(&mut stream, &out, transaction).await? {
                return Ok(());
            }
            continue;
        }
        let Transaction {
            commit_lsn,
            end_lsn,
            commit_time,
            changes,
            continues,
            token,
        } = transaction;
        // only the last piece of the transaction carries its token
        let piece = |changes, continues: bool| Transaction {
            commit_lsn,
            end_lsn: if continues {
                Lsn(commit_lsn.0 + 1)
            } else {
                end_lsn
            },
            commit_time,
            changes,
            continues,
            token: if continues { None } else { token },
        };
        let mut filled = Vec::new();
        let mut bytes = 0;
        for mut change in changes {
            reselect.fill(&mut change).await?;
            bytes += change.kind.approx_bytes();
            filled.push(change);
            if bytes >= FRAGMENT_BYTES {
                bytes = 0;
                let part = piece(std::mem::take(&mut filled), true);
                if !hand_on(&mut stream, &out, part).await? {
                    return Ok(());
                }
            }
        }
        if (!filled.is_empty() || !continues)
            && !hand_on(&mut stream, &out, piece(filled, continues)).await?
        {
            return Ok(());
        }
    }
}

/// Sends one transaction on, keeping status reports going while `out` is
/// full; false when the receiving side is gone.
async fn hand_on(
    stream: &mut ReplicationStream,
    out: &CaptureQueue,
    transaction: Transaction,
) -> Result<bool, CaptureError> {
    // values plus what a change and its row cost in memory beyond them
    let cost = transaction.approx_bytes() + transaction.changes.len() * CHANGE_OVERHEAD_BYTES;
    let kib = (cost >> 10) + 1;
    let kib = kib.min(QUEUE_BYTES >> 10) as u32;
    let budget = loop {
        tokio::select! {
            budget = out.budget.clone().acquire_many_owned(kib) => match budget {
                Ok(b) => break b,
                Err(_) => return Ok(false),
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => stream.send_status(false).await?,
        }
    };
    let slot = loop {
        tokio::select! {
            slot = out.tx.reserve() => match slot {
                Ok(s) => break s,
                Err(_) => return Ok(false),
            },
            _ = tokio::time::sleep(Duration::from_secs(1)) => stream.send_status(false).await?,
        }
    };
    slot.send(Captured {
        transaction,
        _budget: budget,
    });
    Ok(true)
}

/// The error and its causes, `: `-separated (tonic's transport errors say
/// little without their causes).
pub(crate) fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    text
}

/// Aborts a task when dropped (a session's helpers end with it).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::change::{Change, Column, Table, Value};

    fn transaction(end: u64, rows: usize, width: usize) -> Transaction {
        let table = Arc::new(Table {
            schema: "public".into(),
            name: "orders".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    key: true,
                },
                Column {
                    name: "note".into(),
                    type_oid: 25,
                    key: false,
                },
            ],
        });
        Transaction {
            commit_lsn: Lsn(end - 8),
            end_lsn: Lsn(end),
            commit_time: 0,
            changes: (0..rows)
                .map(|i| Change {
                    table: table.clone(),
                    kind: ChangeKind::Insert {
                        new: vec![
                            Value::Text(i.to_string()),
                            Value::Text(format!("{i:0width$}")),
                        ],
                    },
                })
                .collect(),
            continues: false,
            token: None,
        }
    }

    #[test]
    fn batches_too_large_for_a_message_go_as_several_in_order() {
        let batch: Vec<Transaction> = (1..=10).map(|i| transaction(i * 100, 50, 1000)).collect();
        let whole = codec::encode(&batch).len();
        let limit = whole / 3;
        let parts = fit(batch.clone(), "", limit).expect("fits in parts");
        assert!(parts.len() >= 3, "{}", parts.len());
        for (transactions, payload) in &parts {
            assert!(payload.len() + MESSAGE_FRAMING_BYTES <= limit);
            assert_eq!(&codec::decode(payload).expect("decodes"), transactions);
        }
        let again: Vec<Transaction> = parts.into_iter().flat_map(|(t, _)| t).collect();
        assert_eq!(again, batch, "every transaction once, in order");
        // small enough: one message
        assert_eq!(fit(batch.clone(), "", whole * 2).expect("fits").len(), 1);
        // one transaction too large alone: named, not split
        let e = fit(vec![transaction(100, 50, 1000)], "", 4096).unwrap_err();
        assert!(
            e.contains("tables public.orders") && e.contains("max_change_bytes"),
            "{e}"
        );
    }
}
