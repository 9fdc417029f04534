//! The client's errors. Each says what happened and what to do.

use std::time::Duration;

use meridian_core::Lsn;

use crate::UnknownCommit;

/// What went wrong. Database errors that carry a meaning for routing are
/// turned into their own variants; everything else stays [`Error::Database`].
/// Each message says what to do; print errors with their `Display` form
/// (an `anyhow::Result` from `main` does).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The topology or policy could not be read.
    #[error("{0}")]
    Config(String),
    #[error("unknown region {region:?}; the topology defines {known}")]
    UnknownRegion { region: String, known: String },
    #[error(
        "the topology has no [global] database; add `[global] store = \"postgres://...\"` \
         (or set MERIDIAN_GLOBAL_STORE) to use placements and the global path"
    )]
    NoGlobalDatabase,
    #[error(
        "tenant {tenant:?} has no placement; create one with \
         `meridian placement set --config FILE {tenant} REGION`"
    )]
    NoPlacement { tenant: String },
    /// The home store does not know the tenant (a placement push failed).
    #[error(
        "region {region} has not been told tenant {tenant:?}'s placement; rerun \
         `meridian placement set --config FILE {tenant} REGION` to push it"
    )]
    PlacementNotPushed { tenant: String, region: String },
    /// The placement changed again while this write was being routed.
    #[error("tenant {tenant:?} is moving between regions; retry the write")]
    PlacementMoving { tenant: String },
    /// A routed write touched a row of another home region: inserted one,
    /// updated or deleted one (a region's copy of another region's row is
    /// read-only), or changed a row's home outside a row move.
    #[error("write refused: {detail}{}", hint_suffix(.hint))]
    WrongHome {
        /// The store's words: table, the row's home, the tenant's home.
        detail: String,
        /// What to do instead.
        hint: Option<String>,
    },
    /// A routed write touched a global table.
    #[error(
        "write refused: {table} is a global table (it lives in the multi-region database); \
         write it with client.global().transaction(...)"
    )]
    GlobalTable { table: String },
    /// A read waited for a commit token's position and gave up.
    #[error(
        "not yet replicated: region {region} has applied {source_region} up to {applied}, \
         without the token's transaction (at or after {wanted}); gave up after {waited:?} (the \
         link {source_region} -> {region} may be down or lagging; `meridian status` shows it)"
    )]
    NotYetReplicated {
        region: String,
        source_region: String,
        wanted: Lsn,
        applied: Lsn,
        waited: Duration,
    },
    /// The region applied what the token's region committed well after the
    /// token, but never the token's transaction: it did not commit (a
    /// token taken before commit, a rolled-back write) or the token was
    /// altered. Waiting longer does not help.
    #[error(
        "region {region} applied {source_region}'s transactions committed well after this token, \
         but never its own: the transaction did not commit (a token is valid only from a \
         successful commit), or the token was altered"
    )]
    TokenNotFound {
        region: String,
        source_region: String,
    },
    /// The region moved past the token's position, but a transaction from
    /// the token's region at or before it was set aside as a dead letter
    /// there: the write the token stands for may not have applied.
    #[error(
        "region {region} set aside a transaction from {source_region} at or before this token \
         (dead letter {dead_letter}); the write may be missing there until an operator replays it \
         (`meridian dead-letters show --region {region} {dead_letter}`)"
    )]
    DeadLettered {
        region: String,
        source_region: String,
        wanted: Lsn,
        dead_letter: i64,
    },
    /// COMMIT was sent but no answer came back (the connection broke): the
    /// transaction may or may not have committed. Do not retry blindly;
    /// ask [`crate::Client::commit_outcome`].
    #[error(
        "the outcome of a commit in {} is unknown: the connection failed after COMMIT was sent \
         ({source}); the write may have committed. Do not retry blindly: ask \
         client.commit_outcome(..) about transaction {} in {}",
        .commit.store, .commit.xid, .commit.store
    )]
    CommitOutcomeUnknown {
        commit: Box<UnknownCommit>,
        source: sqlx::Error,
    },
    /// The global path kept failing with serialization errors.
    #[error(
        "global transaction gave up after {attempts} attempt{} ending in serialization \
         failures (raise Options::global_max_attempts, or make the transaction touch \
         fewer contended rows); last: {}",
        if *.attempts == 1 { "" } else { "s" }, store_message(.last)
    )]
    RetriesExhausted { attempts: u32, last: sqlx::Error },
    #[error("bad commit token {token:?}: {problem}")]
    BadToken { token: String, problem: String },
    /// The caller's closure gave up for its own reasons.
    #[error("{0}")]
    Aborted(Box<dyn std::error::Error + Send + Sync>),
    /// Any other error of a store or of the connection to it. The message
    /// keeps the store's HINT; not its DETAIL, which may quote row values
    /// ("Failing row contains ...") the residency policy keeps in their
    /// region (the sqlx error inside still has it).
    #[error("{}", store_message(.0))]
    Database(#[source] sqlx::Error),
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref()
        .map_or_else(String::new, |h| format!(" (hint: {h})"))
}

