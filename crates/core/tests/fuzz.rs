//! What a broken or hostile peer could hand the decoders and parsers:
//! random bytes, and valid inputs with bytes flipped, cut or inserted. None
//! may panic, and none may allocate more than a small multiple of what it
//! was given (no allocation sized by a length field before it is checked).
//!
//! Cases per target: `MERIDIAN_FUZZ_CASES` (default 300, seconds in all).
//! The long run:
//!
//! ```sh
//! MERIDIAN_FUZZ_CASES=2000000 cargo test --release -p meridian-core --test fuzz -- --nocapture
//! ```
//!
//! The targets run one after another in one test: the allocation counter
//! is process-wide.

use std::alloc::System;
use std::sync::Arc;

use meridian_core::change::{Change, ChangeKind, Column, Table, Value};
use meridian_core::pgoutput::Decoder;
use meridian_core::topology::Topology;
use meridian_core::{Lsn, Transaction, codec, record};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn cases() -> u32 {
    std::env::var("MERIDIAN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

/// Runs `f` on `input` and checks what it allocated: at most 64 bytes per
/// input byte plus 64 KiB.
fn bounded<T>(what: &str, input_len: usize, f: impl FnOnce() -> T) -> Result<T, TestCaseError> {
    let region = Region::new(GLOBAL);
    let out = f();
    let allocated = region.change().bytes_allocated;
    let limit = 64 * input_len + (64 << 10);
    prop_assert!(
        allocated <= limit,
        "{what}: {allocated} bytes allocated for {input_len} bytes of input"
    );
    Ok(out)
}

/// A valid input, then a few random edits.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let len = seed.len().max(1);
    proptest::collection::vec((0..len, any::<u8>(), 0u8..4), 0..8).prop_map(move |edits| {
        let mut bytes = seed.clone();
        for (at, byte, how) in edits {
            let at = at.min(bytes.len());
            match how {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ => bytes.truncate(at),
            }
        }
        bytes
    })
}

fn bytes_or_mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..2048),
        mutated(seed),
    ]
}

fn sample() -> Vec<Transaction> {
    let table = Arc::new(Table {
        schema: "public".into(),
        name: "orders".into(),
        columns: ["id", "region", "note"]
            .iter()
            .map(|n| Column {
                name: (*n).into(),
                type_oid: 25,
                key: *n == "id",
            })
            .collect(),
    });
    let row = |id: &str| {
        vec![
            Value::Text(id.into()),
            Value::Text("eu".into()),
            Value::Null,
        ]
    };
    vec![Transaction {
        commit_lsn: Lsn(0x100),
        end_lsn: Lsn(0x108),
        commit_time: 7,
        changes: vec![
            Change {
                table: table.clone(),
                kind: ChangeKind::Insert { new: row("1") },
            },
            Change {
                table: table.clone(),
                kind: ChangeKind::Update {
                    old: Some(row("1")),
                    new: row("2"),
                },
            },
            Change {
                table,
                kind: ChangeKind::Delete { old: row("2") },
            },
        ],
        continues: false,
        token: Some(42),
    }]
}

fn batch_codec(runner: &mut TestRunner) {
    let seed = codec::encode(&sample());
    runner
        .run(&bytes_or_mutated(seed), |bytes| {
            bounded("codec::decode", bytes.len(), || {
                let _ = codec::decode(&bytes);
            })
        })
        .unwrap();
}

fn kafka_record(runner: &mut TestRunner) {
    let seeds: Vec<_> = record::records("eu", sample().remove(0), &[], 3, 4)
        .into_iter()
        .map(|o| {
            let headers: Vec<(String, Vec<u8>)> = o
                .headers
                .into_iter()
                .map(|(n, v)| (n.to_owned(), v))
                .collect();
            (headers, o.value)
        })
        .collect();
    let seed = seeds[0].clone();
    let strategy = (
        bytes_or_mutated(seed.1.clone()),
        0..seed.0.len(),
        mutated(seed.0[0].1.clone()),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(value, header, header_value, fix_crc)| {
            let mut headers = seed.0.clone();
            headers[header].1 = header_value;
            if fix_crc {
                // past the crc32, so the decoder behind it is reached
                let crc = codec::checksum(&value).to_string().into_bytes();
                for (n, v) in &mut headers {
                    if n == record::CRC32 {
                        *v = crc.clone();
                    }
                }
            }
            let len = value.len()
                + headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len())
                    .sum::<usize>();
            bounded("record::decode", len, || {
                let _ = record::decode(&headers, Some(&value), "eu");
            })
        })
        .unwrap();
}

