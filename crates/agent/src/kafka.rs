//! The Kafka transport: one topic per link, `<prefix>.<source>.<destination>`
//! (see [`meridian_core::record`] for the record format).
//!
//! - [`KafkaLink`], at the source: reads the link's slot, filters every
//!   transaction with the residency policy for the destination, and produces
//!   one record per change (idempotent producer, `acks=all`). The slot is
//!   confirmed past a transaction only when the broker acknowledged every
//!   record of it and of all before it. A topic holds only what its
//!   destination may have: it is data at rest, in the broker's region.
//! - [`KafkaInbound`], at the destination: one task per partition, each with
//!   its own apply session, applies records in partition order and stores the
//!   partition's next offset and source position in the same transaction as
//!   the rows (`meridian.kafka_positions`). Restarts resume from there;
//!   records at or below the stored position (a source replaying after its
//!   own restart) are skipped. The broker's consumer-group offsets are not
//!   used. Bad records go to `meridian.dead_letters` and the partition moves
//!   on; a record the residency policy forbids here stops its partition
//!   (recorded in `meridian.policy_violations`) until the policies agree.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use meridian_apply::{Applier, ApplyError, Checkpoint, Letter, RecordProgress};
use meridian_capture::ReplicationStream;
use meridian_core::pgoutput::Keys;
use meridian_core::record::{self, Position};
use meridian_core::topology::{KafkaCluster, KafkaProtocol, kafka_password_env};
use meridian_core::{Lsn, Transaction};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::sync::watch;

use crate::inbound::{self, RecordVerdict};
use crate::link::{self, LinkError, Outbound};
use crate::residency::{self, Audit, SharedPolicy};
use crate::telemetry::{self, LinkState, Telemetry};

/// The Kafka cluster and the link's topic settings.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub brokers: String,
    /// TLS and SASL settings (the password read from the environment).
    pub security: Security,
    pub topic_prefix: String,
    pub partitions: i32,
    pub replication_factor: i32,
    /// Retention of the topics Meridian creates.
    pub retention_hours: i64,
    /// Transaction order: a batch of records is never cut inside a source
    /// transaction (see [`meridian_core::record::MORE`]).
    pub whole_transactions: bool,
}

/// How a cluster's clients authenticate and encrypt.
#[derive(Clone, Debug, Default)]
pub struct Security {
    pub protocol: KafkaProtocol,
    pub mechanism: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub ca: Option<std::path::PathBuf>,
}

/// A value never printed.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<secret>")
    }
}

impl Security {
    /// The settings of `region`'s cluster, with the SASL password from
    /// [`kafka_password_env`]; an error names the missing variable.
    pub fn of(cluster: &KafkaCluster, region: Option<&str>) -> anyhow::Result<Security> {
        let password = match (cluster.security_protocol.sasl(), region) {
            (false, _) => None,
            (true, Some(region)) => {
                let env = kafka_password_env(region);
                let password = std::env::var(&env).ok().filter(|p| !p.is_empty());
                Some(Secret(password.ok_or_else(|| {
                    anyhow::anyhow!(
                        "kafka.clusters.{region} uses SASL, but {env} is not set; set it to the \
                         password of SASL user {:?}",
                        cluster.sasl_username.as_deref().unwrap_or_default()
                    )
                })?))
            }
            (true, None) => None, // validated: only regional clusters take SASL
        };
        Ok(Security {
            protocol: cluster.security_protocol,
            mechanism: cluster.sasl_mechanism.clone(),
            username: cluster.sasl_username.clone(),
            password,
            ca: cluster.ca.clone(),
        })
    }
}

