//! The inbound side: a gRPC service that applies peers' batches to this
//! region's store.
//!
//! Per source region there is one apply session at a time (a second stream
//! from the same source waits for the first to end). A batch is applied only
//! if its sequence number is the next one and its crc32 matches; a corrupted
//! batch is refused with a `Nack` and the stream ends, so the source resends
//! from the durable watermark and nothing after the bad batch is applied out
//! of order. Data the store rejects (a value the column type refuses) goes to
//! `meridian.dead_letters` transaction by transaction, and the link moves on;
//! a destination schema that does not fit yet (missing table or column), or
//! a batch in a format this agent does not read (a newer source during a
//! rolling upgrade), ends the stream instead: the source retries from the
//! watermark and nothing is skipped.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use meridian_apply::{Applier, ApplyError, Checkpoint, Letter};
use meridian_capture::origin_name;
use meridian_core::pgoutput::Keys;
use meridian_core::{Lsn, Transaction, codec};
use meridian_proto::replication::{
    Ack, DestinationMessage, Nack, SourceMessage, Welcome, destination_message,
    replication_server::Replication, source_message,
};
use meridian_trust::Identity;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::inbound::{self, BatchVerdict};
use crate::residency::{self, SharedPolicy};
use crate::telemetry::{self, Telemetry};

/// One source's apply session: the applier, held by one stream at a time,
/// and a generation bumped by each new Hello so the stream holding it lets
/// go (a source that reconnects preempts its own old, possibly half-open,
/// stream instead of queueing behind it).
#[derive(Clone, Default)]
struct Session {
    applier: Arc<tokio::sync::Mutex<Option<Applier>>>,
    generation: Arc<watch::Sender<u64>>,
}

/// Longest a new stream may take to send its Hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The `Replication` gRPC service of one region's agent.
pub struct ReplicationService {
    region: String,
    store: String,
    /// For checks outside an apply session (incarnations).
    pool: sqlx::PgPool,
    regions: HashSet<String>,
    sessions: Mutex<HashMap<String, Session>>,
    policy: SharedPolicy,
    telemetry: Arc<Telemetry>,
    admission: Admission,
}

/// What a receiver lets in, whatever a peer sends.
pub struct Admission {
    /// The replicated tables and their key columns, from this region's
    /// topology: nothing else is written, whatever a batch says.
    pub keys: Arc<Keys>,
    /// Peers are known by their certificates (mTLS): a stream may only
    /// carry the changes of the region its certificate names.
    pub tls: bool,
    /// Largest batch message, and payload once decompressed
    /// ([`meridian_core::topology::Tuning::message_limit`]).
    pub message_limit: usize,
}

impl ReplicationService {
    pub fn new(
        region: &str,
        store: &str,
        pool: sqlx::PgPool,
        regions: impl IntoIterator<Item = String>,
        policy: SharedPolicy,
        telemetry: Arc<Telemetry>,
        admission: Admission,
    ) -> Self {
        ReplicationService {
            region: region.to_owned(),
            store: store.to_owned(),
            pool,
            regions: regions.into_iter().collect(),
            sessions: Mutex::new(HashMap::new()),
            policy,
            telemetry,
            admission,
        }
    }

    /// Whether the caller's certificate lets it send `source`'s changes;
    /// a refusal is counted and explained.
    fn admit(&self, caller: Option<&Identity>, source: &str) -> Result<(), Status> {
        if !self.admission.tls {
            return Ok(());
        }
        let reason = match caller {
            Some(Identity::Region(r)) if r == source => return Ok(()),
            Some(Identity::Region(_)) => "wrong_region",
            _ => "not_a_region",
        };
        Err(self.refuse(caller, reason, Some(source)))
    }

