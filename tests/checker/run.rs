//! The I/O side of the checker: a fresh three-region deployment per case,
//! the workload run in the three regions at once, every region polled
//! against the oracle until it matches or the time is up, and the case
//! written out for people when it does not.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use meridian_testkit::{Deployment, Spec};
use sqlx::{PgPool, Row};

use super::oracle::{self, Diff, Shown, TableImage};
use super::policy::PolicyModel;
use super::schema::{Kind, REGIONS, Schema, Table, Ty, Val};
use super::workload::{Key, Rows, Txn, Wait, Workload, key_condition};

/// The policy hash key the agents get (`MERIDIAN_POLICY_HASH_KEY`).
pub(crate) const HASH_KEY: &str = "checker-hash-key";

/// How long a region waits for a row that moved to it.
const MOVE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long every region has to match the oracle after the workload
/// (`MERIDIAN_CHECK_TIMEOUT_SECS` overrides it).
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);

fn converge_timeout() -> Duration {
    std::env::var("MERIDIAN_CHECK_TIMEOUT_SECS")
        .ok()
        .map(|s| {
            Duration::from_secs(
                s.trim()
                    .parse()
                    .expect("MERIDIAN_CHECK_TIMEOUT_SECS: seconds"),
            )
        })
        .unwrap_or(CONVERGE_TIMEOUT)
}

/// One generated case.
pub(crate) struct Case {
    pub(crate) seed: u64,
    pub(crate) schema: Schema,
    pub(crate) policy: PolicyModel,
    pub(crate) policy_text: String,
    pub(crate) workload: Workload,
}

/// How a run waits and compares (see the constants in `checker.rs`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RunOptions {
    /// A region writes a row that moved to it only once every region has
    /// applied its previous home's transactions up to the move.
    pub(crate) settle_moves: bool,
    /// Leave copies held by a row's previous home regions out of the
    /// comparison.
    pub(crate) ignore_old_home_copies: bool,
    /// Accept any value in a column the deciding rule does not send.
    pub(crate) ignore_stale_dropped_columns: bool,
}

/// What one run of a case found.
pub(crate) struct Outcome {
    /// Differences from the oracle when the time was up (empty: converged).
    pub(crate) diffs: Vec<Diff>,
    /// Other failures: the workload could not run, dead letters, policy
    /// violations, a change after convergence.
    pub(crate) problems: Vec<String>,
    /// Each agent's whole log.
    pub(crate) logs: Vec<(String, String)>,
    pub(crate) topology: String,
    pub(crate) timings: String,
    /// Differences left out by [`RunOptions::ignore_old_home_copies`].
    pub(crate) ignored: usize,
}

impl Outcome {
    pub(crate) fn failed(&self) -> bool {
        !self.diffs.is_empty() || !self.problems.is_empty()
    }
}

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

