//! Initial sync end to end: stores that already hold rows when their agents
//! first start are copied to each other, through the residency policy,
//! while writes continue and agents are killed (-9) mid-copy; new tables
//! and copies asked for with `meridian sync start`. Checked against the
//! source stores: what must arrive (in what form), what must not, and no
//! lost or extra row.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use meridian_testkit::{Deployment, Spec};
use sqlx::PgPool;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

const SCHEMA: &str = "
CREATE TABLE accounts (id bigint PRIMARY KEY, home text NOT NULL, plan text NOT NULL,
                       email text, secret text);
CREATE TABLE events (tenant integer, seq bigint, home text NOT NULL, kind text, body text,
                     PRIMARY KEY (tenant, seq));
CREATE TABLE notes (id text PRIMARY KEY, home text NOT NULL, body text, tags text[]);
-- a conditional rule needs whole old rows to route deletes (README)
ALTER TABLE accounts REPLICA IDENTITY FULL;";

const TABLES: &[(&str, &str, &str)] = &[
    ("public.accounts", "id", "home"),
    ("public.events", "tenant,seq", "home"),
    ("public.notes", "id", "home"),
];

/// na's accounts reach eu only on the free and pro plans, without their
/// secret; everything of eu's reaches na.
const POLICY: &str = r#"
version = 1

[[rules]]
name = "na-accounts-abroad"
table = "public.accounts"
from = ["na"]
to = ["eu"]
when = [{ column = "plan", in = ["free", "pro"] }]
columns = { id = "keep", home = "keep", plan = "keep", email = "keep", secret = "null" }

[[rules]]
name = "na-events"
table = "public.events"
from = ["na"]
to = ["eu"]
columns = { tenant = "keep", seq = "keep", home = "keep", kind = "keep", body = "keep" }

[[rules]]
name = "na-notes"
table = "public.notes"
from = ["na"]
to = ["eu"]
columns = { id = "keep", home = "keep", body = "keep", tags = "keep" }

[[rules]]
name = "eu-accounts"
table = "public.accounts"
from = ["eu"]
to = ["na"]
columns = { id = "keep", home = "keep", plan = "keep", email = "keep", secret = "keep" }

[[rules]]
name = "eu-events"
table = "public.events"
from = ["eu"]
to = ["na"]
columns = { tenant = "keep", seq = "keep", home = "keep", kind = "keep", body = "keep" }

[[rules]]
name = "eu-notes"
table = "public.notes"
from = ["eu"]
to = ["na"]
columns = { id = "keep", home = "keep", body = "keep", tags = "keep" }
"#;

/// Rows of `region`'s own, `rows` in all: 30% accounts (every tenth on
/// the enterprise plan, which never leaves na), 60% events, 10% notes
/// whose keys and bodies hold tabs, newlines, quotes and backslashes.
fn seed(region: &str, rows: i64, offset: i64) -> String {
    let accounts = rows * 3 / 10;
    let events = rows * 6 / 10;
    let notes = rows - accounts - events;
    format!(
        "INSERT INTO accounts
           SELECT {offset} + i, '{region}',
                  CASE WHEN i % 10 = 0 THEN 'enterprise' WHEN i % 2 = 0 THEN 'pro' ELSE 'free' END,
                  'user' || i || '@{region}.example', 'canary-secret-{region}-' || i
             FROM generate_series(1, {accounts}) i;
         INSERT INTO events
           SELECT i % 1000, {offset} + i, '{region}', 'kind-' || (i % 7), md5(i::text) || repeat('x', i % 50)
             FROM generate_series(1, {events}) i;
         INSERT INTO notes
           SELECT '{region}-' || lpad(i::text, 8, '0') || E'\\t''\\\\', '{region}',
                  E'line one\\nline \\\\two\\t' || i, ARRAY['a b', 'c\"d', NULL]
             FROM generate_series(1, {notes}) i;
         ANALYZE;"
    )
}

