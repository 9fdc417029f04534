//! Apply planning: from a batch of committed transactions to the row
//! operations a destination must run, in one transaction, to reach the same
//! state.
//!
//! The plan collapses all changes to one row (by table name and key) into its
//! final effect: an upsert of the last image, a merge, or a delete. Applying
//! a plan is idempotent (running it twice leaves the same rows as running it
//! once) with one exception: a key change that left TOAST values unchanged
//! merges from the old key, which the same batch may write again. Apply
//! commits each plan with its checkpoint, so no plan is applied twice.
//!
//! Rows of one table may come in several shapes (column sets): a rule that
//! drops columns for this destination beside a row sent home whole, or a
//! column added at the source mid-stream. Each operation keeps the shape its
//! image was made for, and the plan groups operations by shape, never by
//! table name alone, so a value is always bound to the column it belongs to.
//!
//! Values a later update left `Unchanged` (TOAST) are filled, by column name,
//! from an earlier image of the same row in the batch when there is one;
//! otherwise the row becomes a [`Merge`]: the destination keeps its own value
//! for those columns, read from the row under the old key when the update
//! changed the key.
//!
//! Assumption: only the primary key is unique, so operations on different keys
//! commute. Apply sessions run with `session_replication_role = replica`, as
//! PostgreSQL's own apply workers do, so foreign keys do not order them either.

use std::collections::HashMap;
use std::sync::Arc;

use crate::Lsn;
use crate::change::{ChangeKind, Row, Table, Transaction, Value};

/// Operations on one shape of a table.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TableOps {
    /// Key images (key columns only, in table order) of rows to delete.
    pub deletes: Vec<Row>,
    /// Full images of rows to insert or overwrite.
    pub upserts: Vec<Row>,
    /// Images with at least one `Unchanged` value.
    pub merges: Vec<Merge>,
}

/// An image to write over the destination's row at `from`, keeping that
/// row's values where the image says `Unchanged`. When `from` is another key
/// (the update changed the key), the row under `from` is deleted by the same
/// plan, after the merge read it. If the destination has no row at `from`,
/// nothing is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Merge {
    /// Key image (key columns only) of the row that holds the kept values.
    pub from: Row,
    /// The new image (its own key may differ from `from`).
    pub row: Row,
}

impl TableOps {
    fn len(&self) -> usize {
        self.deletes.len() + self.upserts.len() + self.merges.len()
    }
}

/// Everything one batch asks of a destination.
#[derive(Debug, Default)]
pub struct Plan {
    /// Operations per table shape, in order of first appearance in the batch.
    /// One table may appear under several shapes; every row of a `TableOps`
    /// has exactly the columns of the `Table` beside it.
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
        self.tables.iter().map(|(_, o)| o.len()).sum()
    }
}

/// A row change whose image does not fit its table: a bug in whatever
/// produced the batch (a decoder or a peer), never in the data.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "change {index} of the batch has {found} values but its table {table} has {expected} columns"
)]
pub struct ShapeError {
    pub table: String,
    pub index: usize,
    pub found: usize,
    pub expected: usize,
}

/// The final effect on one row; `shape` indexes the plan's shapes.
enum Final {
    Upsert { shape: usize, row: Row },
    Merge { shape: usize, from: Row, row: Row },
    Delete { shape: usize, key: Row },
}

/// One table name's rows: keys in first-seen order, and each key's effect.
#[derive(Default)]
struct Pending {
    order: Vec<Row>,
    rows: HashMap<Row, Final>,
}

impl Pending {
    fn record(&mut self, key: Row, effect: Final) {
        if !self.rows.contains_key(&key) {
            self.order.push(key.clone());
        }
        self.rows.insert(key, effect);
    }
}

