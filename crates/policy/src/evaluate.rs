//! Evaluating a policy: per change and destination, what crosses and in what
//! form (the sender), and whether what arrived is allowed (the receiver).
//!
//! The home region of a row is its home column's value. A key-only image
//! (deletes and key changes under `REPLICA IDENTITY DEFAULT`) has no home
//! value: the capturing region is taken as home, and conditions on non-key
//! columns count as not met, so a conditional rule never lets a key-only
//! delete through. Tables with conditional rules should use
//! `REPLICA IDENTITY FULL`, so deletes and home changes carry the whole old
//! row and are routed exactly.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use hmac::{Hmac, Mac};
use meridian_core::change::{Change, ChangeKind, Row, Table, Transaction, Value};
use sha2::Sha256;

use crate::file::{Action, Condition, Policy, Rule};

/// How a change fared for one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// Sent as it is.
    Passed,
    /// Sent with columns dropped, hashed, nulled or redacted.
    Transformed,
    /// Not sent.
    Blocked,
}

/// What [`Enforcer::explain`] found.
#[derive(Debug)]
pub struct Explanation<'a> {
    /// The deciding rule; `None` means the row does not cross.
    pub rule: Option<&'a Rule>,
    /// The destination is the row's home region: it crosses whole.
    pub home: bool,
    /// The table is global (never replicated by agents).
    pub global: bool,
    /// Per column: name, action, and the value that would be sent (`None`:
    /// not sent).
    pub columns: Vec<(String, String, Option<Value>)>,
}

/// The rule that decided, if any.
#[derive(Debug)]
pub enum Decision<'a> {
    Send(&'a Rule),
    /// The destination is the row's home region: a row may always go home,
    /// whole.
    Home,
    Block,
}

/// A received change that the policy forbids here. The message names tables,
/// columns and rules, never values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation(pub String);

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The table each (rule, source table) pair projects to, built once per filtering.
type Projections = HashMap<(*const Rule, *const Table), Arc<Table>>;

/// Audit counts of one filtering: (table, rule name or "-", verdict) -> changes.
pub type Counts = HashMap<(String, String, Verdict), u64>;

/// A policy ready to enforce.
pub struct Enforcer {
    policy: Policy,
    hash_key: Option<Vec<u8>>,
    /// schema -> table -> (home column, rule indexes in file order)
    tables: HashMap<String, HashMap<String, (String, Vec<usize>)>>,
    global: Vec<String>,
    /// sha256 (hex) of the policy file's text; empty if not given.
    digest: String,
    source: String,
}

impl Enforcer {
    /// Records the text of the file the policy was read from, and its
    /// sha256 (hex).
    pub fn with_source(mut self, text: &str) -> Enforcer {
        self.digest = meridian_core::digest::sha256_hex(text.as_bytes());
        self.source = text.to_owned();
        self
    }

    /// The policy file's text, as [`Enforcer::with_source`] recorded it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// sha256 (hex) of the policy file's text, as [`Enforcer::with_source`]
    /// recorded it.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    /// `home_columns`: `(schema.table, home column)` for every replicated table.
    pub fn new(
        policy: Policy,
        hash_key: Option<Vec<u8>>,
        home_columns: &[(String, String)],
    ) -> Enforcer {
        let mut tables: HashMap<String, HashMap<String, (String, Vec<usize>)>> = HashMap::new();
        for (name, home) in home_columns {
            let (schema, table) = name.split_once('.').unwrap_or(("public", name));
            let rules = policy
                .rules
                .iter()
                .enumerate()
                .filter(|(_, r)| r.table == *name)
                .map(|(i, _)| i)
                .collect();
            tables
                .entry(schema.to_owned())
                .or_default()
                .insert(table.to_owned(), (home.clone(), rules));
        }
        let global = policy.global.clone();
        Enforcer {
            policy,
            hash_key,
            tables,
            global,
            digest: String::new(),
            source: String::new(),
        }
    }

    /// The policy's version.
    pub fn version(&self) -> u64 {
        self.policy.version
    }

