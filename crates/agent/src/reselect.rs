//! Values an update left unchanged (TOAST), read back from the source store.
//!
//! Under `REPLICA IDENTITY DEFAULT` pgoutput does not send a TOASTed value an
//! update did not change. A destination that holds the row keeps its own
//! copy, but one that does not (the row just entered its scope: a condition
//! became true, the row moved home, the row predates the slot) would never
//! get the value, and a condition on such a column could not be evaluated.
//! So before the policy looks at a transaction, each such value is read from
//! the source store by the row's key (what Debezium calls reselecting).
//! (`REPLICA IDENTITY FULL` tables need none of this: the decoder takes the
//! values from the whole old tuple.)
//!
//! A value is read back only while the row in the store is still exactly
//! the change's image in every column the change carries (compared in
//! SQL). If the row changed since, the values stay unchanged: a value is
//! never paired with a row state it did not belong to (which could let a
//! value the policy forbids ride on an earlier, allowed state), and the
//! later changes settle the row. The capture task splits what it fills into
//! bounded fragments, so filled values never make a message unbounded.

use std::collections::HashMap;

use meridian_apply::statements::load_shape;
use meridian_core::change::{Change, ChangeKind, Table, Value, quote_ident};
use sqlx::PgPool;

/// Reads unchanged values back from one source store.
pub(crate) struct Reselect {
    pool: PgPool,
    /// Column types per table, as the store describes them.
    types: HashMap<(String, String), HashMap<String, String>>,
}

impl Reselect {
    pub(crate) fn new(pool: PgPool) -> Self {
        Reselect {
            pool,
            types: HashMap::new(),
        }
    }

    /// Fills the `Unchanged` values of one change from the store, if the
    /// row there is still exactly the change's image in every column the
    /// change carries. Otherwise (the row changed or went since, or a
    /// column is gone) the values stay `Unchanged`: the changes that follow
    /// settle the row, and a value is never paired with a row state it did
    /// not belong to. Returns whether it filled.
    pub(crate) async fn fill(&mut self, change: &mut Change) -> Result<bool, sqlx::Error> {
        let ChangeKind::Update { new, .. } = &mut change.kind else {
            return Ok(false);
        };
        if !new.contains(&Value::Unchanged) {
            return Ok(false);
        }
        let table = change.table.clone();
        let types = self.types(&table).await?;
        let Some(sql) = query(&table, new, types) else {
            return Ok(false);
        };
        let mut q = sqlx::query_as::<_, (Vec<Option<String>>,)>(&sql);
        for v in new.iter().filter(|v| **v != Value::Unchanged) {
            q = q.bind(match v {
                Value::Text(s) => Some(s.clone()),
                _ => None,
            });
        }
        let values = match q.fetch_optional(&self.pool).await {
            Ok(Some((values,))) => values,
            Ok(None) => return Ok(false), // changed or deleted since
            Err(sqlx::Error::Database(e)) if e.code().is_some_and(|c| c.starts_with("42")) => {
                // a column or type the store no longer has: read the
                // catalog again next time, leave the values unchanged
                tracing::debug!(table = %table.name, "cannot read back unchanged values: schema changed");
                self.types
                    .remove(&(table.schema.clone(), table.name.clone()));
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let mut values = values.into_iter();
        for v in new.iter_mut().filter(|v| **v == Value::Unchanged) {
            *v = match values.next().flatten() {
                Some(text) => Value::Text(text),
                None => Value::Null,
            };
        }
        Ok(true)
    }

    async fn types(&mut self, table: &Table) -> Result<&HashMap<String, String>, sqlx::Error> {
        let key = (table.schema.clone(), table.name.clone());
        if !self.types.contains_key(&key) {
            let mut conn = self.pool.acquire().await?;
            let shape = load_shape(&mut conn, &table.schema, &table.name).await?;
            let types = shape.columns.into_iter().map(|(n, c)| (n, c.ty)).collect();
            self.types.insert(key.clone(), types);
        }
        Ok(&self.types[&key])
    }
}

/// `SELECT ARRAY[u1::text, ...] FROM t WHERE k1 = $1::type AND
/// c2::text IS NOT DISTINCT FROM ($2::type)::text AND ...`: the unchanged
/// columns of the row, only if every column the change carries still holds
/// the change's value (compared through the column type's own text form, so
/// types without an equality operator work too). Parameters: the carried
/// values in column order. None if a column's type is unknown.
fn query(table: &Table, row: &[Value], types: &HashMap<String, String>) -> Option<String> {
    let mut wanted = Vec::new();
    let mut cond = Vec::new();
    for (c, v) in table.columns.iter().zip(row) {
        let name = quote_ident(&c.name);
        if *v == Value::Unchanged {
            wanted.push(format!("{name}::text"));
            continue;
        }
        let ty = types.get(&c.name)?;
        let n = cond.len() + 1;
        cond.push(if c.key {
            format!("{name} = ${n}::{ty}")
        } else {
            format!("{name}::text IS NOT DISTINCT FROM (${n}::{ty})::text")
        });
    }
    Some(format!(
        "SELECT ARRAY[{}]::text[] FROM {} WHERE {}",
        wanted.join(", "),
        table.qualified_name(),
        cond.join(" AND ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use meridian_core::change::Column;

    #[test]
    fn asks_for_unchanged_columns_only_while_the_row_is_the_changes_image() {
        let table = Table {
            schema: "public".into(),
            name: "docs".into(),
            columns: ["id", "title", "body"]
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    key: *n == "id",
                })
                .collect(),
        };
        let types = [("id".to_owned(), "bigint".to_owned())].into();
        let row = [
            Value::Text("1".into()),
            Value::Text("t".into()),
            Value::Unchanged,
        ];
        assert!(
            query(&table, &row, &types).is_none(),
            "title's type unknown"
        );
        let types = [
            ("id".to_owned(), "bigint".to_owned()),
            ("title".to_owned(), "text".to_owned()),
        ]
        .into();
        assert_eq!(
            query(&table, &row, &types).unwrap(),
            r#"SELECT ARRAY["body"::text]::text[] FROM "public"."docs" WHERE "id" = $1::bigint AND "title"::text IS NOT DISTINCT FROM ($2::text)::text"#
        );
    }
}
