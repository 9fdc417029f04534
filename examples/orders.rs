//! A small order service on Meridian's client library.
//!
//! Run it against the demo's regions (the demo prints its topology path):
//!
//! ```text
//! cargo run --release -- demo                       # terminal 1: "topology: /tmp/.../topology.toml"
//! cargo run --release --example orders -- --config /tmp/.../topology.toml --region eu
//! ```
//!
//! It creates one tenant in each region, writes an order for each through
//! the routed path (the transaction runs in the tenant's home region,
//! wherever this service runs), hands each commit token over as a string
//! (as an HTTP header would) to a read in another region that waits for the
//! write, and raises a plan's price through the global path.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use meridian_client::{Client, CommitToken, Error};

#[derive(Parser)]
struct Args {
    /// Topology file (the demo prints its path).
    #[arg(long)]
    config: PathBuf,
    /// The region this service runs in.
    #[arg(long, default_value = "eu")]
    region: String,
}

/// Tenants of this example: (id in the tenants table, name, home region).
const TENANTS: [(i64, &str, &str); 3] = [
    (1001, "initech", "na"),
    (1002, "umbrella", "eu"),
    (1003, "tyrell", "apac"),
];

#[tokio::main]
async fn main() -> Result<(), Error> {
    let args = Args::parse();
    let client = Client::open(&args.config, &args.region)?;
    println!("order service running in {}", client.region());

    for (id, name, home) in TENANTS {
        // 1. the tenant's home region, in the multi-region database
        let change = client.placements().set(name, home).await?;
        if !change.complete() {
            eprintln!("warning: placement of {name} not pushed everywhere: {change:?}");
        }
        client
            .tenant(name)
            .write(move |tx| {
                Box::pin(async move {
                    sqlx::query(
                        "INSERT INTO tenants VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(id)
                    .bind(name)
                    .bind(home)
                    .execute(&mut **tx)
                    .await?;
                    Ok(())
                })
            })
            .await?;

        // 2. an order through the routed path: it commits in `home`
        let committed = client
            .tenant(name)
            .write(move |tx| {
                Box::pin(async move {
                    let order: String = sqlx::query_scalar(
                        "INSERT INTO orders (tenant_id, home_region, amount, items)
                         VALUES ($1, $2, 25.50, '[{\"sku\": \"stapler\", \"qty\": 2}]')
                         RETURNING id::text",
                    )
                    .bind(id)
                    .bind(home)
                    .fetch_one(&mut **tx)
                    .await?;
                    Ok(order)
                })
            })
            .await?;
        let header = committed.token.to_string();
        println!(
            "{name} (home {home}): order {} committed, token {header}",
            committed.value
        );

        // 3. another service, in another region, gets the token as a string
        let token: CommitToken = header.parse()?;
        let elsewhere = next_region(home);
        let waited = Instant::now();
        let store = client.read(elsewhere).after(&token).await?;
        let (amount, items): (String, Option<String>) =
            sqlx::query_as("SELECT amount::text, items::text FROM orders WHERE id = $1::uuid")
                .bind(&committed.value)
                .fetch_one(&store)
                .await?;
        println!(
            "  read in {elsewhere} after {} ms: amount {amount}, items {}",
            waited.elapsed().as_millis(),
            items
                .as_deref()
                .unwrap_or("NULL (kept home by the residency policy)")
        );
    }

    // 4. a plan price, globally consistent; the closure may run more than once
    let price: String = client
        .global()
        .transaction(|tx| {
            Box::pin(async move {
                Ok(sqlx::query_scalar(
                    "UPDATE plans SET price = price + 1 WHERE name = 'starter' RETURNING price::text",
                )
                .fetch_one(&mut **tx)
                .await?)
            })
        })
        .await?;
    println!("plan 'starter' now costs {price} everywhere");
    Ok(())
}

fn next_region(region: &str) -> &'static str {
    match region {
        "na" => "eu",
        "eu" => "apac",
        _ => "na",
    }
}
