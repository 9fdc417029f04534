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
        .write(async move |tx| {
            let id = sqlx::query_scalar(
                "INSERT INTO orders (tenant, region, total) VALUES ($1, $2, 10) RETURNING id::text",
            )
            .bind(tenant_id)
            .bind(region)
            .fetch_one(&mut **tx)
            .await?;
            Ok(id)
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
            .write(async move |tx| {
                sqlx::query(sql).execute(&mut **tx).await?;
                Ok(())
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
    let mut tasks: Vec<tokio::task::JoinHandle<Result<i32, Error>>> = Vec::new();
    for writer in ["first", "second"] {
        let (client, barrier, runs) = (client.clone(), barrier.clone(), runs.clone());
        tasks.push(tokio::spawn(async move {
            client
                .global()
                // spawned: the future must be Send, so a boxed closure
                .transaction_boxed(move |tx| {
                    let (barrier, runs) = (barrier.clone(), runs.clone());
                    Box::pin(async move {
                        // borrows barrier, runs and writer; tx.attempt() counts runs
                        runs.fetch_add(1, Ordering::SeqCst);
                        let updates: i32 =
                            sqlx::query_scalar("SELECT updates FROM plans WHERE name = 'pro'")
                                .fetch_one(&mut **tx)
                                .await?;
                        if tx.attempt() == 1 {
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
                            .bind(writer.to_owned())
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
        .transaction(async move |tx| {
                sqlx::query("DO $$ BEGIN RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = 'simulated conflict'; END $$")
                    .execute(&mut **tx)
                    .await?;
                Ok(())
            })
        .await
        .unwrap_err();
    assert!(
        matches!(e, Error::RetriesExhausted { attempts: 3, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("gave up after 3 attempts"), "{e}");
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

/// Waits until `region` has the order `id` (by direct SQL).
async fn wait_order(d: &Deployment, region: &str, id: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(d.pool(region))
            .await?;
        if n == 1 {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "order {id} never reached {region}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `sql` (with `$1` = `id`) in a routed write for `tenant`, or in a
/// row move to `move_to`; the rows it affected.
async fn routed_sql(
    client: &Client,
    tenant: &str,
    move_to: Option<&str>,
    sql: &str,
    id: &str,
) -> Result<u64, Error> {
    let body = async |tx: &mut meridian_client::RoutedTransaction| -> Result<u64, Error> {
        Ok(sqlx::query(sql)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected())
    };
    let routed = client.tenant(tenant);
    let committed = match move_to {
        Some(to) => routed.move_rows(to, body).await?,
        None => routed.write(body).await?,
    };
    Ok(committed.value)
}

/// `(region, total)` of order `id` in `region`.
async fn order_row(d: &Deployment, region: &str, id: &str) -> anyhow::Result<(String, String)> {
    Ok(
        sqlx::query_as("SELECT region, total::text FROM orders WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(d.pool(region))
            .await?,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_writes_touch_only_the_tenants_rows_and_rows_move_only_by_a_row_move()
-> anyhow::Result<()> {
    let d = start().await?;
    let client = Client::open(&d.config, "na")?;
    place(&client, "tenant-eu", "eu").await?;
    place(&client, "tenant-na", "na").await?;
    let eu_row = order(&client, "tenant-eu", "eu").await?.value;
    for region in REGIONS {
        wait_order(&d, region, &eu_row).await?;
    }

    // through the client, on na's copy of an eu row: delete, take over, edit
    for sql in [
        "DELETE FROM orders WHERE id = $1::uuid",
        "UPDATE orders SET region = 'na', total = 999 WHERE id = $1::uuid",
        "UPDATE orders SET total = 999 WHERE id = $1::uuid",
    ] {
        let row = eu_row.clone();
        let e = client
            .tenant("tenant-na")
            .write(async |tx| -> Result<(), Error> {
                sqlx::query(sql).bind(&row).execute(&mut *tx).await?;
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(e.is_refusal() && !e.is_retryable(), "{sql}: {e:?}");
        let Error::WrongHome { detail, hint } = &e else {
            panic!("{sql}: expected WrongHome, got {e:?}");
        };
        assert!(
            detail.contains("region is eu") && detail.contains("lives in region na"),
            "{sql}: {e}"
        );
        assert!(
            hint.as_deref().is_some_and(|h| h.contains("read-only")),
            "{sql}: {e}"
        );
        assert!(e.to_string().contains("hint: "), "the hint is shown: {e}");
    }
    // the same with plain SQL on the handle, and with the caller's own error type
    let mut tx = client.tenant("tenant-na").begin().await?;
    assert_eq!((tx.tenant(), tx.home()), ("tenant-na", "na"));
    let refused = sqlx::query("DELETE FROM orders WHERE id = $1::uuid")
        .bind(&eu_row)
        .execute(&mut *tx)
        .await
        .unwrap_err();
    assert!(Error::from(refused).is_refusal());
    drop(tx);
    let e: anyhow::Error = client
        .tenant("tenant-na")
        .write(async |tx| -> anyhow::Result<()> {
            sqlx::query("DELETE FROM orders WHERE id = $1::uuid")
                .bind(&eu_row)
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("region is eu"), "{e:#}");
    // nothing changed anywhere
    tokio::time::sleep(Duration::from_millis(500)).await;
    for region in REGIONS {
        assert_eq!(
            order_row(&d, region, &eu_row).await?,
            ("eu".to_owned(), "10".to_owned()),
            "{region}"
        );
    }

    // the owner cannot re-home its row with a plain UPDATE...
    let e = routed_sql(
        &client,
        "tenant-eu",
        None,
        "UPDATE orders SET region = 'na' WHERE id = $1::uuid",
        &eu_row,
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, Error::WrongHome { hint: Some(h), .. } if h.contains("move_rows")),
        "{e:?}"
    );
    // ...only with a row move, to the region it names
    let e = routed_sql(
        &client,
        "tenant-eu",
        Some("apac"),
        "UPDATE orders SET region = 'na' WHERE id = $1::uuid",
        &eu_row,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::WrongHome { .. }), "{e:?}");
    let moved = client
        .tenant("tenant-eu")
        .move_rows("na", async |tx| -> Result<u64, Error> {
            Ok(
                sqlx::query("UPDATE orders SET region = 'na' WHERE id = $1::uuid")
                    .bind(&eu_row)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected(),
            )
        })
        .await?;
    assert_eq!(moved.value, 1);
    client.read("na").after(&moved.token).await?;
    // now na's tenant owns it, and eu's may no longer touch it
    routed_sql(
        &client,
        "tenant-na",
        None,
        "UPDATE orders SET total = 11 WHERE id = $1::uuid",
        &eu_row,
    )
    .await?;
    let e = routed_sql(
        &client,
        "tenant-eu",
        None,
        "DELETE FROM orders WHERE id = $1::uuid",
        &eu_row,
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::WrongHome { .. }), "{e:?}");
    d.wait_converged("orders", "id", 1, Duration::from_secs(60))
        .await?;
    for region in REGIONS {
        assert_eq!(
            order_row(&d, region, &eu_row).await?,
            ("na".to_owned(), "11".to_owned()),
            "{region}"
        );
    }

    // a read handle is read-only
    let apac = client.read("apac").await?;
    let e = sqlx::query("DELETE FROM orders")
        .execute(&apac)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("read-only transaction"), "{e}");
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_waits_for_exactly_its_transaction_whatever_else_writes() -> anyhow::Result<()> {
    let d = start().await?;
    let client = Client::open(&d.config, "eu")?;
    place(&client, "acme", "na").await?;
    let warm = order(&client, "acme", "na").await?;
    client.read("apac").after(&warm.token).await?;

    let mut report = serde_json::Map::new();
    for writers in [false, true] {
        // another session in na writes every ~2 ms (not replicated data)
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let noise = writers.then(|| {
            let (pool, stop) = (d.pool("na").clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    sqlx::query("INSERT INTO fx_rates VALUES (gen_random_uuid()::text, 1)")
                        .execute(&pool)
                        .await?;
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                anyhow::Ok(())
            })
        });
        let (mut waited, mut arrived) = (Vec::new(), Vec::new());
        for _ in 0..40 {
            let committed = order(&client, "acme", "na").await?;
            let start = std::time::Instant::now();
            let apac = d.pool("apac").clone();
            let id = committed.value.clone();
            let arrival = tokio::spawn(async move {
                loop {
                    let n: i64 =
                        sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = $1::uuid")
                            .bind(&id)
                            .fetch_one(&apac)
                            .await?;
                    if n == 1 {
                        return anyhow::Ok(start.elapsed());
                    }
                    tokio::time::sleep(Duration::from_micros(500)).await;
                }
            });
            let read = client.read("apac").after(&committed.token).await?;
            waited.push(start.elapsed().as_secs_f64() * 1000.0);
            // never early: the row is there when the wait ends
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = $1::uuid")
                .bind(&committed.value)
                .fetch_one(&read)
                .await?;
            assert_eq!(n, 1, "after() returned before the write arrived");
            arrived.push(arrival.await??.as_secs_f64() * 1000.0);
            // and it was recognized by its id
            let tag = committed
                .token
                .id
                .expect("a new token has an id")
                .simple()
                .to_string();
            let recorded: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM meridian.applied_tokens WHERE source_region = 'na' AND token = $1::uuid",
            )
            .bind(tag)
            .fetch_one(d.pool("apac"))
            .await?;
            assert_eq!(recorded, 1);
        }
        stop.store(true, Ordering::SeqCst);
        if let Some(noise) = noise {
            noise.await??;
        }
        waited.sort_by(f64::total_cmp);
        arrived.sort_by(f64::total_cmp);
        report.insert(
            if writers { "with_writers" } else { "alone" }.to_owned(),
            serde_json::json!({
                "wait_ms_p50": percentile(&waited, 0.5),
                "wait_ms_p99": percentile(&waited, 0.99),
                "arrival_ms_p50": percentile(&arrived, 0.5),
                "arrival_ms_p99": percentile(&arrived, 0.99),
            }),
        );
    }
    println!("token_wait {}", serde_json::Value::Object(report));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_whose_answer_is_lost_is_reported_as_unknown_and_can_be_asked_about()
-> anyhow::Result<()> {
    let d = start().await?;
    // a client whose connections to na pass through a proxy
    let na = d.cluster("na").url("postgres");
    let proxy =
        meridian_testkit::TcpProxy::start(&format!("127.0.0.1:{}", d.cluster("na").port())).await?;
    let proxied = na.replace(
        &format!(":{}/", d.cluster("na").port()),
        &format!("{}/", proxy.addr().trim_start_matches("127.0.0.1")),
    );
    let topology = std::fs::read_to_string(&d.config)?.replace(&na, &proxied);
    let config = d.config.with_file_name("proxied-topology.toml");
    std::fs::write(&config, topology)?;
    let client = Client::open(&config, "eu")?;
    place(&client, "acme", "na").await?;

    for lose_request in [false, true] {
        let mut tx = client.tenant("acme").begin().await?;
        let id: String = sqlx::query_scalar(
            "INSERT INTO orders (tenant, region, total) VALUES ('acme', 'na', 7) RETURNING id::text",
        )
        .fetch_one(&mut *tx)
        .await?;
        if lose_request {
            proxy.pause(); // COMMIT never reaches the store
        } else {
            proxy.swallow_replies(); // COMMIT arrives, its answer does not
        }
        let committing = tokio::spawn(tx.commit());
        tokio::time::sleep(Duration::from_millis(500)).await;
        proxy.cut();
        proxy.resume();
        let e = committing.await?.unwrap_err();
        let Error::CommitOutcomeUnknown { commit, .. } = &e else {
            panic!("expected CommitOutcomeUnknown, got {e:?}");
        };
        assert!(!e.is_retryable(), "{e}");
        assert!(e.to_string().contains("commit_outcome"), "{e}");
        assert_eq!(commit.store, "na");
        let outcome = loop {
            match client.commit_outcome(commit).await? {
                meridian_client::CommitOutcome::InProgress => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                outcome => break outcome,
            }
        };
        let exists: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = $1::uuid")
            .bind(&id)
            .fetch_one(d.pool("na"))
            .await?;
        if lose_request {
            assert_eq!(outcome, meridian_client::CommitOutcome::Aborted);
            assert_eq!(exists, 0);
        } else {
            assert_eq!(outcome, meridian_client::CommitOutcome::Committed);
            assert_eq!(exists, 1);
            // and its token resolves elsewhere
            let token = commit.token.clone().expect("routed writes have a token");
            client.read("apac").after(&token).await?;
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_commit_whose_answer_is_lost_is_reported_as_unknown() -> anyhow::Result<()> {
    let d = start().await?;
    let global = d.global_pool().connect_options().get_port();
    let proxy = meridian_testkit::TcpProxy::start(&format!("127.0.0.1:{global}")).await?;
    let text = std::fs::read_to_string(&d.config)?;
    let (head, tail) = text.split_once("[global]").expect("a [global] section");
    let tail = tail.replacen(
        &format!("127.0.0.1:{global}/"),
        &format!("{}/", proxy.addr()),
        1,
    );
    let config = d.config.with_file_name("proxied-global.toml");
    std::fs::write(&config, format!("{head}[global]{tail}"))?;
    let client = Client::open(&config, "eu")?;
    client
        .global()
        .transaction(async |tx| -> Result<(), Error> {
            sqlx::query("SELECT 1").execute(&mut *tx).await?;
            Ok(())
        })
        .await?;

    let (client2, swallowing) = (client.clone(), Arc::new(tokio::sync::Notify::new()));
    let notify = swallowing.clone();
    let run = tokio::spawn(async move {
        client2
            .global()
            .transaction_boxed(move |tx| {
                let notify = notify.clone();
                Box::pin(async move {
                    sqlx::query("INSERT INTO plan_changes (writer) VALUES ('lost answer')")
                        .execute(&mut **tx)
                        .await?;
                    notify.notify_one(); // the test now swallows the answers
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    Ok::<_, Error>(())
                })
            })
            .await
    });
    swallowing.notified().await;
    proxy.swallow_replies();
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.cut();
    let e = run.await?.unwrap_err();
    let Error::CommitOutcomeUnknown { commit, .. } = &e else {
        panic!("expected CommitOutcomeUnknown, got {e:?}");
    };
    assert_eq!(commit.store, "global");
    assert_eq!(
        client.commit_outcome(commit).await?,
        meridian_client::CommitOutcome::Committed
    );
    let n: i64 =
        sqlx::query_scalar("SELECT count(*) FROM plan_changes WHERE writer = 'lost answer'")
            .fetch_one(d.global_pool())
            .await?;
    assert_eq!(n, 1, "committed once, not retried");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_resolves_where_the_policy_keeps_the_rows_out() -> anyhow::Result<()> {
    // na's orders stay out of apac
    let policy = POLICY.replace(
        "from = [\"na\", \"eu\", \"apac\"]\nto = [\"na\", \"eu\", \"apac\"]",
        "from = [\"na\", \"eu\", \"apac\"]\nto = [\"na\", \"eu\"]",
    );
    assert_ne!(policy, POLICY);
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: SCHEMA,
            tables: &[("public.orders", "id", "region")],
            proxied: &[],
            extra_topology: "[replication]\nheartbeat_ms = 60000\n",
            policy: Some(&policy),
            agent_env: &[],
            global_schema: Some(GLOBAL_SCHEMA),
            kafka: false,
        },
    )
    .await?;
    let client = Client::open(&d.config, "eu")?;
    place(&client, "acme", "na").await?;
    let committed = order(&client, "acme", "na").await?;
    // heartbeats are a minute apart: only the token's own transaction can
    // resolve it, and it carries no row for apac
    let apac = client
        .read("apac")
        .after(&committed.token)
        .timeout(Duration::from_secs(20))
        .await?;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders")
        .fetch_one(&apac)
        .await?;
    assert_eq!(n, 0, "the row stays out of apac");
    client.read("eu").after(&committed.token).await?;
    assert_eq!(count_orders(&d, "eu", "acme").await?, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routed_writes_on_partitioned_tables_app_triggers_and_padded_homes() -> anyhow::Result<()> {
    const SHAPES: &str = "
CREATE TABLE events (id bigint, region text NOT NULL, body text, PRIMARY KEY (id, region))
    PARTITION BY LIST (region);
CREATE TABLE events_na PARTITION OF events FOR VALUES IN ('na');
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_apac PARTITION OF events FOR VALUES IN ('apac');
CREATE TABLE padded (id bigint PRIMARY KEY, region char(6) NOT NULL,
                     secret text, amount int CHECK (amount >= 0));
-- an application trigger that re-homes rows, sorting after meridian_*
CREATE FUNCTION route_vip() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN IF NEW.amount = 999 THEN NEW.region := 'apac'; END IF; RETURN NEW; END $$;
CREATE TRIGGER route_vip BEFORE INSERT OR UPDATE ON padded FOR EACH ROW EXECUTE FUNCTION route_vip();";
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: SHAPES,
            tables: &[
                ("public.events", "id, region", "region"),
                ("public.padded", "id", "region"),
            ],
            proxied: &[],
            extra_topology: "[replication]\nheartbeat_ms = 200\n",
            policy: None,
            agent_env: &[],
            global_schema: Some(GLOBAL_SCHEMA),
            kafka: false,
        },
    )
    .await?;
    let client = Client::open(&d.config, "eu")?;
    place(&client, "acme", "na").await?;
    let sql = async |sql: &str| -> Result<u64, Error> {
        let committed = client
            .tenant("acme")
            .write(async |tx| -> Result<u64, Error> {
                Ok(sqlx::query(sql).execute(&mut *tx).await?.rows_affected())
            })
            .await?;
        Ok(committed.value)
    };

    // a padded home column is the region it names
    assert_eq!(
        sql("INSERT INTO padded VALUES (1, 'na', 'SSN-123', 1)").await?,
        1
    );
    // an application trigger that re-homes the row after the check would
    // have: the check runs last and sees it
    let e = sql("UPDATE padded SET amount = 999 WHERE id = 1")
        .await
        .unwrap_err();
    assert!(matches!(e, Error::WrongHome { .. }), "{e:?}");
    // a store error says what broke, never the row's values
    let e = sql("UPDATE padded SET amount = -1 WHERE id = 1")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("check constraint"), "{e}");
    assert!(!e.to_string().contains("SSN-123"), "{e}");

    // a row move between partitions (DELETE + INSERT underneath)
    assert_eq!(sql("INSERT INTO events VALUES (1, 'na', 'x')").await?, 1);
    let moved = client
        .tenant("acme")
        .move_rows("eu", async |tx| -> Result<u64, Error> {
            Ok(sqlx::query("UPDATE events SET region = 'eu' WHERE id = 1")
                .execute(&mut *tx)
                .await?
                .rows_affected())
        })
        .await?;
    assert_eq!(moved.value, 1);
    client.read("apac").after(&moved.token).await?;
    d.wait_converged("events", "id", 1, Duration::from_secs(60))
        .await?;
    let region: String = sqlx::query_scalar("SELECT region FROM events WHERE id = 1")
        .fetch_one(d.pool("apac"))
        .await?;
    assert_eq!(region, "eu");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_kafka_a_token_resolves_without_waiting_for_a_heartbeat() -> anyhow::Result<()> {
    let d = Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: SCHEMA,
            tables: &[("public.orders", "id", "region")],
            proxied: &[],
            // heartbeats a minute apart: they cannot be what resolves tokens
            extra_topology: "[replication]\nheartbeat_ms = 60000\n",
            policy: Some(POLICY),
            agent_env: &[],
            global_schema: Some(GLOBAL_SCHEMA),
            kafka: true,
        },
    )
    .await?;
    let client = Client::open(&d.config, "eu")?;
    place(&client, "acme", "na").await?;
    let mut waits = Vec::new();
    for _ in 0..5 {
        let committed = order(&client, "acme", "na").await?;
        let started = std::time::Instant::now();
        let apac = client
            .read("apac")
            .after(&committed.token)
            .timeout(Duration::from_secs(30))
            .await?;
        waits.push(started.elapsed().as_millis());
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM orders WHERE id = $1::uuid")
            .bind(&committed.value)
            .fetch_one(&apac)
            .await?;
        assert_eq!(n, 1, "after() returned before the write arrived");
    }
    println!("kafka token waits (ms): {waits:?}");
    Ok(())
}