/// A store error with its HINT, which sqlx's Display drops. Not its
/// DETAIL: that may quote row values.
fn store_message(e: &sqlx::Error) -> String {
    let sqlx::Error::Database(db) = e else {
        return e.to_string();
    };
    let mut text = db.message().to_owned();
    if let Some(hint) = db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .and_then(|pg| pg.hint())
    {
        text.push_str(&format!(" (hint: {hint})"));
    }
    if let Some(code) = db.code() {
        text.push_str(&format!(" [SQLSTATE {code}]"));
    }
    text
}

/// Store errors that carry a routing meaning become their own variants
/// (a refused row, a global table); the rest stay [`Error::Database`].
impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        let sqlx::Error::Database(db) = &e else {
            return Error::Database(e);
        };
        let message = db.message();
        match db.code().as_deref() {
            Some("MR001") => Error::WrongHome {
                detail: message.to_owned(),
                hint: db
                    .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                    .and_then(|pg| pg.hint())
                    .map(str::to_owned),
            },
            Some("MR002") => Error::GlobalTable {
                table: message
                    .split_once(" is a global table")
                    .map_or(message, |(t, _)| t)
                    .replace('"', ""),
            },
            _ => Error::Database(e),
        }
    }
}

impl Error {
    /// Wraps an application error, to abort a transaction from a closure.
    pub fn aborted(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Error {
        Error::Aborted(error.into())
    }

    /// Whether running the same operation again, unchanged, may succeed: a
    /// serialization failure or deadlock, a placement that moved meanwhile,
    /// a read whose write has not arrived yet, a store that could not be
    /// reached. Never true for [`Error::CommitOutcomeUnknown`] (find out
    /// first) or for refusals.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::PlacementMoving { .. } | Error::NotYetReplicated { .. } => true,
            Error::Database(e) => {
                crate::retry::is_retryable(e)
                    || matches!(
                        e,
                        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_)
                    )
            }
            _ => false,
        }
    }

    /// Whether Meridian refused the operation by design: a row of another
    /// home region, a global table on the routed path, a tenant without a
    /// placement, a TRUNCATE of a replicated table. Retrying never helps;
    /// the message says what to do instead.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            Error::WrongHome { .. }
                | Error::GlobalTable { .. }
                | Error::NoPlacement { .. }
                | Error::PlacementNotPushed { .. }
        ) || self.sqlstate().as_deref() == Some("MR005")
    }

    /// The SQLSTATE of a database error.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Error::Database(e) => sqlstate(e),
            Error::RetriesExhausted { last, .. } => sqlstate(last),
            _ => None,
        }
    }
}

pub(crate) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Turns a store error inside a routed write into what it means.
pub(crate) fn routed(error: Error, tenant: &str, home: &str, global: &[String]) -> Error {
    let Error::Database(sqlx::Error::Database(db)) = &error else {
        return error;
    };
    let message = db.message();
    match db.code().as_deref() {
        Some("MR004") => Error::PlacementNotPushed {
            tenant: tenant.to_owned(),
            region: home.to_owned(),
        },
        // relation "x" does not exist: a global table has no copy here
        Some("42P01") => match undefined_relation(message).and_then(|r| global_match(r, global)) {
            Some(table) => Error::GlobalTable { table },
            None => error,
        },
        _ => error,
    }
}

fn undefined_relation(message: &str) -> Option<&str> {
    let rest = message.strip_prefix("relation \"")?;
    rest.split_once('"').map(|(name, _)| name)
}

/// The global table `relation` names, given as `table` or `schema.table`.
fn global_match(relation: &str, global: &[String]) -> Option<String> {
    global
        .iter()
        .find(|g| {
            *g == relation
                || g.split_once('.')
                    .is_some_and(|(schema, table)| table == relation && schema == "public")
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_global_tables_from_unknown_relation_messages() {
        let global = vec!["public.plans".to_owned(), "billing.rates".to_owned()];
        let relation = undefined_relation(r#"relation "plans" does not exist"#).unwrap();
        assert_eq!(
            global_match(relation, &global).as_deref(),
            Some("public.plans")
        );
        assert_eq!(
            global_match("billing.rates", &global).as_deref(),
            Some("billing.rates")
        );
        assert_eq!(
            global_match("rates", &global),
            None,
            "rates is not on the search path"
        );
        assert_eq!(global_match("orders", &global), None);
        assert_eq!(undefined_relation("syntax error"), None);
    }
}
