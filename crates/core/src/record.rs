//! The Kafka record format of a link (`<prefix>.<source>.<destination>`).
//!
//! A row's partition is fixed by its table and primary key (crc32 of the
//! key, modulo the partitions), so every change of one row lands in one
//! partition, in order. A transaction becomes one record per partition it
//! touches, holding its changes for that partition in transaction order (a
//! broker's cost is per record: a 1,000-row transaction is 4 records on 4
//! partitions, not 1,000); the record's Kafka key is the table and primary key
//! of its first change. Topics must not be compacted. An update that changes
//! a row's key travels as a delete of the old key (in the old key's
//! partition, after the row's earlier changes) and an insert of the new row
//! (in the new key's partition), unless it carries unchanged TOASTed values,
//! which only the old row holds: then it travels whole, keyed by the old key. The value is a
//! one-change batch in the [`crate::codec`] format (self-describing). Each
//! partition also gets every heartbeat, so a consumer learns that its
//! partition has everything up to a source position even when no row of it
//! changed.
//!
//! Headers (values are ASCII decimal unless noted):
//! - `meridian-origin`: the source region;
//! - `meridian-lsn`: end position of the source transaction;
//! - `meridian-index`: the record's index among its transaction's records
//!   ([`HEARTBEAT_INDEX`] for heartbeats);
//! - `meridian-policy-version`: the policy the change was filtered with;
//! - `meridian-crc32`: crc32 of the value;
//! - `meridian-more`: `1` when more records of the same source transaction
//!   follow in the same partition (a share split over several records, or a
//!   transaction captured in fragments); absent otherwise. A consumer that
//!   commits whole transactions reads on to the record without it.
//!
//! A record's position is `(lsn, index)`; within a partition positions only
//! grow, except when a source replays after a restart, which the consumer
//! skips as already applied.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{ChangeKind, Transaction, Value};
use crate::{Lsn, codec};

pub const ORIGIN: &str = "meridian-origin";
pub const LSN: &str = "meridian-lsn";
pub const INDEX: &str = "meridian-index";
pub const POLICY_VERSION: &str = "meridian-policy-version";
pub const CRC32: &str = "meridian-crc32";
pub const MORE: &str = "meridian-more";

/// The index of heartbeat records (after every change of their position).
pub const HEARTBEAT_INDEX: u32 = u32::MAX;

/// The topic of the link `source -> destination`.
pub fn topic(prefix: &str, source: &str, destination: &str) -> String {
    format!("{prefix}.{source}.{destination}")
}

/// Where a record stands in its source's history.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub lsn: Lsn,
    pub index: u32,
}

/// A record to produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Table and key; `None` for heartbeats (sent to an explicit partition).
    pub key: Option<Vec<u8>>,
    pub partition: Option<i32>,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    pub position: Position,
}

fn headers(
    source: &str,
    position: Position,
    policy_version: u64,
    value: &[u8],
) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (ORIGIN, source.as_bytes().to_vec()),
        (LSN, position.lsn.0.to_string().into_bytes()),
        (INDEX, position.index.to_string().into_bytes()),
        (POLICY_VERSION, policy_version.to_string().into_bytes()),
        (CRC32, codec::checksum(value).to_string().into_bytes()),
    ]
}

/// Most value bytes (roughly) in one record: a partition's share of a
/// transaction larger than this is split over several records, so no
/// record comes near a broker's message size limit (1 MB by default).
pub const RECORD_MAX_BYTES: usize = 512 << 10;

