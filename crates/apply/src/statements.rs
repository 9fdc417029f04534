//! SQL for a planned batch. Pure apart from [`load_shape`], which reads the
//! destination's column types once per table.
//!
//! Values arrive as text and are parsed by the destination column's own type
//! (`$1::text[]` unnested, then cast), so one statement applies any number of
//! rows and every type PostgreSQL can read from text works.

use std::collections::HashMap;

use meridian_core::change::{Table, Value, quote_ident};
use meridian_core::plan::TableOps;
use sqlx::PgConnection;

/// The destination's view of a table: column name to SQL type.
#[derive(Debug, Clone)]
pub struct TableShape {
    pub types: HashMap<String, String>,
}

/// Reads a table's column types from the destination catalog.
pub async fn load_shape(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<TableShape, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod)
           FROM pg_attribute a
           JOIN pg_class c ON c.oid = a.attrelid
           JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped",
    )
    .bind(schema)
    .bind(name)
    .fetch_all(conn)
    .await?;
    Ok(TableShape {
        types: rows.into_iter().collect(),
    })
}

/// A bound parameter: a whole column (`text[]`) or one value (`text`).
#[derive(Debug, PartialEq, Eq)]
pub enum Param {
    Column(Vec<Option<String>>),
    Value(Option<String>),
}

/// One statement and its parameters.
#[derive(Debug)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s.clone()),
        Value::Null | Value::Unchanged => None,
    }
}

/// Builds the statements for one table: deletes, then upserts, then partial
/// updates. Errors name the table and column the destination lacks.
pub fn build(table: &Table, shape: &TableShape, ops: &TableOps) -> Result<Vec<Statement>, String> {
    let name = table.qualified_name();
    if shape.types.is_empty() {
        return Err(format!(
            "table {}.{} does not exist in the destination store; create it with the source's schema",
            table.schema, table.name
        ));
    }
    let mut types = Vec::with_capacity(table.columns.len());
    for c in &table.columns {
        let ty = shape.types.get(&c.name).ok_or_else(|| {
            format!(
                "column {:?} of {}.{} does not exist in the destination store; add it with the source's type",
                c.name, table.schema, table.name
            )
        })?;
        types.push(ty.as_str());
    }
    let keys: Vec<usize> = table.key_indexes().collect();
    let mut out = Vec::new();

    if !ops.deletes.is_empty() {
        let args = (1..=keys.len())
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", ");
        let alias = (0..keys.len())
            .map(|i| format!("k{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let cond = keys
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                format!(
                    "t.{} = d.k{i}::{}",
                    quote_ident(&table.columns[c].name),
                    types[c]
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        out.push(Statement {
            sql: format!("DELETE FROM {name} AS t USING unnest({args}) AS d({alias}) WHERE {cond}"),
            params: (0..keys.len())
                .map(|i| Param::Column(ops.deletes.iter().map(|k| text(&k[i])).collect()))
                .collect(),
        });
    }

    if !ops.upserts.is_empty() {
        let n = table.columns.len();
        let cols = table
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let casts = (0..n)
            .map(|i| format!("u.c{i}::{}", types[i]))
            .collect::<Vec<_>>()
            .join(", ");
        let args = (1..=n)
            .map(|i| format!("${i}::text[]"))
            .collect::<Vec<_>>()
            .join(", ");
        let alias = (0..n)
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let conflict = keys
            .iter()
            .map(|&c| quote_ident(&table.columns[c].name))
            .collect::<Vec<_>>()
            .join(", ");
        let set = table
            .columns
            .iter()
            .filter(|c| !c.key)
            .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(&c.name)))
            .collect::<Vec<_>>();
        let action = if set.is_empty() {
            "DO NOTHING".to_owned()
        } else {
            format!("DO UPDATE SET {}", set.join(", "))
        };
        out.push(Statement {
            sql: format!(
                "INSERT INTO {name} ({cols}) SELECT {casts} FROM unnest({args}) AS u({alias}) ON CONFLICT ({conflict}) {action}"
            ),
            params: (0..n)
                .map(|i| Param::Column(ops.upserts.iter().map(|r| text(&r[i])).collect()))
                .collect(),
        });
    }

    for row in &ops.partial_updates {
        let mut params = Vec::new();
        let mut set = Vec::new();
        for (i, c) in table.columns.iter().enumerate() {
            if !c.key && row[i] != Value::Unchanged {
                params.push(Param::Value(text(&row[i])));
                set.push(format!(
                    "{} = ${}::{}",
                    quote_ident(&c.name),
                    params.len(),
                    types[i]
                ));
            }
        }
        if set.is_empty() {
            continue;
        }
        let mut cond = Vec::new();
        for &k in &keys {
            params.push(Param::Value(text(&row[k])));
            cond.push(format!(
                "{} = ${}::{}",
                quote_ident(&table.columns[k].name),
                params.len(),
                types[k]
            ));
        }
        out.push(Statement {
            sql: format!(
                "UPDATE {name} SET {} WHERE {}",
                set.join(", "),
                cond.join(" AND ")
            ),
            params,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::change::Column;

    fn table() -> Table {
        Table {
            schema: "public".into(),
            name: "orders".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    key: true,
                },
                Column {
                    name: "note".into(),
                    type_oid: 25,
                    key: false,
                },
            ],
        }
    }

    fn shape() -> TableShape {
        TableShape {
            types: [
                ("id".into(), "bigint".into()),
                ("note".into(), "text".into()),
            ]
            .into(),
        }
    }

    #[test]
    fn builds_set_based_statements() {
        let t = |s: &str| Value::Text(s.into());
        let ops = TableOps {
            deletes: vec![vec![t("1")]],
            upserts: vec![vec![t("2"), Value::Null], vec![t("3"), t("x")]],
            partial_updates: vec![vec![t("4"), Value::Unchanged]],
        };
        let s = build(&table(), &shape(), &ops).unwrap();
        assert_eq!(
            s.len(),
            2,
            "a partial update with nothing to set is dropped"
        );
        assert_eq!(
            s[0].sql,
            r#"DELETE FROM "public"."orders" AS t USING unnest($1::text[]) AS d(k0) WHERE t."id" = d.k0::bigint"#
        );
        assert!(
            s[1].sql
                .contains(r#"ON CONFLICT ("id") DO UPDATE SET "note" = EXCLUDED."note""#),
            "{}",
            s[1].sql
        );
        assert_eq!(s[1].params[1], Param::Column(vec![None, Some("x".into())]));
    }

    #[test]
    fn names_what_the_destination_lacks() {
        let mut shape = shape();
        shape.types.remove("note");
        let e = build(&table(), &shape, &TableOps::default()).unwrap_err();
        assert!(e.contains("\"note\"") && e.contains("public.orders"), "{e}");
    }
}
