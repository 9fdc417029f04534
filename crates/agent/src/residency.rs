//! Loading the residency policy named by the topology, and swapping it on
//! reload. Links and the receiver read the current policy per batch.

use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use meridian_core::topology::Topology;
use meridian_policy::file::Context;
use meridian_policy::{Enforcer, Policy};

/// Environment variable holding the HMAC key for `hash` actions.
pub const HASH_KEY_ENV: &str = "MERIDIAN_POLICY_HASH_KEY";

/// The policy in force (`None`: no policy file, everything crosses).
pub type SharedPolicy = Arc<RwLock<Option<Arc<Enforcer>>>>;

/// The current policy.
pub fn current(shared: &SharedPolicy) -> Option<Arc<Enforcer>> {
    shared.read().expect("policy lock").clone()
}

/// Reads and validates the topology's policy file, if it names one. The
/// error lists every problem as file:line:column.
pub fn load(topology: &Topology) -> anyhow::Result<Option<Enforcer>> {
    let Some(path) = &topology.policy else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read policy file {path}"))?;
    let hash_key = std::env::var(HASH_KEY_ENV).ok().filter(|k| !k.is_empty());
    let policy = parse(topology, &text, path, hash_key.is_some())?;
    let homes: Vec<(String, String)> = topology
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.home_column.clone()))
        .collect();
    Ok(Some(Enforcer::new(
        policy,
        hash_key.map(String::into_bytes),
        &homes,
    )))
}

/// Parses a policy against a topology's regions and tables.
pub fn parse(
    topology: &Topology,
    text: &str,
    file: &str,
    has_hash_key: bool,
) -> anyhow::Result<Policy> {
    let regions: Vec<String> = topology.regions.keys().cloned().collect();
    let tables: Vec<(String, Vec<String>, String)> = topology
        .tables
        .iter()
        .map(|t| (t.name.clone(), t.primary_key.clone(), t.home_column.clone()))
        .collect();
    let context = Context {
        regions: &regions,
        tables: &tables,
        has_hash_key,
    };
    Policy::parse(text, file, &context).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(|d| d.to_string()).collect();
        anyhow::anyhow!("invalid residency policy:\n{}", lines.join("\n"))
    })
}

/// Reloads the policy on SIGHUP. An invalid file is reported and the policy
/// in force stays.
pub fn reload_on_hangup(topology: Topology, shared: SharedPolicy) {
    tokio::spawn(async move {
        let Ok(mut hangup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hangup.recv().await.is_some() {
            match load(&topology) {
                Ok(policy) => {
                    let version = policy.as_ref().map(|p| p.version());
                    *shared.write().expect("policy lock") = policy.map(Arc::new);
                    tracing::info!(?version, "residency policy reloaded");
                }
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "policy reload refused; the previous policy stays in force")
                }
            }
        }
    });
}
