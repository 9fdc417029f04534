//! The change model: what capture produces, the codec carries and apply consumes.
//!
//! Values travel in PostgreSQL's text representation (the output of the column
//! type's output function). It is lossless for every built-in type, including
//! floats (shortest round-trip form), numerics, arrays and json, and lets the
//! destination parse each value with its own column type.

use std::sync::Arc;

use crate::Lsn;

/// A replicated table as the source described it. Two `Table`s with one
/// name may differ in their columns: a rule that drops columns for a
/// destination, a schema change mid-stream. Each row image goes with the
/// `Table` it was made for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Table {
    pub schema: String,
    pub name: String,
    pub columns: Vec<Column>,
}

/// One column of a [`Table`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Column {
    pub name: String,
    /// Type OID on the source. Informational: apply parses values with the
    /// destination column's own type.
    pub type_oid: u32,
    /// Part of the replica identity (the primary key).
    pub key: bool,
}

impl Table {
    /// `"schema"."name"`, quoted for use in SQL.
    pub fn qualified_name(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }

    /// Indexes of the key columns, in table order.
    pub fn key_indexes(&self) -> impl Iterator<Item = usize> + '_ {
        self.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
    }
}

/// Quotes an SQL identifier (`a"b` becomes `"a""b"`).
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// One column value of a row image.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// A TOASTed value the update did not change; the source did not send it.
    /// The destination must keep what it has.
    Unchanged,
    /// The value in PostgreSQL's text format.
    Text(String),
}

/// A row image: one value per column of its table, in table order.
pub type Row = Vec<Value>;

/// One row change.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub table: Arc<Table>,
    pub kind: ChangeKind,
}

/// What happened to the row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    Insert {
        new: Row,
    },
    /// `old` is the previous key image, present only when the key changed (or
    /// the table has REPLICA IDENTITY FULL).
    Update {
        old: Option<Row>,
        new: Row,
    },
    /// `old` holds at least the key columns; other columns may be `Null`.
    Delete {
        old: Row,
    },
}

/// A committed source transaction with its row changes, in commit order;
/// or, for a large transaction, one fragment of it.
///
/// A transaction with more changes (or bytes) than fit one bounded message
/// comes as fragments: values with the same `commit_lsn`, in order, every
/// one but the last with `continues` set. A continuing fragment's `end_lsn`
/// is `commit_lsn + 1`: past every transaction committed before (so it is
/// never taken for one already applied) and before the transaction's own
/// end (so a watermark never passes it). The last fragment carries the real
/// `end_lsn`. A destination applies all fragments in one transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// LSN of the commit record.
    pub commit_lsn: Lsn,
    /// LSN just past the commit record; unique per transaction and increasing
    /// in commit order. This is the watermark a destination advances to.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the PostgreSQL epoch (2000-01-01 UTC).
    pub commit_time: i64,
    pub changes: Vec<Change>,
    /// More changes of this transaction follow in the next fragment.
    pub continues: bool,
    /// The commit token id a routed write tagged the transaction with (a
    /// `meridian.token` logical decoding message); the destination records
    /// it on apply so a reader can wait for exactly this transaction. Only
    /// the last fragment carries it.
    pub token: Option<u128>,
}

impl Transaction {
    /// Roughly the bytes the changes' values take (text lengths plus a few
    /// bytes per value): what batching and fragmenting bound.
    pub fn approx_bytes(&self) -> usize {
        self.changes.iter().map(|c| c.kind.approx_bytes()).sum()
    }
}

impl ChangeKind {
    /// Roughly the bytes the change's row images take.
    pub fn approx_bytes(&self) -> usize {
        match self {
            ChangeKind::Insert { new } => row_bytes(new),
            ChangeKind::Update { old, new } => row_bytes(new) + old.as_ref().map_or(0, row_bytes),
            ChangeKind::Delete { old } => row_bytes(old),
        }
    }
}

/// Roughly the bytes one row image takes.
pub fn row_bytes(row: &Row) -> usize {
    row.iter()
        .map(|v| match v {
            Value::Text(s) => s.len() + 8,
            _ => 8,
        })
        .sum()
}
