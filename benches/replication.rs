//! End-to-end catch-up benchmark: Meridian vs PostgreSQL's native logical
//! replication, on the same clusters and the same WAL backlog, in one run.
//!
//! A source cluster gets a backlog of row changes (a ~200-byte row; 50%
//! inserts, 30% updates, 20% deletes, 1,000 changes per transaction) while
//! both a Meridian slot and a native subscription's slot exist but nobody
//! reads them. Then Meridian's agents start and the time until the
//! destination matches the source is measured; then the native subscription
//! is enabled on a second destination and measured the same way.
//!
//! `cargo bench --bench replication` (1,000,000 changes); set
//! `MERIDIAN_BENCH_CHANGES` for another size, and
//! `MERIDIAN_BENCH_TRANSPORT=kafka` to ship through a Kafka-protocol broker
//! (tansu, sqlite storage) instead of gRPC. Prints one JSON line.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_testkit::postgres::PgOptions;
use meridian_testkit::{AgentProcess, PgCluster};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const SCHEMA: &str = "CREATE TABLE bench_rows (
    id bigint PRIMARY KEY,
    region text NOT NULL,
    a integer NOT NULL,
    b text NOT NULL,
    c timestamptz NOT NULL,
    d numeric(12,2) NOT NULL
);";

const PER_TX: i64 = 1000;

fn main() -> anyhow::Result<()> {
    let changes: i64 = std::env::var("MERIDIAN_BENCH_CHANGES")
        .ok()
        .map(|v| v.parse().context("MERIDIAN_BENCH_CHANGES must be a number"))
        .transpose()?
        .unwrap_or(1_000_000);
    let kafka = match std::env::var("MERIDIAN_BENCH_TRANSPORT").as_deref() {
        Ok("kafka") => true,
        Ok("grpc") | Err(_) => false,
        Ok(other) => anyhow::bail!("MERIDIAN_BENCH_TRANSPORT={other:?}: expected grpc or kafka"),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(changes, kafka))
}

async fn connect(cluster: &PgCluster) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.url("postgres"))
        .await?)
}

