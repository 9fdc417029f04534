//! Steady-state lag benchmark: commit-to-visible lag of Meridian and of
//! PostgreSQL's native logical replication, side by side, from one source
//! under a constant write rate.
//!
//! One source cluster feeds two destinations at once: one through
//! Meridian's agents (gRPC), one through a native subscription. 64
//! connections insert single-row transactions at a fixed total rate; each
//! row carries the source's clock at insert (`t`), and each destination
//! stamps its own arrival (`seen`, a column only the destinations have, set
//! by its default). Same machine, same clock. One JSON line per rate:
//! achieved rate, and p50/p99/max of `seen - t` for both.
//!
//! ```sh
//! cargo bench --bench lag                                  # 1,000, 5,000 and 20,000 transactions/s
//! MERIDIAN_LAG_RATES=2000,8000 MERIDIAN_LAG_SECONDS=20 cargo bench --bench lag
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_testkit::postgres::PgOptions;
use meridian_testkit::{AgentProcess, PgCluster};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const SOURCE_SCHEMA: &str = "CREATE TABLE probe (
    id bigint PRIMARY KEY,
    region text NOT NULL,
    t timestamptz NOT NULL,
    pad text NOT NULL
);";

/// The destinations' copy: the same columns and the arrival time.
const DESTINATION_SCHEMA: &str = "CREATE TABLE probe (
    id bigint PRIMARY KEY,
    region text NOT NULL,
    t timestamptz NOT NULL,
    pad text NOT NULL,
    seen timestamptz DEFAULT clock_timestamp()
);";

const WRITERS: u64 = 64;

fn env_list(name: &str, default: &[u64]) -> anyhow::Result<Vec<u64>> {
    match std::env::var(name) {
        Ok(v) => v
            .split(',')
            .map(|s| s.trim().parse().with_context(|| format!("{name}: {s:?}")))
            .collect(),
        Err(_) => Ok(default.to_vec()),
    }
}

fn main() -> anyhow::Result<()> {
    let rates = env_list("MERIDIAN_LAG_RATES", &[1_000, 5_000, 20_000])?;
    let seconds = env_list("MERIDIAN_LAG_SECONDS", &[15])?[0];
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(&rates, seconds))
}

async fn pool(cluster: &PgCluster, connections: u32) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(connections)
        .connect(&cluster.url("postgres"))
        .await?)
}

