//! Initial sync: the pure parts of copying a table's existing rows into a
//! link's stream.
//!
//! A link copies a table in *chunks*: key ranges read at the source in a
//! transaction that first takes `LOCK TABLE ... IN SHARE MODE` (which waits
//! for every transaction writing the table to end, and makes new writers
//! wait), reads the chunk, and writes a transactional logical decoding
//! message ([`MARK_PREFIX`]) naming the chunk. The lock makes the chunk's
//! rows exactly the table's state at the position of that transaction's
//! commit: every write committed before it is in the chunk, every write
//! after it commits after it. The link's capture, decoding the slot in WAL
//! order, puts the chunk's rows in place of the empty message transaction,
//! so the destination applies them at their true position: a later change
//! overwrites them, an earlier one never overwrites them, and nothing is
//! missed or applied twice out of order. The rows go through the residency
//! policy like any change.
//!
//! This module holds what needs no I/O: the mark's content, the chunk query,
//! the parser of `COPY ... TO STDOUT` text, chunk sizing, and progress.

use std::sync::Arc;

use crate::change::{Change, ChangeKind, Row, Table, Value, quote_ident};

/// Prefix of the logical decoding message that marks a chunk's position.
pub const MARK_PREFIX: &str = "meridian.snapshot";

/// A chunk's mark: the destination it is copied for, and its id.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Mark {
    pub destination: String,
    pub chunk: u128,
}

impl Mark {
    /// The message content: `<destination> <chunk id in hex>`.
    pub fn content(&self) -> String {
        format!("{} {:032x}", self.destination, self.chunk)
    }

    /// Parses [`Mark::content`]; None if the content is not one.
    pub fn parse(content: &[u8]) -> Option<Mark> {
        let text = std::str::from_utf8(content).ok()?;
        let (destination, chunk) = text.rsplit_once(' ')?;
        if destination.is_empty() || chunk.len() != 32 {
            return None;
        }
        Some(Mark {
            destination: destination.to_owned(),
            chunk: u128::from_str_radix(chunk, 16).ok()?,
        })
    }
}

/// Target size of a chunk's values: a chunk fits one capture fragment, so a
/// destination applies it in one plain transaction.
pub const CHUNK_BYTES: usize = crate::pgoutput::FRAGMENT_BYTES;
/// Most rows in a chunk (one fragment's changes).
pub const CHUNK_MAX_ROWS: usize = crate::pgoutput::FRAGMENT_CHANGES;
/// Rows read by a range's first chunk, before its rows' size is known
/// (few: a row may be megabytes).
pub const CHUNK_FIRST_ROWS: usize = 16;

/// Rows the next chunk should read, given the largest row seen so far in
/// the range: about [`CHUNK_BYTES`] of values were every row that large,
/// between 1 and [`CHUNK_MAX_ROWS`] rows. (Sizing by the largest row, not
/// the average, keeps a chunk of rows like the largest within bounds.)
pub fn next_chunk_rows(largest_row_bytes: usize) -> usize {
    match largest_row_bytes {
        0 => CHUNK_FIRST_ROWS,
        largest => (CHUNK_BYTES / largest).clamp(1, CHUNK_MAX_ROWS),
    }
}

/// A table as the initial sync reads it: the columns the publication sends
/// (not dropped, not generated), in table order.
#[derive(Clone, Debug)]
pub struct SyncTable {
    /// The table as capture describes it (name, columns, key flags).
    pub table: Arc<Table>,
    /// Each column's SQL type, as `format_type` writes it (for key literals).
    pub types: Vec<String>,
    /// The column holding each row's home region.
    pub home_column: String,
}

impl SyncTable {
    /// Positions of the key columns, in table order.
    pub fn key_indexes(&self) -> Vec<usize> {
        self.table.key_indexes().collect()
    }

