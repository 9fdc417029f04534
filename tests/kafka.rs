//! The Kafka transport against a real Kafka-protocol broker (tansu): a broker
//! restart in the middle of a workload, and bad records set aside while the
//! link keeps running. (The scenarios shared with gRPC run over Kafka in
//! tests/replication.rs; the topic canary scan is in tests/residency.rs.)

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{COUNTERS_SCHEMA, workload_step};
use meridian_core::change::{Change, ChangeKind, Column, Table, Transaction, Value};
use meridian_core::{Lsn, codec, record};
use meridian_testkit::{Deployment, Spec};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

const REGIONS: [&str; 3] = ["na", "eu", "apac"];

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

/// Three regions over Kafka, replicating `counters`.
fn counters_spec(extra_topology: &str) -> Spec<'_> {
    Spec {
        regions: &REGIONS,
        schema: COUNTERS_SCHEMA,
        tables: &[("public.counters", "id", "home")],
        proxied: &[],
        extra_topology,
        policy: None,
        agent_env: &[],
        global_schema: None,
        kafka: true,
    }
}

async fn start(extra_topology: &str) -> anyhow::Result<Deployment> {
    Deployment::start(binary(), &counters_spec(extra_topology)).await
}

/// One workload transaction in the `region_index`th region.
async fn step(d: &Deployment, region_index: usize, step: i64) -> anyhow::Result<u64> {
    workload_step(d.pool(REGIONS[region_index]), region_index as i64, step).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_and_applies_nothing_twice() -> anyhow::Result<()> {
    let mut d = start("").await?;
    let mut changes = 0u64;
    let mut s = 1;
    let mut restarted = false;
    while changes < 50_000 {
        for i in 0..REGIONS.len() {
            changes += step(&d, i, s).await?;
        }
        s += 1;
        if !restarted && changes >= 20_000 {
            // kill -9 mid-stream, keep writing while it is down, restart
            d.broker().kill9();
            for _ in 0..10 {
                for i in 0..REGIONS.len() {
                    changes += step(&d, i, s).await?;
                }
                s += 1;
            }
            d.broker().restart()?;
            restarted = true;
        }
    }
    let rows = d
        .wait_converged("counters", "id", 1, Duration::from_secs(240))
        .await?;
    assert!(rows > 1000, "{rows}");
    common::assert_applied_once_and_nothing_dead(&d, &REGIONS).await?;
    for region in REGIONS {
        let pool = d.pool(region);
        // positions are kept in the store, per partition of each inbound topic
        let partitions: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM meridian.kafka_positions WHERE next_offset > 0",
        )
        .fetch_one(pool)
        .await?;
        assert!(
            partitions >= 4,
            "{region}: {partitions} partitions consumed"
        );
    }
    Ok(())
}

/// Record headers as produced: (name, value).
type Headers<'a> = Vec<(&'a str, Vec<u8>)>;

