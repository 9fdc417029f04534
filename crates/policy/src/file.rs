//! The policy file.
//!
//! ```toml
//! version = 3                     # carried by every batch filtered with it
//! global = ["public.plan_prices"] # never replicated by agents (multi-region database)
//!
//! [[rules]]
//! name = "eu-orders-abroad"       # shown by explain and in audit counts
//! table = "public.orders"
//! from = ["eu"]                   # home regions of the rows
//! to = ["na", "apac"]             # destinations
//! when = [{ column = "status", in = ["paid", "shipped"] }]  # all must hold
//! columns = { id = "keep", region = "keep", status = "keep",
//!             customer_email = "hash", note = "null", name = { redact = "(redacted)" } }
//! ```
//!
//! Conditions compare a column's PostgreSQL text form (`t`/`f` for booleans):
//! `{ column, equals = "x" }`, `{ column, in = ["x", "y"] }`,
//! `{ column, is_null = true }`. Rules are tried in file order; the first that
//! matches decides.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use toml::Spanned;

/// What happens to a column on its way to a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    Keep,
    Drop,
    Null,
    /// HMAC-SHA256 with the deployment's key, as 64 lowercase hex digits.
    Hash,
    /// Replaced by a fixed text.
    Redact(String),
}

/// A row condition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Condition {
    Equals { column: String, value: String },
    In { column: String, values: Vec<String> },
    IsNull { column: String, null: bool },
}

impl Condition {
    pub fn column(&self) -> &str {
        match self {
            Condition::Equals { column, .. }
            | Condition::In { column, .. }
            | Condition::IsNull { column, .. } => column,
        }
    }
}

/// One rule of a policy.
#[derive(Clone, Debug)]
pub struct Rule {
    pub name: String,
    pub table: String,
    pub from: Vec<String>,
    pub to: Vec<String>,
    pub when: Vec<Condition>,
    pub columns: BTreeMap<String, Action>,
}

/// A parsed policy.
#[derive(Clone, Debug)]
pub struct Policy {
    pub version: u64,
    pub global: Vec<String>,
    pub rules: Vec<Rule>,
}

/// One problem in a policy file, at a place in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    version: u64,
    #[serde(default)]
    global: Vec<Spanned<String>>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    table: Spanned<String>,
    from: Spanned<Vec<Spanned<String>>>,
    to: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    when: Vec<Spanned<RawCondition>>,
    columns: Spanned<BTreeMap<String, Spanned<RawAction>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCondition {
    column: String,
    equals: Option<String>,
    #[serde(rename = "in")]
    in_: Option<Vec<String>>,
    is_null: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawAction {
    Word(String),
    Redact { redact: String },
}

/// What a validation may compare the policy with.
pub struct Context<'a> {
    /// Known regions.
    pub regions: &'a [String],
    /// Replicated tables: `(schema.table, key columns, home column)`.
    pub tables: &'a [(String, Vec<String>, String)],
    /// Whether a hash key is configured.
    pub has_hash_key: bool,
}

impl Policy {
    /// Parses and validates a policy against a topology's regions and
    /// replicated tables.
    pub fn parse_for(
        topology: &meridian_core::topology::Topology,
        text: &str,
        file: &str,
        has_hash_key: bool,
    ) -> Result<Policy, Vec<Diagnostic>> {
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
        Policy::parse(text, file, &context)
    }

