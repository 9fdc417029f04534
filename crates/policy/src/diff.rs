//! What a policy change does to each route (a table, from a source region
//! to a destination): the rules that decide the route before and after,
//! and whether the change lets more reach the destination (rows or column
//! values newly allowed: a backfill), less (a purge), or both.
//!
//! A route whose rules changed at all is copied again by the source's agent
//! after a reload (the initial sync), through the new policy: newly allowed
//! rows arrive, and every row it sends is rewritten whole in its new form
//! (a column now nulled, hashed or dropped is overwritten). Rows the new
//! policy no longer sends are not deleted by the copy: [`RouteChange::rows_no_longer_sent`]
//! says when that can happen.

use std::collections::BTreeSet;

use crate::file::{Action, Condition, Policy, Rule};

/// How a route's rules changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteChange {
    pub table: String,
    pub source: String,
    pub destination: String,
    /// What now reaches the destination that did not, in words.
    pub widened: Vec<String>,
    /// What no longer reaches it, or in a weaker form, in words.
    pub tightened: Vec<String>,
    /// What changed without being simply more or less (a redaction's text;
    /// rules reordered or regrouped, which changes which rule decides a
    /// row, so either), in words.
    pub changed: Vec<String>,
    /// Some rows sent before may no longer be sent: they stay at the
    /// destination until deleted there.
    pub rows_no_longer_sent: bool,
}

/// How much of a value an action lets through, from nothing to all.
fn openness(action: Option<&Action>) -> u8 {
    match action {
        None | Some(Action::Drop) => 0,
        Some(Action::Null) => 1,
        Some(Action::Redact(_)) => 2,
        Some(Action::Hash) => 3,
        Some(Action::Keep) => 4,
    }
}

fn action_name(action: Option<&Action>) -> String {
    match action {
        None | Some(Action::Drop) => "not sent".into(),
        Some(Action::Null) => "null".into(),
        Some(Action::Redact(_)) => "redacted".into(),
        Some(Action::Hash) => "hashed".into(),
        Some(Action::Keep) => "kept".into(),
    }
}

fn conditions(when: &[Condition]) -> String {
    if when.is_empty() {
        return "every row".into();
    }
    let parts: Vec<String> = when
        .iter()
        .map(|c| match c {
            Condition::Equals { column, value } => format!("{column} = {value:?}"),
            Condition::In { column, values } => format!("{column} in {values:?}"),
            Condition::IsNull { column, null: true } => format!("{column} is null"),
            Condition::IsNull {
                column,
                null: false,
            } => format!("{column} is not null"),
        })
        .collect();
    format!("rows where {}", parts.join(" and "))
}

/// The values a condition accepts, when it is about values.
fn accepted(c: &Condition) -> Option<BTreeSet<&String>> {
    match c {
        Condition::Equals { value, .. } => Some([value].into_iter().collect()),
        Condition::In { values, .. } => Some(values.iter().collect()),
        Condition::IsNull { .. } => None,
    }
}

/// Whether every row that meets `narrow` meets `wide` too: each of
/// `wide`'s conditions is implied by one of `narrow`'s on the same column.
fn covers(wide: &[Condition], narrow: &[Condition]) -> bool {
    wide.iter().all(|w| {
        narrow.iter().any(|n| {
            n.column() == w.column()
                && match (accepted(w), accepted(n)) {
                    (Some(w), Some(n)) => n.is_subset(&w),
                    (None, None) => w == n,
                    _ => false,
                }
        })
    })
}

/// The rules deciding `table` from `source` to `destination`, in order.
fn route<'a>(policy: &'a Policy, table: &str, source: &str, destination: &str) -> Vec<&'a Rule> {
    policy
        .rules
        .iter()
        .filter(|r| {
            r.table == table
                && r.from.iter().any(|f| f == source)
                && r.to.iter().any(|t| t == destination)
        })
        .collect()
}

/// The most any of `rules` lets through of `column`.
fn most_open<'a>(rules: &[&'a Rule], column: &str) -> Option<&'a Action> {
    rules
        .iter()
        .filter_map(|r| r.columns.get(column))
        .max_by_key(|a| openness(Some(a)))
}

/// Every route of `tables` between `regions` whose rules differ between
/// `old` and `new`. `None` is no policy: every row goes everywhere whole.
pub fn diff(
    old: Option<&Policy>,
    new: Option<&Policy>,
    regions: &[String],
    tables: &[String],
) -> Vec<RouteChange> {
    let mut changes = Vec::new();
    for table in tables {
        for source in regions {
            for destination in regions.iter().filter(|d| *d != source) {
                if let Some(change) = diff_route(old, new, table, source, destination) {
                    changes.push(change);
                }
            }
        }
    }
    changes
}