/// pgoutput messages: a relation, a transaction on it, as the server sends
/// them.
fn pgoutput_seed() -> Vec<Vec<u8>> {
    let mut relation = vec![b'R'];
    relation.extend(16384u32.to_be_bytes());
    relation.extend(b"public\0orders\0");
    relation.push(b'd');
    relation.extend(2i16.to_be_bytes());
    for (key, name) in [(1u8, "id"), (0, "note")] {
        relation.push(key);
        relation.extend(name.as_bytes());
        relation.push(0);
        relation.extend(25u32.to_be_bytes());
        relation.extend((-1i32).to_be_bytes());
    }
    let mut begin = vec![b'B'];
    begin.extend(0x200u64.to_be_bytes());
    begin.extend(0i64.to_be_bytes());
    begin.extend(7u32.to_be_bytes());
    let mut insert = vec![b'I'];
    insert.extend(16384u32.to_be_bytes());
    insert.push(b'N');
    insert.extend(2i16.to_be_bytes());
    for v in ["1", "hello"] {
        insert.push(b't');
        insert.extend((v.len() as i32).to_be_bytes());
        insert.extend(v.as_bytes());
    }
    let mut commit = vec![b'C', 0];
    commit.extend(0x200u64.to_be_bytes());
    commit.extend(0x208u64.to_be_bytes());
    commit.extend(0i64.to_be_bytes());
    vec![relation, begin, insert, commit]
}

fn pgoutput(runner: &mut TestRunner) {
    let seed = pgoutput_seed();
    // a relation that claims the most columns a message may, with none
    let mut claim = seed[0][..20].to_vec();
    claim.extend(i16::MAX.to_be_bytes());
    bounded("a relation claiming 32767 columns", claim.len(), || {
        let _ = Decoder::new().decode(&claim);
    })
    .unwrap();
    // the unmutated messages decode: the seed is a real stream
    let mut decoder = Decoder::new();
    for m in &seed {
        decoder.decode(m).expect("the seed decodes");
    }
    let strategy = (
        0..seed.len(),
        bytes_or_mutated(seed[0].clone()),
        any::<u8>(),
    );
    runner
        .run(&strategy, |(which, bytes, tag)| {
            let mut messages = seed.clone();
            messages[which] = if which == 0 {
                bytes
            } else {
                // keep the message type most of the time, so the parser behind it runs
                let mut m = bytes;
                if let Some(first) = m.first_mut() {
                    *first = match tag % 4 {
                        0 => *first,
                        _ => seed[which][0],
                    };
                }
                m
            };
            let len: usize = messages.iter().map(Vec::len).sum();
            bounded("pgoutput::Decoder::decode", len, || {
                let mut decoder = Decoder::new();
                for m in &messages {
                    let _ = decoder.decode(m);
                }
            })
        })
        .unwrap();
}

fn topology(runner: &mut TestRunner) {
    let seed = br#"
[regions.na]
store = "postgres://meridian@na:5432/app"
listen = "127.0.0.1:7401"
[regions.eu]
store = "postgres://meridian@eu:5432/app"
listen = "127.0.0.1:7402"
[[tables]]
name = "public.orders"
primary_key = ["id"]
home_column = "region"
[kafka]
brokers = "k:9092"
[security]
plaintext = true
"#
    .to_vec();
    Topology::parse(std::str::from_utf8(&seed).unwrap(), "t.toml").expect("the seed parses");
    runner
        .run(&mutated(seed), |bytes| {
            let text = String::from_utf8_lossy(&bytes);
            bounded("Topology::parse", text.len(), || {
                let _ = Topology::parse(&text, "t.toml");
            })
        })
        .unwrap();
}

#[test]
fn decoders_and_parsers_survive_hostile_input() {
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    batch_codec(&mut runner);
    kafka_record(&mut runner);
    pgoutput(&mut runner);
    topology(&mut runner);
}