    fn qualified(&self) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.table.schema),
            quote_ident(&self.table.name)
        )
    }

    fn key_list(&self) -> String {
        self.key_indexes()
            .iter()
            .map(|&i| quote_ident(&self.table.columns[i].name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A key as typed literals in parentheses, compared with `(key_list)`:
    /// a row comparison for several columns, a plain one for one column.
    fn key_literal(&self, key: &[String]) -> String {
        let parts: Vec<String> = self
            .key_indexes()
            .iter()
            .zip(key)
            .map(|(&i, v)| format!("{}::{}", literal(v), self.types[i]))
            .collect();
        format!("({})", parts.join(", "))
    }

    /// Rows homed in `source`. (Not rows with no home: every region holding
    /// a copy of one would copy it, and an older copy could overwrite the
    /// region that wrote it.)
    fn homed(&self, source: &str) -> String {
        format!("{} = {}", quote_ident(&self.home_column), literal(source))
    }

    /// The rows homed in `source`, in key order, after `after` (exclusive)
    /// and up to `upto` (inclusive), at most `limit`: the statement inside
    /// `COPY (...) TO STDOUT`.
    pub fn chunk_query(
        &self,
        source: &str,
        after: Option<&[String]>,
        upto: Option<&[String]>,
        limit: usize,
    ) -> String {
        let columns = self
            .table
            .columns
            .iter()
            .map(|c| quote_ident(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let keys = self.key_list();
        let mut query = format!(
            "SELECT {columns} FROM {} WHERE {}",
            self.qualified(),
            self.homed(source)
        );
        if let Some(after) = after {
            query += &format!(" AND ({keys}) > {}", self.key_literal(after));
        }
        if let Some(upto) = upto {
            query += &format!(" AND ({keys}) <= {}", self.key_literal(upto));
        }
        query += &format!(" ORDER BY {keys} LIMIT {limit}");
        query
    }

    /// The keys of every `step`-th row homed in `source` (in key order), at
    /// most `splits` of them: split points between ranges, in one pass
    /// over the key's index.
    pub fn split_query(&self, source: &str, step: u64, splits: u64) -> String {
        let keys = self.key_list();
        format!(
            "SELECT {keys} FROM (SELECT {keys}, row_number() OVER (ORDER BY {keys}) AS n \
             FROM {} WHERE {}) s WHERE n % {step} = 0 ORDER BY {keys} LIMIT {splits}",
            self.qualified(),
            self.homed(source),
            step = step.max(1)
        )
    }

    /// How many rows are homed in `source`.
    pub fn count_query(&self, source: &str) -> String {
        format!(
            "SELECT count(*) FROM {} WHERE {}",
            self.qualified(),
            self.homed(source)
        )
    }

    /// The chunk's rows as inserts (upserts at the destination).
    pub fn inserts(&self, rows: Vec<Row>) -> Vec<Change> {
        rows.into_iter()
            .map(|new| Change {
                table: self.table.clone(),
                kind: ChangeKind::Insert { new },
            })
            .collect()
    }

    /// The key of a row this table's chunk query returned, as text.
    pub fn key_of(&self, row: &Row) -> Option<Vec<String>> {
        self.key_indexes()
            .iter()
            .map(|&i| match &row[i] {
                Value::Text(t) => Some(t.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The statement that holds the writers of `schema.table` back while a
/// chunk is read.
pub fn lock_statement(schema: &str, table: &str) -> String {
    format!(
        "LOCK TABLE {}.{} IN SHARE MODE",
        quote_ident(schema),
        quote_ident(table)
    )
}

/// A string as an SQL literal (standard conforming strings).
pub fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A line of `COPY ... TO STDOUT` text that is not `width` fields, or holds
/// a bad escape.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("COPY text row {row}: {what}")]
pub struct CopyTextError {
    pub row: usize,
    pub what: String,
}

/// Parses `COPY ... TO STDOUT` output in text format (tab between fields, a
/// newline after each row, `\N` for NULL, backslash escapes) into rows of
/// `width` values.
pub fn parse_copy_text(data: &[u8], width: usize) -> Result<Vec<Row>, CopyTextError> {
    let mut rows = Vec::new();
    let mut row = Vec::with_capacity(width);
    let mut field: Vec<u8> = Vec::new();
    // a field that is exactly `\N`
    let mut null = false;
    let mut escaped = false;
    let mut i = 0;
    let fail = |rows: &Vec<Row>, what: String| CopyTextError {
        row: rows.len() + 1,
        what,
    };
    let finish = |field: &mut Vec<u8>, null: &mut bool, row: &mut Row| -> Result<(), String> {
        let value = if *null {
            Value::Null
        } else {
            Value::Text(
                String::from_utf8(std::mem::take(field))
                    .map_err(|_| "a value is not valid UTF-8".to_owned())?,
            )
        };
        field.clear();
        *null = false;
        row.push(value);
        Ok(())
    };
    while i < data.len() {
        let b = data[i];
        i += 1;
        if escaped {
            escaped = false;
            match b {
                b'N' if field.is_empty() => null = true,
                b'b' => field.push(8),
                b'f' => field.push(12),
                b'n' => field.push(b'\n'),
                b'r' => field.push(b'\r'),
                b't' => field.push(b'\t'),
                b'v' => field.push(11),
                b'0'..=b'7' => {
                    let mut v = (b - b'0') as u32;
                    for _ in 0..2 {
                        match data.get(i) {
                            Some(d @ b'0'..=b'7') => {
                                v = v * 8 + (d - b'0') as u32;
                                i += 1;
                            }
                            _ => break,
                        }
                    }
                    field.push(v as u8);
                }
                b'x' => {
                    let mut v = 0u32;
                    let mut digits = 0;
                    while digits < 2 {
                        match data.get(i).and_then(|d| (*d as char).to_digit(16)) {
                            Some(d) => {
                                v = v * 16 + d;
                                i += 1;
                                digits += 1;
                            }
                            None => break,
                        }
                    }
                    if digits == 0 {
                        field.push(b'x');
                    } else {
                        field.push(v as u8);
                    }
                }
                other => field.push(other),
            }
            continue;
        }
        if null && b != b'\t' && b != b'\n' {
            return Err(fail(&rows, "text follows \\N in a field".into()));
        }
        match b {
            b'\\' => escaped = true,
            b'\t' => finish(&mut field, &mut null, &mut row).map_err(|w| fail(&rows, w))?,
            b'\n' => {
                finish(&mut field, &mut null, &mut row).map_err(|w| fail(&rows, w))?;
                if row.len() != width {
                    return Err(fail(
                        &rows,
                        format!("{} fields, expected {width}", row.len()),
                    ));
                }
                rows.push(std::mem::replace(&mut row, Vec::with_capacity(width)));
            }
            other => field.push(other),
        }
    }
    if escaped || !field.is_empty() || null || !row.is_empty() {
        return Err(fail(&rows, "the data ends inside a row".into()));
    }
    Ok(rows)
}

/// A copy's progress as people read it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Fraction done, 0 to 1 (1 when nothing was expected).
    pub fraction: f64,
    /// Rows per second since the copy started.
    pub rows_per_second: f64,
    /// Seconds until done at that rate; None before any row moved.
    pub remaining_seconds: Option<f64>,
}

/// Progress of a copy that moved `rows` of about `expected` in `elapsed`
/// seconds. `expected` is counted when the copy starts; writes during the
/// copy can make `rows` pass it, which reads as nearly done, never as more
/// than done.
pub fn progress(rows: u64, expected: u64, elapsed: f64) -> Progress {
    let fraction = match expected {
        0 => 1.0,
        e => (rows as f64 / e as f64).min(1.0),
    };
    let rate = if elapsed > 0.0 {
        rows as f64 / elapsed
    } else {
        0.0
    };
    let remaining_seconds = (rate > 0.0).then(|| expected.saturating_sub(rows) as f64 / rate);
    Progress {
        fraction,
        rows_per_second: rate,
        remaining_seconds,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Column;
    use proptest::prelude::*;

    fn orders() -> SyncTable {
        let column = |name: &str, key| Column {
            name: name.into(),
            type_oid: 25,
            key,
        };
        SyncTable {
            table: Arc::new(Table {
                schema: "app".into(),
                name: "order lines".into(),
                columns: vec![
                    column("tenant", true),
                    column("line", true),
                    column("home", false),
                ],
            }),
            types: vec!["text".into(), "bigint".into(), "text".into()],
            home_column: "home".into(),
        }
    }

    #[test]
    fn marks_round_trip_and_refuse_other_content() {
        let mark = Mark {
            destination: "eu west".into(),
            chunk: u128::MAX - 7,
        };
        assert_eq!(Mark::parse(mark.content().as_bytes()), Some(mark));
        for bad in [
            "",
            "eu",
            " 0000",
            "eu 12",
            "eu zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            assert_eq!(Mark::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn chunk_queries_bound_the_range_by_typed_keys() {
        let t = orders();
        let after = ["it's".to_owned(), "7".to_owned()];
        let upto = ["z".to_owned(), "1".to_owned()];
        let q = t.chunk_query("na", Some(&after), Some(&upto), 500);
        assert_eq!(
            q,
            "SELECT \"tenant\", \"line\", \"home\" FROM \"app\".\"order lines\" \
             WHERE \"home\" = 'na' \
             AND (\"tenant\", \"line\") > ('it''s'::text, '7'::bigint) \
             AND (\"tenant\", \"line\") <= ('z'::text, '1'::bigint) \
             ORDER BY \"tenant\", \"line\" LIMIT 500"
        );
        assert!(!t.chunk_query("na", None, None, 1).contains(" > "));
        assert_eq!(
            lock_statement("app", "order lines"),
            "LOCK TABLE \"app\".\"order lines\" IN SHARE MODE"
        );
    }

    #[test]
    fn copy_text_escapes_and_nulls() {
        let data = b"1\t\\N\ta\\tb\\\\c\\nd\n2\t\\\\N\t\\101\\x41\\r\n";
        let rows = parse_copy_text(data, 3).unwrap();
        assert_eq!(
            rows,
            vec![
                vec![
                    Value::Text("1".into()),
                    Value::Null,
                    Value::Text("a\tb\\c\nd".into())
                ],
                vec![
                    Value::Text("2".into()),
                    Value::Text("\\N".into()),
                    Value::Text("AA\r".into())
                ],
            ]
        );
        assert_eq!(parse_copy_text(b"", 2).unwrap(), Vec::<Row>::new());
        let short = parse_copy_text(b"1\t2\n3\n", 2).unwrap_err();
        assert_eq!(short.row, 2, "{short}");
        assert!(parse_copy_text(b"1\t2", 2).is_err(), "no final newline");
        assert!(parse_copy_text(b"\\Nx\t2\n", 2).is_err());
        // an empty string is not NULL
        assert_eq!(
            parse_copy_text(b"\t\n", 2).unwrap(),
            vec![vec![Value::Text(String::new()), Value::Text(String::new())]]
        );
    }

    /// What `COPY ... TO STDOUT` writes for a value (PostgreSQL's escaping).
    fn copy_escape(v: &Value) -> String {
        match v {
            Value::Null => "\\N".into(),
            Value::Text(t) => t
                .chars()
                .map(|c| match c {
                    '\\' => "\\\\".into(),
                    '\n' => "\\n".into(),
                    '\r' => "\\r".into(),
                    '\t' => "\\t".into(),
                    '\u{8}' => "\\b".into(),
                    '\u{c}' => "\\f".into(),
                    '\u{b}' => "\\v".into(),
                    c => c.to_string(),
                })
                .collect(),
            Value::Unchanged => unreachable!(),
        }
    }

    proptest! {
        #[test]
        fn copy_text_round_trips(rows in prop::collection::vec(
            prop::collection::vec(prop_oneof![
                Just(Value::Null),
                any::<String>().prop_map(Value::Text),
                "[\\\\\\t\\n\\rN]{0,4}".prop_map(Value::Text),
            ], 3), 0..20)) {
            let text: String = rows.iter().map(|r| {
                r.iter().map(copy_escape).collect::<Vec<_>>().join("\t") + "\n"
            }).collect();
            prop_assert_eq!(parse_copy_text(text.as_bytes(), 3).unwrap(), rows);
        }

        #[test]
        fn chunks_stay_within_bounds(largest in 0usize..1 << 34) {
            let n = next_chunk_rows(largest);
            prop_assert!((1..=CHUNK_MAX_ROWS).contains(&n));
            // rows as large as the largest fill about a chunk, unless one
            // row alone is larger
            prop_assert!(n * largest <= CHUNK_BYTES.max(largest));
        }
    }

    #[test]
    fn progress_never_passes_done() {
        let p = progress(150, 100, 10.0);
        assert_eq!(p.fraction, 1.0);
        assert_eq!(p.remaining_seconds, Some(0.0));
        let p = progress(25, 100, 5.0);
        assert_eq!((p.fraction, p.rows_per_second), (0.25, 5.0));
        assert_eq!(p.remaining_seconds, Some(15.0));
        assert_eq!(progress(0, 100, 3.0).remaining_seconds, None);
        assert_eq!(progress(0, 0, 0.0).fraction, 1.0);
    }
}
