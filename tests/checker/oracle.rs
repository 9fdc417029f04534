//! The oracle: what every region's tables must hold once the workload has
//! quiesced, computed from the workload's model and the checker's policy
//! model alone; and the diff of that against what a store holds.

use std::collections::{BTreeMap, HashSet};
use std::fmt;

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::policy::{Act, PolicyModel};
use super::schema::{Kind, REGIONS, Schema, Val, text_length};
use super::workload::{Key, Lineage, Rows};

/// What one column of one row must hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cell {
    /// This text form (large columns: their [`digest`]), or NULL.
    Exact(Val),
    /// Some value, not NULL (an identity value the store generated).
    AnyNonNull,
    /// Anything (only with `MERIDIAN_CHECK_IGNORE=stale_dropped_columns`:
    /// a column the deciding rule does not send).
    Any,
}

impl Cell {
    fn matches(&self, actual: &Val) -> bool {
        match self {
            Cell::Exact(v) => v == actual,
            Cell::AnyNonNull => actual.is_some(),
            Cell::Any => true,
        }
    }
}

/// One table of one region: rows by key (as the region holds the key),
/// each with where it comes from (for diagnostics).
pub(crate) type TableImage = BTreeMap<Key, (Vec<Cell>, String)>;

/// How the stores show large columns (their values are kilobytes):
/// `sha256:<hex> len <characters>`. The same expression in SQL is
/// [`digest_sql`].
pub(crate) fn digest(text: &str) -> String {
    let hash = Sha256::digest(text.as_bytes());
    format!("sha256:{} len {}", hex(&hash), text.chars().count())
}

