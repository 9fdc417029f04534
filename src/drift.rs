//! Drift: what every region should share and does not. Compared across the
//! regions that answered `meridian status`: the agent version, the topology
//! and policy files (by sha256), the migrations applied to each store, and
//! the replicated tables' columns. Pure: the agents report, this compares.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

/// One region's baseline, as its agent reported it.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Baseline {
    pub version: String,
    /// The agent reported a baseline (older agents report only their
    /// version, and are compared on that alone).
    pub reported: bool,
    pub topology_sha256: String,
    /// Empty: no policy.
    pub policy_sha256: String,
    /// Of the policy's hash key; empty: none.
    pub hash_key_fingerprint: String,
    /// The commit the agent was built from; empty: unknown.
    pub build: String,
    pub migrations_applied: Vec<i64>,
    /// The migrations the region's agent carries.
    pub migrations_known: Vec<i64>,
    /// `schema.table` -> "name type" per column, sorted; empty: missing.
    pub tables: BTreeMap<String, Vec<String>>,
    /// Why the store could not be read (then migrations and tables are empty).
    pub store_error: Option<String>,
}

impl Drift {
    /// A real difference between regions, not a store left uncompared.
    pub(crate) fn is_difference(&self) -> bool {
        self.what != "store"
    }
}

impl Baseline {
    /// From an agent's status reply; `None` from an agent that predates
    /// baselines (its version still shows).
    pub(crate) fn from_reply(
        version: &str,
        b: Option<&meridian_proto::admin::Baseline>,
    ) -> Baseline {
        let Some(b) = b else {
            return Baseline {
                version: version.to_owned(),
                reported: false,
                store_error: Some("the agent predates baseline reports".into()),
                ..Baseline::default()
            };
        };
        Baseline {
            version: version.to_owned(),
            reported: true,
            topology_sha256: b.topology_sha256.clone(),
            policy_sha256: b.policy_sha256.clone(),
            hash_key_fingerprint: b.hash_key_fingerprint.clone(),
            build: b.build.clone(),
            migrations_applied: b.migrations_applied.clone(),
            migrations_known: b.migrations_known.clone(),
            tables: b
                .tables
                .iter()
                .map(|t| (t.table.clone(), t.columns.clone()))
                .collect(),
            store_error: (!b.store_error.is_empty()).then(|| b.store_error.clone()),
        }
    }
}

/// One difference between regions, or (`what` = `store`) a region whose
/// store could not be compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Drift {
    /// version, topology, policy, hash_key, migrations, columns; or store.
    pub what: &'static str,
    /// For people: which regions differ, and how.
    pub message: String,
}

