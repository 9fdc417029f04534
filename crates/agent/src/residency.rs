//! Loading the residency policy named by the topology, and swapping it on
//! reload. Links and the receiver read the current policy per batch.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use meridian_core::topology::{TableSpec, Topology};
use meridian_policy::evaluate::Counts;
use meridian_policy::fit::StoreColumn;
use meridian_policy::{Enforcer, Policy, Verdict};
use sqlx::PgPool;

use crate::telemetry::{PolicyLabels, Telemetry};

/// Environment variable holding the HMAC key for `hash` actions.
pub const HASH_KEY_ENV: &str = "MERIDIAN_POLICY_HASH_KEY";

/// The policy in force (`None`: no policy file, everything crosses).
pub type SharedPolicy = Arc<RwLock<Option<Arc<Enforcer>>>>;

/// The current policy.
pub fn current(shared: &SharedPolicy) -> Option<Arc<Enforcer>> {
    shared.read().expect("policy lock").clone()
}

/// The replicated tables' columns as this region's store has them (read at
/// agent start), to check the policy's column actions against.
pub type StoreColumns = Arc<Vec<(String, Vec<StoreColumn>)>>;

/// Reads the replicated tables' columns from the store.
pub async fn store_columns(
    pool: &PgPool,
    tables: &[TableSpec],
) -> Result<StoreColumns, sqlx::Error> {
    let mut conn = pool.acquire().await?;
    let mut out = Vec::new();
    for t in tables {
        let (schema, name) = t.split_name();
        let shape = meridian_apply::statements::load_shape(&mut conn, schema, name).await?;
        let mut columns: Vec<StoreColumn> = shape
            .columns
            .into_iter()
            .map(|(name, c)| StoreColumn {
                name,
                ty: c.ty,
                not_null: c.not_null,
                has_default: c.has_default,
            })
            .collect();
        columns.sort_by(|a, b| a.name.cmp(&b.name));
        out.push((t.name.clone(), columns));
    }
    Ok(Arc::new(out))
}

/// Reads and validates the topology's policy file, if it names one, also
/// against the store's `columns` (a column action the destination could not
/// write is refused). The error lists every problem, with file:line:column
/// where the file is at fault.
pub fn load(topology: &Topology, columns: &StoreColumns) -> anyhow::Result<Option<Enforcer>> {
    let Some(path) = &topology.policy else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read policy file {path}"))?;
    let hash_key = std::env::var(HASH_KEY_ENV).ok().filter(|k| !k.is_empty());
    let policy = parse(topology, &text, path, hash_key.is_some())?;
    let misfits = meridian_policy::fit::check(&policy, columns);
    if !misfits.is_empty() {
        anyhow::bail!(
            "residency policy {path} does not fit the store's columns:\n{}",
            misfits.join("\n")
        );
    }
    let homes: Vec<(String, String)> = topology
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.home_column.clone()))
        .collect();
    Ok(Some(
        Enforcer::new(policy, hash_key.map(String::into_bytes), &homes).with_source(&text),
    ))
}

/// Kafka topics are data at rest in their cluster's region. Under a
/// residency policy, a link's topic must rest in the link's source or
/// destination region: a third region would hold what the policy lets reach
/// only the destination. Returns the links refused for that, and warnings
/// for topics on a cluster whose region is not declared. Without a policy
/// every row may go anywhere, so nothing is refused.
pub fn topics_at_rest(topology: &Topology, has_policy: bool) -> (Vec<String>, Vec<String>) {
    let (mut refused, mut warnings) = (Vec::new(), Vec::new());
    if !has_policy {
        return (refused, warnings);
    }
    for source in topology.regions.keys() {
        for destination in topology.regions.keys().filter(|d| *d != source) {
            if topology.transport(source, destination) != meridian_core::topology::Transport::Kafka
            {
                continue;
            }
            let Ok(site) = topology.kafka_site(source, destination) else {
                continue; // the topology's own check reports it
            };
            match site.region {
                Some(r) if r == *source || r == *destination => {}
                Some(r) => refused.push(format!(
                    "the Kafka link {source} -> {destination} keeps its topic on the cluster in \
                     {r}, a region the link's data may not rest in (the residency policy lets it \
                     reach {destination} only); carry it on the cluster of {source} or \
                     {destination} (cluster = \"{destination}\" in its [[links]] entry)"
                )),
                None => warnings.push(format!(
                    "the Kafka link {source} -> {destination} keeps its topic on a cluster whose \
                     region is not declared, so residency at rest cannot be checked; set \
                     [kafka] region, or use [kafka.clusters.<region>]"
                )),
            }
        }
    }
    (refused, warnings)
}