impl Cluster {
    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("socket.keepalive.enable", "true")
            .set("log_level", "3")
            .set("security.protocol", self.security.protocol.name());
        let s = &self.security;
        if let Some(m) = &s.mechanism {
            c.set("sasl.mechanisms", m);
        }
        if let Some(u) = &s.username {
            c.set("sasl.username", u);
        }
        if let Some(p) = &s.password {
            c.set("sasl.password", &p.0);
        }
        if let Some(ca) = &s.ca {
            c.set("ssl.ca.location", ca.display().to_string());
        }
        c
    }

    /// Creates the topic when absent (an existing topic keeps its settings)
    /// and returns its partition count.
    /// The highest source position in the last record of any partition of
    /// `topic` (0 for an empty topic): what the link produced last.
    async fn last_produced(&self, topic: &str, partitions: i32) -> Result<Lsn, LinkError> {
        use rdkafka::consumer::BaseConsumer;
        let consumer: BaseConsumer = self
            .config()
            .set("enable.auto.commit", "false")
            .set("group.id", "meridian-last-produced")
            .create()
            .map_err(kafka)?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut last = Lsn(0);
            for partition in 0..partitions {
                let (low, high) = consumer
                    .fetch_watermarks(&topic, partition, Duration::from_secs(10))
                    .map_err(kafka)?;
                if high <= low {
                    continue;
                }
                let mut list = TopicPartitionList::new();
                list.add_partition_offset(&topic, partition, Offset::Offset(high - 1))
                    .map_err(kafka)?;
                consumer.assign(&list).map_err(kafka)?;
                let message = consumer
                    .poll(Duration::from_secs(10))
                    .ok_or_else(|| {
                        LinkError::Kafka(format!(
                            "cannot read the last record of partition {partition} of {topic}"
                        ))
                    })?
                    .map_err(kafka)?;
                let lsn = message
                    .headers()
                    .and_then(|h| {
                        h.iter()
                            .find(|h| h.key == record::LSN)
                            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
                    })
                    .unwrap_or(0);
                last = last.max(Lsn(lsn));
            }
            Ok(last)
        })
        .await
        .map_err(|e| LinkError::Kafka(e.to_string()))?
    }

    /// The offsets a partition holds: (first, next to be written).
    async fn offsets(&self, topic: &str, partition: i32) -> Result<(i64, i64), LinkError> {
        let consumer: rdkafka::consumer::BaseConsumer = self.config().create().map_err(kafka)?;
        let topic = topic.to_owned();
        tokio::task::spawn_blocking(move || {
            consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10))
        })
        .await
        .map_err(|e| LinkError::Kafka(e.to_string()))?
        .map_err(kafka)
    }

    async fn ensure_topic(&self, topic: &str) -> Result<i32, LinkError> {
        let admin: AdminClient<DefaultClientContext> = self.config().create().map_err(kafka)?;
        let admin = Arc::new(admin);
        let partitions = |admin: Arc<AdminClient<DefaultClientContext>>, topic: String| async move {
            tokio::task::spawn_blocking(move || {
                admin
                    .inner()
                    .fetch_metadata(Some(&topic), Duration::from_secs(10))
                    .map(|m| {
                        m.topics()
                            .iter()
                            .find(|t| t.name() == topic && t.error().is_none())
                            .map_or(0, |t| t.partitions().len() as i32)
                    })
            })
            .await
            .map_err(|e| LinkError::Kafka(e.to_string()))?
            .map_err(kafka)
        };
        let existing = partitions(admin.clone(), topic.to_owned()).await?;
        if existing > 0 {
            self.warn_unsafe_settings(&admin, topic).await;
            return Ok(existing);
        }
        let retention_ms = self.retention_hours.saturating_mul(3_600_000).to_string();
        let min_insync = (self.replication_factor - 1).clamp(1, 2).to_string();
        let created = admin
            .create_topics(
                // records reach RECORD_MAX_BYTES plus one change; the
                // broker's default (about 1 MB) would refuse a large value
                &[NewTopic::new(
                    topic,
                    self.partitions,
                    TopicReplication::Fixed(self.replication_factor),
                )
                .set("max.message.bytes", "16777216")
                // records leave by age only, never by key or size
                .set("cleanup.policy", "delete")
                .set("retention.ms", &retention_ms)
                // a write acknowledged (acks=all) survives the loss of a replica
                .set("min.insync.replicas", &min_insync)],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(kafka)?;
        for result in created {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(LinkError::Kafka(format!(
                        "cannot create topic {name}: {code}"
                    )));
                }
            }
        }
        match partitions(admin, topic.to_owned()).await? {
            0 => Err(LinkError::Kafka(format!(
                "topic {topic} has no partitions yet"
            ))),
            n => Ok(n),
        }
    }
}

impl Cluster {
    /// Logs a warning for each setting of the existing `topic` that can
    /// lose records before a destination applies them ([`unsafe_settings`]).
    async fn warn_unsafe_settings(&self, admin: &AdminClient<DefaultClientContext>, topic: &str) {
        use rdkafka::admin::ResourceSpecifier;
        let described = admin
            .describe_configs(
                &[ResourceSpecifier::Topic(topic)],
                &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
            )
            .await;
        let settings: Vec<(String, String)> = match described.as_deref() {
            Ok([Ok(resource)]) => resource
                .entries
                .iter()
                .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
                .collect(),
            other => {
                tracing::info!(%topic, result = ?other.map(|r| r.len()),
                    "cannot read the topic's settings; not checked");
                return;
            }
        };
        for warning in unsafe_settings(&settings, self.replication_factor) {
            tracing::warn!(%topic, "unsafe topic setting: {warning}");
        }
    }
}