/// The records of one (already filtered) transaction or fragment: one per
/// partition its changes hash to (several when a partition's share exceeds
/// [`RECORD_MAX_BYTES`]), or, for a transaction without changes (a
/// heartbeat, the end of a fragmented transaction), one per partition.
///
/// `ordinals[i]` numbers change `i` by its place among the source
/// transaction's changes as captured (across fragments, before the policy
/// dropped any; missing entries count as `i`). A record's position index is
/// the ordinal of its last change, so a record produced again after a
/// restart has the position of the changes it holds, however the records
/// are cut this time (read-back values and a reloaded policy change their
/// sizes): a destination skips only records whose every change it applied.
pub fn records(
    source: &str,
    transaction: Transaction,
    ordinals: &[u32],
    policy_version: u64,
    partitions: i32,
) -> Vec<Outgoing> {
    if transaction.changes.is_empty() && transaction.continues {
        // a fragment the policy emptied: nothing to send, and no position to
        // claim (its commit + 1 would sort after the fragments that follow)
        return Vec::new();
    }
    if transaction.changes.is_empty() {
        let position = Position {
            lsn: transaction.end_lsn,
            index: HEARTBEAT_INDEX,
        };
        let value = codec::encode(std::slice::from_ref(&transaction));
        return (0..partitions)
            .map(|p| Outgoing {
                key: None,
                partition: Some(p),
                headers: headers(source, position, policy_version, &value),
                value: value.clone(),
                position,
            })
            .collect();
    }
    // (partition, first key, changes, bytes, last ordinal), in order of
    // first appearance; a full group is closed and a new one opened for the
    // partition, never between two halves of one key change
    type Group = (i32, Vec<u8>, Vec<crate::Change>, usize, u32);
    let mut groups: Vec<Group> = Vec::new();
    let mut open: HashMap<i32, usize> = HashMap::new();
    let numbered = transaction
        .changes
        .into_iter()
        .enumerate()
        .flat_map(|(i, c)| {
            let ordinal = ordinals.get(i).copied().unwrap_or(i as u32);
            split_key_change(c).into_iter().map(move |kc| (ordinal, kc))
        });
    for (ordinal, (key, change)) in numbered {
        let partition = partition_of(&key, partitions);
        let bytes = change.kind.approx_bytes();
        match open.get(&partition) {
            Some(&g) if groups[g].3 < RECORD_MAX_BYTES || groups[g].4 == ordinal => {
                groups[g].2.push(change);
                groups[g].3 += bytes;
                groups[g].4 = ordinal;
            }
            _ => {
                open.insert(partition, groups.len());
                groups.push((partition, key, vec![change], bytes, ordinal));
            }
        }
    }
    // a routed write's transaction ends with a marker in every partition
    // (as a heartbeat does): once each partition applied its marker, the
    // whole transaction is applied, and a reader waiting for its token need
    // not wait for the next heartbeat to move every partition on
    let markers = match (transaction.token, transaction.continues) {
        (Some(token), false) => records(
            source,
            Transaction {
                commit_lsn: transaction.commit_lsn,
                end_lsn: transaction.end_lsn,
                commit_time: transaction.commit_time,
                changes: Vec::new(),
                continues: false,
                token: Some(token),
            },
            &[],
            policy_version,
            partitions,
        ),
        _ => Vec::new(),
    };
    // whether a later record of this transaction goes to the same partition
    let more: Vec<bool> = (0..groups.len())
        .map(|g| transaction.continues || groups[g + 1..].iter().any(|l| l.0 == groups[g].0))
        .collect();
    groups
        .into_iter()
        .zip(more)
        .map(|((partition, key, changes, _, last), more)| {
            let position = Position {
                lsn: transaction.end_lsn,
                index: last,
            };
            let part = Transaction {
                commit_lsn: transaction.commit_lsn,
                end_lsn: transaction.end_lsn,
                commit_time: transaction.commit_time,
                changes,
                continues: transaction.continues,
                token: transaction.token,
            };
            let value = codec::encode(std::slice::from_ref(&part));
            let mut headers = headers(source, position, policy_version, &value);
            if more {
                headers.push((MORE, b"1".to_vec()));
            }
            Outgoing {
                key: Some(key),
                partition: Some(partition),
                headers,
                value,
                position,
            }
        })
        .chain(markers)
        .collect()
}

/// The partition of a row key: crc32 of it, modulo the partitions.
pub fn partition_of(key: &[u8], partitions: i32) -> i32 {
    (crc32fast::hash(key) % partitions.max(1) as u32) as i32
}

