//! Random workloads and their model: transactions in each row's home
//! region (inserts, updates that leave large values alone, primary-key
//! changes, deletes, delete-and-reinsert, multi-row and multi-table
//! transactions, home changes), and the rows they leave behind.

use std::collections::{BTreeMap, HashMap};

use super::policy::PolicyModel;
use super::rng::Rng;
use super::schema::{Kind, REGIONS, Schema, Shapes, Table, Val, key_value, literal, plain_value};

/// A row's key: the key columns' text forms, in primary-key order.
pub(crate) type Key = Vec<String>;

/// Every row, by (table, key): a value per column (`None` for columns the
/// store generates).
pub(crate) type Rows = BTreeMap<(usize, Key), Vec<Val>>;

#[derive(Clone, Debug)]
pub(crate) enum Op {
    Insert {
        table: usize,
        rows: Vec<Vec<Val>>,
    },
    /// One statement for every key; a key change has exactly one key.
    Update {
        table: usize,
        keys: Vec<Key>,
        set: Vec<(usize, Val)>,
    },
    Delete {
        table: usize,
        keys: Vec<Key>,
    },
    /// `SET home = home` on the copy a non-home region holds (key as it is
    /// there): changes nothing, so nothing anywhere may change.
    TouchCopy {
        table: usize,
        key: Key,
    },
}

impl Op {
    pub(crate) fn table(&self) -> usize {
        match self {
            Op::Insert { table, .. }
            | Op::Update { table, .. }
            | Op::Delete { table, .. }
            | Op::TouchCopy { table, .. } => *table,
        }
    }

