//! The binary encoding of a batch of transactions, as agents ship it.
//!
//! A batch is self-describing: it carries the definition of every table its
//! changes touch, so a receiver needs no state from earlier batches (a
//! reconnect, a replay from Kafka or a dead-letter replay decode the same way).
//!
//! Layout (big-endian): `b"MB"`, version `1`, the tables, then the transactions.
//! Strings are a `u32` length and UTF-8 bytes. The checksum is crc32 (IEEE) of
//! the encoded bytes and travels beside them.

use std::collections::HashMap;
use std::sync::Arc;

use crate::Lsn;
use crate::change::{Change, ChangeKind, Column, Row, Table, Transaction, Value};

const MAGIC: &[u8; 2] = b"MB";
/// The newest format this agent writes and reads. Version 2 adds a flags
/// byte per transaction (bit 0: a fragment, more follows); version 3 adds
/// bit 1 (a commit token id follows, 16 bytes). Each batch is written in
/// the oldest version that holds it, so receivers one release behind read
/// every batch but those; versions 1 and 2 are still read.
const VERSION: u8 = 3;

/// Bytes that are not a batch this version can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("batch truncated while reading {0}")]
    Truncated(&'static str),
    #[error("not a Meridian batch (bad magic bytes)")]
    BadMagic,
    #[error(
        "batch format version {0} is not supported (this agent reads versions 1 to {v}); upgrade the receiving agent: the link waits meanwhile, nothing is skipped",
        v = VERSION
    )]
    Version(u8),
    #[error("invalid {what} tag {tag}")]
    Tag { what: &'static str, tag: u8 },
    #[error("change refers to table #{0}, which the batch does not define")]
    TableIndex(u32),
    #[error("row has {found} values but its table has {expected} columns")]
    RowWidth { found: usize, expected: usize },
    #[error("string is not valid UTF-8")]
    NotUtf8,
    #[error("{0} trailing bytes after the batch")]
    Trailing(usize),
    #[error("batch rows take more than {0} bytes decoded (counted as the sender counts them)")]
    TooLarge(usize),
}

/// crc32 (IEEE) of an encoded batch.
pub fn checksum(payload: &[u8]) -> u32 {
    crc32fast::hash(payload)
}

/// What a batch claims beyond its payload, sealed with it: the payload's
/// crc32, the batch's sequence number, the position the watermark moves to,
/// the source's WAL end when it was sent, how the payload is compressed and
/// the policy version it was filtered with, bound to the source slot's
/// incarnation.
///
/// The seal is an integrity check, not a signature: it catches a batch
/// whose claims were damaged or altered apart from its payload, and a
/// sender whose claims disagree. Who may send for a region is decided by
/// its certificate (mTLS); whoever holds that can also seal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims<'a> {
    pub crc32: u32,
    pub seq: u64,
    pub end_lsn: u64,
    pub source_wal_end: u64,
    pub compression: &'a str,
    pub policy_version: u64,
    pub incarnation: &'a str,
}

impl Claims<'_> {
    /// crc32 of the claims: each number big-endian, the compression's name
    /// after its length, then the incarnation.
    pub fn seal(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        h.update(&self.crc32.to_be_bytes());
        h.update(&self.seq.to_be_bytes());
        h.update(&self.end_lsn.to_be_bytes());
        h.update(&self.source_wal_end.to_be_bytes());
        h.update(&self.policy_version.to_be_bytes());
        h.update(&(self.compression.len() as u32).to_be_bytes());
        h.update(self.compression.as_bytes());
        h.update(self.incarnation.as_bytes());
        h.finalize()
    }

    /// Why the claims cannot be taken, if they cannot: a seal that does
    /// not match (required when the source has an incarnation), or an end
    /// past the source's WAL end.
    pub fn refusal(&self, seal: Option<u32>) -> Option<String> {
        match seal {
            Some(seal) if seal != self.seal() => {
                return Some(format!(
                    "batch {} does not match its seal: its position, WAL end, compression, policy version or incarnation were changed after it was sealed",
                    self.seq
                ));
            }
            None if !self.incarnation.is_empty() => {
                return Some(format!(
                    "batch {} carries no seal, which a source with a slot incarnation always sends",
                    self.seq
                ));
            }
            _ => {}
        }
        if seal.is_some() && self.end_lsn > self.source_wal_end {
            return Some(format!(
                "batch {} claims to end at {}, past the source's WAL end {} when it was sent",
                self.seq,
                Lsn(self.end_lsn),
                Lsn(self.source_wal_end)
            ));
        }
        None
    }
}

