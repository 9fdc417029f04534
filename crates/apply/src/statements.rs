//! SQL for a planned batch. Pure apart from [`load_shape`], which reads the
//! destination's columns once per table.
//!
//! Values arrive as text and are parsed by the destination column's own type
//! (`$1::text[]` unnested, then cast), so one statement applies any number of
//! rows and every type PostgreSQL can read from text works.
//!
//! Columns are matched by name, never by position. A column the destination
//! generates (`GENERATED ... STORED`) is never written: the destination
//! computes it. Identity columns `GENERATED ALWAYS` are written with
//! `OVERRIDING SYSTEM VALUE` (the source's value wins) and never updated in
//! place (PostgreSQL allows no value but `DEFAULT` there): such a column is
//! expected not to change after insert.

use std::collections::HashMap;

use meridian_core::change::{Table, Value, quote_ident};
use meridian_core::plan::TableOps;
use sqlx::PgConnection;

/// One destination column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationColumn {
    /// SQL type (`format_type`), used to cast text values.
    pub ty: String,
    /// `GENERATED ALWAYS AS IDENTITY`.
    pub identity_always: bool,
    /// `GENERATED ALWAYS AS (...) STORED`: computed by the destination.
    pub generated: bool,
    pub not_null: bool,
    /// Has a default, or is an identity or generated column: an insert
    /// without it still gets a value.
    pub has_default: bool,
}

/// The destination's view of a table: its columns by name. Empty when the
/// table does not exist there.
#[derive(Debug, Clone, Default)]
pub struct TableShape {
    pub columns: HashMap<String, DestinationColumn>,
}

impl TableShape {
    /// A shape of plain columns (name, type); for tests and tools.
    pub fn of(columns: &[(&str, &str)]) -> TableShape {
        TableShape {
            columns: columns
                .iter()
                .map(|(n, t)| {
                    (
                        (*n).to_owned(),
                        DestinationColumn {
                            ty: (*t).to_owned(),
                            identity_always: false,
                            generated: false,
                            not_null: false,
                            has_default: false,
                        },
                    )
                })
                .collect(),
        }
    }
}

/// Reads a table's columns from a store's catalog: the one catalog query of
/// apply, the policy's column checks and the reading back of unchanged
/// values.
pub async fn load_shape(
    conn: &mut PgConnection,
    schema: &str,
    name: &str,
) -> Result<TableShape, sqlx::Error> {
    type Row = (String, String, bool, bool, bool, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod),
                a.attidentity = 'a', a.attgenerated <> '', a.attnotnull,
                a.atthasdef OR a.attidentity <> '' OR a.attgenerated <> ''
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
        columns: rows
            .into_iter()
            .map(
                |(name, ty, identity_always, generated, not_null, has_default)| {
                    (
                        name,
                        DestinationColumn {
                            ty,
                            identity_always,
                            generated,
                            not_null,
                            has_default,
                        },
                    )
                },
            )
            .collect(),
    })
}

/// A bound parameter: a whole column (`text[]` or `bool[]`) or one value.
#[derive(Debug, PartialEq, Eq)]
pub enum Param {
    Column(Vec<Option<String>>),
    Flags(Vec<bool>),
}

/// One statement and its parameters.
#[derive(Debug)]
pub struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
    /// Rows the statement should touch at most (for merges: rows that the
    /// destination must hold for the merge to write anything).
    pub rows: usize,
}

/// Why a table's operations cannot be turned into SQL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    /// The destination lacks the table or a column: a schema rollout in
    /// progress, or a forgotten migration. Retry later; never skip the data.
    #[error("{0}")]
    Schema(String),
    /// The data itself cannot be written (a key column left unchanged).
    #[error("{0}")]
    Data(String),
}

/// The statements of one table shape, by phase. Apply runs every merge of a
/// plan first (they read the destination's rows as they were before the
/// batch), then every delete, then every upsert.
#[derive(Debug, Default)]
pub struct Statements {
    pub merges: Vec<Statement>,
    pub deletes: Vec<Statement>,
    pub upserts: Vec<Statement>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(s) => Some(s.clone()),
        Value::Null | Value::Unchanged => None,
    }
}

