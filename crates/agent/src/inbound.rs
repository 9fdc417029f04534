//! What to do with what arrived, for both transports: pure decisions, so
//! the no-gap rules are tested as values. The gRPC receiver and the Kafka
//! partitions only carry out the verdicts (apply, reply, record).
//!
//! - A damaged batch in transit (crc32 mismatch) is refused: the source
//!   resends it. A damaged Kafka record is set aside: the broker holds no
//!   better copy.
//! - A batch or record in a format this agent does not read yet is refused
//!   and waits for the upgrade; nothing is skipped.
//! - Bytes that pass their crc32 but do not decode are set aside, their
//!   payload kept only without a residency policy (what cannot be decoded
//!   cannot be checked).
//! - Anything the residency policy forbids here is refused whole.
//! - A Kafka record at or below the partition's stored position is a replay
//!   and skipped.

use std::sync::Arc;

use crate::wire;
use meridian_core::pgoutput::Keys;
use meridian_core::record::{self, Incoming, Position, RecordError};
use meridian_core::{Transaction, codec};
use meridian_policy::Enforcer;

/// What arrived is forbidden by this region's residency policy.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Forbidden {
    /// The reason, without values.
    pub reason: String,
    pub receiver_version: u64,
}

/// The fate of one gRPC batch.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BatchVerdict {
    Apply(Vec<Transaction>),
    /// Nack it and end the stream: the source starts again from the
    /// watermark. `kind` labels the error metric.
    Refuse {
        reason: String,
        kind: &'static str,
        forbidden: Option<Forbidden>,
    },
    /// Set it aside in the dead letters and move on.
    DeadLetter {
        reason: String,
        keep_payload: bool,
    },
}

/// Judges a batch's payload (compressed as `compression` says) against its
/// crc32 and the residency policy.
pub(crate) fn judge_batch(
    (payload, compression): (&[u8], &str),
    crc32: u32,
    source: &str,
    destination: &str,
    policy: Option<&Enforcer>,
) -> BatchVerdict {
    if codec::checksum(payload) != crc32 {
        return BatchVerdict::Refuse {
            reason: "crc32 mismatch".into(),
            kind: "crc_mismatch",
            forbidden: None,
        };
    }
    let payload = match wire::decompress(compression, payload, crate::MAX_MESSAGE_BYTES) {
        Ok(p) => p,
        Err(wire::Unreadable::Unknown(reason)) => {
            return BatchVerdict::Refuse {
                reason,
                kind: "version",
                forbidden: None,
            };
        }
        Err(wire::Unreadable::Damaged(reason)) => {
            return BatchVerdict::Refuse {
                reason,
                kind: "undecodable",
                forbidden: None,
            };
        }
    };
    match codec::decode(&payload) {
        Ok(transactions) => match forbidden(&transactions, source, destination, policy) {
            Some(f) => BatchVerdict::Refuse {
                reason: f.reason.clone(),
                kind: "policy_violation",
                forbidden: Some(f),
            },
            None => BatchVerdict::Apply(transactions),
        },
        Err(e @ codec::CodecError::Version(_)) => BatchVerdict::Refuse {
            reason: e.to_string(),
            kind: "version",
            forbidden: None,
        },
        Err(e) => match policy {
            Some(_) => BatchVerdict::DeadLetter {
                reason: format!(
                    "undecodable batch: {e}; payload not kept (it cannot be checked against the residency policy)"
                ),
                keep_payload: false,
            },
            None => BatchVerdict::DeadLetter {
                reason: format!("undecodable batch: {e}"),
                keep_payload: true,
            },
        },
    }
}

/// The fate of one Kafka record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecordVerdict {
    Apply(Incoming),
    /// At or below the partition's position: applied before.
    Skip,
    /// Filtered by the sender under an older policy that this receiver's
    /// (newer, stricter) policy forbids: applied in the form the receiver's
    /// policy allows, and recorded as a violation. The record's forbidden
    /// values never reach the store, and the partition does not wait for
    /// policies to agree (records in a topic cannot be filtered again at
    /// the source).
    Refiltered {
        incoming: Incoming,
        forbidden: Forbidden,
    },
    /// Stop the partition at this record until the cause goes away (a newer
    /// format, a policy that forbids it).
    Refuse {
        reason: String,
        kind: &'static str,
        forbidden: Option<(Forbidden, Incoming)>,
    },
    /// Damaged: set aside and move on.
    DeadLetter {
        reason: String,
        keep_payload: bool,
    },
}

