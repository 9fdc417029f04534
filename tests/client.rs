//! The client library against real stores and agents: routed writes,
//! refusals, read-your-writes across regions, the global path's retries,
//! and placement changes.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use meridian_client::{Client, CommitToken, Error};
use meridian_testkit::{Deployment, Spec};

const REGIONS: [&str; 3] = ["na", "eu", "apac"];

/// `written_on` records the port of the store that took the insert; the value
/// replicates, so every copy tells where the write really happened.
const SCHEMA: &str = "
CREATE TABLE orders (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant text NOT NULL,
    region text NOT NULL,
    total numeric NOT NULL,
    written_on integer NOT NULL DEFAULT inet_server_port()
);
-- a stale regional copy of a global table
CREATE TABLE fx_rates (currency text PRIMARY KEY, rate numeric);";

const GLOBAL_SCHEMA: &str = "
CREATE TABLE plans (name text PRIMARY KEY, price numeric NOT NULL, updates integer NOT NULL);
INSERT INTO plans VALUES ('pro', 100, 0);
CREATE TABLE plan_changes (writer text NOT NULL, at timestamptz NOT NULL DEFAULT now());";

const POLICY: &str = r#"
version = 1
global = ["public.plans", "public.fx_rates"]

[[rules]]
name = "orders-everywhere"
table = "public.orders"
from = ["na", "eu", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", tenant = "keep", region = "keep", total = "keep", written_on = "keep" }
"#;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

async fn start() -> anyhow::Result<Deployment> {
    Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: SCHEMA,
            tables: &[("public.orders", "id", "region")],
            proxied: &["apac"],
            extra_topology: "[replication]\nheartbeat_ms = 200\n",
            policy: Some(POLICY),
            agent_env: &[],
            global_schema: Some(GLOBAL_SCHEMA),
            kafka: false,
        },
    )
    .await
}

/// Places `tenant` in `home` and checks every region was told.
async fn place(client: &Client, tenant: &str, home: &str) -> anyhow::Result<()> {
    let change = client.placements().set(tenant, home).await?;
    anyhow::ensure!(change.complete(), "placement not pushed: {change:?}");
    Ok(())
}

/// Inserts one order for `tenant` whose home column says `region`.
async fn order(
    client: &Client,
    tenant: &str,
    region: &str,
) -> Result<meridian_client::Committed<String>, Error> {
    let (tenant_id, region) = (tenant.to_owned(), region.to_owned());
    client
        .tenant(tenant)
        .write(move |tx| {
            Box::pin(async move {
                let id = sqlx::query_scalar(
                    "INSERT INTO orders (tenant, region, total) VALUES ($1, $2, 10) RETURNING id::text",
                )
                .bind(tenant_id)
                .bind(region)
                .fetch_one(&mut **tx)
                .await?;
                Ok(id)
            })
        })
        .await
}