/// The differences among `regions` (name -> baseline). Empty: they agree.
pub(crate) fn compare(regions: &BTreeMap<String, Baseline>) -> Vec<Drift> {
    let mut out = Vec::new();
    // regions grouped by `value`; `None`: the region is not compared on it
    let mut same = |what: &'static str, noun: &str, value: &dyn Fn(&Baseline) -> Option<String>| {
        let mut groups: BTreeMap<String, Vec<&str>> = BTreeMap::new();
        for (name, b) in regions {
            if let Some(v) = value(b) {
                groups.entry(v).or_default().push(name);
            }
        }
        if groups.len() > 1 {
            let parts: Vec<String> = groups
                .iter()
                .map(|(v, names)| format!("{} {v}", names.join(", ")))
                .collect();
            out.push(Drift {
                what,
                message: format!("{noun} differ: {}", parts.join("; ")),
            });
        }
    };
    same("version", "agent versions", &|b| {
        Some(format!("run {}", b.version))
    });
    // builds of one version from different commits (unknown builds aside)
    let versions: BTreeSet<&String> = regions.values().map(|b| &b.version).collect();
    same("build", "agent builds", &|b| {
        (versions.len() == 1 && !b.build.is_empty()).then(|| format!("run {}", b.build))
    });
    // an agent older than baselines is compared on its version alone
    let short = |hex: &str| hex.get(..12).unwrap_or(hex).to_owned();
    same("topology", "topology files", &|b| {
        b.reported
            .then(|| format!("have sha256 {}", short(&b.topology_sha256)))
    });
    same("policy", "residency policy files", &|b| {
        b.reported.then(|| match b.policy_sha256.is_empty() {
            true => "have no policy".to_owned(),
            false => format!("have sha256 {}", short(&b.policy_sha256)),
        })
    });
    same("hash_key", "policy hash keys", &|b| {
        b.reported.then(|| match b.hash_key_fingerprint.is_empty() {
            true => "have none".to_owned(),
            false => format!("have fingerprint {}", b.hash_key_fingerprint),
        })
    });

    let read: BTreeMap<&String, &Baseline> = regions
        .iter()
        .filter(|(_, b)| b.store_error.is_none())
        .collect();
    for (name, b) in regions {
        if let Some(e) = &b.store_error {
            out.push(Drift {
                what: "store",
                message: format!("{name}: migrations and columns not compared: {e}"),
            });
        }
    }
    // a migration any store applied, or any agent carries, is expected in all
    let expected: BTreeSet<i64> = read
        .values()
        .flat_map(|b| b.migrations_applied.iter().chain(&b.migrations_known))
        .copied()
        .collect();
    for (name, b) in &read {
        let lacking: Vec<String> = expected
            .iter()
            .filter(|v| !b.migrations_applied.contains(v))
            .map(i64::to_string)
            .collect();
        if !lacking.is_empty() {
            out.push(Drift {
                what: "migrations",
                message: format!(
                    "{name}'s store lacks migration(s) {} (the agent applies its migrations at start: run the release that carries them)",
                    lacking.join(", ")
                ),
            });
        }
    }
    let tables: BTreeSet<&String> = read.values().flat_map(|b| b.tables.keys()).collect();
    for table in tables {
        let all: BTreeSet<&String> = read
            .values()
            .flat_map(|b| b.tables.get(table).into_iter().flatten())
            .collect();
        let mut lacks: BTreeMap<Vec<&String>, Vec<&str>> = BTreeMap::new();
        for (name, b) in &read {
            let have = b.tables.get(table);
            let missing: Vec<&String> = all
                .iter()
                .filter(|c| !have.is_some_and(|h| h.contains(c)))
                .copied()
                .collect();
            if !missing.is_empty() {
                lacks.entry(missing).or_default().push(name);
            }
        }
        if !lacks.is_empty() {
            let parts: Vec<String> = lacks
                .iter()
                .map(|(missing, names)| {
                    let cols: Vec<&str> = missing.iter().map(|c| c.as_str()).collect();
                    format!("{} lack [{}]", names.join(", "), cols.join(", "))
                })
                .collect();
            out.push(Drift {
                what: "columns",
                message: format!("{table}: columns differ: {}", parts.join("; ")),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(policy: &str, migrations: &[i64], columns: &[&str]) -> Baseline {
        Baseline {
            version: "0.1.0".into(),
            reported: true,
            topology_sha256: "ab".repeat(32),
            policy_sha256: policy.into(),
            hash_key_fingerprint: "0f1e2d3c4b5a6978".into(),
            build: "0123456789ab".into(),
            migrations_applied: migrations.to_vec(),
            migrations_known: vec![1, 2],
            tables: [(
                "public.orders".to_owned(),
                columns.iter().map(|c| (*c).to_owned()).collect(),
            )]
            .into(),
            store_error: None,
        }
    }

    #[test]
    fn agreeing_regions_show_no_drift() {
        let b = region("cd", &[1, 2], &["id bigint", "note text"]);
        let regions = [("na".to_owned(), b.clone()), ("eu".to_owned(), b)].into();
        assert_eq!(compare(&regions), vec![]);
    }

    #[test]
    fn each_difference_is_named_with_its_regions() {
        let na = region("cd", &[1, 2], &["id bigint", "note text"]);
        let mut eu = region("ef", &[1, 2], &["id bigint", "note text"]);
        eu.version = "0.2.0".into();
        eu.hash_key_fingerprint.clear();
        let apac = region("cd", &[1], &["id bigint"]);
        let regions = [
            ("na".to_owned(), na),
            ("eu".to_owned(), eu),
            ("apac".to_owned(), apac),
        ]
        .into();
        let drift = compare(&regions);
        let what: Vec<&str> = drift.iter().map(|d| d.what).collect();
        assert_eq!(
            what,
            ["version", "policy", "hash_key", "migrations", "columns"],
            "{drift:?}"
        );
        assert_eq!(
            drift[0].message,
            "agent versions differ: apac, na run 0.1.0; eu run 0.2.0"
        );
        assert_eq!(
            drift[1].message,
            "residency policy files differ: apac, na have sha256 cd; eu have sha256 ef"
        );
        assert_eq!(
            drift[2].message,
            "policy hash keys differ: apac, na have fingerprint 0f1e2d3c4b5a6978; eu have none"
        );
        assert!(
            drift[3]
                .message
                .starts_with("apac's store lacks migration(s) 2 ")
        );
        assert_eq!(
            drift[4].message,
            "public.orders: columns differ: apac lack [note text]"
        );
    }

    #[test]
    fn an_unreadable_store_is_said_and_not_compared() {
        let na = region("", &[1, 2], &["id bigint"]);
        let mut eu = region("", &[], &[]);
        eu.tables.clear();
        eu.store_error = Some("connection refused".into());
        let drift = compare(&[("na".to_owned(), na), ("eu".to_owned(), eu)].into());
        assert_eq!(
            drift,
            vec![Drift {
                what: "store",
                message: "eu: migrations and columns not compared: connection refused".into()
            }]
        );
        assert!(!drift[0].is_difference(), "an outage is not drift");
    }

    #[test]
    fn builds_of_one_version_from_different_commits_drift() {
        let na = region("cd", &[1, 2], &["id bigint"]);
        let mut eu = na.clone();
        eu.build = "ba9876543210".into();
        let mut apac = na.clone();
        apac.build.clear(); // built outside a checkout: not compared
        let drift = compare(
            &[
                ("na".to_owned(), na),
                ("eu".to_owned(), eu),
                ("apac".to_owned(), apac),
            ]
            .into(),
        );
        assert_eq!(
            drift,
            vec![Drift {
                what: "build",
                message: "agent builds differ: na run 0123456789ab; eu run ba9876543210".into()
            }]
        );
    }

    #[test]
    fn an_agent_older_than_baselines_is_compared_on_its_version_alone() {
        let na = region("cd", &[1, 2], &["id bigint"]);
        let older = Baseline::from_reply("0.1.0", None);
        let drift = compare(&[("na".to_owned(), na), ("eu".to_owned(), older)].into());
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert!(!drift[0].is_difference());
    }
}