    /// The policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn entry(&self, table: &Table) -> Option<&(String, Vec<usize>)> {
        self.tables.get(&table.schema)?.get(&table.name)
    }

    /// Decides whether `row` of `table`, captured in `source`, may go to
    /// `destination`, and under which rule.
    pub fn decide(
        &self,
        table: &Table,
        source: &str,
        destination: &str,
        row: &Row,
    ) -> Decision<'_> {
        let Some((home_column, rules)) = self.entry(table) else {
            return Decision::Block;
        };
        let home_at = table.columns.iter().position(|c| c.name == *home_column);
        let (home, partial) = match home_at.map(|i| &row[i]) {
            Some(Value::Text(h)) => (h.as_str(), false),
            _ => (source, true),
        };
        if !partial && home == destination {
            return Decision::Home;
        }
        for &i in rules {
            let rule = &self.policy.rules[i];
            if rule.from.iter().any(|f| f == home)
                && rule.to.iter().any(|t| t == destination)
                && rule.when.iter().all(|c| holds(c, table, row, partial))
            {
                return Decision::Send(rule);
            }
        }
        Decision::Block
    }

    /// The sender's filter: the transactions as `destination` may receive
    /// them (changes it may not have removed, the others transformed), and
    /// audit counts. Transactions left empty are kept (their position still
    /// advances the destination's watermark).
    pub fn filter(
        &self,
        source: &str,
        destination: &str,
        transactions: &[Transaction],
    ) -> (Vec<Transaction>, Counts) {
        let (out, _, counts) = self.filter_traced(source, destination, transactions);
        (out, counts)
    }

    /// [`Enforcer::filter`], also saying for each change sent which change
    /// of its input transaction it came from (its index there), per
    /// transaction: what lets a Kafka link number its records by source
    /// change, whatever the policy dropped.
    pub fn filter_traced(
        &self,
        source: &str,
        destination: &str,
        transactions: &[Transaction],
    ) -> (Vec<Transaction>, Vec<Vec<u32>>, Counts) {
        let mut origins = Vec::with_capacity(transactions.len());
        // counted by table identity while filtering, named once at the end
        let mut tally: HashMap<(*const Table, Option<&str>, Verdict), (&Table, u64)> =
            HashMap::new();
        let mut projections = Projections::new();
        let out = transactions
            .iter()
            .map(|t| {
                let mut changes = Vec::with_capacity(t.changes.len());
                let mut from = Vec::with_capacity(t.changes.len());
                for (i, change) in t.changes.iter().enumerate() {
                    let (sent, verdict, rule) =
                        self.filter_change(source, destination, change, &mut projections);
                    let key = (Arc::as_ptr(&change.table), rule, verdict);
                    tally.entry(key).or_insert((&change.table, 0)).1 += 1;
                    let before = changes.len();
                    changes.extend(sent);
                    from.extend(std::iter::repeat_n(i as u32, changes.len() - before));
                }
                origins.push(from);
                Transaction {
                    commit_lsn: t.commit_lsn,
                    end_lsn: t.end_lsn,
                    commit_time: t.commit_time,
                    changes,
                    continues: t.continues,
                    token: t.token,
                }
            })
            .collect();
        let mut counts = Counts::new();
        for ((_, rule, verdict), (table, n)) in tally {
            let name = format!("{}.{}", table.schema, table.name);
            *counts
                .entry((name, rule.unwrap_or("-").to_owned(), verdict))
                .or_default() += n;
        }
        (out, origins, counts)
    }

    fn filter_change<'a>(
        &'a self,
        source: &str,
        destination: &str,
        change: &Change,
        projections: &mut Projections,
    ) -> (Option<Change>, Verdict, Option<&'a str>) {
        let table = &change.table;
        if self.is_global(table) {
            return (None, Verdict::Blocked, None);
        }
        let mut project = |rule: &Rule| -> Arc<Table> {
            projections
                .entry((rule as *const Rule, Arc::as_ptr(table)))
                .or_insert_with(|| Arc::new(projected(table, rule)))
                .clone()
        };
        let send = |rule: &'a Rule, kind: ChangeKind, projected: Arc<Table>| {
            let verdict = if projected.columns.len() == table.columns.len()
                && rule
                    .columns
                    .values()
                    .all(|a| matches!(a, Action::Keep | Action::Drop))
            {
                Verdict::Passed
            } else {
                Verdict::Transformed
            };
            (
                Some(Change {
                    table: projected,
                    kind,
                }),
                verdict,
                Some(rule.name.as_str()),
            )
        };
        const HOME: Option<&str> = Some("(home region)");
        let home_column = self
            .entry(table)
            .map(|(h, _)| h.as_str())
            .unwrap_or_default();
        // a key image that still says where the row lives
        let home_key = |row: &Row| -> Row {
            table
                .columns
                .iter()
                .zip(row)
                .map(|(c, v)| {
                    if c.key || c.name == home_column {
                        v.clone()
                    } else {
                        Value::Null
                    }
                })
                .collect()
        };
        match &change.kind {
            ChangeKind::Insert { new } => match self.decide(table, source, destination, new) {
                Decision::Home => (Some(change.clone()), Verdict::Passed, HOME),
                Decision::Send(rule) => {
                    let p = project(rule);
                    let new = self.transform(table, rule, new, false);
                    send(rule, ChangeKind::Insert { new }, p)
                }
                Decision::Block => (None, Verdict::Blocked, None),
            },
            ChangeKind::Update { old, new } => {
                let now = self.decide(table, source, destination, new);
                let before = old
                    .as_ref()
                    .map(|o| self.decide(table, source, destination, o));
                match (now, before) {
                    (Decision::Home, _) => {
                        let kind = ChangeKind::Update {
                            old: old.as_ref().map(home_key),
                            new: new.clone(),
                        };
                        (
                            Some(Change {
                                table: table.clone(),
                                kind,
                            }),
                            Verdict::Passed,
                            HOME,
                        )
                    }
                    (Decision::Block, Some(Decision::Home)) => {
                        let kind = ChangeKind::Delete {
                            old: home_key(old.as_ref().expect("old image")),
                        };
                        (
                            Some(Change {
                                table: table.clone(),
                                kind,
                            }),
                            Verdict::Passed,
                            HOME,
                        )
                    }
                    (Decision::Send(rule), _) => {
                        let p = project(rule);
                        let old = old.as_ref().map(|o| self.transform(table, rule, o, true));
                        let new = self.transform(table, rule, new, false);
                        send(rule, ChangeKind::Update { old, new }, p)
                    }
                    // it was allowed there and no longer is: remove it there
                    (Decision::Block, Some(Decision::Send(rule))) => {
                        let p = project(rule);
                        let old =
                            self.transform(table, rule, old.as_ref().expect("old image"), true);
                        send(rule, ChangeKind::Delete { old }, p)
                    }
                    _ => (None, Verdict::Blocked, None),
                }
            }
            ChangeKind::Delete { old } => match self.decide(table, source, destination, old) {
                Decision::Home => {
                    let kind = ChangeKind::Delete { old: home_key(old) };
                    (
                        Some(Change {
                            table: table.clone(),
                            kind,
                        }),
                        Verdict::Passed,
                        HOME,
                    )
                }
                Decision::Send(rule) => {
                    let p = project(rule);
                    let old = self.transform(table, rule, old, true);
                    send(rule, ChangeKind::Delete { old }, p)
                }
                Decision::Block => (None, Verdict::Blocked, None),
            },
        }
    }

    fn is_global(&self, table: &Table) -> bool {
        self.global
            .iter()
            .any(|g| g.split_once('.') == Some((table.schema.as_str(), table.name.as_str())))
    }

    /// Applies `rule`'s column actions to `row`, keeping only the columns it
    /// lets cross. With `key_only`, non-key columns become NULL.
    fn transform(&self, table: &Table, rule: &Rule, row: &Row, key_only: bool) -> Row {
        table
            .columns
            .iter()
            .zip(row)
            .filter_map(|(c, v)| {
                let action = rule.columns.get(&c.name)?;
                if key_only && !c.key {
                    return (*action != Action::Drop).then_some(Value::Null);
                }
                match (action, v) {
                    (Action::Drop, _) => None,
                    (Action::Keep, v) => Some(v.clone()),
                    (Action::Null, _) => Some(Value::Null),
                    (Action::Redact(_), Value::Null) => Some(Value::Null),
                    (Action::Redact(text), _) => Some(Value::Text(text.clone())),
                    (Action::Hash, Value::Text(s)) => Some(Value::Text(self.hash(s))),
                    (Action::Hash, other) => Some(other.clone()),
                }
            })
            .collect()
    }

    /// A fingerprint of the hash key (the first 16 hex digits of its HMAC
    /// of a fixed text), so regions can compare keys without showing them;
    /// `None` without a key. Regions with different keys hash the same
    /// value differently.
    pub fn key_fingerprint(&self) -> Option<String> {
        self.hash_key.as_ref()?;
        let mut h = self.hash("meridian: hash key fingerprint");
        h.truncate(16);
        Some(h)
    }

    /// HMAC-SHA256 of a value's text, as hex. Without a key (refused by
    /// validation whenever a rule hashes) the value is withheld instead.
    fn hash(&self, value: &str) -> String {
        let Some(key) = &self.hash_key else {
            return String::new();
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut out = String::with_capacity(64);
        for b in digest {
            out.push(char::from_digit((b >> 4) as u32, 16).expect("hex"));
            out.push(char::from_digit((b & 15) as u32, 16).expect("hex"));
        }
        out
    }

    /// Says, column by column, what of `row` would reach `destination` and
    /// which rule decided.
    pub fn explain(
        &self,
        table: &Table,
        source: &str,
        destination: &str,
        row: &Row,
    ) -> Explanation<'_> {
        let (rule, home) = match self.decide(table, source, destination, row) {
            Decision::Send(rule) if !self.is_global(table) => (Some(rule), false),
            Decision::Home if !self.is_global(table) => (None, true),
            _ => (None, false),
        };
        let columns = table
            .columns
            .iter()
            .zip(row)
            .map(|(c, v)| {
                if home {
                    return (
                        c.name.clone(),
                        "keep (row goes home)".to_owned(),
                        Some(v.clone()),
                    );
                }
                let Some(rule) = rule else {
                    return (c.name.clone(), "blocked".to_owned(), None);
                };
                let action = match rule.columns.get(&c.name) {
                    None => "not named: closed by default".to_owned(),
                    Some(Action::Redact(_)) => "redact".to_owned(),
                    Some(a) => format!("{a:?}").to_lowercase(),
                };
                let sent = rule
                    .columns
                    .get(&c.name)
                    .filter(|a| **a != Action::Drop)
                    .map(|_| {
                        let single = Table {
                            columns: vec![c.clone()],
                            ..table.clone()
                        };
                        self.transform(&single, rule, &vec![v.clone()], false)
                            .remove(0)
                    });
                (c.name.clone(), action, sent)
            })
            .collect();
        Explanation {
            rule,
            home,
            global: self.is_global(table),
            columns,
        }
    }

    /// The receiver's check: every change in `transactions`, sent by
    /// `source` to `me`, must be one this policy lets reach `me` in the form
    /// it arrived. The first violation is returned.
    pub fn check(
        &self,
        source: &str,
        me: &str,
        transactions: &[Transaction],
    ) -> Result<(), Violation> {
        for change in transactions.iter().flat_map(|t| &t.changes) {
            let table = &change.table;
            let name = || format!("{}.{}", table.schema, table.name);
            if self.is_global(table) {
                return Err(Violation(format!(
                    "{} is global and never replicated by agents",
                    name()
                )));
            }
            let Some((_, rules)) = self.entry(table) else {
                return Err(Violation(format!(
                    "{} is not a replicated table here",
                    name()
                )));
            };
            let mut rules = rules
                .iter()
                .map(|&i| &self.policy.rules[i])
                .filter(|r| r.to.iter().any(|t| t == me));
            let (row, key_only) = match &change.kind {
                ChangeKind::Insert { new } | ChangeKind::Update { new, .. } => (new, false),
                ChangeKind::Delete { old } => (old, true),
            };
            if self.home_of(table, row) == Some(me) {
                continue; // a row may always come home
            }
            let allowed = rules.any(|rule| {
                let fits =
                    |row: &Row, key_only: bool| {
                        table.columns.iter().zip(row).all(|(c, v)| {
                            match rule.columns.get(&c.name) {
                                None | Some(Action::Drop) => false,
                                Some(_) if key_only && !c.key => *v == Value::Null,
                                Some(Action::Keep) => true,
                                Some(Action::Null) => *v == Value::Null,
                                Some(Action::Redact(t)) => {
                                    matches!(v, Value::Null | Value::Unchanged)
                                        || matches!(v, Value::Text(s) if s == t)
                                }
                                Some(Action::Hash) => match v {
                                    Value::Text(h) => {
                                        h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit())
                                    }
                                    _ => true,
                                },
                            }
                        })
                    };
                let old_fits = match &change.kind {
                    ChangeKind::Update { old: Some(old), .. } => fits(old, true),
                    _ => true,
                };
                fits(row, key_only)
                    && old_fits
                    && (key_only || self.admits(rule, table, source, row))
            });
            if !allowed {
                return Err(Violation(format!(
                    "a change to {} from {source} is not allowed to reach {me} in the form it arrived (columns: {}); nothing of the batch was applied",
                    name(),
                    table
                        .columns
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
        Ok(())
    }

    /// The home region a row image names, if it has one.
    fn home_of<'r>(&self, table: &Table, row: &'r Row) -> Option<&'r str> {
        let (home_column, _) = self.entry(table)?;
        let i = table.columns.iter().position(|c| c.name == *home_column)?;
        match &row[i] {
            Value::Text(h) => Some(h.as_str()),
            _ => None,
        }
    }

    /// Whether `rule` admits a received row: home region and the conditions
    /// on columns that crossed unchanged (others were checked by the sender).
    fn admits(&self, rule: &Rule, table: &Table, source: &str, row: &Row) -> bool {
        let home_column = self
            .entry(table)
            .map(|(h, _)| h.as_str())
            .unwrap_or_default();
        let home = table
            .columns
            .iter()
            .position(|c| c.name == home_column)
            .and_then(|i| match &row[i] {
                Value::Text(h) => Some(h.as_str()),
                _ => None,
            })
            .unwrap_or(source);
        rule.from.iter().any(|f| f == home)
            && rule.when.iter().all(|c| {
                rule.columns.get(c.column()) != Some(&Action::Keep)
                    || !table.columns.iter().any(|col| col.name == c.column())
                    || holds(c, table, row, false)
            })
    }
}

/// The table as a destination sees it under `rule`: only the columns that
/// cross.
fn projected(table: &Table, rule: &Rule) -> Table {
    Table {
        schema: table.schema.clone(),
        name: table.name.clone(),
        columns: table
            .columns
            .iter()
            .filter(|c| matches!(rule.columns.get(&c.name), Some(a) if *a != Action::Drop))
            .cloned()
            .collect(),
    }
}

fn holds(condition: &Condition, table: &Table, row: &Row, partial: bool) -> bool {
    let Some(i) = table
        .columns
        .iter()
        .position(|c| c.name == condition.column())
    else {
        return false;
    };
    if partial && !table.columns[i].key {
        return false;
    }
    match (condition, &row[i]) {
        (_, Value::Unchanged) => false,
        (Condition::Equals { value, .. }, Value::Text(v)) => v == value,
        (Condition::In { values, .. }, Value::Text(v)) => values.iter().any(|x| x == v),
        (Condition::IsNull { null, .. }, v) => (*v == Value::Null) == *null,
        _ => false,
    }
}

#[cfg(test)]
mod tests;