/// A change as (record key, change) pairs: one, or two for a key change.
fn split_key_change(change: crate::Change) -> Vec<(Vec<u8>, crate::Change)> {
    if let ChangeKind::Update {
        old: Some(old),
        new,
    } = &change.kind
    {
        let old_key = key_of(&change.table, old);
        let new_key = key_of(&change.table, new);
        if old_key != new_key && !new.contains(&Value::Unchanged) {
            let ChangeKind::Update {
                old: Some(old),
                new,
            } = change.kind
            else {
                unreachable!("matched above")
            };
            let delete = crate::Change {
                table: change.table.clone(),
                kind: ChangeKind::Delete { old },
            };
            let insert = crate::Change {
                table: change.table,
                kind: ChangeKind::Insert { new },
            };
            return vec![(old_key, delete), (new_key, insert)];
        }
        if old_key != new_key {
            // Values still unchanged here were not found at the source
            // under the new key (capture reads them back): the row has been
            // deleted or moved on since, and a later change in the new key's
            // partition settles that key. Writing the new key from the old
            // key's partition could land after that later change; so only
            // the old key's delete is sent, in the old key's order.
            let ChangeKind::Update { old: Some(old), .. } = change.kind else {
                unreachable!("matched above")
            };
            let delete = crate::Change {
                table: change.table,
                kind: ChangeKind::Delete { old },
            };
            return vec![(old_key, delete)];
        }
    }
    vec![(key(&change), change)]
}

/// `schema.table`, a zero byte, then each key value as a `u32` length and
/// its text (`u32::MAX` for NULL). The row's new key, or its old key for a
/// delete. Key values are as the policy let them cross (kept or hashed).
pub fn key(change: &crate::Change) -> Vec<u8> {
    let row = match &change.kind {
        ChangeKind::Insert { new } | ChangeKind::Update { new, .. } => new,
        ChangeKind::Delete { old } => old,
    };
    key_of(&change.table, row)
}

fn key_of(table: &Arc<crate::Table>, row: &crate::Row) -> Vec<u8> {
    let mut out = format!("{}.{}", table.schema, table.name).into_bytes();
    out.push(0);
    for i in table.key_indexes() {
        match row.get(i) {
            Some(Value::Text(v)) => {
                out.extend_from_slice(&(v.len() as u32).to_be_bytes());
                out.extend_from_slice(v.as_bytes());
            }
            _ => out.extend_from_slice(&u32::MAX.to_be_bytes()),
        }
    }
    out
}

/// A consumed record, checked and decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub position: Position,
    pub policy_version: u64,
    /// The change (or, for a heartbeat, no change) as a transaction.
    pub transaction: Transaction,
}

impl Incoming {
    pub fn is_heartbeat(&self) -> bool {
        self.position.index == HEARTBEAT_INDEX
    }
}

/// Why a consumed record cannot be applied. Never quotes a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The record is damaged or not what its headers say: it goes to the
    /// dead-letter table.
    #[error("{0}")]
    Bad(String),
    /// The record is in a format this agent does not read yet (a newer
    /// source during a rolling upgrade): the partition waits, nothing is
    /// skipped.
    #[error("{0}")]
    Version(String),
}

/// Checks and decodes a consumed record.
pub fn decode(
    headers: &[(String, Vec<u8>)],
    value: Option<&[u8]>,
    expected_origin: &str,
) -> Result<Incoming, RecordError> {
    decode_inner(headers, value, expected_origin).map_err(|e| match e {
        Failure::Version(e) => RecordError::Version(e.to_string()),
        Failure::Bad(e) => RecordError::Bad(e),
    })
}

enum Failure {
    Version(codec::CodecError),
    Bad(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Bad(s)
    }
}

impl From<&str> for Failure {
    fn from(s: &str) -> Self {
        Failure::Bad(s.to_owned())
    }
}