    /// Counts, logs and explains a refused stream; `claimed` is the source
    /// the Hello named (a peer's string: cut short).
    fn refuse(
        &self,
        caller: Option<&Identity>,
        reason: &'static str,
        claimed: Option<&str>,
    ) -> Status {
        self.telemetry.refused(reason);
        let who = caller.map_or("no certificate".to_owned(), |c| c.to_string());
        let claimed: String = claimed.unwrap_or("").chars().take(64).collect();
        tracing::error!(?claimed, caller = %who, reason, "replication stream refused");
        match claimed.is_empty() {
            true => Status::permission_denied(format!(
                "the connection's certificate is for {who}; only regions' agents may open replication streams"
            )),
            false => Status::permission_denied(format!(
                "the connection's certificate is for {who}; only region {claimed}'s agent may send its changes"
            )),
        }
    }

    fn session(&self, source: &str) -> Session {
        let mut sessions = self.sessions.lock().expect("sessions lock");
        sessions.entry(source.to_owned()).or_default().clone()
    }
}

/// The one place where apply errors become gRPC statuses. Messages carry no
/// row values.
fn status(e: &ApplyError) -> Status {
    match e {
        ApplyError::Rejected { .. }
        | ApplyError::Schema(_)
        | ApplyError::Blocked(_)
        | ApplyError::Waiting { .. } => Status::failed_precondition(e.to_string()),
        ApplyError::Unavailable(_) => Status::unavailable(format!("destination {e}")),
    }
}

#[tonic::async_trait]
impl Replication for ReplicationService {
    type ReplicateStream = ReceiverStream<Result<DestinationMessage, Status>>;