/// Judges a consumed record against the partition's stored position and
/// the residency policy.
pub(crate) fn judge_record(
    headers: &[(String, Vec<u8>)],
    value: Option<&[u8]>,
    source: &str,
    destination: &str,
    stored: Position,
    policy: Option<&Enforcer>,
) -> RecordVerdict {
    let incoming = match record::decode(headers, value, source) {
        Ok(incoming) => incoming,
        Err(RecordError::Version(reason)) => {
            return RecordVerdict::Refuse {
                reason,
                kind: "version",
                forbidden: None,
            };
        }
        Err(RecordError::Bad(reason)) => {
            return RecordVerdict::DeadLetter {
                reason,
                keep_payload: policy.is_none(),
            };
        }
    };
    if incoming.position <= stored {
        return RecordVerdict::Skip;
    }
    match forbidden(
        std::slice::from_ref(&incoming.transaction),
        source,
        destination,
        policy,
    ) {
        Some(f) if incoming.policy_version < f.receiver_version => {
            let policy = policy.expect("a violation needs a policy");
            let (mut out, _) = policy.filter(
                source,
                destination,
                std::slice::from_ref(&incoming.transaction),
            );
            let transaction = out.pop().expect("one transaction in, one out");
            match policy.check(source, destination, std::slice::from_ref(&transaction)) {
                Ok(()) => RecordVerdict::Refiltered {
                    incoming: Incoming {
                        transaction,
                        ..incoming
                    },
                    forbidden: f,
                },
                Err(_) => RecordVerdict::Refuse {
                    reason: f.reason.clone(),
                    kind: "policy_violation",
                    forbidden: Some((f, incoming)),
                },
            }
        }
        Some(f) => RecordVerdict::Refuse {
            reason: f.reason.clone(),
            kind: "policy_violation",
            forbidden: Some((f, incoming)),
        },
        None => RecordVerdict::Apply(incoming),
    }
}

/// What a peer sent that this region's own topology does not allow it to
/// write, whatever the peer's credentials: a table the topology does not
/// replicate (`meridian.*`, or anything else), or key columns other than
/// the table's primary key in the topology (apply deletes and matches rows
/// by them). The reason names tables and columns, never values.
pub(crate) fn outside_topology(transactions: &[Transaction], keys: &Keys) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    for change in transactions.iter().flat_map(|t| &t.changes) {
        let table = &change.table;
        if !seen.insert(Arc::as_ptr(table)) {
            continue;
        }
        let name = format!("{}.{}", table.schema, table.name);
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
            return Some(format!(
                "table {name}: the batch marks {sent:?} as its key columns, this region's topology says {wanted:?}; nothing of the batch was written"
            ));
        }
    }
    None
}

/// A batch verdict, refused (the stream ends, nothing skipped) if it would
/// write outside the topology ([`outside_topology`]).
pub(crate) fn batch_within(verdict: BatchVerdict, keys: &Keys) -> BatchVerdict {
    match verdict {
        BatchVerdict::Apply(t) => match outside_topology(&t, keys) {
            Some(reason) => BatchVerdict::Refuse {
                reason,
                kind: "not_in_topology",
                forbidden: None,
            },
            None => BatchVerdict::Apply(t),
        },
        other => other,
    }
}

/// A record verdict, refused (the partition waits) if it would write
/// outside the topology ([`outside_topology`]).
pub(crate) fn record_within(verdict: RecordVerdict, keys: &Keys) -> RecordVerdict {
    let transaction = match &verdict {
        RecordVerdict::Apply(incoming) | RecordVerdict::Refiltered { incoming, .. } => {
            &incoming.transaction
        }
        _ => return verdict,
    };
    match outside_topology(std::slice::from_ref(transaction), keys) {
        Some(reason) => RecordVerdict::Refuse {
            reason,
            kind: "not_in_topology",
            forbidden: None,
        },
        None => verdict,
    }
}