/// Parses a policy against a topology's regions and tables.
pub fn parse(
    topology: &Topology,
    text: &str,
    file: &str,
    has_hash_key: bool,
) -> anyhow::Result<Policy> {
    Policy::parse_for(topology, text, file, has_hash_key).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(|d| d.to_string()).collect();
        anyhow::anyhow!("invalid residency policy:\n{}", lines.join("\n"))
    })
}

/// Re-reads the policy file and puts it in force; returns its version (0:
/// no policy). An invalid file is refused and the policy in force stays.
pub fn reload(
    topology: &Topology,
    columns: &StoreColumns,
    shared: &SharedPolicy,
) -> anyhow::Result<u64> {
    match load(topology, columns) {
        Ok(policy) => {
            let version = policy.as_ref().map_or(0, |p| p.version());
            *shared.write().expect("policy lock") = policy.map(Arc::new);
            tracing::info!(version, "residency policy reloaded");
            Ok(version)
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "policy reload refused; the previous policy stays in force");
            Err(e)
        }
    }
}

/// Reloads and copy queueing run one at a time (SIGHUP and `Admin`).
static RELOADING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Reloads the policy, then queues a copy (initial sync) of every route
/// from `region` whose rules changed ([`queue_policy_changes`]).
pub async fn reload_and_copy(
    topology: &Topology,
    columns: &StoreColumns,
    shared: &SharedPolicy,
    pool: &sqlx::PgPool,
    region: &str,
) -> anyhow::Result<u64> {
    let _one = RELOADING.lock().await;
    let version = reload(topology, columns, shared)?;
    queue_changes(pool, topology, region, current(shared).as_deref())
        .await
        .with_context(|| {
            format!(
                "policy version {version} is in force, but the copies it calls for were not \
                 queued; they are at the next reload or agent start"
            )
        })?;
    Ok(version)
}

/// Compares `policy` (in force) with the policy the copies were last
/// queued for (`meridian.sync_policy`), and queues a copy of every route
/// from `region` whose rules changed ([`meridian_policy::diff`]): rows and
/// values newly allowed arrive, rows still sent are rewritten in their new
/// form. Rows no longer sent are named in the log; they stay at the
/// destination until deleted there. The copies and the record of `policy`
/// commit together, so a failure is retried at the next reload or start.
pub async fn queue_policy_changes(
    pool: &sqlx::PgPool,
    topology: &Topology,
    region: &str,
    policy: Option<&Enforcer>,
) -> anyhow::Result<()> {
    let _one = RELOADING.lock().await;
    queue_changes(pool, topology, region, policy).await
}

