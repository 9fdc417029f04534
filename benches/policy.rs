//! Residency policy evaluation speed: decisions per second on one core, for
//! a realistic policy of 20 tables (3 rules each, row conditions on some),
//! against a named baseline in the same run: `static_route_lookup`, a hash
//! map lookup of (table, home, destination) -> allowed, the least any
//! per-row routing can cost.
//!
//! `cargo bench --bench policy` prints one JSON line.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use meridian_core::change::{Column, Table, Value};
use meridian_policy::file::Context;
use meridian_policy::{Decision, Enforcer, Policy};

const REGIONS: [&str; 3] = ["na", "eu", "apac"];
const TABLES: usize = 20;
const ROUNDS: usize = 5_000_000;

fn main() {
    let mut text = String::from("version = 1\n");
    let mut specs = Vec::new();
    for t in 0..TABLES {
        let name = format!("public.table_{t}");
        specs.push((name.clone(), vec!["id".to_owned()], "region".to_owned()));
        text.push_str(&format!(
            r#"
[[rules]]
table = "{name}"
from = ["eu"]
to = ["na", "apac"]
when = [{{ column = "status", in = ["paid", "shipped", "refunded"] }}]
columns = {{ id = "keep", region = "keep", status = "keep", amount = "keep", email = "hash", note = "null" }}
[[rules]]
table = "{name}"
from = ["na"]
to = ["eu", "apac"]
columns = {{ id = "keep", region = "keep", status = "keep", amount = "keep", email = "keep" }}
[[rules]]
table = "{name}"
from = ["apac"]
to = ["na", "eu"]
when = [{{ column = "deleted", is_null = true }}]
columns = {{ id = "keep", region = "keep", status = "keep", amount = "keep" }}
"#
        ));
    }
    let regions: Vec<String> = REGIONS.iter().map(|r| r.to_string()).collect();
    let context = Context {
        regions: &regions,
        tables: &specs,
        has_hash_key: true,
    };
    let policy = Policy::parse(&text, "bench.toml", &context).expect("valid policy");
    let homes: Vec<(String, String)> = specs
        .iter()
        .map(|(t, _, h)| (t.clone(), h.clone()))
        .collect();
    let enforcer = Enforcer::new(policy, Some(b"bench-key".to_vec()), &homes);

    let columns = [
        "id",
        "region",
        "status",
        "amount",
        "email",
        "note",
        "deleted",
        "created_at",
        "tier",
        "score",
    ];
    let tables: Vec<Arc<Table>> = (0..TABLES)
        .map(|t| {
            Arc::new(Table {
                schema: "public".into(),
                name: format!("table_{t}"),
                columns: columns
                    .iter()
                    .map(|c| Column {
                        name: (*c).into(),
                        type_oid: 25,
                        key: *c == "id",
                    })
                    .collect(),
            })
        })
        .collect();
    let statuses = ["paid", "open", "shipped", "void"];
    let rows: Vec<Vec<Value>> = (0..64)
        .map(|i| {
            columns
                .iter()
                .enumerate()
                .map(|(c, _)| match c {
                    1 => Value::Text(REGIONS[i % 3].into()),
                    2 => Value::Text(statuses[i % 4].into()),
                    6 if i % 5 == 0 => Value::Text("2026-01-01".into()),
                    6 => Value::Null,
                    _ => Value::Text(format!("value-{i}-{c}")),
                })
                .collect()
        })
        .collect();

    // policy decisions
    let started = Instant::now();
    let mut sent = 0u64;
    for i in 0..ROUNDS {
        let table = &tables[i % TABLES];
        let row = &rows[i % rows.len()];
        let dest = REGIONS[(i / 7) % 3];
        if let Decision::Send(_) =
            enforcer.decide(black_box(table), "eu", black_box(dest), black_box(row))
        {
            sent += 1;
        }
    }
    let policy_s = started.elapsed().as_secs_f64();

    // baseline: a static (table, home, destination) route table
    let mut routes: HashMap<(String, String, String), bool> = HashMap::new();
    for t in &tables {
        for h in REGIONS {
            for d in REGIONS {
                routes.insert((t.name.clone(), h.into(), d.into()), h != d);
            }
        }
    }
    let keys: Vec<(String, String, String)> = routes.keys().cloned().collect();
    let started = Instant::now();
    let mut allowed = 0u64;
    for i in 0..ROUNDS {
        if routes[black_box(&keys[i % keys.len()])] {
            allowed += 1;
        }
    }
    let baseline_s = started.elapsed().as_secs_f64();

    let policy_rate = ROUNDS as f64 / policy_s;
    let baseline_rate = ROUNDS as f64 / baseline_s;
    println!(
        "{{\"benchmark\":\"policy_decisions\",\"tables\":{TABLES},\"rules\":{},\"decisions\":{ROUNDS},\"sent\":{sent},\
         \"policy_decisions_per_s\":{:.0},\"static_route_lookup_per_s\":{:.0},\"baseline_allowed\":{allowed},\
         \"ratio_policy_over_static_lookup\":{:.3}}}",
        TABLES * 3,
        policy_rate,
        baseline_rate,
        policy_rate / baseline_rate
    );
}