fn forbidden(
    transactions: &[Transaction],
    source: &str,
    destination: &str,
    policy: Option<&Enforcer>,
) -> Option<Forbidden> {
    let policy = policy?;
    let violation = policy.check(source, destination, transactions).err()?;
    Some(Forbidden {
        reason: format!("residency policy violation: {violation}"),
        receiver_version: policy.version(),
    })
}

#[cfg(test)]
mod tests {

    use super::*;
    use meridian_core::change::{Change, ChangeKind, Column, Table, Value};
    use meridian_core::{Lsn, Transaction};
    use meridian_policy::Policy;
    use meridian_policy::file::Context;

    fn transaction(email: &str) -> Transaction {
        let table = Arc::new(Table {
            schema: "public".into(),
            name: "orders".into(),
            columns: ["id", "region", "email"]
                .iter()
                .map(|n| Column {
                    name: (*n).into(),
                    type_oid: 25,
                    key: *n == "id",
                })
                .collect(),
        });
        Transaction {
            commit_lsn: Lsn(0x100),
            end_lsn: Lsn(0x108),
            commit_time: 0,
            changes: vec![Change {
                table,
                kind: ChangeKind::Insert {
                    new: vec![
                        Value::Text("1".into()),
                        Value::Text("eu".into()),
                        Value::Text(email.into()),
                    ],
                },
            }],
            continues: false,
            token: None,
        }
    }

    /// eu orders reach na without their email.
    fn policy() -> Enforcer {
        let regions = ["na".to_owned(), "eu".to_owned()];
        let tables = [(
            "public.orders".to_owned(),
            vec!["id".to_owned()],
            "region".to_owned(),
        )];
        let context = Context {
            regions: &regions,
            tables: &tables,
            has_hash_key: false,
        };
        let policy = Policy::parse(
            r#"version = 3
[[rules]]
table = "public.orders"
from = ["eu"]
to = ["na"]
columns = { id = "keep", region = "keep" }"#,
            "policy.toml",
            &context,
        )
        .expect("valid policy");
        Enforcer::new(policy, None, &[("public.orders".into(), "region".into())])
    }

