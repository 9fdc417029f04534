//! Apply planning: from a batch of committed transactions to the row
//! operations a destination must run, in one transaction, to reach the same
//! state.
//!
//! The plan collapses all changes to one row into its final effect (an upsert
//! of the last image, or a delete), so applying a plan is idempotent: running
//! it twice leaves the same rows as running it once. Values a later update left
//! `Unchanged` (TOAST) are filled from an earlier image of the same batch when
//! there is one; otherwise the row becomes a partial update that leaves those
//! columns as the destination has them.
//!
//! Assumption: only the primary key is unique, so operations on different keys
//! commute. Apply sessions run with `session_replication_role = replica`, as
//! PostgreSQL's own apply workers do, so foreign keys do not order them either.

use std::collections::HashMap;
use std::sync::Arc;

use crate::Lsn;
use crate::change::{ChangeKind, Row, Table, Transaction, Value};

/// Operations for one table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableOps {
    /// Key images (key columns only, in table order) of rows to delete.
    pub deletes: Vec<Row>,
    /// Full images of rows to insert or overwrite.
    pub upserts: Vec<Row>,
    /// Images with at least one `Unchanged` value: update the other columns of
    /// an existing row, keep the unchanged ones.
    pub partial_updates: Vec<Row>,
}

/// Everything one batch asks of a destination.
#[derive(Debug, Default)]
pub struct Plan {
    /// Per table, in order of first appearance in the batch.
    pub tables: Vec<(Arc<Table>, TableOps)>,
    /// The watermark to store with the operations.
    pub end_lsn: Lsn,
    /// Commit time of the last transaction (microseconds since 2000-01-01 UTC).
    pub commit_time: i64,
    /// Row changes the plan covers (before collapsing).
    pub changes: usize,
}

impl Plan {
    /// Number of row operations the plan holds.
    pub fn operations(&self) -> usize {
        self.tables
            .iter()
            .map(|(_, o)| o.deletes.len() + o.upserts.len() + o.partial_updates.len())
            .sum()
    }
}

/// A table's keys in first-seen order, and each key's final effect.
type Pending = (Arc<Table>, Vec<Row>, HashMap<Row, Final>);

enum Final {
    Upsert(Row),
    Delete(Row),
}

/// Plans the transactions whose `end_lsn` is past `applied`; earlier ones are
/// already in the destination and are skipped. Returns `None` when nothing is
/// new.
pub fn plan(transactions: &[Transaction], applied: Lsn) -> Option<Plan> {
    let fresh: Vec<&Transaction> = transactions
        .iter()
        .filter(|t| t.end_lsn > applied)
        .collect();
    let last = fresh.last()?;
    // (table identity, key) -> final effect; insertion order kept per table
    let mut tables: Vec<Pending> = Vec::new();
    let mut table_index: HashMap<(String, String), usize> = HashMap::new();
    let mut changes = 0;
    for change in fresh.iter().flat_map(|t| &t.changes) {
        changes += 1;
        let t = &change.table;
        let ti = *table_index
            .entry((t.schema.clone(), t.name.clone()))
            .or_insert_with(|| {
                tables.push((t.clone(), Vec::new(), HashMap::new()));
                tables.len() - 1
            });
        let (table, order, rows) = &mut tables[ti];
        // a later relation message (schema change) wins
        *table = t.clone();
        match &change.kind {
            ChangeKind::Insert { new } => {
                record(order, rows, key_of(t, new), Final::Upsert(new.clone()))
            }
            ChangeKind::Update { old, new } => {
                let new_key = key_of(t, new);
                let old_key = old
                    .as_ref()
                    .map(|o| key_of(t, o))
                    .unwrap_or(new_key.clone());
                let mut image = new.clone();
                if image.contains(&Value::Unchanged)
                    && let Some(Final::Upsert(prev)) = rows.get(&old_key)
                {
                    {
                        for (v, p) in image.iter_mut().zip(prev) {
                            if *v == Value::Unchanged {
                                *v = p.clone();
                            }
                        }
                    }
                }
                if old_key != new_key {
                    record(order, rows, old_key.clone(), Final::Delete(old_key));
                }
                record(order, rows, new_key, Final::Upsert(image));
            }
            ChangeKind::Delete { old } => {
                let key = key_of(t, old);
                record(order, rows, key.clone(), Final::Delete(key));
            }
        }
    }
    let tables = tables
        .into_iter()
        .map(|(table, order, mut rows)| {
            let mut ops = TableOps::default();
            for key in order {
                match rows.remove(&key) {
                    Some(Final::Delete(k)) => ops.deletes.push(k),
                    Some(Final::Upsert(row)) if row.contains(&Value::Unchanged) => {
                        ops.partial_updates.push(row)
                    }
                    Some(Final::Upsert(row)) => ops.upserts.push(row),
                    None => {}
                }
            }
            (table, ops)
        })
        .collect();
    Some(Plan {
        tables,
        end_lsn: last.end_lsn,
        commit_time: last.commit_time,
        changes,
    })
}

fn record(order: &mut Vec<Row>, rows: &mut HashMap<Row, Final>, key: Row, effect: Final) {
    if !rows.contains_key(&key) {
        order.push(key.clone());
    }
    rows.insert(key, effect);
}

