//! `meridian policy check` and `meridian policy explain`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use meridian_agent::residency;
use meridian_core::change::{Column, Table, Value};
use meridian_policy::Enforcer;

/// Validates a policy file against the topology's regions and tables;
/// prints every problem as file:line:column and fails if there is one.
pub(crate) fn check(file: &Path, config: &Path) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    let has_key = std::env::var(residency::HASH_KEY_ENV).is_ok_and(|k| !k.is_empty());
    let policy = residency::parse(&topology, &text, &file.display().to_string(), has_key)?;
    println!(
        "{}: policy version {} is valid: {} rule(s), {} global table(s)",
        file.display(),
        policy.version,
        policy.rules.len(),
        policy.global.len()
    );
    for t in &topology.tables {
        if !policy.rules.iter().any(|r| r.table == t.name) && !policy.global.contains(&t.name) {
            println!(
                "note: {} has no rule: none of its rows leave their home region",
                t.name
            );
        }
    }
    Ok(())
}

/// Prints what of one row (a JSON object) would cross to a destination.
pub(crate) fn explain(
    file: &Path,
    config: &Path,
    table: &str,
    row: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read policy file {}", file.display()))?;
    let key = std::env::var(residency::HASH_KEY_ENV)
        .ok()
        .filter(|k| !k.is_empty());
    let policy = residency::parse(&topology, &text, &file.display().to_string(), key.is_some())?;
    let spec = topology
        .tables
        .iter()
        .find(|t| t.name == table)
        .with_context(|| format!("table {table} is not in the topology's [[tables]]"))?;
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_str(row)
        .context("--row must be a JSON object like {\"id\": 1, \"region\": \"eu\"}")?;
    let (schema, name) = spec.split_name();
    let columns: Vec<Column> = object
        .keys()
        .map(|c| Column {
            name: c.clone(),
            type_oid: 0,
            key: spec.primary_key.contains(c),
        })
        .collect();
    let values: Vec<Value> = object
        .values()
        .map(|v| match v {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::String(s) => Value::Text(s.clone()),
            serde_json::Value::Bool(b) => Value::Text(if *b { "t" } else { "f" }.into()),
            other => Value::Text(other.to_string()),
        })
        .collect();
    for region in [from, to] {
        topology.region(region).map_err(anyhow::Error::msg)?;
    }
    if from == to {
        bail!("--from and --to are the same region; rows never replicate to their own region");
    }
    let homes = [(spec.name.clone(), spec.home_column.clone())];
    let enforcer = Enforcer::new(policy, key.map(String::into_bytes), &homes);
    let table = Arc::new(Table {
        schema: schema.into(),
        name: name.into(),
        columns,
    });
    let explanation = enforcer.explain(&table, from, to, &values);
    match (&explanation.rule, explanation.global) {
        (_, false) if explanation.home => {
            println!("row crosses {from} -> {to}: {to} is its home region")
        }
        (_, true) => println!(
            "{table_name}: global table, never replicated by agents",
            table_name = spec.name
        ),
        (Some(rule), _) => println!("row crosses {from} -> {to} under rule {:?}", rule.name),
        (None, _) => println!(
            "row does not cross {from} -> {to}: no rule for its home region, destination and values (deny by default)"
        ),
    }
    println!("{:<24} {:<30} sent as", "column", "action");
    for (column, action, sent) in &explanation.columns {
        let shown = match sent {
            None => "(not sent)".to_owned(),
            Some(Value::Null) => "NULL".to_owned(),
            Some(Value::Unchanged) => "(unchanged)".to_owned(),
            Some(Value::Text(t)) => t.clone(),
        };
        println!("{column:<24} {action:<30} {shown}");
    }
    Ok(())
}