fn decode_inner(
    headers: &[(String, Vec<u8>)],
    value: Option<&[u8]>,
    expected_origin: &str,
) -> Result<Incoming, Failure> {
    let header = |name: &str| -> Result<&[u8], String> {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
            .ok_or_else(|| format!("header {name} missing"))
    };
    let number = |name: &str| -> Result<u64, String> {
        std::str::from_utf8(header(name)?)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("header {name} is not a decimal number"))
    };
    let origin = header(ORIGIN)?;
    if origin != expected_origin.as_bytes() {
        return Err(format!(
            "header {ORIGIN} is {:?}, but this topic carries {expected_origin}",
            String::from_utf8_lossy(origin)
        )
        .into());
    }
    let value = value.ok_or("record has no value")?;
    let crc = number(CRC32)?;
    if u64::from(codec::checksum(value)) != crc {
        return Err("crc32 mismatch: the value is not what the source produced".into());
    }
    let position = Position {
        lsn: Lsn(number(LSN)?),
        index: u32::try_from(number(INDEX)?).map_err(|_| format!("header {INDEX} out of range"))?,
    };
    let policy_version = number(POLICY_VERSION)?;
    let mut transactions = codec::decode(value).map_err(|e| match e {
        codec::CodecError::Version(_) => Failure::Version(e),
        e => Failure::Bad(format!("undecodable value: {e}")),
    })?;
    if transactions.len() != 1 {
        return Err(format!(
            "value holds {} transactions; a record carries one",
            transactions.len()
        )
        .into());
    }
    let transaction = transactions.remove(0);
    let heartbeat = position.index == HEARTBEAT_INDEX;
    if heartbeat != transaction.changes.is_empty() || transaction.end_lsn != position.lsn {
        return Err("value does not match its headers (position or change count)".into());
    }
    Ok(Incoming {
        position,
        policy_version,
        transaction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Change, Column, Table};

    fn table() -> Arc<Table> {
        Arc::new(Table {
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
        })
    }

    fn transaction(changes: Vec<Change>) -> Transaction {
        Transaction {
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x108),
            commit_time: 7,
            changes,
            continues: false,
            token: None,
        }
    }

    fn insert(id: &str) -> Change {
        Change {
            table: table(),
            kind: ChangeKind::Insert {
                new: vec![Value::Text(id.into()), Value::Text("secret note".into())],
            },
        }
    }

    type Headers = Vec<(String, Vec<u8>)>;

    fn consumed(r: &Outgoing) -> Headers {
        r.headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn one_record_per_partition_with_the_rows_of_that_partition_in_order() {
        let ids: Vec<String> = (0..40).map(|i| i.to_string()).collect();
        let mut changes: Vec<Change> = ids.iter().map(|id| insert(id)).collect();
        changes.push(insert("7")); // a second change of row 7
        let t = transaction(changes.clone());
        let out = records("eu", t, &[], 3, 4);
        assert_eq!(out.len(), 4, "40 rows over 4 partitions");
        let mut seen = Vec::new();
        for r in &out {
            let back = decode(&consumed(r), Some(&r.value), "eu").unwrap();
            // indexed by the place of the record's last change in the input
            let last = changes
                .iter()
                .rposition(|c| Some(partition_of(&key(c), 4)) == r.partition)
                .unwrap();
            assert_eq!(
                back.position,
                Position {
                    lsn: Lsn(0x108),
                    index: last as u32
                }
            );
            assert_eq!(back.policy_version, 3);
            assert!(!back.is_heartbeat());
            for c in &back.transaction.changes {
                // every row of a record belongs to the record's partition
                assert_eq!(Some(partition_of(&key(c), 4)), r.partition);
                seen.push(c.clone());
            }
            assert!(r.key.as_ref().unwrap().starts_with(b"public.orders\0"));
        }
        // nothing lost, nothing added, and row 7's two changes in order
        assert_eq!(seen.len(), changes.len());
        let sevens = seen.iter().filter(|c| key(c) == key(&insert("7"))).count();
        assert_eq!(sevens, 2);
    }

    #[test]
    fn a_routed_writes_transaction_ends_with_a_marker_in_every_partition() {
        let tagged = |continues| Transaction {
            token: Some(42),
            continues,
            ..transaction(vec![insert("1"), insert("2")])
        };
        let out = records("eu", tagged(false), &[], 1, 4);
        let (parts, markers) = out.split_at(out.len() - 4);
        assert!(!parts.is_empty());
        let mut partitions: Vec<i32> = markers.iter().filter_map(|m| m.partition).collect();
        partitions.sort();
        assert_eq!(partitions, vec![0, 1, 2, 3]);
        for m in markers {
            let back = decode(&consumed(m), Some(&m.value), "eu").unwrap();
            assert!(back.is_heartbeat());
            assert_eq!(back.position.lsn, Lsn(0x108));
            assert_eq!(back.transaction.token, Some(42));
        }
        for p in parts {
            let back = decode(&consumed(p), Some(&p.value), "eu").unwrap();
            assert!(back.position < markers[0].position, "parts come first");
        }
        // a fragment that continues carries no marker; untagged ones neither
        assert!(
            records("eu", tagged(true), &[], 1, 4)
                .iter()
                .all(|r| r.key.is_some())
        );
        let plain = records("eu", transaction(vec![insert("1")]), &[], 1, 4);
        assert_eq!(plain.len(), 1);
    }

    #[test]
    fn a_key_change_is_a_delete_of_the_old_key_and_an_insert_of_the_new_row() {
        let row = |id: &str, note: Value| vec![Value::Text(id.into()), note];
        let moved = Change {
            table: table(),
            kind: ChangeKind::Update {
                old: Some(row("1", Value::Null)),
                new: row("2", Value::Text("n".into())),
            },
        };
        // 1 partition: one record, in order: insert 1, delete 1, insert 2
        let out = records(
            "eu",
            transaction(vec![insert("1"), moved.clone()]),
            &[],
            0,
            1,
        );
        let kinds: Vec<ChangeKind> = decode(&consumed(&out[0]), Some(&out[0].value), "eu")
            .unwrap()
            .transaction
            .changes
            .into_iter()
            .map(|c| c.kind)
            .collect();
        assert_eq!(kinds.len(), 3);
        assert!(
            matches!(&kinds[1], ChangeKind::Delete { old } if old[0] == Value::Text("1".into()))
        );
        assert!(
            matches!(&kinds[2], ChangeKind::Insert { new } if new[0] == Value::Text("2".into()))
        );
        // many partitions: the delete goes where key 1 lives, the insert where key 2 does
        let out = records("eu", transaction(vec![moved]), &[], 0, 64);
        let partition_1 = partition_of(&key(&insert("1")), 64);
        let partition_2 = partition_of(&key(&insert("2")), 64);
        assert_ne!(partition_1, partition_2, "keys on different partitions");
        let delete = out
            .iter()
            .find(|r| r.partition == Some(partition_1))
            .unwrap();
        let back = decode(&consumed(delete), Some(&delete.value), "eu").unwrap();
        assert!(matches!(
            back.transaction.changes[0].kind,
            ChangeKind::Delete { .. }
        ));
        assert!(out.iter().any(|r| r.partition == Some(partition_2)));

        // a key change whose unchanged TOAST values the source no longer
        // has (the row moved on or was deleted since): only the old key's
        // delete, in the old key's partition; a later change settles the new
        let toasted = Change {
            table: table(),
            kind: ChangeKind::Update {
                old: Some(row("1", Value::Null)),
                new: row("2", Value::Unchanged),
            },
        };
        let out = records("eu", transaction(vec![toasted]), &[], 0, 64);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].partition, Some(partition_1), "with the old row");
        let back = decode(&consumed(&out[0]), Some(&out[0].value), "eu").unwrap();
        assert!(matches!(
            back.transaction.changes[0].kind,
            ChangeKind::Delete { .. }
        ));
        // a full-identity update that keeps its key stays one change
        let same_key = Change {
            table: table(),
            kind: ChangeKind::Update {
                old: Some(row("1", Value::Text("old".into()))),
                new: row("1", Value::Text("new".into())),
            },
        };
        let out = records("eu", transaction(vec![same_key]), &[], 0, 4);
        let back = decode(&consumed(&out[0]), Some(&out[0].value), "eu").unwrap();
        assert_eq!(back.transaction.changes.len(), 1);
    }

    /// A fragment the policy emptied makes no record (as a heartbeat at
    /// commit + 1 it would hide the fragments after it).
    #[test]
    fn an_emptied_fragment_makes_no_record() {
        let mut t = transaction(vec![]);
        t.continues = true;
        assert!(records("eu", t, &[], 0, 4).is_empty());
    }

    #[test]
    fn heartbeats_go_to_every_partition() {
        let out = records("na", transaction(vec![]), &[], 0, 3);
        let partitions: Vec<Option<i32>> = out.iter().map(|r| r.partition).collect();
        assert_eq!(partitions, vec![Some(0), Some(1), Some(2)]);
        let back = decode(&consumed(&out[1]), Some(&out[1].value), "na").unwrap();
        assert!(back.is_heartbeat() && back.transaction.changes.is_empty());
        assert!(
            Position {
                lsn: Lsn(0x108),
                index: 5
            } < back.position
        );
    }

    #[test]
    fn bad_records_are_explained_without_their_values() {
        let r = &records("eu", transaction(vec![insert("1")]), &[], 1, 4)[0];
        let headers = consumed(r);
        let mut flipped = r.value.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0xff;
        let cases: Vec<(Headers, Option<Vec<u8>>, &str)> = vec![
            (headers.clone(), Some(flipped), "crc32 mismatch"),
            (headers.clone(), None, "no value"),
            (
                headers.iter().filter(|(n, _)| n != LSN).cloned().collect(),
                Some(r.value.clone()),
                "header meridian-lsn missing",
            ),
            (
                headers
                    .iter()
                    .map(|(n, v)| {
                        (
                            n.clone(),
                            if n == ORIGIN {
                                b"na".to_vec()
                            } else {
                                v.clone()
                            },
                        )
                    })
                    .collect(),
                Some(r.value.clone()),
                "carries eu",
            ),
        ];
        for (h, value, expected) in cases {
            let e = decode(&h, value.as_deref(), "eu").unwrap_err().to_string();
            assert!(e.contains(expected), "{expected}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
        let garbage = b"not a batch".to_vec();
        let mut h = headers.clone();
        for (n, v) in &mut h {
            if n == CRC32 {
                *v = codec::checksum(&garbage).to_string().into_bytes();
            }
        }
        let e = decode(&h, Some(&garbage), "eu").unwrap_err();
        assert!(
            matches!(&e, RecordError::Bad(m) if m.starts_with("undecodable value")),
            "{e}"
        );
        // a newer format is not damage: the partition waits for an upgrade
        let mut newer = r.value.clone();
        newer[2] = 9; // after the two magic bytes
        let mut h = headers.clone();
        for (n, v) in &mut h {
            if n == CRC32 {
                *v = codec::checksum(&newer).to_string().into_bytes();
            }
        }
        let e = decode(&h, Some(&newer), "eu").unwrap_err();
        assert!(
            matches!(&e, RecordError::Version(m) if m.contains("version 9")),
            "{e}"
        );
    }

    /// A partition's share of a large transaction is split over several
    /// records with increasing positions, none far above the record limit.
    #[test]
    fn a_large_share_is_split_over_bounded_records() {
        let big = "x".repeat(100_000);
        let changes: Vec<Change> = (0..20)
            .map(|i| Change {
                table: table(),
                kind: ChangeKind::Insert {
                    new: vec![Value::Text(i.to_string()), Value::Text(big.clone())],
                },
            })
            .collect();
        let ordinals: Vec<u32> = (7..27).collect();
        let out = records("eu", transaction(changes), &ordinals, 0, 1);
        assert!(out.len() >= 4, "{}", out.len());
        assert!(
            out.iter()
                .all(|r| r.value.len() < RECORD_MAX_BYTES + 200_000)
        );
        // each record is indexed by its last change's ordinal
        let indexes: Vec<u32> = out.iter().map(|r| r.position.index).collect();
        assert!(indexes.windows(2).all(|w| w[0] < w[1]), "{indexes:?}");
        assert_eq!(indexes.last(), Some(&26));
        // every record but the last says more of its transaction follows
        let more: Vec<bool> = out
            .iter()
            .map(|r| r.headers.iter().any(|(k, v)| *k == MORE && v == b"1"))
            .collect();
        assert!(more[..more.len() - 1].iter().all(|m| *m), "{more:?}");
        assert!(!more[more.len() - 1], "{more:?}");
        // a fragment's records all say more follows
        let mut fragment = transaction(vec![Change {
            table: table(),
            kind: ChangeKind::Insert {
                new: vec![Value::Text("1".into()), Value::Null],
            },
        }]);
        fragment.continues = true;
        let out = records("eu", fragment, &[], 0, 1);
        assert!(
            out.iter()
                .all(|r| r.headers.iter().any(|(k, _)| *k == MORE))
        );
    }
}
