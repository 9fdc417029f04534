//! Decoder for PostgreSQL's `pgoutput` logical replication protocol (version 1).
//!
//! Feed it the payload of each `XLogData` message in stream order; it returns a
//! [`Transaction`] at each commit. It remembers the relations the server
//! described (`Relation` messages come before first use and after schema
//! changes) and the replication origin of the current transaction.
//!
//! Reference: "Logical Streaming Replication Protocol" and "Logical Replication
//! Message Formats" in the PostgreSQL 15 documentation.

use std::collections::HashMap;
use std::sync::Arc;

use crate::Lsn;
use crate::change::{Change, ChangeKind, Column, Row, Table, Transaction, Value};

/// Most changes in one fragment of a large transaction.
pub const FRAGMENT_CHANGES: usize = 10_000;
/// Most value bytes (roughly) in one fragment of a large transaction.
pub const FRAGMENT_BYTES: usize = 1 << 20;

/// A message the decoder could not make sense of. Fatal for the stream: the
/// position is not advanced, so a restart re-reads the same bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("unknown pgoutput message type {0:?}")]
    UnknownMessage(char),
    #[error("unknown tuple column kind {0:?}")]
    UnknownColumnKind(char),
    #[error("change for relation {0} that the server never described")]
    UnknownRelation(u32),
    #[error("row change outside a transaction (no BEGIN seen)")]
    OutsideTransaction,
    #[error("tuple has {found} columns but relation {table} has {expected}")]
    ColumnCount {
        table: String,
        found: usize,
        expected: usize,
    },
    #[error("binary column values are not supported; start replication without the binary option")]
    BinaryValue,
    #[error("column value is not valid UTF-8")]
    NotUtf8,
    #[error(
        "TRUNCATE of {table} ({tables} table(s)) is in the slot, but Meridian does not replicate TRUNCATE; \
         the publication must not publish it (the agent sets publish = 'insert, update, delete'): \
         empty the table with DELETE in every region, then advance the slot past the TRUNCATE"
    )]
    Truncate { table: String, tables: u32 },
}

/// What one `XLogData` payload amounted to.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Nothing complete yet (begin, relation, row change, ...).
    Pending,
    /// A transaction committed. `origin` is the replication origin that made
    /// it, if any (changes applied by a replication apply session).
    Committed {
        transaction: Transaction,
        origin: Option<String>,
        /// The transaction carried a logical decoding message (heartbeats do),
        /// or came in fragments before: worth delivering even without row
        /// changes.
        message: bool,
        /// The initial-sync chunk this transaction marks (see
        /// [`crate::snapshot`]), if it carried a `meridian.snapshot` message.
        snapshot: Option<crate::snapshot::Mark>,
    },
    /// A fragment of a transaction too large for one bounded message
    /// (`continues` set); the rest follows, and the commit ends it.
    Fragment {
        transaction: Transaction,
        origin: Option<String>,
    },
}

/// Prefix of the logical decoding message with which a routed write tags
/// its transaction; the content is the token id, 32 lowercase hex digits.
pub const TOKEN_PREFIX: &str = "meridian.token";

/// A token id from a `meridian.token` message's content; None if the
/// content is not one (the message is then only a message).
fn parse_token(content: &[u8]) -> Option<u128> {
    let text = std::str::from_utf8(content).ok()?;
    if text.len() != 32 {
        return None;
    }
    u128::from_str_radix(text, 16).ok()
}

/// Primary key columns by `(schema, table)`.
pub type Keys = HashMap<(String, String), Vec<String>>;

/// Stateful pgoutput decoder for one replication stream. A transaction is
/// held in memory only up to a fragment's size: past [`FRAGMENT_CHANGES`]
/// changes or [`FRAGMENT_BYTES`] bytes, what is decoded so far comes out as
/// a [`Decoded::Fragment`].
pub struct Decoder {
    relations: HashMap<u32, Arc<Table>>,
    current: Option<Open>,
    keys: Keys,
    fragment_changes: usize,
    fragment_bytes: usize,
    /// Row changes of transactions whose origin starts with this are not
    /// decoded (the transaction still commits, empty, with its origin).
    skipped_origins: Option<String>,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder {
            relations: HashMap::new(),
            current: None,
            keys: Keys::new(),
            fragment_changes: FRAGMENT_CHANGES,
            fragment_bytes: FRAGMENT_BYTES,
            skipped_origins: None,
        }
    }
}

