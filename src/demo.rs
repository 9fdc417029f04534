//! `meridian demo`: three regions on this machine, replicating live.

use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_testkit::PgCluster;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const REGIONS: [&str; 3] = ["na", "eu", "apac"];

/// The demo's application schema, the same in every region.
pub(crate) const SCHEMA: &str = "
CREATE TABLE tenants (
    id bigint PRIMARY KEY,
    name text NOT NULL,
    home_region text NOT NULL
);
CREATE TABLE orders (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id bigint NOT NULL,
    home_region text NOT NULL,
    amount numeric(12,2) NOT NULL,
    items jsonb,
    created_at timestamptz NOT NULL DEFAULT now()
);";

/// The multi-region database's schema: globally consistent data.
pub(crate) const GLOBAL_SCHEMA: &str = "
CREATE TABLE plans (name text PRIMARY KEY, price numeric(10,2) NOT NULL);
INSERT INTO plans VALUES ('starter', 9), ('pro', 49), ('enterprise', 499);";

/// The demo's residency policy: tenants go everywhere; eu orders leave eu
/// without their line items; plans are global (never replicated by agents).
const POLICY: &str = r#"
version = 1
global = ["public.plans"]

[[rules]]
name = "tenants-everywhere"
table = "public.tenants"
from = ["na", "eu", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", name = "keep", home_region = "keep" }

[[rules]]
name = "eu-orders-abroad"
table = "public.orders"
from = ["eu"]
to = ["na", "apac"]
columns = { id = "keep", tenant_id = "keep", home_region = "keep", amount = "keep", items = "null", created_at = "keep" }

[[rules]]
name = "orders-elsewhere"
table = "public.orders"
from = ["na", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", tenant_id = "keep", home_region = "keep", amount = "keep", items = "keep", created_at = "keep" }
"#;

pub(crate) async fn run(duration: Option<u64>, transport: &str) -> anyhow::Result<()> {
    let broker = match transport {
        "grpc" => None,
        "kafka" => {
            println!("starting a Kafka-protocol broker (tansu, sqlite storage)...");
            Some(meridian_testkit::KafkaBroker::start()?)
        }
        other => anyhow::bail!("--transport {other:?}: expected grpc or kafka"),
    };
    let mut signal = crate::shutdown_on_signal();
    let (stop_agents, agents_shutdown) = tokio::sync::watch::channel(false);
    println!(
        "starting four PostgreSQL clusters: na, eu, apac (wal_level=logical) and the multi-region database..."
    );
    let clusters: Vec<PgCluster> = (0..REGIONS.len() + 1)
        .map(|_| PgCluster::start())
        .collect::<anyhow::Result<_>>()
        .context("the demo needs PostgreSQL server binaries")?;
    let (global, clusters) = clusters.split_last().expect("four clusters");
    let mut pools = Vec::new();
    let mut topology = String::from("policy = \"residency.toml\"\n\n");
    // mTLS between the agents: a test CA, a certificate per region
    let regions: Vec<String> = REGIONS.iter().map(|r| r.to_string()).collect();
    meridian_trust::certs::init(&regions, "demo", &clusters[0].dir().join("certs"))?;
    for (region, cluster) in REGIONS.iter().zip(clusters) {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .connect(&cluster.url("postgres"))
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        pools.push(pool);
        topology.push_str(&format!(
            "[regions.{region}]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n\
             tls = {{ ca = \"certs/ca.pem\", cert = \"certs/{region}.pem\", key = \"certs/{region}-key.pem\" }}\n\n",
            cluster.url("postgres"),
            meridian_testkit::free_port()
        ));
    }
    let global_pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&global.url("postgres"))
        .await?;
    sqlx::raw_sql(GLOBAL_SCHEMA).execute(&global_pool).await?;
    topology.push_str(&format!(
        "[global]\nstore = \"{}\"\n\n",
        global.url("postgres")
    ));
    if let Some(broker) = &broker {
        // a topic is data at rest where its cluster runs: each region names
        // its cluster, and a link's topic lives on its destination's (one
        // local broker plays all three here)
        topology.push_str(
            "[replication]\ntransport = \"kafka\"\n\n[kafka]\npartitions = 4\nreplication_factor = 1\n\n",
        );
        for region in REGIONS {
            topology.push_str(&format!(
                "[kafka.clusters.{region}]\nbrokers = \"{}\"\n\n",
                broker.addr()
            ));
        }
        println!(
            "each link's topic lives on its destination region's Kafka cluster \
             ([kafka.clusters.<region>]); one local broker plays all three"
        );
    }
    topology.push_str(
        "[[tables]]\nname = \"public.tenants\"\nprimary_key = [\"id\"]\nhome_column = \"home_region\"\n\n\
         [[tables]]\nname = \"public.orders\"\nprimary_key = [\"id\"]\nhome_column = \"home_region\"\n",
    );
    topology.push_str(
        "\n[operator]\ntls = { ca = \"certs/ca.pem\", cert = \"certs/operator-demo.pem\", \
         key = \"certs/operator-demo-key.pem\" }\n",
    );
    let config = clusters[0].dir().join("topology.toml");
    std::fs::write(&config, &topology)?;
    std::fs::write(clusters[0].dir().join("residency.toml"), POLICY)?;
    println!("topology: {}\n{topology}", config.display());
    println!("residency policy:{POLICY}");

    let topology = meridian_agent::load_topology(&config)?;
    let agents: Vec<_> = REGIONS
        .iter()
        .map(|r| {
            tokio::spawn(meridian_agent::run(
                topology.clone(),
                r,
                agents_shutdown.clone(),
            ))
        })
        .collect();
    for pool in &pools {
        wait_for_slots(pool, REGIONS.len() - 1).await?;
    }

    // the application's side: a service in na, writing through the client library
    let client = meridian_client::Client::open(&config, "na")?;
    let started = Instant::now();
    println!(
        "placing tenants in the multi-region database and writing them in their home regions..."
    );
    let mut tenants = Vec::new();
    for region in REGIONS {
        for name in ["acme", "globex"] {
            let id = tenants.len() as i64 + 1;
            let tenant = format!("{name}-{region}");
            let change = client.placements().set(&tenant, region).await?;
            anyhow::ensure!(
                change.complete(),
                "placement of {tenant} not pushed: {change:?}"
            );
            let row = tenant.clone();
            client
                .tenant(&tenant)
                .write(async move |tx| -> Result<_, meridian_client::Error> {
                    sqlx::query("INSERT INTO tenants VALUES ($1, $2, $3)")
                        .bind(id)
                        .bind(row)
                        .bind(region)
                        .execute(&mut **tx)
                        .await?;
                    Ok(())
                })
                .await?;
            tenants.push((id, tenant, region));
        }
    }
    wait_visible(
        &pools,
        "tenants",
        tenants.len() as i64,
        Duration::from_secs(30),
    )
    .await?;
    print_counts(&pools).await?;

    let price: String = client
        .global()
        .transaction(async move |tx| -> Result<_, meridian_client::Error> {
                Ok(sqlx::query_scalar(
                    "UPDATE plans SET price = round(price * 1.1, 2) WHERE name = 'pro' RETURNING price::text",
                )
                .fetch_one(&mut **tx)
                .await?)
            })
        .await?;
    println!(
        "\nglobal path: plan 'pro' now costs {price} (SERIALIZABLE on the multi-region database)"
    );

    println!(
        "\nwriting one order a second for a tenant of a rotating region, from the service in na; Ctrl-C to stop\n"
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut n = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = signal.wait_for(|s| *s) => break,
        }
        if duration.is_some_and(|d| started.elapsed() >= Duration::from_secs(d)) {
            break;
        }
        let (tenant_id, tenant, home) = tenants[(n * 2) % tenants.len()].clone();
        n += 1;
        let written = Instant::now();
        let (amount, items) = (
            format!("{}.{:02}", 10 + n, n % 100),
            format!(r#"[{{"sku": "demo-{n}", "qty": {}}}]"#, 1 + n % 3),
        );
        let committed = client
            .tenant(&tenant)
            .write(async move |tx| -> Result<_, meridian_client::Error> {
                Ok(sqlx::query_scalar(
                    "INSERT INTO orders (tenant_id, home_region, amount, items) \
                         VALUES ($1, $2, $3::numeric, $4::jsonb) RETURNING id::text",
                )
                .bind(tenant_id)
                .bind(home)
                .bind(amount)
                .bind(items)
                .fetch_one(&mut **tx)
                .await?)
            })
            .await?;
        let id: String = committed.value;
        let mut line = format!("order {n:>3} for {tenant:<12} written in {home:<4}");
        for (region, pool) in REGIONS.iter().zip(&pools) {
            if *region == home {
                continue;
            }
            match wait_row(pool, "orders", &id, Duration::from_secs(10)).await {
                Ok(()) => line.push_str(&format!(
                    " | visible in {region:<4} after {:>4} ms",
                    written.elapsed().as_millis()
                )),
                Err(_) => line.push_str(&format!(" | NOT visible in {region} after 10 s")),
            }
        }
        println!("{line}");
        println!("          commit token: {}", committed.token);
        if home == "eu" {
            let mut seen = Vec::new();
            for (region, pool) in REGIONS.iter().zip(&pools) {
                let items: Option<String> =
                    sqlx::query_scalar("SELECT items::text FROM orders WHERE id = $1::uuid")
                        .bind(&id)
                        .fetch_optional(pool)
                        .await?
                        .flatten();
                seen.push(format!(
                    "{region}: items = {}",
                    items.as_deref().unwrap_or("NULL")
                ));
            }
            println!("          residency: {}", seen.join(" | "));
        }
    }
    print_counts(&pools).await?;
    println!("stopping agents and removing the temporary clusters...");
    let _ = stop_agents.send(true);
    for a in agents {
        a.await??;
    }
    Ok(())
}

/// Waits until an agent has created its slots: changes before that are not captured.
pub(crate) async fn wait_for_slots(pool: &PgPool, n: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let slots: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'meridian_%'",
        )
        .fetch_one(pool)
        .await?;
        if slots as usize >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the agent did not create its replication slots within 60 s; see its log"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_row(pool: &PgPool, table: &str, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let found: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE id = $1::uuid)"
        ))
        .bind(id)
        .fetch_one(pool)
        .await?;
        if found {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("row {id} of {table} did not arrive within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_visible(
    pools: &[PgPool],
    table: &str,
    count: i64,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    for pool in pools {
        loop {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
                .fetch_one(pool)
                .await?;
            if n >= count {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{table} did not reach {count} rows in every region within {timeout:?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

async fn print_counts(pools: &[PgPool]) -> anyhow::Result<()> {
    println!(
        "\n{:<8}{:>28}{:>28}",
        "store", "tenants (na/eu/apac homes)", "orders (na/eu/apac homes)"
    );
    for (region, pool) in REGIONS.iter().zip(pools) {
        let mut cells = Vec::new();
        for table in ["tenants", "orders"] {
            let counts: Vec<i64> = sqlx::query_scalar(&format!(
                "SELECT (SELECT count(*) FROM {table} WHERE home_region = r) FROM unnest(ARRAY['na','eu','apac']) WITH ORDINALITY AS u(r, i) ORDER BY i"
            ))
            .fetch_all(pool)
            .await?;
            cells.push(
                counts
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join("/"),
            );
        }
        println!("{region:<8}{:>28}{:>28}", cells[0], cells[1]);
    }
    Ok(())
}