/// Encodes transactions into one batch payload.
pub fn encode(transactions: &[Transaction]) -> Vec<u8> {
    let mut tables: Vec<&Arc<Table>> = Vec::new();
    let mut index: HashMap<*const Table, u32> = HashMap::new();
    for change in transactions.iter().flat_map(|t| &t.changes) {
        index.entry(Arc::as_ptr(&change.table)).or_insert_with(|| {
            tables.push(&change.table);
            tables.len() as u32 - 1
        });
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(MAGIC);
    let version = if transactions.iter().any(|t| t.token.is_some()) {
        3
    } else if transactions.iter().any(|t| t.continues) {
        2
    } else {
        1
    };
    out.push(version);
    put_u32(&mut out, tables.len() as u32);
    for table in &tables {
        put_str(&mut out, &table.schema);
        put_str(&mut out, &table.name);
        put_u32(&mut out, table.columns.len() as u32);
        for c in &table.columns {
            put_str(&mut out, &c.name);
            put_u32(&mut out, c.type_oid);
            out.push(c.key as u8);
        }
    }
    put_u32(&mut out, transactions.len() as u32);
    for t in transactions {
        out.extend(t.commit_lsn.0.to_be_bytes());
        out.extend(t.end_lsn.0.to_be_bytes());
        out.extend(t.commit_time.to_be_bytes());
        if version >= 2 {
            out.push(t.continues as u8 | (t.token.is_some() as u8) << 1);
        }
        if let Some(token) = t.token {
            out.extend(token.to_be_bytes());
        }
        put_u32(&mut out, t.changes.len() as u32);
        for c in &t.changes {
            put_u32(&mut out, index[&Arc::as_ptr(&c.table)]);
            match &c.kind {
                ChangeKind::Insert { new } => {
                    out.push(b'I');
                    put_row(&mut out, new);
                }
                ChangeKind::Update { old, new } => {
                    out.push(b'U');
                    match old {
                        Some(old) => {
                            out.push(1);
                            put_row(&mut out, old);
                        }
                        None => out.push(0),
                    }
                    put_row(&mut out, new);
                }
                ChangeKind::Delete { old } => {
                    out.push(b'D');
                    put_row(&mut out, old);
                }
            }
        }
    }
    out
}

/// Decodes a batch payload. Never panics on malformed input.
pub fn decode(payload: &[u8]) -> Result<Vec<Transaction>, CodecError> {
    decode_within(payload, usize::MAX)
}

/// [`decode`], stopping with [`CodecError::TooLarge`] once the rows read
/// take more than `budget` bytes as [`crate::change::row_bytes`] counts
/// them (as a sender closes its batches), so memory stays proportionate to
/// what a legitimate batch holds: a NULL is one byte on the wire but a
/// value in memory.
pub fn decode_within(payload: &[u8], budget: usize) -> Result<Vec<Transaction>, CodecError> {
    let mut spent = 0usize;
    let mut charge = |row: &Row| {
        spent = spent.saturating_add(crate::change::row_bytes(row));
        match spent > budget {
            true => Err(CodecError::TooLarge(budget)),
            false => Ok(()),
        }
    };
    let mut r = Reader(payload);
    if r.take(2, "magic")? != MAGIC {
        return Err(CodecError::BadMagic);
    }
    let version = match r.u8("version")? {
        v @ 1..=VERSION => v,
        v => return Err(CodecError::Version(v)),
    };
    // the flag bits each version defines
    let known_flags: u8 = match version {
        1 => 0,
        2 => 0b01,
        _ => 0b11,
    };
    let ntables = r.u32("table count")?;
    let mut tables = Vec::new();
    for _ in 0..ntables {
        let schema = r.str("table schema")?;
        let name = r.str("table name")?;
        let ncols = r.u32("column count")?;
        let mut columns = Vec::new();
        for _ in 0..ncols {
            columns.push(Column {
                name: r.str("column name")?,
                type_oid: r.u32("column type")?,
                key: r.u8("column key flag")? == 1,
            });
        }
        tables.push(Arc::new(Table {
            schema,
            name,
            columns,
        }));
    }
    let ntx = r.u32("transaction count")?;
    let mut transactions = Vec::new();
    for _ in 0..ntx {
        let commit_lsn = Lsn(r.u64("commit lsn")?);
        let end_lsn = Lsn(r.u64("end lsn")?);
        let commit_time = r.u64("commit time")? as i64;
        let flags = match version {
            1 => 0,
            _ => r.u8("transaction flags")?,
        };
        if flags & !known_flags != 0 {
            return Err(CodecError::Tag {
                what: "transaction flags",
                tag: flags,
            });
        }
        let continues = flags & 0b01 != 0;
        let token = match flags & 0b10 != 0 {
            true => Some(u128::from_be_bytes(
                r.take(16, "commit token")?.try_into().expect("16 bytes"),
            )),
            false => None,
        };
        let nchanges = r.u32("change count")?;
        let mut changes = Vec::new();
        for _ in 0..nchanges {
            let idx = r.u32("table index")?;
            let table = tables
                .get(idx as usize)
                .cloned()
                .ok_or(CodecError::TableIndex(idx))?;
            let width = table.columns.len();
            let kind = match r.u8("change kind")? {
                b'I' => ChangeKind::Insert { new: r.row(width)? },
                b'U' => {
                    let old = match r.u8("old row flag")? {
                        0 => None,
                        1 => Some(r.row(width)?),
                        tag => {
                            return Err(CodecError::Tag {
                                what: "old row flag",
                                tag,
                            });
                        }
                    };
                    ChangeKind::Update {
                        old,
                        new: r.row(width)?,
                    }
                }
                b'D' => ChangeKind::Delete { old: r.row(width)? },
                tag => {
                    return Err(CodecError::Tag {
                        what: "change kind",
                        tag,
                    });
                }
            };
            match &kind {
                ChangeKind::Insert { new } => charge(new)?,
                ChangeKind::Update { old, new } => {
                    charge(new)?;
                    if let Some(old) = old {
                        charge(old)?;
                    }
                }
                ChangeKind::Delete { old } => charge(old)?,
            }
            changes.push(Change { table, kind });
        }
        transactions.push(Transaction {
            commit_lsn,
            end_lsn,
            commit_time,
            changes,
            continues,
            token,
        });
    }
    if !r.0.is_empty() {
        return Err(CodecError::Trailing(r.0.len()));
    }
    Ok(transactions)
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend(v.to_be_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, s.len() as u32);
    out.extend_from_slice(s.as_bytes());
}

fn put_row(out: &mut Vec<u8>, row: &Row) {
    put_u32(out, row.len() as u32);
    for v in row {
        match v {
            Value::Null => out.push(0),
            Value::Unchanged => out.push(1),
            Value::Text(s) => {
                out.push(2);
                put_str(out, s);
            }
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, CodecError> {
        Ok(self.take(1, what)?[0])
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, CodecError> {
        Ok(u32::from_be_bytes(
            self.take(4, what)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, CodecError> {
        Ok(u64::from_be_bytes(
            self.take(8, what)?.try_into().expect("8 bytes"),
        ))
    }
    fn str(&mut self, what: &'static str) -> Result<String, CodecError> {
        let len = self.u32(what)? as usize;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| CodecError::NotUtf8)
    }
    fn row(&mut self, width: usize) -> Result<Row, CodecError> {
        let n = self.u32("row width")? as usize;
        if n != width {
            return Err(CodecError::RowWidth {
                found: n,
                expected: width,
            });
        }
        let mut row = Vec::with_capacity(n);
        for _ in 0..n {
            row.push(match self.u8("value tag")? {
                0 => Value::Null,
                1 => Value::Unchanged,
                2 => Value::Text(self.str("value")?),
                tag => return Err(CodecError::Tag { what: "value", tag }),
            });
        }
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn decoding_stops_at_its_budget() {
        let table = Arc::new(Table {
            schema: "public".into(),
            name: "t".into(),
            columns: (0..100)
                .map(|i| Column {
                    name: format!("c{i}"),
                    type_oid: 25,
                    key: i == 0,
                })
                .collect(),
        });
        // 1,000 rows of 100 NULLs: 100 kB on the wire, 800 kB as counted
        let t = Transaction {
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time: 0,
            changes: (0..1000)
                .map(|_| Change {
                    table: table.clone(),
                    kind: ChangeKind::Insert {
                        new: vec![Value::Null; 100],
                    },
                })
                .collect(),
            continues: false,
            token: None,
        };
        let payload = encode(std::slice::from_ref(&t));
        assert!(payload.len() < 120_000, "{}", payload.len());
        assert_eq!(decode_within(&payload, 800_000).unwrap(), vec![t]);
        assert!(matches!(
            decode_within(&payload, 799_999),
            Err(CodecError::TooLarge(799_999))
        ));
    }

    #[test]
    fn a_seal_binds_the_claims() {
        let claims = Claims {
            crc32: 7,
            seq: 3,
            end_lsn: 0x100,
            source_wal_end: 0x180,
            compression: "zstd",
            policy_version: 2,
            incarnation: "0c2f",
        };
        let seal = claims.seal();
        assert_eq!(claims.refusal(Some(seal)), None);
        for changed in [
            Claims {
                end_lsn: 0x101,
                ..claims
            },
            Claims { seq: 4, ..claims },
            Claims { crc32: 8, ..claims },
            Claims {
                source_wal_end: 0x181,
                ..claims
            },
            Claims {
                incarnation: "0c2e",
                ..claims
            },
            Claims {
                compression: "",
                ..claims
            },
            Claims {
                policy_version: 3,
                ..claims
            },
        ] {
            let why = changed.refusal(Some(seal)).expect("refused");
            assert!(why.contains("does not match its seal"), "{why}");
        }
        let past = Claims {
            end_lsn: 0x200,
            ..claims
        };
        let why = past.refusal(Some(past.seal())).expect("refused");
        assert!(why.contains("past the source's WAL end 0/180"), "{why}");
        assert!(claims.refusal(None).expect("refused").contains("no seal"));
        // an agent older than incarnations sends neither
        let older = Claims {
            incarnation: "",
            source_wal_end: 0,
            ..claims
        };
        assert_eq!(older.refusal(None), None);
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            Just(Value::Unchanged),
            ".{0,40}".prop_map(Value::Text),
        ]
    }

    fn table() -> impl Strategy<Value = Arc<Table>> {
        (
            "[a-z]{1,8}",
            proptest::collection::vec(("[a-z_]{1,8}", any::<u32>(), any::<bool>()), 1..6),
        )
            .prop_map(|(name, cols)| {
                Arc::new(Table {
                    schema: "public".into(),
                    name,
                    columns: cols
                        .into_iter()
                        .map(|(name, type_oid, key)| Column {
                            name,
                            type_oid,
                            key,
                        })
                        .collect(),
                })
            })
    }

    fn transactions() -> impl Strategy<Value = Vec<Transaction>> {
        proptest::collection::vec(table(), 1..4).prop_flat_map(|tables| {
            let change =
                (0..tables.len(), 0u8..4, any::<u64>()).prop_flat_map(move |(t, kind, _)| {
                    let table = tables[t].clone();
                    let width = table.columns.len();
                    let row = || proptest::collection::vec(value(), width);
                    (Just(table), Just(kind), row(), row()).prop_map(|(table, kind, a, b)| Change {
                        table,
                        kind: match kind {
                            0 => ChangeKind::Insert { new: a },
                            1 => ChangeKind::Update { old: None, new: a },
                            2 => ChangeKind::Update {
                                old: Some(b),
                                new: a,
                            },
                            _ => ChangeKind::Delete { old: a },
                        },
                    })
                });
            proptest::collection::vec(
                (
                    any::<u64>(),
                    any::<u64>(),
                    any::<i64>(),
                    proptest::collection::vec(change, 0..8),
                    any::<bool>(),
                    proptest::option::of(any::<u128>()),
                ),
                0..4,
            )
            .prop_map(|txs| {
                txs.into_iter()
                    .map(|(c, e, t, changes, continues, token)| Transaction {
                        commit_lsn: Lsn(c),
                        end_lsn: Lsn(e),
                        commit_time: t,
                        changes,
                        continues,
                        token,
                    })
                    .collect()
            })
        })
    }

    #[test]
    fn writes_the_oldest_version_that_holds_the_batch() {
        let plain = Transaction {
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time: 3,
            changes: Vec::new(),
            continues: false,
            token: None,
        };
        let fragment = Transaction {
            continues: true,
            ..plain.clone()
        };
        let tagged = Transaction {
            token: Some(u128::MAX - 7),
            ..plain.clone()
        };
        for (batch, version) in [
            (vec![plain.clone()], 1),
            (vec![plain.clone(), fragment.clone()], 2),
            (vec![fragment, tagged.clone()], 3),
        ] {
            let bytes = encode(&batch);
            assert_eq!(bytes[2], version);
            assert_eq!(decode(&bytes).unwrap(), batch);
        }
        // a flag bit its version does not define is an error, not ignored
        let mut bytes = encode(&[tagged]);
        let flags = bytes.len() - 16 - 4 - 1;
        bytes[flags] |= 0b100;
        assert!(matches!(
            decode(&bytes),
            Err(CodecError::Tag {
                what: "transaction flags",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn round_trips(txs in transactions()) {
            let bytes = encode(&txs);
            prop_assert_eq!(decode(&bytes).unwrap(), txs);
        }

        #[test]
        fn never_panics_on_corrupted_bytes(txs in transactions(), pos in any::<usize>(), bit in 0u8..8) {
            let mut bytes = encode(&txs);
            let i = pos % bytes.len();
            bytes[i] ^= 1 << bit;
            let _ = decode(&bytes); // an error or some other valid batch, never a panic
            prop_assert_ne!(checksum(&bytes), checksum(&encode(&txs)));
        }

        #[test]
        fn rejects_every_truncation(txs in transactions()) {
            let bytes = encode(&txs);
            for end in 0..bytes.len() {
                prop_assert!(decode(&bytes[..end]).is_err());
            }
        }
    }
}