fn diff_route(
    old: Option<&Policy>,
    new: Option<&Policy>,
    table: &str,
    source: &str,
    destination: &str,
) -> Option<RouteChange> {
    let mut change = RouteChange {
        table: table.to_owned(),
        source: source.to_owned(),
        destination: destination.to_owned(),
        widened: Vec::new(),
        tightened: Vec::new(),
        changed: Vec::new(),
        rows_no_longer_sent: false,
    };
    let (before, after) = match (old, new) {
        (None, None) => return None,
        (Some(_), None) => {
            change
                .widened
                .push("no policy: every row and column is sent".into());
            return Some(change);
        }
        (None, Some(new)) => {
            let after = route(new, table, source, destination);
            change.tightened.push(match after.is_empty() {
                true => "no rule: no row is sent".into(),
                false => "the policy now decides what is sent".into(),
            });
            change.rows_no_longer_sent = true;
            return Some(change);
        }
        (Some(old), Some(new)) => (
            route(old, table, source, destination),
            route(new, table, source, destination),
        ),
    };
    let same = before.len() == after.len()
        && before
            .iter()
            .zip(&after)
            .all(|(a, b)| a.when == b.when && a.columns == b.columns);
    if same {
        return None;
    }
    // rows: a rule's conditions send no row another rule's do not cover
    for r in &after {
        if !before.iter().any(|b| covers(&b.when, &r.when)) {
            change
                .widened
                .push(format!("{} are sent", conditions(&r.when)));
        }
    }
    for b in &before {
        if !after.iter().any(|r| covers(&r.when, &b.when)) {
            change
                .tightened
                .push(format!("{} are no longer sent", conditions(&b.when)));
            change.rows_no_longer_sent = true;
        }
    }
    // columns: rule by rule when the rules pair up, else the most any
    // rule lets through
    let columns: BTreeSet<&String> = before
        .iter()
        .chain(&after)
        .flat_map(|r| r.columns.keys())
        .collect();
    // rules pair up when each new rule has an old one with the same
    // conditions
    let same = |a: &Rule, b: &Rule| covers(&a.when, &b.when) && covers(&b.when, &a.when);
    let matched: Option<Vec<(&Rule, &Rule)>> = (before.len() == after.len())
        .then(|| {
            after
                .iter()
                .map(|a| before.iter().find(|b| same(b, a)).map(|b| (*b, *a)))
                .collect()
        })
        .flatten();
    let pairs: Vec<(Vec<&Rule>, Vec<&Rule>, String)> = match matched {
        Some(matched) => matched
            .into_iter()
            .map(|(b, a)| (vec![b], vec![a], format!(" ({})", conditions(&a.when))))
            .collect(),
        None => vec![(before.clone(), after.clone(), String::new())],
    };
    for column in columns {
        for (was_rules, is_rules, which) in &pairs {
            let (was, is) = (most_open(was_rules, column), most_open(is_rules, column));
            let words = format!(
                "column {column}{which}: {} -> {}",
                action_name(was),
                action_name(is)
            );
            match openness(is).cmp(&openness(was)) {
                std::cmp::Ordering::Greater => change.widened.push(words),
                std::cmp::Ordering::Less => change.tightened.push(words),
                std::cmp::Ordering::Equal if matches!((was, is), (Some(Action::Redact(a)), Some(Action::Redact(b))) if a != b) => {
                    change
                        .changed
                        .push(format!("column {column}{which}: redaction text"))
                }
                std::cmp::Ordering::Equal => {}
            }
        }
    }
    if change.widened.is_empty() && change.tightened.is_empty() && change.changed.is_empty() {
        // the same conditions and forms, in another order or grouping:
        // which rule decides a row may change
        change
            .changed
            .push("the rules deciding rows were reordered or regrouped".into());
        change.rows_no_longer_sent = true;
    }
    Some(change)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Policy {
        let regions = ["na".to_owned(), "eu".to_owned()];
        let tables = [(
            "public.accounts".to_owned(),
            vec!["id".to_owned()],
            "home".to_owned(),
        )];
        let context = crate::file::Context {
            regions: &regions,
            tables: &tables,
            has_hash_key: true,
        };
        Policy::parse(text, "policy.toml", &context).expect("valid policy")
    }

    const BASE: &str = r#"
version = 1
[[rules]]
table = "public.accounts"
from = ["na"]
to = ["eu"]
when = [{ column = "plan", in = ["pro"] }]
columns = { id = "keep", home = "keep", plan = "keep", email = "null" }
"#;

    fn changes(old: &str, new: &str) -> Vec<RouteChange> {
        diff(
            Some(&policy(old)),
            Some(&policy(new)),
            &["na".into(), "eu".into()],
            &["public.accounts".into()],
        )
    }

    #[test]
    fn an_unchanged_route_is_not_reported() {
        let later = BASE.replace("version = 1", "version = 2");
        assert_eq!(changes(BASE, &later), vec![]);
    }

    #[test]
    fn widening_rows_and_columns() {
        let wider = BASE
            .replace(r#"in = ["pro"]"#, r#"in = ["pro", "free"]"#)
            .replace(r#"email = "null""#, r#"email = "hash""#);
        let c = changes(BASE, &wider);
        assert_eq!(c.len(), 1, "{c:?}");
        let c = &c[0];
        assert_eq!((c.source.as_str(), c.destination.as_str()), ("na", "eu"));
        assert!(
            c.widened
                .contains(&r#"rows where plan in ["pro", "free"] are sent"#.to_owned()),
            "{c:?}"
        );
        assert!(
            c.widened
                .contains(&"column email: null -> hashed".to_owned()),
            "{c:?}"
        );
        // the new condition covers the old one: no row stops
        assert!(!c.rows_no_longer_sent && c.tightened.is_empty(), "{c:?}");
    }

    #[test]
    fn tightening_columns_only_keeps_rows() {
        let narrower = BASE.replace(r#"plan = "keep""#, r#"plan = "drop""#);
        let c = &changes(BASE, &narrower)[0];
        assert_eq!(
            c.tightened,
            vec![r#"column plan (rows where plan in ["pro"]): kept -> not sent"#]
        );
        assert!(c.widened.is_empty() && !c.rows_no_longer_sent, "{c:?}");
    }

    #[test]
    fn a_route_removed_stops_every_row() {
        let none = "version = 2\n";
        let c = &changes(BASE, none)[0];
        assert!(c.rows_no_longer_sent, "{c:?}");
        assert!(
            c.tightened
                .iter()
                .any(|t| t.contains("rows where plan in [\"pro\"] are no longer sent")),
            "{c:?}"
        );
        // and the other way round, rows are sent
        let c = &changes(none, BASE)[0];
        assert!(!c.rows_no_longer_sent && !c.widened.is_empty(), "{c:?}");
    }

    #[test]
    fn one_rule_tightened_beside_another_is_a_tightening() {
        let two = BASE.to_owned()
            + r#"
[[rules]]
table = "public.accounts"
from = ["na"]
to = ["eu"]
when = [{ column = "plan", equals = "free" }]
columns = { id = "keep", home = "keep", plan = "keep", email = "keep" }
"#;
        let one_less = two.replacen(r#"email = "keep" }"#, r#"email = "null" }"#, 1);
        let c = &changes(&two, &one_less)[0];
        assert_eq!(
            c.tightened,
            vec![r#"column email (rows where plan = "free"): kept -> null"#]
        );
        assert!(c.widened.is_empty() && !c.rows_no_longer_sent, "{c:?}");
        // the same rules in the other order: nothing more or less, but
        // which rule decides may change
        let swapped = BASE.to_owned() + &two[BASE.len()..];
        let reordered = two[BASE.len()..]
            .to_owned()
            .replace("[[rules]]", "version = 1\n[[rules]]")
            + &BASE.replace("version = 1", "");
        assert!(changes(&two, &swapped).is_empty());
        let c = &changes(&two, &reordered)[0];
        assert!(c.widened.is_empty() && c.tightened.is_empty(), "{c:?}");
        assert!(!c.changed.is_empty() && c.rows_no_longer_sent, "{c:?}");
    }

    #[test]
    fn a_redaction_text_is_a_change_not_a_widening() {
        let redacted = BASE.replace(r#"email = "null""#, r#"email = { redact = "x" }"#);
        let other = redacted.replace(r#"redact = "x""#, r#"redact = "y""#);
        let c = &changes(&redacted, &other)[0];
        assert!(c.widened.is_empty() && c.tightened.is_empty(), "{c:?}");
        assert_eq!(
            c.changed,
            vec![r#"column email (rows where plan in ["pro"]): redaction text"#]
        );
    }

    #[test]
    fn no_policy_on_either_side() {
        let p = policy(BASE);
        let regions = ["na".to_owned(), "eu".to_owned()];
        let tables = ["public.accounts".to_owned()];
        // without a policy everything went everywhere: two routes tighten
        let c = diff(None, Some(&p), &regions, &tables);
        assert_eq!(c.len(), 2);
        assert!(c.iter().all(|c| c.rows_no_longer_sent));
        let c = diff(Some(&p), None, &regions, &tables);
        assert!(
            c.iter()
                .all(|c| !c.widened.is_empty() && !c.rows_no_longer_sent)
        );
        assert!(diff(None, None, &regions, &tables).is_empty());
    }
}