/// [`queue_policy_changes`], with [`RELOADING`] held.
async fn queue_changes(
    pool: &sqlx::PgPool,
    topology: &Topology,
    region: &str,
    policy: Option<&Enforcer>,
) -> anyhow::Result<()> {
    let text = policy.map(|p| p.source().to_owned());
    let regions: Vec<String> = topology.regions.keys().cloned().collect();
    let tables: Vec<String> = topology.tables.iter().map(|t| t.name.clone()).collect();
    let mut tx = pool.begin().await?;
    // the migration made the row: it is locked even on a first start
    let (recorded, before): (bool, Option<String>) =
        sqlx::query_as("SELECT recorded, policy FROM meridian.sync_policy FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
    let changes = match (recorded, before) {
        // the first policy this store knows: new links copy what it allows
        (false, _) => Vec::new(),
        (true, before) if before == text => Vec::new(),
        (true, None) => {
            meridian_policy::diff::diff(None, policy.map(Enforcer::policy), &regions, &tables)
        }
        (true, Some(before)) => match parse(topology, &before, "the previous policy", true) {
            Ok(before) => meridian_policy::diff::diff(
                Some(&before),
                policy.map(Enforcer::policy),
                &regions,
                &tables,
            ),
            // a previous policy that no longer fits the topology: every
            // route may differ, every one is copied again
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"),
                    "the previous policy no longer parses; every route is copied again");
                every_route(&regions, &tables)
            }
        },
    };
    let mut by_destination: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for c in changes.iter().filter(|c| c.source == region) {
        tracing::info!(table = %c.table, destination = %c.destination,
            widened = %c.widened.join("; "), tightened = %c.tightened.join("; "),
            changed = %c.changed.join("; "),
            "policy change: the route is copied again under the new policy");
        if c.rows_no_longer_sent {
            tracing::warn!(table = %c.table, destination = %c.destination,
                "policy change: rows the new policy no longer sends stay at the destination \
                 until deleted there");
        }
        by_destination
            .entry(&c.destination)
            .or_default()
            .push(c.table.clone());
    }
    let reason = format!("policy version {}", policy.map_or(0, |p| p.version()));
    for (destination, tables) in by_destination {
        // a copy still waiting to start runs under this policy anyway
        let waiting: Vec<String> = sqlx::query_scalar(
            "SELECT table_name FROM meridian.sync_tables
              WHERE destination = $1 AND state = 'waiting'",
        )
        .bind(destination)
        .fetch_all(&mut *tx)
        .await?;
        let tables: Vec<String> = tables
            .into_iter()
            .filter(|t| !waiting.contains(t))
            .collect();
        crate::sync::request(&mut *tx, destination, &tables, &reason).await?;
    }
    sqlx::query("UPDATE meridian.sync_policy SET recorded = true, policy = $1, updated_at = now()")
        .bind(&text)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Every route between `regions` of `tables`, changed in a way not known.
fn every_route(regions: &[String], tables: &[String]) -> Vec<meridian_policy::diff::RouteChange> {
    let mut routes = Vec::new();
    for table in tables {
        for source in regions {
            for destination in regions.iter().filter(|d| *d != source) {
                routes.push(meridian_policy::diff::RouteChange {
                    table: table.clone(),
                    source: source.clone(),
                    destination: destination.clone(),
                    widened: Vec::new(),
                    tightened: Vec::new(),
                    changed: vec!["the previous policy no longer parses".into()],
                    rows_no_longer_sent: true,
                });
            }
        }
    }
    routes
}

/// Reloads the policy on SIGHUP ([`reload_and_copy`]).
pub fn reload_on_hangup(
    topology: Topology,
    columns: StoreColumns,
    shared: SharedPolicy,
    pool: sqlx::PgPool,
    region: String,
) {
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangup.recv().await.is_some() {
            if let Err(e) = reload_and_copy(&topology, &columns, &shared, &pool, &region).await {
                tracing::error!(error = %format!("{e:#}"), "policy reload");
            }
        }
    });
}

/// The verdict as stored and exported.
pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Passed => "passed",
        Verdict::Transformed => "transformed",
        Verdict::Blocked => "blocked",
    }
}

/// Audit counts of what the policy passed, transformed and blocked, per
/// (table, rule, destination, verdict), accumulated by the links and written
/// to `meridian.residency_audit` in this region's store by [`Audit::run`].
pub struct Audit {
    pending: std::sync::Mutex<HashMap<AuditKey, u64>>,
    telemetry: Arc<Telemetry>,
}

/// (table, rule, destination, verdict).
type AuditKey = (String, String, String, Verdict);

impl Audit {
    /// Counts go to the store (flushed by [`Audit::run`]) and to metrics.
    pub fn new(telemetry: Arc<Telemetry>) -> Audit {
        Audit {
            pending: Default::default(),
            telemetry,
        }
    }

