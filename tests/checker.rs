//! The randomized end-to-end checker.
//!
//! From a seed: a random schema (1-3 tables, composite keys, many types,
//! large TOASTed values, identity and stored generated columns, replica
//! identity FULL or DEFAULT), a random valid residency policy over it, and a
//! random workload run in the three regions at once (every row written in
//! its home region only). Then every region's tables are compared, whole,
//! with an oracle computed from the workload's model and the checker's own
//! policy model; never from the product's code.
//!
//! ```sh
//! cargo test --test checker -- --nocapture                 # 2 random seeds per transport
//! MERIDIAN_CHECK_SEED=42 cargo test --test checker -- --nocapture      # exactly seed 42
//! MERIDIAN_CHECK_RUNS=10 cargo test --test checker -- --nocapture      # 10 seeds per transport
//! MERIDIAN_CHECK_TRANSPORT=grpc ...                        # only one transport (grpc|kafka)
//! MERIDIAN_CHECK_TXNS=80 ...                               # transactions per case (default 40)
//! MERIDIAN_CHECK_SHRINK=1 ...                              # look for a smaller failing case
//! MERIDIAN_CHECK_ENABLE=hashed_key_home_changes,...        # turn on shapes that are off by default
//! MERIDIAN_CHECK_DISABLE=identity,stored,settled_moves,... # turn off shapes (and settling)
//! MERIDIAN_CHECK_IGNORE=                                   # compare the old homes' own copies too
//! MERIDIAN_CHECK_ENABLE=settled_moves                      # new home writes a moved row only once every region applied the move
//! MERIDIAN_CHECK_IGNORE=old_home_copies,stale_dropped_columns   # exploration only: skip two known finding classes
//! MERIDIAN_CHECK_TIMEOUT_SECS=20 ...                       # convergence timeout (default 90 s)
//! ```
//!
//! A failure prints the seed, schema, policy, the first differences and
//! the agents' warnings, and leaves the whole case in
//! `target/test-artifacts/checker/<transport>-<seed>/`.

#[path = "checker/oracle.rs"]
mod oracle;
#[path = "checker/policy.rs"]
mod policy;
#[path = "checker/rng.rs"]
mod rng;
#[path = "checker/run.rs"]
mod run;
#[path = "checker/schema.rs"]
mod schema;
#[path = "checker/workload.rs"]
mod workload;

use std::time::Instant;

use oracle::Shown;
use policy::PolicyModel;
use rng::Rng;
use run::{Case, Outcome, RunOptions};
use schema::{Schema, Shapes};
use workload::Workload;

/// Tables with a `bigint GENERATED ALWAYS AS IDENTITY` column
/// (`MERIDIAN_CHECK_DISABLE=identity` turns them off).
const IDENTITY_COLUMNS: bool = true;
/// Tables with a `GENERATED ALWAYS AS (length(..)) STORED` column
/// (`MERIDIAN_CHECK_DISABLE=stored`).
const STORED_GENERATED_COLUMNS: bool = true;
/// Text key columns that cross hashed (`MERIDIAN_CHECK_DISABLE=hashed_keys`).
const HASHED_KEYS: bool = true;
/// Known open, not being fixed now: review finding 14, "hashed primary-key
/// columns combined with home changes: rows fork" (the new home receives
/// the row under its real key while it holds a copy under the hashed key).
/// `MERIDIAN_CHECK_ENABLE=hashed_key_home_changes`.
const HASHED_KEY_HOME_CHANGES: bool = false;
/// Documented limit (README, "Residency policy": deletes under `REPLICA
/// IDENTITY DEFAULT` carry only the key; "for tables with conditional
/// rules, or rows whose home region changes, use REPLICA IDENTITY FULL"),
/// and the known open issue "key-only deletes of foreign-homed rows" it
/// leads to: under DEFAULT, no home changes and no conditional rule without
/// an unconditional fallback for the same (from, to).
/// `MERIDIAN_CHECK_ENABLE=default_identity_scope_changes`.
const DEFAULT_IDENTITY_SCOPE_CHANGES: bool = false;
/// Known open, not being fixed now: "writes to replicated copies of
/// foreign-homed rows". With it on, the workload also runs no-op writes
/// (`SET home = home`) on copies in non-home regions; the oracle expects
/// them to change nothing anywhere.
/// `MERIDIAN_CHECK_ENABLE=foreign_copy_writes`.
const WRITES_TO_FOREIGN_HOMED_COPIES: bool = false;

