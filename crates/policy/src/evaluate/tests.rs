use std::collections::BTreeMap;

use meridian_core::Lsn;
use meridian_core::change::Column;
use proptest::prelude::*;

use super::*;

const REGIONS: [&str; 3] = ["na", "eu", "apac"];
const COLUMNS: [&str; 5] = ["id", "home", "a", "b", "c"];

fn table() -> Arc<Table> {
    Arc::new(Table {
        schema: "public".into(),
        name: "t".into(),
        columns: COLUMNS
            .iter()
            .map(|c| Column {
                name: (*c).into(),
                type_oid: 25,
                key: *c == "id",
            })
            .collect(),
    })
}

fn enforcer(rules: Vec<Rule>) -> Enforcer {
    let policy = Policy {
        version: 1,
        global: vec![],
        rules,
    };
    Enforcer::new(
        policy,
        Some(b"k".to_vec()),
        &[("public.t".into(), "home".into())],
    )
}

fn rule(
    name: &str,
    from: &[&str],
    to: &[&str],
    when: Vec<Condition>,
    cols: &[(&str, Action)],
) -> Rule {
    Rule {
        name: name.into(),
        table: "public.t".into(),
        from: from.iter().map(|s| (*s).into()).collect(),
        to: to.iter().map(|s| (*s).into()).collect(),
        when,
        columns: cols.iter().map(|(c, a)| ((*c).into(), a.clone())).collect(),
    }
}

fn t(s: &str) -> Value {
    Value::Text(s.into())
}

fn tx(kinds: Vec<ChangeKind>) -> Vec<Transaction> {
    let table = table();
    vec![Transaction {
        commit_lsn: Lsn(1),
        end_lsn: Lsn(2),
        commit_time: 0,
        continues: false,
        token: None,
        changes: kinds
            .into_iter()
            .map(|kind| Change {
                table: table.clone(),
                kind,
            })
            .collect(),
    }]
}

#[test]
fn sends_transforms_and_blocks() {
    let e = enforcer(vec![rule(
        "eu-out",
        &["eu"],
        &["na"],
        vec![Condition::In {
            column: "a".into(),
            values: vec!["paid".into()],
        }],
        &[
            ("id", Action::Keep),
            ("home", Action::Keep),
            ("a", Action::Keep),
            ("b", Action::Hash),
            ("c", Action::Redact("x".into())),
        ],
    )]);
    let row = |a: &str| vec![t("1"), t("eu"), t(a), t("secret@mail"), t("555")];
    let (out, counts) = e.filter(
        "eu",
        "na",
        &tx(vec![
            ChangeKind::Insert { new: row("paid") },
            ChangeKind::Insert { new: row("unpaid") },
        ]),
    );
    assert_eq!(out[0].changes.len(), 1);
    let sent = &out[0].changes[0];
    let ChangeKind::Insert { new } = &sent.kind else {
        panic!()
    };
    assert_eq!(new[0], t("1"));
    assert_ne!(new[3], t("secret@mail"));
    assert!(matches!(&new[3], Value::Text(h) if h.len() == 64));
    assert_eq!(new[4], t("x"));
    assert_eq!(
        counts[&("public.t".into(), "eu-out".into(), Verdict::Transformed)],
        1
    );
    assert_eq!(
        counts[&("public.t".into(), "-".into(), Verdict::Blocked)],
        1
    );
    // deny by default: another destination gets nothing
    let (out, _) = e.filter(
        "eu",
        "apac",
        &tx(vec![ChangeKind::Insert { new: row("paid") }]),
    );
    assert!(out[0].changes.is_empty());
    // what was sent passes the receiver's check; a raw row does not
    assert_eq!(
        e.check(
            "eu",
            "na",
            &[Transaction {
                changes: vec![sent.clone()],
                ..tx(vec![])[0].clone()
            }]
        ),
        Ok(())
    );
    let raw = tx(vec![ChangeKind::Insert { new: row("paid") }]);
    let v = e.check("eu", "na", &raw).unwrap_err();
    assert!(!v.0.contains("secret@mail") && !v.0.contains("555"), "{v}");
}

#[test]
fn a_row_may_always_go_home() {
    let e = enforcer(vec![]);
    let row = vec![t("1"), t("eu"), t("x"), t("y"), t("z")];
    let (out, counts) = e.filter(
        "na",
        "eu",
        &tx(vec![ChangeKind::Insert { new: row.clone() }]),
    );
    assert_eq!(
        out[0].changes[0].kind,
        ChangeKind::Insert { new: row.clone() }
    );
    assert_eq!(
        counts[&("public.t".into(), "(home region)".into(), Verdict::Passed)],
        1
    );
    assert_eq!(e.check("na", "eu", &out), Ok(()));
    // and nowhere else
    let (out, _) = e.filter("na", "apac", &tx(vec![ChangeKind::Insert { new: row }]));
    assert!(out[0].changes.is_empty());
}

