//! Capture: reads one region's committed changes from a PostgreSQL logical
//! replication slot with the `pgoutput` plugin.
//!
//! - [`source`]: prepares a store for capture (publication, slot, checks) over
//!   an ordinary SQL connection.
//! - [`stream`]: the replication connection itself (streaming replication
//!   protocol, `START_REPLICATION ... LOGICAL`), yielding committed
//!   transactions and reporting back the position that is safe to confirm.
//! - [`conninfo`]: connection parameters from a `postgres://` URL.
//!
//! Contract: transactions come in commit order, each exactly once per stream;
//! after a restart the stream resumes at the slot's confirmed position, so
//! transactions after it may be seen again (at-least-once). Transactions that a
//! Meridian apply session wrote (replication origin `meridian_*`) are skipped,
//! so replicated rows never loop back.

pub mod conninfo;
pub mod source;
pub mod stream;

pub use source::{ensure_publication, ensure_slot, origin_name, publication_name, slot_name};
pub use stream::{CaptureError, Next, ReplicationStream};
