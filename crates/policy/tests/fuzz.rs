//! The policy parser fed broken files: valid policies with bytes flipped,
//! cut or inserted. It may refuse them, never panic, and never allocate more
//! than a small multiple of the file's size. Cases: `MERIDIAN_FUZZ_CASES`
//! (default 300); the long run:
//!
//! ```sh
//! MERIDIAN_FUZZ_CASES=2000000 cargo test --release -p meridian-policy --test fuzz
//! ```

use std::alloc::System;

use meridian_policy::Policy;
use meridian_policy::file::Context;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use stats_alloc::{INSTRUMENTED_SYSTEM, Region, StatsAlloc};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const SEED: &str = r#"
version = 3

[[rules]]
name = "eu-orders-abroad"
table = "public.orders"
from = ["eu"]
to = ["na", "apac"]
when = [{ column = "status", in = ["paid", "shipped"] }]
columns = { id = "keep", region = "keep", status = "keep", amount = "null", email = "hash" }

[[rules]]
name = "orders-outside-eu"
table = "public.orders"
from = ["na", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", region = "keep", status = "keep", amount = "keep", email = "keep" }
"#;

#[test]
fn the_policy_parser_survives_broken_files() {
    let regions: Vec<String> = ["na", "eu", "apac"].map(String::from).to_vec();
    let tables = vec![(
        "public.orders".to_owned(),
        vec!["id".to_owned()],
        "region".to_owned(),
    )];
    let context = Context {
        regions: &regions,
        tables: &tables,
        has_hash_key: true,
    };
    Policy::parse(SEED, "p.toml", &context).expect("the seed parses");
    let cases = std::env::var("MERIDIAN_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let seed = SEED.as_bytes().to_vec();
    let edits = proptest::collection::vec((0..seed.len(), any::<u8>(), 0u8..4), 1..8);
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    })
    .run(&edits, |edits| {
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
        let text = String::from_utf8_lossy(&bytes);
        let region = Region::new(GLOBAL);
        let _ = Policy::parse(&text, "p.toml", &context);
        let allocated = region.change().bytes_allocated;
        prop_assert!(
            allocated <= 256 * text.len() + (64 << 10),
            "{allocated} bytes allocated for a {}-byte file",
            text.len()
        );
        Ok(())
    })
    .unwrap();
}