#[test]
fn global_tables_never_cross_and_are_refused_on_arrival() {
    let rules = vec![rule(
        "r",
        &["na"],
        &["eu"],
        vec![],
        &[("id", Action::Keep), ("home", Action::Keep)],
    )];
    let policy = Policy {
        version: 1,
        global: vec!["public.t".into()],
        rules,
    };
    let e = Enforcer::new(policy, None, &[("public.t".into(), "home".into())]);
    let change = tx(vec![ChangeKind::Insert {
        new: vec![t("1"), t("na"), t("x"), t("y"), t("z")],
    }]);
    let (out, counts) = e.filter("na", "eu", &change);
    assert!(out[0].changes.is_empty());
    assert_eq!(
        counts[&("public.t".into(), "-".into(), Verdict::Blocked)],
        1
    );
    // not even a row going home
    let home = tx(vec![ChangeKind::Insert {
        new: vec![t("1"), t("eu"), t("x"), t("y"), t("z")],
    }]);
    assert!(e.filter("na", "eu", &home).0[0].changes.is_empty());
    assert!(
        e.check("na", "eu", &change)
            .unwrap_err()
            .0
            .contains("global")
    );
}

#[test]
fn unnamed_columns_do_not_cross() {
    let e = enforcer(vec![rule(
        "r",
        &["na"],
        &["eu"],
        vec![],
        &[("id", Action::Keep), ("home", Action::Keep)],
    )]);
    let (out, _) = e.filter(
        "na",
        "eu",
        &tx(vec![ChangeKind::Insert {
            new: vec![t("1"), t("na"), t("x"), t("y"), t("z")],
        }]),
    );
    let sent = &out[0].changes[0];
    assert_eq!(
        sent.table
            .columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["id", "home"]
    );
}

#[test]
fn a_row_leaving_a_destinations_scope_is_deleted_there() {
    let e = enforcer(vec![rule(
        "na-out",
        &["na"],
        &["apac"],
        vec![],
        &[("id", Action::Keep), ("home", Action::Keep)],
    )]);
    // full old image (REPLICA IDENTITY FULL): home moves from na to eu
    let old = vec![t("7"), t("na"), t("a"), Value::Null, Value::Null];
    let new = vec![t("7"), t("eu"), t("a"), Value::Null, Value::Null];
    let (out, _) = e.filter(
        "na",
        "apac",
        &tx(vec![ChangeKind::Update {
            old: Some(old),
            new,
        }]),
    );
    assert_eq!(
        out[0].changes[0].kind,
        ChangeKind::Delete {
            old: vec![t("7"), Value::Null]
        }
    );
}

/// A naive reading of the policy: the first rule that matches.
fn oracle<'a>(rules: &'a [Rule], source: &str, dest: &str, row: &Row) -> Option<&'a Rule> {
    let (home, partial) = match &row[1] {
        Value::Text(h) => (h.as_str(), false),
        _ => (source, true),
    };
    rules.iter().find(|r| {
        r.from.iter().any(|f| f == home)
            && r.to.iter().any(|x| x == dest)
            && r.when.iter().all(|c| match c {
                Condition::Equals { column, value } => {
                    let i = COLUMNS.iter().position(|x| x == column).unwrap();
                    !(partial && i != 0) && row[i] == Value::Text(value.clone())
                }
                _ => unreachable!(),
            })
    })
}

fn action() -> impl Strategy<Value = Option<Action>> {
    prop_oneof![
        Just(None),
        Just(Some(Action::Keep)),
        Just(Some(Action::Drop)),
        Just(Some(Action::Null)),
        Just(Some(Action::Hash)),
        Just(Some(Action::Redact("REDACTED".into()))),
    ]
}

