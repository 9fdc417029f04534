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
//! The value read is the row's current one, which may be newer than the
//! change: the newer change follows in the stream and writes the same value,
//! so destinations converge. A row deleted since keeps its `Unchanged`
//! values; its delete follows.

use std::collections::HashMap;

use meridian_apply::statements::load_shape;
use meridian_core::Transaction;
use meridian_core::change::{ChangeKind, Table, Value, quote_ident};
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

    /// Fills the `Unchanged` values of the transaction's updates from the
    /// store. Returns how many values were filled.
    pub(crate) async fn fill(
        &mut self,
        transaction: &mut Transaction,
    ) -> Result<usize, sqlx::Error> {
        let mut filled = 0;
        for change in &mut transaction.changes {
            let ChangeKind::Update { new, .. } = &mut change.kind else {
                continue;
            };
            if !new.contains(&Value::Unchanged) {
                continue;
            }
            let table = change.table.clone();
            let types = self.types(&table).await?;
            let Some(sql) = query(&table, new, types) else {
                continue;
            };
            let mut q = sqlx::query_as::<_, (Vec<Option<String>>,)>(&sql);
            for i in table.key_indexes() {
                q = q.bind(match &new[i] {
                    Value::Text(s) => Some(s.clone()),
                    _ => None,
                });
            }
            let Some((values,)) = q.fetch_optional(&self.pool).await? else {
                continue; // deleted since: its delete follows
            };
            let mut values = values.into_iter();
            for v in new.iter_mut().filter(|v| **v == Value::Unchanged) {
                *v = match values.next().flatten() {
                    Some(text) => Value::Text(text),
                    None => Value::Null,
                };
                filled += 1;
            }
        }
        Ok(filled)
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

/// `SELECT ARRAY[c1::text, ...] FROM t WHERE k1 = $1::type AND ...` for the
/// row's unchanged columns; None if a key column's type is unknown.
fn query(table: &Table, row: &[Value], types: &HashMap<String, String>) -> Option<String> {
    let wanted: Vec<String> = table
        .columns
        .iter()
        .zip(row)
        .filter(|(_, v)| **v == Value::Unchanged)
        .map(|(c, _)| format!("{}::text", quote_ident(&c.name)))
        .collect();
    let mut cond = Vec::new();
    for (n, i) in table.key_indexes().enumerate() {
        let c = &table.columns[i];
        cond.push(format!(
            "{} = ${}::{}",
            quote_ident(&c.name),
            n + 1,
            types.get(&c.name)?
        ));
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
    fn asks_only_for_unchanged_columns_by_typed_key() {
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
        assert_eq!(
            query(&table, &row, &types).unwrap(),
            r#"SELECT ARRAY["body"::text]::text[] FROM "public"."docs" WHERE "id" = $1::bigint"#
        );
    }
}
