//! End-to-end replication over gRPC between real agent processes on real
//! PostgreSQL clusters (and, for the scenarios named `*_over_kafka`, through
//! a Kafka-protocol broker).

mod common;

use std::path::Path;
use std::time::Duration;

use common::{COUNTERS_SCHEMA, workload_step};
use meridian_testkit::{Deployment, Spec};
use sqlx::PgPool;

const REGIONS: [&str; 3] = ["na", "eu", "apac"];

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

const TYPED_SCHEMA: &str = "
CREATE TABLE typed (
    id bigint PRIMARY KEY,
    home text NOT NULL,
    c_small smallint, c_int integer, c_big bigint,
    c_num numeric(30,8), c_real real, c_double double precision, c_bool boolean,
    c_text text, c_varchar varchar(40), c_bytea bytea, c_uuid uuid,
    c_date date, c_ts timestamp, c_tstz timestamptz,
    c_json json, c_jsonb jsonb,
    c_int_arr integer[], c_text_arr text[], c_num_arr numeric[], c_uuid_arr uuid[],
    c_tstz_arr timestamptz[], c_bool_arr boolean[], c_jsonb_arr jsonb[], c_bytea_arr bytea[]
);";

/// Inserts a varied set of rows with ids from `base`, then updates and
/// deletes some of them, all in `region`'s store.
async fn write_typed_rows(pool: &PgPool, region: &str, base: i64) -> anyhow::Result<()> {
    let rows = [
        // every column NULL except the key and home
        "(ID, 'HOME', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
        "(ID, 'HOME', 32767, -2147483648, 9223372036854775807, 12345678901234567890.12345678, 3.4028235e38, 2.2250738585072014e-308, true,
          'plain', 'varchar', '\\x00ff10'::bytea, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
          '2024-02-29', '2024-02-29 23:59:59.999999', '2024-02-29 23:59:59.123456+05:30',
          '{\"a\": [1, 2.5, null], \"b\": \"x\"}', '{\"nested\": {\"k\": true}}',
          '{1,NULL,-3}', '{\"with space\",\"quote\\\"d\",NULL,\"\"}', '{1.5,NaN,-0.0001}', '{a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11}',
          '{\"2020-01-01 00:00:00+00\",infinity}', '{t,f,NULL}', ARRAY['{\"x\":1}'::jsonb, '[]'], ARRAY['\\x01'::bytea, NULL])",
        "(ID, 'HOME', -32768, 0, -1, 'NaN', 'NaN', '-Infinity', false,
          E'unicode é中😀 tab\\t newline\\n quote '' backslash \\\\', '', ''::bytea, '00000000-0000-0000-0000-000000000000',
          '-infinity', '1970-01-01 00:00:00', 'infinity',
          '\"just a string\"', '[]',
          '{}', '{}', '{}', '{}', '{}', '{}', '{}', '{}')",
        "(ID, 'HOME', 1, 1, 1, -0.00000001, -0, 1e-300, true,
          repeat('x', 3000), 'x', decode(repeat('ab', 500), 'hex'), gen_random_uuid(),
          '0001-01-01', '294276-12-31 23:59:59', '1999-12-31 23:59:59.999999-08',
          '{}', '{\"num\": 1e100}',
          '{{1,2},{3,4}}', '{{a,b},{c,d}}', '{1e-10}', '{}', '{}', '{}', '{}', '{}')",
    ];
    for (i, row) in rows.iter().enumerate() {
        let sql = format!(
            "INSERT INTO typed VALUES {}",
            row.replace("ID", &(base + i as i64).to_string())
                .replace("HOME", region)
        );
        sqlx::raw_sql(&sql).execute(pool).await?;
    }
    // updates of every kind, a key change, and a delete, in one transaction
    sqlx::raw_sql(&format!(
        "BEGIN;
         UPDATE typed SET c_int = c_int + 1, c_text = 'updated' WHERE id = {b1};
         UPDATE typed SET c_jsonb = '{{\"updated\": 1}}', c_int_arr = '{{9}}' WHERE id = {b0};
         UPDATE typed SET id = {moved} WHERE id = {b2};
         DELETE FROM typed WHERE id = {b3};
         COMMIT;",
        b0 = base,
        b1 = base + 1,
        b2 = base + 2,
        b3 = base + 3,
        moved = base + 100,
    ))
    .execute(pool)
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_replicates_between_three_regions() -> anyhow::Result<()> {
    every_type(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_replicates_between_three_regions_over_kafka() -> anyhow::Result<()> {
    every_type(true).await
}

async fn every_type(kafka: bool) -> anyhow::Result<()> {
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: TYPED_SCHEMA,
            tables: &[("public.typed", "id", "home")],
            proxied: &[],
            extra_topology: "",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka,
        },
    )
    .await?;
    for (i, region) in REGIONS.iter().enumerate() {
        write_typed_rows(d.pool(region), region, 1000 * (i as i64 + 1)).await?;
    }
    // 4 rows per region, one deleted: 3 per region
    let rows = d
        .wait_converged("typed", "id", 9, Duration::from_secs(60))
        .await?;
    assert_eq!(rows, 9);
    for region in REGIONS {
        let moved: i64 = sqlx::query_scalar("SELECT count(*) FROM typed WHERE id % 1000 = 100")
            .fetch_one(d.pool(region))
            .await?;
        assert_eq!(
            moved, 3,
            "{region}: a primary-key update moves the row everywhere"
        );
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM meridian.dead_letters")
            .fetch_one(d.pool(region))
            .await?;
        assert_eq!(dead, 0, "{region}: nothing dead-lettered");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toasted_values_survive_updates_of_other_columns() -> anyhow::Result<()> {
    toasted_values(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toasted_values_survive_updates_of_other_columns_over_kafka() -> anyhow::Result<()> {
    toasted_values(true).await
}

async fn toasted_values(kafka: bool) -> anyhow::Result<()> {
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: "CREATE TABLE docs (id bigint PRIMARY KEY, home text NOT NULL, title text, body text);",
            tables: &[("public.docs", "id", "home")],
            proxied: &[],
            extra_topology: "",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka,
        },
    )
    .await?;
    let na = d.pool("na");
    // ~45 kB of hex text: stored out of line (TOAST) even after compression
    let big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 1400))";
    sqlx::raw_sql(&format!(
        "INSERT INTO docs VALUES (1, 'na', 'first', {big}), (2, 'na', 'second', {big})"
    ))
    .execute(na)
    .await?;
    d.wait_converged("docs", "id", 2, Duration::from_secs(60))
        .await?;
    // row 1: the update ships in its own batch, with the body "unchanged"
    sqlx::raw_sql("UPDATE docs SET title = 'first, edited' WHERE id = 1")
        .execute(na)
        .await?;
    // row 3: insert and title update in one transaction (one batch)
    sqlx::raw_sql(&format!(
        "BEGIN; INSERT INTO docs VALUES (3, 'na', 'third', {big}); UPDATE docs SET title = 'third, edited' WHERE id = 3; COMMIT;"
    ))
    .execute(na)
    .await?;
    d.wait_converged("docs", "id", 3, Duration::from_secs(60))
        .await?;
    for region in REGIONS {
        let (title, len): (String, i32) =
            sqlx::query_as("SELECT title, length(body) FROM docs WHERE id = 1")
                .fetch_one(d.pool(region))
                .await?;
        assert_eq!(title, "first, edited");
        assert_eq!(len, 1400 * 32, "{region}: the TOASTed body is kept");
    }
    let toast: String = sqlx::query_scalar(
        "SELECT reltoastrelid::regclass::text FROM pg_class WHERE relname = 'docs'",
    )
    .fetch_one(na)
    .await?;
    let chunks: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {toast}"))
        .fetch_one(na)
        .await?;
    assert!(
        chunks > 20,
        "the source really stored the bodies out of line ({chunks} TOAST chunks)"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_any_agent_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()> {
    kill_9_of_agents(false).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_any_agent_loses_nothing_and_applies_nothing_twice_over_kafka()
-> anyhow::Result<()> {
    kill_9_of_agents(true).await
}

async fn kill_9_of_agents(kafka: bool) -> anyhow::Result<()> {
    let mut d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: COUNTERS_SCHEMA,
            tables: &[("public.counters", "id", "home")],
            proxied: &[],
            extra_topology: "[replication]\nbatch_max_changes = 500\nwindow = 4\n",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka,
        },
    )
    .await?;
    let mut changes = 0u64;
    let mut step = 1i64;
    // (after this many changes, kill this region's agent): na and eu are each
    // source and destination; each is killed while both roles are busy
    let kills = [
        (8_000u64, "na"),
        (20_000, "eu"),
        (32_000, "na"),
        (42_000, "apac"),
    ];
    let mut next_kill = 0;
    while changes < 50_000 {
        for (i, region) in REGIONS.iter().enumerate() {
            changes += workload_step(d.pool(region), i as i64, step).await?;
        }
        step += 1;
        if next_kill < kills.len() && changes >= kills[next_kill].0 {
            let region = kills[next_kill].1;
            d.agent(region).kill9();
            // keep writing while it is down, then bring it back
            for _ in 0..5 {
                for (i, r) in REGIONS.iter().enumerate() {
                    changes += workload_step(d.pool(r), i as i64, step).await?;
                }
                step += 1;
            }
            d.agent(region).restart()?;
            next_kill += 1;
        }
    }
    assert!(changes >= 50_000);
    let rows = d
        .wait_converged("counters", "id", 1, Duration::from_secs(180))
        .await?;
    assert!(rows > 1000, "the workload leaves rows behind: {rows}");
    common::assert_applied_once_and_nothing_dead(&d, &REGIONS).await?;
    for region in REGIONS {
        // every region saw every final version of every other region's rows
        let versions: i64 = sqlx::query_scalar("SELECT coalesce(sum(version), 0) FROM counters")
            .fetch_one(d.pool(region))
            .await?;
        assert!(versions > 0);
    }
    Ok(())
}

/// A byte flipped between the agents: in plain TCP the batch's crc32
/// catches it and the receiver refuses the batch; under mTLS the record's
/// authentication tag catches it first and the connection ends. Either way
/// the source sends it again and nothing is lost or set aside.
async fn corrupt_one_chunk(plaintext: bool) -> anyhow::Result<Deployment> {
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &["na", "eu"],
            schema: "CREATE TABLE blobs (id bigint PRIMARY KEY, home text NOT NULL, data text);",
            tables: &[("public.blobs", "id", "home")],
            proxied: &["eu"],
            extra_topology: if plaintext {
                "[security]\nplaintext = true\n"
            } else {
                ""
            },
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka: false,
        },
    )
    .await?;
    // let the link connect through the proxy, then arm the corruption
    sqlx::raw_sql("INSERT INTO blobs VALUES (0, 'na', 'warm-up')")
        .execute(d.pool("na"))
        .await?;
    d.wait_converged("blobs", "id", 1, Duration::from_secs(60))
        .await?;
    d.proxy("eu").corrupt_next(1);
    sqlx::raw_sql(
        "INSERT INTO blobs SELECT g, 'na', repeat(md5(g::text), 30) FROM generate_series(1, 300) g",
    )
    .execute(d.pool("na"))
    .await?;
    let rows = d
        .wait_converged("blobs", "id", 301, Duration::from_secs(60))
        .await?;
    assert_eq!(rows, 301);
    assert_eq!(
        d.proxy("eu").corrupted(),
        1,
        "the proxy corrupted one chunk"
    );
    let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM meridian.dead_letters")
        .fetch_one(d.pool("eu"))
        .await?;
    assert_eq!(dead, 0, "a corrupted batch is resent, not dead-lettered");
    Ok(d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_batch_is_rejected_and_resent() -> anyhow::Result<()> {
    let mut d = corrupt_one_chunk(true).await?;
    let log = d.agent("eu").log();
    assert!(
        log.contains("crc32 mismatch"),
        "the receiver detected the corruption:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_chunk_under_mtls_ends_the_connection_and_is_resent() -> anyhow::Result<()> {
    let mut d = corrupt_one_chunk(false).await?;
    let log = d.agent("na").log();
    assert!(
        log.contains("link connected") && log.matches("link connected").count() >= 2,
        "the source reconnected after the damaged record:\n{log}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_link_reconnects_and_resumes_without_a_gap() -> anyhow::Result<()> {
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &["na", "eu"],
            schema: COUNTERS_SCHEMA,
            tables: &[("public.counters", "id", "home")],
            proxied: &["eu"],
            extra_topology: "[replication]\nbatch_max_changes = 200\nwindow = 2\n",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka: false,
        },
    )
    .await?;
    let na = d.pool("na");
    let mut step = 0;
    let mut write = async |n: i64| -> anyhow::Result<()> {
        for _ in 0..n {
            step += 1;
            workload_step(na, 0, step).await?;
        }
        Ok(())
    };
    // the link is up and streaming
    write(5).await?;
    d.wait_converged("counters", "id", 1, Duration::from_secs(60))
        .await?;
    // a cut in the middle of a stream of changes
    write(5).await?;
    d.proxy("eu").cut();
    write(10).await?;
    d.wait_converged("counters", "id", 1, Duration::from_secs(60))
        .await?;
    assert!(
        d.agent_log("na").matches("link connected").count() >= 2,
        "reconnected after the cut:\n{}",
        d.agent_log("na")
    );
    // a partition: nothing gets through while it lasts, everything after
    d.proxy("eu").pause();
    write(10).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_ne!(
        d.fingerprint("na", "counters", "id").await?,
        d.fingerprint("eu", "counters", "id").await?,
        "the partition holds changes back"
    );
    d.proxy("eu").resume();
    write(5).await?;
    let rows = d
        .wait_converged("counters", "id", 1, Duration::from_secs(60))
        .await?;
    assert!(rows > 500, "{rows}");
    assert!(
        d.agent_log("na").matches("link connected").count() >= 3,
        "reconnected after the partition"
    );
    let duplicates: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM apply_log GROUP BY id, version, op HAVING count(*) > 1) d",
    )
    .fetch_one(d.pool("eu"))
    .await?;
    assert_eq!(duplicates, 0, "a row version was applied twice");
    Ok(())
}
