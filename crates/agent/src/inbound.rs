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

use crate::wire;
use meridian_core::pgoutput::Keys;
use meridian_core::record::{self, Incoming, Position, RecordError};
use meridian_core::scope::outside_topology;
use meridian_core::{Lsn, Transaction, codec};
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

/// Judges a batch's payload (compressed as `compression` says, at most
/// `limit` bytes decompressed) against its crc32, the topology and the
/// residency policy.
pub(crate) fn judge_batch(
    (payload, compression): (&[u8], &str),
    crc32: u32,
    source: &str,
    destination: &str,
    policy: Option<&Enforcer>,
    keys: &Keys,
    limit: usize,
) -> BatchVerdict {
    if codec::checksum(payload) != crc32 {
        return BatchVerdict::Refuse {
            reason: "crc32 mismatch".into(),
            kind: "crc_mismatch",
            forbidden: None,
        };
    }
    let payload = match wire::decompress(compression, payload, limit) {
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
    // decoded rows as the sender counts them stay within what a message
    // may carry, whatever NULLs the bytes pack
    match codec::decode_within(&payload, limit) {
        Ok(transactions) => {
            if let Some(reason) = outside_topology(&transactions, keys) {
                return BatchVerdict::Refuse {
                    reason,
                    kind: "not_in_topology",
                    forbidden: None,
                };
            }
            match forbidden(&transactions, source, destination, policy) {
                Some(f) => BatchVerdict::Refuse {
                    reason: f.reason.clone(),
                    kind: "policy_violation",
                    forbidden: Some(f),
                },
                None => BatchVerdict::Apply(transactions),
            }
        }
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

/// The verdict on a batch once its claims are weighed: damage stays a crc
/// mismatch; claims that do not hold ([`codec::Claims::refusal`]) refuse the
/// batch whatever its payload; a sealed batch stays within its WAL end
/// ([`within_wal_end`]); an unsealed one is never set aside ([`unsealed`]).
pub(crate) fn judge_claims(
    verdict: BatchVerdict,
    claims: &codec::Claims,
    seal: Option<u32>,
) -> BatchVerdict {
    if matches!(
        verdict,
        BatchVerdict::Refuse {
            kind: "crc_mismatch",
            ..
        }
    ) {
        return verdict;
    }
    if let Some(reason) = claims.refusal(seal) {
        return BatchVerdict::Refuse {
            reason,
            kind: "unproven",
            forbidden: None,
        };
    }
    match seal {
        Some(_) => within_wal_end(verdict, claims.source_wal_end),
        None => unsealed(verdict),
    }
}

/// A batch to apply whose payload holds a transaction past the source's
/// WAL end (as the sealed batch states it) is refused instead: the
/// watermark only moves to positions the source has written.
fn within_wal_end(verdict: BatchVerdict, wal_end: u64) -> BatchVerdict {
    match verdict {
        BatchVerdict::Apply(transactions) => {
            match transactions.iter().find(|t| t.end_lsn.0 > wal_end) {
                Some(t) => BatchVerdict::Refuse {
                    reason: format!(
                        "the batch holds a transaction ending at {}, past the source's WAL end {} when it was sent",
                        t.end_lsn,
                        Lsn(wal_end)
                    ),
                    kind: "unproven",
                    forbidden: None,
                },
                None => BatchVerdict::Apply(transactions),
            }
        }
        other => other,
    }
}

/// An unsealed batch (from an agent older than seals) that cannot be read
/// is refused, not set aside: its position is not proven, so the watermark
/// must not move to it.
fn unsealed(verdict: BatchVerdict) -> BatchVerdict {
    match verdict {
        BatchVerdict::DeadLetter { reason, .. } => BatchVerdict::Refuse {
            reason: format!(
                "{reason}; the batch carries no seal, so its position is not proven and it is not set aside"
            ),
            kind: "undecodable",
            forbidden: None,
        },
        other => other,
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
    keys: &Keys,
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
    if let Some(reason) = outside_topology(std::slice::from_ref(&incoming.transaction), keys) {
        return RecordVerdict::Refuse {
            reason,
            kind: "not_in_topology",
            forbidden: None,
        };
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

    use std::sync::Arc;

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
    fn sealed_batches_stay_within_the_wal_end_and_unsealed_ones_are_never_set_aside() {
        let t = transaction("a@example.com"); // ends at 0/108
        let verdict = within_wal_end(BatchVerdict::Apply(vec![t.clone()]), 0x107);
        match verdict {
            BatchVerdict::Refuse {
                kind: "unproven",
                reason,
                ..
            } => assert!(
                reason.contains("ending at 0/108, past the source's WAL end 0/107"),
                "{reason}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            within_wal_end(BatchVerdict::Apply(vec![t.clone()]), 0x108),
            BatchVerdict::Apply(vec![t.clone()])
        );
        let garbage = b"MB\x01garbage".to_vec();
        let verdict = unsealed(judge_batch(
            (&garbage, ""),
            codec::checksum(&garbage),
            "eu",
            "na",
            None,
        ));
        assert!(
            matches!(
                verdict,
                BatchVerdict::Refuse {
                    kind: "undecodable",
                    ..
                }
            ),
            "{verdict:?}"
        );
        assert_eq!(
            unsealed(BatchVerdict::Apply(vec![t.clone()])),
            BatchVerdict::Apply(vec![t.clone()])
        );
        // damage is damage, whatever the claims; then the claims decide
        let claims = codec::Claims {
            crc32: 1,
            seq: 1,
            end_lsn: 0x108,
            source_wal_end: 0x108,
            compression: "",
            policy_version: 0,
            incarnation: "0c2f",
        };
        let damaged = judge_batch((&garbage, ""), 0, "eu", "na", None);
        assert!(matches!(
            judge_claims(damaged, &claims, Some(0)),
            BatchVerdict::Refuse {
                kind: "crc_mismatch",
                ..
            }
        ));
        assert!(matches!(
            judge_claims(BatchVerdict::Apply(vec![t.clone()]), &claims, Some(0)),
            BatchVerdict::Refuse {
                kind: "unproven",
                ..
            }
        ));
        assert_eq!(
            judge_claims(
                BatchVerdict::Apply(vec![t.clone()]),
                &claims,
                Some(claims.seal())
            ),
            BatchVerdict::Apply(vec![t])
        );
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

    /// The tests' region replicates `public.orders`, keyed by `id`.
    fn orders_by_id() -> Keys {
        [(
            ("public".to_owned(), "orders".to_owned()),
            vec!["id".to_owned()],
        )]
        .into_iter()
        .collect()
    }

    fn judge_batch(
        payload: (&[u8], &str),
        crc32: u32,
        source: &str,
        destination: &str,
        policy: Option<&Enforcer>,
    ) -> BatchVerdict {
        super::judge_batch(
            payload,
            crc32,
            source,
            destination,
            policy,
            &orders_by_id(),
            1 << 20,
        )
    }

    fn judge_record(
        headers: &[(String, Vec<u8>)],
        value: Option<&[u8]>,
        source: &str,
        destination: &str,
        stored: Position,
        policy: Option<&Enforcer>,
    ) -> RecordVerdict {
        super::judge_record(
            headers,
            value,
            source,
            destination,
            stored,
            policy,
            &orders_by_id(),
        )
    }

    /// What lies outside the topology is refused before the policy looks
    /// at it, so it is named (and counted) as such.
    #[test]
    fn the_topology_is_checked_before_the_policy() {
        let mut t = transaction("a@example.com");
        let mut table = (*t.changes[0].table).clone();
        table.name = "x".repeat(200);
        t.changes[0].table = Arc::new(table);
        let payload = codec::encode(&[t]);
        let p = policy();
        match judge_batch(
            (&payload, ""),
            codec::checksum(&payload),
            "eu",
            "na",
            Some(&p),
        ) {
            BatchVerdict::Refuse { kind, reason, .. } => {
                assert_eq!(kind, "not_in_topology");
                assert!(reason.len() < 200, "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }
}