/// Found by this checker, open (issue 14, conflict resolution): after a
/// home change, the old home's last transaction and the new home's first
/// one travel different links, so a third region may apply them in either
/// order (a key change by the new home, then the old home's move: the old
/// key is inserted again; or the old home's values over the new home's).
/// Fixing it needs an order across links (placement epoch, then a hybrid
/// logical clock). Until then the new home writes a moved row only once
/// every region applied the old home's transactions up to the move.
/// `MERIDIAN_CHECK_DISABLE=settled_moves` exercises the race.
const SETTLE_MOVES_EVERYWHERE: bool = true;
/// Found by this checker, open (issue 14, re-homing): after `UPDATE ... SET
/// home = 'eu'` in na, na keeps its own copy as it wrote it (whole), not
/// the form the eu -> na rule allows (or no copy when no rule matches).
/// The old home's own copies are left out of the comparison by default;
/// `MERIDIAN_CHECK_IGNORE=` (empty) compares them too.
const IGNORE_OLD_HOME_COPIES: bool = true;

/// Seeds per transport when `MERIDIAN_CHECK_SEED`/`RUNS` are not set.
const DEFAULT_RUNS: u64 = 2;
/// Transactions per case (all regions together).
const DEFAULT_TXNS: usize = 40;

fn env_list(name: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

fn run_options() -> RunOptions {
    let ignore = match std::env::var("MERIDIAN_CHECK_IGNORE") {
        Ok(_) => env_list("MERIDIAN_CHECK_IGNORE"),
        Err(_) if IGNORE_OLD_HOME_COPIES => vec!["old_home_copies".to_owned()],
        Err(_) => Vec::new(),
    };
    let known = ["old_home_copies", "stale_dropped_columns"];
    for name in &ignore {
        assert!(
            known.contains(&name.as_str()),
            "unknown MERIDIAN_CHECK_IGNORE {name:?}; known: {known:?}"
        );
    }
    RunOptions {
        settle_moves: (SETTLE_MOVES_EVERYWHERE
            || env_list("MERIDIAN_CHECK_ENABLE")
                .iter()
                .any(|e| e == "settled_moves"))
            && !env_list("MERIDIAN_CHECK_DISABLE")
                .iter()
                .any(|e| e == "settled_moves"),
        ignore_old_home_copies: ignore.iter().any(|i| i == "old_home_copies"),
        ignore_stale_dropped_columns: ignore.iter().any(|i| i == "stale_dropped_columns"),
    }
}

fn shapes() -> Shapes {
    let enable = env_list("MERIDIAN_CHECK_ENABLE");
    let disable = env_list("MERIDIAN_CHECK_DISABLE");
    let known = [
        "identity",
        "stored",
        "hashed_keys",
        "hashed_key_home_changes",
        "default_identity_scope_changes",
        "foreign_copy_writes",
        "settled_moves",
    ];
    for name in enable.iter().chain(&disable) {
        assert!(
            known.contains(&name.as_str()),
            "unknown shape {name:?}; known: {known:?}"
        );
    }
    let on = |name: &str, default: bool| {
        (default || enable.iter().any(|e| e == name)) && !disable.iter().any(|e| e == name)
    };
    Shapes {
        identity_columns: on("identity", IDENTITY_COLUMNS),
        stored_generated_columns: on("stored", STORED_GENERATED_COLUMNS),
        hashed_keys: on("hashed_keys", HASHED_KEYS),
        home_changes_of_hashed_key_rows: on("hashed_key_home_changes", HASHED_KEY_HOME_CHANGES),
        default_identity_scope_changes: on(
            "default_identity_scope_changes",
            DEFAULT_IDENTITY_SCOPE_CHANGES,
        ),
        writes_to_foreign_homed_copies: on("foreign_copy_writes", WRITES_TO_FOREIGN_HOMED_COPIES),
    }
}

/// The case of `seed`: the same on every machine.
fn generate_case(seed: u64, shapes: &Shapes, txns: usize) -> Case {
    let schema = Schema::generate(&mut Rng::fork(seed, 1), shapes);
    let (policy, refused) = PolicyModel::generate(&mut Rng::fork(seed, 2), &schema, shapes);
    assert!(
        refused.is_empty(),
        "seed {seed}: the product's parser refused generated policies: {refused:#?}"
    );
    let policy_text = policy.render(&schema);
    let workload = workload::generate(&mut Rng::fork(seed, 3), &schema, &policy, shapes, txns);
    Case {
        seed,
        schema,
        policy,
        policy_text,
        workload,
    }
}

fn seeds() -> Vec<u64> {
    if let Ok(seed) = std::env::var("MERIDIAN_CHECK_SEED") {
        return vec![seed.trim().parse().expect("MERIDIAN_CHECK_SEED: a number")];
    }
    let runs: u64 = std::env::var("MERIDIAN_CHECK_RUNS")
        .ok()
        .map(|s| s.trim().parse().expect("MERIDIAN_CHECK_RUNS: a number"))
        .unwrap_or(DEFAULT_RUNS);
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_micros() as u64
        % 1_000_000_000;
    (0..runs).map(|i| base + i * 7919).collect()
}

fn report(transport: &str, case: &Case, workload: &Workload, outcome: &Outcome) -> String {
    let mut out = format!(
        "\n======== checker FAILED: transport {transport}, seed {} ({} transactions; {})\n\
         rerun: MERIDIAN_CHECK_SEED={} MERIDIAN_CHECK_TRANSPORT={transport} cargo test --test checker -- --nocapture\n\
         -------- schema\n{}\n-------- policy\n{}",
        case.seed,
        workload.txns.len(),
        outcome.timings,
        case.seed,
        case.schema.sql(),
        case.policy_text
    );
    if outcome.ignored > 0 {
        out.push_str(&format!(
            "-------- {} differences at old homes ignored (MERIDIAN_CHECK_IGNORE=old_home_copies)\n",
            outcome.ignored
        ));
    }
    for p in outcome.problems.iter().take(10) {
        out.push_str(&format!(
            "-------- problem: {}\n",
            oracle::show(&Some(p.clone()))
        ));
    }
    if !outcome.diffs.is_empty() {
        out.push_str(&format!(
            "-------- {} differences from the oracle, the first ones:\n",
            outcome.diffs.len()
        ));
        for d in outcome.diffs.iter().take(12) {
            out.push_str(&format!("{}\n", Shown(d, &case.schema)));
        }
    }
    for (region, log) in &outcome.logs {
        let lines = run::log_excerpt(log, 12);
        if !lines.is_empty() {
            out.push_str(&format!("-------- agent {region}: warnings and errors\n"));
            for l in lines {
                out.push_str(&l);
                out.push('\n');
            }
        }
    }
    out
}

/// Looks for a smaller failing case: only the tables that differ, then
/// the shortest failing prefix of the transactions (binary search).
async fn shrink(
    case: &Case,
    outcome: &Outcome,
    kafka: bool,
    options: RunOptions,
) -> anyhow::Result<Option<(Workload, Outcome)>> {
    let mut best: Option<(Workload, Outcome)> = None;
    let mut current = case.workload.clone();
    let mut tables: Vec<usize> = outcome.diffs.iter().map(|d| d.table()).collect();
    tables.sort();
    tables.dedup();
    if !tables.is_empty() && tables.len() < case.schema.tables.len() {
        let fewer = current.only_tables(&tables);
        let o = run::run(case, &fewer, kafka, options).await?;
        eprintln!(
            "checker: shrink to tables {tables:?}: {}",
            if o.failed() { "still fails" } else { "passes" }
        );
        if o.failed() {
            current = fewer.clone();
            best = Some((fewer, o));
        }
    }
    let (mut lo, mut hi) = (1, current.txns.len());
    while lo < hi {
        let mid = (lo + hi) / 2;
        let candidate = current.prefix(mid);
        let o = run::run(case, &candidate, kafka, options).await?;
        eprintln!(
            "checker: shrink to the first {mid} of {} transactions: {}",
            current.txns.len(),
            if o.failed() { "still fails" } else { "passes" }
        );
        if o.failed() {
            hi = mid;
            best = Some((candidate, o));
        } else {
            lo = mid + 1;
        }
    }
    Ok(best)
}

async fn check(kafka: bool) -> anyhow::Result<()> {
    let transport = if kafka { "kafka" } else { "grpc" };
    if let Ok(only) = std::env::var("MERIDIAN_CHECK_TRANSPORT")
        && only != transport
    {
        eprintln!("checker: {transport} skipped (MERIDIAN_CHECK_TRANSPORT={only})");
        return Ok(());
    }
    let shapes = shapes();
    let options = run_options();
    if options.ignore_old_home_copies {
        eprintln!(
            "checker: MERIDIAN_CHECK_IGNORE=old_home_copies: copies held by a row's previous home regions are NOT compared"
        );
    }
    if options.ignore_stale_dropped_columns {
        eprintln!(
            "checker: MERIDIAN_CHECK_IGNORE=stale_dropped_columns: columns the deciding rule does not send are NOT compared"
        );
    }
    let txns: usize = std::env::var("MERIDIAN_CHECK_TXNS")
        .ok()
        .map(|s| s.trim().parse().expect("MERIDIAN_CHECK_TXNS: a number"))
        .unwrap_or(DEFAULT_TXNS);
    let mut failed = Vec::new();
    for seed in seeds() {
        let case = generate_case(seed, &shapes, txns);
        let started = Instant::now();
        eprintln!(
            "checker: {transport} seed {seed} (MERIDIAN_CHECK_SEED={seed} to rerun): {} tables, {} rules, {} transactions",
            case.schema.tables.len(),
            case.policy.rules.len(),
            case.workload.txns.len()
        );
        let outcome = run::run(&case, &case.workload, kafka, options).await?;
        eprintln!(
            "checker: {transport} seed {seed}: {} in {:.1} s ({})",
            if outcome.failed() { "FAILED" } else { "ok" },
            started.elapsed().as_secs_f64(),
            outcome.timings
        );
        if !outcome.failed() {
            continue;
        }
        eprintln!("{}", report(transport, &case, &case.workload, &outcome));
        let dir = run::artifacts_dir(transport, seed);
        run::write_case(&dir, &case, &case.workload, &outcome)?;
        eprintln!("checker: the whole case is in {}", dir.display());
        if std::env::var("MERIDIAN_CHECK_SHRINK").is_ok_and(|v| v == "1") {
            match shrink(&case, &outcome, kafka, options).await? {
                Some((smaller, o)) => {
                    let dir = dir.join("shrunk");
                    run::write_case(&dir, &case, &smaller, &o)?;
                    eprintln!("{}", report(transport, &case, &smaller, &o));
                    eprintln!(
                        "checker: a smaller failing case ({} transactions) is in {}",
                        smaller.txns.len(),
                        dir.display()
                    );
                }
                None => eprintln!("checker: no smaller failing case found"),
            }
        }
        failed.push(seed);
    }
    anyhow::ensure!(
        failed.is_empty(),
        "checker over {transport}: seeds {failed:?} failed (reports above; cases in target/test-artifacts/checker/)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cases_converge_to_the_oracle_over_grpc() -> anyhow::Result<()> {
    check(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_cases_converge_to_the_oracle_over_kafka() -> anyhow::Result<()> {
    check(true).await
}

#[test]
fn cases_are_deterministic_per_seed_and_consistent() {
    let all = Shapes {
        identity_columns: true,
        stored_generated_columns: true,
        hashed_keys: true,
        home_changes_of_hashed_key_rows: true,
        default_identity_scope_changes: true,
        writes_to_foreign_homed_copies: true,
    };
    for shapes in [shapes(), all] {
        for seed in 0..60 {
            let a = generate_case(seed, &shapes, 40);
            let b = generate_case(seed, &shapes, 40);
            assert_eq!(a.schema.sql(), b.schema.sql());
            assert_eq!(a.policy_text, b.policy_text);
            let (wa, wb) = (a.workload.sql(&a.schema), b.workload.sql(&b.schema));
            assert_eq!(wa, wb, "seed {seed}");
            // a prefix and a table subset are workloads of their own
            let rows = a.workload.final_rows(&a.schema);
            let _ = a.workload.prefix(7).final_rows(&a.schema);
            let _ = a.workload.only_tables(&[0]).final_rows(&a.schema);
            // the oracle can be computed, and every row goes home whole
            let e = oracle::expected(
                &a.schema,
                &a.policy,
                &rows,
                &Default::default(),
                b"k",
                false,
            );
            let total: usize = e.iter().flatten().map(|t| t.len()).sum();
            assert!(total >= rows.len(), "seed {seed}");
        }
    }
}

#[test]
fn default_shapes_leave_out_the_known_open_ones() {
    let shapes = Shapes {
        identity_columns: IDENTITY_COLUMNS,
        stored_generated_columns: STORED_GENERATED_COLUMNS,
        hashed_keys: HASHED_KEYS,
        home_changes_of_hashed_key_rows: HASHED_KEY_HOME_CHANGES,
        default_identity_scope_changes: DEFAULT_IDENTITY_SCOPE_CHANGES,
        writes_to_foreign_homed_copies: WRITES_TO_FOREIGN_HOMED_COPIES,
    };
    let mut moves = 0;
    for seed in 0..100 {
        let case = generate_case(seed, &shapes, 40);
        let mut rows = workload::Rows::new();
        for txn in &case.workload.txns {
            for op in &txn.ops {
                if let workload::Op::Update { table, keys, set } = op {
                    let t = &case.schema.tables[*table];
                    if set.iter().any(|(c, _)| *c == t.home) {
                        moves += 1;
                        assert!(t.full_identity, "seed {seed}: a home change under DEFAULT");
                        assert!(
                            !case.policy.key_hashed[*table],
                            "seed {seed}: a home change of a row whose key crosses hashed"
                        );
                        assert_eq!(keys.len(), 1);
                    }
                }
                assert!(!matches!(op, workload::Op::TouchCopy { .. }));
                workload::apply(&case.schema, &mut rows, op);
            }
        }
    }
    assert!(moves > 50, "home changes are generated: {moves}");
}