    pub(crate) fn sql(&self, schema: &Schema) -> String {
        let t = &schema.tables[self.table()];
        match self {
            Op::Insert { rows, .. } => {
                let cols: Vec<usize> = (0..t.columns.len())
                    .filter(|&i| t.columns[i].writable())
                    .collect();
                let values: Vec<String> = rows
                    .iter()
                    .map(|r| {
                        let vs: Vec<String> = cols
                            .iter()
                            .map(|&i| literal(&r[i], t.columns[i].ty))
                            .collect();
                        format!("({})", vs.join(", "))
                    })
                    .collect();
                format!(
                    "INSERT INTO {} ({}) VALUES {}",
                    t.qualified(),
                    cols.iter()
                        .map(|&i| t.columns[i].name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    values.join(", ")
                )
            }
            Op::Update { keys, set, .. } => format!(
                "UPDATE {} SET {} WHERE {}",
                t.qualified(),
                set.iter()
                    .map(|(c, v)| format!(
                        "{} = {}",
                        t.columns[*c].name,
                        literal(v, t.columns[*c].ty)
                    ))
                    .collect::<Vec<_>>()
                    .join(", "),
                key_condition(t, keys)
            ),
            Op::Delete { keys, .. } => {
                format!(
                    "DELETE FROM {} WHERE {}",
                    t.qualified(),
                    key_condition(t, keys)
                )
            }
            Op::TouchCopy { key, .. } => format!(
                "UPDATE {} SET home = home WHERE {}",
                t.qualified(),
                key_condition(t, std::slice::from_ref(key))
            ),
        }
    }
}

pub(crate) fn key_condition(t: &Table, keys: &[Key]) -> String {
    let names = t.key_names();
    let tuple = |k: &Key| {
        k.iter()
            .zip(&t.key)
            .map(|(v, &i)| literal(&Some(v.clone()), t.columns[i].ty))
            .collect::<Vec<_>>()
    };
    if keys.len() == 1 {
        names
            .iter()
            .zip(tuple(&keys[0]))
            .map(|(n, v)| format!("{n} = {v}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    } else {
        format!(
            "({}) IN ({})",
            names.join(", "),
            keys.iter()
                .map(|k| format!("({})", tuple(k).join(", ")))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

pub(crate) fn key_of(t: &Table, row: &[Val]) -> Key {
    t.key
        .iter()
        .map(|&i| row[i].clone().expect("key values are never NULL"))
        .collect()
}

#[derive(Clone, Debug)]
pub(crate) struct Txn {
    pub(crate) region: usize,
    pub(crate) ops: Vec<Op>,
}

#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub(crate) txns: Vec<Txn>,
}

/// What a region must see before it runs a transaction: a row that moved
/// to it has arrived (its home column names the region).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Wait {
    pub(crate) table: usize,
    pub(crate) key: Key,
    /// The transaction (index in the workload) that wrote the row last, in
    /// the row's previous home.
    pub(crate) after_txn: usize,
    /// That previous home.
    pub(crate) from_region: usize,
}

/// One row's history (see [`Workload::lineage`]).
#[derive(Clone, Debug)]
pub(crate) struct Lineage {
    pub(crate) table: usize,
    pub(crate) keys: Vec<Key>,
    /// In the order it first had them.
    pub(crate) homes: Vec<usize>,
    pub(crate) deleted: bool,
}

impl Lineage {
    /// Where the row lives now: its home region and key (none if deleted).
    pub(crate) fn current(&self, rows: &Rows, schema: &Schema) -> Option<(usize, Key)> {
        if self.deleted {
            return None;
        }
        let t = &schema.tables[self.table];
        let key = self.keys.last().expect("a key");
        let row = rows.get(&(self.table, key.clone()))?;
        let home = REGIONS
            .iter()
            .position(|h| row[t.home].as_deref() == Some(*h))?;
        Some((home, key.clone()))
    }
}

/// Applies one operation to the model.
pub(crate) fn apply(schema: &Schema, rows: &mut Rows, op: &Op) {
    let t = &schema.tables[op.table()];
    match op {
        Op::Insert { table, rows: new } => {
            for r in new {
                let previous = rows.insert((*table, key_of(t, r)), r.clone());
                assert!(previous.is_none(), "the generator inserts fresh keys only");
            }
        }
        Op::Update { table, keys, set } => {
            for k in keys {
                let mut r = rows
                    .remove(&(*table, k.clone()))
                    .expect("updated row exists");
                for (c, v) in set {
                    r[*c] = v.clone();
                }
                let previous = rows.insert((*table, key_of(t, &r)), r);
                assert!(previous.is_none(), "key changes go to fresh keys");
            }
        }
        Op::Delete { table, keys } => {
            for k in keys {
                rows.remove(&(*table, k.clone()))
                    .expect("deleted row exists");
            }
        }
        Op::TouchCopy { .. } => {}
    }
}

impl Workload {
    /// The rows the workload leaves behind.
    pub(crate) fn final_rows(&self, schema: &Schema) -> Rows {
        let mut rows = Rows::new();
        for txn in &self.txns {
            for op in &txn.ops {
                apply(schema, &mut rows, op);
            }
        }
        rows
    }

    /// Every row's history: the keys it had and the regions it was homed in
    /// (a row deleted and inserted again with the same key is a new row).
    pub(crate) fn lineage(&self, schema: &Schema) -> Vec<Lineage> {
        let mut rows = Rows::new();
        let mut live: HashMap<(usize, Key), usize> = HashMap::new();
        let mut out: Vec<Lineage> = Vec::new();
        for txn in &self.txns {
            for op in &txn.ops {
                let t = &schema.tables[op.table()];
                match op {
                    Op::Insert { table, rows: new } => {
                        for r in new {
                            live.insert((*table, key_of(t, r)), out.len());
                            out.push(Lineage {
                                table: *table,
                                keys: vec![key_of(t, r)],
                                homes: vec![txn.region],
                                deleted: false,
                            });
                        }
                    }
                    Op::Update { table, keys, set } => {
                        for k in keys {
                            let id = live.remove(&(*table, k.clone())).expect("live row");
                            let mut r = rows[&(*table, k.clone())].clone();
                            for (c, v) in set {
                                r[*c] = v.clone();
                            }
                            let key = key_of(t, &r);
                            let home = REGIONS
                                .iter()
                                .position(|h| r[t.home].as_deref() == Some(*h))
                                .expect("home");
                            let l = &mut out[id];
                            if !l.keys.contains(&key) {
                                l.keys.push(key.clone());
                            }
                            if !l.homes.contains(&home) {
                                l.homes.push(home);
                            }
                            live.insert((*table, key), id);
                        }
                    }
                    Op::Delete { table, keys } => {
                        for k in keys {
                            let id = live.remove(&(*table, k.clone())).expect("live row");
                            out[id].deleted = true;
                        }
                    }
                    Op::TouchCopy { .. } => {}
                }
                apply(schema, &mut rows, op);
            }
        }
        out
    }

    /// Per transaction, the rows its region must wait for: rows it touches
    /// that another region wrote last (they moved here).
    pub(crate) fn waits(&self, schema: &Schema) -> Vec<Vec<Wait>> {
        let mut rows = Rows::new();
        // (table, key) -> (region, transaction) that wrote the row last
        let mut writer: HashMap<(usize, Key), (usize, usize)> = HashMap::new();
        let mut out = Vec::new();
        for (ti, txn) in self.txns.iter().enumerate() {
            let mut waits = Vec::new();
            for op in &txn.ops {
                if let Op::Update { table, keys, .. } | Op::Delete { table, keys } = op {
                    for k in keys {
                        if let Some(&(region, after)) = writer.get(&(*table, k.clone()))
                            && region != txn.region
                        {
                            let w = Wait {
                                table: *table,
                                key: k.clone(),
                                after_txn: after,
                                from_region: region,
                            };
                            if !waits.contains(&w) {
                                waits.push(w);
                            }
                        }
                    }
                }
                let t = &schema.tables[op.table()];
                match op {
                    Op::Insert { table, rows: new } => {
                        for r in new {
                            writer.insert((*table, key_of(t, r)), (txn.region, ti));
                        }
                    }
                    Op::Update { table, keys, set } => {
                        for k in keys {
                            writer.remove(&(*table, k.clone()));
                            let mut r = rows[&(*table, k.clone())].clone();
                            for (c, v) in set {
                                r[*c] = v.clone();
                            }
                            writer.insert((*table, key_of(t, &r)), (txn.region, ti));
                        }
                    }
                    Op::Delete { table, keys } => {
                        for k in keys {
                            writer.remove(&(*table, k.clone()));
                        }
                    }
                    Op::TouchCopy { .. } => {}
                }
                apply(schema, &mut rows, op);
            }
            out.push(waits);
        }
        out
    }

    /// Only the operations on `tables`.
    pub(crate) fn only_tables(&self, tables: &[usize]) -> Workload {
        Workload {
            txns: self
                .txns
                .iter()
                .map(|t| Txn {
                    region: t.region,
                    ops: t
                        .ops
                        .iter()
                        .filter(|o| tables.contains(&o.table()))
                        .cloned()
                        .collect(),
                })
                .filter(|t| !t.ops.is_empty())
                .collect(),
        }
    }

    /// The first `n` transactions.
    pub(crate) fn prefix(&self, n: usize) -> Workload {
        Workload {
            txns: self.txns[..n.min(self.txns.len())].to_vec(),
        }
    }

    /// The workload as SQL, one transaction after another in generation
    /// order, each saying where it runs and what it waits for.
    pub(crate) fn sql(&self, schema: &Schema) -> String {
        let waits = self.waits(schema);
        let mut out = String::new();
        for (i, (txn, w)) in self.txns.iter().zip(&waits).enumerate() {
            out.push_str(&format!("-- txn {i} in {}", REGIONS[txn.region]));
            if !w.is_empty() {
                let shown: Vec<String> = w
                    .iter()
                    .map(|w| format!("{} {:?}", schema.tables[w.table].name, w.key))
                    .collect();
                out.push_str(&format!(
                    " (after waiting for {} with home = '{}' there)",
                    shown.join(", "),
                    REGIONS[txn.region]
                ));
            }
            out.push_str("\nBEGIN;\n");
            for op in &txn.ops {
                out.push_str(&op.sql(schema));
                out.push_str(";\n");
            }
            out.push_str("COMMIT;\n\n");
        }
        out
    }
}

/// Generates `n` transactions. Each runs in one region and writes only rows
/// homed there (in the model's global order; a region waits for rows that
/// moved to it, see [`Workload::waits`]).
pub(crate) fn generate(
    rng: &mut Rng,
    schema: &Schema,
    policy: &PolicyModel,
    shapes: &Shapes,
    n: usize,
) -> Workload {
    let mut rows = Rows::new();
    let mut counter: u64 = 1;
    let mut txns = Vec::new();
    for _ in 0..n {
        let region = rng.index(REGIONS.len());
        let mut ops = Vec::new();
        let op_count = 1 + rng.index(4);
        for _ in 0..op_count {
            let ti = rng.index(schema.tables.len());
            let t = &schema.tables[ti];
            let mine: Vec<Key> = rows
                .iter()
                .filter(|((tt, _), r)| *tt == ti && r[t.home].as_deref() == Some(REGIONS[region]))
                .map(|((_, k), _)| k.clone())
                .collect();
            let can_move = (t.full_identity || shapes.default_identity_scope_changes)
                && (!policy.key_hashed[ti] || shapes.home_changes_of_hashed_key_rows);
            let roll = rng.below(100);
            let op = if mine.is_empty() || roll < 30 || (mine.len() < 4 && roll < 45) {
                let n = if rng.chance(25) { 2 + rng.index(3) } else { 1 };
                let new = (0..n)
                    .map(|_| new_row(rng, t, region, &mut counter))
                    .collect();
                Op::Insert {
                    table: ti,
                    rows: new,
                }
            } else if roll < 60 {
                let key = rng.pick(&mine).clone();
                Op::Update {
                    table: ti,
                    keys: vec![key],
                    set: plain_changes(rng, t),
                }
            } else if roll < 66 && mine.len() >= 2 {
                let mut keys = mine.clone();
                rng.shuffle(&mut keys);
                keys.truncate(2 + rng.index(2));
                Op::Update {
                    table: ti,
                    keys,
                    set: plain_changes(rng, t),
                }
            } else if roll < 74 {
                // primary-key change, sometimes with other columns
                let key = rng.pick(&mine).clone();
                let mut set: Vec<(usize, Val)> = Vec::new();
                for &k in &t.key {
                    if set.is_empty() || rng.chance(50) {
                        set.push((k, Some(key_value(rng, t.columns[k].ty, counter))));
                    }
                }
                counter += 1;
                if rng.chance(40) {
                    set.extend(plain_changes(rng, t));
                }
                Op::Update {
                    table: ti,
                    keys: vec![key],
                    set,
                }
            } else if roll < 84 {
                let key = rng.pick(&mine).clone();
                if rng.chance(25) {
                    // delete and insert the same key again, in one transaction
                    ops.push(Op::Delete {
                        table: ti,
                        keys: vec![key.clone()],
                    });
                    apply(schema, &mut rows, ops.last().expect("pushed"));
                    let mut row = new_row(rng, t, region, &mut counter);
                    for (&k, v) in t.key.iter().zip(&key) {
                        row[k] = Some(v.clone());
                    }
                    Op::Insert {
                        table: ti,
                        rows: vec![row],
                    }
                } else {
                    let mut keys = vec![key];
                    if rng.chance(20) && mine.len() >= 2 {
                        let other = rng.pick(&mine).clone();
                        if other != keys[0] {
                            keys.push(other);
                        }
                    }
                    Op::Delete { table: ti, keys }
                }
            } else if roll < 94 && can_move {
                let key = rng.pick(&mine).clone();
                let to = (region + 1 + rng.index(2)) % REGIONS.len();
                let mut set = vec![(t.home, Some(REGIONS[to].to_owned()))];
                if rng.chance(40) {
                    set.extend(plain_changes(rng, t));
                }
                Op::Update {
                    table: ti,
                    keys: vec![key],
                    set,
                }
            } else if shapes.writes_to_foreign_homed_copies && !policy.key_hashed[ti] {
                let theirs: Vec<Key> = rows
                    .iter()
                    .filter(|((tt, _), r)| {
                        *tt == ti && r[t.home].as_deref() != Some(REGIONS[region])
                    })
                    .map(|((_, k), _)| k.clone())
                    .collect();
                if theirs.is_empty() {
                    continue;
                }
                Op::TouchCopy {
                    table: ti,
                    key: rng.pick(&theirs).clone(),
                }
            } else {
                let key = rng.pick(&mine).clone();
                Op::Update {
                    table: ti,
                    keys: vec![key],
                    set: plain_changes(rng, t),
                }
            };
            apply(schema, &mut rows, &op);
            ops.push(op);
        }
        if !ops.is_empty() {
            txns.push(Txn { region, ops });
        }
    }
    Workload { txns }
}

fn new_row(rng: &mut Rng, t: &Table, region: usize, counter: &mut u64) -> Vec<Val> {
    let row = t
        .columns
        .iter()
        .map(|c| match c.kind {
            Kind::Key => Some(key_value(rng, c.ty, *counter)),
            Kind::Home => Some(REGIONS[region].to_owned()),
            Kind::Plain => plain_value(rng, c),
            Kind::Identity | Kind::Stored { .. } => None,
        })
        .collect();
    *counter += 1;
    row
}

/// New values for 1-3 plain columns (large ones only now and then, so most
/// updates leave a TOASTed value unchanged).
fn plain_changes(rng: &mut Rng, t: &Table) -> Vec<(usize, Val)> {
    let all: Vec<usize> = (0..t.columns.len())
        .filter(|&i| t.columns[i].kind == Kind::Plain)
        .collect();
    let mut chosen: Vec<usize> = all
        .iter()
        .copied()
        .filter(|&i| !t.columns[i].large || rng.chance(20))
        .collect();
    if chosen.is_empty() {
        chosen = all;
    }
    rng.shuffle(&mut chosen);
    chosen.truncate(1 + rng.index(3.min(chosen.len())));
    chosen
        .into_iter()
        .map(|c| (c, plain_value(rng, &t.columns[c])))
        .collect()
}