/// Settings of an existing topic that can lose records before a
/// destination applies them: compaction, retention by size or under a day,
/// a message size limit below Meridian's records, one in-sync replica where
/// the topology asks for several.
pub fn unsafe_settings(settings: &[(String, String)], replication_factor: i32) -> Vec<String> {
    let get = |name: &str| {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    };
    let number = |name: &str| get(name).and_then(|v| v.trim().parse::<i64>().ok());
    let mut out = Vec::new();
    if get("cleanup.policy").is_some_and(|p| p.contains("compact")) {
        out.push(
            "cleanup.policy includes compact: a row's older records may be removed before they \
             are applied; set cleanup.policy=delete"
                .to_owned(),
        );
    }
    if let Some(bytes) = number("retention.bytes").filter(|b| *b >= 0) {
        out.push(format!(
            "retention.bytes={bytes}: records are removed by size however far behind a \
             destination is; set -1 and size retention.ms for the longest outage"
        ));
    }
    if let Some(ms) = number("retention.ms").filter(|ms| (0..86_400_000).contains(ms)) {
        out.push(format!(
            "retention.ms={ms} (under a day): a destination down for longer loses records"
        ));
    }
    if let Some(max) = number("max.message.bytes").filter(|m| *m < 16 << 20) {
        out.push(format!(
            "max.message.bytes={max}: records of up to 16 MiB would be refused; set 16777216"
        ));
    }
    if let Some(isr) = number("min.insync.replicas").filter(|isr| *isr < 2)
        && replication_factor >= 3
    {
        out.push(format!(
            "min.insync.replicas={isr}: an acknowledged write can be lost with one broker; set 2"
        ));
    }
    out
}

fn kafka(e: impl std::fmt::Display) -> LinkError {
    LinkError::Kafka(e.to_string())
}

/// Records produced and not yet acknowledged, at most.
const MAX_UNACKNOWLEDGED: usize = 50_000;
/// Record bytes produced and not yet acknowledged: capture waits beyond
/// this (one more transaction or fragment may go over it).
const MAX_UNACKNOWLEDGED_BYTES: usize = 32 << 20;

/// The source side of a Kafka link.
pub struct KafkaLink {
    pub source: String,
    pub destination: String,
    /// The source store URL (secret).
    pub store: String,
    pub slot: String,
    pub publication: String,
    pub cluster: Cluster,
    pub policy: SharedPolicy,
    pub audit: Arc<Audit>,
    pub keys: Keys,
    pub telemetry: Arc<Telemetry>,
    /// Highest position the broker durably holds, across sessions.
    pub acked: Arc<AtomicU64>,
    /// The replicated tables (what an initial sync copies).
    pub tables: Vec<meridian_core::topology::TableSpec>,
}

/// A produced record awaiting the broker's acknowledgement.
struct InFlight {
    delivery: DeliveryFuture,
    bytes: usize,
    /// Set on the last record of a transaction: its end position.
    completes: Option<Lsn>,
}

impl Outbound for KafkaLink {
    async fn run(self, shutdown: watch::Receiver<bool>) {
        let telemetry = self.telemetry.clone();
        link::supervise(
            &self.source,
            &self.destination,
            &telemetry,
            shutdown,
            || self.session(),
        )
        .await
    }
}