fn rules() -> impl Strategy<Value = Vec<Rule>> {
    let regions = proptest::sample::subsequence(REGIONS.to_vec(), 1..=3);
    let one = (
        regions.clone(),
        regions,
        proptest::option::of(0usize..2),
        prop::bool::ANY,
        proptest::collection::vec(action(), 3),
    )
        .prop_map(|(from, to, cond, hash_key, actions)| {
            let mut columns = BTreeMap::new();
            columns.insert(
                "id".to_owned(),
                if hash_key { Action::Hash } else { Action::Keep },
            );
            columns.insert("home".to_owned(), Action::Keep);
            for (c, a) in COLUMNS[2..].iter().zip(actions) {
                if let Some(a) = a {
                    columns.insert((*c).to_owned(), a);
                }
            }
            Rule {
                name: "r".into(),
                table: "public.t".into(),
                from: from.into_iter().map(String::from).collect(),
                to: to.into_iter().map(String::from).collect(),
                when: cond
                    .map(|v| {
                        vec![Condition::Equals {
                            column: "a".into(),
                            value: format!("cond{v}"),
                        }]
                    })
                    .unwrap_or_default(),
                columns,
            }
        });
    proptest::collection::vec(one, 0..4)
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        1 => Just(Value::Null),
        1 => (0usize..2).prop_map(|v| Value::Text(format!("cond{v}"))),
        6 => "[A-Z]{10}".prop_map(|s| Value::Text(format!("canary{s}"))),
    ]
}

fn row() -> impl Strategy<Value = Row> {
    (
        "[A-Z]{10}",
        proptest::sample::select(REGIONS.to_vec()),
        value(),
        value(),
        value(),
    )
        .prop_map(|(id, home, a, b, c)| {
            vec![
                Value::Text(format!("canary{id}")),
                Value::Text(home.into()),
                a,
                b,
                c,
            ]
        })
}

fn change() -> impl Strategy<Value = ChangeKind> {
    (0u8..4, row(), row()).prop_map(|(k, new, mut old)| match k {
        0 => ChangeKind::Insert { new },
        1 => ChangeKind::Update { old: None, new },
        2 => {
            old[0] = new[0].clone();
            ChangeKind::Update {
                old: Some(old),
                new,
            }
        }
        _ => {
            // key-only image, as REPLICA IDENTITY DEFAULT sends it
            ChangeKind::Delete {
                old: vec![
                    new[0].clone(),
                    Value::Null,
                    Value::Null,
                    Value::Null,
                    Value::Null,
                ],
            }
        }
    })
}

/// Values of `row` that may appear in plain text at `dest`.
fn allowed_plain(rules: &[Rule], source: &str, dest: &str, row: &Row) -> Vec<String> {
    if row[1] == Value::Text(dest.into()) {
        // a row may always go home, whole
        return row
            .iter()
            .filter_map(|v| match v {
                Value::Text(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
    }
    let Some(rule) = oracle(rules, source, dest, row) else {
        return vec![];
    };
    COLUMNS
        .iter()
        .zip(row)
        .filter(|(c, _)| rule.columns.get(**c) == Some(&Action::Keep))
        .filter_map(|(_, v)| match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

proptest! {
    /// No value the policy forbids for a destination appears anywhere in
    /// what is sent there: rows, keys, old images.
    #[test]
    fn nothing_forbidden_reaches_a_destination(rules in rules(), kinds in proptest::collection::vec(change(), 1..8), src in 0usize..3, dst in 0usize..3) {
        let (source, dest) = (REGIONS[src], REGIONS[dst]);
        let e = enforcer(rules.clone());
        let input = tx(kinds.clone());
        let (out, _) = e.filter(source, dest, &input);
        let shown = format!("{out:?}");
        for kind in &kinds {
            let images: Vec<&Row> = match kind {
                ChangeKind::Insert { new } => vec![new],
                ChangeKind::Update { old, new } => old.iter().chain([new]).collect(),
                ChangeKind::Delete { old } => vec![old],
            };
            let mut allowed: Vec<String> = Vec::new();
            for image in &images {
                allowed.extend(allowed_plain(&rules, source, dest, image));
            }
            for image in &images {
                for v in image.iter() {
                    if let Value::Text(s) = v
                        && s.starts_with("canary")
                        && !allowed.contains(s)
                    {
                        prop_assert!(!shown.contains(s.as_str()), "forbidden {s} reached {dest}: {shown}");
                    }
                }
            }
        }
        // and the receiver accepts what the sender produced
        prop_assert_eq!(e.check(source, dest, &out), Ok(()));
    }

    /// The receiver's verdict on raw (unfiltered) input never quotes a value.
    #[test]
    fn violations_never_quote_values(rules in rules(), kinds in proptest::collection::vec(change(), 1..8)) {
        let e = enforcer(rules);
        if let Err(v) = e.check("na", "eu", &tx(kinds)) {
            prop_assert!(!v.0.contains("canary"), "{v}");
        }
    }
}
