//! `meridian resync --link SOURCE:DESTINATION`: the way back after a link
//! stopped for a lost slot, another incarnation, or a source gone back in
//! time. It rebuilds the destination's copy of the source's rows:
//!
//! 1. at the source: make the link's slot anew (a new incarnation, starting
//!    now; refused while the link runs);
//! 2. at the destination, in one transaction marked with a Meridian
//!    replication origin (so the destination's own links never ship it):
//!    delete every row homed in the source from each replicated table, and
//!    forget the source's watermark, incarnation and Kafka positions;
//! 3. at the source: queue an initial sync of every replicated table to
//!    the destination (`meridian.sync_tables`): once the link resumes, its
//!    copier copies every row homed there, through the policy, at its true
//!    position in the stream (see `crates/agent/src/sync.rs`).
//!
//! Nothing is written at the source's tables and its other peers are not
//! involved.

use std::path::Path;

use anyhow::Context;
use meridian_capture::slot_name;
use meridian_core::change::quote_ident;
use meridian_core::topology::Topology;
use sqlx::Connection;

use crate::dead_letters::connect;

/// The origin the destination's deletes are marked with.
const ORIGIN: &str = "meridian_resync";

pub(crate) async fn run(config: &Path, link: &str, yes: bool) -> anyhow::Result<()> {
    let topology = Topology::load(config)?;
    let (source, destination) = link
        .split_once(':')
        .with_context(|| format!("--link {link:?}: expected SOURCE:DESTINATION, e.g. na:eu"))?;
    let mut src = connect(&topology, source).await?;
    let mut dst = connect(&topology, destination).await?;
    let slot = slot_name(source, destination);
    let state: Option<String> = sqlx::query_scalar(
        "SELECT coalesce(wal_status, 'lost') FROM pg_replication_slots WHERE slot_name = $1",
    )
    .bind(&slot)
    .fetch_optional(&mut src)
    .await?;
    let slot_plan = match state.as_deref() {
        None => format!("create slot {slot} (it is missing)"),
        Some(status) => format!("drop slot {slot} ({status}) and create it anew"),
    };
    println!("resync {source} -> {destination}:\n  {source}: {slot_plan}");
    for t in &topology.tables {
        println!(
            "  {destination}: delete the rows of {} whose {} is {source}",
            t.name, t.home_column
        );
    }
    println!("  {destination}: forget {source}'s watermark, incarnation and Kafka positions");
    for t in &topology.tables {
        println!(
            "  {source}: copy the rows of {} whose {} is {source} to {destination} (initial sync)",
            t.name, t.home_column
        );
    }
    if !yes {
        println!("dry run: nothing changed; run again with --yes");
        return Ok(());
    }

    // 1. a slot to capture the rewrite with (first: it fails while the link
    // runs, before anything changed)
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(
            topology
                .region(source)
                .map_err(anyhow::Error::msg)?
                .store
                .expose(),
        )
        .await?;
    if state.is_some() {
        sqlx::query("SELECT pg_drop_replication_slot($1)")
            .bind(&slot)
            .execute(&pool)
            .await
            .with_context(|| {
                format!(
                    "dropping slot {slot}: is the link running? stop {source}'s agent, then rerun"
                )
            })?;
    }
    meridian_agent::lifecycle::create_slot(&pool, &slot).await?;
    println!("{source}: {slot_plan}: done");

    // 2. the destination forgets the source
    let mut tx = dst.begin().await?;
    sqlx::query(
        "SELECT pg_replication_origin_create($1)
          WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)",
    )
    .bind(ORIGIN)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_replication_origin_session_setup($1)")
        .bind(ORIGIN)
        .execute(&mut *tx)
        .await
        .context("another resync runs against this destination")?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut *tx)
        .await?;
    for t in &topology.tables {
        let (schema, name) = t.split_name();
        let deleted = sqlx::query(&format!(
            "DELETE FROM {}.{} WHERE {} = $1",
            quote_ident(schema),
            quote_ident(name),
            quote_ident(&t.home_column)
        ))
        .bind(source)
        .execute(&mut *tx)
        .await
        .with_context(|| format!("deleting {source}'s rows of {} in {destination}", t.name))?;
        println!(
            "{destination}: deleted {} row(s) of {}",
            deleted.rows_affected(),
            t.name
        );
    }
    for sql in [
        "DELETE FROM meridian.watermarks WHERE source_region = $1",
        "DELETE FROM meridian.source_incarnations WHERE source_region = $1",
        "UPDATE meridian.kafka_positions SET lsn = 0, idx = 0 WHERE source_region = $1",
    ] {
        sqlx::query(sql).bind(source).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    sqlx::query("SELECT pg_replication_origin_session_reset()")
        .execute(&mut dst)
        .await?;

    // 3. every row homed in the source, copied again once the link resumes
    let tables: Vec<String> = topology.tables.iter().map(|t| t.name.clone()).collect();
    meridian_agent::sync::request(&mut src, destination, &tables, "resync")
        .await
        .with_context(|| format!("queueing the copy of {source}'s rows in {source}'s store"))?;
    for t in &topology.tables {
        let (schema, name) = t.split_name();
        let rows: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {}.{} WHERE {} = $1",
            quote_ident(schema),
            quote_ident(name),
            quote_ident(&t.home_column)
        ))
        .bind(source)
        .fetch_one(&mut src)
        .await?;
        println!("{source}: queued a copy of {rows} row(s) of {}", t.name);
    }
    println!(
        "resync {source} -> {destination} started: the link resumes by itself; \
         `meridian sync status` shows the copy"
    );
    Ok(())
}
