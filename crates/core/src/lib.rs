//! Meridian's pure core. Nothing in this crate does I/O, reads a clock or spawns a
//! task: values in, values out. That keeps it fast to test exhaustively.
//!
//! - [`lsn`]: PostgreSQL WAL positions.
//! - [`change`]: the change model: tables, rows, values, committed transactions.
//! - [`pgoutput`]: decodes the `pgoutput` logical replication protocol into
//!   [`change::Transaction`]s.
//! - [`codec`]: the checksummed binary encoding of a batch of transactions that
//!   agents ship to each other.
//! - [`plan`]: turns a batch into the minimal set of row operations a destination
//!   must apply (idempotent upserts and deletes by primary key).
//! - [`snapshot`]: initial sync's chunks: their marks in the WAL, queries and
//!   `COPY` text.
//! - [`topology`]: the topology file: regions, stores, agents, replicated tables.

pub mod change;
pub mod codec;
pub mod digest;
pub mod lsn;
pub mod pgoutput;
pub mod plan;
pub mod record;
pub mod scope;
pub mod snapshot;
pub mod topology;

pub use change::{Change, Column, Row, Table, Transaction, Value};
pub use lsn::Lsn;
