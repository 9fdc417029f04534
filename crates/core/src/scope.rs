//! What a region's own topology lets anyone write into its store, whatever
//! the writer's credentials: checked on every batch and record a peer sends
//! and on every dead letter replayed.

use std::sync::Arc;

use crate::Transaction;
use crate::pgoutput::Keys;

/// What a peer sent that this region's own topology does not allow it to
/// write, whatever the peer's credentials: a table the topology does not
/// replicate (`meridian.*`, or anything else), or key columns other than
/// the table's primary key in the topology (apply deletes and matches rows
/// by them). The reason names tables and columns, never values.
pub fn outside_topology(transactions: &[Transaction], keys: &Keys) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    for change in transactions.iter().flat_map(|t| &t.changes) {
        let table = &change.table;
        if !seen.insert(Arc::as_ptr(table)) {
            continue;
        }
        let name = shown(&format!("{}.{}", table.schema, table.name));
        let Some(expected) = keys.get(&(table.schema.clone(), table.name.clone())) else {
            return Some(format!(
                "table {name:?} is not replicated by this region's topology; nothing of the batch was written"
            ));
        };
        let mut sent: Vec<&str> = table
            .columns
            .iter()
            .filter(|c| c.key)
            .map(|c| c.name.as_str())
            .collect();
        let mut wanted: Vec<&str> = expected.iter().map(String::as_str).collect();
        sent.sort_unstable();
        wanted.sort_unstable();
        if sent != wanted {
            let sent: Vec<String> = sent.iter().take(8).map(|c| shown(c)).collect();
            return Some(format!(
                "table {name}: the batch marks {sent:?} as its key columns, this region's topology says {wanted:?}; nothing of the batch was written"
            ));
        }
    }
    None
}

/// A name a writer sent, cut to 64 characters for logs and replies.
fn shown(name: &str) -> String {
    match name.char_indices().nth(64) {
        Some((end, _)) => format!("{}...", &name[..end]),
        None => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Lsn;
    use crate::change::{Change, ChangeKind, Column, Table, Value};

    fn transaction(table: Table) -> Transaction {
        let width = table.columns.len();
        Transaction {
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x108),
            commit_time: 0,
            changes: vec![Change {
                table: Arc::new(table),
                kind: ChangeKind::Insert {
                    new: vec![Value::Text("a@example.com".into()); width],
                },
            }],
            continues: false,
            token: None,
        }
    }

    fn orders(key: &str) -> Table {
        Table {
            schema: "public".into(),
            name: "orders".into(),
            columns: ["id", "region", "email"]
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    key: *n == key,
                })
                .collect(),
        }
    }

    /// Only the topology's tables, keyed by the topology's key columns, may
    /// be written, whatever a writer marks; reasons carry names, cut short,
    /// never values.
    #[test]
    fn a_writer_cannot_choose_tables_or_key_columns() {
        let keys: Keys = [(
            ("public".to_owned(), "orders".to_owned()),
            vec!["id".to_owned()],
        )]
        .into_iter()
        .collect();
        assert_eq!(outside_topology(&[transaction(orders("id"))], &keys), None);

        let mut watermarks = orders("id");
        watermarks.schema = "meridian".into();
        watermarks.name = "watermarks".into();
        let e =
            outside_topology(&[transaction(orders("id")), transaction(watermarks)], &keys).unwrap();
        assert!(
            e.contains("\"meridian.watermarks\" is not replicated"),
            "{e}"
        );

        // a delete keyed by the home column alone would match every row of a region
        let e = outside_topology(&[transaction(orders("region"))], &keys).unwrap();
        assert!(
            e.contains(r#"marks ["region"]"#) && e.contains(r#"says ["id"]"#),
            "{e}"
        );
        assert!(!e.contains("a@example.com"));

        let mut long = orders("id");
        long.name = "x".repeat(500);
        let e = outside_topology(&[transaction(long)], &keys).unwrap();
        assert!(e.len() < 200, "{e}");
    }
}