    #[test]
    fn batches_damaged_newer_undecodable_forbidden_and_good() {
        let good = codec::encode(&[transaction("a@example.com")]);
        let crc = codec::checksum(&good);
        let p = policy();
        assert!(matches!(
            judge_batch((&good, ""), crc ^ 1, "eu", "na", None),
            BatchVerdict::Refuse {
                kind: "crc_mismatch",
                ..
            }
        ));
        let mut newer = good.clone();
        newer[2] = 9;
        let verdict = judge_batch((&newer, ""), codec::checksum(&newer), "eu", "na", None);
        assert!(
            matches!(
                verdict,
                BatchVerdict::Refuse {
                    kind: "version",
                    ..
                }
            ),
            "{verdict:?}"
        );
        // compressed: the same verdicts once decompressed; an unknown
        // compression is refused like a newer format, and so are bytes that
        // do not decompress (the sender made them: nothing is skipped)
        let packed = wire::compress(&good);
        assert!(matches!(
            judge_batch((&packed, wire::ZSTD), codec::checksum(&packed), "eu", "na", None),
            BatchVerdict::Apply(t) if t == vec![transaction("a@example.com")]
        ));
        assert!(matches!(
            judge_batch((&packed, "lz9"), codec::checksum(&packed), "eu", "na", None),
            BatchVerdict::Refuse {
                kind: "version",
                ..
            }
        ));
        assert!(matches!(
            judge_batch((&good, wire::ZSTD), crc, "eu", "na", None),
            BatchVerdict::Refuse {
                kind: "undecodable",
                ..
            }
        ));
        let garbage = b"MB\x01garbage".to_vec();
        let crc_g = codec::checksum(&garbage);
        assert!(matches!(
            judge_batch((&garbage, ""), crc_g, "eu", "na", None),
            BatchVerdict::DeadLetter {
                keep_payload: true,
                ..
            }
        ));
        assert!(matches!(
            judge_batch((&garbage, ""), crc_g, "eu", "na", Some(&p)),
            BatchVerdict::DeadLetter {
                keep_payload: false,
                ..
            }
        ));
        // the email is forbidden in na: refused whole, no value in the reason
        match judge_batch((&good, ""), crc, "eu", "na", Some(&p)) {
            BatchVerdict::Refuse {
                kind: "policy_violation",
                reason,
                forbidden: Some(f),
            } => {
                assert_eq!(f.receiver_version, 3);
                assert!(!reason.contains("a@example.com"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        let trimmed = codec::encode(&p.filter("eu", "na", &[transaction("a@example.com")]).0);
        let verdict = judge_batch(
            (&trimmed, ""),
            codec::checksum(&trimmed),
            "eu",
            "na",
            Some(&p),
        );
        assert!(
            matches!(verdict, BatchVerdict::Apply(ref t) if t.len() == 1),
            "{verdict:?}"
        );
    }

    #[test]
    fn records_replayed_damaged_newer_forbidden_and_good() {
        let out = record::records("eu", transaction("a@example.com"), &[], 3, 1).remove(0);
        let headers: Vec<(String, Vec<u8>)> = out
            .headers
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect();
        let before = Position {
            lsn: Lsn(0x100),
            index: 0,
        };
        let judge = |value: &[u8], stored, policy| {
            judge_record(&headers, Some(value), "eu", "na", stored, policy)
        };
        assert!(matches!(
            judge(&out.value, before, None),
            RecordVerdict::Apply(_)
        ));
        assert_eq!(judge(&out.value, out.position, None), RecordVerdict::Skip);
        let p = policy();
        assert!(matches!(
            judge(&out.value, before, Some(&p)),
            RecordVerdict::Refuse {
                kind: "policy_violation",
                forbidden: Some(_),
                ..
            }
        ));
        let mut damaged = out.value.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(matches!(
            judge(&damaged, before, Some(&p)),
            RecordVerdict::DeadLetter {
                keep_payload: false,
                ..
            }
        ));
        // a newer format (with its own valid crc32) waits for the upgrade
        let mut newer = out.value.clone();
        newer[2] = 9;
        let headers_newer: Vec<(String, Vec<u8>)> = headers
            .iter()
            .map(|(k, v)| {
                if k == record::CRC32 {
                    (k.clone(), codec::checksum(&newer).to_string().into_bytes())
                } else {
                    (k.clone(), v.clone())
                }
            })
            .collect();
        assert!(matches!(
            judge_record(&headers_newer, Some(&newer), "eu", "na", before, None),
            RecordVerdict::Refuse {
                kind: "version",
                ..
            }
        ));
    }

    /// Only the topology's tables, keyed by the topology's key columns, may
    /// be written, whatever a peer marks.
    #[test]
    fn a_peer_cannot_choose_tables_or_key_columns() {
        let keys: Keys = [(
            ("public".to_owned(), "orders".to_owned()),
            vec!["id".to_owned()],
        )]
        .into_iter()
        .collect();
        let good = transaction("a@example.com");
        assert_eq!(outside_topology(std::slice::from_ref(&good), &keys), None);

        let mut elsewhere = good.clone();
        let mut table = (*elsewhere.changes[0].table).clone();
        table.schema = "meridian".into();
        table.name = "watermarks".into();
        elsewhere.changes[0].table = Arc::new(table);
        let e = outside_topology(&[good.clone(), elsewhere], &keys).unwrap();
        assert!(
            e.contains("\"meridian.watermarks\" is not replicated"),
            "{e}"
        );

        // a delete keyed by the home column alone would match every row of a region
        let mut rekeyed = good.clone();
        let mut table = (*rekeyed.changes[0].table).clone();
        for c in &mut table.columns {
            c.key = c.name == "region";
        }
        rekeyed.changes[0].table = Arc::new(table);
        let e = outside_topology(&[rekeyed], &keys).unwrap();
        assert!(
            e.contains(r#"marks ["region"]"#) && e.contains(r#"says ["id"]"#),
            "{e}"
        );
        assert!(!e.contains("a@example.com"));
    }
}