struct Open {
    commit_lsn: Lsn,
    commit_time: i64,
    origin: Option<String>,
    changes: Vec<Change>,
    bytes: usize,
    message: bool,
    /// Fragments of this transaction were handed out already.
    fragmented: bool,
    /// A routed write's commit token id.
    token: Option<u128>,
    /// An initial-sync chunk's mark.
    snapshot: Option<crate::snapshot::Mark>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that marks `keys` as each table's key columns, whatever the
    /// replica identity (with `REPLICA IDENTITY FULL` the server flags every
    /// column).
    pub fn with_keys(keys: Keys) -> Self {
        Decoder {
            keys,
            ..Self::default()
        }
    }

    /// Fragments of at most `changes` changes or (roughly) `bytes` bytes.
    pub fn with_fragments(mut self, changes: usize, bytes: usize) -> Self {
        self.fragment_changes = changes.max(1);
        self.fragment_bytes = bytes.max(1);
        self
    }

    /// Leaves the row changes of transactions from origins starting with
    /// `prefix` undecoded: they come out as empty transactions with their
    /// origin, for a caller that drops them anyway (an agent skipping what
    /// its own apply sessions wrote), at a fraction of the cost.
    pub fn skipping_origins(mut self, prefix: &str) -> Self {
        self.skipped_origins = Some(prefix.to_owned());
        self
    }

    /// Whether the open transaction's row changes are skipped.
    fn skipping(&self) -> bool {
        match (&self.skipped_origins, &self.current) {
            (
                Some(prefix),
                Some(Open {
                    origin: Some(o), ..
                }),
            ) => o.starts_with(prefix.as_str()),
            _ => false,
        }
    }