async fn count_orders(d: &Deployment, region: &str, tenant: &str) -> anyhow::Result<i64> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM orders WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(d.pool(region))
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_go_to_the_tenants_home_region_and_wrong_ones_are_refused() -> anyhow::Result<()> {
    let d = start().await?;
    // this service runs in eu
    let client = Client::open(&d.config, "eu")?;
    for home in REGIONS {
        place(&client, &format!("tenant-{home}"), home).await?;
    }

    for home in REGIONS {
        let tenant = format!("tenant-{home}");
        let committed = order(&client, &tenant, home).await?;
        assert_eq!(committed.token.region, home);
        let written_on: i32 =
            sqlx::query_scalar("SELECT written_on FROM orders WHERE id = $1::uuid")
                .bind(committed.value)
                .fetch_one(d.pool(home))
                .await?;
        assert_eq!(
            written_on as u16,
            d.cluster(home).port(),
            "{tenant}'s order was written on another store"
        );
    }

    // a row of another home region, through an eu tenant: refused, nothing written
    let e = order(&client, "tenant-eu", "na").await.unwrap_err();
    let Error::WrongHome { detail, .. } = &e else {
        panic!("expected WrongHome, got {e:?}");
    };
    assert!(
        detail.contains("region is na") && detail.contains("lives in region eu"),
        "{e}"
    );
    assert_eq!(count_orders(&d, "eu", "tenant-eu").await?, 1);

    // global tables: absent from the regional store, or a stale copy there
    for (table, sql) in [
        ("public.plans", "UPDATE plans SET price = 1"),
        (
            "public.fx_rates",
            "INSERT INTO fx_rates VALUES ('EUR', 1.1)",
        ),
    ] {
        let e = client
            .tenant("tenant-na")
            .write(move |tx| {
                Box::pin(async move {
                    sqlx::query(sql).execute(&mut **tx).await?;
                    Ok(())
                })
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::GlobalTable { table: t } if t == table),
            "{table}: {e:?}"
        );
        assert!(e.to_string().contains("client.global().transaction"), "{e}");
    }
    let rates: i64 = sqlx::query_scalar("SELECT count(*) FROM fx_rates")
        .fetch_one(d.pool("na"))
        .await?;
    assert_eq!(rates, 0);

    // a tenant nobody placed
    let e = order(&client, "tenant-nowhere", "eu").await.unwrap_err();
    assert!(matches!(e, Error::NoPlacement { .. }), "{e:?}");
    assert!(e.to_string().contains("meridian placement set"), "{e}");

    // outside routed writes, the stores behave as before (apply, admin work)
    sqlx::query("INSERT INTO orders (tenant, region, total) VALUES ('ops', 'na', 1)")
        .execute(d.pool("eu"))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_after_a_token_waits_for_the_write_or_says_not_yet_replicated() -> anyhow::Result<()>
{
    let d = start().await?;
    let client = Client::open(&d.config, "eu")?;
    place(&client, "acme", "na").await?;
    // warm the links up before the proxy is touched
    order(&client, "acme", "na").await?;
    d.wait_converged("orders", "id", 1, Duration::from_secs(60))
        .await?;

    // without a token, or in the token's own region: no wait
    let committed = order(&client, "acme", "na").await?;
    let token: CommitToken = committed.token.to_string().parse()?;
    assert_eq!(token.region, "na");
    assert!(token.to_string().len() < 40, "{token}");
    client.read("na").after(&token).await?;

    // the link na -> apac is down: the read waits, then sees the row
    d.proxy("apac").pause();
    let committed = order(&client, "acme", "na").await?;
    let token: CommitToken = committed.token.to_string().parse()?;
    let reader = client.clone();
    let read = tokio::spawn(async move {
        let apac = reader
            .read("apac")
            .after(&token)
            .timeout(Duration::from_secs(60))
            .await?;
        let found: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = $1::uuid")
            .bind(committed.value)
            .fetch_one(&apac)
            .await?;
        Ok::<i64, Error>(found)
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !read.is_finished(),
        "the read did not wait for the paused link"
    );
    d.proxy("apac").resume();
    assert_eq!(read.await??, 1, "after the wait, the row is in apac");

    // paused again: a short timeout says what is missing
    d.proxy("apac").pause();
    let committed = order(&client, "acme", "na").await?;
    let e = client
        .read("apac")
        .after(&committed.token)
        .timeout(Duration::from_millis(800))
        .await
        .unwrap_err();
    let Error::NotYetReplicated {
        region,
        source_region,
        wanted,
        applied,
        waited,
    } = &e
    else {
        panic!("expected NotYetReplicated, got {e:?}");
    };
    assert_eq!((region.as_str(), source_region.as_str()), ("apac", "na"));
    assert!(
        applied < wanted && *waited >= Duration::from_millis(800),
        "{e}"
    );
    assert!(e.to_string().starts_with("not yet replicated"), "{e}");
    // the other, healthy region has it
    client.read("eu").after(&committed.token).await?;
    d.proxy("apac").resume();
    client
        .read("apac")
        .after(&committed.token)
        .timeout(Duration::from_secs(60))
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_global_transactions_both_commit_exactly_once() -> anyhow::Result<()> {
    let d = start().await?;
    let client = Client::open(&d.config, "na")?;
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let runs = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for writer in ["first", "second"] {
        let (client, barrier, runs) = (client.clone(), barrier.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            let mut attempt = 0;
            client
                .global()
                .transaction(move |tx| {
                    attempt += 1;
                    let first_attempt = attempt == 1;
                    let (barrier, runs) = (barrier.clone(), runs.clone());
                    Box::pin(async move {
                        runs.fetch_add(1, Ordering::SeqCst);
                        let updates: i32 =
                            sqlx::query_scalar("SELECT updates FROM plans WHERE name = 'pro'")
                                .fetch_one(&mut **tx)
                                .await?;
                        if first_attempt {
                            // both have read before either writes: a conflict
                            barrier.wait().await;
                        }
                        sqlx::query(
                            "UPDATE plans SET updates = $1, price = price + 1 WHERE name = 'pro'",
                        )
                        .bind(updates + 1)
                        .execute(&mut **tx)
                        .await?;
                        sqlx::query("INSERT INTO plan_changes (writer) VALUES ($1)")
                            .bind(writer)
                            .execute(&mut **tx)
                            .await?;
                        Ok(updates + 1)
                    })
                })
                .await
        }));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await??);
    }
    results.sort();
    assert_eq!(results, vec![1, 2], "each saw the other's commit or none");
    let (updates, price): (i32, String) =
        sqlx::query_as("SELECT updates, price::text FROM plans WHERE name = 'pro'")
            .fetch_one(d.global_pool())
            .await?;
    assert_eq!((updates, price.as_str()), (2, "102"), "no update lost");
    let changes: Vec<(String, i64)> =
        sqlx::query_as("SELECT writer, count(*) FROM plan_changes GROUP BY writer ORDER BY writer")
            .fetch_all(d.global_pool())
            .await?;
    assert_eq!(
        changes,
        vec![("first".to_owned(), 1), ("second".to_owned(), 1)],
        "each committed exactly once"
    );
    assert!(
        runs.load(Ordering::SeqCst) >= 3,
        "the loser ran again after its serialization failure"
    );

    // a bounded number of attempts: a transaction that always conflicts gives up
    let e = client
        .global()
        .max_attempts(3)
        .transaction(|tx| {
            Box::pin(async move {
                sqlx::query("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = 'simulated conflict'; END $$")
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::RetriesExhausted { attempts: 3, .. }),
        "{e:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_stale_placement_follows_the_tenant_to_its_new_home() -> anyhow::Result<()>
{
    let d = start().await?;
    let client = Client::open(&d.config, "eu")?;
    place(&client, "globex", "na").await?;
    order(&client, "globex", "na").await?;
    assert_eq!(client.tenant("globex").home().await?.epoch, 1);

    // an operator moves the tenant with the command line; the client's cache still says na
    let out = std::process::Command::new(binary())
        .args(["placement", "set", "--config"])
        .arg(&d.config)
        .args(["globex", "apac"])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("home na -> apac (epoch 2)"), "{stdout}");
    assert_eq!(
        client.tenant("globex").home().await?.home,
        "na",
        "still cached"
    );

    // na refuses the stale epoch; the client refreshes and writes in apac
    let committed = order(&client, "globex", "apac").await?;
    assert_eq!(committed.token.region, "apac");
    assert_eq!(client.tenant("globex").home().await?.epoch, 2);
    let written_on: i32 = sqlx::query_scalar("SELECT written_on FROM orders WHERE id = $1::uuid")
        .bind(committed.value)
        .fetch_one(d.pool("apac"))
        .await?;
    assert_eq!(written_on as u16, d.cluster("apac").port());
    // the old home's rows are now of another region
    let e = order(&client, "globex", "na").await.unwrap_err();
    assert!(matches!(e, Error::WrongHome { .. }), "{e:?}");

    // get, list, and a refusal of an unknown region
    let run = |args: &[&str]| {
        std::process::Command::new(binary())
            .arg("placement")
            .args(args)
            .arg("--config")
            .arg(&d.config)
            .output()
    };
    let got = run(&["get", "globex", "--json"])?;
    let got: serde_json::Value = serde_json::from_slice(&got.stdout)?;
    assert_eq!(got["home"], "apac");
    assert_eq!(got["epoch"], 2);
    let listed = run(&["list"])?;
    assert!(String::from_utf8_lossy(&listed.stdout).contains("globex\tapac\t2"));
    let bad = run(&["set", "globex", "mars"])?;
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("unknown region \"mars\"") && stderr.contains("apac, eu, na"),
        "{stderr}"
    );
    Ok(())
}