impl KafkaLink {
    async fn session(&self) -> Result<(), LinkError> {
        let topic = record::topic(&self.cluster.topic_prefix, &self.source, &self.destination);
        let partitions = self.cluster.ensure_topic(&topic).await?;
        if partitions != self.cluster.partitions {
            // a row's records go to crc32(key) % partitions: another count
            // sends a row's next change to another partition, where it can
            // overtake the earlier ones
            return Err(crate::lifecycle::Refusal(format!(
                "topic {topic} has {partitions} partitions, but the topology says {} (order = \
                 \"transaction\" means 1): producing with another count would break the order, \
                 so the link stops. Let the destination drain the topic, then delete it (it is \
                 made anew with the topology's count), or set [kafka] partitions = \
                 {partitions} with order = \"row\"",
                self.cluster.partitions
            ))
            .into());
        }
        // a lost slot stops the link (never made anew here); a slot
        // confirmed past what reached the topic (and past its own creation)
        // means the changes between were never produced. An empty topic
        // (made anew after draining) is left to the destination, whose
        // stored offsets are then out of range if it had not drained.
        let (incarnation, source_pool) =
            crate::lifecycle::check_link(&self.store, &self.slot, &self.source, &self.destination)
                .await?;
        let produced = self.cluster.last_produced(&topic, partitions).await?;
        if produced.0 > 0 {
            crate::lifecycle::check_positions(
                &source_pool,
                &self.slot,
                produced,
                &self.source,
                &self.destination,
            )
            .await
            .map_err(|e| LinkError::Capture(e.into()))??;
        }
        drop(source_pool);
        let producer: FutureProducer = self
            .cluster
            .config()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "0") // never give up: the broker may be down for a while
            .set("queue.buffering.max.messages", "200000")
            // above MAX_UNACKNOWLEDGED_BYTES plus a fragment's records
            .set("queue.buffering.max.kbytes", "131072")
            // records stay under RECORD_MAX_BYTES plus one change
            .set("message.max.bytes", "16777216")
            .create()
            .map_err(kafka)?;
        // resume from the slot's confirmed position: what the broker holds
        let stream = ReplicationStream::start(
            &self.store,
            &self.slot,
            &self.publication,
            Lsn(0),
            self.keys.clone(),
        )
        .await?;
        let confirmed = stream.confirmed();
        self.acked
            .fetch_max(confirmed.load(Ordering::Acquire), Ordering::AcqRel);
        let (mut changes, mut capture, _tasks) = link::start_capture(
            stream,
            &self.store,
            &self.source,
            &self.destination,
            &self.tables,
            &self.acked,
        );
        self.telemetry
            .set_link_state(&self.destination, LinkState::Connected, None);
        tracing::info!(source = %self.source, destination = %self.destination, %topic,
            partitions, "kafka link producing");

        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        // (commit position, ordinal of the next change) of the transaction
        // whose fragments are being produced
        let mut first_ordinal = (Lsn(0), 0u32);
        let mut in_flight_bytes = 0usize;
        loop {
            tokio::select! {
                biased;
                delivered = async { (&mut in_flight.front_mut().expect("non-empty").delivery).await },
                    if !in_flight.is_empty() =>
                {
                    let done = in_flight.pop_front().expect("non-empty");
                    in_flight_bytes -= done.bytes;
                    match delivered {
                        Ok(Ok(_)) => {}
                        Ok(Err((e, _))) => return Err(kafka(format!("delivery to {topic} failed: {e}"))),
                        Err(_) => return Err(kafka("producer dropped a delivery")),
                    }
                    if let Some(end) = done.completes {
                        confirmed.fetch_max(end.0, Ordering::AcqRel);
                        self.acked.fetch_max(end.0, Ordering::AcqRel);
                    }
                }
                ended = &mut capture => {
                    return match ended {
                        Ok(Err(e)) => Err(e.into()),
                        _ => Err(LinkError::Protocol("capture stopped".into())),
                    };
                }
                next = changes.recv(), if in_flight.len() < MAX_UNACKNOWLEDGED
                    && in_flight_bytes < MAX_UNACKNOWLEDGED_BYTES =>
                {
                    let Some(link::Captured { transaction, .. }) = next else { return Err(LinkError::Closed) };
                    in_flight_bytes += self.produce(&producer, (&topic, partitions), &incarnation, transaction, &mut first_ordinal, &mut in_flight)?;
                }
            }
        }
    }

    /// Filters one transaction for the destination and produces its records.
    fn produce(
        &self,
        producer: &FutureProducer,
        (topic, partitions): (&str, i32),
        incarnation: &str,
        transaction: Transaction,
        first_ordinal: &mut (Lsn, u32),
        in_flight: &mut VecDeque<InFlight>,
    ) -> Result<usize, LinkError> {
        // number the changes by their place in the source transaction
        // (across its fragments), before the policy drops any
        if first_ordinal.0 != transaction.commit_lsn {
            *first_ordinal = (transaction.commit_lsn, 0);
        }
        let base = first_ordinal.1;
        first_ordinal.1 += transaction.changes.len() as u32;
        let (transaction, ordinals, policy_version): (Transaction, Vec<u32>, u64) =
            match residency::current(&self.policy) {
                Some(policy) => {
                    let (mut kept, mut origins, counts) = policy.filter_traced(
                        &self.source,
                        &self.destination,
                        std::slice::from_ref(&transaction),
                    );
                    self.audit.record(&self.destination, counts);
                    let ordinals = origins
                        .pop()
                        .unwrap_or_default()
                        .into_iter()
                        .map(|o| base + o)
                        .collect();
                    (
                        kept.pop().expect("one transaction in, one out"),
                        ordinals,
                        policy.version(),
                    )
                }
                None => {
                    let ordinals = (0..transaction.changes.len() as u32)
                        .map(|i| base + i)
                        .collect();
                    (transaction, ordinals, 0)
                }
            };
        let end_lsn = transaction.end_lsn;
        let continues = transaction.continues;
        let tables = telemetry::changes_per_table(std::slice::from_ref(&transaction));
        let records = record::records(
            &self.source,
            transaction,
            &ordinals,
            policy_version,
            partitions,
        );
        let bytes: usize = records.iter().map(|r| r.value.len()).sum();
        let count = records.len();
        for (i, r) in records.into_iter().enumerate() {
            let mut headers = OwnedHeaders::new_with_capacity(r.headers.len() + 1);
            for (key, value) in &r.headers {
                headers = headers.insert(Header {
                    key,
                    value: Some(value),
                });
            }
            // the slot incarnation the record comes from (the destination
            // refuses another one than it applied)
            headers = headers.insert(Header {
                key: INCARNATION,
                value: Some(incarnation.as_bytes()),
            });
            let mut out = FutureRecord::to(topic).payload(&r.value).headers(headers);
            if let Some(key) = &r.key {
                out = out.key(key);
            }
            if let Some(p) = r.partition {
                out = out.partition(p);
            }
            let delivery = producer
                .send_result(out)
                .map_err(|(e, _)| kafka(format!("cannot queue a record for {topic}: {e}")))?;
            in_flight.push_back(InFlight {
                delivery,
                bytes: r.value.len(),
                // a transaction is complete with its last fragment's last record
                completes: (i + 1 == count && !continues).then_some(end_lsn),
            });
        }
        self.telemetry.shipped(&self.destination, &tables, bytes);
        Ok(bytes)
    }
}