fn key_of(table: &Table, row: &Row) -> Row {
    table.key_indexes().map(|i| row[i].clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Column};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn table() -> Arc<Table> {
        Arc::new(Table {
            schema: "public".into(),
            name: "t".into(),
            columns: vec![
                Column {
                    name: "id".into(),
                    type_oid: 20,
                    key: true,
                },
                Column {
                    name: "a".into(),
                    type_oid: 25,
                    key: false,
                },
                Column {
                    name: "big".into(),
                    type_oid: 25,
                    key: false,
                },
            ],
        })
    }

    fn tx(end: u64, kinds: Vec<ChangeKind>) -> Transaction {
        let t = table();
        Transaction {
            commit_lsn: Lsn(end - 1),
            end_lsn: Lsn(end),
            commit_time: end as i64,
            changes: kinds
                .into_iter()
                .map(|kind| Change {
                    table: t.clone(),
                    kind,
                })
                .collect(),
        }
    }

    fn v(s: &str) -> Value {
        Value::Text(s.into())
    }

    #[test]
    fn skips_transactions_already_applied() {
        let txs = vec![
            tx(
                10,
                vec![ChangeKind::Insert {
                    new: vec![v("1"), v("a"), v("x")],
                }],
            ),
            tx(
                20,
                vec![ChangeKind::Insert {
                    new: vec![v("2"), v("a"), v("x")],
                }],
            ),
        ];
        assert!(plan(&txs, Lsn(20)).is_none());
        let p = plan(&txs, Lsn(10)).unwrap();
        assert_eq!(p.end_lsn, Lsn(20));
        assert_eq!(p.tables[0].1.upserts, vec![vec![v("2"), v("a"), v("x")]]);
    }

    #[test]
    fn fills_unchanged_values_from_earlier_images_in_the_batch() {
        let txs = vec![tx(
            10,
            vec![
                ChangeKind::Insert {
                    new: vec![v("1"), v("a"), v("big")],
                },
                ChangeKind::Update {
                    old: None,
                    new: vec![v("1"), v("b"), Value::Unchanged],
                },
                ChangeKind::Update {
                    old: None,
                    new: vec![v("2"), v("c"), Value::Unchanged],
                },
            ],
        )];
        let ops = &plan(&txs, Lsn(0)).unwrap().tables[0].1;
        assert_eq!(ops.upserts, vec![vec![v("1"), v("b"), v("big")]]);
        assert_eq!(
            ops.partial_updates,
            vec![vec![v("2"), v("c"), Value::Unchanged]]
        );
    }

    #[test]
    fn key_change_deletes_the_old_key() {
        let txs = vec![tx(
            10,
            vec![ChangeKind::Update {
                old: Some(vec![v("1"), Value::Null, Value::Null]),
                new: vec![v("2"), v("a"), v("b")],
            }],
        )];
        let ops = &plan(&txs, Lsn(0)).unwrap().tables[0].1;
        assert_eq!(ops.deletes, vec![vec![v("1")]]);
        assert_eq!(ops.upserts, vec![vec![v("2"), v("a"), v("b")]]);
    }

    /// Applies changes one by one to a map, the obvious way.
    fn replay(state: &mut BTreeMap<String, Row>, kinds: &[ChangeKind]) {
        for k in kinds {
            match k {
                ChangeKind::Insert { new } | ChangeKind::Update { new, .. } => {
                    let Value::Text(id) = &new[0] else {
                        unreachable!()
                    };
                    state.insert(id.clone(), new.clone());
                }
                ChangeKind::Delete { old } => {
                    let Value::Text(id) = &old[0] else {
                        unreachable!()
                    };
                    state.remove(id);
                }
            }
        }
    }

    /// Applies a plan's operations to a map.
    fn apply(state: &mut BTreeMap<String, Row>, p: &Plan) {
        for (_, ops) in &p.tables {
            for k in &ops.deletes {
                let Value::Text(id) = &k[0] else {
                    unreachable!()
                };
                state.remove(id);
            }
            for r in ops.upserts.iter().chain(&ops.partial_updates) {
                let Value::Text(id) = &r[0] else {
                    unreachable!()
                };
                state.insert(id.clone(), r.clone());
            }
        }
    }

    proptest! {
        /// Collapsing a batch reaches the state that replaying it change by
        /// change reaches, and applying the plan twice changes nothing more.
        #[test]
        fn plan_is_equivalent_to_replay_and_idempotent(ops in proptest::collection::vec((0u8..3, 0u8..5, "[a-c]"), 1..40)) {
            let kinds: Vec<ChangeKind> = ops.iter().map(|(k, id, a)| {
                let row = vec![v(&id.to_string()), v(a), v("big")];
                match k {
                    0 => ChangeKind::Insert { new: row },
                    1 => ChangeKind::Update { old: None, new: row },
                    _ => ChangeKind::Delete { old: vec![v(&id.to_string()), Value::Null, Value::Null] },
                }
            }).collect();
            let mut expected = BTreeMap::new();
            replay(&mut expected, &kinds);
            let p = plan(&[tx(10, kinds)], Lsn(0)).unwrap();
            let mut got = BTreeMap::new();
            apply(&mut got, &p);
            prop_assert_eq!(&got, &expected);
            apply(&mut got, &p);
            prop_assert_eq!(&got, &expected);
        }
    }
}
