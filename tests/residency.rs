//! Residency end to end: what the policy forbids never lands outside its home
//! region, neither in any table of any store nor in the bytes sent between
//! agents; what it allows arrives, transformed as the policy says.

use std::path::Path;
use std::time::{Duration, Instant};

use meridian_testkit::{Deployment, Spec};
use sqlx::PgPool;

const REGIONS: [&str; 3] = ["na", "eu", "apac"];

const SCHEMA: &str = "
CREATE TABLE customers (id bigint PRIMARY KEY, region text NOT NULL, name text, email text);
CREATE TABLE orders (id bigint PRIMARY KEY, region text NOT NULL, customer_email text, amount numeric(12,2), note text);
-- FULL: deletes and updates carry the old row, so a home change is routed exactly
CREATE TABLE accounts (id bigint PRIMARY KEY, region text NOT NULL, plan text);
ALTER TABLE accounts REPLICA IDENTITY FULL;";

const POLICY: &str = r#"
version = 1

# eu customers (personal data) never leave eu: no rule sends them
[[rules]]
name = "customers-outside-eu"
table = "public.customers"
from = ["na", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", region = "keep", name = "keep", email = "keep" }

# eu orders may leave with the customer's email hashed and without the note
[[rules]]
name = "eu-orders-abroad"
table = "public.orders"
from = ["eu"]
to = ["na", "apac"]
columns = { id = "keep", region = "keep", amount = "keep", customer_email = "hash" }

[[rules]]
name = "na-accounts"
table = "public.accounts"
from = ["na"]
to = ["eu", "apac"]
columns = { id = "keep", region = "keep", plan = "keep" }

[[rules]]
name = "orders-outside-eu"
table = "public.orders"
from = ["na", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", region = "keep", amount = "keep", customer_email = "keep", note = "keep" }
"#;

/// Values that must never be seen outside eu.
const EU_ONLY: [&str; 5] = [
    "canary-eu-customer-name",
    "canary-eu-customer@mail.example",
    "canary-eu-order-email@mail.example",
    "canary-eu-order-note",
    "987654321001", // an eu customer's key
];

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

async fn start() -> anyhow::Result<Deployment> {
    start_over(false).await
}

async fn start_over(kafka: bool) -> anyhow::Result<Deployment> {
    Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: SCHEMA,
            tables: &[
                ("public.customers", "id", "region"),
                ("public.orders", "id", "region"),
                ("public.accounts", "id", "region"),
            ],
            proxied: &REGIONS,
            // batches cross uncompressed, so the proxies' captures can be
            // searched for values that must not leave eu
            // plain TCP, so the proxies' captures show what crossed
            extra_topology: "[replication]\ncompression = \"none\"\n[security]\nplaintext = true\n",
            policy: Some(POLICY),
            agent_env: &[("MERIDIAN_POLICY_HASH_KEY", "test-only-key")],
            global_schema: None,
            kafka,
        },
    )
    .await
}

/// Every row of every table of a store (application and `meridian` schemas), as text.
async fn dump(pool: &PgPool) -> anyhow::Result<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname IN ('public', 'meridian')",
    )
    .fetch_all(pool)
    .await?;
    let mut out = String::new();
    for t in tables {
        let rows: Option<String> =
            sqlx::query_scalar(&format!("SELECT string_agg(x::text, E'\\n') FROM {t} x"))
                .fetch_one(pool)
                .await?;
        out.push_str(&rows.unwrap_or_default());
        out.push('\n');
    }
    Ok(out)
}

