//! `meridian status`: every region's agent, asked over its admin service,
//! in one table (or JSON). A region that does not answer is shown as
//! unreachable; the others are still shown.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_core::topology::Topology;
use meridian_proto::admin::{StatusReply, StatusRequest, admin_client::AdminClient};
use serde::Serialize;

/// When a link counts as lagging or unhealthy.
#[derive(Clone, Copy, Debug, Serialize)]
pub(crate) struct Thresholds {
    /// Lag at or above this is a warning (amber).
    pub warn_seconds: f64,
    /// Lag at or above this is unhealthy (red), as is any link not connected.
    pub critical_seconds: f64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    /// Unix time of the report, seconds.
    pub at: f64,
    pub healthy: bool,
    pub thresholds: Thresholds,
    pub regions: Vec<RegionReport>,
    pub links: Vec<LinkReport>,
    /// What the regions that answered should share and do not.
    pub drift: Vec<crate::drift::Drift>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct RegionReport {
    pub region: String,
    pub reachable: bool,
    /// Why the agent did not answer.
    pub error: Option<String>,
    pub version: Option<String>,
    pub uptime_seconds: Option<f64>,
    pub policy_version: Option<u64>,
    pub slots: Vec<SlotReport>,
    /// What this region applied from each peer.
    pub inbound: Vec<InboundReport>,
    /// What it should share with the other regions.
    pub baseline: Option<crate::drift::Baseline>,
    /// Its initial syncs to its peers, one per destination and table.
    pub copies: Vec<CopyRow>,
}

/// One table's initial sync to one destination, as its source reports it.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct CopyRow {
    pub destination: String,
    pub table: String,
    /// waiting, copying, done or not_copied.
    pub state: String,
    pub rows: i64,
    /// None before the copy counted them.
    pub rows_expected: Option<i64>,
    pub bytes: i64,
    pub elapsed_seconds: f64,
    pub last_error: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct InboundReport {
    pub source: String,
    pub changes_applied: u64,
    /// Since the agent started.
    pub dead_letters: u64,
    /// Waiting in the store for `meridian dead-letters replay|discard`.
    pub dead_letters_pending: u64,
    /// None before the first applied batch.
    pub seconds_since_apply: Option<f64>,
    /// Partitions (Kafka) or streams (gRPC) that stopped on an error and
    /// have not applied since.
    pub stalled: u32,
    /// The longest stall's error, and how long it lasts.
    pub stalled_error: Option<String>,
    pub stalled_seconds: Option<f64>,
    /// Batches or records refused or re-filtered for the residency policy
    /// or the topology since the agent started.
    pub policy_violations: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct TableReport {
    pub table: String,
    pub changes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct SlotReport {
    pub name: String,
    pub destination: String,
    pub active: bool,
    pub wal_status: String,
    pub retained_bytes: u64,
    /// No link uses it: `meridian slots prune` drops it.
    pub orphaned: bool,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct LinkReport {
    pub source: String,
    pub destination: String,
    /// connected, retrying, stopped, stalled (connected, but the destination
    /// keeps failing to apply), or unknown (the source did not answer).
    pub state: String,
    pub state_seconds: Option<f64>,
    pub lag_seconds: Option<f64>,
    pub lag_bytes: Option<u64>,
    pub last_error: Option<String>,
    pub last_error_age_seconds: Option<f64>,
    pub bytes_shipped: Option<u64>,
    pub changes_shipped: Option<u64>,
    /// Dead letters from the source waiting at the destination (None when
    /// the destination did not answer).
    pub dead_letters_pending: Option<u64>,
    /// Refused or re-filtered batches at the destination (policy or
    /// topology), since its agent started.
    pub policy_violations: Option<u64>,
    /// Changes shipped per table.
    pub tables: Vec<TableReport>,
    /// What is wrong now, if anything (not connected, stalled, lagging,
    /// data set aside); `last_error` is history.
    pub problem: Option<String>,
    /// `last_error` is older than the link's current healthy state.
    pub error_is_history: bool,
    /// ok, warn or critical.
    pub health: &'static str,
    /// The link's initial syncs, as its source reports them.
    pub copy: Option<CopyReport>,
}

/// A link's initial syncs (one per table), summed.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct CopyReport {
    /// Tables waiting or being copied.
    pub tables_pending: usize,
    pub tables_done: usize,
    /// Tables of a link older than initial sync, never copied.
    pub tables_not_copied: usize,
    /// Rows copied and expected by the pending copies (each counted when
    /// it started), and bytes copied by them.
    pub rows: i64,
    pub rows_expected: i64,
    pub bytes: i64,
    pub rows_per_second: f64,
    pub remaining_seconds: Option<f64>,
    /// Why a pending copy fails (it is retried), if one does.
    pub error: Option<String>,
    /// Seconds since the link's copier last recorded progress on any
    /// pending table (tables queued behind another wait their turn).
    pub idle_seconds: Option<f64>,
    /// The longest a failing table went without progress, seconds.
    pub error_idle_seconds: Option<f64>,
    /// Why the source could not report its copies, if it could not.
    pub unreadable: Option<String>,
}

impl CopyReport {
    fn from_reply(copies: &[&meridian_proto::admin::CopyStatus]) -> CopyReport {
        let mut c = CopyReport::default();
        let mut elapsed: f64 = 0.0;
        for t in copies {
            match t.state.as_str() {
                "waiting" | "copying" => {
                    c.tables_pending += 1;
                    c.rows += t.rows;
                    c.bytes += t.bytes;
                    c.rows_expected += t.rows_expected.max(t.rows);
                    if !t.last_error.is_empty() {
                        c.error = Some(format!("{}: {}", t.table, t.last_error));
                        c.error_idle_seconds = Some(
                            c.error_idle_seconds
                                .unwrap_or(0.0)
                                .max(t.idle_seconds.max(0.0)),
                        );
                    }
                    if t.idle_seconds >= 0.0 {
                        c.idle_seconds = Some(
                            c.idle_seconds
                                .map_or(t.idle_seconds, |i: f64| i.min(t.idle_seconds)),
                        );
                    }
                    elapsed = elapsed.max(t.elapsed_seconds);
                }
                "done" => c.tables_done += 1,
                _ => c.tables_not_copied += 1,
            }
        }
        let p = meridian_core::snapshot::progress(
            c.rows.max(0) as u64,
            c.rows_expected.max(0) as u64,
            elapsed,
        );
        if c.tables_pending > 0 {
            c.rows_per_second = p.rows_per_second;
            c.remaining_seconds = p.remaining_seconds;
        }
        c
    }
}

/// Asks every region's agent at once, each with `timeout`.
pub(crate) async fn gather(
    topology: &Topology,
    config: &Path,
    thresholds: Thresholds,
    timeout: Duration,
) -> Report {
    let dialer = crate::operator::Dialer::new(topology).map_err(|e| format!("{e:#}"));
    let asks = topology.regions.iter().map(|(name, region)| {
        let dialer = dialer.clone();
        async move {
            let answer = match dialer {
                Ok(d) => ask(&d, name, region.connect_addr(), timeout).await,
                Err(e) => Err(e),
            };
            (name.clone(), answer)
        }
    });
    let answers = futures::future::join_all(asks).await;
    let mut regions = Vec::new();
    let mut links = Vec::new();
    for (region, answer) in answers {
        let peers = topology.regions.keys().filter(|r| **r != region);
        match answer {
            Ok(reply) => {
                for peer in peers {
                    let link = reply.links.iter().find(|l| &l.destination == peer);
                    links.push(match link {
                        Some(l) => LinkReport {
                            source: region.clone(),
                            destination: peer.clone(),
                            state: l.state.clone(),
                            state_seconds: Some(l.state_seconds),
                            lag_seconds: Some(l.lag_seconds),
                            lag_bytes: Some(l.lag_bytes),
                            last_error: (!l.last_error.is_empty()).then(|| l.last_error.clone()),
                            last_error_age_seconds: (!l.last_error.is_empty())
                                .then_some(l.last_error_age_seconds),
                            bytes_shipped: Some(l.bytes_shipped),
                            changes_shipped: Some(l.changes_shipped),
                            dead_letters_pending: None,
                            policy_violations: None,
                            tables: l
                                .tables
                                .iter()
                                .map(|t| TableReport {
                                    table: t.table.clone(),
                                    changes: t.changes,
                                })
                                .collect(),
                            problem: None,
                            error_is_history: false,
                            health: health(&l.state, l.lag_seconds, thresholds),
                            copy: {
                                let copies: Vec<_> = reply
                                    .copies
                                    .iter()
                                    .filter(|c| &c.destination == peer)
                                    .collect();
                                match reply.copies_error.is_empty() {
                                    true => (!copies.is_empty())
                                        .then(|| CopyReport::from_reply(&copies)),
                                    false => Some(CopyReport {
                                        unreadable: Some(reply.copies_error.clone()),
                                        ..CopyReport::default()
                                    }),
                                }
                            },
                        },
                        None => unknown_link(&region, peer, "the agent has no such link"),
                    });
                }
                let baseline =
                    crate::drift::Baseline::from_reply(&reply.version, reply.baseline.as_ref());
                let copies = reply
                    .copies
                    .iter()
                    .map(|c| CopyRow {
                        destination: c.destination.clone(),
                        table: c.table.clone(),
                        state: c.state.clone(),
                        rows: c.rows,
                        rows_expected: (c.rows_expected >= 0).then_some(c.rows_expected),
                        bytes: c.bytes,
                        elapsed_seconds: c.elapsed_seconds,
                        last_error: (!c.last_error.is_empty()).then(|| c.last_error.clone()),
                    })
                    .collect();
                regions.push(RegionReport {
                    copies,
                    baseline: Some(baseline),
                    region,
                    reachable: true,
                    error: None,
                    version: Some(reply.version),
                    uptime_seconds: Some(reply.uptime_seconds),
                    policy_version: Some(reply.policy_version),
                    slots: reply
                        .slots
                        .into_iter()
                        .map(|s| SlotReport {
                            name: s.name,
                            destination: s.destination,
                            active: s.active,
                            wal_status: s.wal_status,
                            retained_bytes: s.retained_bytes,
                            orphaned: s.orphaned,
                        })
                        .collect(),
                    inbound: reply
                        .inbound
                        .into_iter()
                        .map(|i| InboundReport {
                            source: i.source,
                            changes_applied: i.changes_applied,
                            dead_letters: i.dead_letters,
                            dead_letters_pending: i.dead_letters_pending,
                            seconds_since_apply: (i.seconds_since_apply >= 0.0)
                                .then_some(i.seconds_since_apply),
                            stalled: i.stalled,
                            stalled_error: (i.stalled > 0).then_some(i.stalled_error),
                            stalled_seconds: (i.stalled > 0).then_some(i.stalled_seconds),
                            policy_violations: i.policy_violations,
                        })
                        .collect(),
                });
            }
            Err(error) => {
                for peer in peers {
                    links.push(unknown_link(
                        &region,
                        peer,
                        "the source agent is unreachable",
                    ));
                }
                regions.push(RegionReport {
                    region,
                    reachable: false,
                    error: Some(error),
                    version: None,
                    uptime_seconds: None,
                    policy_version: None,
                    slots: Vec::new(),
                    inbound: Vec::new(),
                    baseline: None,
                    copies: Vec::new(),
                });
            }
        }
    }
    for l in &mut links {
        let Some(inbound) = regions
            .iter()
            .find(|r| r.region == l.destination && r.reachable)
            .and_then(|r| r.inbound.iter().find(|i| i.source == l.source))
        else {
            continue;
        };
        // data set aside at the destination is a gap until an operator
        // acts: such a link is never "ok"
        l.dead_letters_pending = Some(inbound.dead_letters_pending);
        l.policy_violations = Some(inbound.policy_violations);
        if inbound.dead_letters_pending > 0 && l.health == "ok" {
            l.health = "warn";
        }
        // a destination that keeps failing to apply is a stalled link,
        // however connected the source sees it (Kafka: the source only
        // talks to the broker); a stall shorter than the warning threshold
        // (a key change's insert waiting a heartbeat for its delete) warns
        if let Some(error) = &inbound.stalled_error {
            let seconds = inbound.stalled_seconds.unwrap_or_default();
            if l.state == "connected" {
                l.state = "stalled".to_owned();
                l.state_seconds = Some(seconds);
            }
            l.last_error = Some(format!("at {}: {error}", l.destination));
            l.last_error_age_seconds = Some(0.0);
            l.health = if seconds >= thresholds.warn_seconds || l.health == "critical" {
                "critical"
            } else {
                "warn"
            };
        }
    }
    for l in &mut links {
        // a copy that fails, or records nothing, while rows wait to be
        // copied is a stall, however healthy the stream looks
        if let Some(c) = l.copy.as_ref().filter(|c| c.tables_pending > 0) {
            // a failing table stalls however the link's other tables move
            let stalled = match c.error_idle_seconds {
                Some(idle) => idle >= thresholds.warn_seconds,
                None => c.idle_seconds.unwrap_or(0.0) >= thresholds.critical_seconds,
            };
            if stalled {
                l.health = "critical";
            } else if c.error.is_some() && l.health == "ok" {
                l.health = "warn";
            }
        }
        // copies that cannot be read may hide a stall
        if l.copy.as_ref().is_some_and(|c| c.unreadable.is_some()) && l.health == "ok" {
            l.health = "warn";
        }
        l.problem = problem(l, config, thresholds);
        // an error from before the link connected again is history
        l.error_is_history = l.state == "connected"
            && matches!(
                (l.last_error_age_seconds, l.state_seconds),
                (Some(age), Some(connected_for)) if age >= connected_for
            );
    }
    // an orphaned slot pins WAL until someone drops it
    let healthy = regions
        .iter()
        .all(|r| r.reachable && r.slots.iter().all(|s| !s.orphaned))
        && links.iter().all(|l| l.health != "critical");
    let drift = crate::drift::compare(
        &regions
            .iter()
            .filter_map(|r| Some((r.region.clone(), r.baseline.clone()?)))
            .collect(),
    );
    Report {
        drift,
        at: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
        healthy,
        thresholds,
        regions,
        links,
    }
}

/// What is wrong with a link now, in a few words with the command that
/// explains more; None when nothing is.
fn problem(l: &LinkReport, config: &Path, t: Thresholds) -> Option<String> {
    match l.state.as_str() {
        "connected" => {}
        "stalled" | "unknown" => return l.last_error.clone(),
        state => {
            // an error from before the link entered this state is not why
            let recent = matches!(
                (l.last_error_age_seconds, l.state_seconds),
                (Some(age), Some(since)) if age <= since + 1.0
            );
            return Some(match &l.last_error {
                Some(e) if recent => format!("{state}: {e}"),
                _ => state.to_owned(),
            });
        }
    }
    if let Some(c) = l.copy.as_ref().filter(|c| c.tables_pending > 0) {
        let idle = crate::human::duration(c.idle_seconds.unwrap_or(0.0));
        match &c.error {
            Some(e) => {
                let stuck = crate::human::duration(c.error_idle_seconds.unwrap_or(0.0));
                return Some(format!(
                    "initial sync failing ({stuck} without progress): {e}"
                ));
            }
            None if c.idle_seconds.unwrap_or(0.0) >= t.critical_seconds => {
                return Some(format!(
                    "initial sync recorded nothing for {idle} (meridian sync status --config {})",
                    config.display()
                ));
            }
            None => {}
        }
    }
    if let Some(why) = l.copy.as_ref().and_then(|c| c.unreadable.as_ref()) {
        return Some(format!("initial syncs unreadable at {}: {why}", l.source));
    }
    if let Some(lag) = l.lag_seconds.filter(|lag| *lag >= t.warn_seconds) {
        return Some(format!("lag {}", crate::human::duration(lag)));
    }
    match l.dead_letters_pending {
        Some(n) if n > 0 => Some(format!(
            "{} dead letter(s) pending at {} (meridian dead-letters list --config {} --region {})",
            count(n as f64),
            l.destination,
            config.display(),
            l.destination
        )),
        _ => None,
    }
}

fn unknown_link(source: &str, destination: &str, why: &str) -> LinkReport {
    LinkReport {
        source: source.to_owned(),
        destination: destination.to_owned(),
        state: "unknown".to_owned(),
        state_seconds: None,
        lag_seconds: None,
        lag_bytes: None,
        last_error: Some(why.to_owned()),
        last_error_age_seconds: None,
        bytes_shipped: None,
        changes_shipped: None,
        dead_letters_pending: None,
        policy_violations: None,
        tables: Vec::new(),
        problem: None,
        error_is_history: false,
        health: "critical",
        copy: None,
    }
}

fn health(state: &str, lag_seconds: f64, t: Thresholds) -> &'static str {
    if state != "connected" || lag_seconds >= t.critical_seconds {
        "critical"
    } else if lag_seconds >= t.warn_seconds {
        "warn"
    } else {
        "ok"
    }
}

async fn ask(
    dialer: &crate::operator::Dialer,
    region: &str,
    addr: &str,
    timeout: Duration,
) -> Result<StatusReply, String> {
    let call = async {
        let channel = dialer
            .connect(region, addr, timeout)
            .await
            .map_err(|e| format!("{e:#}"))?;
        AdminClient::new(channel)
            .status(StatusRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|e| format!("{addr}: {}", e.message()))
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("{addr}: no answer within {timeout:?}")))
}

/// `meridian status` found the regions healthy but not alike: exit code
/// [`Drifted::EXIT_CODE`], so a CI gate can tell drift from an outage.
#[derive(Debug)]
pub(crate) struct Drifted(pub usize);

impl Drifted {
    pub(crate) const EXIT_CODE: u8 = 3;
}

impl std::fmt::Display for Drifted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "drift: {} difference(s) between regions (exit code {})",
            self.0,
            Drifted::EXIT_CODE
        )
    }
}