/// Keeps writing in `region` until `stop`: updates, deletes and inserts of
/// its own rows (plans move between free and pro, enterprise accounts are
/// promoted, so rows become allowed for eu mid-copy). Counts inserts.
fn write_continuously(
    pool: PgPool,
    region: &'static str,
    rows: i64,
    offset: i64,
    stop: Arc<AtomicBool>,
    inserted: Arc<AtomicI64>,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    tokio::spawn(async move {
        let accounts = rows * 3 / 10;
        let mut step = 0u64;
        let mut next_id = offset + 10 * rows;
        while !stop.load(Ordering::Relaxed) {
            step += 1;
            next_id += 1;
            let sql = format!(
                "BEGIN;
                 UPDATE accounts SET plan = CASE plan WHEN 'free' THEN 'pro' WHEN 'pro' THEN 'free'
                                                      ELSE 'free' END,
                        email = 'moved' || {step} || '@{region}.example'
                  WHERE id = {offset} + 1 + (random() * {accounts})::bigint AND home = '{region}';
                 DELETE FROM accounts WHERE id = {offset} + 1 + (random() * {accounts})::bigint
                    AND home = '{region}';
                 INSERT INTO accounts VALUES ({next_id}, '{region}', 'pro', 'new{step}@x', 'canary-secret-{region}-new');
                 UPDATE events SET body = 'rewritten ' || {step}
                  WHERE (tenant, seq) = (SELECT tenant, seq FROM events
                                          WHERE home = '{region}' AND seq >= {offset} + (random() * {rows} * 0.6)::bigint
                                          ORDER BY seq LIMIT 1);
                 DELETE FROM notes WHERE id = (SELECT id FROM notes WHERE home = '{region}'
                                                 AND id >= '{region}-' || lpad(((random() * {rows} * 0.1)::bigint)::text, 8, '0')
                                               ORDER BY id LIMIT 1);
                 COMMIT;"
            );
            sqlx::raw_sql(&sql).execute(&pool).await?;
            inserted.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(step)
    })
}

/// Rows and expected rows of every copy from `source`'s store.
async fn copied(pool: &PgPool) -> anyhow::Result<(i64, i64, bool)> {
    let (rows, expected, all_done): (i64, i64, bool) = sqlx::query_as(
        "SELECT coalesce(sum(r.rows), 0)::bigint,
                (SELECT coalesce(sum(rows_expected), 0)::bigint FROM meridian.sync_tables),
                (SELECT bool_and(state = 'done') FROM meridian.sync_tables)
           FROM meridian.sync_ranges r JOIN meridian.sync_tables t USING (destination, table_name, copy_id)",
    )
    .fetch_one(pool)
    .await?;
    Ok((rows, expected, all_done))
}

async fn wait_copied(d: &Deployment, region: &str, fraction: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (rows, expected, done) = copied(d.pool(region)).await?;
        if done || (expected > 0 && rows as f64 >= expected as f64 * fraction) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{region}'s copy reached {rows} of {expected} rows in 300 s; log:\n{}",
            d.agent_log(region)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// md5 and count of a query's rows.
async fn digest(pool: &PgPool, query: &str) -> anyhow::Result<(i64, String)> {
    Ok(sqlx::query_as(&format!(
        "SELECT count(*), coalesce(md5(string_agg(q::text, '|' ORDER BY q::text)), '') FROM ({query}) q"
    ))
    .fetch_one(pool)
    .await?)
}

/// What each store must hold of the other's rows, as (query at the
/// source, query at the destination).
fn expectations(source: &str) -> Vec<(String, String)> {
    let accounts = match source {
        "na" => "SELECT id, home, plan, email, NULL::text AS secret FROM accounts \
                 WHERE home = 'na' AND plan IN ('free', 'pro')"
            .to_owned(),
        _ => format!("SELECT id, home, plan, email, secret FROM accounts WHERE home = '{source}'"),
    };
    vec![
        (
            accounts,
            format!("SELECT id, home, plan, email, secret FROM accounts WHERE home = '{source}'"),
        ),
        (
            format!("SELECT * FROM events WHERE home = '{source}'"),
            format!("SELECT * FROM events WHERE home = '{source}'"),
        ),
        (
            format!("SELECT * FROM notes WHERE home = '{source}'"),
            format!("SELECT * FROM notes WHERE home = '{source}'"),
        ),
    ]
}

async fn wait_equal(d: &Deployment, source: &str, destination: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    for (at_source, at_destination) in expectations(source) {
        loop {
            let want = digest(d.pool(source), &at_source).await?;
            let got = digest(d.pool(destination), &at_destination).await?;
            if want == got {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{destination} holds {got:?} of {source}'s rows for `{at_source}`, expected \
                 {want:?}\n--- {source}:\n{}\n--- {destination}:\n{}",
                d.agent_log(source),
                d.agent_log(destination)
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// na and eu, their stores holding `seed` (`(region, sql)`) before the
/// agents start.
async fn start(
    seed: &[(&str, &str)],
    tables: &[(&str, &str, &str)],
    policy: Option<&str>,
    extra_topology: &str,
    kafka: bool,
) -> anyhow::Result<Deployment> {
    Deployment::start_seeded(
        binary(),
        &Spec {
            regions: &["na", "eu"],
            schema: SCHEMA,
            tables,
            proxied: &[],
            extra_topology,
            policy,
            agent_env: &[],
            global_schema: None,
            kafka,
        },
        seed,
    )
    .await
}

/// Rows to seed: `MERIDIAN_SYNC_ROWS` (default 1,000,000 in na, a tenth of
/// that in eu).
fn rows() -> i64 {
    std::env::var("MERIDIAN_SYNC_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

async fn copies_existing_rows_through_kills(kafka: bool, na_rows: i64) -> anyhow::Result<()> {
    let eu_rows = na_rows / 10;
    // eu's rows as na held them before: stale copies, never shipped back
    let stale = format!(
        "{}; UPDATE accounts SET email = 'stale', secret = 'canary-secret-stale' WHERE home = 'eu';
         UPDATE events SET body = 'stale' WHERE home = 'eu';",
        seed("eu", eu_rows, 1 << 40)
    );
    let na_seed = seed("na", na_rows, 0);
    let na = format!("{na_seed}{stale}");
    let eu = seed("eu", eu_rows, 1 << 40);
    let started = Instant::now();
    let mut d = start(&[("na", &na), ("eu", &eu)], TABLES, Some(POLICY), "", kafka).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let inserted = Arc::new(AtomicI64::new(0));
    let writers = [
        write_continuously(
            d.pool("na").clone(),
            "na",
            na_rows,
            0,
            stop.clone(),
            inserted.clone(),
        ),
        write_continuously(
            d.pool("eu").clone(),
            "eu",
            eu_rows,
            1 << 40,
            stop.clone(),
            Arc::new(AtomicI64::new(0)),
        ),
    ];
    // kill -9 the source mid-copy, then the destination
    wait_copied(&d, "na", 0.25).await?;
    let (before_kill, expected, _) = copied(d.pool("na")).await?;
    d.agent("na").kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.agent("na").restart()?;
    wait_copied(&d, "na", 0.6).await?;
    d.agent("eu").kill9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    d.agent("eu").restart()?;
    wait_copied(&d, "na", 1.0).await?;
    wait_copied(&d, "eu", 1.0).await?;
    let copy_seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await??;
    }
    let (after, _, done) = copied(d.pool("na")).await?;
    assert!(done, "every table of na's copy is done");
    assert!(
        before_kill > 0 && before_kill < expected,
        "the kill came mid-copy: {before_kill} of {expected}"
    );
    // a resumed copy records each chunk once: it does not start over after
    // a kill (rows inserted while copying may be copied too)
    let inserted = inserted.load(Ordering::Relaxed);
    assert!(
        after <= expected + inserted,
        "na recorded {after} rows for {expected} expected and {inserted} inserted: a range was copied twice"
    );
    wait_equal(&d, "na", "eu").await?;
    wait_equal(&d, "eu", "na").await?;
    // the policy, checked directly: no enterprise account and no secret of
    // na's left na
    let (enterprise, secrets): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE plan = 'enterprise'),
                count(*) FILTER (WHERE secret IS NOT NULL)
           FROM accounts WHERE home = 'na'",
    )
    .fetch_one(d.pool("eu"))
    .await?;
    assert_eq!(
        (enterprise, secrets),
        (0, 0),
        "eu holds na's forbidden rows or values"
    );
    // the stale copies in na were overwritten by eu's rows
    let stale: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM accounts WHERE email = 'stale')
              + (SELECT count(*) FROM events WHERE body = 'stale')",
    )
    .fetch_one(d.pool("na"))
    .await?;
    assert_eq!(stale, 0, "na kept stale copies of eu's rows");
    // the operator's view says the same
    let out = std::process::Command::new(binary())
        .args(["sync", "status", "--config"])
        .arg(&d.config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for link in ["na->eu", "eu->na"] {
        for table in ["public.accounts", "public.events", "public.notes"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(link) && l.contains(table) && l.contains(" done ")),
                "{link} {table} not done in:\n{text}"
            );
        }
    }
    eprintln!(
        "initial sync of {} rows (na) and {} rows (eu) with kills: {copy_seconds:.1} s, {:.0} rows/s",
        na_rows,
        eu_rows,
        (na_rows + eu_rows) as f64 / copy_seconds
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_store_is_copied_while_writes_continue_and_agents_die() -> anyhow::Result<()> {
    copies_existing_rows_through_kills(false, rows()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_store_is_copied_over_kafka_while_agents_die() -> anyhow::Result<()> {
    copies_existing_rows_through_kills(true, rows() / 5).await
}

/// Waits until every copy recorded in `region`'s store is done.
async fn wait_all_done(d: &Deployment, region: &str, pool: &PgPool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // (pending, known); an error while the agent has not migrated yet
        let counts: Result<(i64, i64), _> = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state IN ('waiting', 'copying')), count(*)
               FROM meridian.sync_tables",
        )
        .fetch_one(pool)
        .await;
        if let Ok((0, known)) = counts
            && known > 0
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{region}'s copies are not done after 120 s; log:\n{}",
            d.agent_log(region)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_to_the_topology_is_copied_then_streamed() -> anyhow::Result<()> {
    let na = seed("na", 30_000, 0);
    // the policy without notes' rules, until notes joins the topology
    let without_notes: String = POLICY
        .split("[[rules]]")
        .filter(|rule| !rule.contains("public.notes"))
        .collect::<Vec<_>>()
        .join("[[rules]]");
    let mut d = start(
        &[("na", &na)],
        &TABLES[..2],
        Some(&without_notes),
        "",
        false,
    )
    .await?;
    wait_all_done(&d, "na", &d.pool("na").clone()).await?;
    let notes: i64 = sqlx::query_scalar("SELECT count(*) FROM notes")
        .fetch_one(d.pool("eu"))
        .await?;
    assert_eq!(notes, 0, "notes is not replicated yet");
    // the table joins the topology; receivers first, then the source
    let mut topology = std::fs::read_to_string(&d.config)?;
    topology.push_str(
        "\n[[tables]]\nname = \"public.notes\"\nprimary_key = [\"id\"]\nhome_column = \"home\"\n",
    );
    std::fs::write(&d.config, topology)?;
    d.write_policy(POLICY)?;
    d.agent("eu").restart()?;
    d.agent("na").restart()?;
    sqlx::raw_sql("INSERT INTO notes VALUES ('na-after', 'na', 'written after the restart', NULL)")
        .execute(d.pool("na"))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state: Option<(String, String)> = sqlx::query_as(
            "SELECT state, reason FROM meridian.sync_tables
              WHERE destination = 'eu' AND table_name = 'public.notes'",
        )
        .fetch_optional(d.pool("na"))
        .await?;
        if let Some((state, reason)) = &state {
            assert_eq!(reason, "table added to the topology");
            if state == "done" {
                break;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "notes not copied in 120 s ({state:?}); log:\n{}",
            d.agent_log("na")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_equal(&d, "na", "eu").await?;
    // the tables copied before were not copied again
    let (accounts_copies, requested): (i64, String) = sqlx::query_as(
        "SELECT count(*), min(reason) FROM meridian.sync_tables
          WHERE destination = 'eu' AND table_name = 'public.accounts' AND state = 'done'",
    )
    .fetch_one(d.pool("na"))
    .await?;
    assert_eq!((accounts_copies, requested.as_str()), (1, "new link"));
    // and a copy asked for again runs again, with a progress line at the end
    let out = std::process::Command::new(binary())
        .args([
            "sync",
            "start",
            "--link",
            "na:eu",
            "--table",
            "public.accounts",
            "--config",
        ])
        .arg(&d.config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("100.0%") && text.contains("copy from na to eu done"),
        "{text}"
    );
    let reason: String = sqlx::query_scalar(
        "SELECT reason FROM meridian.sync_tables
          WHERE destination = 'eu' AND table_name = 'public.accounts' AND state = 'done'",
    )
    .fetch_one(d.pool("na"))
    .await?;
    assert_eq!(reason, "requested (meridian sync start)");
    // a table the topology does not replicate is refused by name
    let out = std::process::Command::new(binary())
        .args([
            "sync",
            "start",
            "--link",
            "na:eu",
            "--table",
            "public.nope",
            "--config",
        ])
        .arg(&d.config)
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--table public.nope: not a replicated table"),
        "{err}"
    );
    wait_equal(&d, "na", "eu").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_added_to_a_running_deployment_gets_its_peers_rows_and_sends_its_own()
-> anyhow::Result<()> {
    let na = seed("na", 20_000, 0);
    let eu = seed("eu", 20_000, 1 << 40);
    let mut d = start(
        &[("na", &na), ("eu", &eu)],
        TABLES,
        None,
        "[security]\nplaintext = true\n",
        false,
    )
    .await?;
    for r in ["na", "eu"] {
        wait_all_done(&d, r, &d.pool(r).clone()).await?;
    }
    let copies_to_eu = "SELECT string_agg(copy_id::text, ',' ORDER BY table_name)
                          FROM meridian.sync_tables WHERE destination = 'eu'";
    let before: String = sqlx::query_scalar(copies_to_eu)
        .fetch_one(d.pool("na"))
        .await?;
    // apac's store already holds its own rows when it joins
    let apac = meridian_testkit::PgCluster::start()?;
    let apac_pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&apac.url("postgres"))
        .await?;
    sqlx::raw_sql(SCHEMA).execute(&apac_pool).await?;
    sqlx::raw_sql(&seed("apac", 10_000, 2 << 40))
        .execute(&apac_pool)
        .await?;
    let mut topology = std::fs::read_to_string(&d.config)?;
    topology.push_str(&format!(
        "\n[regions.apac]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n",
        apac.url("postgres"),
        meridian_testkit::free_port()
    ));
    std::fs::write(&d.config, topology)?;
    // writes go on in na while the region joins
    sqlx::raw_sql("INSERT INTO accounts VALUES (999999999, 'na', 'pro', 'late@na', NULL)")
        .execute(d.pool("na"))
        .await?;
    let _apac_agent =
        meridian_testkit::AgentProcess::spawn(binary(), &d.config, "apac", apac.dir())?;
    d.agent("na").restart()?;
    d.agent("eu").restart()?;
    for r in ["na", "eu"] {
        wait_all_done(&d, r, &d.pool(r).clone()).await?;
    }
    wait_all_done(&d, "apac", &apac_pool).await?;
    // every store holds every row of every region (no policy)
    let deadline = Instant::now() + Duration::from_secs(120);
    for table in ["accounts", "events", "notes"] {
        loop {
            let query = format!("SELECT * FROM {table}");
            let prints = [
                digest(d.pool("na"), &query).await?,
                digest(d.pool("eu"), &query).await?,
                digest(&apac_pool, &query).await?,
            ];
            if prints[0] == prints[1] && prints[1] == prints[2] {
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{table} differs between na, eu and apac: {prints:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let apac_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM accounts WHERE home = 'apac'")
        .fetch_one(d.pool("na"))
        .await?;
    assert_eq!(apac_rows, 3_000, "apac's existing accounts reached na");
    // the new links were copied for being new; na -> eu was not copied again
    let after: String = sqlx::query_scalar(copies_to_eu)
        .fetch_one(d.pool("na"))
        .await?;
    assert_eq!(before, after, "na's tables were copied to eu again");
    let reasons: Vec<(String, String)> =
        sqlx::query_as("SELECT DISTINCT destination, reason FROM meridian.sync_tables ORDER BY 1")
            .fetch_all(d.pool("na"))
            .await?;
    assert_eq!(
        reasons,
        vec![
            ("apac".to_owned(), "new link".to_owned()),
            ("eu".to_owned(), "new link".to_owned())
        ]
    );
    Ok(())
}

/// `meridian policy <args> --config <the deployment's>`: success and output.
fn policy_command(d: &Deployment, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(binary())
        .arg("policy")
        .args(args)
        .arg("--config")
        .arg(&d.config)
        .output()
        .expect("run meridian policy");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Waits until na's copy of `table` to eu, queued for `reason`, is done.
async fn wait_copy(d: &Deployment, table: &str, reason: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let state: Option<String> = sqlx::query_scalar(
            "SELECT state FROM meridian.sync_tables
              WHERE destination = 'eu' AND table_name = $1 AND reason = $2",
        )
        .bind(table)
        .bind(reason)
        .fetch_optional(d.pool("na"))
        .await?;
        if state.as_deref() == Some("done") {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{table}'s copy for {reason:?} is {state:?} after 120 s; log:\n{}",
            d.agent_log("na")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_that_widens_backfills_and_one_that_tightens_rewrites() -> anyhow::Result<()> {
    let na = seed("na", 20_000, 0);
    let mut d = start(&[("na", &na)], TABLES, Some(POLICY), "", false).await?;
    wait_all_done(&d, "na", &d.pool("na").clone()).await?;
    wait_equal(&d, "na", "eu").await?;
    let copies = "SELECT string_agg(copy_id::text, ',' ORDER BY table_name)
                    FROM meridian.sync_tables WHERE table_name <> 'public.accounts'";
    let untouched: String = sqlx::query_scalar(copies).fetch_one(d.pool("na")).await?;

    // wider: enterprise accounts and secrets may go to eu
    let dir = d.config.parent().expect("folder");
    let wider = POLICY
        .replace("version = 1", "version = 2")
        .replace(
            r#"in = ["free", "pro"]"#,
            r#"in = ["free", "pro", "enterprise"]"#,
        )
        .replace(
            r#"email = "keep", secret = "null" }"#,
            r#"email = "keep", secret = "keep" }"#,
        );
    std::fs::write(dir.join("wider.toml"), &wider)?;
    let (ok, out) = policy_command(
        &d,
        &[
            "diff",
            &dir.join("policy.toml").display().to_string(),
            &dir.join("wider.toml").display().to_string(),
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains("policy version 1 -> 2: 1 route(s) change")
            && out.contains("public.accounts na -> eu:")
            && out.contains(r#"+ rows where plan in ["free", "pro", "enterprise"] are sent"#)
            && out.contains("+ column secret: null -> kept")
            && out.contains("copies the table to eu again"),
        "{out}"
    );
    d.write_policy(&wider)?;
    let (ok, out) = policy_command(&d, &["reload"]);
    assert!(ok, "{out}");
    wait_copy(&d, "public.accounts", "policy version 2").await?;
    let want = digest(d.pool("na"), "SELECT * FROM accounts WHERE home = 'na'").await?;
    let got = digest(d.pool("eu"), "SELECT * FROM accounts WHERE home = 'na'").await?;
    assert_eq!(
        got, want,
        "eu holds every na account whole after the widening"
    );
    assert_eq!(
        sqlx::query_scalar::<_, String>(copies)
            .fetch_one(d.pool("na"))
            .await?,
        untouched,
        "routes the change did not touch were not copied again"
    );

    // narrower: secrets are nulled again for the accounts still sent
    let narrower = POLICY.replace("version = 1", "version = 3");
    std::fs::write(dir.join("narrower.toml"), &narrower)?;
    let (ok, out) = policy_command(
        &d,
        &[
            "diff",
            &dir.join("wider.toml").display().to_string(),
            &dir.join("narrower.toml").display().to_string(),
        ],
    );
    assert!(
        ok && out.contains("- column secret: kept -> null")
            && out.contains("rows no longer sent stay in eu until deleted there"),
        "{out}"
    );
    d.write_policy(&narrower)?;
    let (ok, out) = policy_command(&d, &["reload"]);
    assert!(ok, "{out}");
    wait_copy(&d, "public.accounts", "policy version 3").await?;
    let (want, got) = (
        digest(
            d.pool("na"),
            "SELECT id, home, plan, email, NULL::text FROM accounts
              WHERE home = 'na' AND plan IN ('free', 'pro')",
        )
        .await?,
        digest(
            d.pool("eu"),
            "SELECT id, home, plan, email, secret FROM accounts
              WHERE home = 'na' AND plan IN ('free', 'pro')",
        )
        .await?,
    );
    assert_eq!(got, want, "the accounts still sent hold no secret at eu");
    // the copies went through the policy: the audit counts them (three
    // copies of 6,000 accounts so far)
    let audited = wait_audited(&d, 3 * 6_000).await?;
    // a policy changed while the source's agent is down is compared at its
    // start with the one its copies were queued for (receivers first)
    d.agent("na").kill9();
    d.write_policy(&wider.replace("version = 2", "version = 4"))?;
    d.agent("eu").restart()?;
    d.agent("na").restart()?;
    wait_copy(&d, "public.accounts", "policy version 4").await?;
    let want = digest(d.pool("na"), "SELECT * FROM accounts WHERE home = 'na'").await?;
    let got = digest(d.pool("eu"), "SELECT * FROM accounts WHERE home = 'na'").await?;
    assert_eq!(got, want, "the change made while na was down was copied");
    wait_audited(&d, audited + 6_000).await?;
    Ok(())
}

/// Waits until na's residency audit counts at least `at_least` account
/// changes for eu (flushed every 2 s); returns the count.
async fn wait_audited(d: &Deployment, at_least: i64) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audited: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(changes), 0)::bigint FROM meridian.residency_audit
              WHERE table_name = 'public.accounts' AND destination_region = 'eu'",
        )
        .fetch_one(d.pool("na"))
        .await?;
        if audited >= at_least {
            return Ok(audited);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the audit counted {audited} account changes, expected at least {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `meridian status --json --warn-seconds <warn>`: exit code and the link
/// `source -> destination`.
fn link_status(
    d: &Deployment,
    source: &str,
    destination: &str,
    warn: &str,
) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
    d.link_status_with(
        binary(),
        source,
        destination,
        &["--warn-seconds", warn, "--critical-seconds", "60"],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_held_back_by_a_lock_is_unhealthy_in_status_until_it_moves() -> anyhow::Result<()> {
    let na = seed("na", 10_000, 0);
    let d = start(&[("na", &na)], TABLES, Some(POLICY), "", false).await?;
    wait_all_done(&d, "na", &d.pool("na").clone()).await?;
    // a long transaction writes accounts; a copy is asked for meanwhile
    let mut holder = d.pool("na").begin().await?;
    sqlx::query("UPDATE accounts SET email = 'held' WHERE id = 1")
        .execute(&mut *holder)
        .await?;
    let out = std::process::Command::new(binary())
        .args([
            "sync",
            "start",
            "--detach",
            "--link",
            "na:eu",
            "--table",
            "public.accounts",
            "--config",
        ])
        .arg(&d.config)
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, link) = link_status(&d, "na", "eu", "1")?;
        let problem = link["problem"].as_str().unwrap_or_default().to_owned();
        if link["copy"]["tables_pending"] == 1
            && problem.contains("initial sync failing")
            && problem.contains("could not lock the table")
        {
            assert_eq!(link["health"], "critical", "{link}");
            assert_eq!(code, Some(1), "status exits unhealthy: {link}");
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the held-back copy never showed as failing: {link}\n{}",
            d.agent_log("na")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // what the dashboard shows per table: na's copy of accounts to eu
    let (_, report) = d.status(binary())?;
    let na_copies = report["regions"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["region"] == "na"))
        .map(|r| r["copies"].clone())
        .unwrap_or_default();
    assert!(
        na_copies
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["destination"] == "eu"
                && c["table"] == "public.accounts"
                && c["state"] == "copying"
                && c["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("could not lock")))),
        "{na_copies}"
    );
    // meanwhile the application writes on: the copy never queues it
    sqlx::raw_sql("UPDATE accounts SET email = 'not held back' WHERE id = 2")
        .execute(d.pool("na"))
        .await?;
    // the transaction ends; the copy finishes and the link is healthy again
    holder.commit().await?;
    wait_copy(&d, "public.accounts", "requested (meridian sync start)").await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, link) = link_status(&d, "na", "eu", "30")?;
        if code == Some(0) && link["health"] == "ok" && link["copy"]["tables_pending"] == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the link is not healthy after its copy: {link}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    wait_equal(&d, "na", "eu").await?;
    Ok(())
}
