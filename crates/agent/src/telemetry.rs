//! What an agent knows about its links: the Prometheus metrics it exports
//! and the status its admin service reports.
//!
//! Metric names follow Prometheus conventions: a `meridian_` prefix, base
//! units in the name, `_total` on counters (added by the encoder). Labels
//! carry region, table, slot, rule and error-kind names, never row values.
//!
//! End-to-end lag is measured at the source with its heartbeats (see
//! [`crate::heartbeat`]): each heartbeat's WAL position and wall-clock time
//! are kept; a link's lag is the age of the oldest heartbeat its destination
//! has not acknowledged as applied (0 when it has applied them all). It grows
//! second by second while a link is down, also on an idle store, and covers
//! capture, transport and apply.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// End-to-end lag per link, seconds (source side).
pub const LINK_LAG_SECONDS: &str = "meridian_link_lag_seconds";
/// WAL bytes written at the source and not yet applied by the destination.
pub const LINK_LAG_BYTES: &str = "meridian_link_lag_bytes";
/// 1 for the link's current state (`connected`, `retrying`, `stopped`), else 0.
pub const LINK_STATE: &str = "meridian_link_state";
/// WAL the link's slot keeps on the source store, bytes.
pub const SLOT_RETAINED_BYTES: &str = "meridian_slot_retained_wal_bytes";
/// 1 while a walsender streams from the slot.
pub const SLOT_ACTIVE: &str = "meridian_slot_active";
pub const SLOT_ORPHANED: &str = "meridian_slot_orphaned";
pub const SLOT_SAFE_WAL_BYTES: &str = "meridian_slot_safe_wal_bytes";
pub const CHANGES_SHIPPED: &str = "meridian_changes_shipped";
pub const BYTES_SHIPPED: &str = "meridian_shipped_bytes";
pub const CHANGES_APPLIED: &str = "meridian_changes_applied";
pub const BYTES_APPLIED: &str = "meridian_applied_bytes";
/// Row changes per shipped batch.
pub const BATCH_CHANGES: &str = "meridian_batch_changes";
/// Time to apply one batch at the destination.
pub const APPLY_SECONDS: &str = "meridian_apply_duration_seconds";
pub const DEAD_LETTERS: &str = "meridian_dead_letters";
/// Dead letters from a source waiting in this store for an operator
/// (`meridian dead-letters list`), read from the store.
pub const DEAD_LETTERS_PENDING: &str = "meridian_dead_letters_pending";
/// Partitions (Kafka) or streams (gRPC) from a source that stopped on an
/// error at this destination and have not applied since.
pub const INBOUND_STALLED: &str = "meridian_inbound_stalled";
pub const ERRORS: &str = "meridian_errors";
pub const POLICY_CHANGES: &str = "meridian_policy_changes";
pub const POLICY_VERSION: &str = "meridian_policy_version";
/// Always 1; labels tell the agent's region and version.
pub const AGENT_INFO: &str = "meridian_agent_info";
/// Connections and calls refused for who they came from, by reason.
pub const REFUSED: &str = "meridian_refused";
/// Fingerprint of a file every region should share (`file`: topology or
/// policy): the first 48 bits of its sha256. Regions that differ drift.
pub const CONFIG_HASH: &str = "meridian_config_hash";