impl std::error::Error for Drifted {}

/// `meridian status`: prints the report; fails when anything is unhealthy
/// (exit code 1) or, when healthy, the regions drifted (exit code 3).
pub(crate) async fn run(
    config: &Path,
    thresholds: Thresholds,
    as_json: bool,
) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let report = gather(&topology, config, thresholds, Duration::from_secs(3)).await;
    let text = if as_json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render(&report)
    };
    // a closed pipe (`| head`) is not an error worth a panic
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    if !report.healthy {
        let bad = report
            .links
            .iter()
            .filter(|l| l.health == "critical")
            .count();
        let unreachable = report.regions.iter().filter(|r| !r.reachable).count();
        anyhow::bail!("unhealthy: {bad} link(s) critical, {unreachable} region(s) unreachable");
    }
    let differences = report.drift.iter().filter(|d| d.is_difference()).count();
    if differences > 0 {
        return Err(Drifted(differences).into());
    }
    Ok(())
}

/// The report as text tables.
pub(crate) fn render(report: &Report) -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(s.trim_end());
        out.push('\n');
    };
    line(format!(
        "{:<8} {:<12} {:<9} {:>10} {:>7}",
        "REGION", "AGENT", "VERSION", "UPTIME", "POLICY"
    ));
    for r in &report.regions {
        match &r.error {
            None => line(format!(
                "{:<8} {:<12} {:<9} {:>10} {:>7}",
                r.region,
                "up",
                r.version.as_deref().unwrap_or("-"),
                duration(r.uptime_seconds.unwrap_or(0.0)),
                format!("v{}", r.policy_version.unwrap_or(0)),
            )),
            Some(e) => line(format!("{:<8} {:<12} {e}", r.region, "UNREACHABLE")),
        }
    }
    line(String::new());
    line(format!(
        "{:<28} {:<7} {:<11} {:>12}",
        "SLOT", "ACTIVE", "WAL", "RETAINED"
    ));
    for r in report.regions.iter().filter(|r| r.reachable) {
        for s in &r.slots {
            line(format!(
                "{:<28} {:<7} {:<11} {:>12}",
                s.name,
                if s.active { "yes" } else { "no" },
                if s.orphaned {
                    format!("{} ORPHANED: meridian slots prune", s.wal_status)
                } else {
                    s.wal_status.clone()
                },
                bytes(s.retained_bytes),
            ));
        }
    }
    line(String::new());
    line(format!(
        "{:<14} {:>12} {:>12} {:>11} {:>14}",
        "APPLIED", "CHANGES", "DEAD LETTERS", "VIOLATIONS", "LAST APPLY"
    ));
    for r in report.regions.iter().filter(|r| r.reachable) {
        for i in &r.inbound {
            line(format!(
                "{:<14} {:>12} {:>12} {:>11} {:>14}",
                format!("{} <- {}", r.region, i.source),
                count(i.changes_applied as f64),
                if i.dead_letters_pending > 0 {
                    format!("{} pending", count(i.dead_letters_pending as f64))
                } else {
                    count(i.dead_letters as f64)
                },
                count(i.policy_violations as f64),
                i.seconds_since_apply
                    .map_or("-".into(), |s| format!("{} ago", duration(s))),
            ));
        }
    }
    line(String::new());
    line(format!(
        "{:<14} {:<10} {:>8} {:>8} {:>10} {:>20} {:<8} {}",
        "LINK", "STATE", "FOR", "LAG", "LAG BYTES", "SHIPPED", "HEALTH", "PROBLEM / LAST ERROR"
    ));
    for l in &report.links {
        let shipped = match (l.changes_shipped, l.bytes_shipped) {
            (Some(c), Some(b)) => format!("{} ch, {}", count(c as f64), bytes(b)),
            _ => "-".to_owned(),
        };
        let error = match (&l.last_error, l.last_error_age_seconds) {
            (Some(e), Some(age)) if l.error_is_history => {
                format!("(earlier, {} ago: {e})", duration(age))
            }
            (Some(e), Some(age)) => format!("{e} ({} ago)", duration(age)),
            (Some(e), None) => e.clone(),
            (None, _) => String::new(),
        };
        // the problem now, then the last error unless it says the same
        let said = match &l.problem {
            Some(p) if error.is_empty() || p.contains(l.last_error.as_deref().unwrap_or("")) => {
                p.clone()
            }
            Some(p) => format!("{p}; last error: {error}"),
            None => error,
        };
        line(format!(
            "{:<14} {:<10} {:>8} {:>8} {:>10} {:>20} {:<8} {}",
            format!("{} -> {}", l.source, l.destination),
            l.state,
            l.state_seconds.map_or("-".into(), duration),
            l.lag_seconds.map_or("-".into(), duration),
            l.lag_bytes.map_or("-".into(), bytes),
            shipped,
            l.health,
            said,
        ));
        if let Some(c) = l.copy.as_ref().filter(|c| c.tables_pending > 0) {
            let p = meridian_core::snapshot::progress(
                c.rows.max(0) as u64,
                c.rows_expected.max(0) as u64,
                1.0,
            );
            line(format!(
                "{:<14} initial sync of {} table(s): {:.1}%, {} of {} rows, {}/s, {}",
                "",
                c.tables_pending,
                p.fraction * 100.0,
                count(c.rows as f64),
                count(c.rows_expected as f64),
                count(c.rows_per_second),
                c.remaining_seconds
                    .map_or("starting".to_owned(), |s| format!("{} left", duration(s))),
            ));
        }
    }
    line(String::new());
    if report.drift.is_empty() {
        line("baseline: the regions that answered agree (agent version, topology, policy, migrations, columns)".to_owned());
    } else {
        for d in &report.drift {
            match d.is_difference() {
                true => line(format!("DRIFT ({}): {}", d.what, d.message)),
                false => line(format!("NOT COMPARED ({}): {}", d.what, d.message)),
            }
        }
    }
    line(String::new());
    line(if report.healthy {
        "healthy".to_owned()
    } else {
        format!(
            "UNHEALTHY (links not connected, lag >= {}, or regions unreachable)",
            duration(report.thresholds.critical_seconds)
        )
    });
    out
}

fn duration(seconds: f64) -> String {
    crate::human::duration(seconds)
}

fn bytes(n: u64) -> String {
    crate::human::bytes(n as f64)
}

fn count(n: f64) -> String {
    crate::human::count(n)
}
