//! What every region should share (the files it runs with, its store's
//! migrations and replicated tables), read for `meridian status`, which
//! shows any difference between regions as drift.

use meridian_core::topology::Topology;
use meridian_proto::admin::{Baseline, TableColumns};
use sqlx::PgPool;

use crate::residency::{self, SharedPolicy};

/// This region's baseline now: the files' fingerprints, and what its store
/// holds. A store that cannot be read is named in `store_error`.
pub(crate) async fn read(pool: &PgPool, topology: &Topology, policy: &SharedPolicy) -> Baseline {
    let mut baseline = Baseline {
        topology_sha256: topology.sha256.clone(),
        policy_sha256: residency::current(policy).map_or(String::new(), |p| p.digest().to_owned()),
        migrations_known: meridian_apply::MIGRATOR.iter().map(|m| m.version).collect(),
        ..Baseline::default()
    };
    match from_store(pool, topology).await {
        Ok((applied, tables)) => {
            baseline.migrations_applied = applied;
            baseline.tables = tables;
        }
        Err(e) => baseline.store_error = e.to_string(),
    }
    baseline
}

async fn from_store(
    pool: &PgPool,
    topology: &Topology,
) -> Result<(Vec<i64>, Vec<TableColumns>), sqlx::Error> {
    let applied: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(pool)
            .await?;
    let mut conn = pool.acquire().await?;
    let mut tables = Vec::new();
    for t in &topology.tables {
        let (schema, name) = t.split_name();
        let shape = meridian_apply::statements::load_shape(&mut conn, schema, name).await?;
        let mut columns: Vec<String> = shape
            .columns
            .into_iter()
            .map(|(name, c)| format!("{name} {}", c.ty))
            .collect();
        columns.sort();
        tables.push(TableColumns {
            table: t.name.clone(),
            columns,
        });
    }
    Ok((applied, tables))
}
