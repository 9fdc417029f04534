//! Preparing a store for capture: the publication, one slot per destination,
//! and the checks that make replication safe.

use meridian_core::change::quote_ident;
use meridian_core::topology::TableSpec;
use sqlx::PgPool;

use crate::CaptureError;

/// The publication a region's agent reads from.
pub fn publication_name(region: &str) -> String {
    format!("meridian_{region}")
}

/// The slot feeding one link. One slot per link lets each destination hold
/// back only its own share of WAL and confirm at its own pace.
pub fn slot_name(source: &str, destination: &str) -> String {
    format!("meridian_{source}_to_{destination}")
}

/// The replication origin with which a destination marks changes applied from
/// `source`, so its own capture skips them.
pub fn origin_name(source: &str) -> String {
    format!("meridian_from_{source}")
}

/// Checks every replicated table (exists, has the declared primary key as its
/// replica identity, has the home column) and makes the publication list
/// exactly those tables. Errors say what to change.
pub async fn ensure_publication(
    pool: &PgPool,
    publication: &str,
    tables: &[TableSpec],
) -> Result<(), CaptureError> {
    for t in tables {
        check_table(pool, t).await?;
    }
    let list = tables
        .iter()
        .map(|t| {
            let (schema, name) = t.split_name();
            format!("{}.{}", quote_ident(schema), quote_ident(name))
        })
        .collect::<Vec<_>>()
        .join(", ");
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)")
            .bind(publication)
            .fetch_one(pool)
            .await?;
    let pubname = quote_ident(publication);
    // partitioned tables publish their changes under the root's name (the
    // name the topology and the policy use); TRUNCATE is not published (the
    // agent's guards refuse it on replicated tables)
    let options = "publish = 'insert, update, delete', publish_via_partition_root = true";
    let sql = match (exists, list.is_empty()) {
        (false, true) => format!("CREATE PUBLICATION {pubname} WITH ({options})"),
        (false, false) => {
            format!("CREATE PUBLICATION {pubname} FOR TABLE {list} WITH ({options})")
        }
        (true, false) => format!(
            "ALTER PUBLICATION {pubname} SET TABLE {list}; ALTER PUBLICATION {pubname} SET ({options})"
        ),
        (true, true) => format!("ALTER PUBLICATION {pubname} SET ({options})"),
    };
    sqlx::raw_sql(&sql).execute(pool).await?;
    Ok(())
}

async fn check_table(pool: &PgPool, t: &TableSpec) -> Result<(), CaptureError> {
    let (schema, name) = t.split_name();
    let row: Option<(String, Vec<String>, Vec<String>)> = sqlx::query_as(
        "SELECT c.relreplident::text,
                coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum)
                            FROM pg_index i JOIN pg_attribute a
                              ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                           WHERE i.indrelid = c.oid AND i.indisprimary), '{}'),
                coalesce((SELECT array_agg(a.attname::text) FROM pg_attribute a
                           WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}')
           FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = $2 AND c.relkind IN ('r', 'p')",
    )
    .bind(schema)
    .bind(name)
    .fetch_optional(pool)
    .await?;
    let Some((identity, mut pk, columns)) = row else {
        return Err(CaptureError::Config(format!(
            "table {} is in the topology but not in the store; create it (same schema in every region) or remove it from [[tables]]",
            t.name
        )));
    };
    let mut declared = t.primary_key.clone();
    pk.sort();
    declared.sort();
    if pk != declared {
        return Err(CaptureError::Config(format!(
            "table {}: the topology declares primary_key {:?} but the store's primary key is {:?}; make them match",
            t.name, t.primary_key, pk
        )));
    }
    if identity != "d" && identity != "f" {
        return Err(CaptureError::Config(format!(
            "table {}: REPLICA IDENTITY must be DEFAULT (the primary key) or FULL; run ALTER TABLE {} REPLICA IDENTITY DEFAULT",
            t.name, t.name
        )));
    }
    if !columns.contains(&t.home_column) {
        return Err(CaptureError::Config(format!(
            "table {}: home_column {:?} is not a column of the table (columns: {})",
            t.name,
            t.home_column,
            columns.join(", ")
        )));
    }
    Ok(())
}

/// Creates the logical replication slot (pgoutput) if it does not exist.
/// Changes committed before the slot exists are not captured.
pub async fn ensure_slot(pool: &PgPool, slot: &str) -> Result<(), CaptureError> {
    let plugin: Option<String> =
        sqlx::query_scalar("SELECT plugin::text FROM pg_replication_slots WHERE slot_name = $1")
            .bind(slot)
            .fetch_optional(pool)
            .await?;
    match plugin.as_deref() {
        Some("pgoutput") => Ok(()),
        Some(other) => Err(CaptureError::Config(format!(
            "slot {slot} exists with plugin {other}; Meridian needs pgoutput: drop the slot or rename the region"
        ))),
        None => {
            sqlx::query("SELECT pg_create_logical_replication_slot($1, 'pgoutput')")
                .bind(slot)
                .execute(pool)
                .await?;
            Ok(())
        }
    }
}