async fn run(rates: &[u64], seconds: u64) -> anyhow::Result<()> {
    let options = PgOptions {
        fsync: true,
        ..PgOptions::default()
    };
    let source = PgCluster::start_with(&options)?;
    let meridian_dst = PgCluster::start_with(&options)?;
    let native_dst = PgCluster::start_with(&options)?;
    let src = pool(&source, WRITERS as u32 + 2).await?;
    let (mdst, ndst) = (pool(&meridian_dst, 2).await?, pool(&native_dst, 2).await?);
    sqlx::raw_sql(SOURCE_SCHEMA).execute(&src).await?;
    for dst in [&mdst, &ndst] {
        sqlx::raw_sql(DESTINATION_SCHEMA).execute(dst).await?;
    }
    sqlx::raw_sql("CREATE PUBLICATION lag_native FOR TABLE probe")
        .execute(&src)
        .await?;
    sqlx::raw_sql(&format!(
        "CREATE SUBSCRIPTION lag_native CONNECTION '{}' PUBLICATION lag_native WITH (copy_data = false)",
        source.conninfo("postgres")
    ))
    .execute(&ndst)
    .await?;
    let topology = format!(
        "[regions.na]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\n\
         [regions.eu]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\n\
         [[tables]]\nname = \"public.probe\"\nprimary_key = [\"id\"]\nhome_column = \"region\"\n\n\
         [security]\nplaintext = true\n",
        source.url("postgres"),
        meridian_testkit::free_port(),
        meridian_dst.url("postgres"),
        meridian_testkit::free_port(),
    );
    let config = source.dir().join("topology.toml");
    std::fs::write(&config, topology)?;
    let binary = Path::new(env!("CARGO_BIN_EXE_meridian"));
    let _agents = [
        AgentProcess::spawn(binary, &config, "na", source.dir())?,
        AgentProcess::spawn(binary, &config, "eu", source.dir())?,
    ];
    // both paths are live once a first row, written after Meridian's slot
    // exists, arrives through each
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'meridian_na_to_eu'",
    )
    .fetch_one(&src)
    .await?
        == 0
    {
        anyhow::ensure!(Instant::now() < deadline, "the source agent made no slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sqlx::query("INSERT INTO probe VALUES (0, 'na', clock_timestamp(), 'warm-up')")
        .execute(&src)
        .await?;
    for dst in [&mdst, &ndst] {
        wait_for_rows(dst, 1, Duration::from_secs(60))
            .await
            .context("a destination never received the warm-up row")?;
    }

    let mut next_id = 1u64;
    for &rate in rates {
        let first = next_id;
        let started = Instant::now();
        let written = drive(&src, rate, seconds, first).await?;
        let elapsed = started.elapsed().as_secs_f64();
        next_id += written;
        let total = next_id as i64; // ids 0..next_id
        for dst in [&mdst, &ndst] {
            wait_for_rows(dst, total, Duration::from_secs(600)).await?;
        }
        let report = serde_json::json!({
            "benchmark": "steady_state_lag",
            "target_transactions_per_s": rate,
            "achieved_transactions_per_s": (written as f64 / elapsed).round(),
            "seconds": seconds,
            "writers": WRITERS,
            "meridian": lag(&mdst, first).await?,
            "native_logical_replication": lag(&ndst, first).await?,
        });
        println!("{report}");
    }
    Ok(())
}

/// Inserts single-row transactions at `rate` per second in total for
/// `seconds`, from [`WRITERS`] connections; returns how many it wrote.
async fn drive(pool: &PgPool, rate: u64, seconds: u64, first: u64) -> anyhow::Result<u64> {
    let per_writer = (rate * seconds).div_ceil(WRITERS);
    let interval = Duration::from_secs_f64(WRITERS as f64 / rate as f64);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let writers = (0..WRITERS).map(|w| {
        let pool = pool.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut written = 0u64;
            while written < per_writer && Instant::now() < deadline {
                ticks.tick().await;
                let id = first + w + written * WRITERS;
                sqlx::query(
                    "INSERT INTO probe VALUES ($1, 'na', clock_timestamp(), repeat('x', 150))",
                )
                .bind(id as i64)
                .execute(&pool)
                .await?;
                written += 1;
            }
            Ok::<_, sqlx::Error>(written)
        })
    });
    let mut written = Vec::new();
    for w in writers {
        written.push(w.await??);
    }
    // ids are dense only if every writer wrote as many rows; fill the gaps
    // so that "all rows arrived" is a count
    let most = written.iter().copied().max().unwrap_or(0);
    for (w, &n) in written.iter().enumerate() {
        for k in n..most {
            sqlx::query("INSERT INTO probe VALUES ($1, 'na', clock_timestamp(), 'fill')")
                .bind((first + w as u64 + k * WRITERS) as i64)
                .execute(pool)
                .await?;
        }
    }
    Ok(most * WRITERS)
}

async fn wait_for_rows(pool: &PgPool, rows: i64, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM probe")
            .fetch_one(pool)
            .await?;
        if n >= rows {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{n} of {rows} rows after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// p50, p99 and max of arrival minus insert time, in milliseconds, for rows
/// from `first` on.
async fn lag(pool: &PgPool, first: u64) -> anyhow::Result<serde_json::Value> {
    let (p50, p99, max): (f64, f64, f64) = sqlx::query_as(
        "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY ms),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY ms),
                max(ms)
           FROM (SELECT extract(epoch FROM seen - t)::float8 * 1000 AS ms
                   FROM probe WHERE id >= $1 AND pad <> 'fill') AS l",
    )
    .bind(first as i64)
    .fetch_one(pool)
    .await?;
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Ok(serde_json::json!({"p50_ms": round(p50), "p99_ms": round(p99), "max_ms": round(max)}))
}