/// Every family the agent exports, with its OpenMetrics type. A family
/// shows in a scrape once it has a sample.
pub const FAMILIES: [(&str, &str); 22] = [
    (LINK_LAG_SECONDS, "gauge"),
    (LINK_LAG_BYTES, "gauge"),
    (LINK_STATE, "gauge"),
    (SLOT_RETAINED_BYTES, "gauge"),
    (SLOT_ACTIVE, "gauge"),
    (SLOT_ORPHANED, "gauge"),
    (SLOT_SAFE_WAL_BYTES, "gauge"),
    (CHANGES_SHIPPED, "counter"),
    (BYTES_SHIPPED, "counter"),
    (CHANGES_APPLIED, "counter"),
    (BYTES_APPLIED, "counter"),
    (BATCH_CHANGES, "histogram"),
    (APPLY_SECONDS, "histogram"),
    (DEAD_LETTERS, "counter"),
    (DEAD_LETTERS_PENDING, "gauge"),
    (INBOUND_STALLED, "gauge"),
    (ERRORS, "counter"),
    (REFUSED, "counter"),
    (POLICY_CHANGES, "counter"),
    (POLICY_VERSION, "gauge"),
    (AGENT_INFO, "gauge"),
    (CONFIG_HASH, "gauge"),
];

/// One direction between two regions.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct LinkLabels {
    pub source: String,
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    pub table: String,
    pub source: String,
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub source: String,
    pub destination: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub source: String,
    pub destination: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SlotLabels {
    pub slot: String,
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabels {
    pub table: String,
    pub rule: String,
    pub source: String,
    pub destination: String,
    pub verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    pub region: String,
}

/// A refusal's reason: one of a fixed set (`no_certificate`, `unknown_ca`,
/// `expired`, `wrong_region`, ...), never a value the peer sent.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InfoLabels {
    pub region: String,
    pub version: String,
}

type HistogramFamily = Family<LinkLabels, Histogram, fn() -> Histogram>;

/// Every metric family of the agent.
pub struct Metrics {
    pub lag_seconds: Family<LinkLabels, Gauge<f64, AtomicU64>>,
    pub lag_bytes: Family<LinkLabels, Gauge>,
    pub link_state: Family<StateLabels, Gauge>,
    pub slot_retained_bytes: Family<SlotLabels, Gauge>,
    pub slot_active: Family<SlotLabels, Gauge>,
    pub slot_orphaned: Family<SlotLabels, Gauge>,
    pub slot_safe_wal_bytes: Family<SlotLabels, Gauge>,
    pub changes_shipped: Family<TableLabels, Counter>,
    pub bytes_shipped: Family<LinkLabels, Counter>,
    pub changes_applied: Family<TableLabels, Counter>,
    pub bytes_applied: Family<LinkLabels, Counter>,
    pub batch_changes: HistogramFamily,
    pub apply_seconds: HistogramFamily,
    pub dead_letters: Family<LinkLabels, Counter>,
    pub dead_letters_pending: Family<LinkLabels, Gauge>,
    pub inbound_stalled: Family<LinkLabels, Gauge>,
    pub errors: Family<ErrorLabels, Counter>,
    pub refused: Family<RefusalLabels, Counter>,
    pub policy_changes: Family<PolicyLabels, Counter>,
    pub policy_version: Family<RegionLabels, Gauge>,
    pub info: Family<InfoLabels, Gauge>,
    pub config_hash: Family<ConfigLabels, Gauge>,
}

/// A shared file's kind: `topology` or `policy`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConfigLabels {
    pub region: String,
    pub file: &'static str,
}

/// A link's state, as metrics and status show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// A session is up: batches flow and are acknowledged.
    Connected,
    /// The last session failed; the link is backing off or reconnecting.
    Retrying,
    /// The agent is shutting down.
    Stopped,
}

impl LinkState {
    pub const ALL: [LinkState; 3] = [
        LinkState::Connected,
        LinkState::Retrying,
        LinkState::Stopped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LinkState::Connected => "connected",
            LinkState::Retrying => "retrying",
            LinkState::Stopped => "stopped",
        }
    }
}

/// The outbound side of one link, for status.
#[derive(Clone, Debug)]
pub struct LinkStatus {
    pub state: LinkState,
    /// When the link entered `state`.
    pub since: Instant,
    /// Why the last session ended (no row values), and when.
    pub last_error: Option<(String, Instant)>,
    /// Highest position the destination acknowledged as applied.
    pub acked_lsn: u64,
    pub lag_seconds: f64,
    pub lag_bytes: u64,
    pub changes_shipped: u64,
    pub bytes_shipped: u64,
    /// Changes shipped per table.
    pub tables: BTreeMap<String, u64>,
}