    /// Decodes one message (the data of one `XLogData`).
    pub fn decode(&mut self, message: &[u8]) -> Result<Decoded, DecodeError> {
        let mut r = Reader(message);
        let tag = r.u8("message type")?;
        if matches!(tag, b'I' | b'U' | b'D') && self.skipping() {
            return Ok(Decoded::Pending);
        }
        match tag {
            b'B' => {
                let final_lsn = Lsn(r.u64("begin final lsn")?);
                let commit_time = r.i64("begin timestamp")?;
                let _xid = r.u32("begin xid")?;
                self.current = Some(Open {
                    commit_lsn: final_lsn,
                    commit_time,
                    origin: None,
                    changes: Vec::new(),
                    bytes: 0,
                    message: false,
                    fragmented: false,
                    token: None,
                    snapshot: None,
                });
            }
            b'O' => {
                let _origin_lsn = r.u64("origin lsn")?;
                let name = r.cstr("origin name")?;
                self.open()?.origin = Some(name);
            }
            b'R' => {
                let id = r.u32("relation id")?;
                let schema = r.cstr("relation namespace")?;
                let name = r.cstr("relation name")?;
                let _identity = r.u8("replica identity")?;
                let n = r.i16("relation column count")?.max(0) as usize;
                // a column takes at least 10 bytes: never reserve more than
                // the message can hold
                let mut columns = Vec::with_capacity(n.min(r.0.len() / 10));
                for _ in 0..n {
                    let flags = r.u8("column flags")?;
                    let name = r.cstr("column name")?;
                    let type_oid = r.u32("column type")?;
                    let _typmod = r.i32("column typmod")?;
                    columns.push(Column {
                        name,
                        type_oid,
                        key: flags & 1 == 1,
                    });
                }
                if let Some(keys) = self.keys.get(&(schema.clone(), name.clone())) {
                    for c in &mut columns {
                        c.key = keys.contains(&c.name);
                    }
                }
                let table = Table {
                    schema,
                    name,
                    columns,
                };
                self.relations.insert(id, Arc::new(table));
            }
            b'Y' => {} // type description: values are text, nothing to keep
            b'I' => {
                let table = self.relation(r.u32("insert relation")?)?;
                expect_tag(&mut r, b'N', "insert new tuple")?;
                let new = tuple(&mut r, &table)?;
                return self.push(table, ChangeKind::Insert { new });
            }
            b'U' => {
                let table = self.relation(r.u32("update relation")?)?;
                let mut old = None;
                let mut full_old = false;
                let mut tag = r.u8("update tuple tag")?;
                if tag == b'K' || tag == b'O' {
                    full_old = tag == b'O';
                    old = Some(tuple(&mut r, &table)?);
                    tag = r.u8("update new tuple tag")?;
                }
                if tag != b'N' {
                    return Err(DecodeError::UnknownColumnKind(tag as char));
                }
                let mut new = tuple(&mut r, &table)?;
                // REPLICA IDENTITY FULL: the old tuple is logged whole (TOAST
                // values flattened), so values the update left unchanged are
                // known; the change then carries the whole row
                if let (true, Some(old)) = (full_old, &old) {
                    for (v, o) in new.iter_mut().zip(old) {
                        if *v == Value::Unchanged && *o != Value::Unchanged {
                            *v = o.clone();
                        }
                    }
                }
                return self.push(table, ChangeKind::Update { old, new });
            }
            b'D' => {
                let table = self.relation(r.u32("delete relation")?)?;
                let tag = r.u8("delete tuple tag")?;
                if tag != b'K' && tag != b'O' {
                    return Err(DecodeError::UnknownColumnKind(tag as char));
                }
                let old = tuple(&mut r, &table)?;
                return self.push(table, ChangeKind::Delete { old });
            }
            b'T' => {
                // not published by Meridian's publication (and refused on
                // replicated tables); never ignored if it comes anyway
                let n = r.u32("truncate relation count")?;
                let _options = r.u8("truncate options")?;
                let id = r.u32("truncate relation")?;
                let table = self.relation(id).map_or_else(
                    |_| format!("relation {id}"),
                    |t| format!("{}.{}", t.schema, t.name),
                );
                return Err(DecodeError::Truncate { table, tables: n });
            }
            // logical decoding message: heartbeats, and the commit token
            // id of a routed write
            b'M' => {
                let transactional = r.u8("message flags")? & 1 == 1;
                let _lsn = r.u64("message lsn")?;
                let prefix = r.cstr("message prefix")?;
                let len = r.u32("message length")? as usize;
                let content = r.take(len, "message content")?;
                if transactional {
                    let open = self.open()?;
                    open.message = true;
                    if prefix == TOKEN_PREFIX {
                        open.token = parse_token(content);
                    } else if prefix == crate::snapshot::MARK_PREFIX {
                        open.snapshot = crate::snapshot::Mark::parse(content);
                    }
                }
            }
            b'C' => {
                let _flags = r.u8("commit flags")?;
                let commit_lsn = Lsn(r.u64("commit lsn")?);
                let end_lsn = Lsn(r.u64("commit end lsn")?);
                let _ts = r.i64("commit timestamp")?;
                let open = self.current.take().ok_or(DecodeError::OutsideTransaction)?;
                return Ok(Decoded::Committed {
                    transaction: Transaction {
                        commit_lsn,
                        end_lsn,
                        commit_time: open.commit_time,
                        changes: open.changes,
                        continues: false,
                        token: open.token,
                    },
                    origin: open.origin,
                    message: open.message || open.fragmented,
                    snapshot: open.snapshot,
                });
            }
            other => return Err(DecodeError::UnknownMessage(other as char)),
        }
        Ok(Decoded::Pending)
    }

    fn open(&mut self) -> Result<&mut Open, DecodeError> {
        self.current.as_mut().ok_or(DecodeError::OutsideTransaction)
    }

    fn relation(&self, id: u32) -> Result<Arc<Table>, DecodeError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or(DecodeError::UnknownRelation(id))
    }

    /// Adds a change to the open transaction; hands out a fragment when the
    /// transaction has grown to a fragment's size.
    fn push(&mut self, table: Arc<Table>, kind: ChangeKind) -> Result<Decoded, DecodeError> {
        let (max_changes, max_bytes) = (self.fragment_changes, self.fragment_bytes);
        let open = self.open()?;
        open.bytes += kind.approx_bytes();
        open.changes.push(Change { table, kind });
        if open.changes.len() < max_changes && open.bytes < max_bytes {
            return Ok(Decoded::Pending);
        }
        open.fragmented = true;
        open.bytes = 0;
        let changes = std::mem::take(&mut open.changes);
        Ok(Decoded::Fragment {
            transaction: Transaction {
                commit_lsn: open.commit_lsn,
                end_lsn: Lsn(open.commit_lsn.0 + 1),
                commit_time: open.commit_time,
                changes,
                continues: true,
                token: None,
            },
            origin: open.origin.clone(),
        })
    }
}

