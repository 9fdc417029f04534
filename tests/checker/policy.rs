//! The checker's own model of a residency policy: random generation over a
//! schema, rendering to the policy file format, and the decision the oracle
//! uses (first matching rule). `meridian_policy` parses the rendered text
//! only as a validity filter; it is never asked what a row should become.

use super::rng::Rng;
use super::schema::{Kind, REGIONS, Schema, Shapes, Table, Ty, Val, domain};

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Act {
    Keep,
    Drop,
    Null,
    Hash,
    Redact(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Cond {
    Equals { col: usize, value: String },
    In { col: usize, values: Vec<String> },
    IsNull { col: usize, null: bool },
}

impl Cond {
    pub(crate) fn holds(&self, row: &[Val]) -> bool {
        match self {
            Cond::Equals { col, value } => row[*col].as_deref() == Some(value.as_str()),
            Cond::In { col, values } => row[*col]
                .as_ref()
                .is_some_and(|v| values.iter().any(|x| x == v)),
            Cond::IsNull { col, null } => row[*col].is_none() == *null,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Rule {
    pub(crate) name: String,
    pub(crate) table: usize,
    pub(crate) from: Vec<usize>,
    pub(crate) to: Vec<usize>,
    pub(crate) when: Vec<Cond>,
    /// Named columns; a column not named does not cross.
    pub(crate) columns: Vec<(usize, Act)>,
}

impl Rule {
    pub(crate) fn action(&self, col: usize) -> Option<&Act> {
        self.columns.iter().find(|(c, _)| *c == col).map(|(_, a)| a)
    }
}

#[derive(Clone, Debug)]
pub(crate) struct PolicyModel {
    pub(crate) version: u64,
    pub(crate) rules: Vec<Rule>,
    /// Per table: whether its key crosses hashed.
    pub(crate) key_hashed: Vec<bool>,
}

impl PolicyModel {
    /// The rule that sends `row` of `table`, homed in `home`, to `dest`
    /// (`home != dest`): the first that matches, or none (it does not go).
    pub(crate) fn decide(
        &self,
        table: usize,
        home: usize,
        dest: usize,
        row: &[Val],
    ) -> Option<&Rule> {
        self.rules.iter().find(|r| {
            r.table == table
                && r.from.contains(&home)
                && r.to.contains(&dest)
                && r.when.iter().all(|c| c.holds(row))
        })
    }

    /// Whether any rule of `table` for (`home`, `dest`) has conditions.
    pub(crate) fn conditional(&self, table: usize, home: usize, dest: usize) -> bool {
        self.rules.iter().any(|r| {
            r.table == table && r.from.contains(&home) && r.to.contains(&dest) && !r.when.is_empty()
        })
    }

    /// The policy file.
    pub(crate) fn render(&self, schema: &Schema) -> String {
        let mut out = format!("version = {}\n", self.version);
        for r in &self.rules {
            let t = &schema.tables[r.table];
            let regions = |rs: &[usize]| {
                rs.iter()
                    .map(|&i| toml_string(REGIONS[i]))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push_str(&format!(
                "\n[[rules]]\nname = {}\ntable = {}\nfrom = [{}]\nto = [{}]\n",
                toml_string(&r.name),
                toml_string(&t.qualified()),
                regions(&r.from),
                regions(&r.to)
            ));
            if !r.when.is_empty() {
                let conds: Vec<String> = r
                    .when
                    .iter()
                    .map(|c| match c {
                        Cond::Equals { col, value } => format!(
                            "{{ column = {}, equals = {} }}",
                            toml_string(&t.columns[*col].name),
                            toml_string(value)
                        ),
                        Cond::In { col, values } => format!(
                            "{{ column = {}, in = [{}] }}",
                            toml_string(&t.columns[*col].name),
                            values
                                .iter()
                                .map(|v| toml_string(v))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                        Cond::IsNull { col, null } => format!(
                            "{{ column = {}, is_null = {null} }}",
                            toml_string(&t.columns[*col].name)
                        ),
                    })
                    .collect();
                out.push_str(&format!("when = [{}]\n", conds.join(", ")));
            }
            let cols: Vec<String> = r
                .columns
                .iter()
                .map(|(c, a)| {
                    let action = match a {
                        Act::Keep => "\"keep\"".to_owned(),
                        Act::Drop => "\"drop\"".to_owned(),
                        Act::Null => "\"null\"".to_owned(),
                        Act::Hash => "\"hash\"".to_owned(),
                        Act::Redact(text) => format!("{{ redact = {} }}", toml_string(text)),
                    };
                    format!("{} = {action}", t.columns[*c].name)
                })
                .collect();
            out.push_str(&format!("columns = {{ {} }}\n", cols.join(", ")));
        }
        out
    }

    /// Parses `text` with the product's parser against the schema's tables:
    /// `Err` with the diagnostics if it refuses the file.
    pub(crate) fn validate(text: &str, schema: &Schema) -> Result<(), Vec<String>> {
        let regions: Vec<String> = REGIONS.iter().map(|r| r.to_string()).collect();
        let tables: Vec<(String, Vec<String>, String)> = schema
            .tables
            .iter()
            .map(|t| (t.qualified(), t.key_names(), t.columns[t.home].name.clone()))
            .collect();
        meridian_policy::Policy::parse(
            text,
            "policy.toml",
            &meridian_policy::file::Context {
                regions: &regions,
                tables: &tables,
                has_hash_key: true,
            },
        )
        .map(|_| ())
        .map_err(|ds| ds.iter().map(|d| d.to_string()).collect())
    }

    /// A random policy the product's parser accepts. Returns it and how many
    /// candidates the parser refused on the way (expected: none).
    pub(crate) fn generate(
        rng: &mut Rng,
        schema: &Schema,
        shapes: &Shapes,
    ) -> (PolicyModel, Vec<String>) {
        let mut refused = Vec::new();
        for _ in 0..50 {
            let p = generate_once(rng, schema, shapes);
            match PolicyModel::validate(&p.render(schema), schema) {
                Ok(()) => return (p, refused),
                Err(problems) => refused.extend(problems),
            }
        }
        panic!("50 generated policies in a row were refused: {refused:#?}");
    }
}

/// A TOML basic string.
pub(crate) fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\u{:04X}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

const REDACTIONS: [&str; 4] = ["(redacted)", "***", "", "x'y\"z\\"];

/// A random column list for a rule of `t`, with the key in `key_form`.
fn column_list(rng: &mut Rng, t: &Table, key_form: &[(usize, Act)]) -> Vec<(usize, Act)> {
    let mut out: Vec<(usize, Act)> = Vec::new();
    for (i, c) in t.columns.iter().enumerate() {
        let action = match &c.kind {
            Kind::Key => Some(
                key_form
                    .iter()
                    .find(|(k, _)| *k == i)
                    .expect("key form")
                    .1
                    .clone(),
            ),
            Kind::Home => Some(Act::Keep),
            Kind::Identity => match rng.below(3) {
                0 => Some(Act::Keep),
                1 => Some(Act::Drop),
                _ => None,
            },
            Kind::Stored { .. } => rng.chance(20).then_some(Act::Keep),
            Kind::Plain => {
                // a NOT NULL column must cross with a value (the destination
                // inserts whole rows): keep, hash or redact only
                let mut choices = vec![Some(Act::Keep), Some(Act::Keep)];
                if c.nullable {
                    choices.push(None);
                    choices.push(Some(Act::Drop));
                    choices.push(Some(Act::Null));
                }
                if c.ty == Ty::Text {
                    choices.push(Some(Act::Hash));
                }
                if matches!(c.ty, Ty::Text | Ty::Varchar) {
                    choices.push(Some(Act::Redact(rng.pick(&REDACTIONS).to_string())));
                }
                rng.pick(&choices).clone()
            }
        };
        if let Some(a) = action {
            out.push((i, a));
        }
    }
    rng.shuffle(&mut out);
    out
}

fn condition(rng: &mut Rng, t: &Table) -> Cond {
    let mut eligible: Vec<usize> = Vec::new();
    for (i, c) in t.columns.iter().enumerate() {
        if c.kind == Kind::Plain
            && !c.large
            && (c.small_domain || c.ty == Ty::Boolean || c.nullable)
        {
            eligible.push(i);
        }
    }
    if eligible.is_empty() || rng.chance(15) {
        eligible.push(t.home);
    }
    let col = *rng.pick(&eligible);
    let c = &t.columns[col];
    let values: Vec<String> = if col == t.home {
        REGIONS.iter().map(|r| r.to_string()).collect()
    } else if c.small_domain || c.ty == Ty::Boolean {
        domain(c.ty)
    } else {
        return Cond::IsNull {
            col,
            null: rng.chance(50),
        };
    };
    if c.nullable && rng.chance(20) {
        return Cond::IsNull {
            col,
            null: rng.chance(50),
        };
    }
    if rng.chance(50) {
        Cond::Equals {
            col,
            value: rng.pick(&values).clone(),
        }
    } else {
        let mut vs = values.clone();
        rng.shuffle(&mut vs);
        vs.truncate(1 + rng.index(vs.len().min(3)));
        Cond::In { col, values: vs }
    }
}

fn generate_once(rng: &mut Rng, schema: &Schema, shapes: &Shapes) -> PolicyModel {
    let mut groups: Vec<Vec<Rule>> = Vec::new();
    let mut key_hashed = Vec::new();
    let mut counter = 0;
    for (ti, t) in schema.tables.iter().enumerate() {
        let key_form: Vec<(usize, Act)> = t
            .key
            .iter()
            .map(|&k| {
                let hash = shapes.hashed_keys && t.columns[k].ty == Ty::Text && rng.chance(40);
                (k, if hash { Act::Hash } else { Act::Keep })
            })
            .collect();
        key_hashed.push(key_form.iter().any(|(_, a)| *a == Act::Hash));
        let may_scope_out = t.full_identity || shapes.default_identity_scope_changes;
        // (from, to) pairs no group has decided yet
        let mut open: Vec<(usize, usize)> = (0..3)
            .flat_map(|f| (0..3).filter(move |d| *d != f).map(move |d| (f, d)))
            .collect();
        while !open.is_empty() {
            let (f, _) = *rng.pick(&open);
            let mut from = vec![f];
            if rng.chance(20) {
                let other = (f + 1 + rng.index(2)) % 3;
                from.push(other);
            }
            let mut candidates: Vec<usize> = (0..3)
                .filter(|&d| from.iter().all(|&fr| fr == d || open.contains(&(fr, d))))
                .collect();
            rng.shuffle(&mut candidates);
            candidates.truncate(1 + rng.index(candidates.len().max(1)));
            let pairs: Vec<(usize, usize)> = from
                .iter()
                .flat_map(|&fr| candidates.iter().map(move |&d| (fr, d)))
                .filter(|(fr, d)| fr != d)
                .collect();
            if pairs.is_empty() || pairs.iter().any(|p| !open.contains(p)) {
                continue;
            }
            open.retain(|p| !pairs.contains(p));
            from.sort();
            candidates.sort();
            let mut rule = |when: Vec<Cond>, columns: Vec<(usize, Act)>| {
                counter += 1;
                Rule {
                    name: format!("r{counter}-{}", t.name),
                    table: ti,
                    from: from.clone(),
                    to: candidates.clone(),
                    when,
                    columns,
                }
            };
            let shape = rng.below(100);
            let mut group = Vec::new();
            if shape < 20 {
                // no rule: these rows never reach these destinations
            } else if shape < 55 {
                group.push(rule(Vec::new(), column_list(rng, t, &key_form)));
            } else {
                let conditional = 1 + rng.index(2);
                for _ in 0..conditional {
                    let when = (0..1 + rng.index(2)).map(|_| condition(rng, t)).collect();
                    group.push(rule(when, column_list(rng, t, &key_form)));
                }
                if shape < 85 || !may_scope_out {
                    // the fallback: a different column list for the rest
                    let mut columns = column_list(rng, t, &key_form);
                    for _ in 0..5 {
                        if group.iter().all(|r| sorted(&r.columns) != sorted(&columns)) {
                            break;
                        }
                        columns = column_list(rng, t, &key_form);
                    }
                    group.push(rule(Vec::new(), columns));
                }
            }
            groups.push(group);
        }
    }
    // file order: groups interleaved at random, each group's rules in order
    let mut rules = Vec::new();
    let mut cursors: Vec<std::collections::VecDeque<Rule>> =
        groups.into_iter().map(Into::into).collect();
    cursors.retain(|g| !g.is_empty());
    while !cursors.is_empty() {
        let i = rng.index(cursors.len());
        rules.push(cursors[i].pop_front().expect("non-empty"));
        if cursors[i].is_empty() {
            cursors.remove(i);
        }
    }
    PolicyModel {
        version: 1 + rng.below(1000),
        rules,
        key_hashed,
    }
}

fn sorted(columns: &[(usize, Act)]) -> Vec<(usize, Act)> {
    let mut v = columns.to_vec();
    v.sort_by_key(|(c, _)| *c);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Schema;

    const ALL: Shapes = Shapes {
        identity_columns: true,
        stored_generated_columns: true,
        hashed_keys: true,
        home_changes_of_hashed_key_rows: true,
        default_identity_scope_changes: false,
        writes_to_foreign_homed_copies: true,
    };

    #[test]
    fn generated_policies_always_parse_and_are_deterministic() {
        let mut shapes_seen = [0usize; 4];
        for seed in 0..300 {
            let schema = Schema::generate(&mut Rng::fork(seed, 1), &ALL);
            let (a, refused) = PolicyModel::generate(&mut Rng::fork(seed, 2), &schema, &ALL);
            assert!(refused.is_empty(), "seed {seed}: {refused:#?}");
            let (b, _) = PolicyModel::generate(&mut Rng::fork(seed, 2), &schema, &ALL);
            assert_eq!(a.render(&schema), b.render(&schema));
            for r in &a.rules {
                let t = &schema.tables[r.table];
                shapes_seen[0] += r.when.is_empty() as usize;
                shapes_seen[1] += !r.when.is_empty() as usize;
                shapes_seen[2] += r.columns.iter().any(|(_, a)| *a == Act::Hash) as usize;
                shapes_seen[3] +=
                    r.columns.iter().any(|(_, a)| matches!(a, Act::Redact(_))) as usize;
                // under DEFAULT every conditional group ends in a fallback
                if !t.full_identity && !r.when.is_empty() {
                    for &f in &r.from {
                        for &d in r.to.iter().filter(|d| **d != f) {
                            assert!(
                                a.rules.iter().any(|x| x.table == r.table
                                    && x.when.is_empty()
                                    && x.from.contains(&f)
                                    && x.to.contains(&d)),
                                "seed {seed}: {}",
                                a.render(&schema)
                            );
                        }
                    }
                }
            }
        }
        assert!(shapes_seen.iter().all(|n| *n > 20), "{shapes_seen:?}");
    }

    #[test]
    fn first_matching_rule_decides() {
        let row: Vec<Val> = vec![
            Some("1".into()),
            Some("eu".into()),
            Some("beta".into()),
            None,
        ];
        let rule = |name: &str, when: Vec<Cond>| Rule {
            name: name.into(),
            table: 0,
            from: vec![1],
            to: vec![0, 2],
            when,
            columns: vec![(0, Act::Keep), (1, Act::Keep)],
        };
        let p = PolicyModel {
            version: 1,
            rules: vec![
                rule(
                    "a",
                    vec![Cond::Equals {
                        col: 2,
                        value: "alpha".into(),
                    }],
                ),
                rule(
                    "b",
                    vec![
                        Cond::In {
                            col: 2,
                            values: vec!["beta".into(), "gamma".into()],
                        },
                        Cond::IsNull { col: 3, null: true },
                    ],
                ),
                rule("c", vec![]),
            ],
            key_hashed: vec![false],
        };
        assert_eq!(p.decide(0, 1, 0, &row).map(|r| r.name.as_str()), Some("b"));
        let mut other = row.clone();
        other[3] = Some("x".into());
        assert_eq!(
            p.decide(0, 1, 2, &other).map(|r| r.name.as_str()),
            Some("c")
        );
        assert!(p.decide(0, 0, 1, &row).is_none(), "no rule from na");
    }
}