    async fn replicate(
        &self,
        request: Request<Streaming<SourceMessage>>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        let caller = meridian_trust::net::caller(&request).cloned();
        // only an agent's certificate may open a stream: nothing else is
        // read (or buffered) from anyone else
        if self.admission.tls && !matches!(caller, Some(Identity::Region(_))) {
            return Err(self.refuse(caller.as_ref(), "not_a_region", None));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no Hello within {HELLO_TIMEOUT:?}")))?;
        let hello = match first?.and_then(|m| m.kind) {
            Some(source_message::Kind::Hello(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ));
            }
        };
        if hello.destination_region != self.region {
            return Err(Status::failed_precondition(format!(
                "this agent serves region {}, not {}; check regions.*.connect in the topology",
                self.region, hello.destination_region
            )));
        }
        self.admit(caller.as_ref(), &hello.source_region)?;
        if hello.source_region == self.region || !self.regions.contains(&hello.source_region) {
            return Err(Status::permission_denied(format!(
                "source region {:?} is not a peer in this agent's topology",
                hello.source_region
            )));
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| Status::unavailable(format!("destination store: {e}")))?;
        let accepted = crate::lifecycle::accept_incarnation(
            &mut conn,
            &hello.source_region,
            &self.region,
            &hello.incarnation,
        )
        .await
        .map_err(|e| Status::unavailable(format!("destination store: {e}")))?;
        drop(conn);
        if let Err(refusal) = accepted {
            tracing::error!(source = %hello.source_region, "{refusal}");
            return Err(Status::failed_precondition(format!(
                "{}{refusal}",
                crate::lifecycle::PEER_PREFIX
            )));
        }
        let session = self.session(&hello.source_region);
        session.generation.send_modify(|g| *g += 1);
        let (tx, rx) = mpsc::channel(64);
        let store = self.store.clone();
        let source = hello.source_region;
        let me = Receiver {
            region: self.region.clone(),
            keys: self.admission.keys.clone(),
            message_limit: self.admission.message_limit,
            incarnation: hello.incarnation,
            policy: self.policy.clone(),
            telemetry: self.telemetry.clone(),
        };
        tokio::spawn(async move {
            if let Err(e) = serve(&me, session, &store, &source, inbound, &tx).await {
                tracing::warn!(source = %source, error = %e.message(), "inbound stream ended");
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What a stream needs to know about the receiving region.
struct Receiver {
    region: String,
    keys: Arc<Keys>,
    message_limit: usize,
    /// The source slot's incarnation, from the stream's Hello: every
    /// batch's seal binds it.
    incarnation: String,
    policy: SharedPolicy,
    telemetry: Arc<Telemetry>,
}

async fn serve(
    me: &Receiver,
    session: Session,
    store: &str,
    source: &str,
    mut inbound: Streaming<SourceMessage>,
    tx: &mpsc::Sender<Result<DestinationMessage, Status>>,
) -> Result<(), Status> {
    let mut preempted = session.generation.subscribe();
    preempted.mark_unchanged();
    let mut guard = tokio::select! {
        guard = session.applier.lock() => guard,
        _ = preempted.changed() => return Err(preempted_status()),
    };
    if guard.is_none() {
        let applier = Applier::connect(store, source, &origin_name(source))
            .await
            .map_err(|e| status(&e.into()))?;
        *guard = Some(applier);
    }
    let applier = guard.as_mut().expect("set above");
    let result = apply_stream(me, applier, source, &mut inbound, &mut preempted, tx).await;
    // a fragmented transaction cut off with its stream is sent again whole
    if applier.abandon().await.is_err() {
        *guard = None;
    }
    if result
        .as_ref()
        .is_err_and(|e| e.code() == tonic::Code::Unavailable)
    {
        me.telemetry.error(source, &me.region, "store_unavailable");
        *guard = None; // reconnect next time
    }
    result
}

fn preempted_status() -> Status {
    Status::aborted("a newer stream from the same source region took over")
}

async fn apply_stream(
    me: &Receiver,
    applier: &mut Applier,
    source: &str,
    inbound: &mut Streaming<SourceMessage>,
    preempted: &mut watch::Receiver<u64>,
    tx: &mpsc::Sender<Result<DestinationMessage, Status>>,
) -> Result<(), Status> {
    let mut watermark = applier.watermark().await.map_err(|e| status(&e.into()))?;
    if !reply(
        tx,
        destination_message::Kind::Welcome(Welcome {
            applied_lsn: watermark.0,
            compressions: crate::wire::reads(),
        }),
    )
    .await
    {
        return Ok(());
    }
    let mut expected = 1;
    // between batches, a newer stream from the same source takes over (an
    // apply under way finishes first)
    while let Some(message) = tokio::select! {
        message = inbound.message() => message?,
        _ = preempted.changed() => return Err(preempted_status()),
    } {
        let Some(source_message::Kind::Batch(batch)) = message.kind else {
            return Err(Status::invalid_argument("expected a Batch"));
        };
        if batch.seq != expected {
            return Err(Status::invalid_argument(format!(
                "batch {} out of sequence, expected {expected}",
                batch.seq
            )));
        }
        expected += 1;
        let policy = residency::current(&me.policy);
        let claims = codec::Claims {
            crc32: batch.crc32,
            seq: batch.seq,
            end_lsn: batch.end_lsn,
            source_wal_end: batch.source_wal_end,
            compression: &batch.compression,
            policy_version: batch.policy_version,
            incarnation: &me.incarnation,
        };
        let verdict = inbound::judge_batch(
            (&batch.payload, &batch.compression),
            batch.crc32,
            source,
            &me.region,
            policy.as_deref(),
            &me.keys,
            me.message_limit,
        );
        let verdict = inbound::judge_claims(verdict, &claims, batch.seal);
        let applied = match verdict {
            BatchVerdict::Apply(transactions) => {
                let started = Instant::now();
                let watermark = apply_batch(me, applier, source, &transactions).await?;
                me.telemetry.applied(
                    source,
                    &telemetry::changes_per_table(&transactions),
                    batch.payload.len(),
                    started.elapsed(),
                    watermark.0,
                );
                watermark
            }
            BatchVerdict::Refuse {
                reason,
                kind,
                forbidden,
            } => {
                tracing::error!(source, seq = batch.seq, end_lsn = %Lsn(batch.end_lsn),
                    sender_policy = batch.policy_version, %reason,
                    "refused batch; the source sends it again from the watermark");
                me.telemetry.error(source, &me.region, kind);
                if let Some(f) = forbidden {
                    // the stream ends with this refusal: end an open large
                    // transaction first, so the record is not rolled back with it
                    applier.abandon().await.map_err(|e| status(&e.into()))?;
                    applier
                        .record_violation(
                            Lsn(batch.end_lsn),
                            batch.policy_version,
                            f.receiver_version,
                            &reason,
                        )
                        .await
                        .map_err(|e| status(&e.into()))?;
                }
                reply(
                    tx,
                    destination_message::Kind::Nack(Nack {
                        seq: batch.seq,
                        reason,
                    }),
                )
                .await;
                return Ok(());
            }
            BatchVerdict::DeadLetter {
                reason,
                keep_payload,
            } => {
                me.telemetry.error(source, &me.region, "undecodable");
                // as encoded (uncompressed), so `dead-letters replay` reads it
                let payload = match keep_payload {
                    true => crate::wire::decompress(
                        &batch.compression,
                        &batch.payload,
                        me.message_limit,
                    )
                    .unwrap_or_default(),
                    false => Default::default(),
                };
                dead_letter(me, applier, source, Lsn(batch.end_lsn), reason, &payload).await?
            }
        };
        watermark = watermark.max(applied);
        let ack = Ack {
            seq: batch.seq,
            applied_lsn: watermark.0,
        };
        if !reply(tx, destination_message::Kind::Ack(ack)).await {
            return Ok(());
        }
    }
    Ok(())
}

/// Sends a reply; false when the source is gone.
async fn reply(
    tx: &mpsc::Sender<Result<DestinationMessage, Status>>,
    kind: destination_message::Kind,
) -> bool {
    tx.send(Ok(DestinationMessage { kind: Some(kind) }))
        .await
        .is_ok()
}

async fn dead_letter(
    me: &Receiver,
    applier: &mut Applier,
    source: &str,
    end_lsn: Lsn,
    reason: String,
    payload: &[u8],
) -> Result<Lsn, Status> {
    tracing::error!(source, end_lsn = %end_lsn, %reason, "batch moved to meridian.dead_letters");
    let letter = Letter {
        end_lsn,
        reason: &reason,
        payload,
    };
    let watermark = applier
        .dead_letter(letter, Checkpoint::Watermark)
        .await
        .map_err(|e| status(&e.into()))?;
    me.telemetry.dead_letter(source);
    Ok(watermark)
}

/// Applies one decoded batch (rejected transactions to dead letters);
/// returns the watermark after it.
async fn apply_batch(
    me: &Receiver,
    applier: &mut Applier,
    source: &str,
    transactions: &[Transaction],
) -> Result<Lsn, Status> {
    match applier.apply(transactions, Checkpoint::Watermark).await {
        Ok(applied) => {
            me.telemetry.inbound_moving(source, None);
            for (end_lsn, reason) in &applied.dead_lettered {
                tracing::error!(source, end_lsn = %end_lsn, %reason,
                    "transaction moved to meridian.dead_letters (meridian dead-letters list)");
                me.telemetry.dead_letter(source);
            }
            Ok(applied.watermark)
        }
        Err(e) => {
            me.telemetry.inbound_stalled(source, None, e.to_string());
            match &e {
                ApplyError::Schema(reason) => {
                    tracing::error!(source, %reason, "destination schema does not fit; the link waits");
                    me.telemetry.error(source, &me.region, "schema");
                }
                ApplyError::Blocked(reason) => {
                    tracing::error!(source, %reason, "large transaction rejected; the link waits");
                    me.telemetry.error(source, &me.region, "blocked");
                }
                _ => {}
            }
            Err(status(&e))
        }
    }
}
