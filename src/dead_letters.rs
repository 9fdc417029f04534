//! `meridian dead-letters list|show|replay|discard`: the operator's way back
//! for data a destination store would not take.

use std::path::Path;

use anyhow::Context;
use meridian_apply::replay::{self, DeadLetter};
use meridian_core::Lsn;
use meridian_core::topology::Topology;
use sqlx::{Connection, PgConnection};

/// A connection to `region`'s store; the error names the region and store.
pub(crate) async fn connect(topology: &Topology, region: &str) -> anyhow::Result<PgConnection> {
    let store = topology
        .region(region)
        .map_err(anyhow::Error::msg)?
        .store
        .clone();
    PgConnection::connect(store.expose())
        .await
        .with_context(|| format!("cannot reach region {region}'s store ({store})"))
}

fn json(region: &str, d: &DeadLetter) -> serde_json::Value {
    serde_json::json!({
        "region": region, "id": d.id, "source": d.source_region,
        "end_lsn": Lsn(d.end_lsn as u64).to_string(), "status": d.status,
        "reason": d.reason, "sqlstate": d.sqlstate, "transport": d.transport,
        "kafka": d.kafka_topic.as_ref().map(|t| serde_json::json!({
            "topic": t, "partition": d.kafka_partition, "offset": d.kafka_offset })),
        "received_at": d.received_at, "resolved_at": d.resolved_at,
        "resolved_by": d.resolved_by, "note": d.resolution_note,
        "payload_bytes": d.payload_bytes,
    })
}

/// Lists dead letters of one region or of every region, oldest source
/// position first. Exits non-zero if a region's store cannot be read.
pub(crate) async fn list(
    config: &Path,
    region: Option<&str>,
    all: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let regions: Vec<String> = match region {
        Some(r) => vec![r.to_owned()],
        None => topology.regions.keys().cloned().collect(),
    };
    let mut out = Vec::new();
    let mut failed = Vec::new();
    if !as_json {
        println!(
            "{:<8} {:>6} {:<8} {:<14} {:<10} {:<20} reason",
            "region", "id", "source", "source lsn", "status", "received"
        );
    }
    for r in &regions {
        let letters = match connect(&topology, r).await {
            Ok(mut conn) => replay::list(&mut conn, all)
                .await
                .map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match letters {
            Ok(letters) => {
                for d in &letters {
                    if as_json {
                        out.push(json(r, d));
                    } else {
                        println!(
                            "{:<8} {:>6} {:<8} {:<14} {:<10} {:<20} {}",
                            r,
                            d.id,
                            d.source_region,
                            Lsn(d.end_lsn as u64).to_string(),
                            d.status,
                            d.received_at.get(..19).unwrap_or(&d.received_at),
                            d.reason
                        );
                    }
                }
            }
            Err(e) => {
                eprintln!("{r}: {e:#}");
                failed.push(r.clone());
            }
        }
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    }
    if !failed.is_empty() {
        anyhow::bail!("could not read dead letters of {}", failed.join(", "));
    }
    Ok(())
}

/// Shows one dead letter and a summary of what it holds (no values).
pub(crate) async fn show(config: &Path, region: &str, id: i64) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let mut conn = connect(&topology, region).await?;
    let (d, contents) = replay::show(&mut conn, id).await?;
    println!("{}", serde_json::to_string_pretty(&json(region, &d))?);
    match contents {
        Some(c) => {
            println!("holds {} transaction(s):", c.transactions);
            for (table, [ins, upd, del]) in c.tables {
                println!("  {table}: {ins} insert(s), {upd} update(s), {del} delete(s)");
            }
            if d.status == "pending" {
                println!(
                    "once the cause is fixed: meridian dead-letters replay --config {} --region {region} {id}",
                    config.display()
                );
            }
        }
        None => println!(
            "no readable payload: it cannot be replayed; discard it and copy the rows again"
        ),
    }
    Ok(())
}

/// Applies a pending dead letter to its region's store.
pub(crate) async fn replay(config: &Path, region: &str, id: i64, by: &str) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let mut conn = connect(&topology, region).await?;
    let (d, _) = replay::show(&mut conn, id).await?;
    let store = topology
        .region(region)
        .map_err(anyhow::Error::msg)?
        .store
        .clone();
    // a replication origin of its own: capture skips every meridian_* origin,
    // and the agent's apply session holds meridian_from_<source>
    let origin = format!("{}_replay", meridian_capture::origin_name(&d.source_region));
    let keys = topology.keys();
    let changes = replay::replay(store.expose(), &origin, id, by, &keys).await?;
    println!("dead letter {id} replayed in {region}: {changes} row change(s) applied");
    Ok(())
}

/// Marks a pending dead letter discarded, recording who and why.
pub(crate) async fn discard(
    config: &Path,
    region: &str,
    id: i64,
    by: &str,
    note: Option<&str>,
) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let mut conn = connect(&topology, region).await?;
    replay::discard(&mut conn, id, by, note).await?;
    println!("dead letter {id} in {region} discarded by {by}");
    Ok(())
}