/// The destination side of one Kafka link.
pub struct KafkaInbound {
    pub source: String,
    pub destination: String,
    /// The destination store URL (secret).
    pub store: String,
    pub cluster: Cluster,
    pub policy: SharedPolicy,
    /// The replicated tables and their key columns, from this region's
    /// topology: nothing else is written, whatever a record says.
    pub keys: Arc<Keys>,
    pub telemetry: Arc<Telemetry>,
    /// Partitions whose next record waits on a unique constraint, with its
    /// position ([`ApplyError::Waiting`]); shared by the partition tasks.
    pub waiting: std::sync::Mutex<Vec<(i32, Position)>>,
}

/// Header naming the source slot incarnation a record comes from.
const INCARNATION: &str = "meridian-incarnation";

/// Records applied in one destination transaction, at most.
const MAX_APPLY_RECORDS: usize = 5_000;
/// Record bytes applied in one destination transaction, at most (one
/// record may go over it).
const MAX_APPLY_BYTES: usize = 2 << 20;
/// In transaction order, record bytes one destination transaction may grow
/// to so that it holds a whole source transaction.
const MAX_TRANSACTION_BYTES: usize = 64 << 20;

impl KafkaInbound {
    /// Consumes the link's topic until shutdown, one task per partition.
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let this = Arc::new(self);
        let topic = record::topic(&this.cluster.topic_prefix, &this.source, &this.destination);
        let mut backoff = Duration::from_millis(200);
        let partitions = loop {
            let found = this.cluster.ensure_topic(&topic).await.and_then(|n| {
                match (this.cluster.whole_transactions, n) {
                    (true, n) if n != 1 => Err(LinkError::Kafka(format!(
                        "order = \"transaction\" needs topic {topic} to have one partition, \
                         but it has {n}: its records would apply out of source order. Let the \
                         destination drain the topic, then delete it (it is made anew with one)"
                    ))),
                    _ => Ok(n),
                }
            });
            match found {
                Ok(n) => break n,
                Err(e) => {
                    this.telemetry
                        .inbound_stalled(&this.source, None, e.to_string());
                    tracing::warn!(source = %this.source, %topic, error = %e,
                        "kafka topic not ready; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        this.telemetry.inbound_moving(&this.source, None);
        let progress: Arc<[Progress]> = (0..partitions).map(|_| Progress::new()).collect();
        let mut tasks: Vec<_> = (0..partitions)
            .map(|p| {
                let this = this.clone();
                let topic = topic.clone();
                let shutdown = shutdown.clone();
                let progress = progress.clone();
                tokio::spawn(async move {
                    this.partition_loop(topic, p, partitions, &progress[p as usize], shutdown)
                        .await
                })
            })
            .collect();
        {
            let this = this.clone();
            let shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = this.watch_progress(&topic, &progress) => {}
                    _ = async { shutdown.clone().wait_for(|s| *s).await.map(|_| ()) } => {}
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Every few seconds, compares each partition's next offset with what
    /// the broker holds: a partition that applied nothing for
    /// [`STALL_AFTER`] while records wait for it is stalled, with the
    /// reason, whatever the cause (a slow or stuck broker fetch, a consumer
    /// that stopped asking). Its next apply clears it.
    async fn watch_progress(&self, topic: &str, progress: &[Progress]) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            for (partition, p) in progress.iter().enumerate() {
                let partition = partition as i32;
                let idle = p.idle();
                // a partition between sessions shows its own error
                if idle < STALL_AFTER || !p.live.load(Ordering::Acquire) {
                    continue;
                }
                let next = p.next_offset.load(Ordering::Acquire);
                let reason = match self.cluster.offsets(topic, partition).await {
                    Ok((_, high)) if high > next => format!(
                        "partition {partition} of {topic}: nothing applied for {} s while the \
                         broker holds {} more records (next offset {next}, high watermark {high})",
                        idle.as_secs(),
                        high - next
                    ),
                    Ok(_) => {
                        // idle: nothing waits (a stall this watch saw clears)
                        self.telemetry.inbound_moving(&self.source, Some(partition));
                        continue;
                    }
                    Err(e) => format!(
                        "partition {partition} of {topic}: nothing applied for {} s and the \
                         broker does not say what it holds ({e})",
                        idle.as_secs()
                    ),
                };
                self.telemetry
                    .inbound_stalled(&self.source, Some(partition), reason);
            }
        }
    }

    /// Applies one partition, reconnecting after failures.
    async fn partition_loop(
        &self,
        topic: String,
        partition: i32,
        partitions: i32,
        progress: &Progress,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let result = tokio::select! {
                r = self.partition_session(&topic, partition, partitions, progress) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            progress.ended();
            if let Err(e) = result {
                self.telemetry
                    .error(&self.source, &self.destination, e.kind());
                self.telemetry.inbound_stalled(
                    &self.source,
                    Some(partition),
                    format!("partition {partition}: {e}"),
                );
                if started.elapsed() > Duration::from_secs(10) {
                    backoff = Duration::from_millis(100);
                }
                tracing::warn!(source = %self.source, %topic, partition, error = %e,
                    retry_in_ms = backoff.as_millis() as u64, "kafka partition interrupted");
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One session of one partition; `partitions` is the topic's count.
    async fn partition_session(
        &self,
        topic: &str,
        partition: i32,
        partitions: i32,
        progress: &Progress,
    ) -> Result<(), LinkError> {
        // one replication origin per partition: PostgreSQL 15 lets one
        // session at a time hold an origin; capture skips every meridian_* one
        let origin = format!(
            "{}_p{partition}",
            meridian_capture::origin_name(&self.source)
        );
        let mut applier = Applier::connect(&self.store, &self.source, &origin)
            .await
            .map_err(|e| LinkError::Kafka(format!("destination store: {e}")))?;
        let stored = applier
            .partitions(topic, partitions)
            .await
            .map_err(|e| LinkError::Kafka(format!("destination store: {e}")))?;
        let (next_offset, mut position) = stored[partition as usize];
        let mut accepted: Option<String> = None;
        let consumer: StreamConsumer = self
            .cluster
            .config()
            .set(
                "group.id",
                format!("{}.{}", self.cluster.topic_prefix, self.destination),
            )
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false")
            // a stored offset the broker no longer has (retention, a
            // recreated topic) is an error the partition stops on, never a
            // silent jump to the end (review finding 8)
            .set("auto.offset.reset", "error")
            // an idle partition answers within 100 ms: low latency, few requests
            .set("fetch.wait.max.ms", "100")
            // prefetch per partition consumer: enough to keep apply busy,
            // bounded so memory does not grow with a large transaction
            .set("queued.max.messages.kbytes", "4096")
            .set("fetch.max.bytes", "4194304")
            .create()
            .map_err(kafka)?;
        // an offset outside what the broker holds is never skipped past,
        // whatever the broker answers for it (some serve nothing, silently)
        let (low, high) = self.cluster.offsets(topic, partition).await?;
        if next_offset < low || next_offset > high {
            return Err(LinkError::Lifecycle(crate::lifecycle::Refusal(format!(
                "partition {partition} of {topic}: the stored next offset {next_offset} is out of \
                 range of what the broker holds ({low} to {high}): records were removed before \
                 they were applied (retention), or the topic was made anew. Nothing is skipped; \
                 the partition waits. Rebuild the copy with `meridian resync --config FILE --link \
                 {}:{}`",
                self.source, self.destination
            ))));
        }
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, partition, Offset::Offset(next_offset))
            .map_err(kafka)?;
        consumer.assign(&assignment).map_err(kafka)?;
        progress.moved(next_offset);
        tracing::info!(source = %self.source, %topic, partition, next_offset, "kafka partition consuming");

        loop {
            let first = consumer.recv().await.map_err(kafka)?;
            let mut batch = vec![detach(&first)];
            drop(first);
            let mut bytes = batch[0].value.as_ref().map_or(0, Vec::len);
            let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
            while batch.len() < MAX_APPLY_RECORDS && bytes < MAX_APPLY_BYTES {
                match tokio::time::timeout_at(deadline, consumer.recv()).await {
                    Ok(Ok(m)) => {
                        let record = detach(&m);
                        bytes += record.value.as_ref().map_or(0, Vec::len);
                        batch.push(record);
                    }
                    Ok(Err(e)) => return Err(kafka(e)),
                    Err(_) => break,
                }
            }
            // transaction order: read on to the transaction's last record
            // (it follows at once; a transaction above the bound, only
            // possible in capture fragments, commits in parts)
            while self.cluster.whole_transactions
                && bytes < MAX_TRANSACTION_BYTES
                && batch.last().is_some_and(Consumed::more)
            {
                let record = detach(&consumer.recv().await.map_err(kafka)?);
                bytes += record.value.as_ref().map_or(0, Vec::len);
                batch.push(record);
            }
            self.check_incarnations(&mut applier, &mut accepted, &batch)
                .await?;
            let next = batch.last().map_or(0, |r| r.offset + 1);
            position = self
                .apply_records(&mut applier, topic, partition, position, batch)
                .await?;
            progress.moved(next);
            self.telemetry.inbound_moving(&self.source, Some(partition));
        }
    }

    /// Refuses records from another slot incarnation of the source than the
    /// one this store applies (`accepted` caches the last one accepted).
    async fn check_incarnations(
        &self,
        applier: &mut Applier,
        accepted: &mut Option<String>,
        records: &[Consumed],
    ) -> Result<(), LinkError> {
        for r in records {
            let Some(incarnation) = r
                .headers
                .iter()
                .find(|(k, _)| k == INCARNATION)
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
            else {
                continue; // a record of a release that predates incarnations
            };
            if accepted.as_deref() == Some(incarnation) {
                continue;
            }
            crate::lifecycle::accept_incarnation(
                applier.connection(),
                &self.source,
                &self.destination,
                incarnation,
            )
            .await
            .map_err(|e| LinkError::Store(e.into()))??;
            *accepted = Some(incarnation.to_owned());
        }
        Ok(())
    }

    /// Applies consumed records in order; returns the partition's position.
    async fn apply_records(
        &self,
        applier: &mut Applier,
        topic: &str,
        partition: i32,
        mut position: Position,
        records: Vec<Consumed>,
    ) -> Result<Position, LinkError> {
        let started = Instant::now();
        let bytes: usize = records
            .iter()
            .map(|r| r.value.as_ref().map_or(0, Vec::len))
            .sum();
        let mut fresh = Fresh::default();
        let mut applied: Vec<Transaction> = Vec::new();
        let mut watermark = Lsn(0);
        let policy = residency::current(&self.policy);
        for r in records {
            let verdict = inbound::judge_record(
                &r.headers,
                r.value.as_deref(),
                &self.source,
                &self.destination,
                position,
                policy.as_deref(),
                &self.keys,
            );
            let incoming = match verdict {
                RecordVerdict::Apply(incoming) => incoming,
                RecordVerdict::Refiltered {
                    incoming,
                    forbidden,
                } => {
                    tracing::warn!(source = %self.source, %topic, partition, offset = r.offset,
                        record_policy = incoming.policy_version,
                        policy = forbidden.receiver_version,
                        "record filtered under an older policy; applied as this policy allows");
                    self.telemetry
                        .error(&self.source, &self.destination, "policy_refiltered");
                    applier
                        .record_violation(
                            incoming.position.lsn,
                            incoming.policy_version,
                            forbidden.receiver_version,
                            &format!(
                                "{} (applied as policy v{} allows)",
                                forbidden.reason, forbidden.receiver_version
                            ),
                        )
                        .await
                        .map_err(|e| LinkError::Store(e.into()))?;
                    incoming
                }
                RecordVerdict::Skip => continue, // a replay: applied before
                RecordVerdict::DeadLetter {
                    reason,
                    keep_payload,
                } => {
                    // apply what came before, then set the bad record aside
                    watermark = watermark.max(self.apply(applier, topic, partition, &fresh).await?);
                    applied.append(&mut fresh.transactions);
                    fresh.progress.clear();
                    self.dead_letter(
                        applier,
                        (topic, partition, r.offset),
                        position,
                        &reason,
                        keep_payload.then_some(&r),
                    )
                    .await
                    .map_err(|e| LinkError::Store(e.into()))?;
                    continue;
                }
                RecordVerdict::Refuse {
                    reason,
                    kind,
                    forbidden,
                } => {
                    // apply what came before; this record waits
                    self.apply(applier, topic, partition, &fresh).await?;
                    tracing::error!(source = %self.source, %topic, partition, offset = r.offset,
                        %reason, "refused record; the partition waits");
                    self.telemetry.error(&self.source, &self.destination, kind);
                    if let Some((f, incoming)) = forbidden {
                        applier
                            .record_violation(
                                incoming.position.lsn,
                                incoming.policy_version,
                                f.receiver_version,
                                &reason,
                            )
                            .await
                            .map_err(|e| LinkError::Store(e.into()))?;
                    }
                    return Err(LinkError::Refused {
                        seq: r.offset as u64,
                        reason,
                    });
                }
            };
            position = incoming.position;
            fresh.progress.push(RecordProgress {
                next_offset: r.offset + 1,
                position,
                commit_time: incoming.transaction.commit_time,
            });
            fresh.transactions.push(incoming.transaction);
        }
        watermark = watermark.max(self.apply(applier, topic, partition, &fresh).await?);
        applied.append(&mut fresh.transactions);
        self.telemetry.applied(
            &self.source,
            &telemetry::changes_per_table(&applied),
            bytes,
            started.elapsed(),
            watermark.0,
        );
        Ok(position)
    }

    /// Applies records and stores the partition's progress, through the one
    /// apply-or-dead-letter step; returns the source's watermark after it
    /// (0 if nothing was applied).
    async fn apply(
        &self,
        applier: &mut Applier,
        topic: &str,
        partition: i32,
        records: &Fresh,
    ) -> Result<Lsn, LinkError> {
        if records.transactions.is_empty() {
            return Ok(Lsn(0));
        }
        let at = Checkpoint::Partition {
            topic,
            partition,
            after: &records.progress,
        };
        let others: Vec<(i32, Position)> = self
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| *p != partition)
            .copied()
            .collect();
        applier.others_waiting(others);
        let result = applier.apply(&records.transactions, at).await;
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
            waiting.retain(|(p, _)| *p != partition);
            if let Err(ApplyError::Waiting { at, .. }) = &result {
                waiting.push((partition, *at));
            }
        }
        match result {
            Ok(applied) => {
                for (end_lsn, reason) in &applied.dead_lettered {
                    tracing::error!(source = %self.source, %topic, partition, end_lsn = %end_lsn, %reason,
                        "change moved to meridian.dead_letters (meridian dead-letters list)");
                    self.telemetry.dead_letter(&self.source);
                }
                Ok(applied.watermark)
            }
            Err(e) => {
                match &e {
                    ApplyError::Schema(reason) => {
                        tracing::error!(source = %self.source, %topic, partition, %reason,
                            "destination schema does not fit; the partition waits")
                    }
                    ApplyError::Waiting { reason, .. } => {
                        tracing::warn!(source = %self.source, %topic, partition, %reason,
                            "record waits for another partition")
                    }
                    _ => {}
                }
                Err(LinkError::Store(e))
            }
        }
    }

    /// Sets a damaged record aside (its bytes only when `keep` is given)
    /// and moves the partition past it.
    async fn dead_letter(
        &self,
        applier: &mut Applier,
        (topic, partition, offset): (&str, i32, i64),
        position: Position,
        reason: &str,
        keep: Option<&Consumed>,
    ) -> Result<(), sqlx::Error> {
        let reason = format!("kafka record {topic}/{partition}@{offset}: {reason}");
        tracing::error!(source = %self.source, %reason, "record moved to meridian.dead_letters");
        self.telemetry.dead_letter(&self.source);
        self.telemetry
            .error(&self.source, &self.destination, "bad_record");
        let after = [RecordProgress {
            next_offset: offset + 1,
            position,
            commit_time: 0,
        }];
        let letter = Letter {
            end_lsn: position.lsn,
            reason: &reason,
            payload: keep.and_then(|r| r.value.as_deref()).unwrap_or_default(),
        };
        let at = Checkpoint::Partition {
            topic,
            partition,
            after: &after,
        };
        applier.dead_letter(letter, at).await.map(|_| ())
    }
}

/// A partition that applied nothing for this long while the broker holds
/// records for it counts as stalled.
const STALL_AFTER: Duration = Duration::from_secs(10);

/// One partition's progress, for [`KafkaInbound::watch_progress`].
struct Progress {
    next_offset: std::sync::atomic::AtomicI64,
    since: std::sync::Mutex<Instant>,
    /// A session consumes the partition (from its start until it fails).
    live: std::sync::atomic::AtomicBool,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            next_offset: std::sync::atomic::AtomicI64::new(0),
            since: std::sync::Mutex::new(Instant::now()),
            live: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The partition applied up to `next_offset` (or a session started
    /// there).
    fn moved(&self, next_offset: i64) {
        self.next_offset.store(next_offset, Ordering::Release);
        *self.since.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.live.store(true, Ordering::Release);
    }

    /// The partition's session ended (its error is shown instead).
    fn ended(&self) {
        self.live.store(false, Ordering::Release);
    }

    /// How long since the partition last moved.
    fn idle(&self) -> Duration {
        self.since
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .elapsed()
    }
}

/// Decoded records waiting to be applied, with the progress each brings.
#[derive(Default)]
struct Fresh {
    transactions: Vec<Transaction>,
    progress: Vec<RecordProgress>,
}

/// A consumed record, detached from the consumer's buffer.
struct Consumed {
    offset: i64,
    headers: Vec<(String, Vec<u8>)>,
    value: Option<Vec<u8>>,
}

impl Consumed {
    /// More records of this record's source transaction follow in its
    /// partition.
    fn more(&self) -> bool {
        self.headers
            .iter()
            .any(|(k, v)| k == record::MORE && v.as_slice() == b"1")
    }
}

fn detach(m: &rdkafka::message::BorrowedMessage<'_>) -> Consumed {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Consumed {
        offset: m.offset(),
        headers,
        value: m.payload().map(<[u8]>::to_vec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_topic_settings_that_can_lose_records() {
        let settings = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let safe = settings(&[
            ("cleanup.policy", "delete"),
            ("retention.bytes", "-1"),
            ("retention.ms", "604800000"),
            ("max.message.bytes", "16777216"),
            ("min.insync.replicas", "2"),
        ]);
        assert!(unsafe_settings(&safe, 3).is_empty());
        assert!(
            unsafe_settings(&[], 3).is_empty(),
            "nothing known, nothing said"
        );
        let bad = settings(&[
            ("cleanup.policy", "compact,delete"),
            ("retention.bytes", "1073741824"),
            ("retention.ms", "3600000"),
            ("max.message.bytes", "1048588"),
            ("min.insync.replicas", "1"),
        ]);
        let warnings = unsafe_settings(&bad, 3);
        assert_eq!(warnings.len(), 5, "{warnings:?}");
        for name in [
            "cleanup.policy",
            "retention.bytes",
            "retention.ms",
            "max.message.bytes",
            "min.insync.replicas",
        ] {
            assert!(
                warnings.iter().any(|w| w.starts_with(name)),
                "{name}: {warnings:?}"
            );
        }
        // one in-sync replica is all a single-broker cluster has
        assert_eq!(unsafe_settings(&bad, 1).len(), 4);
    }
}