/// A column of the source's shape as the destination will write it.
struct Target<'a> {
    /// Index in the source's row images.
    index: usize,
    name: String,
    column: &'a DestinationColumn,
    key: bool,
}

/// Builds the statements for one table shape. `merge_source` is the relation
/// merges read kept values from: the table itself, or a copy taken before
/// the batch when merges of several shapes of one table could see each
/// other's writes. Errors name the table and column.
pub fn build(
    table: &Table,
    shape: &TableShape,
    ops: &TableOps,
    merge_source: Option<&str>,
) -> Result<Statements, BuildError> {
    let name = table.qualified_name();
    if shape.columns.is_empty() {
        return Err(BuildError::Schema(format!(
            "table {}.{} does not exist in the destination store; create it with the source's schema (the link retries until it exists)",
            table.schema, table.name
        )));
    }
    let mut targets = Vec::with_capacity(table.columns.len());
    for (index, c) in table.columns.iter().enumerate() {
        let column = shape.columns.get(&c.name).ok_or_else(|| {
            BuildError::Schema(format!(
                "column {:?} of {}.{} does not exist in the destination store; add it with the source's type (the link retries until it exists)",
                c.name, table.schema, table.name
            ))
        })?;
        if column.generated && !c.key {
            continue; // computed by the destination
        }
        targets.push(Target {
            index,
            name: quote_ident(&c.name),
            column,
            key: c.key,
        });
    }
    let keys: Vec<&Target> = targets.iter().filter(|t| t.key).collect();
    let overriding = if targets.iter().any(|t| t.column.identity_always) {
        " OVERRIDING SYSTEM VALUE"
    } else {
        ""
    };
    let cols = targets
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let conflict = keys
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let mut set: Vec<String> = targets
        .iter()
        .filter(|t| !t.key && !t.column.identity_always)
        .map(|t| format!("{0} = EXCLUDED.{0}", t.name))
        .collect();
    // a destination column the change does not carry (the policy does not
    // send it to this destination) holds its default, also on update: a
    // value an earlier image brought under another rule must not stay
    let mut unsent: Vec<&String> = shape
        .columns
        .iter()
        .filter(|(name, c)| {
            !c.generated && !c.identity_always && !table.columns.iter().any(|tc| &tc.name == *name)
        })
        .map(|(name, _)| name)
        .collect();
    unsent.sort();
    set.extend(
        unsent
            .into_iter()
            .map(|name| format!("{} = DEFAULT", quote_ident(name))),
    );
    let on_conflict = if set.is_empty() {
        format!("ON CONFLICT ({conflict}) DO NOTHING")
    } else {
        format!("ON CONFLICT ({conflict}) DO UPDATE SET {}", set.join(", "))
    };
    let mut out = Statements::default();

    if !ops.deletes.is_empty() {
        let (args, alias) = unnest_args(1, keys.len(), "k");
        let cond = keys
            .iter()
            .enumerate()
            .map(|(i, t)| format!("t.{} = d.k{i}::{}", t.name, t.column.ty))
            .collect::<Vec<_>>()
            .join(" AND ");
        out.deletes.push(Statement {
            sql: format!("DELETE FROM {name} AS t USING unnest({args}) AS d({alias}) WHERE {cond}"),
            params: (0..keys.len())
                .map(|i| Param::Column(ops.deletes.iter().map(|k| text(&k[i])).collect()))
                .collect(),
            rows: ops.deletes.len(),
        });
    }

    // an identity value cannot be updated in place (PostgreSQL allows only
    // DEFAULT there): a row whose identity value changed (deleted and
    // inserted again at the source) is replaced
    let identities: Vec<&Target> = targets
        .iter()
        .filter(|t| !t.key && t.column.identity_always)
        .collect();
    if !ops.upserts.is_empty() && !identities.is_empty() {
        let n = keys.len() + identities.len();
        let (args, alias) = unnest_args(1, n, "v");
        let mut cond: Vec<String> = keys
            .iter()
            .enumerate()
            .map(|(i, t)| format!("t.{} = d.v{i}::{}", t.name, t.column.ty))
            .collect();
        let changed = identities
            .iter()
            .enumerate()
            .map(|(j, t)| {
                format!(
                    "t.{} IS DISTINCT FROM d.v{}::{}",
                    t.name,
                    keys.len() + j,
                    t.column.ty
                )
            })
            .collect::<Vec<_>>()
            .join(" OR ");
        cond.push(format!("({changed})"));
        out.deletes.push(Statement {
            sql: format!(
                "DELETE FROM {name} AS t USING unnest({args}) AS d({alias}) WHERE {}",
                cond.join(" AND ")
            ),
            params: keys
                .iter()
                .chain(&identities)
                .map(|t| Param::Column(ops.upserts.iter().map(|r| text(&r[t.index])).collect()))
                .collect(),
            rows: ops.upserts.len(),
        });
    }

    if !ops.upserts.is_empty() {
        let (args, alias) = unnest_args(1, targets.len(), "c");
        let casts = targets
            .iter()
            .enumerate()
            .map(|(i, t)| format!("u.c{i}::{}", t.column.ty))
            .collect::<Vec<_>>()
            .join(", ");
        out.upserts.push(Statement {
            sql: format!(
                "INSERT INTO {name} ({cols}){overriding} SELECT {casts} FROM unnest({args}) AS u({alias}) {on_conflict}"
            ),
            params: targets
                .iter()
                .map(|t| Param::Column(ops.upserts.iter().map(|r| text(&r[t.index])).collect()))
                .collect(),
            rows: ops.upserts.len(),
        });
    }

    if !ops.merges.is_empty() {
        for m in &ops.merges {
            if keys.iter().any(|k| m.row[k.index] == Value::Unchanged) {
                return Err(BuildError::Data(format!(
                    "a change to {}.{} leaves a key column unchanged (TOAST); keys are always sent",
                    table.schema, table.name
                )));
            }
        }
        let mut params = Vec::new();
        let mut alias = Vec::new();
        for i in 0..keys.len() {
            params.push(Param::Column(
                ops.merges.iter().map(|m| text(&m.from[i])).collect(),
            ));
            alias.push(format!("f{i}"));
        }
        let mut exprs = Vec::new();
        for (i, t) in targets.iter().enumerate() {
            let unchanged: Vec<bool> = ops
                .merges
                .iter()
                .map(|m| m.row[t.index] == Value::Unchanged)
                .collect();
            params.push(Param::Column(
                ops.merges.iter().map(|m| text(&m.row[t.index])).collect(),
            ));
            alias.push(format!("c{i}"));
            let value = format!("n.c{i}::{}", t.column.ty);
            exprs.push(if unchanged.iter().all(|u| *u) {
                format!("s.{}", t.name)
            } else if unchanged.iter().any(|u| *u) {
                params.push(Param::Flags(unchanged));
                alias.push(format!("u{i}"));
                format!("CASE WHEN n.u{i} THEN s.{} ELSE {value} END", t.name)
            } else {
                value
            });
        }
        let args = params
            .iter()
            .enumerate()
            .map(|(i, p)| match p {
                Param::Column(_) => format!("${}::text[]", i + 1),
                Param::Flags(_) => format!("${}::bool[]", i + 1),
            })
            .collect::<Vec<_>>()
            .join(", ");
        let join = keys
            .iter()
            .enumerate()
            .map(|(i, t)| format!("s.{} = n.f{i}::{}", t.name, t.column.ty))
            .collect::<Vec<_>>()
            .join(" AND ");
        let source = merge_source.map_or(name.clone(), str::to_owned);
        out.merges.push(Statement {
            sql: format!(
                "INSERT INTO {name} ({cols}){overriding} SELECT {} FROM unnest({args}) AS n({}) JOIN {source} AS s ON {join} {on_conflict}",
                exprs.join(", "),
                alias.join(", ")
            ),
            params,
            rows: ops.merges.len(),
        });
    }
    Ok(out)
}

