//! What a store error means for the data: dead-letter it, wait for the
//! schema, or retry. Pure: a SQLSTATE in, a decision out, and reasons that
//! never quote a value (PostgreSQL's messages for bad data do: 22P02
//! `invalid input syntax for type integer: "…"`).

/// Why data was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The data can never apply as sent (a value the column type refuses, a
    /// constraint it breaks): it belongs in `meridian.dead_letters`, from
    /// where an operator replays it once the cause is fixed. The reason names
    /// table, column or constraint and the SQLSTATE, never a value.
    #[error("store rejected the data: {reason}")]
    Rejected {
        sqlstate: Option<String>,
        reason: String,
    },
    /// The destination's schema does not fit what arrived (missing table or
    /// column, another type, a revoked grant): a schema rollout in progress or
    /// a forgotten migration. The link waits and retries; nothing is skipped.
    #[error("destination schema does not fit: {0}")]
    Schema(String),
    /// The store rejected part of a transaction too large to set aside as a
    /// dead letter (it came in fragments): nothing of it is kept and the
    /// link retries until the cause is fixed. The reason has no values.
    #[error(
        "store rejected part of a transaction too large to set aside as a dead letter: {0}; fix the cause (the link retries until then)"
    )]
    Blocked(String),
    /// The data breaks a unique constraint while a row in the way may still
    /// be removed by changes another Kafka partition has not applied yet
    /// (and that partition can move): the partition waits and retries. `at`
    /// is the refused record's position. The reason has no values.
    #[error("{reason}")]
    Waiting {
        reason: String,
        at: meridian_core::record::Position,
    },
    /// The store was unreachable or failed transiently; retry later.
    #[error("store unavailable: {}", describe_unavailable(.0))]
    Unavailable(#[from] sqlx::Error),
}

impl ApplyError {
    /// Whether the data goes to the dead-letter table (else: retry).
    pub fn is_rejected(&self) -> bool {
        matches!(self, ApplyError::Rejected { .. })
    }
}

/// What a SQLSTATE means for the data that caused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Bad data: dead-letter.
    Data,
    /// The destination's schema or grants: wait and retry.
    Schema,
    /// Connection, resources, serialization, shutdown: retry.
    Transient,
}

/// Classifies a SQLSTATE.
pub fn class(sqlstate: &str) -> Class {
    match sqlstate.get(..2).unwrap_or("") {
        // data exception, integrity constraint violation, raised by a
        // trigger the operator enabled for apply sessions
        "22" | "23" | "P0" => Class::Data,
        // syntax or access rule (undefined column or table, datatype
        // mismatch, insufficient privilege, identity column), invalid schema
        // name, feature not supported
        "42" | "3F" | "0A" | "28" => Class::Schema,
        _ => Class::Transient,
    }
}

/// A reason for an error of class [`Class::Data`] that names where it
/// happened but not the value: `table`, the column or constraint the store
/// reported, and the SQLSTATE with its condition name.
pub fn data_reason(
    table: &str,
    sqlstate: &str,
    column: Option<&str>,
    constraint: Option<&str>,
) -> String {
    let mut reason = format!("{table}: {} (SQLSTATE {sqlstate})", condition(sqlstate));
    if let Some(c) = column {
        reason.push_str(&format!(", column {c:?}"));
    }
    if let Some(c) = constraint {
        reason.push_str(&format!(", constraint {c:?}"));
    }
    reason.push_str("; the value is not shown");
    reason
}

/// PostgreSQL's condition names for the SQLSTATEs bad data produces.
fn condition(sqlstate: &str) -> &'static str {
    match sqlstate {
        "22001" => "string_data_right_truncation",
        "22003" => "numeric_value_out_of_range",
        "22004" => "null_value_not_allowed",
        "22007" => "invalid_datetime_format",
        "22008" => "datetime_field_overflow",
        "22012" => "division_by_zero",
        "22021" => "character_not_in_repertoire",
        "22023" => "invalid_parameter_value",
        "22P02" => "invalid_text_representation",
        "22P05" => "untranslatable_character",
        "23502" => "not_null_violation",
        "23503" => "foreign_key_violation",
        "23505" => "unique_violation",
        "23514" => "check_violation",
        "23P01" => "exclusion_violation",
        "P0001" => "raise_exception (a trigger refused the row)",
        s if s.starts_with("22") => "data_exception",
        s if s.starts_with("23") => "integrity_constraint_violation",
        _ => "error",
    }
}

/// An unavailable store's error, without anything a server message might
/// quote: the SQLSTATE for server errors, the driver's text otherwise.
fn describe_unavailable(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => match db.code() {
            Some(code) => format!("server error SQLSTATE {code}"),
            None => "server error".to_owned(),
        },
        other => other.to_string(),
    }
}

/// Turns a store error met while writing `table` into an [`ApplyError`].
pub(crate) fn classify(table: &str, e: sqlx::Error) -> ApplyError {
    let sqlx::Error::Database(db) = &e else {
        return ApplyError::Unavailable(e);
    };
    let code = db.code().unwrap_or_default().into_owned();
    match class(&code) {
        Class::Data => {
            let (column, constraint) =
                match db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>() {
                    Some(pg) => (pg.column(), pg.constraint()),
                    None => (None, db.constraint()),
                };
            ApplyError::Rejected {
                reason: data_reason(table, &code, column, constraint),
                sqlstate: Some(code),
            }
        }
        // class 42 messages name objects, not values
        Class::Schema => ApplyError::Schema(format!(
            "{table}: {} (SQLSTATE {code}); fix the destination's schema or grants, the link retries until then",
            db.message()
        )),
        Class::Transient => ApplyError::Unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_data_is_dead_lettered_schema_waits_transient_retries() {
        for code in ["22P02", "22001", "23505", "23502", "P0001"] {
            assert_eq!(class(code), Class::Data, "{code}");
        }
        for code in [
            "42703", "42P01", "42804", "428C9", "42501", "3F000", "0A000",
        ] {
            assert_eq!(class(code), Class::Schema, "{code}");
        }
        for code in ["40001", "40P01", "57P01", "08006", "53300", "XX000", ""] {
            assert_eq!(class(code), Class::Transient, "{code}");
        }
    }

    #[test]
    fn data_reasons_name_the_place_not_the_value() {
        let r = data_reason("public.orders", "22P02", Some("amount"), None);
        assert_eq!(
            r,
            "public.orders: invalid_text_representation (SQLSTATE 22P02), column \"amount\"; the value is not shown"
        );
    }
}
