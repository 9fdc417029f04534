//! `meridian placement set|get|list`: tenants' home regions.

use std::path::Path;

use anyhow::bail;
use meridian_client::{Placement, Placements};

fn json(p: &Placement) -> serde_json::Value {
    serde_json::json!({ "tenant": p.tenant, "home": p.home, "epoch": p.epoch })
}

pub(crate) async fn set(config: &Path, tenant: &str, region: &str) -> anyhow::Result<()> {
    let placements = Placements::open(config)?;
    let change = placements.set(tenant, region).await?;
    let p = &change.placement;
    match &change.previous {
        Some(old) if old.home == p.home => println!(
            "tenant {tenant}: home {} (epoch {}), unchanged",
            p.home, p.epoch
        ),
        Some(old) => println!(
            "tenant {tenant}: home {} -> {} (epoch {})",
            old.home, p.home, p.epoch
        ),
        None => println!("tenant {tenant}: home {} (epoch {})", p.home, p.epoch),
    }
    for (region, pushed) in &change.pushed {
        match pushed {
            Ok(()) => println!("  {region}: knows it"),
            Err(e) => println!("  {region}: NOT PUSHED: {e}"),
        }
    }
    if !change.complete() {
        bail!(
            "the global database holds the new placement, but some regions were not told; \
             rerun this command once they are reachable"
        );
    }
    Ok(())
}

pub(crate) async fn get(config: &Path, tenant: &str, as_json: bool) -> anyhow::Result<()> {
    let Some(p) = Placements::open(config)?.get(tenant).await? else {
        bail!("tenant {tenant:?} has no placement; create one with `meridian placement set`");
    };
    if as_json {
        println!("{}", json(&p));
    } else {
        println!("{}\t{}\t{}", p.tenant, p.home, p.epoch);
    }
    Ok(())
}

pub(crate) async fn list(config: &Path, as_json: bool) -> anyhow::Result<()> {
    let all = Placements::open(config)?.list().await?;
    if as_json {
        let rows: Vec<_> = all.iter().map(json).collect();
        println!("{}", serde_json::Value::Array(rows));
    } else {
        println!("tenant\thome\tepoch");
        for p in &all {
            println!("{}\t{}\t{}", p.tenant, p.home, p.epoch);
        }
    }
    Ok(())
}