async fn run(changes: i64, kafka: bool) -> anyhow::Result<()> {
    let options = PgOptions {
        fsync: true,
        ..PgOptions::default()
    };
    let source = PgCluster::start_with(&options)?;
    let meridian_dst = PgCluster::start_with(&options)?;
    let native_dst = PgCluster::start_with(&options)?;
    let (src, mdst, ndst) = (
        connect(&source).await?,
        connect(&meridian_dst).await?,
        connect(&native_dst).await?,
    );
    for pool in [&src, &mdst, &ndst] {
        sqlx::raw_sql(SCHEMA).execute(pool).await?;
    }

    // native: publication + disabled subscription (its slot now holds WAL)
    sqlx::raw_sql("CREATE PUBLICATION bench_native FOR TABLE bench_rows")
        .execute(&src)
        .await?;
    sqlx::raw_sql(&format!(
        "CREATE SUBSCRIPTION bench_native CONNECTION '{}' PUBLICATION bench_native
           WITH (copy_data = false, enabled = false)",
        source.conninfo("postgres")
    ))
    .execute(&ndst)
    .await?;

    // meridian: start the agents once so they create their slot, then stop them
    let broker = if kafka {
        Some(meridian_testkit::KafkaBroker::start()?)
    } else {
        None
    };
    let mut topology = format!(
        "[regions.na]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\n\
         [regions.eu]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\n\
         [[tables]]\nname = \"public.bench_rows\"\nprimary_key = [\"id\"]\nhome_column = \"region\"\n",
        source.url("postgres"),
        meridian_testkit::free_port(),
        meridian_dst.url("postgres"),
        meridian_testkit::free_port(),
    );
    if let Some(broker) = &broker {
        topology.push_str(&format!(
            "\n[replication]\ntransport = \"kafka\"\n\n[kafka]\nbrokers = \"{}\"\npartitions = 4\nreplication_factor = 1\n",
            broker.addr()
        ));
    }
    let config = source.dir().join("topology.toml");
    std::fs::write(&config, topology)?;
    let binary = Path::new(env!("CARGO_BIN_EXE_meridian"));
    let mut agents = [
        AgentProcess::spawn(binary, &config, "na", source.dir())?,
        AgentProcess::spawn(binary, &config, "eu", source.dir())?,
    ];
    wait_for(
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'meridian_na_to_eu'",
            )
            .fetch_one(&src)
            .await?;
            Ok(n == 1)
        },
        Duration::from_secs(60),
    )
    .await
    .context("the source agent did not create its slot")?;
    for a in &mut agents {
        a.kill9();
    }

    let backlog = Instant::now();
    generate(&src, changes).await?;
    let generate_s = backlog.elapsed().as_secs_f64();
    let target = fingerprint(&src).await?;

    // Meridian catch-up
    for a in &mut agents {
        a.restart()?;
    }
    let started = Instant::now();
    wait_for(
        || async { Ok(fingerprint(&mdst).await? == target) },
        Duration::from_secs(3600),
    )
    .await
    .context("meridian did not catch up")?;
    let meridian_s = started.elapsed().as_secs_f64();
    let rss: Vec<Option<u64>> = agents.iter().map(|a| a.peak_rss_bytes()).collect();
    for a in &mut agents {
        a.kill9();
    }

    // native catch-up
    sqlx::raw_sql("ALTER SUBSCRIPTION bench_native ENABLE")
        .execute(&ndst)
        .await?;
    let started = Instant::now();
    wait_for(
        || async { Ok(fingerprint(&ndst).await? == target) },
        Duration::from_secs(3600),
    )
    .await
    .context("native logical replication did not catch up")?;
    let native_s = started.elapsed().as_secs_f64();
    sqlx::raw_sql("ALTER SUBSCRIPTION bench_native DISABLE")
        .execute(&ndst)
        .await?;

    let meridian_rate = changes as f64 / meridian_s;
    let native_rate = changes as f64 / native_s;
    let report = serde_json::json!({
        "benchmark": "catch_up_backlog",
        "changes": changes,
        "mix": {"insert": 0.5, "update": 0.3, "delete": 0.2, "changes_per_transaction": PER_TX},
        "row_bytes_approx": 200,
        "backlog_generation_s": round(generate_s),
        "meridian": {
            "transport": if kafka { "kafka (tansu, sqlite storage, 4 partitions)" } else { "grpc" },
            "catch_up_s": round(meridian_s),
            "rows_per_s": meridian_rate.round(),
            "peak_rss_bytes": {"source_agent": rss[0], "destination_agent": rss[1]},
        },
        "native_logical_replication": {
            "catch_up_s": round(native_s),
            "rows_per_s": native_rate.round(),
        },
        "ratio_meridian_over_native": round(meridian_rate / native_rate),
    });
    println!("{report}");
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Writes `changes` row changes in transactions of `PER_TX`: per
/// transaction 500 inserts, 300 updates of earlier rows, 200 deletes.
async fn generate(pool: &PgPool, changes: i64) -> anyhow::Result<()> {
    let (ins, upd, del) = (PER_TX / 2, PER_TX * 3 / 10, PER_TX / 5);
    for step in 0..changes / PER_TX {
        let first = step * ins;
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO bench_rows
             SELECT g, 'na', g % 100000, rpad(md5(g::text), 150, 'x'), now(), (g % 10000) / 100.0
               FROM generate_series($1::bigint, $1::bigint + $2 - 1) g",
        )
        .bind(first)
        .bind(ins)
        .execute(&mut *tx)
        .await?;
        if step > 0 {
            // the previous step's rows: update 300 of them, delete 200 others
            let prev = first - ins;
            sqlx::query(
                "UPDATE bench_rows SET a = a + 1, c = now() WHERE id >= $1 AND id < $1 + $2",
            )
            .bind(prev)
            .bind(upd)
            .execute(&mut *tx)
            .await?;
            sqlx::query("DELETE FROM bench_rows WHERE id >= $1 AND id < $1 + $2")
                .bind(prev + upd)
                .bind(del)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("UPDATE bench_rows SET a = a + 1 WHERE id < $1")
                .bind(upd)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM bench_rows WHERE id >= $1 AND id < $1 + $2")
                .bind(upd)
                .bind(del)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

async fn fingerprint(pool: &PgPool) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT count(*), coalesce(sum(a), 0)::bigint, coalesce(sum(hashtext(b || c::text || d::text)), 0)::bigint FROM bench_rows",
    )
    .fetch_one(pool)
    .await?)
}

async fn wait_for<F, Fut>(mut check: F, timeout: Duration) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    while !check().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