    /// Parses and validates a policy. Returns every problem found, each with
    /// its line and column.
    pub fn parse(text: &str, file: &str, context: &Context<'_>) -> Result<Policy, Vec<Diagnostic>> {
        let at = |offset: usize, message: String| {
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            Diagnostic {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        };
        let raw: RawPolicy = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            vec![at(offset, e.message().trim_end().to_owned())]
        })?;
        let mut problems = Vec::new();
        let known_table = |name: &str| context.tables.iter().find(|(t, _, _)| t == name);
        let mut global = Vec::new();
        for g in &raw.global {
            let name = g.get_ref();
            if name.split('.').count() != 2 || name.split('.').any(str::is_empty) {
                problems.push(at(
                    g.span().start,
                    format!("global table {name:?}: expected schema.table, like public.plans"),
                ));
            } else if known_table(name).is_some() {
                problems.push(at(
                    g.span().start,
                    format!(
                        "global table {name:?} is also a replicated table of the topology; \
                         global tables live in the multi-region database: remove it from the \
                         topology's [[tables]] or from `global`"
                    ),
                ));
            }
            global.push(g.get_ref().clone());
        }
        let mut rules = Vec::new();
        for (i, spanned) in raw.rules.iter().enumerate() {
            let r = spanned.get_ref();
            let name = r.name.clone().unwrap_or_else(|| format!("rules[{i}]"));
            let table = r.table.get_ref().clone();
            let key = match known_table(&table) {
                Some((_, key, _)) => Some(key),
                None => {
                    let known: Vec<&str> =
                        context.tables.iter().map(|(t, _, _)| t.as_str()).collect();
                    problems.push(at(
                        r.table.span().start,
                        format!(
                            "rule {name}: unknown table {table:?}; expected one of: {}",
                            known.join(", ")
                        ),
                    ));
                    None
                }
            };
            if global.contains(&table) {
                problems.push(at(
                    r.table.span().start,
                    format!("rule {name} can never match: {table} is global (never replicated by agents)"),
                ));
            }
            for (list, what) in [(&r.from, "from"), (&r.to, "to")] {
                if list.get_ref().is_empty() {
                    problems.push(at(
                        list.span().start,
                        format!("rule {name} can never match: `{what}` is empty"),
                    ));
                }
                for region in list.get_ref() {
                    if !context.regions.contains(region.get_ref()) {
                        problems.push(at(
                            region.span().start,
                            format!(
                                "rule {name}: unknown region {:?} in `{what}`; expected one of: {}",
                                region.get_ref(),
                                context.regions.join(", ")
                            ),
                        ));
                    }
                }
            }
            let from: Vec<String> = r
                .from
                .get_ref()
                .iter()
                .map(|s| s.get_ref().clone())
                .collect();
            let to: Vec<String> = r.to.get_ref().iter().map(|s| s.get_ref().clone()).collect();
            if !from.is_empty()
                && to.iter().all(|t| from.len() == 1 && from[0] == *t)
                && !to.is_empty()
            {
                problems.push(at(
                    r.to.span().start,
                    format!(
                        "rule {name} can never match: rows never replicate to their own region"
                    ),
                ));
            }
            let mut when = Vec::new();
            for c in &r.when {
                let rc = c.get_ref();
                let condition = match (&rc.equals, &rc.in_, rc.is_null) {
                    (Some(v), None, None) => Condition::Equals {
                        column: rc.column.clone(),
                        value: v.clone(),
                    },
                    (None, Some(vs), None) => {
                        if vs.is_empty() {
                            problems.push(at(
                                c.span().start,
                                format!("rule {name} can never match: `in = []` matches nothing"),
                            ));
                        }
                        Condition::In {
                            column: rc.column.clone(),
                            values: vs.clone(),
                        }
                    }
                    (None, None, Some(null)) => Condition::IsNull {
                        column: rc.column.clone(),
                        null,
                    },
                    _ => {
                        problems.push(at(
                            c.span().start,
                            format!("rule {name}: a condition needs exactly one of `equals`, `in`, `is_null`"),
                        ));
                        continue;
                    }
                };
                when.push(condition);
            }
            let mut columns = BTreeMap::new();
            for (column, action) in r.columns.get_ref() {
                let parsed = match action.get_ref() {
                    RawAction::Word(w) => match w.as_str() {
                        "keep" => Action::Keep,
                        "drop" => Action::Drop,
                        "null" => Action::Null,
                        "hash" => Action::Hash,
                        other => {
                            problems.push(at(
                                action.span().start,
                                format!(
                                    "rule {name}: unknown action {other:?} for column {column}; expected keep, drop, null, hash or {{ redact = \"...\" }}"
                                ),
                            ));
                            continue;
                        }
                    },
                    RawAction::Redact { redact } => Action::Redact(redact.clone()),
                };
                if parsed == Action::Hash && !context.has_hash_key {
                    problems.push(at(
                        action.span().start,
                        format!(
                            "rule {name}: column {column} is hashed but no hash key is set; export MERIDIAN_POLICY_HASH_KEY (never put the key in the file)"
                        ),
                    ));
                }
                if let Some(key) = key
                    && key.contains(column)
                    && !matches!(parsed, Action::Keep | Action::Hash)
                {
                    problems.push(at(
                        action.span().start,
                        format!("rule {name}: primary key column {column} must be `keep` or `hash` (the destination applies rows by key)"),
                    ));
                }
                columns.insert(column.clone(), parsed);
            }
            if let Some((_, _, home)) = known_table(&table)
                && columns.get(home) != Some(&Action::Keep)
            {
                problems.push(at(
                    r.columns.span().start,
                    format!("rule {name}: the home column {home} must be `keep` (the receiver re-checks the policy by it)"),
                ));
            }
            if let Some(key) = key {
                for k in key {
                    if !columns.contains_key(k) {
                        problems.push(at(
                            r.columns.span().start,
                            format!("rule {name}: primary key column {k} is not named; add `{k} = \"keep\"` (or \"hash\")"),
                        ));
                    }
                }
            }
            rules.push(Rule {
                name,
                table,
                from,
                to,
                when,
                columns,
            });
        }
        // the key must cross in one form per table, or rows would fork
        for (i, a) in rules.iter().enumerate() {
            for b in &rules[..i] {
                if a.table != b.table {
                    continue;
                }
                if let Some((_, key, _)) = known_table(&a.table) {
                    for k in key {
                        if a.columns.get(k) != b.columns.get(k) {
                            problems.push(at(
                                raw.rules[i].span().start,
                                format!(
                                    "rule {}: key column {k} crosses as {:?} here but as {:?} in rule {}; use one form per table",
                                    a.name,
                                    a.columns.get(k),
                                    b.columns.get(k),
                                    b.name
                                ),
                            ));
                        }
                    }
                }
                let shadowed = b.when.is_empty()
                    && a.from.iter().all(|f| b.from.contains(f))
                    && a.to.iter().all(|t| b.to.contains(t));
                if shadowed {
                    problems.push(at(
                        raw.rules[i].span().start,
                        format!(
                            "rule {} can never match: rule {} before it matches every row it would",
                            a.name, b.name
                        ),
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(Policy {
                version: raw.version,
                global,
                rules,
            })
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Tables = Vec<(String, Vec<String>, String)>;

    fn context() -> (Vec<String>, Tables) {
        let table = |t: &str| (t.to_owned(), vec!["id".to_owned()], "region".to_owned());
        (
            vec!["na".into(), "eu".into(), "apac".into()],
            vec![table("public.orders"), table("public.customers")],
        )
    }

    const GOOD: &str = r#"
version = 3
global = ["public.plans"]

[[rules]]
name = "eu-orders-abroad"
table = "public.orders"
from = ["eu"]
to = ["na", "apac"]
when = [{ column = "status", in = ["paid", "shipped"] }]
columns = { id = "keep", region = "keep", email = "hash", note = "null", name = { redact = "x" } }
"#;

    fn parse(text: &str) -> Result<Policy, Vec<Diagnostic>> {
        let (regions, tables) = context();
        Policy::parse(
            text,
            "p.toml",
            &Context {
                regions: &regions,
                tables: &tables,
                has_hash_key: true,
            },
        )
    }

    #[test]
    fn parses_a_valid_policy() {
        let p = parse(GOOD).unwrap();
        assert_eq!(p.version, 3);
        assert_eq!(p.rules[0].name, "eu-orders-abroad");
        assert_eq!(p.rules[0].columns["name"], Action::Redact("x".into()));
        assert_eq!(p.global, vec!["public.plans".to_owned()]);
    }

    #[test]
    fn reports_every_problem_with_line_and_column() {
        let bad = GOOD
            .replace(r#"to = ["na", "apac"]"#, r#"to = ["na", "mars"]"#)
            .replace(r#"email = "hash""#, r#"email = "scramble""#);
        let problems = parse(&bad).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|d| d.to_string()).collect();
        assert_eq!(problems.len(), 2, "{shown:?}");
        assert!(
            shown[0].starts_with("p.toml:9:13: ") && shown[0].contains("\"mars\""),
            "{shown:?}"
        );
        assert!(
            shown[1].starts_with("p.toml:11:51: ") && shown[1].contains("\"scramble\""),
            "{shown:?}"
        );
    }

    #[test]
    fn rejects_rules_that_can_never_work() {
        let cases = [
            (GOOD.replace("public.orders", "public.plans"), "is global"),
            (
                GOOD.replace(r#"in = ["paid", "shipped"]"#, "in = []"),
                "matches nothing",
            ),
            (
                GOOD.replace(r#"id = "keep""#, r#"id = "null""#),
                "must be `keep` or `hash`",
            ),
            (
                GOOD.replace(r#"id = "keep", "#, ""),
                "primary key column id is not named",
            ),
            (
                GOOD.replace(
                    r#"name = { redact = "x" }"#,
                    r#"name = "keep", name = "drop""#,
                ),
                "duplicate key",
            ),
            (
                GOOD.replace("version = 3", "version = 3\ncolour = 1"),
                "unknown field",
            ),
            (
                format!(
                    "{GOOD}\n[[rules]]\ntable = \"public.orders\"\nfrom = [\"eu\"]\nto = [\"eu\"]\ncolumns = {{ id = \"keep\", region = \"keep\" }}\n"
                ),
                "own region",
            ),
            (
                GOOD.replace(r#"region = "keep""#, r#"region = "hash""#),
                "home column region must be `keep`",
            ),
            (
                GOOD.replace(
                    r#"global = ["public.plans"]"#,
                    r#"global = ["public.orders"]"#,
                ),
                "also a replicated table",
            ),
            (
                GOOD.replace(r#"global = ["public.plans"]"#, r#"global = ["plans"]"#),
                "expected schema.table",
            ),
        ];
        for (text, expected) in cases {
            let problems = parse(&text).unwrap_err();
            assert!(
                problems.iter().any(|d| d.message.contains(expected)),
                "{expected}: {problems:?}"
            );
        }
        let (regions, tables) = context();
        let no_key = Policy::parse(
            GOOD,
            "p.toml",
            &Context {
                regions: &regions,
                tables: &tables,
                has_hash_key: false,
            },
        );
        assert!(
            no_key.unwrap_err()[0]
                .message
                .contains("MERIDIAN_POLICY_HASH_KEY")
        );
    }

    #[test]
    fn a_shadowed_rule_is_reported() {
        let text = r#"
version = 1
[[rules]]
table = "public.customers"
from = ["na"]
to = ["eu", "apac"]
columns = { id = "keep", region = "keep" }
[[rules]]
table = "public.customers"
from = ["na"]
to = ["eu"]
columns = { id = "keep", region = "keep", email = "keep" }
"#;
        let problems = parse(text).unwrap_err();
        assert!(
            problems[0].message.contains("rules[1] can never match"),
            "{problems:?}"
        );
        assert_eq!(problems[0].line, 8);
    }
}
