//! Store-side guards for the client library's routed writes: the agent
//! attaches trigger functions to this store's tables. They act only inside
//! transactions the client marked with `meridian.begin_routed_write`;
//! replication apply (session role `replica`) never fires them. They guard
//! against mistakes, not against a session that means harm: a session can
//! unset the marks, or write outside routed writes altogether.
//!
//! - `zzz_meridian_home_check` on every replicated table (a function per
//!   table, `meridian.home_check_<oid>`, reading only the home column): a
//!   row inserted, updated or deleted whose home, before or after, is not
//!   the tenant's home region is refused (SQLSTATE MR001); in a row move,
//!   rows may take the move's target home. Its name sorts after the
//!   application's own BEFORE triggers, so it checks the final row.
//! - `meridian_global_guard` on every global table present in this store:
//!   global data belongs in the multi-region database (SQLSTATE MR002).
//! - `meridian_no_truncate` on every replicated table, for every session:
//!   TRUNCATE is not replicated, so it is refused (SQLSTATE MR005) rather
//!   than silently ignored.

use meridian_core::change::quote_ident;
use meridian_core::topology::TableSpec;
use sqlx::PgPool;

/// The routed-write check of one table: `meridian.check_home` of the
/// routed-writes migrations, with the home column read directly (`NEW.col`),
/// so a row's other values, large ones included, are never read.
fn home_check_function(function: &str, home_column: &str) -> String {
    let col = quote_ident(home_column);
    let literal = home_column.replace('\'', "''");
    format!(
        r#"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $meridian$
DECLARE
    home text := coalesce(current_setting('meridian.home', true), '');
    move_to text := coalesce(current_setting('meridian.move_to', true), '');
    tenant text := current_setting('meridian.tenant', true);
    old_home text;
    new_home text;
BEGIN
    IF home = '' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        old_home := OLD.{col}::text;
        IF old_home IS DISTINCT FROM home THEN
            RAISE EXCEPTION USING ERRCODE = 'MR001',
                MESSAGE = format('%I.%I: %s of a row whose %s is %s, but tenant %s lives in region %s',
                                 TG_TABLE_SCHEMA, TG_TABLE_NAME, lower(TG_OP), '{literal}',
                                 coalesce(old_home, 'NULL'), tenant, home),
                HINT = 'a region''s copy of another region''s row is read-only: write it through a tenant whose home is that region';
        END IF;
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    new_home := NEW.{col}::text;
    -- in a row move, rows may take the target home: by UPDATE, or by the
    -- INSERT half of an UPDATE that moves a row between partitions
    IF new_home IS DISTINCT FROM home AND NOT (move_to <> '' AND new_home = move_to) THEN
        RAISE EXCEPTION USING ERRCODE = 'MR001',
            MESSAGE = format('%I.%I: the row''s %s is %s, but tenant %s lives in region %s',
                             TG_TABLE_SCHEMA, TG_TABLE_NAME, '{literal}',
                             coalesce(new_home, 'NULL'), tenant, home),
            HINT = CASE WHEN TG_OP = 'UPDATE'
                        THEN 'a row changes home region only through a row move: client.tenant(..).move_rows(REGION, ..)'
                        ELSE 'write rows of another home region through that region''s tenant' END;
    END IF;
    RETURN NEW;
END $meridian$"#
    )
}

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
        let relation = format!("{}.{}", quote_ident(schema), quote_ident(name));
        let oid: i64 = sqlx::query_scalar("SELECT $1::regclass::oid::bigint")
            .bind(&relation)
            .fetch_one(pool)
            .await?;
        let function = format!("meridian.home_check_{oid}");
        sqlx::raw_sql(&home_check_function(&function, &table.home_column))
            .execute(pool)
            .await?;
        // named to sort after the application's BEFORE triggers, which
        // PostgreSQL fires in name order: the check sees the final row
        sqlx::raw_sql(&format!(
            "DROP TRIGGER IF EXISTS meridian_home_check ON {relation};
             CREATE OR REPLACE TRIGGER zzz_meridian_home_check
                 BEFORE INSERT OR UPDATE OR DELETE ON {relation}
                 FOR EACH ROW EXECUTE FUNCTION {function}()"
        ))
        .execute(pool)
        .await?;
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