/// Runs `workload` (the case's, or a shrunk one) of `case` once.
pub(crate) async fn run(
    case: &Case,
    workload: &Workload,
    kafka: bool,
    options: RunOptions,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let schema = &case.schema;
    let schema_sql = schema.sql();
    let names: Vec<(String, String)> = schema
        .tables
        .iter()
        .map(|t| (t.qualified(), t.key_names().join(",")))
        .collect();
    let tables: Vec<(&str, &str, &str)> = names
        .iter()
        .map(|(n, k)| (n.as_str(), k.as_str(), "home"))
        .collect();
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: &schema_sql,
            tables: &tables,
            proxied: &[],
            extra_topology: "",
            policy: Some(&case.policy_text),
            agent_env: &[("MERIDIAN_POLICY_HASH_KEY", HASH_KEY)],
            global_schema: None,
            kafka,
        },
    )
    .await?;
    let topology = std::fs::read_to_string(&d.config).unwrap_or_default();
    let deployed = started.elapsed();
    let mut problems = Vec::new();
    let mut diffs = Vec::new();

    // the three regions' workloads at once
    let waits = workload.waits(schema);
    let lsns: Mutex<HashMap<usize, i64>> = Mutex::new(HashMap::new());
    let scripts = REGIONS.iter().enumerate().map(|(r, _)| {
        let mine: Vec<(usize, &Txn, &Vec<Wait>)> = workload
            .txns
            .iter()
            .zip(&waits)
            .enumerate()
            .filter(|(_, (t, _))| t.region == r)
            .map(|(i, (t, w))| (i, t, w))
            .collect();
        run_region(&d, schema, r, mine, &lsns, options.settle_moves)
    });
    let results = futures::future::join_all(scripts).await;
    for e in results.into_iter().filter_map(Result::err) {
        problems.push(format!("the workload could not run: {e}"));
    }
    let worked = started.elapsed();

    let mut converged_at = None;
    let mut ignored_count = 0;
    let mut checked = String::new();
    if problems.is_empty() {
        let rows = workload.final_rows(schema);
        let identity = identity_values(&d, schema).await?;
        let expected = oracle::expected(
            schema,
            &case.policy,
            &rows,
            &identity,
            HASH_KEY.as_bytes(),
            options.ignore_stale_dropped_columns,
        );
        // copies held by a row's previous home regions: marked, or left
        // out with MERIDIAN_CHECK_IGNORE=old_home_copies
        let old_homes = oracle::old_home_copies(
            schema,
            &case.policy,
            &rows,
            &workload.lineage(schema),
            HASH_KEY.as_bytes(),
        );
        let compare = async || -> anyhow::Result<(Vec<Diff>, usize)> {
            let all = compare(&d, case, &rows, &expected).await?;
            let n = all.len();
            let kept: Vec<Diff> = all
                .into_iter()
                .filter(|d| !(options.ignore_old_home_copies && old_homes.contains(&d.place())))
                .map(|mut d| {
                    if old_homes.contains(&d.place()) {
                        d.note("this region was the row's home before");
                    }
                    d
                })
                .collect();
            let left_out = n - kept.len();
            Ok((kept, left_out))
        };
        let copies: usize = expected.iter().flatten().map(|t| t.len()).sum::<usize>() - rows.len();
        checked = format!("{} rows, {} copies in other regions", rows.len(), copies);
        let deadline = Instant::now() + converge_timeout();
        loop {
            (diffs, ignored_count) = compare().await?;
            if diffs.is_empty() {
                converged_at = Some(started.elapsed());
                // settle: nothing may change afterwards (late or repeated
                // changes, heartbeats)
                tokio::time::sleep(Duration::from_secs(2)).await;
                let (again, _) = compare().await?;
                if !again.is_empty() {
                    problems.push(format!(
                        "the regions matched the oracle, then changed again: {}",
                        Shown(&again[0], schema)
                    ));
                    diffs = again;
                }
                break;
            }
            if Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for region in REGIONS {
        let pool = d.pool(region);
        let dead: Vec<(String, String)> =
            sqlx::query_as("SELECT source_region, reason FROM meridian.dead_letters ORDER BY id")
                .fetch_all(pool)
                .await?;
        for (source, reason) in dead {
            problems.push(format!("dead letter in {region} from {source}: {reason}"));
        }
        let violations: Vec<(String, String)> = sqlx::query_as(
            "SELECT source_region, reason FROM meridian.policy_violations ORDER BY id",
        )
        .fetch_all(pool)
        .await?;
        for (source, reason) in violations {
            problems.push(format!(
                "policy violation in {region} from {source}: {reason}"
            ));
        }
    }
    let logs = REGIONS
        .iter()
        .map(|r| (r.to_string(), d.agent_log(r)))
        .collect();
    let timings = format!(
        "{checked}; deployment {:.1} s, workload {:.1} s, {}",
        deployed.as_secs_f64(),
        (worked - deployed).as_secs_f64(),
        match converged_at {
            Some(at) => format!("converged after {:.1} s", (at - worked).as_secs_f64()),
            None => "did not converge".to_owned(),
        }
    );
    Ok(Outcome {
        diffs,
        problems,
        logs,
        topology,
        timings,
        ignored: ignored_count,
    })
}

async fn run_region(
    d: &Deployment,
    schema: &Schema,
    region: usize,
    txns: Vec<(usize, &Txn, &Vec<Wait>)>,
    lsns: &Mutex<HashMap<usize, i64>>,
    settle: bool,
) -> Result<(), String> {
    let here = REGIONS[region];
    let pool = d.pool(here);
    for (i, txn, waits) in txns {
        for w in waits {
            wait_for_move(pool, schema, w, here)
                .await
                .map_err(|e| format!("txn {i} in {here}: {e}"))?;
            if settle {
                wait_for_settled(d, w, lsns)
                    .await
                    .map_err(|e| format!("txn {i} in {here}: {e}"))?;
            }
        }
        let mut tx = pool
            .begin()
            .await
            .map_err(|e| format!("txn {i} in {here}: BEGIN: {e}"))?;
        for op in &txn.ops {
            let sql = op.sql(schema);
            if let Err(e) = sqlx::raw_sql(&sql).execute(&mut *tx).await {
                return Err(format!(
                    "txn {i} in {here}: {e}: {}",
                    oracle::show(&Some(sql))
                ));
            }
        }
        tx.commit()
            .await
            .map_err(|e| format!("txn {i} in {here}: COMMIT: {e}"))?;
        // at or past the commit: what a peer's watermark must reach
        let lsn: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(pool)
            .await
            .map_err(|e| format!("txn {i} in {here}: WAL position: {e}"))?;
        lsns.lock().expect("not poisoned").insert(i, lsn);
    }
    Ok(())
}

/// Waits until every region other than the row's previous home has
/// applied that home's transactions up to the one that moved the row.
async fn wait_for_settled(
    d: &Deployment,
    w: &Wait,
    lsns: &Mutex<HashMap<usize, i64>>,
) -> Result<(), String> {
    let from = REGIONS[w.from_region];
    let deadline = Instant::now() + MOVE_TIMEOUT;
    let lsn = loop {
        // the move committed (its row arrived here); its position is noted
        // right after the commit
        let noted = lsns
            .lock()
            .expect("not poisoned")
            .get(&w.after_txn)
            .copied();
        if let Some(lsn) = noted {
            break lsn;
        }
        if Instant::now() > deadline {
            return Err(format!("transaction {} has no WAL position", w.after_txn));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    for region in REGIONS.iter().filter(|r| **r != from) {
        loop {
            let at: i64 = sqlx::query_scalar(
                "SELECT coalesce(max(end_lsn), 0) FROM meridian.watermarks WHERE source_region = $1",
            )
            .bind(from)
            .fetch_one(d.pool(region))
            .await
            .map_err(|e| format!("watermark of {from} in {region}: {e}"))?;
            if at >= lsn {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{region} did not apply {from}'s transactions up to {lsn} (txn {}) within {MOVE_TIMEOUT:?}",
                    w.after_txn
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

/// Waits until the row that moved to `here` has arrived there.
async fn wait_for_move(pool: &PgPool, schema: &Schema, w: &Wait, here: &str) -> Result<(), String> {
    let t = &schema.tables[w.table];
    let sql = format!(
        "SELECT count(*) FROM {} WHERE {} AND home = '{here}'",
        t.qualified(),
        key_condition(t, std::slice::from_ref(&w.key))
    );
    let deadline = Instant::now() + MOVE_TIMEOUT;
    loop {
        let n: i64 = sqlx::query_scalar(&sql)
            .fetch_one(pool)
            .await
            .map_err(|e| format!("{sql}: {e}"))?;
        if n == 1 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "row {} {:?} moved to {here} but did not arrive there (home = '{here}') within {MOVE_TIMEOUT:?}",
                t.name, w.key
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The identity values each home store generated for its own rows.
async fn identity_values(
    d: &Deployment,
    schema: &Schema,
) -> anyhow::Result<BTreeMap<(usize, Key), String>> {
    let mut out = BTreeMap::new();
    for (ti, t) in schema.tables.iter().enumerate() {
        let Some(gid) = t.columns.iter().position(|c| c.kind == Kind::Identity) else {
            continue;
        };
        for region in REGIONS {
            let rows = read_table(d.pool(region), t).await?;
            for (key, row) in rows {
                if row[t.home].as_deref() == Some(region)
                    && let Some(v) = &row[gid]
                {
                    out.insert((ti, key), v.clone());
                }
            }
        }
    }
    Ok(out)
}

/// Every row of `t` in a store, by key, every column as text (large columns
/// as their digest), timestamps in UTC.
async fn read_table(pool: &PgPool, t: &Table) -> anyhow::Result<BTreeMap<Key, Vec<Val>>> {
    let exprs: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            if c.large {
                oracle::digest_sql(&c.name)
            } else if c.ty == Ty::Boolean {
                // boolean::text says true/false; the text form (pgoutput,
                // conditions) is t/f
                format!("CASE WHEN {0} THEN 't' WHEN NOT {0} THEN 'f' END", c.name)
            } else {
                format!("{}::text", c.name)
            }
        })
        .collect();
    let mut tx = pool.begin().await?;
    sqlx::query("SET LOCAL TimeZone = 'UTC'")
        .execute(&mut *tx)
        .await?;
    let rows = sqlx::query(&format!(
        "SELECT {} FROM {}",
        exprs.join(", "),
        t.qualified()
    ))
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut out = BTreeMap::new();
    for row in rows {
        let values: Vec<Val> = (0..t.columns.len())
            .map(|i| row.try_get::<Option<String>, _>(i))
            .collect::<Result<_, _>>()?;
        let key = t
            .key
            .iter()
            .map(|&k| values[k].clone().unwrap_or_default())
            .collect();
        out.insert(key, values);
    }
    Ok(out)
}

async fn compare(
    d: &Deployment,
    case: &Case,
    rows: &Rows,
    expected: &[Vec<TableImage>],
) -> anyhow::Result<Vec<Diff>> {
    let mut out = Vec::new();
    for (r, region) in REGIONS.iter().enumerate() {
        for (ti, t) in case.schema.tables.iter().enumerate() {
            let actual = read_table(d.pool(region), t).await?;
            out.extend(oracle::diff(
                &case.schema,
                r,
                ti,
                &expected[r][ti],
                &actual,
                &|key| oracle::explain_extra(&case.schema, &case.policy, rows, r, ti, key),
            ));
        }
    }
    Ok(out)
}

/// Where the checker leaves failing cases.
pub(crate) fn artifacts_dir(transport: &str, seed: u64) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts")
        .join("checker")
        .join(format!("{transport}-{seed}"))
}

/// Agent log lines worth reading first: warnings and errors.
pub(crate) fn log_excerpt(log: &str, max: usize) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked"))
        .take(max)
        .map(|l| {
            if l.chars().count() > 400 {
                format!("{}…", l.chars().take(400).collect::<String>())
            } else {
                l.to_owned()
            }
        })
        .collect()
}

/// Writes the whole case and what the run found under `dir`.
pub(crate) fn write_case(
    dir: &Path,
    case: &Case,
    workload: &Workload,
    outcome: &Outcome,
) -> std::io::Result<()> {
    std::fs::create_dir_all(dir.join("logs"))?;
    std::fs::write(dir.join("schema.sql"), case.schema.sql())?;
    std::fs::write(dir.join("policy.toml"), &case.policy_text)?;
    std::fs::write(dir.join("workload.sql"), workload.sql(&case.schema))?;
    std::fs::write(dir.join("topology.toml"), &outcome.topology)?;
    let mut diff = String::new();
    for p in &outcome.problems {
        diff.push_str(&format!("PROBLEM: {p}\n"));
    }
    for d in &outcome.diffs {
        diff.push_str(&format!("{}\n", Shown(d, &case.schema)));
    }
    std::fs::write(dir.join("diff.txt"), diff)?;
    for (region, log) in &outcome.logs {
        std::fs::write(dir.join("logs").join(format!("{region}.log")), log)?;
    }
    std::fs::write(
        dir.join("README.txt"),
        format!(
            "seed {}: {} transactions; {}\nrerun: MERIDIAN_CHECK_SEED={} cargo test --test checker -- --nocapture\n",
            case.seed,
            workload.txns.len(),
            outcome.timings,
            case.seed
        ),
    )?;
    Ok(())
}