pub(crate) fn digest_sql(column: &str) -> String {
    format!(
        "'sha256:' || encode(sha256(convert_to({column}::text, 'UTF8')), 'hex') || ' len ' || length({column}::text)"
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// HMAC-SHA256 of a value's text form, as 64 lowercase hex digits.
pub(crate) fn hmac_hex(key: &[u8], text: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(text.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// The expected content of every table in every region: `[region][table]`.
///
/// - A row is held whole (every column as the model has it) in its home
///   region.
/// - In another region `d`, the first rule for (table, home, `d`) that
///   matches the row decides: key and named columns as the action says
///   (keep: the value; null: NULL; hash: HMAC of the text form; redact: the
///   text, NULL stays NULL); columns the rule does not name (or drops) are
///   NULL there (no defaults in generated schemas), except an identity
///   column, which the destination fills itself. No matching rule: absent.
/// - A stored generated column is computed by each store from its own copy.
///
/// `identity`: the identity values the home stores generated, by (table,
/// key); a destination that receives the column must hold the same.
pub(crate) fn expected(
    schema: &Schema,
    policy: &PolicyModel,
    rows: &Rows,
    identity: &BTreeMap<(usize, Key), String>,
    hash_key: &[u8],
    stale_drops_ok: bool,
) -> Vec<Vec<TableImage>> {
    let mut out: Vec<Vec<TableImage>> = (0..REGIONS.len())
        .map(|_| schema.tables.iter().map(|_| TableImage::new()).collect())
        .collect();
    for ((ti, key), row) in rows {
        let t = &schema.tables[*ti];
        let home = REGIONS
            .iter()
            .position(|r| row[t.home].as_deref() == Some(*r))
            .expect("the model's rows are homed in a known region");
        for (d, tables) in out.iter_mut().enumerate() {
            let (mut image, why): (Vec<Cell>, String) = if d == home {
                let cells = t
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| match c.kind {
                        Kind::Identity => Cell::AnyNonNull,
                        _ => Cell::Exact(row[i].clone()),
                    })
                    .collect();
                (cells, "home row".into())
            } else {
                let Some(rule) = policy.decide(*ti, home, d, row) else {
                    continue;
                };
                let cells = t
                    .columns
                    .iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let action = rule.action(i);
                        if c.kind == Kind::Identity {
                            return match (action, identity.get(&(*ti, key.clone()))) {
                                (Some(Act::Keep), Some(v)) => Cell::Exact(Some(v.clone())),
                                (Some(Act::Null), _) => Cell::Exact(None),
                                _ => Cell::AnyNonNull,
                            };
                        }
                        let v = &row[i];
                        if stale_drops_ok && matches!(action, None | Some(Act::Drop)) {
                            return Cell::Any;
                        }
                        Cell::Exact(match action {
                            Some(Act::Keep) => v.clone(),
                            None | Some(Act::Drop) | Some(Act::Null) => None,
                            Some(Act::Hash) => v.as_ref().map(|s| hmac_hex(hash_key, s)),
                            Some(Act::Redact(text)) => v.as_ref().map(|_| text.clone()),
                        })
                    })
                    .collect();
                (
                    cells,
                    format!("homed in {}, rule {}", REGIONS[home], rule.name),
                )
            };
            // stored generated columns, from this copy's own values
            for (i, c) in t.columns.iter().enumerate() {
                if let Kind::Stored { of } = c.kind {
                    image[i] = match &image[of] {
                        Cell::Exact(Some(s)) => Cell::Exact(Some(text_length(s))),
                        Cell::Any => Cell::Any,
                        _ => Cell::Exact(None),
                    };
                }
            }
            for (i, c) in t.columns.iter().enumerate() {
                if c.large
                    && let Cell::Exact(Some(s)) = &image[i]
                {
                    image[i] = Cell::Exact(Some(digest(s)));
                }
            }
            let dest_key: Key = t
                .key
                .iter()
                .map(|&k| match &image[k] {
                    Cell::Exact(Some(v)) => v.clone(),
                    other => panic!("key cell {other:?}"),
                })
                .collect();
            let previous = tables[*ti].insert(dest_key, (image, why));
            assert!(previous.is_none(), "two rows with one key in one region");
        }
    }
    out
}

/// One way a region's table differs from the oracle.
#[derive(Clone, Debug)]
pub(crate) enum Diff {
    Missing {
        region: usize,
        table: usize,
        key: Key,
        why: String,
    },
    Extra {
        region: usize,
        table: usize,
        key: Key,
        row: Vec<Val>,
        why: String,
    },
    Different {
        region: usize,
        table: usize,
        key: Key,
        column: String,
        expected: Cell,
        actual: Val,
        why: String,
    },
}

impl Diff {
    pub(crate) fn place(&self) -> (usize, usize, Key) {
        match self {
            Diff::Missing {
                region, table, key, ..
            }
            | Diff::Extra {
                region, table, key, ..
            }
            | Diff::Different {
                region, table, key, ..
            } => (*region, *table, key.clone()),
        }
    }

    /// Adds a remark to the diff's explanation.
    pub(crate) fn note(&mut self, remark: &str) {
        match self {
            Diff::Missing { why, .. } | Diff::Extra { why, .. } | Diff::Different { why, .. } => {
                why.push_str("; ");
                why.push_str(remark);
            }
        }
    }

    pub(crate) fn table(&self) -> usize {
        match self {
            Diff::Missing { table, .. }
            | Diff::Extra { table, .. }
            | Diff::Different { table, .. } => *table,
        }
    }
}

/// A value for a report: long ones abbreviated.
pub(crate) fn show(v: &Val) -> String {
    match v {
        None => "NULL".into(),
        Some(s) if s.chars().count() > 90 => {
            let head: String = s.chars().take(60).collect();
            format!("{head:?}… ({} chars)", s.chars().count())
        }
        Some(s) => format!("{s:?}"),
    }
}

fn show_cell(c: &Cell) -> String {
    match c {
        Cell::Exact(v) => show(v),
        Cell::AnyNonNull => "(any non-NULL value)".into(),
        Cell::Any => "(anything)".into(),
    }
}

/// `Display` needs the schema for names.
pub(crate) struct Shown<'a>(pub(crate) &'a Diff, pub(crate) &'a Schema);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |t: &usize| &self.1.tables[*t].name;
        match self.0 {
            Diff::Missing {
                region,
                table,
                key,
                why,
            } => write!(
                f,
                "{}: {} key {key:?}: MISSING ({why})",
                REGIONS[*region],
                name(table)
            ),
            Diff::Extra {
                region,
                table,
                key,
                row,
                why,
            } => write!(
                f,
                "{}: {} key {key:?}: EXTRA ({why}): [{}]",
                REGIONS[*region],
                name(table),
                row.iter().map(show).collect::<Vec<_>>().join(", ")
            ),
            Diff::Different {
                region,
                table,
                key,
                column,
                expected,
                actual,
                why,
            } => write!(
                f,
                "{}: {} key {key:?}: column {column}: expected {}, found {} ({why})",
                REGIONS[*region],
                name(table),
                show_cell(expected),
                show(actual)
            ),
        }
    }
}