fn expect_tag(r: &mut Reader<'_>, want: u8, what: &'static str) -> Result<(), DecodeError> {
    match r.u8(what)? {
        t if t == want => Ok(()),
        t => Err(DecodeError::UnknownColumnKind(t as char)),
    }
}

fn tuple(r: &mut Reader<'_>, table: &Table) -> Result<Row, DecodeError> {
    let n = r.i16("tuple column count")?.max(0) as usize;
    if n != table.columns.len() {
        return Err(DecodeError::ColumnCount {
            table: format!("{}.{}", table.schema, table.name),
            found: n,
            expected: table.columns.len(),
        });
    }
    let mut row = Vec::with_capacity(n);
    for _ in 0..n {
        row.push(match r.u8("column kind")? {
            b'n' => Value::Null,
            b'u' => Value::Unchanged,
            b't' => {
                let len = r.i32("column length")?.max(0) as usize;
                let bytes = r.take(len, "column value")?;
                let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotUtf8)?;
                Value::Text(text.to_owned())
            }
            b'b' => return Err(DecodeError::BinaryValue),
            other => return Err(DecodeError::UnknownColumnKind(other as char)),
        });
    }
    Ok(row)
}

/// Big-endian cursor over a message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N, what)?.try_into().expect("length checked"))
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }
    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        Ok(i16::from_be_bytes(self.array(what)?))
    }
    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn cstr(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let end = self
            .0
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let s = std::str::from_utf8(&self.0[..end]).map_err(|_| DecodeError::NotUtf8)?;
        self.0 = &self.0[end + 1..];
        Ok(s.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds pgoutput messages the way the server encodes them.
    #[derive(Default)]
    struct Msg(Vec<u8>);
    impl Msg {
        fn new(tag: u8) -> Self {
            Msg(vec![tag])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn i16(mut self, v: i16) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend(v.to_be_bytes());
            self
        }
        fn cstr(mut self, s: &str) -> Self {
            self.0.extend(s.as_bytes());
            self.0.push(0);
            self
        }
        fn text(self, s: &str) -> Self {
            let mut m = self.u8(b't').i32(s.len() as i32);
            m.0.extend(s.as_bytes());
            m
        }
    }

    fn begin() -> Vec<u8> {
        Msg::new(b'B').u64(0x100).u64(42).u32(7).0
    }
    fn relation() -> Vec<u8> {
        Msg::new(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("orders")
            .u8(b'd')
            .i16(2)
            .u8(1)
            .cstr("id")
            .u32(20)
            .i32(-1)
            .u8(0)
            .cstr("note")
            .u32(25)
            .i32(-1)
            .0
    }
    fn commit(end: u64) -> Vec<u8> {
        Msg::new(b'C').u8(0).u64(end - 8).u64(end).u64(42).0
    }

    #[test]
    fn decodes_a_transaction_with_every_change_kind() {
        let mut d = Decoder::new();
        assert_eq!(d.decode(&begin()), Ok(Decoded::Pending));
        d.decode(&relation()).unwrap();
        let insert = Msg::new(b'I')
            .u32(16384)
            .u8(b'N')
            .i16(2)
            .text("1")
            .u8(b'n')
            .0;
        d.decode(&insert).unwrap();
        let update = Msg::new(b'U')
            .u32(16384)
            .u8(b'K')
            .i16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .i16(2)
            .text("2")
            .u8(b'u')
            .0;
        d.decode(&update).unwrap();
        let delete = Msg::new(b'D')
            .u32(16384)
            .u8(b'K')
            .i16(2)
            .text("2")
            .u8(b'n')
            .0;
        d.decode(&delete).unwrap();
        let Decoded::Committed {
            transaction,
            origin,
            message: false,
            snapshot: None,
        } = d.decode(&commit(0x200)).unwrap()
        else {
            panic!("commit must complete the transaction");
        };
        assert_eq!(origin, None);
        assert_eq!(transaction.end_lsn, Lsn(0x200));
        assert_eq!(transaction.commit_time, 42);
        let kinds: Vec<_> = transaction.changes.iter().map(|c| c.kind.clone()).collect();
        let t = |s: &str| Value::Text(s.into());
        assert_eq!(
            kinds,
            vec![
                ChangeKind::Insert {
                    new: vec![t("1"), Value::Null]
                },
                ChangeKind::Update {
                    old: Some(vec![t("1"), Value::Null]),
                    new: vec![t("2"), Value::Unchanged]
                },
                ChangeKind::Delete {
                    old: vec![t("2"), Value::Null]
                },
            ]
        );
        assert_eq!(transaction.changes[0].table.name, "orders");
        assert!(transaction.changes[0].table.columns[0].key);
    }

    /// Review finding 5 under REPLICA IDENTITY FULL: the old tuple is whole,
    /// so an unchanged TOAST value is taken from it and the change carries
    /// the whole row (a key image 'K' gives nothing to take).
    #[test]
    fn a_full_old_tuple_fills_unchanged_values() {
        let mut d = Decoder::new();
        d.decode(&begin()).unwrap();
        d.decode(&relation()).unwrap();
        let update = Msg::new(b'U')
            .u32(16384)
            .u8(b'O')
            .i16(2)
            .text("1")
            .text("a long note")
            .u8(b'N')
            .i16(2)
            .text("2")
            .u8(b'u')
            .0;
        d.decode(&update).unwrap();
        let Decoded::Committed { transaction, .. } = d.decode(&commit(0x200)).unwrap() else {
            panic!("commit must complete the transaction");
        };
        let t = |s: &str| Value::Text(s.into());
        assert_eq!(
            transaction.changes[0].kind,
            ChangeKind::Update {
                old: Some(vec![t("1"), t("a long note")]),
                new: vec![t("2"), t("a long note")]
            }
        );
    }

    /// A large transaction comes out in bounded fragments: every one but
    /// the last continues, and none is skipped as already applied or taken
    /// for the transaction's end.
    #[test]
    fn a_large_transaction_comes_in_fragments() {
        let mut d = Decoder::new().with_fragments(2, usize::MAX);
        d.decode(&begin()).unwrap();
        d.decode(&relation()).unwrap();
        let mut out = Vec::new();
        for id in 1..=5 {
            let insert = Msg::new(b'I')
                .u32(16384)
                .u8(b'N')
                .i16(2)
                .text(&id.to_string())
                .u8(b'n')
                .0;
            match d.decode(&insert).unwrap() {
                Decoded::Pending => {}
                Decoded::Fragment { transaction, .. } => out.push(transaction),
                other => panic!("{other:?}"),
            }
        }
        let Decoded::Committed {
            transaction,
            message,
            ..
        } = d.decode(&commit(0x200)).unwrap()
        else {
            panic!("commit must end the transaction");
        };
        assert!(
            message,
            "the end of a fragmented transaction is always delivered"
        );
        out.push(transaction);
        let sizes: Vec<_> = out.iter().map(|t| (t.changes.len(), t.continues)).collect();
        assert_eq!(sizes, [(2, true), (2, true), (1, false)]);
        // begin() announces commit lsn 0x100
        assert!(
            out[..2]
                .iter()
                .all(|t| t.commit_lsn == Lsn(0x100) && t.end_lsn == Lsn(0x101))
        );
        assert_eq!(out[2].end_lsn, Lsn(0x200));
    }

    #[test]
    fn reports_the_origin_of_replicated_transactions() {
        let mut d = Decoder::new();
        d.decode(&begin()).unwrap();
        d.decode(&Msg::new(b'O').u64(5).cstr("meridian_eu").0)
            .unwrap();
        let Decoded::Committed { origin, .. } = d.decode(&commit(0x300)).unwrap() else {
            panic!("expected commit");
        };
        assert_eq!(origin.as_deref(), Some("meridian_eu"));
    }

    /// Skipped origins: their row changes are not decoded (not even looked
    /// up: a relation never announced is no error), while other origins'
    /// transactions decode in full.
    #[test]
    fn skips_the_rows_of_skipped_origins_only() {
        let mut d = Decoder::new().skipping_origins("meridian_");
        let insert = |relation: u32| {
            Msg::new(b'I')
                .u32(relation)
                .u8(b'N')
                .i16(2)
                .text("1")
                .u8(b'n')
                .0
        };
        d.decode(&begin()).unwrap();
        d.decode(&Msg::new(b'O').u64(5).cstr("meridian_eu").0)
            .unwrap();
        assert!(matches!(d.decode(&insert(999)).unwrap(), Decoded::Pending));
        let Decoded::Committed {
            transaction,
            origin,
            ..
        } = d.decode(&commit(0x300)).unwrap()
        else {
            panic!("expected commit");
        };
        assert_eq!(origin.as_deref(), Some("meridian_eu"));
        assert!(transaction.changes.is_empty());

        for origin in [Some("pg_other"), None] {
            d.decode(&begin()).unwrap();
            if let Some(o) = origin {
                d.decode(&Msg::new(b'O').u64(5).cstr(o).0).unwrap();
            }
            d.decode(&relation()).unwrap();
            d.decode(&insert(16384)).unwrap();
            let Decoded::Committed { transaction, .. } = d.decode(&commit(0x400)).unwrap() else {
                panic!("expected commit");
            };
            assert_eq!(transaction.changes.len(), 1, "origin {origin:?}");
        }
    }

    #[test]
    fn marks_transactions_that_carry_a_message() {
        let mut d = Decoder::new();
        d.decode(&begin()).unwrap();
        let message = Msg::new(b'M')
            .u8(1)
            .u64(0x250)
            .cstr("meridian.heartbeat")
            .u32(0)
            .0;
        d.decode(&message).unwrap();
        let Decoded::Committed {
            transaction,
            message,
            ..
        } = d.decode(&commit(0x300)).unwrap()
        else {
            panic!("expected commit");
        };
        assert!(message && transaction.changes.is_empty());
        assert_eq!(transaction.end_lsn, Lsn(0x300));
        assert_eq!(transaction.token, None);
    }

    #[test]
    fn carries_an_initial_sync_mark_to_its_commit() {
        let mark = crate::snapshot::Mark {
            destination: "eu".into(),
            chunk: 0xfeed,
        };
        let mut d = Decoder::new();
        d.decode(&begin()).unwrap();
        let content = mark.content();
        let mut message = Msg::new(b'M')
            .u8(1)
            .u64(0x250)
            .cstr(crate::snapshot::MARK_PREFIX)
            .u32(content.len() as u32)
            .0;
        message.extend(content.as_bytes());
        d.decode(&message).unwrap();
        let Decoded::Committed {
            message, snapshot, ..
        } = d.decode(&commit(0x300)).unwrap()
        else {
            panic!("expected commit");
        };
        assert!(message);
        assert_eq!(snapshot, Some(mark));
    }

    #[test]
    fn carries_a_routed_writes_token_to_its_commit() {
        let token = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
        for (content, expected) in [
            (format!("{token:032x}"), Some(token)),
            ("not a token".to_owned(), None),
            (format!("{token:031x}"), None),
        ] {
            let mut d = Decoder::new();
            d.decode(&begin()).unwrap();
            let mut message = Msg::new(b'M')
                .u8(1)
                .u64(0x250)
                .cstr(TOKEN_PREFIX)
                .u32(content.len() as u32)
                .0;
            message.extend(content.as_bytes());
            d.decode(&message).unwrap();
            let Decoded::Committed {
                transaction,
                message,
                ..
            } = d.decode(&commit(0x300)).unwrap()
            else {
                panic!("expected commit");
            };
            assert!(message, "{content}");
            assert_eq!(transaction.token, expected, "{content}");
        }
    }

    #[test]
    fn rejects_malformed_input_without_panicking() {
        let mut d = Decoder::new();
        assert_eq!(d.decode(&[]), Err(DecodeError::Truncated("message type")));
        assert_eq!(d.decode(b"Z"), Err(DecodeError::UnknownMessage('Z')));
        d.decode(&begin()).unwrap();
        let unknown = Msg::new(b'I').u32(99).u8(b'N').i16(0).0;
        assert_eq!(d.decode(&unknown), Err(DecodeError::UnknownRelation(99)));
        d.decode(&relation()).unwrap();
        let short = Msg::new(b'I').u32(16384).u8(b'N').i16(1).text("1").0;
        assert!(matches!(
            d.decode(&short),
            Err(DecodeError::ColumnCount { .. })
        ));
        // every prefix of a valid message fails cleanly
        let full = Msg::new(b'I')
            .u32(16384)
            .u8(b'N')
            .i16(2)
            .text("1")
            .u8(b'n')
            .0;
        for end in 1..full.len() {
            assert!(d.decode(&full[..end]).is_err(), "prefix {end}");
        }
    }
}
