//! `meridian slots prune`: drops the Meridian slots no link of the topology
//! uses (a region removed or renamed), which pin WAL and catalog rows on
//! their store until dropped, with the records of initial syncs to regions
//! that are gone. A dry run unless `--yes`.

use std::path::Path;

use anyhow::Context;
use meridian_capture::slot_name;
use meridian_core::topology::Topology;

pub(crate) async fn prune(config: &Path, yes: bool) -> anyhow::Result<()> {
    let topology = Topology::load(config)?;
    let mut found = 0;
    for region in topology.regions.keys() {
        let mut conn = crate::dead_letters::connect(&topology, region).await?;
        let used: Vec<String> = topology
            .regions
            .keys()
            .filter(|peer| *peer != region)
            .map(|peer| slot_name(region, peer))
            .collect();
        // this region's outgoing slots, in its own database: a cluster may
        // hold other regions' stores (and their slots) too
        let slots: Vec<(String, bool)> = sqlx::query_as(
            "SELECT slot_name::text, active FROM pg_replication_slots
              WHERE database = current_database() AND slot_name LIKE $2
                AND NOT (slot_name = ANY($1)) ORDER BY 1",
        )
        .bind(&used)
        .bind(format!("meridian\\_{}\\_to\\_%", region))
        .fetch_all(&mut conn)
        .await?;
        for (slot, active) in slots {
            found += 1;
            if active {
                println!(
                    "{region}: {slot} belongs to no link but is being streamed from; stop whatever reads it, then rerun"
                );
            } else if yes {
                sqlx::query("SELECT pg_drop_replication_slot($1)")
                    .bind(&slot)
                    .execute(&mut conn)
                    .await
                    .with_context(|| format!("dropping {slot} in {region}"))?;
                sqlx::query("DELETE FROM meridian.slots WHERE slot_name = $1")
                    .bind(&slot)
                    .execute(&mut conn)
                    .await?;
                // and the record of copies to a region that is gone
                let peers: Vec<String> = topology.regions.keys().cloned().collect();
                sqlx::query("DELETE FROM meridian.sync_tables WHERE NOT (destination = ANY($1))")
                    .bind(&peers)
                    .execute(&mut conn)
                    .await?;
                println!("{region}: dropped {slot}");
            } else {
                println!("{region}: would drop {slot} (no link uses it)");
            }
        }
    }
    match (found, yes) {
        (0, _) => println!("no orphaned slots"),
        (_, false) => println!("dry run: nothing dropped; run again with --yes"),
        _ => {}
    }
    Ok(())
}
