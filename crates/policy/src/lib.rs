//! Data-residency policy: which rows and columns may leave their home region,
//! for which destination, and in what form. Pure: no I/O, no clock; the hash
//! key is passed in by the caller, who reads it from the environment.
//!
//! Deny by default: a row crosses to a destination only when a rule for its
//! table, its home region and that destination matches it, and only the
//! columns that rule names cross, each as the rule says (`keep`, `hash`,
//! `null`, `redact`). A column the rule does not name (for example one added
//! to the table after the policy was written) does not cross.
//!
//! - [`file`]: the policy file format, parsing, and validation with
//!   file:line:column diagnostics.
//! - [`evaluate`]: decisions and transformations per destination (sender),
//!   and the re-check of what arrived (receiver).
//! - [`diff`]: what a policy change does to each route (table, source,
//!   destination): newly sent, no longer sent, column forms.
//! - [`fit`]: whether the column actions fit the store's column types and
//!   nullability.

pub mod diff;
pub mod evaluate;
pub mod file;
pub mod fit;

pub use evaluate::{Decision, Enforcer, Explanation, Verdict, Violation};
pub use file::{Action, Condition, Diagnostic, Policy, Rule};
