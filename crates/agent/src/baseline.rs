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
    let policy = residency::current(policy);
    let mut baseline = Baseline {
        topology_sha256: topology.sha256.clone(),
        policy_sha256: policy
            .as_ref()
            .map_or(String::new(), |p| p.digest().to_owned()),
        hash_key_fingerprint: policy
            .as_ref()
            .and_then(|p| p.key_fingerprint())
            .unwrap_or_default(),
        migrations_known: meridian_apply::MIGRATOR.iter().map(|m| m.version).collect(),
        build: env!("MERIDIAN_BUILD").to_owned(),
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
    let mut tx = pool.begin().await?;
    // type names fully qualified, whatever the role's search_path
    sqlx::query("SET LOCAL search_path = pg_catalog")
        .execute(&mut *tx)
        .await?;
    let mut tables = Vec::new();
    for t in &topology.tables {
        let (schema, name) = t.split_name();
        let shape = meridian_apply::statements::load_shape(&mut tx, schema, name).await?;
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