/// Compares one table of one region with its expected image. `actual`:
/// the rows the store holds, by key, every column's text form (large
/// columns as [`digest`]). `extra_why` explains a row the oracle does not
/// expect.
pub(crate) fn diff(
    schema: &Schema,
    region: usize,
    table: usize,
    expected: &TableImage,
    actual: &BTreeMap<Key, Vec<Val>>,
    extra_why: &dyn Fn(&Key) -> String,
) -> Vec<Diff> {
    let t = &schema.tables[table];
    let mut out = Vec::new();
    for (key, (cells, why)) in expected {
        let Some(row) = actual.get(key) else {
            out.push(Diff::Missing {
                region,
                table,
                key: key.clone(),
                why: why.clone(),
            });
            continue;
        };
        for (i, cell) in cells.iter().enumerate() {
            if !cell.matches(&row[i]) {
                out.push(Diff::Different {
                    region,
                    table,
                    key: key.clone(),
                    column: t.columns[i].name.clone(),
                    expected: cell.clone(),
                    actual: row[i].clone(),
                    why: why.clone(),
                });
            }
        }
    }
    for (key, row) in actual {
        if !expected.contains_key(key) {
            out.push(Diff::Extra {
                region,
                table,
                key: key.clone(),
                row: row.clone(),
                why: extra_why(key),
            });
        }
    }
    out
}

/// (region, table, key as that region holds it) of every copy a row's
/// previous home regions may still hold from the time they were its home
/// (under any key it had), except the row itself in its current home: what
/// `MERIDIAN_CHECK_IGNORE=old_home_copies` leaves out of the comparison.
pub(crate) fn old_home_copies(
    schema: &Schema,
    policy: &PolicyModel,
    rows: &Rows,
    lineage: &[Lineage],
    hash_key: &[u8],
) -> HashSet<(usize, usize, Key)> {
    let mut out = HashSet::new();
    for l in lineage {
        let t = &schema.tables[l.table];
        // the key's form in other regions: hashed where the table's rules hash it
        let form: Vec<bool> = t
            .key
            .iter()
            .map(|&k| {
                policy
                    .rules
                    .iter()
                    .any(|r| r.table == l.table && r.action(k) == Some(&Act::Hash))
            })
            .collect();
        let current = l.current(rows, schema);
        for &region in &l.homes {
            for key in &l.keys {
                if current.as_ref() == Some(&(region, key.clone())) {
                    continue; // the row itself, in its home
                }
                out.insert((region, l.table, key.clone()));
                let hashed: Key = key
                    .iter()
                    .zip(&form)
                    .map(|(v, h)| if *h { hmac_hex(hash_key, v) } else { v.clone() })
                    .collect();
                out.insert((region, l.table, hashed));
            }
        }
    }
    out
}

