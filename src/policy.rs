//! `meridian policy check`, `explain` and `diff`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use meridian_agent::residency;
use meridian_core::change::{Column, Table, Value};
use meridian_policy::Enforcer;

/// Validates a policy file against the topology's regions and tables;
/// prints every problem as file:line:column and fails if there is one.
pub(crate) async fn check(file: &Path, config: &Path, against: Option<&str>) -> anyhow::Result<()> {
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
    let (refused, warnings) = residency::topics_at_rest(&topology, true);
    for w in &warnings {
        println!("warning: {w}");
    }
    if !refused.is_empty() {
        for r in &refused {
            println!("error: {r}");
        }
        anyhow::bail!(
            "{} Kafka link(s) keep their topic where this policy does not allow",
            refused.len()
        );
    }
    if let Some(url) = against {
        check_against_store(&policy, &topology, url).await?;
    }
    Ok(())
}

/// Compares the policy with a live store: every table and column a rule
/// names must exist, and every column action must fit the column (a hash
/// into a text column, nothing NULL into a NOT NULL one); columns no rule
/// names are listed (they never cross).
async fn check_against_store(
    policy: &meridian_policy::Policy,
    topology: &meridian_core::topology::Topology,
    url: &str,
) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(url)
        .await
        .context("cannot connect to the store given with --against")?;
    let mut problems = 0;
    for t in &topology.tables {
        let (schema, name) = t.split_name();
        let columns: Vec<String> = sqlx::query_scalar(
            "SELECT a.attname::text FROM pg_attribute a
               JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND a.attnum > 0 AND NOT a.attisdropped
              ORDER BY a.attnum",
        )
        .bind(schema)
        .bind(name)
        .fetch_all(&pool)
        .await?;
        if columns.is_empty() {
            println!("error: table {} is not in the store", t.name);
            problems += 1;
            continue;
        }
        let rules: Vec<_> = policy.rules.iter().filter(|r| r.table == t.name).collect();
        for rule in &rules {
            for column in rule.columns.keys() {
                if !columns.contains(column) {
                    println!(
                        "error: rule {} names column {}.{column}, which the store does not have",
                        rule.name, t.name
                    );
                    problems += 1;
                }
            }
            for condition in &rule.when {
                if !columns.iter().any(|c| c == condition.column()) {
                    println!(
                        "error: rule {} has a condition on column {}.{}, which the store does not have",
                        rule.name,
                        t.name,
                        condition.column()
                    );
                    problems += 1;
                }
            }
        }
        if !rules.is_empty() {
            for c in &columns {
                if !rules.iter().any(|r| r.columns.contains_key(c)) {
                    println!(
                        "note: column {}.{c} is not named by any rule: it never leaves its home region",
                        t.name
                    );
                }
            }
        }
    }
    let columns = residency::store_columns(&pool, &topology.tables).await?;
    for misfit in meridian_policy::fit::check(policy, &columns) {
        println!("error: {misfit}");
        problems += 1;
    }
    pool.close().await;
    if problems > 0 {
        anyhow::bail!("{problems} problem(s) between the policy and the store");
    }
    println!("the store has every table and column the policy names");
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

/// Asks each region's agent (or one) to reload its residency policy.
pub(crate) async fn reload(config: &Path, only: Option<&str>) -> anyhow::Result<()> {
    use meridian_proto::admin::{ReloadPolicyRequest, admin_client::AdminClient};
    let topology = meridian_agent::load_topology(config)?;
    if let Some(region) = only {
        topology.region(region).map_err(anyhow::Error::msg)?;
    }
    let dialer = crate::operator::Dialer::new(&topology)?;
    let mut failed = 0;
    for (name, region) in &topology.regions {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let result = async {
            let channel = dialer
                .connect(
                    name,
                    region.connect_addr(),
                    std::time::Duration::from_secs(10),
                )
                .await?;
            let mut client = AdminClient::new(channel);
            anyhow::Ok(
                client
                    .reload_policy(ReloadPolicyRequest {})
                    .await?
                    .into_inner(),
            )
        }
        .await;
        match result {
            Ok(reply) => println!("{name}: policy version {} in force", reply.version),
            Err(e) => {
                failed += 1;
                println!("{name}: not reloaded: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} region(s) did not reload their policy");
    }
    Ok(())
}

/// `meridian policy diff OLD NEW`: every route whose rules change, in
/// words, and what a reload does about it.
pub(crate) fn diff(old: &Path, new: &Path, config: &Path) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    // comparing rules needs no hash key
    let read = |file: &Path| -> anyhow::Result<meridian_policy::Policy> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read policy file {}", file.display()))?;
        residency::parse(&topology, &text, &file.display().to_string(), true)
    };
    let (before, after) = (read(old)?, read(new)?);
    let regions: Vec<String> = topology.regions.keys().cloned().collect();
    let tables: Vec<String> = topology.tables.iter().map(|t| t.name.clone()).collect();
    let changes = meridian_policy::diff::diff(Some(&before), Some(&after), &regions, &tables);
    println!(
        "policy version {} -> {}: {} route(s) change",
        before.version,
        after.version,
        changes.len()
    );
    for c in &changes {
        println!("{} {} -> {}:", c.table, c.source, c.destination);
        for w in &c.widened {
            println!("  + {w}");
        }
        for t in &c.tightened {
            println!("  - {t}");
        }
        for t in &c.changed {
            println!("  ~ {t}");
        }
        println!(
            "  on reload: {}'s agent copies the table to {} again under the new policy",
            c.source, c.destination
        );
        if c.rows_no_longer_sent {
            println!(
                "  rows no longer sent stay in {} until deleted there (not purged by the reload)",
                c.destination
            );
        }
    }
    if after.version <= before.version && !changes.is_empty() {
        println!(
            "warning: the new policy's version ({}) is not above the old one's ({}); raise it so \
             receivers tell the two apart",
            after.version, before.version
        );
    }
    Ok(())
}
