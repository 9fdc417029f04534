//! Initial sync benchmark: Meridian's copy of an existing table vs
//! PostgreSQL's native `CREATE SUBSCRIPTION ... WITH (copy_data = true)`, on
//! the same source data, in one run.
//!
//! A source cluster holds `MERIDIAN_BENCH_SYNC_ROWS` rows (default
//! 1,000,000; a ~200-byte row, the catch-up benchmark's shape). Meridian:
//! two agents start on a fresh destination (their link is new, so the
//! source's agent copies every row); timed from the agents' start until
//! the copy is recorded done and the destination holds every row. Native:
//! a subscription with `copy_data = true` on another fresh destination;
//! timed from `CREATE SUBSCRIPTION` until its table is ready and holds
//! every row. One JSON line: rows, bytes (the source table's size), each
//! side's seconds, rows/s and MB/s, and the ratio of Meridian's throughput
//! to native's (above 1: faster).
//!
//! ```sh
//! cargo bench --bench sync
//! MERIDIAN_BENCH_SYNC_ROWS=200000 cargo bench --bench sync
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use meridian_testkit::postgres::PgOptions;
use meridian_testkit::{AgentProcess, PgCluster};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const SCHEMA: &str = "
CREATE TABLE bench_rows (
    id bigint PRIMARY KEY,
    region text NOT NULL,
    a integer NOT NULL,
    b text NOT NULL,
    c timestamptz NOT NULL,
    d numeric(12,2),
    e text
);";

fn main() -> anyhow::Result<()> {
    let rows: i64 = std::env::var("MERIDIAN_BENCH_SYNC_ROWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(rows))
}

async fn connect(cluster: &PgCluster) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.url("postgres"))
        .await?)
}

async fn run(rows: i64) -> anyhow::Result<()> {
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
    sqlx::raw_sql(&format!(
        "INSERT INTO bench_rows
           SELECT i, 'na', i % 100000, rpad(md5(i::text), 150, 'x'), now(), (i % 10000) / 100.0, NULL
             FROM generate_series(1, {rows}) i"
    ))
    .execute(&src)
    .await?;
    for sql in ["VACUUM ANALYZE bench_rows", "CHECKPOINT"] {
        sqlx::query(sql).execute(&src).await?;
    }
    let bytes: i64 = sqlx::query_scalar("SELECT pg_table_size('bench_rows')")
        .fetch_one(&src)
        .await?;

    // Meridian: a new link copies every row homed in the source
    let config = source.dir().join("topology.toml");
    std::fs::write(
        &config,
        format!(
            "[regions.na]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\
             [regions.eu]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\
             [[tables]]\nname = \"public.bench_rows\"\nprimary_key = [\"id\"]\nhome_column = \"region\"\n\n\
             [security]\nplaintext = true\n",
            source.url("postgres"),
            meridian_testkit::free_port(),
            meridian_dst.url("postgres"),
            meridian_testkit::free_port(),
        ),
    )?;
    let binary = Path::new(env!("CARGO_BIN_EXE_meridian"));
    let started = Instant::now();
    let agents = [
        AgentProcess::spawn(binary, &config, "na", source.dir())?,
        AgentProcess::spawn(binary, &config, "eu", meridian_dst.dir())?,
    ];
    wait_for(
        || async {
            let copied: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_rows")
                .fetch_one(&mdst)
                .await?;
            let done: Option<bool> = sqlx::query_scalar(
                "SELECT bool_and(state = 'done') FROM meridian.sync_tables WHERE destination = 'eu'",
            )
            .fetch_one(&src)
            .await
            .unwrap_or(None);
            Ok(copied == rows && done == Some(true))
        },
        Duration::from_secs(3600),
    )
    .await?;
    let meridian_seconds = started.elapsed().as_secs_f64();
    drop(agents);

    // native: copy_data = true
    sqlx::raw_sql("CREATE PUBLICATION bench_native FOR TABLE bench_rows")
        .execute(&src)
        .await?;
    let started = Instant::now();
    sqlx::raw_sql(&format!(
        "CREATE SUBSCRIPTION bench_native CONNECTION '{}' PUBLICATION bench_native
           WITH (copy_data = true)",
        source.conninfo("postgres")
    ))
    .execute(&ndst)
    .await?;
    wait_for(
        || async {
            let ready: Option<bool> =
                sqlx::query_scalar("SELECT bool_and(srsubstate = 'r') FROM pg_subscription_rel")
                    .fetch_one(&ndst)
                    .await?;
            let copied: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_rows")
                .fetch_one(&ndst)
                .await?;
            Ok(ready == Some(true) && copied == rows)
        },
        Duration::from_secs(3600),
    )
    .await?;
    let native_seconds = started.elapsed().as_secs_f64();
    sqlx::raw_sql("ALTER SUBSCRIPTION bench_native DISABLE")
        .execute(&ndst)
        .await?;

    // both destinations hold the source's rows
    let print = |pool: PgPool| async move {
        sqlx::query_scalar::<_, String>(
            "SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM bench_rows t",
        )
        .fetch_one(&pool)
        .await
    };
    let want = print(src.clone()).await?;
    anyhow::ensure!(
        print(mdst.clone()).await? == want,
        "Meridian's copy differs"
    );
    anyhow::ensure!(print(ndst.clone()).await? == want, "native's copy differs");

    let mb = bytes as f64 / 1e6;
    let report = serde_json::json!({
        "benchmark": "initial_sync",
        "rows": rows,
        "table_bytes": bytes,
        "meridian": {
            "seconds": round(meridian_seconds),
            "rows_per_second": round(rows as f64 / meridian_seconds),
            "mb_per_second": round(mb / meridian_seconds),
        },
        "native_copy_data": {
            "seconds": round(native_seconds),
            "rows_per_second": round(rows as f64 / native_seconds),
            "mb_per_second": round(mb / native_seconds),
        },
        "throughput_ratio_meridian_to_native": round(native_seconds / meridian_seconds),
    });
    println!("{report}");
    Ok(())
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn wait_for<F, Fut>(mut check: F, timeout: Duration) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    while !check().await? {
        anyhow::ensure!(Instant::now() < deadline, "not done within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
