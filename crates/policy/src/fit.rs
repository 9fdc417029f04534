//! Whether a policy's column actions fit the store's column types: what the
//! policy sends must be something a destination with the same schema can
//! write. A misfit would make every row the rule sends fail at the
//! destination (a dead letter per transaction), so it is refused up front.
//! Pure: the caller reads the columns from a store.

use crate::file::{Action, Policy};

/// One column of a replicated table, as a store describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreColumn {
    pub name: String,
    /// `format_type` of the column (`text`, `character varying(40)`, ...).
    pub ty: String,
    pub not_null: bool,
    /// Has a default, or is an identity or generated column: an insert
    /// without it still gets a value.
    pub has_default: bool,
}

/// Problems between `policy` and the tables' columns (`schema.table` and
/// its columns, as the store has them), one sentence each, naming the rule,
/// table and column and what to do.
pub fn check(policy: &Policy, tables: &[(String, Vec<StoreColumn>)]) -> Vec<String> {
    let mut problems = Vec::new();
    for rule in &policy.rules {
        let Some((_, columns)) = tables.iter().find(|(t, _)| *t == rule.table) else {
            continue;
        };
        for c in columns {
            let action = rule.columns.get(&c.name).unwrap_or(&Action::Drop);
            let at = format!("rule {:?}: {}.{}", rule.name, rule.table, c.name);
            match action {
                Action::Keep => {}
                Action::Hash if !holds_text(&c.ty, 64) => problems.push(format!(
                    "{at} is hashed, but a hash is 64 hex characters and the column is {}; \
                     hash only text columns (keep, null or drop this one)",
                    c.ty
                )),
                Action::Redact(text) if !holds_text(&c.ty, text.chars().count()) => {
                    problems.push(format!(
                        "{at} is redacted to a text, but the column is {}; \
                         redact only text columns (null or drop this one)",
                        c.ty
                    ))
                }
                Action::Null if c.not_null => problems.push(format!(
                    "{at} is nulled, but the column is NOT NULL: every row the rule sends would be \
                     refused at the destination; keep, hash or redact it, or drop it if it has a default"
                )),
                Action::Drop if c.not_null && !c.has_default => problems.push(format!(
                    "{at} is not sent (dropped or not named), but the column is NOT NULL without a \
                     default: every row the rule sends would be refused at the destination; name it \
                     in the rule, or give it a default"
                )),
                _ => {}
            }
        }
    }
    problems
}

/// Whether a column of type `ty` holds any text of `len` characters.
fn holds_text(ty: &str, len: usize) -> bool {
    let limited = |prefix: &str| {
        ty.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|n| n.parse::<usize>().ok())
            .map(|n| n >= len)
    };
    match ty {
        "text" | "character varying" | "citext" => true,
        _ => limited("character varying(")
            .or_else(|| limited("character("))
            .unwrap_or(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::Rule;

    fn column(name: &str, ty: &str, not_null: bool, has_default: bool) -> StoreColumn {
        StoreColumn {
            name: name.into(),
            ty: ty.into(),
            not_null,
            has_default,
        }
    }

    fn policy(columns: &[(&str, Action)]) -> Policy {
        Policy {
            version: 1,
            global: vec![],
            rules: vec![Rule {
                name: "r".into(),
                table: "public.t".into(),
                from: vec!["eu".into()],
                to: vec!["na".into()],
                when: vec![],
                columns: columns
                    .iter()
                    .map(|(n, a)| ((*n).to_owned(), a.clone()))
                    .collect(),
            }],
        }
    }

    #[test]
    fn refuses_actions_a_destination_could_not_write() {
        let tables = vec![(
            "public.t".to_owned(),
            vec![
                column("id", "bigint", true, false),
                column("email", "text", false, false),
                column("code", "character varying(10)", false, false),
                column("n", "integer", true, false),
                column("created", "timestamptz", true, true),
                column("note", "text", true, false),
            ],
        )];
        let p = policy(&[
            ("id", Action::Hash),
            ("email", Action::Hash),
            ("code", Action::Hash),
            ("n", Action::Null),
        ]);
        let problems = check(&p, &tables);
        let about = |c: &str| problems.iter().filter(|p| p.contains(c)).count();
        assert_eq!(about("public.t.id is hashed"), 1, "{problems:?}");
        assert_eq!(about("public.t.code is hashed"), 1, "{problems:?}");
        assert_eq!(about("public.t.n is nulled"), 1, "{problems:?}");
        assert_eq!(about("public.t.note is not sent"), 1, "{problems:?}");
        assert_eq!(problems.len(), 4, "email and created fit: {problems:?}");
    }

    #[test]
    fn text_types_that_hold_a_hash() {
        assert!(holds_text("text", 64));
        assert!(holds_text("character varying(64)", 64));
        assert!(!holds_text("character varying(63)", 64));
        assert!(!holds_text("uuid", 64));
        assert!(!holds_text("bigint", 64));
    }
}