/// Plans the transactions whose `end_lsn` is past `applied`; earlier ones are
/// already in the destination and are skipped. Returns `Ok(None)` when
/// nothing is new, and an error (never a panic) for an image whose width
/// does not match its table.
pub fn plan(transactions: &[Transaction], applied: Lsn) -> Result<Option<Plan>, ShapeError> {
    let fresh: Vec<&Transaction> = transactions
        .iter()
        .filter(|t| t.end_lsn > applied)
        .collect();
    let Some(last) = fresh.last() else {
        return Ok(None);
    };
    let mut shapes: Vec<Arc<Table>> = Vec::new();
    let mut shape_index: HashMap<Arc<Table>, usize> = HashMap::new();
    let mut names: HashMap<(String, String), usize> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    // the shape of the previous change: most batches repeat one table
    let mut last_shape: Option<(Arc<Table>, usize, usize)> = None;
    let mut changes = 0;
    for (index, change) in fresh.iter().flat_map(|t| &t.changes).enumerate() {
        changes += 1;
        let t = &change.table;
        check_width(t, &change.kind, index)?;
        let (shape, pi) = match &last_shape {
            Some((prev, shape, pi)) if Arc::ptr_eq(prev, t) => (*shape, *pi),
            _ => {
                let shape = *shape_index.entry(t.clone()).or_insert_with(|| {
                    shapes.push(t.clone());
                    shapes.len() - 1
                });
                let pi = *names
                    .entry((t.schema.clone(), t.name.clone()))
                    .or_insert_with(|| {
                        pending.push(Pending::default());
                        pending.len() - 1
                    });
                last_shape = Some((t.clone(), shape, pi));
                (shape, pi)
            }
        };
        let rows = &mut pending[pi];
        match &change.kind {
            ChangeKind::Insert { new } => rows.record(
                key_of(t, new),
                Final::Upsert {
                    shape,
                    row: new.clone(),
                },
            ),
            ChangeKind::Update { old, new } => {
                let new_key = key_of(t, new);
                let old_key = old
                    .as_ref()
                    .map_or_else(|| new_key.clone(), |o| key_of(t, o));
                let effect = if new.contains(&Value::Unchanged) {
                    merge_with_earlier(&shapes, shape, t, new, &old_key, rows.rows.get(&old_key))
                } else {
                    Some(Final::Upsert {
                        shape,
                        row: new.clone(),
                    })
                };
                if old_key != new_key {
                    rows.record(
                        old_key.clone(),
                        Final::Delete {
                            shape,
                            key: old_key,
                        },
                    );
                }
                if let Some(effect) = effect {
                    rows.record(new_key, effect);
                }
            }
            ChangeKind::Delete { old } => {
                let key = key_of(t, old);
                rows.record(key.clone(), Final::Delete { shape, key });
            }
        }
    }
    let mut ops: Vec<TableOps> = shapes.iter().map(|_| TableOps::default()).collect();
    for mut p in pending {
        for key in p.order {
            match p.rows.remove(&key) {
                Some(Final::Delete { shape, key }) => ops[shape].deletes.push(key),
                Some(Final::Upsert { shape, row }) => ops[shape].upserts.push(row),
                Some(Final::Merge { shape, from, row }) => {
                    ops[shape].merges.push(Merge { from, row })
                }
                None => {}
            }
        }
    }
    let tables = shapes
        .into_iter()
        .zip(ops)
        .filter(|(_, o)| o.len() > 0)
        .collect();
    Ok(Some(Plan {
        tables,
        end_lsn: last.end_lsn,
        commit_time: last.commit_time,
        changes,
    }))
}

/// An update image with `Unchanged` values: fill them, by column name, from
/// an earlier image of the row in this batch; what stays unchanged is kept
/// from the destination's row (`from`). None when the batch deleted the row
/// before (an update of a row that does not exist changes nothing).
fn merge_with_earlier(
    shapes: &[Arc<Table>],
    shape: usize,
    table: &Table,
    new: &Row,
    old_key: &Row,
    earlier: Option<&Final>,
) -> Option<Final> {
    let mut row = new.clone();
    let mut from = old_key.clone();
    let earlier = match earlier {
        Some(Final::Upsert { shape, row }) => Some((&shapes[*shape], row)),
        Some(Final::Merge {
            shape,
            from: f,
            row,
        }) => {
            from = f.clone();
            Some((&shapes[*shape], row))
        }
        Some(Final::Delete { .. }) => return None,
        None => None,
    };
    if let Some((prev_table, prev)) = earlier {
        let same = std::ptr::eq(prev_table.as_ref(), table) || prev_table.columns == table.columns;
        for (i, v) in row.iter_mut().enumerate() {
            if *v != Value::Unchanged {
                continue;
            }
            let j = if same {
                Some(i)
            } else {
                let name = &table.columns[i].name;
                prev_table.columns.iter().position(|c| &c.name == name)
            };
            if let Some(p) = j.and_then(|j| prev.get(j)) {
                *v = p.clone();
            }
        }
    }
    Some(if row.contains(&Value::Unchanged) {
        Final::Merge { shape, from, row }
    } else {
        Final::Upsert { shape, row }
    })
}

fn check_width(table: &Table, kind: &ChangeKind, index: usize) -> Result<(), ShapeError> {
    let expected = table.columns.len();
    let images: [Option<&Row>; 2] = match kind {
        ChangeKind::Insert { new } => [Some(new), None],
        ChangeKind::Update { old, new } => [Some(new), old.as_ref()],
        ChangeKind::Delete { old } => [Some(old), None],
    };
    for image in images.into_iter().flatten() {
        if image.len() != expected {
            return Err(ShapeError {
                table: format!("{}.{}", table.schema, table.name),
                index,
                found: image.len(),
                expected,
            });
        }
    }
    Ok(())
}

fn key_of(table: &Table, row: &Row) -> Row {
    table.key_indexes().map(|i| row[i].clone()).collect()
}

#[cfg(test)]
mod tests;