async fn wait_for_row(pool: &PgPool, sql: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>(sql).fetch_one(pool).await? == 0 {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for: {sql}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// `meridian policy reload` as an operator runs it.
fn reload(d: &Deployment, region: Option<&str>) -> (bool, String) {
    let mut cmd = std::process::Command::new(binary());
    cmd.args(["policy", "reload", "--config"]).arg(&d.config);
    if let Some(r) = region {
        cmd.args(["--region", r]);
    }
    let out = cmd.output().expect("run meridian policy reload");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

async fn write_canaries(d: &Deployment) -> anyhow::Result<()> {
    sqlx::raw_sql(
        "INSERT INTO customers VALUES (987654321001, 'eu', 'canary-eu-customer-name', 'canary-eu-customer@mail.example');
         INSERT INTO orders VALUES (2001, 'eu', 'canary-eu-order-email@mail.example', 42.50, 'canary-eu-order-note');
         UPDATE customers SET name = name || '!' WHERE id = 987654321001;
         UPDATE orders SET amount = 43.00 WHERE id = 2001;",
    )
    .execute(d.pool("eu"))
    .await?;
    sqlx::raw_sql(
        "INSERT INTO customers VALUES (1001, 'na', 'na-customer', 'na@mail.example');
         INSERT INTO orders VALUES (1002, 'na', 'na@mail.example', 7.00, 'na-note');",
    )
    .execute(d.pool("na"))
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_forbidden_reaches_any_kafka_topic() -> anyhow::Result<()> {
    let mut d = start_over(true).await?;
    write_canaries(&d).await?;
    // allowed rows arrive, transformed; a marker written last in eu says
    // every earlier eu change went through every link
    sqlx::raw_sql("INSERT INTO orders VALUES (2999, 'eu', NULL, 1.00, NULL)")
        .execute(d.pool("eu"))
        .await?;
    for region in ["na", "apac"] {
        let pool = d.pool(region);
        wait_for_row(
            pool,
            "SELECT count(*) FROM orders WHERE id = 2001 AND amount = 43.00",
        )
        .await?;
        wait_for_row(pool, "SELECT count(*) FROM orders WHERE id = 2999").await?;
        let email: String = sqlx::query_scalar("SELECT customer_email FROM orders WHERE id = 2001")
            .fetch_one(pool)
            .await?;
        assert_eq!(
            email.len(),
            64,
            "{region}: hashed in the topic too: {email}"
        );
        let stored = dump(pool).await?;
        for canary in EU_ONLY {
            assert!(!stored.contains(canary), "{region}'s store holds {canary}");
        }
    }
    // na's rows reached eu: every link has carried records
    wait_for_row(d.pool("eu"), "SELECT count(*) FROM orders WHERE id = 1002").await?;
    // every record of every topic: keys, headers and values
    let records = d.broker().read_all("meridian.")?;
    let topics: std::collections::BTreeSet<&str> =
        records.iter().map(|r| r.topic.as_str()).collect();
    for link in ["meridian.eu.na", "meridian.eu.apac", "meridian.na.eu"] {
        assert!(topics.contains(link), "no records in {link}: {topics:?}");
    }
    let eu_out = records
        .iter()
        .filter(|r| r.topic.starts_with("meridian.eu."))
        .count();
    assert!(
        eu_out > 10,
        "eu's topics hold its changes and heartbeats: {eu_out}"
    );
    for r in &records {
        let mut bytes = r.key.clone().unwrap_or_default();
        bytes.extend(r.value.clone().unwrap_or_default());
        for h in &r.headers {
            bytes.extend(h);
        }
        let text = String::from_utf8_lossy(&bytes);
        for canary in EU_ONLY {
            assert!(!text.contains(canary), "{canary} is in topic {}", r.topic);
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_forbidden_leaves_its_home_region() -> anyhow::Result<()> {
    let d = start().await?;
    write_canaries(&d).await?;
    sqlx::raw_sql("DELETE FROM customers WHERE id = 987654321001")
        .execute(d.pool("eu"))
        .await?;
    // allowed rows arrive, transformed as the policy says
    for region in ["na", "apac"] {
        let pool = d.pool(region);
        wait_for_row(
            pool,
            "SELECT count(*) FROM orders WHERE id = 2001 AND amount = 43.00",
        )
        .await?;
        wait_for_row(pool, "SELECT count(*) FROM orders WHERE id = 1002").await?;
        wait_for_row(pool, "SELECT count(*) FROM customers WHERE id = 1001").await?;
        let (email, note): (String, Option<String>) =
            sqlx::query_as("SELECT customer_email, note FROM orders WHERE id = 2001")
                .fetch_one(pool)
                .await?;
        assert_eq!(
            email.len(),
            64,
            "{region}: the email arrives as an HMAC-SHA256: {email}"
        );
        assert!(email.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(
            note, None,
            "{region}: a column the rule does not name does not cross"
        );
    }
    wait_for_row(
        d.pool("eu"),
        "SELECT count(*) FROM customers WHERE id = 1001",
    )
    .await?;
    wait_for_row(
        d.pool("eu"),
        "SELECT count(*) FROM orders WHERE id = 1002 AND note = 'na-note'",
    )
    .await?;
    // a marker written last in eu, allowed everywhere: once it is in, every
    // earlier eu change has been processed by every link
    sqlx::raw_sql("INSERT INTO orders VALUES (2999, 'eu', NULL, 1.00, NULL)")
        .execute(d.pool("eu"))
        .await?;
    for region in ["na", "apac"] {
        wait_for_row(
            d.pool(region),
            "SELECT count(*) FROM orders WHERE id = 2999",
        )
        .await?;
    }
    for region in ["na", "apac"] {
        let stored = dump(d.pool(region)).await?;
        for canary in EU_ONLY {
            assert!(!stored.contains(canary), "{region}'s store holds {canary}");
        }
        let sent = String::from_utf8_lossy(&d.proxy(region).captured()).into_owned();
        assert!(sent.len() > 100, "the proxy saw the traffic to {region}");
        for canary in EU_ONLY {
            assert!(!sent.contains(canary), "{canary} was sent to {region}");
        }
    }
    let eu = dump(d.pool("eu")).await?;
    assert!(eu.contains("canary-eu-order-note"), "eu keeps its own data");
    // the audit counts what crossed and what did not (flushed every 2 s)
    let audit = "SELECT coalesce(sum(changes), 0)::bigint FROM meridian.residency_audit WHERE table_name = $1 AND source_region = 'eu' AND destination_region = 'na' AND verdict = $2";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let count = |table: &'static str, verdict: &'static str| {
            sqlx::query_scalar::<_, i64>(audit)
                .bind(table)
                .bind(verdict)
                .fetch_one(d.pool("eu"))
        };
        let blocked = count("public.customers", "blocked").await?;
        let transformed = count("public.orders", "transformed").await?;
        if blocked == 3 && transformed == 3 {
            break; // insert, update, delete of the eu customer; two orders and an update
        }
        if Instant::now() > deadline {
            let rows: Vec<(String, String, String, String, String, i64)> = sqlx::query_as(
                "SELECT table_name, rule, source_region, destination_region, verdict, changes FROM meridian.residency_audit",
            )
            .fetch_all(d.pool("eu"))
            .await?;
            anyhow::bail!(
                "audit counts: blocked {blocked}, transformed {transformed}; all: {rows:?}\n{}",
                d.agent_log("eu")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // the same counts are exported as metrics, without any value
    let metrics = d.metrics("eu").await?;
    assert!(
        metrics.contains(r#"meridian_policy_changes_total{table="public.customers",rule="-",source="eu",destination="na",verdict="blocked"} 3"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"meridian_policy_version{region="eu"} 1"#),
        "{metrics}"
    );
    for canary in EU_ONLY {
        assert!(!metrics.contains(canary), "metrics quote {canary}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misconfigured_sender_is_refused_by_the_receiver() -> anyhow::Result<()> {
    let mut d = start().await?;
    sqlx::raw_sql("INSERT INTO orders VALUES (1, 'eu', NULL, 1.00, NULL)")
        .execute(d.pool("eu"))
        .await?;
    wait_for_row(d.pool("na"), "SELECT count(*) FROM orders WHERE id = 1").await?;
    // eu's agent reloads a policy that lets eu customers out; na's does not
    let leaky = POLICY
        .replace(
            r#"from = ["na", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", region = "keep", name = "keep", email = "keep" }"#,
            r#"from = ["na", "apac", "eu"]
to = ["na", "eu", "apac"]
columns = { id = "keep", region = "keep", name = "keep", email = "keep" }"#,
        )
        .replace("version = 1", "version = 2");
    assert_ne!(leaky, POLICY);
    d.write_policy(&leaky)?;
    d.agent("eu").hangup()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d.agent_log("eu").contains("residency policy reloaded") {
        anyhow::ensure!(Instant::now() < deadline, "eu did not reload its policy");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::raw_sql(
        "INSERT INTO customers VALUES (987654321001, 'eu', 'canary-eu-customer-name', 'canary-eu-customer@mail.example')",
    )
    .execute(d.pool("eu"))
    .await?;
    // the receiver refuses the batch and records why, without values
    wait_for_row(
        d.pool("na"),
        "SELECT count(*) FROM meridian.policy_violations WHERE source_region = 'eu'",
    )
    .await?;
    let (sender, receiver, reason): (i64, i64, String) = sqlx::query_as(
        "SELECT sender_policy_version, receiver_policy_version, reason FROM meridian.policy_violations LIMIT 1",
    )
    .fetch_one(d.pool("na"))
    .await?;
    assert_eq!((sender, receiver), (2, 1));
    assert!(reason.contains("public.customers"), "{reason}");
    let stored = dump(d.pool("na")).await?;
    for canary in EU_ONLY {
        assert!(!stored.contains(canary), "na's store holds {canary}");
    }
    // an invalid file is refused by every agent; the policy in force stays
    d.write_policy("version = 3\n[[rules]]\ntable = 42\n")?;
    let (ok, out) = reload(&d, None);
    assert!(!ok, "{out}");
    assert_eq!(out.matches("not reloaded").count(), 3, "{out}");
    // fixing the sender's policy lets the link move on; nothing was lost
    d.write_policy(POLICY)?;
    let (ok, out) = reload(&d, Some("eu"));
    assert!(ok && out.contains("eu: policy version 1 in force"), "{out}");
    sqlx::raw_sql("INSERT INTO orders VALUES (2, 'eu', NULL, 2.00, NULL)")
        .execute(d.pool("eu"))
        .await?;
    wait_for_row(d.pool("na"), "SELECT count(*) FROM orders WHERE id = 2").await?;
    let stored = dump(d.pool("na")).await?;
    for canary in EU_ONLY {
        assert!(!stored.contains(canary), "na's store holds {canary}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_home_changes_leaves_regions_that_may_no_longer_hold_it() -> anyhow::Result<()>
{
    let d = start().await?;
    sqlx::raw_sql("INSERT INTO accounts VALUES (5001, 'na', 'gold')")
        .execute(d.pool("na"))
        .await?;
    for region in ["eu", "apac"] {
        wait_for_row(
            d.pool(region),
            "SELECT count(*) FROM accounts WHERE id = 5001",
        )
        .await?;
    }
    // the account moves to eu: eu (its new home) keeps it, apac may no longer hold it
    sqlx::raw_sql("UPDATE accounts SET region = 'eu', plan = 'gold-eu' WHERE id = 5001")
        .execute(d.pool("na"))
        .await?;
    wait_for_row(
        d.pool("eu"),
        "SELECT count(*) FROM accounts WHERE id = 5001 AND region = 'eu' AND plan = 'gold-eu'",
    )
    .await?;
    wait_for_row(d.pool("apac"), "SELECT count(*) FROM (SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM accounts WHERE id = 5001)) gone").await?;
    let stored = dump(d.pool("apac")).await?;
    assert!(
        !stored.contains("gold-eu"),
        "the moved row's new values never reached apac"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_tightened_while_kafka_records_wait_never_wedges_their_partition()
-> anyhow::Result<()> {
    let mut d = start_over(true).await?;
    sqlx::raw_sql("INSERT INTO orders VALUES (3000, 'eu', NULL, 1.00, NULL)")
        .execute(d.pool("eu"))
        .await?;
    wait_for_row(d.pool("na"), "SELECT count(*) FROM orders WHERE id = 3000").await?;
    // na is down while eu writes under v1 (amounts leave eu)
    d.agent("na").kill9();
    sqlx::raw_sql("INSERT INTO orders VALUES (3001, 'eu', NULL, 987.65, NULL)")
        .execute(d.pool("eu"))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await; // produced under v1
    // v2 keeps amounts of eu orders home; every region runs it from now on
    let stricter = POLICY
        .replace(
            r#"columns = { id = "keep", region = "keep", amount = "keep", customer_email = "hash" }"#,
            r#"columns = { id = "keep", region = "keep", amount = "null", customer_email = "hash" }"#,
        )
        .replace("version = 1", "version = 2");
    assert_ne!(stricter, POLICY);
    d.write_policy(&stricter)?;
    d.agent("eu").hangup()?;
    d.agent("apac").hangup()?;
    d.agent("na").restart()?;
    sqlx::raw_sql("INSERT INTO orders VALUES (3002, 'eu', NULL, 5.00, NULL)")
        .execute(d.pool("eu"))
        .await?;
    // the v1 record arrives in v2's form, and the partition moves on (the two
    // keys may sit on different partitions, so either may land first)
    wait_for_row(
        d.pool("na"),
        "SELECT (count(*) = 2)::int::int8 FROM orders WHERE id IN (3001, 3002)",
    )
    .await?;
    let amounts: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT id, amount::text FROM orders WHERE id IN (3001, 3002) ORDER BY id")
            .fetch_all(d.pool("na"))
            .await?;
    assert_eq!(amounts, vec![(3001, None), (3002, None)]);
    let (sender, receiver, reason): (i64, i64, String) = sqlx::query_as(
        "SELECT sender_policy_version, receiver_policy_version, reason FROM meridian.policy_violations LIMIT 1",
    )
    .fetch_one(d.pool("na"))
    .await?;
    assert_eq!((sender, receiver), (1, 2));
    assert!(reason.contains("applied as policy v2 allows"), "{reason}");
    assert!(!dump(d.pool("na")).await?.contains("987.65"));
    Ok(())
}