    /// Adds one filtering's counts for `destination`.
    pub fn record(&self, destination: &str, counts: Counts) {
        let mut pending = self.pending.lock().expect("audit lock");
        for ((table, rule, verdict), n) in counts {
            self.telemetry
                .metrics
                .policy_changes
                .get_or_create(&PolicyLabels {
                    table: table.clone(),
                    rule: rule.clone(),
                    source: self.telemetry.region.clone(),
                    destination: destination.to_owned(),
                    verdict: verdict_name(verdict).to_owned(),
                })
                .inc_by(n);
            *pending
                .entry((table, rule, destination.to_owned(), verdict))
                .or_default() += n;
        }
    }

    /// Flushes the counts every `every` until shutdown (and once more then).
    pub async fn run(
        self: Arc<Self>,
        pool: PgPool,
        source: String,
        every: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let stop = tokio::select! {
                _ = tokio::time::sleep(every) => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            let batch: Vec<_> = self.pending.lock().expect("audit lock").drain().collect();
            for (key, n) in batch {
                let (table, rule, destination, verdict) = &key;
                let written = sqlx::query(
                    "INSERT INTO meridian.residency_audit
                       (table_name, rule, source_region, destination_region, verdict, changes)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (table_name, rule, source_region, destination_region, verdict)
                     DO UPDATE SET changes = meridian.residency_audit.changes + EXCLUDED.changes, updated_at = now()",
                )
                .bind(table)
                .bind(rule)
                .bind(&source)
                .bind(destination)
                .bind(verdict_name(*verdict))
                .bind(n as i64)
                .execute(&pool)
                .await;
                if let Err(e) = written {
                    tracing::warn!(error = %e, "cannot write residency audit counts; keeping them for the next flush");
                    *self
                        .pending
                        .lock()
                        .expect("audit lock")
                        .entry(key)
                        .or_default() += n;
                }
            }
            if stop {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topology(kafka: &str) -> Topology {
        let mut text =
            String::from("[replication]\ntransport = \"kafka\"\n[security]\nplaintext = true\n");
        for (i, region) in ["na", "eu", "apac"].iter().enumerate() {
            text.push_str(&format!(
                "[regions.{region}]\nstore = \"postgres://127.0.0.1:{0}/app\"\nlisten = \"127.0.0.1:{0}\"\n",
                7400 + i
            ));
        }
        text.push_str(
            "[[tables]]\nname = \"public.orders\"\nprimary_key = [\"id\"]\nhome_column = \"region\"\n",
        );
        text.push_str(kafka);
        Topology::parse(&text, "t.toml").unwrap()
    }

    /// A topic may rest in its link's source or destination region only;
    /// a third region is refused under a policy, and an undeclared one is a
    /// warning.
    #[test]
    fn a_topic_rests_only_where_its_link_may_hold_data() {
        let regional = "[kafka.clusters.na]\nbrokers = \"na:9092\"\n\
                        [kafka.clusters.eu]\nbrokers = \"eu:9092\"\n\
                        [kafka.clusters.apac]\nbrokers = \"apac:9092\"\n";
        let (refused, warnings) = topics_at_rest(&topology(regional), true);
        assert!(
            refused.is_empty() && warnings.is_empty(),
            "{refused:?} {warnings:?}"
        );

        let at_source = format!(
            "{regional}[[links]]\nsource = \"na\"\ndestination = \"eu\"\ncluster = \"na\"\n"
        );
        assert!(topics_at_rest(&topology(&at_source), true).0.is_empty());

        let third = at_source.replace("cluster = \"na\"", "cluster = \"apac\"");
        let (refused, _) = topics_at_rest(&topology(&third), true);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert!(
            refused[0].contains("na -> eu") && refused[0].contains("cluster in apac"),
            "{refused:?}"
        );
        assert!(
            topics_at_rest(&topology(&third), false).0.is_empty(),
            "without a policy every row may go anywhere"
        );

        let (refused, warnings) =
            topics_at_rest(&topology("[kafka]\nbrokers = \"k:9092\"\n"), true);
        assert!(refused.is_empty());
        assert_eq!(warnings.len(), 6, "{warnings:?}");
        let (refused, warnings) = topics_at_rest(
            &topology("[kafka]\nbrokers = \"k:9092\"\nregion = \"eu\"\n"),
            true,
        );
        assert!(warnings.is_empty());
        // na <-> apac rest in eu
        assert_eq!(refused.len(), 2, "{refused:?}");
    }
}
