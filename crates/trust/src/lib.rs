//! Trust between regions: who a connection speaks for, proved by its
//! certificate.
//!
//! - [`Identity`]: SPIFFE IDs in certificates (`spiffe://meridian/region/eu`,
//!   `spiffe://meridian/operator/alice`).
//! - [`tls`]: certificates and keys from files, the rustls configurations
//!   built from them, reloaded when the files change.
//! - [`net`]: an mTLS listener (with a connection cap and a handshake
//!   timeout) and dialer for tonic.
//! - [`store`]: TLS to a PostgreSQL store as libpq's `sslmode` says, for
//!   connections sqlx does not make.
//! - [`certs`]: a CA for tests, demos and first deployments.

pub mod certs;
mod identity;
pub mod net;
pub mod store;
pub mod tls;
mod verify;

pub use identity::{Identity, TRUST_DOMAIN};
