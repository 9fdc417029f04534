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
            kafka: false,
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