/// The inbound side from one source, for status.
#[derive(Clone, Debug, Default)]
pub struct InboundStatus {
    pub applied_lsn: u64,
    pub last_applied: Option<SystemTime>,
    pub changes_applied: u64,
    pub dead_letters: u64,
    /// Dead letters from this source waiting in the store (any agent run).
    pub dead_letters_pending: u64,
    /// Batches or records refused or re-filtered for the residency policy
    /// or the topology, since start.
    pub policy_violations: u64,
    /// Partitions (Kafka; `None` for the gRPC stream) that stopped on an
    /// error and have not applied since: the last error (no row values)
    /// and when the stall began.
    pub stalled: BTreeMap<Option<i32>, (String, Instant)>,
}

/// One replication slot of this region's store.
#[derive(Clone, Debug)]
pub struct SlotStatus {
    pub name: String,
    pub destination: String,
    pub active: bool,
    /// PostgreSQL's `wal_status`: reserved, extended, unreserved or lost.
    pub wal_status: String,
    pub retained_bytes: u64,
    /// No link of the topology uses it.
    pub orphaned: bool,
    /// WAL the source may still write before the slot is invalidated; None
    /// when `max_slot_wal_keep_size` is unlimited.
    pub safe_wal_bytes: Option<i64>,
}

/// Metrics and status of one agent; shared by every task.
pub struct Telemetry {
    pub region: String,
    pub started: Instant,
    pub metrics: Metrics,
    registry: Registry,
    links: Mutex<BTreeMap<String, LinkStatus>>,
    inbound: Mutex<BTreeMap<String, InboundStatus>>,
    slots: Mutex<Vec<SlotStatus>>,
    heartbeats: Mutex<VecDeque<(u64, SystemTime)>>,
    /// Each link's acknowledged position, by destination.
    acked: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    /// What the health endpoints answer.
    pub health: crate::health::Health,
}

