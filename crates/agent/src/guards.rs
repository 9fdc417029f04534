//! Store-side guards for the client library's routed writes: the agent
//! attaches the trigger functions of the `routed_writes` migration to this
//! store's tables. They act only inside transactions the client marked with
//! `meridian.begin_routed_write`; replication apply (session role `replica`)
//! never fires them.
//!
//! - `meridian_home_check` on every replicated table: a row whose home column
//!   is not the tenant's home region is refused (SQLSTATE MR001).
//! - `meridian_global_guard` on every global table present in this store:
//!   global data belongs in the multi-region database (SQLSTATE MR002).
//! - `meridian_no_truncate` on every replicated table, for every session:
//!   TRUNCATE is not replicated, so it is refused (SQLSTATE MR005) rather
//!   than silently ignored.

use meridian_core::change::quote_ident;
use meridian_core::topology::TableSpec;
use sqlx::PgPool;

/// Attaches (or re-attaches) the guards. Global tables absent from the store
/// are skipped: a routed write to them fails as an unknown table, which the
/// client reports as a global table.
pub async fn install(
    pool: &PgPool,
    tables: &[TableSpec],
    global: &[String],
) -> Result<(), sqlx::Error> {
    for table in tables {
        let (schema, name) = table.split_name();
        let sql = format!(
            "CREATE OR REPLACE TRIGGER meridian_home_check BEFORE INSERT OR UPDATE OR DELETE ON {}.{} \
             FOR EACH ROW EXECUTE FUNCTION meridian.check_home('{}')",
            quote_ident(schema),
            quote_ident(name),
            table.home_column.replace('\'', "''"),
        );
        sqlx::query(&sql).execute(pool).await?;
        // the table and, if it is partitioned, every partition (a statement
        // trigger on the root does not fire for a partition truncated alone)
        let relations: Vec<String> = sqlx::query_scalar(
            "SELECT format('%I.%I', $1::text, $2::text)::regclass::text
              UNION
             SELECT p.relid::regclass::text
               FROM pg_partition_tree(format('%I.%I', $1::text, $2::text)::regclass) p",
        )
        .bind(schema)
        .bind(name)
        .fetch_all(pool)
        .await?;
        for relation in relations {
            let sql = format!(
                "CREATE OR REPLACE TRIGGER meridian_no_truncate BEFORE TRUNCATE ON {relation} \
                 FOR EACH STATEMENT EXECUTE FUNCTION meridian.refuse_truncate()"
            );
            sqlx::query(&sql).execute(pool).await?;
        }
    }
    for table in global {
        let Some((schema, name)) = table.split_once('.') else {
            continue;
        };
        let qualified = format!("{}.{}", quote_ident(schema), quote_ident(name));
        let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
            .bind(&qualified)
            .fetch_one(pool)
            .await?;
        if exists.is_some() {
            let sql = format!(
                "CREATE OR REPLACE TRIGGER meridian_global_guard \
                 BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {qualified} \
                 FOR EACH STATEMENT EXECUTE FUNCTION meridian.refuse_global_write()"
            );
            sqlx::query(&sql).execute(pool).await?;
        }
    }
    Ok(())
}
