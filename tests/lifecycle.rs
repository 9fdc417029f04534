//! The edges of a link's life: a source that vanishes without closing its
//! stream, and a destination store that crashes right after acknowledging.

use std::path::Path;
use std::time::{Duration, Instant};

use meridian_testkit::{Deployment, Spec};

const SCHEMA: &str = "CREATE TABLE items (id bigint PRIMARY KEY, home text NOT NULL, v text);";

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

async fn start(proxied: &'static [&'static str]) -> anyhow::Result<Deployment> {
    start_over(proxied, false).await
}

async fn start_over(proxied: &'static [&'static str], kafka: bool) -> anyhow::Result<Deployment> {
    Deployment::start(
        binary(),
        &Spec {
            regions: &["na", "eu"],
            schema: SCHEMA,
            tables: &[("public.items", "id", "home")],
            proxied,
            extra_topology: "[replication]\nheartbeat_ms = 200\n",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka,
        },
    )
    .await
}

async fn insert(d: &Deployment, from: i64, to: i64) -> anyhow::Result<()> {
    for id in from..to {
        sqlx::query("INSERT INTO items VALUES ($1, 'na', 'v')")
            .bind(id)
            .execute(d.pool("na"))
            .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_gone_without_closing_its_stream_is_replaced_by_its_restart() -> anyhow::Result<()>
{
    // na reaches eu through a proxy that can freeze connections
    let mut d = start(&["eu"]).await?;
    insert(&d, 0, 10).await?;
    d.wait_converged("items", "id", 10, Duration::from_secs(60))
        .await?;

    // na's host vanishes: its open stream goes silent, no FIN reaches eu
    d.proxy("eu").freeze_open();
    d.agent("na").kill9();
    // na comes back (new connections pass) while eu still holds the old stream
    d.agent("na").restart()?;
    insert(&d, 10, 20).await?;
    let started = Instant::now();
    d.wait_converged("items", "id", 20, Duration::from_secs(30))
        .await?;
    println!(
        "applying again {} ms after the restart",
        started.elapsed().as_millis()
    );
    d.proxy("eu").cut();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acknowledged_batch_survives_a_destination_crash() -> anyhow::Result<()> {
    let d = start(&[]).await?;
    // the destination store commits asynchronously by default: the apply
    // session must commit durably regardless, before the Ack
    sqlx::query("ALTER SYSTEM SET synchronous_commit = off")
        .execute(d.pool("eu"))
        .await?;
    sqlx::query("SELECT pg_reload_conf()")
        .execute(d.pool("eu"))
        .await?;
    insert(&d, 0, 5).await?;
    d.wait_converged("items", "id", 5, Duration::from_secs(60))
        .await?;

    for round in 1..=3i64 {
        insert(&d, round * 1000, round * 1000 + 300).await?;
        let target: i64 = sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0')::bigint")
            .fetch_one(d.pool("na"))
            .await?;
        // the moment na's slot is confirmed (eu acknowledged), eu crashes
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let confirmed: Option<i64> = sqlx::query_scalar(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots
                  WHERE slot_name = 'meridian_na_to_eu'",
            )
            .fetch_optional(d.pool("na"))
            .await?;
            if confirmed.is_some_and(|c| c >= target) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "eu never acknowledged");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        d.cluster("eu").crash()?;
        d.cluster("eu").restart()?;
        // everything acknowledged is there; the link carries on
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM items WHERE id BETWEEN $1 AND $1 + 299")
                .bind(round * 1000)
                .fetch_one(d.pool("eu"))
                .await?;
        assert_eq!(n, 300, "round {round}: acknowledged rows lost in the crash");
    }
    insert(&d, 9000, 9010).await?;
    d.wait_converged("items", "id", 5 + 3 * 300 + 10, Duration::from_secs(90))
        .await?;
    Ok(())
}

/// Waits until `region`'s metrics show its link to `peer` stopped; returns
/// the agent's log.
async fn wait_stopped(d: &Deployment, region: &str, peer: &str) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // a restarted agent may not serve metrics yet
        let metrics = d.metrics(region).await.unwrap_or_default();
        let stopped = metrics.lines().any(|l| {
            l.starts_with("meridian_link_state{")
                && l.contains(&format!("destination=\"{peer}\""))
                && l.contains("state=\"stopped\"")
                && l.ends_with(" 1")
        });
        if stopped {
            return Ok(d.agent_log(region));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "link {region} -> {peer} never stopped; log:\n{}",
            d.agent_log(region)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `meridian status --json` for the deployment: the link's state and error.
fn link_status(
    d: &Deployment,
    source: &str,
    destination: &str,
) -> anyhow::Result<(String, String)> {
    let out = std::process::Command::new(binary())
        .args(["status", "--json", "--config"])
        .arg(&d.config)
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let text = json.to_string();
    let link = json["links"]
        .as_array()
        .and_then(|ls| {
            ls.iter()
                .find(|l| l["source"] == source && l["destination"] == destination)
        })
        .ok_or_else(|| anyhow::anyhow!("no link {source} -> {destination} in {text}"))?;
    Ok((
        link["state"].as_str().unwrap_or_default().to_owned(),
        link["last_error"].as_str().unwrap_or_default().to_owned(),
    ))
}

/// Waits until `pool` (a store outside the deployment) holds `rows` items.
async fn wait_count(pool: &sqlx::PgPool, rows: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items")
            .fetch_one(pool)
            .await?;
        if n == rows {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{n} items, never {rows}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Points na's agent at `store` (a promoted standby, a restored backup)
/// and restarts it; its agent must be stopped.
fn restart_na_on(d: &mut Deployment, store: &meridian_testkit::PgCluster) -> anyhow::Result<()> {
    let topology = std::fs::read_to_string(&d.config)?
        .replace(&d.cluster("na").url("postgres"), &store.url("postgres"));
    std::fs::write(&d.config, topology)?;
    d.agent("na").restart()
}

/// Waits until eu's items equal those of `na` (a store outside the
/// deployment) and number `rows`.
async fn wait_matches(d: &Deployment, na: &sqlx::PgPool, rows: i64) -> anyhow::Result<()> {
    let fingerprint = "SELECT count(*), md5(string_agg(t::text, '|' ORDER BY id)) FROM items t";
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let na: (i64, Option<String>) = sqlx::query_as(fingerprint).fetch_one(na).await?;
        let eu: (i64, Option<String>) = sqlx::query_as(fingerprint).fetch_one(d.pool("eu")).await?;
        if eu.0 == rows && eu == na {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "eu never matched na: {eu:?} vs {na:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn resync(d: &Deployment, link: &str) -> anyhow::Result<String> {
    let out = std::process::Command::new(binary())
        .args(["resync", "--yes", "--link", link, "--config"])
        .arg(&d.config)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(out.status.success(), "resync failed: {text}");
    Ok(text)
}

async fn count(d: &Deployment, region: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM items")
        .fetch_one(d.pool(region))
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_and_made_anew_stops_the_link_until_resync() -> anyhow::Result<()> {
    slot_dropped_and_made_anew(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_and_made_anew_stops_the_link_until_resync_over_kafka() -> anyhow::Result<()>
{
    slot_dropped_and_made_anew(true).await
}

async fn slot_dropped_and_made_anew(kafka: bool) -> anyhow::Result<()> {
    let mut d = start_over(&[], kafka).await?;
    insert(&d, 0, 10).await?;
    d.wait_converged("items", "id", 10, Duration::from_secs(60))
        .await?;
    d.agent("na").kill9();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sqlx::query("SELECT pg_drop_replication_slot('meridian_na_to_eu')")
        .execute(d.pool("na"))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "the slot stayed active");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // changes while there is no slot: a gap eu can never receive
    insert(&d, 10, 20).await?;
    sqlx::query("SELECT pg_create_logical_replication_slot('meridian_na_to_eu', 'pgoutput')")
        .execute(d.pool("na"))
        .await?;
    d.agent("na").restart()?;
    insert(&d, 20, 25).await?;

    let log = wait_stopped(&d, "na", "eu").await?;
    assert!(log.contains("meridian resync"), "{log}");
    let (state, error) = link_status(&d, "na", "eu")?;
    assert_eq!(state, "stopped", "{error}");
    assert!(
        error.contains("never reached eu") && error.contains("resync --config FILE --link na:eu"),
        "{error}"
    );
    assert!(
        !error.contains("  "),
        "one sentence, no stray indentation: {error}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(count(&d, "eu").await?, 10, "nothing applied after the gap");

    let out = resync(&d, "na:eu")?;
    assert!(
        out.contains("queued a copy of 25 row(s) of public.items"),
        "{out}"
    );
    d.wait_converged("items", "id", 25, Duration::from_secs(60))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_gone_back_in_time_stops_the_link_until_resync() -> anyhow::Result<()> {
    let mut d = start(&[]).await?;
    insert(&d, 0, 10).await?;
    d.wait_converged("items", "id", 10, Duration::from_secs(60))
        .await?;
    // as after na was restored to an earlier point: eu has applied beyond
    // the end of na's WAL
    d.agent("na").kill9();
    sqlx::query("UPDATE meridian.watermarks SET end_lsn = end_lsn + (1::bigint << 40) WHERE source_region = 'na'")
        .execute(d.pool("eu"))
        .await?;
    d.agent("na").restart()?;
    insert(&d, 10, 15).await?;
    let log = wait_stopped(&d, "na", "eu").await?;
    assert!(log.contains("went back in time"), "{log}");
    assert_eq!(count(&d, "eu").await?, 10);

    // a dry run changes nothing
    let out = std::process::Command::new(binary())
        .args(["resync", "--link", "na:eu", "--config"])
        .arg(&d.config)
        .output()?;
    assert!(String::from_utf8_lossy(&out.stdout).contains("dry run"));
    // resync needs the link not to hold the slot: it is stopped, so it does not
    resync(&d, "na:eu")?;
    d.wait_converged("items", "id", 15, Duration::from_secs(60))
        .await?;
    // eu's own rows were never touched by the resync of na's
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_of_a_region_removed_from_the_topology_are_reported_and_pruned() -> anyhow::Result<()>
{
    let mut d = Deployment::start(
        binary(),
        &Spec {
            regions: &["na", "eu", "apac"],
            schema: SCHEMA,
            tables: &[("public.items", "id", "home")],
            proxied: &[],
            extra_topology: "[replication]\nheartbeat_ms = 200\n",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka: false,
        },
    )
    .await?;
    // apac leaves the topology; na and eu restart with it
    d.agent("apac").kill9();
    let text = std::fs::read_to_string(&d.config)?;
    let start = text.find("[regions.apac]").expect("apac's section");
    let end = start + text[start..].find("\n\n").expect("section end") + 2;
    std::fs::write(&d.config, format!("{}{}", &text[..start], &text[end..]))?;
    d.agent("na").restart()?;
    d.agent("eu").restart()?;

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = d.metrics("na").await.unwrap_or_default();
        if metrics.lines().any(|l| {
            l.starts_with("meridian_slot_orphaned{")
                && l.contains("slot=\"meridian_na_to_apac\"")
                && l.ends_with(" 1")
        }) {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "no orphaned slot reported: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // with a cap on slot WAL, how far each slot is from invalidation
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '1GB'",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(sql).execute(d.pool("na")).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let safe = d
            .metrics("na")
            .await
            .unwrap_or_default()
            .lines()
            .find(|l| {
                l.starts_with("meridian_slot_safe_wal_bytes{")
                    && l.contains("slot=\"meridian_na_to_eu\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        if let Some(safe) = safe {
            // the cap, counted from the slot's restart segment (PostgreSQL
            // adds the segments in between): positive, about 1 GiB
            let cap = (1u64 << 30) as f64;
            assert!(safe > 0.0 && safe <= cap + 64.0 * 1024.0 * 1024.0, "{safe}");
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "no safe WAL metric");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = std::process::Command::new(binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()?;
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        !status.status.success(),
        "an orphaned slot is unhealthy: {text}"
    );
    assert!(
        text.contains("meridian_na_to_apac") && text.contains("ORPHANED"),
        "{text}"
    );

    let prune = |yes: bool| {
        let mut cmd = std::process::Command::new(binary());
        cmd.args(["slots", "prune", "--config"]).arg(&d.config);
        if yes {
            cmd.arg("--yes");
        }
        cmd.output()
    };
    let dry = prune(false)?;
    let dry = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(
        dry.contains("na: would drop meridian_na_to_apac")
            && dry.contains("eu: would drop meridian_eu_to_apac"),
        "{dry}"
    );
    let slots = |region: &'static str| {
        let pool = d.pool(region).clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
            )
            .fetch_all(&pool)
            .await
        }
    };
    assert!(
        slots("na")
            .await?
            .contains(&"meridian_na_to_apac".to_owned())
    );
    let done = prune(true)?;
    assert!(done.status.success());
    assert_eq!(slots("na").await?, vec!["meridian_na_to_eu".to_owned()]);
    assert_eq!(slots("eu").await?, vec!["meridian_eu_to_na".to_owned()]);
    // the remaining link still works
    insert(&d, 0, 5).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&d, "eu").await? < 5 {
        anyhow::ensure!(Instant::now() < deadline, "na -> eu stopped working");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_promoted_from_a_standby_stops_its_link_until_resync() -> anyhow::Result<()> {
    let mut d = start(&[]).await?;
    insert(&d, 0, 10).await?;
    d.wait_converged("items", "id", 10, Duration::from_secs(60))
        .await?;
    // na has a physical standby, caught up
    let standby = d.cluster("na").standby()?;
    let replica = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&standby.url("postgres"))
        .await?;
    insert(&d, 10, 20).await?;
    wait_count(&replica, 20).await?;
    // na's primary is lost: the standby is promoted and na's agent uses it
    d.agent("na").kill9();
    standby.promote()?;
    restart_na_on(&mut d, &standby)?;
    for id in 20..25 {
        sqlx::query("INSERT INTO items VALUES ($1, 'na', 'v')")
            .bind(id)
            .execute(&replica)
            .await?;
    }
    // the standby has no logical slot: the link stops instead of making one
    let log = wait_stopped(&d, "na", "eu").await?;
    assert!(
        log.contains("is missing from na's store") && log.contains("promoted from a standby"),
        "{log}"
    );
    let (state, _) = link_status(&d, "na", "eu")?;
    assert_eq!(state, "stopped");

    let out = resync(&d, "na:eu")?;
    assert!(out.contains("queued a copy of 25 row(s)"), "{out}");
    wait_matches(&d, &replica, 25).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_of_the_previous_release_and_this_one_work_together_or_wait_loudly()
-> anyhow::Result<()> {
    let previous = meridian_testkit::release::previous_release_binary()?;
    let mut d = Deployment::start_mixed(
        binary(),
        &[("na", previous.as_path())],
        &Spec {
            regions: &["na", "eu"],
            schema: SCHEMA,
            tables: &[("public.items", "id", "home")],
            proxied: &[],
            extra_topology: "[replication]\nheartbeat_ms = 200\n",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka: false,
        },
    )
    .await?;
    // both directions: previous -> this, this -> previous
    insert(&d, 0, 5).await?;
    for id in 100..105 {
        sqlx::query("INSERT INTO items VALUES ($1, 'eu', 'v')")
            .bind(id)
            .execute(d.pool("eu"))
            .await?;
    }
    d.wait_converged("items", "id", 10, Duration::from_secs(60))
        .await?;

    // a transaction tagged with a commit token travels in batch format 3,
    // which the previous release cannot read: it refuses, the link waits
    sqlx::raw_sql(
        "BEGIN;
         SELECT pg_logical_emit_message(true, 'meridian.token', '0123456789abcdef0123456789abcdef');
         INSERT INTO items VALUES (200, 'eu', 'tagged');
         COMMIT;
         INSERT INTO items VALUES (201, 'eu', 'after');",
    )
    .execute(d.pool("eu"))
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.agent_log("eu").contains("upgrade the receiving agent") {
        anyhow::ensure!(Instant::now() < deadline, "{}", d.agent_log("eu"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let held: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE id >= 200")
        .fetch_one(d.pool("na"))
        .await?;
    assert_eq!(held, 0, "nothing skipped past the refused batch");

    // na is upgraded: everything arrives, once
    let config = d.config.clone();
    d.agent("na").replace_binary(binary(), &config)?;
    d.wait_converged("items", "id", 12, Duration::from_secs(60))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_restored_from_a_backup_taken_before_a_workload_stops_until_resync()
-> anyhow::Result<()> {
    let mut d = start(&[]).await?;
    insert(&d, 0, 10).await?;
    d.wait_converged("items", "id", 10, Duration::from_secs(60))
        .await?;
    // a backup of na with its 10 rows
    let backup = d.cluster("na").standby()?;
    let restored = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&backup.url("postgres"))
        .await?;
    wait_count(&restored, 10).await?;
    restored.close().await;
    backup.crash()?;
    // the workload after the backup reaches eu
    insert(&d, 10, 20).await?;
    d.wait_converged("items", "id", 20, Duration::from_secs(60))
        .await?;
    // na's store is lost and restored from the backup
    d.agent("na").kill9();
    backup.restore_as_primary()?;
    let restored = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&backup.url("postgres"))
        .await?;
    restart_na_on(&mut d, &backup)?;
    for id in 100..103 {
        sqlx::query("INSERT INTO items VALUES ($1, 'na', 'after restore')")
            .bind(id)
            .execute(&restored)
            .await?;
    }
    let log = wait_stopped(&d, "na", "eu").await?;
    assert!(log.contains("restored from a backup"), "{log}");
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM items WHERE id >= 100")
        .fetch_one(d.pool("eu"))
        .await?;
    assert_eq!(
        n, 0,
        "nothing applied from the restored store before resync"
    );

    // resync: eu's copy of na's rows becomes the restored store's
    resync(&d, "na:eu")?;
    wait_matches(&d, &restored, 13).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_by_its_wal_limit_stops_the_link_until_resync() -> anyhow::Result<()> {
    let mut d = start(&[]).await?;
    insert(&d, 0, 10).await?;
    d.wait_converged("items", "id", 10, Duration::from_secs(60))
        .await?;
    // eu's link is down while na writes more WAL than its slots may keep
    d.agent("na").kill9();
    for sql in [
        "ALTER SYSTEM SET max_slot_wal_keep_size = '48MB'",
        "SELECT pg_reload_conf()",
    ] {
        sqlx::query(sql).execute(d.pool("na")).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut next = 1000i64;
    loop {
        sqlx::query("INSERT INTO items SELECT g, 'na', repeat('x', 2000) FROM generate_series($1, $1 + 9999) g")
            .bind(next)
            .execute(d.pool("na"))
            .await?;
        next += 10_000;
        sqlx::query("CHECKPOINT").execute(d.pool("na")).await?;
        let status: String = sqlx::query_scalar(
            "SELECT coalesce(wal_status, 'lost') FROM pg_replication_slots WHERE slot_name = 'meridian_na_to_eu'",
        )
        .fetch_one(d.pool("na"))
        .await?;
        if status == "lost" {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the slot was never invalidated: {status}"
        );
    }
    d.agent("na").restart()?;
    let log = wait_stopped(&d, "na", "eu").await?;
    assert!(log.contains("was invalidated"), "{log}");
    assert_eq!(count(&d, "eu").await?, 10, "nothing applied past the loss");

    resync(&d, "na:eu")?;
    d.wait_converged("items", "id", 10 + (next - 1000), Duration::from_secs(120))
        .await?;
    Ok(())
}