/// Heartbeats kept for lag (at one a second, a little over a day).
const MAX_HEARTBEATS: usize = 100_000;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Telemetry {
    pub fn new(region: &str, peers: &[String]) -> Telemetry {
        let metrics = Metrics {
            lag_seconds: Family::default(),
            lag_bytes: Family::default(),
            link_state: Family::default(),
            slot_retained_bytes: Family::default(),
            slot_active: Family::default(),
            slot_orphaned: Family::default(),
            slot_safe_wal_bytes: Family::default(),
            changes_shipped: Family::default(),
            bytes_shipped: Family::default(),
            changes_applied: Family::default(),
            bytes_applied: Family::default(),
            batch_changes: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1.0, 4.0, 10))
            }),
            apply_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.5, 12))
            }),
            dead_letters: Family::default(),
            dead_letters_pending: Family::default(),
            inbound_stalled: Family::default(),
            errors: Family::default(),
            refused: Family::default(),
            policy_changes: Family::default(),
            policy_version: Family::default(),
            config_hash: Family::default(),
            info: Family::default(),
        };
        let mut registry = Registry::default();
        let m = &metrics;
        let r = &mut registry;
        r.register(LINK_LAG_SECONDS, "End-to-end lag of the link: age of the oldest source heartbeat the destination has not applied.", m.lag_seconds.clone());
        r.register(
            LINK_LAG_BYTES,
            "WAL bytes written at the source that the destination has not applied.",
            m.lag_bytes.clone(),
        );
        r.register(
            LINK_STATE,
            "1 for the link's current state (connected, retrying, stopped), 0 for the others.",
            m.link_state.clone(),
        );
        r.register(
            SLOT_RETAINED_BYTES,
            "WAL the link's replication slot keeps on the source store.",
            m.slot_retained_bytes.clone(),
        );
        r.register(
            SLOT_ACTIVE,
            "1 while the slot is being streamed from.",
            m.slot_active.clone(),
        );
        r.register(
            SLOT_ORPHANED,
            "1 for a Meridian slot no link uses (drop it with `meridian slots prune`).",
            m.slot_orphaned.clone(),
        );
        r.register(
            SLOT_SAFE_WAL_BYTES,
            "WAL the source may still write before the slot is invalidated (max_slot_wal_keep_size); absent when unlimited.",
            m.slot_safe_wal_bytes.clone(),
        );
        r.register(
            CHANGES_SHIPPED,
            "Row changes shipped to the destination, after the residency policy.",
            m.changes_shipped.clone(),
        );
        r.register(
            BYTES_SHIPPED,
            "Encoded batch bytes shipped to the destination.",
            m.bytes_shipped.clone(),
        );
        r.register(
            CHANGES_APPLIED,
            "Row changes from the source applied in this region's store.",
            m.changes_applied.clone(),
        );
        r.register(
            BYTES_APPLIED,
            "Encoded batch bytes from the source applied in this region's store.",
            m.bytes_applied.clone(),
        );
        r.register(
            BATCH_CHANGES,
            "Row changes per shipped batch.",
            m.batch_changes.clone(),
        );
        r.register(
            APPLY_SECONDS,
            "Time to apply one batch in this region's store.",
            m.apply_seconds.clone(),
        );
        r.register(
            DEAD_LETTERS,
            "Transactions or batches moved to meridian.dead_letters.",
            m.dead_letters.clone(),
        );
        r.register(
            DEAD_LETTERS_PENDING,
            "Dead letters from the source waiting in this region's store for replay or discard.",
            m.dead_letters_pending.clone(),
        );
        r.register(
            INBOUND_STALLED,
            "Partitions (Kafka) or streams (gRPC) from the source that stopped on an error in this region and have not applied since.",
            m.inbound_stalled.clone(),
        );
        r.register(ERRORS, "Errors by kind: connect, peer, refused, closed, protocol, capture, lifecycle, too_large, blocked, waiting (links); crc_mismatch, unproven (a seal or WAL end that does not hold), policy_violation, undecodable, store_unavailable (receiver); schema, version, kafka, bad_record, not_in_topology (both); heartbeat, monitor (source store).", m.errors.clone());
        r.register(
            REFUSED,
            "Connections and calls refused for who they came from: no_certificate, unknown_ca, expired, bad_certificate, not_tls, handshake, timeout, no_identity, too_many_handshakes, too_many_from_address, too_many_connections, too_many_from_identity (at the TLS handshake); wrong_region, not_a_region, not_an_operator (at the call).",
            m.refused.clone(),
        );
        r.register(
            POLICY_CHANGES,
            "Row changes the residency policy passed, transformed or blocked.",
            m.policy_changes.clone(),
        );
        r.register(
            POLICY_VERSION,
            "Version of the residency policy in force (0: none).",
            m.policy_version.clone(),
        );
        r.register(
            CONFIG_HASH,
            "Fingerprint (first 48 bits of the sha256) of the topology and policy files in force; regions whose values differ have drifted.",
            m.config_hash.clone(),
        );
        r.register(
            AGENT_INFO,
            "The agent's region and version.",
            m.info.clone(),
        );
        metrics
            .info
            .get_or_create(&InfoLabels {
                region: region.to_owned(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        let telemetry = Telemetry {
            region: region.to_owned(),
            started: Instant::now(),
            metrics,
            registry,
            links: Mutex::default(),
            inbound: Mutex::default(),
            slots: Mutex::default(),
            heartbeats: Mutex::default(),
            acked: Mutex::default(),
            health: Default::default(),
        };
        for peer in peers {
            telemetry.set_link_state(peer, LinkState::Retrying, None);
        }
        telemetry
    }

    /// The OpenMetrics text of every metric, lag as of now.
    pub fn encode(&self) -> String {
        self.refresh_lag(SystemTime::now());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    pub fn link(&self, destination: &str) -> LinkLabels {
        LinkLabels {
            source: self.region.clone(),
            destination: destination.to_owned(),
        }
    }

    pub fn inbound_link(&self, source: &str) -> LinkLabels {
        LinkLabels {
            source: source.to_owned(),
            destination: self.region.clone(),
        }
    }

    /// Records a link's state; an error says why a session ended.
    pub fn set_link_state(&self, destination: &str, state: LinkState, error: Option<String>) {
        for s in LinkState::ALL {
            self.metrics
                .link_state
                .get_or_create(&StateLabels {
                    source: self.region.clone(),
                    destination: destination.to_owned(),
                    state: s.name().to_owned(),
                })
                .set(i64::from(s == state));
        }
        let mut links = lock(&self.links);
        let link = links
            .entry(destination.to_owned())
            .or_insert_with(|| LinkStatus {
                state,
                since: Instant::now(),
                last_error: None,
                acked_lsn: 0,
                lag_seconds: 0.0,
                lag_bytes: 0,
                changes_shipped: 0,
                bytes_shipped: 0,
                tables: BTreeMap::new(),
            });
        if link.state != state {
            link.state = state;
            link.since = Instant::now();
        }
        if let Some(error) = error {
            link.last_error = Some((error, Instant::now()));
        }
    }

    /// Counts an error of `kind` on the link `source -> destination`.
    pub fn error(&self, source: &str, destination: &str, kind: &str) {
        if destination == self.region
            && matches!(
                kind,
                "policy_violation" | "policy_refiltered" | "not_in_topology"
            )
        {
            lock(&self.inbound)
                .entry(source.to_owned())
                .or_default()
                .policy_violations += 1;
        }
        self.metrics
            .errors
            .get_or_create(&ErrorLabels {
                source: source.to_owned(),
                destination: destination.to_owned(),
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Counts a connection or call refused for `reason` (see [`REFUSED`]).
    pub fn refused(&self, reason: &'static str) {
        self.metrics
            .refused
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    /// Counts a shipped batch: `tables` are (table, changes) after the policy.
    pub fn shipped(&self, destination: &str, tables: &[(String, u64)], bytes: usize) {
        let link = self.link(destination);
        let changes: u64 = tables.iter().map(|(_, n)| n).sum();
        for (table, n) in tables {
            self.metrics
                .changes_shipped
                .get_or_create(&TableLabels {
                    table: table.clone(),
                    source: link.source.clone(),
                    destination: link.destination.clone(),
                })
                .inc_by(*n);
        }
        self.metrics
            .bytes_shipped
            .get_or_create(&link)
            .inc_by(bytes as u64);
        self.metrics
            .batch_changes
            .get_or_create(&link)
            .observe(changes as f64);
        if let Some(status) = lock(&self.links).get_mut(destination) {
            status.changes_shipped += changes;
            status.bytes_shipped += bytes as u64;
            for (table, n) in tables {
                *status.tables.entry(table.clone()).or_default() += n;
            }
        }
    }

    /// Counts an applied batch from `source`.
    pub fn applied(
        &self,
        source: &str,
        tables: &[(String, u64)],
        bytes: usize,
        took: Duration,
        watermark: u64,
    ) {
        let link = self.inbound_link(source);
        for (table, n) in tables {
            self.metrics
                .changes_applied
                .get_or_create(&TableLabels {
                    table: table.clone(),
                    source: link.source.clone(),
                    destination: link.destination.clone(),
                })
                .inc_by(*n);
        }
        self.metrics
            .bytes_applied
            .get_or_create(&link)
            .inc_by(bytes as u64);
        self.metrics
            .apply_seconds
            .get_or_create(&link)
            .observe(took.as_secs_f64());
        let mut inbound = lock(&self.inbound);
        let status = inbound.entry(source.to_owned()).or_default();
        status.applied_lsn = status.applied_lsn.max(watermark);
        status.last_applied = Some(SystemTime::now());
        status.changes_applied += tables.iter().map(|(_, n)| n).sum::<u64>();
    }

    /// A partition (or the gRPC stream, `None`) from `source` stopped on
    /// `error`; it counts as stalled until [`Telemetry::inbound_moving`].
    pub fn inbound_stalled(&self, source: &str, partition: Option<i32>, error: String) {
        let mut inbound = lock(&self.inbound);
        let status = inbound.entry(source.to_owned()).or_default();
        let since = status
            .stalled
            .get(&partition)
            .map_or_else(Instant::now, |(_, since)| *since);
        status.stalled.insert(partition, (error, since));
        self.metrics
            .inbound_stalled
            .get_or_create(&self.inbound_link(source))
            .set(status.stalled.len() as i64);
    }

    /// A partition (or the gRPC stream) from `source` applied again.
    pub fn inbound_moving(&self, source: &str, partition: Option<i32>) {
        let mut inbound = lock(&self.inbound);
        let status = inbound.entry(source.to_owned()).or_default();
        if status.stalled.remove(&partition).is_some() || status.stalled.is_empty() {
            self.metrics
                .inbound_stalled
                .get_or_create(&self.inbound_link(source))
                .set(status.stalled.len() as i64);
        }
    }

    /// Counts a dead letter from `source`.
    pub fn dead_letter(&self, source: &str) {
        self.metrics
            .dead_letters
            .get_or_create(&self.inbound_link(source))
            .inc();
        lock(&self.inbound)
            .entry(source.to_owned())
            .or_default()
            .dead_letters += 1;
    }

    /// Sets the dead letters from each source waiting in this store (sources
    /// absent from `pending` have none).
    pub fn set_pending_dead_letters(&self, sources: &[String], pending: &[(String, i64)]) {
        let mut inbound = lock(&self.inbound);
        for source in sources {
            let n = pending
                .iter()
                .find(|(s, _)| s == source)
                .map_or(0, |(_, n)| (*n).max(0));
            self.metrics
                .dead_letters_pending
                .get_or_create(&self.inbound_link(source))
                .set(n);
            inbound
                .entry(source.clone())
                .or_default()
                .dead_letters_pending = n as u64;
        }
    }

    /// Records a heartbeat written at `lsn` at `at`.
    pub fn heartbeat(&self, lsn: u64, at: SystemTime) {
        let mut beats = lock(&self.heartbeats);
        beats.push_back((lsn, at));
        while beats.len() > MAX_HEARTBEATS {
            beats.pop_front();
        }
    }

    /// Follows a link's acknowledged position (the link raises it on every
    /// acknowledgement) for lag.
    pub fn watch_link(&self, destination: &str, acked: Arc<AtomicU64>) {
        lock(&self.acked).insert(destination.to_owned(), acked);
    }

    /// Recomputes every link's lag in seconds, as of `now`.
    fn refresh_lag(&self, now: SystemTime) {
        let beats = lock(&self.heartbeats);
        let acked = lock(&self.acked);
        let mut links = lock(&self.links);
        for (destination, position) in acked.iter() {
            let position = position.load(Ordering::Acquire);
            let lag = lag_seconds(&beats, position, now);
            self.metrics
                .lag_seconds
                .get_or_create(&self.link(destination))
                .set(lag);
            if let Some(status) = links.get_mut(destination) {
                status.acked_lsn = position;
                status.lag_seconds = lag;
            }
        }
    }

    /// Updates a link's lag in bytes against the source's WAL end, and
    /// forgets heartbeats every link has applied.
    pub fn update_link(&self, destination: &str, current_lsn: u64) {
        let (position, everyone) = {
            let acked = lock(&self.acked);
            let position = acked
                .get(destination)
                .map_or(0, |a| a.load(Ordering::Acquire));
            let everyone = acked
                .values()
                .map(|a| a.load(Ordering::Acquire))
                .min()
                .unwrap_or(0);
            (position, everyone)
        };
        let lag_bytes = current_lsn.saturating_sub(position);
        self.metrics
            .lag_bytes
            .get_or_create(&self.link(destination))
            .set(lag_bytes as i64);
        if let Some(status) = lock(&self.links).get_mut(destination) {
            status.lag_bytes = lag_bytes;
        }
        let mut beats = lock(&self.heartbeats);
        // keep the newest applied one: the next unapplied one follows it
        while beats.len() > 1 && beats[1].0 < everyone {
            beats.pop_front();
        }
    }

    /// Replaces the slots' status and metrics.
    /// Sets the fingerprint of a shared file (`topology` or `policy`) from
    /// its sha256 (hex; empty: none).
    pub fn set_config_hash(&self, file: &'static str, sha256: &str) {
        self.metrics
            .config_hash
            .get_or_create(&ConfigLabels {
                region: self.region.clone(),
                file,
            })
            .set(meridian_core::digest::gauge_value(sha256));
    }

    pub fn set_slots(&self, slots: Vec<SlotStatus>) {
        for s in &slots {
            let labels = SlotLabels {
                slot: s.name.clone(),
                destination: s.destination.clone(),
            };
            self.metrics
                .slot_retained_bytes
                .get_or_create(&labels)
                .set(s.retained_bytes as i64);
            self.metrics
                .slot_active
                .get_or_create(&labels)
                .set(i64::from(s.active));
            self.metrics
                .slot_orphaned
                .get_or_create(&labels)
                .set(i64::from(s.orphaned));
            if let Some(safe) = s.safe_wal_bytes {
                self.metrics
                    .slot_safe_wal_bytes
                    .get_or_create(&labels)
                    .set(safe);
            }
        }
        *lock(&self.slots) = slots;
    }

    /// Every outbound link's status, lag as of now.
    pub fn links(&self) -> BTreeMap<String, LinkStatus> {
        self.refresh_lag(SystemTime::now());
        lock(&self.links).clone()
    }

    pub fn inbound(&self) -> BTreeMap<String, InboundStatus> {
        lock(&self.inbound).clone()
    }

    pub fn slots(&self) -> Vec<SlotStatus> {
        lock(&self.slots).clone()
    }
}

/// (table, row changes) in a batch, for metrics.
pub fn changes_per_table(batch: &[meridian_core::Transaction]) -> Vec<(String, u64)> {
    let mut counts: Vec<(*const meridian_core::Table, String, u64)> = Vec::new();
    for change in batch.iter().flat_map(|t| &t.changes) {
        let table = Arc::as_ptr(&change.table);
        match counts.iter_mut().find(|(t, _, _)| *t == table) {
            Some((_, _, n)) => *n += 1,
            None => counts.push((
                table,
                format!("{}.{}", change.table.schema, change.table.name),
                1,
            )),
        }
    }
    let mut named: Vec<(String, u64)> = Vec::new();
    for (_, name, n) in counts {
        match named.iter_mut().find(|(t, _)| *t == name) {
            Some((_, total)) => *total += n,
            None => named.push((name, n)),
        }
    }
    named
}

/// Age of the oldest heartbeat at a position the destination has not
/// applied (`acked` is the end of the last applied transaction, past its
/// heartbeat message); 0 when it applied them all.
pub fn lag_seconds(heartbeats: &VecDeque<(u64, SystemTime)>, acked: u64, now: SystemTime) -> f64 {
    heartbeats
        .iter()
        .find(|(lsn, _)| *lsn >= acked)
        .map_or(0.0, |(_, at)| {
            now.duration_since(*at).unwrap_or_default().as_secs_f64()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_family_is_listed_with_its_type() {
        let t = Telemetry::new("eu", &["na".to_owned()]);
        // one sample in each family
        t.shipped("na", &[("public.t".to_owned(), 1)], 1);
        t.applied("na", &[("public.t".to_owned(), 1)], 1, Duration::ZERO, 1);
        t.dead_letter("na");
        t.error("eu", "na", "connect");
        t.watch_link("na", Arc::default());
        t.update_link("na", 0);
        t.set_pending_dead_letters(&["na".into()], &[]);
        t.inbound_stalled("na", Some(0), "waiting".into());
        t.set_slots(vec![SlotStatus {
            name: "s".into(),
            destination: "na".into(),
            active: true,
            wal_status: "reserved".into(),
            retained_bytes: 0,
            orphaned: false,
            safe_wal_bytes: Some(1 << 30),
        }]);
        t.metrics
            .policy_changes
            .get_or_create(&PolicyLabels {
                table: "public.t".into(),
                rule: "-".into(),
                source: "eu".into(),
                destination: "na".into(),
                verdict: "passed".into(),
            })
            .inc();
        t.metrics
            .policy_version
            .get_or_create(&RegionLabels {
                region: "eu".into(),
            })
            .set(1);
        t.refused("no_certificate");
        t.set_config_hash("policy", &"ab".repeat(32));
        let text = t.encode();
        let mut typed: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(str::to_owned)
            .collect();
        typed.sort();
        let mut listed: Vec<String> = FAMILIES.iter().map(|(n, k)| format!("{n} {k}")).collect();
        listed.sort();
        assert_eq!(typed, listed);
    }

    #[test]
    fn lag_is_the_age_of_the_oldest_unapplied_heartbeat() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let beats: VecDeque<(u64, SystemTime)> = (0..10)
            .map(|i| (100 + 10 * i, t0 + Duration::from_secs(i)))
            .collect();
        let now = t0 + Duration::from_secs(10);
        // nothing applied: the first heartbeat is 10 s old
        assert_eq!(lag_seconds(&beats, 0, now), 10.0);
        // applied past the heartbeat at 130 (written at t0+3): next is t0+4
        assert_eq!(lag_seconds(&beats, 131, now), 6.0);
        // everything applied
        assert_eq!(lag_seconds(&beats, 191, now), 0.0);
        assert_eq!(lag_seconds(&VecDeque::new(), 0, now), 0.0);
    }

    #[test]
    fn metrics_follow_prometheus_naming_and_carry_no_values() {
        let t = Telemetry::new("eu", &["na".to_owned()]);
        t.shipped("na", &[("public.orders".to_owned(), 3)], 120);
        t.applied(
            "na",
            &[("public.orders".to_owned(), 2)],
            80,
            Duration::from_millis(3),
            500,
        );
        t.heartbeat(100, SystemTime::now() - Duration::from_secs(5));
        t.watch_link("na", Arc::new(AtomicU64::new(50)));
        t.update_link("na", 700);
        let text = t.encode();
        for expected in [
            r#"meridian_changes_shipped_total{table="public.orders",source="eu",destination="na"} 3"#,
            r#"meridian_applied_bytes_total{source="na",destination="eu"} 80"#,
            r#"meridian_link_state{source="eu",destination="na",state="retrying"} 1"#,
            r#"meridian_link_lag_bytes{source="eu",destination="na"} 650"#,
            r#"meridian_agent_info{region="eu",version=""#,
            "meridian_apply_duration_seconds_bucket{",
            "# TYPE meridian_batch_changes histogram",
        ] {
            assert!(text.contains(expected), "{expected}\n{text}");
        }
        let lag = text
            .lines()
            .find(|l| l.starts_with("meridian_link_lag_seconds{"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .expect("lag line");
        assert!((5.0..6.0).contains(&lag), "{lag}");
    }
}
