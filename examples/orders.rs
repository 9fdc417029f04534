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
use meridian_client::{Client, CommitToken, Error, sqlx};

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
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let client = Client::open(&args.config, &args.region)?;
    println!("order service running in {}", client.region());

    for (id, name, home) in TENANTS {
        // 1. the tenant's home region, in the multi-region database
        let change = client.placements().set(name, home).await?;
        if !change.complete() {
            eprintln!("warning: placement of {name} not pushed everywhere: {change:?}");
        }
        // README: begin
        // a routed write: it commits on the tenant's home store, wherever
        // this service runs; the closure borrows freely
        client
            .tenant(name)
            .write(async |tx| -> Result<(), Error> {
                sqlx::query("INSERT INTO tenants VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING")
                    .bind(id)
                    .bind(name)
                    .bind(tx.home().to_owned())
                    .execute(&mut *tx)
                    .await?;
                Ok(())
            })
            .await?;

        // the same without a closure: a handle, committed explicitly
        let mut tx = client.tenant(name).begin().await?;
        let order: String = sqlx::query_scalar(
            "INSERT INTO orders (tenant_id, home_region, amount, items)
             VALUES ($1, $2, 25.50, '[{\"sku\": \"stapler\", \"qty\": 2}]')
             RETURNING id::text",
        )
        .bind(id)
        .bind(home)
        .fetch_one(&mut *tx)
        .await?;
        let token = tx.commit().await?;
        let header = token.to_string(); // e.g. "2.na.16b3748.AZrK..."

        // another service, in another region, gets the token as a string and
        // reads once that region applied exactly this transaction
        let token: CommitToken = header.parse()?;
        let elsewhere = next_region(home);
        let waited = Instant::now();
        let store = client.read(elsewhere).after(&token).await?; // read-only
        let (amount, items): (String, Option<String>) =
            sqlx::query_as("SELECT amount::text, items::text FROM orders WHERE id = $1::uuid")
                .bind(&order)
                .fetch_one(&store)
                .await?;
        // README: end
        println!("{name} (home {home}): order {order} committed, token {header}");
        println!(
            "  read in {elsewhere} after {} ms: amount {amount}, items {}",
            waited.elapsed().as_millis(),
            items
                .as_deref()
                .unwrap_or("NULL (kept home by the residency policy)")
        );
    }

    // README: begin
    // globally consistent data: SERIALIZABLE on the multi-region database;
    // the closure runs again after a serialization failure
    let price: String = client
        .global()
        .transaction(async |tx| -> Result<String, Error> {
            Ok(sqlx::query_scalar(
                "UPDATE plans SET price = price + 1 WHERE name = 'starter' RETURNING price::text",
            )
            .fetch_one(&mut *tx)
            .await?)
        })
        .await?;
    // README: end
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