/// Produces raw records into `topic` (as a broken or hostile producer would).
async fn produce(
    brokers: &str,
    topic: &str,
    records: Vec<(Headers<'_>, Vec<u8>)>,
) -> anyhow::Result<()> {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()?;
    for (headers, value) in records {
        let mut h = OwnedHeaders::new();
        for (key, v) in &headers {
            h = h.insert(Header {
                key,
                value: Some(v),
            });
        }
        producer
            .send(
                FutureRecord::to(topic)
                    .key(b"bad")
                    .payload(&value)
                    .headers(h)
                    .partition(0),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("produce: {e}"))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_go_to_dead_letters_and_the_link_keeps_running() -> anyhow::Result<()> {
    // no heartbeats during the test: nothing but the test's own writes
    // reaches na's topics, so the forged record below sits exactly between
    // what came before and what comes after
    let mut d = start("[replication]\nheartbeat_ms = 3600000\n").await?;
    // the link works, and its topic exists
    step(&d, 0, 1).await?;
    d.wait_converged("counters", "id", 40, Duration::from_secs(60))
        .await?;

    // a well-formed change whose value eu's column type refuses (bad data:
    // dead-lettered; a missing table or column would make the partition
    // wait for the schema instead, see tests/apply.rs)
    let counters = Arc::new(Table {
        schema: "public".into(),
        name: "counters".into(),
        columns: ["id", "home", "version", "payload"]
            .iter()
            .map(|n| Column {
                name: (*n).into(),
                type_oid: 25,
                key: *n == "id",
            })
            .collect(),
    });
    // at na's current position: past everything already applied, before
    // anything na commits next
    let now: i64 = sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint")
        .fetch_one(d.pool("na"))
        .await?;
    let transaction = Transaction {
        commit_lsn: Lsn(now as u64 - 8),
        end_lsn: Lsn(now as u64),
        commit_time: 0,
        changes: vec![Change {
            table: counters,
            kind: ChangeKind::Insert {
                new: ["999999999", "na", "canary-not-a-number", "p"]
                    .iter()
                    .map(|v| Value::Text((*v).into()))
                    .collect(),
            },
        }],
        continues: false,
        token: None,
    };
    let good = record::records("na", transaction, &[], 0, 4).remove(0);
    let headers = |value: &[u8], crc: Option<u32>| -> Headers<'_> {
        good.headers
            .iter()
            .map(|(k, v)| {
                if *k == record::CRC32 {
                    let crc = crc.unwrap_or_else(|| codec::checksum(value));
                    (*k, crc.to_string().into_bytes())
                } else {
                    (*k, v.clone())
                }
            })
            .collect()
    };
    let garbage = b"\x00\x01 not a batch".to_vec();
    let brokers = d.broker().addr();
    produce(
        &brokers,
        "meridian.na.eu",
        vec![
            (headers(&good.value, Some(12345)), good.value.clone()), // bad crc32
            (headers(&garbage, None), garbage.clone()),              // undecodable
            (headers(&good.value, None), good.value.clone()),        // bad value
        ],
    )
    .await?;

    // the link keeps running: later changes arrive (40 more rows, 2 deleted)
    step(&d, 0, 2).await?;
    d.wait_converged("counters", "id", 78, Duration::from_secs(60))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let reasons = loop {
        let reasons: Vec<String> = sqlx::query_scalar(
            "SELECT reason FROM meridian.dead_letters WHERE source_region = 'na' ORDER BY id",
        )
        .fetch_all(d.pool("eu"))
        .await?;
        if reasons.len() >= 3 || Instant::now() > deadline {
            break reasons;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(reasons.len(), 3, "{reasons:?}");
    assert!(reasons[0].contains("crc32 mismatch"), "{reasons:?}");
    assert!(reasons[1].contains("undecodable value"), "{reasons:?}");
    assert!(
        reasons[2].contains("public.counters") && reasons[2].contains("22P02"),
        "{reasons:?}"
    );
    assert!(!reasons.iter().any(|r| r.contains("canary-not-a-number")));
    assert!(!d.agent_log("eu").contains("canary-not-a-number"));
    for r in &reasons[..2] {
        assert!(r.starts_with("kafka record meridian.na.eu/0@"), "{r}");
    }

    // visible in metrics and in the status
    let dead = d
        .metric(
            "eu",
            r#"meridian_dead_letters_total{source="na",destination="eu"}"#,
        )
        .await?;
    assert_eq!(dead, Some(3.0));
    // the pending count is read from eu's store once a second
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = std::process::Command::new(binary())
            .args(["status", "--json", "--config"])
            .arg(&d.config)
            .output()?;
        let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let eu = report["regions"]
            .as_array()
            .and_then(|r| r.iter().find(|r| r["region"] == "eu"))
            .expect("eu in the report");
        let from_na = eu["inbound"]
            .as_array()
            .and_then(|i| i.iter().find(|i| i["source"] == "na"))
            .expect("eu applies from na");
        assert_eq!(from_na["dead_letters"], 3, "{report:#}");
        if from_na["dead_letters_pending"] == 3 {
            let link = report["links"]
                .as_array()
                .and_then(|l| {
                    l.iter()
                        .find(|l| l["source"] == "na" && l["destination"] == "eu")
                })
                .expect("the link na -> eu");
            assert_ne!(link["health"], "ok", "{link:#}");
            break;
        }
        assert!(Instant::now() < deadline, "{report:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(())
}

/// Counters homed in na that eu holds.
async fn na_rows_in(d: &Deployment, region: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM counters WHERE home = 'na'")
            .fetch_one(d.pool(region))
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_count_or_a_lost_offset_stops_instead_of_skipping() -> anyhow::Result<()>
{
    let mut d = start("").await?;
    let insert = async |d: &Deployment, id: i64| -> anyhow::Result<()> {
        sqlx::query("INSERT INTO counters (id, home, version) VALUES ($1, 'na', 1)")
            .bind(id)
            .execute(d.pool("na"))
            .await?;
        Ok(())
    };
    let wait_rows = async |d: &Deployment, n: i64| -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while na_rows_in(d, "eu").await? < n {
            anyhow::ensure!(Instant::now() < deadline, "eu never got {n} rows of na");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    };
    insert(&d, 1).await?;
    wait_rows(&d, 1).await?;

    // the topology asks for another partition count than the topic has
    d.agent("na").kill9();
    let config = std::fs::read_to_string(&d.config)?;
    std::fs::write(
        &d.config,
        config.replace("partitions = 4", "partitions = 8"),
    )?;
    d.agent("na").restart()?;
    insert(&d, 2).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d
        .agent_log("na")
        .contains("has 4 partitions, but the topology says 8")
    {
        anyhow::ensure!(Instant::now() < deadline, "{}", d.agent_log("na"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        na_rows_in(&d, "eu").await?,
        1,
        "nothing produced with 8 partitions"
    );
    d.agent("na").kill9();
    std::fs::write(&d.config, config)?;
    d.agent("na").restart()?;
    wait_rows(&d, 2).await?;

    // eu's stored offsets point past what the broker holds (as after
    // retention removed records eu never read): its partitions stop
    d.agent("eu").kill9();
    let topic = "meridian.na.eu";
    sqlx::query(
        "UPDATE meridian.kafka_positions SET next_offset = next_offset + 1000000 WHERE topic = $1",
    )
    .bind(topic)
    .execute(d.pool("eu"))
    .await?;
    d.agent("eu").restart()?;
    insert(&d, 3).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.agent_log("eu").to_lowercase().contains("out of range") {
        anyhow::ensure!(Instant::now() < deadline, "{}", d.agent_log("eu"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(na_rows_in(&d, "eu").await?, 2, "no silent jump to the end");
    // put the offsets back: nothing was skipped
    d.agent("eu").kill9();
    sqlx::query(
        "UPDATE meridian.kafka_positions SET next_offset = next_offset - 1000000 WHERE topic = $1",
    )
    .bind(topic)
    .execute(d.pool("eu"))
    .await?;
    d.agent("eu").restart()?;
    wait_rows(&d, 3).await?;

    // eu applies another incarnation of na's slot than the records carry
    // (as when na's slot was made anew): the records wait, loudly
    d.agent("eu").kill9();
    sqlx::query("UPDATE meridian.source_incarnations SET incarnation = gen_random_uuid() WHERE source_region = 'na'")
        .execute(d.pool("eu"))
        .await?;
    d.agent("eu").restart()?;
    insert(&d, 4).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !d.agent_log("eu").contains("sends from slot incarnation") {
        anyhow::ensure!(Instant::now() < deadline, "{}", d.agent_log("eu"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        na_rows_in(&d, "eu").await?,
        3,
        "nothing applied from another incarnation"
    );
    Ok(())
}

/// Three tables, each logging every row version that lands (local writes
/// and apply alike), and a server-side writer: transactions of 1 row (7 in
/// 10), 2-20 rows or 100-300 rows, inserts, updates and deletes, 1 row in 20
/// with a 9 kB value.
const STORM_SCHEMA: &str = "
CREATE TABLE apply_log (tbl text, id bigint, version integer, op text);
CREATE FUNCTION log_apply() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO apply_log VALUES (TG_TABLE_NAME, OLD.id, OLD.version, 'D');
  ELSE
    INSERT INTO apply_log VALUES (TG_TABLE_NAME, NEW.id, NEW.version, 'W');
  END IF;
  RETURN NULL;
END $$;
CREATE TABLE orders (id bigint PRIMARY KEY, home text NOT NULL, version integer NOT NULL, amount numeric(12,2), note text);
CREATE TABLE items (id bigint PRIMARY KEY, home text NOT NULL, version integer NOT NULL, sku text, qty int);
CREATE TABLE notes (id bigint PRIMARY KEY, home text NOT NULL, version integer NOT NULL, body text);
CREATE TRIGGER orders_log AFTER INSERT OR UPDATE OR DELETE ON orders FOR EACH ROW EXECUTE FUNCTION log_apply();
CREATE TRIGGER items_log AFTER INSERT OR UPDATE OR DELETE ON items FOR EACH ROW EXECUTE FUNCTION log_apply();
CREATE TRIGGER notes_log AFTER INSERT OR UPDATE OR DELETE ON notes FOR EACH ROW EXECUTE FUNCTION log_apply();
ALTER TABLE orders ENABLE ALWAYS TRIGGER orders_log;
ALTER TABLE items ENABLE ALWAYS TRIGGER items_log;
ALTER TABLE notes ENABLE ALWAYS TRIGGER notes_log;
CREATE PROCEDURE storm(home text, base bigint, transactions int, seed float8) LANGUAGE plpgsql AS $$
DECLARE
  n int; k bigint := 0; r float8; big text;
BEGIN
  PERFORM setseed(seed);
  FOR t IN 1..transactions LOOP
    r := random();
    n := CASE WHEN r < 0.7 THEN 1 WHEN r < 0.95 THEN 2 + (random() * 18)::int ELSE 100 + (random() * 200)::int END;
    FOR j IN 1..n LOOP
      r := random();
      big := CASE WHEN random() < 0.05 THEN (SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 290)) END;
      IF r < 0.6 OR k < 10 THEN
        INSERT INTO orders VALUES (base + k, home, 0, k * 1.5, big);
        INSERT INTO items VALUES (base + k, home, 0, md5(k::text), (k % 7)::int);
        IF big IS NOT NULL THEN INSERT INTO notes VALUES (base + k, home, 0, big); END IF;
        k := k + 1;
      ELSIF r < 0.9 THEN
        UPDATE orders SET version = version + 1, amount = amount + 1 WHERE id = base + k - 1 - (j % 10);
        UPDATE items SET version = version + 1, qty = qty + 1 WHERE id = base + (random() * (k - 1))::bigint;
      ELSE
        DELETE FROM orders WHERE id = base + (random() * (k - 1))::bigint;
        DELETE FROM notes WHERE id = base + (random() * (k - 1))::bigint;
      END IF;
    END LOOP;
    COMMIT;
  END LOOP;
END $$;
";

/// Issue 11's scenario: every region writes at full speed at once, every
/// link over Kafka, while one agent and then the broker are killed -9 and
/// restarted. Every store ends identical, no row version lands twice, and
/// nothing is dead-lettered. (On tansu 0.6.0 as released, whose fetches
/// grew with everything a topic held, the partitions fell behind for good.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_regions_writing_at_once_over_kafka_converge_through_kills() -> anyhow::Result<()> {
    let mut d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: STORM_SCHEMA,
            tables: &[
                ("public.orders", "id", "home"),
                ("public.items", "id", "home"),
                ("public.notes", "id", "home"),
            ],
            proxied: &[],
            extra_topology: "",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka: true,
        },
    )
    .await?;
    let mut writers = Vec::new();
    for (i, region) in REGIONS.iter().enumerate() {
        let pool = d.pool(region).clone();
        writers.push(tokio::spawn(async move {
            sqlx::query("CALL storm($1, $2, $3, $4)")
                .bind(REGIONS[i])
                .bind(i as i64 * 1_000_000_000)
                .bind(2000)
                .bind(0.1 * i as f64)
                .execute(&pool)
                .await
        }));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    d.agent("eu").kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.agent("eu").restart()?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    d.broker().kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    d.broker().restart()?;
    for w in writers {
        w.await??;
    }
    for table in ["orders", "items", "notes"] {
        let rows = d
            .wait_converged(table, "id", 1000, Duration::from_secs(300))
            .await?;
        assert!(rows >= 1000, "{table}: {rows}");
    }
    common::assert_applied_once_and_nothing_dead(&d, &REGIONS).await?;
    for region in REGIONS {
        let large: i64 = sqlx::query_scalar("SELECT count(*) FROM notes WHERE length(body) > 9000")
            .fetch_one(d.pool(region))
            .await?;
        assert!(large > 10, "{region}: large values replicated ({large})");
    }
    Ok(())
}

/// A partition whose apply makes no progress while records wait (here, a
/// lock held on the destination table: no error anywhere) is shown stalled
/// by `status`, with the reason, and critical; it clears once it moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_that_stops_moving_while_records_wait_is_shown_stalled() -> anyhow::Result<()> {
    let d = start("").await?;
    let eu = d.pool("eu");
    let mut lock = eu.begin().await?;
    sqlx::query("LOCK TABLE counters IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await?;
    for s in 1..=5 {
        step(&d, 0, s).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let (ok, stalled) = loop {
        let (ok, l) = d.link_status(binary(), "na", "eu")?;
        if (l["state"] == "stalled" && l["health"] == "critical") || Instant::now() > deadline {
            break (ok, l);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(!ok, "a stalled link is unhealthy: {stalled}");
    assert_eq!(stalled["state"], "stalled", "{stalled}");
    assert_eq!(stalled["health"], "critical", "{stalled}");
    let reason = stalled["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("nothing applied for") && reason.contains("more records"),
        "{reason}"
    );
    lock.rollback().await?;
    d.wait_converged("counters", "id", 1, Duration::from_secs(60))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, l) = d.link_status(binary(), "na", "eu")?;
        if l["state"] != "stalled" {
            break;
        }
        assert!(Instant::now() < deadline, "still stalled after moving: {l}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

/// A cluster that requires SASL/SCRAM: the links authenticate as the user
/// the topology names, with the password from the environment, and
/// replicate; without the password an agent refuses to start and names the
/// variable to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_authenticate_to_a_sasl_cluster() -> anyhow::Result<()> {
    let mut d = Deployment::start_with_kafka_user(
        binary(),
        &counters_spec(""),
        ("meridian", "a-long-s3cret"),
    )
    .await?;
    for s in 1..=3 {
        for i in 0..REGIONS.len() {
            step(&d, i, s).await?;
        }
    }
    let rows = d
        .wait_converged("counters", "id", 1, Duration::from_secs(120))
        .await?;
    assert!(rows >= 300, "{rows}");
    // the broker does require it: a client without credentials reads nothing
    let anonymous: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", d.broker().addr())
        .set("log_level", "0")
        .create()?;
    let listed = tokio::task::spawn_blocking(move || {
        use rdkafka::consumer::Consumer;
        anonymous
            .fetch_metadata(None, Duration::from_secs(5))
            .map(|m| m.topics().len())
    })
    .await?;
    assert!(
        listed.is_err(),
        "an anonymous client listed {listed:?} topics"
    );

    d.agent("na").kill9();
    let out = tokio::process::Command::new(binary())
        .args(["agent", "--region", "na", "--config"])
        .arg(&d.config)
        // the other regions' passwords are there (never printed), na's is not
        .env("MERIDIAN_KAFKA_PASSWORD_EU", "another-s3cret")
        .env("MERIDIAN_KAFKA_PASSWORD_APAC", "another-s3cret")
        .env_remove("MERIDIAN_KAFKA_PASSWORD_NA")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("MERIDIAN_KAFKA_PASSWORD_NA") && !stderr.contains("s3cret"),
        "{stderr}"
    );
    Ok(())
}