/// `$first::text[], ...` and `p0, p1, ...` for `n` unnested columns.
fn unnest_args(first: usize, n: usize, prefix: &str) -> (String, String) {
    let args = (first..first + n)
        .map(|i| format!("${i}::text[]"))
        .collect::<Vec<_>>()
        .join(", ");
    let alias = (0..n)
        .map(|i| format!("{prefix}{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    (args, alias)
}

/// The statements that copy the rows merges will read (keys `from`) into
/// a temporary table dropped at commit, so merges of several shapes of one
/// table all read the rows as they were before the batch, and index it by
/// key (apply sessions join by nested loop only).
pub fn merge_snapshot(
    table: &Table,
    shape: &TableShape,
    from: &[&meridian_core::Row],
    temp: &str,
) -> Result<[Statement; 2], BuildError> {
    let name = table.qualified_name();
    let mut keys = Vec::new();
    for c in table.columns.iter().filter(|c| c.key) {
        let column = shape.columns.get(&c.name).ok_or_else(|| {
            BuildError::Schema(format!(
                "column {:?} of {}.{} does not exist in the destination store; add it with the source's type (the link retries until it exists)",
                c.name, table.schema, table.name
            ))
        })?;
        keys.push((quote_ident(&c.name), column.ty.as_str()));
    }
    let (args, alias) = unnest_args(1, keys.len(), "k");
    let cond = keys
        .iter()
        .enumerate()
        .map(|(i, (n, ty))| format!("t.{n} = d.k{i}::{ty}"))
        .collect::<Vec<_>>()
        .join(" AND ");
    let index = Statement {
        sql: format!(
            "CREATE INDEX ON {} ({})",
            quote_ident(temp),
            keys.iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        params: Vec::new(),
        rows: 0,
    };
    let copy = Statement {
        sql: format!(
            "CREATE TEMPORARY TABLE {} ON COMMIT DROP AS SELECT t.* FROM {name} AS t JOIN unnest({args}) AS d({alias}) ON {cond}",
            quote_ident(temp)
        ),
        params: (0..keys.len())
            .map(|i| Param::Column(from.iter().map(|k| text(&k[i])).collect()))
            .collect(),
        rows: from.len(),
    };
    Ok([copy, index])
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::change::Column;
    use meridian_core::plan::Merge;

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
        TableShape::of(&[("id", "bigint"), ("note", "text")])
    }

    fn t(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn builds_set_based_statements() {
        let ops = TableOps {
            deletes: vec![vec![t("1")]],
            upserts: vec![vec![t("2"), Value::Null], vec![t("3"), t("x")]],
            merges: vec![],
        };
        let s = build(&table(), &shape(), &ops, None).unwrap();
        assert_eq!(
            s.deletes[0].sql,
            r#"DELETE FROM "public"."orders" AS t USING unnest($1::text[]) AS d(k0) WHERE t."id" = d.k0::bigint"#
        );
        assert!(
            s.upserts[0]
                .sql
                .contains(r#"ON CONFLICT ("id") DO UPDATE SET "note" = EXCLUDED."note""#),
            "{}",
            s.upserts[0].sql
        );
        assert_eq!(
            s.upserts[0].params[1],
            Param::Column(vec![None, Some("x".into())])
        );
        assert!(s.merges.is_empty());
    }

    #[test]
    fn merges_keep_unchanged_values_from_the_source_row() {
        let mut table = table();
        table.columns.push(Column {
            name: "body".into(),
            type_oid: 25,
            key: false,
        });
        let shape = TableShape::of(&[("id", "bigint"), ("note", "text"), ("body", "text")]);
        let ops = TableOps {
            merges: vec![
                Merge {
                    from: vec![t("1")],
                    row: vec![t("10"), t("n"), Value::Unchanged],
                },
                Merge {
                    from: vec![t("2")],
                    row: vec![t("2"), Value::Unchanged, Value::Unchanged],
                },
            ],
            ..TableOps::default()
        };
        let s = build(&table, &shape, &ops, None).unwrap();
        let sql = &s.merges[0].sql;
        assert!(
            sql.contains(r#"CASE WHEN n.u1 THEN s."note" ELSE n.c1::text END"#),
            "{sql}"
        );
        assert!(sql.contains(r#"s."body""#), "{sql}");
        assert!(
            sql.contains(r#"JOIN "public"."orders" AS s ON s."id" = n.f0::bigint"#),
            "{sql}"
        );
        assert_eq!(
            s.merges[0].params[0],
            Param::Column(vec![Some("1".into()), Some("2".into())])
        );
        assert!(
            s.merges[0]
                .params
                .contains(&Param::Flags(vec![false, true]))
        );
    }

    #[test]
    fn identity_columns_are_overridden_and_generated_ones_left_alone() {
        let mut table = table();
        table.columns.push(Column {
            name: "seq".into(),
            type_oid: 20,
            key: false,
        });
        table.columns.push(Column {
            name: "len".into(),
            type_oid: 23,
            key: false,
        });
        let mut shape = TableShape::of(&[
            ("id", "bigint"),
            ("note", "text"),
            ("seq", "bigint"),
            ("len", "integer"),
        ]);
        shape.columns.get_mut("seq").unwrap().identity_always = true;
        shape.columns.get_mut("len").unwrap().generated = true;
        let ops = TableOps {
            upserts: vec![vec![t("1"), t("x"), t("7"), t("1")]],
            ..TableOps::default()
        };
        let s = build(&table, &shape, &ops, None).unwrap();
        let sql = &s.upserts[0].sql;
        assert!(
            sql.starts_with(
                r#"INSERT INTO "public"."orders" ("id", "note", "seq") OVERRIDING SYSTEM VALUE SELECT"#
            ),
            "{sql}"
        );
        assert!(
            sql.ends_with(r#"DO UPDATE SET "note" = EXCLUDED."note""#),
            "{sql}"
        );
        assert_eq!(s.upserts[0].params.len(), 3);
        // a changed identity value replaces the row
        assert_eq!(
            s.deletes[0].sql,
            r#"DELETE FROM "public"."orders" AS t USING unnest($1::text[], $2::text[]) AS d(v0, v1) WHERE t."id" = d.v0::bigint AND (t."seq" IS DISTINCT FROM d.v1::bigint)"#
        );
    }

    /// A column the policy does not send to this destination holds its
    /// default, also when an earlier image of the row carried it.
    #[test]
    fn columns_not_sent_are_reset_to_their_default() {
        let shape = TableShape::of(&[("id", "bigint"), ("note", "text"), ("secret", "text")]);
        let ops = TableOps {
            upserts: vec![vec![t("1"), t("x")]],
            ..TableOps::default()
        };
        let s = build(&table(), &shape, &ops, None).unwrap();
        assert!(
            s.upserts[0]
                .sql
                .ends_with(r#"DO UPDATE SET "note" = EXCLUDED."note", "secret" = DEFAULT"#),
            "{}",
            s.upserts[0].sql
        );
    }

    #[test]
    fn names_what_the_destination_lacks() {
        let mut shape = shape();
        shape.columns.remove("note");
        let e = build(&table(), &shape, &TableOps::default(), None).unwrap_err();
        let BuildError::Schema(e) = e else {
            panic!("{e:?}")
        };
        assert!(e.contains("\"note\"") && e.contains("public.orders"), "{e}");
        let e = build(&table(), &TableShape::default(), &TableOps::default(), None).unwrap_err();
        assert!(matches!(e, BuildError::Schema(_)), "{e:?}");
    }
}