/// Why a row the oracle does not expect in `region` might be there.
pub(crate) fn explain_extra(
    schema: &Schema,
    policy: &PolicyModel,
    rows: &Rows,
    region: usize,
    table: usize,
    key: &Key,
) -> String {
    let t = &schema.tables[table];
    match rows.get(&(table, key.clone())) {
        None => "no such key in the model: deleted, or its key changed".into(),
        Some(row) => {
            let home = row[t.home].clone().unwrap_or_default();
            let conditional = REGIONS
                .iter()
                .position(|r| *r == home)
                .is_some_and(|h| policy.conditional(table, h, region));
            format!(
                "homed in {home}; no rule for {home} -> {} matches it{}",
                REGIONS[region],
                if conditional {
                    " (the pair has conditional rules)"
                } else {
                    ""
                }
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Cond, Rule};
    use crate::schema::{Column, Table, Ty};

    fn column(name: &str, ty: Ty, kind: Kind) -> Column {
        Column {
            name: name.into(),
            ty,
            nullable: true,
            large: false,
            small_domain: false,
            kind,
        }
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        assert_eq!(
            hmac_hex(b"Jefe", "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            digest("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad len 3"
        );
    }

    /// A hand-computed case: one table, rows homed in na and eu, a
    /// conditional rule with a fallback, and every action.
    #[test]
    fn oracle_on_a_tiny_case() {
        let mut big = column("body", Ty::Text, Kind::Plain);
        big.large = true;
        let schema = Schema {
            tables: vec![Table {
                name: "t0".into(),
                columns: vec![
                    column("k0", Ty::Text, Kind::Key),
                    column("home", Ty::Text, Kind::Home),
                    column("status", Ty::Text, Kind::Plain),
                    column("email", Ty::Text, Kind::Plain),
                    column("note", Ty::Varchar, Kind::Plain),
                    big,
                    column("glen", Ty::Integer, Kind::Stored { of: 3 }),
                    column("gid", Ty::BigInt, Kind::Identity),
                ],
                key: vec![0],
                home: 1,
                full_identity: true,
            }],
        };
        let keep_all = vec![
            (0, Act::Hash),
            (1, Act::Keep),
            (2, Act::Keep),
            (5, Act::Keep),
            (7, Act::Keep),
        ];
        let policy = PolicyModel {
            version: 1,
            rules: vec![
                Rule {
                    name: "paid".into(),
                    table: 0,
                    from: vec![0],
                    to: vec![1],
                    when: vec![Cond::Equals {
                        col: 2,
                        value: "paid".into(),
                    }],
                    columns: vec![
                        (0, Act::Hash),
                        (1, Act::Keep),
                        (3, Act::Hash),
                        (4, Act::Redact("(r)".into())),
                        (5, Act::Null),
                    ],
                },
                Rule {
                    name: "rest".into(),
                    table: 0,
                    from: vec![0],
                    to: vec![1, 2],
                    when: vec![],
                    columns: keep_all,
                },
            ],
            key_hashed: vec![true],
        };
        let body = "f".repeat(9000);
        let row = |k: &str, home: &str, status: &str| -> (Key, Vec<Val>) {
            (
                vec![k.into()],
                vec![
                    Some(k.into()),
                    Some(home.into()),
                    Some(status.into()),
                    Some("a@b".into()),
                    None,
                    Some(body.clone()),
                    None,
                    None,
                ],
            )
        };
        let mut rows = Rows::new();
        for (k, home, status) in [
            ("a", "na", "paid"),
            ("b", "na", "open"),
            ("c", "eu", "paid"),
        ] {
            let (key, r) = row(k, home, status);
            rows.insert((0, key), r);
        }
        let mut identity = BTreeMap::new();
        identity.insert((0, vec!["b".to_owned()]), "7".to_owned());
        let e = expected(&schema, &policy, &rows, &identity, b"k", false);
        let s = |v: &str| Cell::Exact(Some(v.to_owned()));
        let h = |v: &str| hmac_hex(b"k", v);
        // na: its own rows whole; eu's row c has no rule to na
        assert_eq!(e[0][0].len(), 2);
        assert_eq!(
            e[0][0][&vec!["a".to_owned()]].0,
            vec![
                s("a"),
                s("na"),
                s("paid"),
                s("a@b"),
                Cell::Exact(None),
                s(&digest(&body)),
                s("3"),
                Cell::AnyNonNull
            ]
        );
        // eu: a under "paid" (email hashed, note redacted but NULL stays NULL,
        // body nulled, gid not named), b under "rest", c whole
        assert_eq!(e[1][0].len(), 3);
        let (a, why) = &e[1][0][&vec![h("a")]];
        assert_eq!(why, "homed in na, rule paid");
        assert_eq!(
            *a,
            vec![
                s(&h("a")),
                s("na"),
                Cell::Exact(None),
                s(&h("a@b")),
                Cell::Exact(None),
                Cell::Exact(None),
                s("64"),
                Cell::AnyNonNull
            ]
        );
        let (b, _) = &e[1][0][&vec![h("b")]];
        assert_eq!(
            *b,
            vec![
                s(&h("b")),
                s("na"),
                s("open"),
                Cell::Exact(None),
                Cell::Exact(None),
                s(&digest(&body)),
                Cell::Exact(None),
                s("7")
            ]
        );
        assert!(e[1][0].contains_key(&vec!["c".to_owned()]));
        // apac: only the fallback sends there; the paid row too
        assert_eq!(e[2][0].len(), 2);
        assert_eq!(e[2][0][&vec![h("a")]].1, "homed in na, rule rest");
        // the diff names what is missing, extra and different
        let mut actual: BTreeMap<Key, Vec<Val>> = BTreeMap::new();
        actual.insert(
            vec![h("b")],
            vec![
                Some(h("b")),
                Some("na".into()),
                Some("open".into()),
                None,
                None,
                None,
                None,
                Some("7".into()),
            ],
        );
        actual.insert(vec!["zz".into()], vec![None; 8]);
        let d = diff(&schema, 2, 0, &e[2][0], &actual, &|_| "?".into());
        let shown: Vec<String> = d.iter().map(|x| Shown(x, &schema).to_string()).collect();
        assert_eq!(shown.len(), 3, "{shown:#?}");
        let has = |p: &dyn Fn(&String) -> bool| shown.iter().filter(|s| p(s)).count() == 1;
        assert!(
            has(&|s| s.contains("MISSING") && s.contains(&h("a")[..8])),
            "{shown:#?}"
        );
        assert!(has(&|s| s.contains("column body")), "{shown:#?}");
        assert!(has(&|s| s.contains("EXTRA")), "{shown:#?}");
    }
}
