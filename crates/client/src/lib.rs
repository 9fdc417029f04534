//! Meridian's client library: write through it, not around it.
//!
//! - **Routed writes**: [`Client::tenant`] runs a transaction on the tenant's
//!   home-region store, wherever the caller runs, and returns a
//!   [`CommitToken`]. The store checks every row the transaction touches,
//!   before and after: only the tenant's own rows, never a copy of another
//!   region's row, never a global table. A row changes home only through
//!   [`Tenant::move_rows`].
//! - **Read-your-writes across regions**: [`Client::read`] gives a region's
//!   store, read-only, optionally [`after`](Read::after) it applied exactly
//!   the transaction a token names.
//! - **Global consistency**: [`Client::global`] runs SERIALIZABLE
//!   transactions on the multi-region database and retries serialization
//!   failures.
//! - **Ambiguous commits** are their own error
//!   ([`Error::CommitOutcomeUnknown`]); [`Client::commit_outcome`] tells.
//!
//! # Your first service
//!
//! Start the demo (`cargo run --release -- demo`); it prints the path of
//! its topology file. Then:
//!
//! ```text
//! cargo new orders && cd orders
//! cargo add meridian-client --path ../meridian/crates/client
//! cargo add tokio --features macros,rt-multi-thread
//! cargo add anyhow
//! ```
//!
//! The client is built on sqlx 0.8 and re-exports it: write
//! `use meridian_client::sqlx;` (or depend on `sqlx = "0.8"` with the
//! `postgres` feature; a different sqlx version has different types).
//!
//! ```no_run
//! use meridian_client::{sqlx, Client, CommitToken, Error};
//!
//! #[tokio::main]
//! async fn main() -> anyhow::Result<()> {
//!     // the topology file the agents read; this service runs in eu
//!     let client = Client::open("/tmp/meridian-demo/topology.toml", "eu")?;
//!
//!     // a tenant's home region lives in the multi-region database
//!     client.placements().set("initech", "na").await?;
//!
//!     // a routed write: it commits on na's store, wherever this runs.
//!     // The closure borrows freely; `?` works on sqlx errors.
//!     let amount = 25.5_f64;
//!     let committed = client
//!         .tenant("initech")
//!         .write(async |tx| -> Result<String, Error> {
//!             let id = sqlx::query_scalar(
//!                 "INSERT INTO orders (tenant_id, home_region, amount)
//!                  VALUES (1001, $1, $2::float8::numeric) RETURNING id::text",
//!             )
//!             .bind(tx.home().to_owned())
//!             .bind(amount)
//!             .fetch_one(&mut *tx)
//!             .await?;
//!             Ok(id)
//!         })
//!         .await?;
//!
//!     // the same without a closure: a handle, committed explicitly
//!     let mut tx = client.tenant("initech").begin().await?;
//!     sqlx::query("UPDATE orders SET amount = amount + 1 WHERE id = $1::uuid")
//!         .bind(&committed.value)
//!         .execute(&mut *tx)
//!         .await?;
//!     let token = tx.commit().await?;
//!
//!     // the token travels to another service as a string (an HTTP header)...
//!     let header = token.to_string();
//!     // ...which reads in apac once apac applied that very transaction
//!     let token: CommitToken = header.parse()?;
//!     let apac = client.read("apac").after(&token).await?;
//!     let amount: String = sqlx::query_scalar("SELECT amount::text FROM orders WHERE id = $1::uuid")
//!         .bind(&committed.value)
//!         .fetch_one(&apac)
//!         .await?;
//!     println!("apac sees {amount}");
//!
//!     // globally consistent data: SERIALIZABLE on the multi-region
//!     // database; the closure runs again after a serialization failure
//!     let price: String = client
//!         .global()
//!         .transaction(async |tx| -> Result<String, Error> {
//!             Ok(sqlx::query_scalar(
//!                 "UPDATE plans SET price = price + 1 WHERE name = 'pro' RETURNING price::text",
//!             )
//!             .fetch_one(&mut *tx)
//!             .await?)
//!         })
//!         .await?;
//!     println!("plan pro now costs {price}");
//!     Ok(())
//! }
//! ```
//!
//! `examples/orders.rs` at the repository root is the same service, run
//! by the test suite against a deployment shaped like the demo.
//!
//! # Closures, handles and errors
//!
//! - Closures are async closures (`async |tx| { ... }`). The error type is
//!   yours, as long as it converts from [`Error`] (and `sqlx::Error`, for
//!   `?` on queries); name it in the closure (`-> Result<T, Error>`), as
//!   type inference cannot pick it. Store refusals arrive as typed
//!   [`Error`]s when the closure's error type is [`Error`].
//! - A future that must be `Send` (`tokio::spawn`, web handlers) cannot
//!   hold an async closure that borrows its argument with today's rustc
//!   (rust-lang/rust#110338). There, use the handle
//!   ([`Tenant::begin`], [`RoutedTransaction::commit`]) or the boxed forms
//!   [`Tenant::write_boxed`] and [`Global::transaction_boxed`].
//! - Queries run on `&mut *tx` (the connection) or `&mut tx`, as with sqlx.
//! - [`Error::is_retryable`] and [`Error::is_refusal`] sort errors; every
//!   message says what to do. Return `anyhow::Result` from `main` to print
//!   errors with their message (a plain `Result<(), Error>` prints the
//!   `Debug` form).
//!
//! The client reads the same topology file as the agents (regions, stores,
//! each store's `ca` for TLS, `[global]`, and the residency policy for the
//! list of global tables).

mod error;
mod executor;
mod global;
pub mod placement;
mod read;
pub mod retry;
mod routed;
mod tls;
mod token;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

/// The sqlx this crate is built on (0.8): use it, or depend on the same
/// version, so that `sqlx::Error` and the query types are the same types.
pub use sqlx;

pub use error::Error;
pub use global::{Global, GlobalTransaction};
pub use meridian_core::Lsn;
pub use meridian_core::topology::Topology;
pub use meridian_policy::Policy;
pub use placement::{Placement, PlacementChange, Placements};
pub use read::{Read, ReadOnly};
pub use retry::Backoff;
pub use routed::{Committed, RoutedTransaction, Tenant};
pub use token::{CommitToken, TOKEN_RETENTION};

/// A transaction on a PostgreSQL store.
pub type PgTransaction = sqlx::Transaction<'static, sqlx::Postgres>;

/// A boxed future, as [`Read`] resolves to.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Tuning. The defaults suit services talking to stores across a WAN.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long [`Read::after`] waits by default.
    pub read_timeout: Duration,
    /// Most runs of one global transaction (the first included).
    pub global_max_attempts: u32,
    /// Backoff between global transaction attempts.
    pub global_backoff: Backoff,
    /// Connections per store.
    pub max_connections: u32,
    /// How long to wait for a connection to a store.
    pub acquire_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_timeout: Duration::from_secs(10),
            global_max_attempts: 10,
            global_backoff: Backoff::default(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(10),
        }
    }
}

/// Connection pools (connected lazily) and the placement cache.
pub(crate) struct Stores {
    regions: BTreeMap<String, PgPool>,
    /// The same stores, with read-only sessions (for [`Read`]).
    readers: BTreeMap<String, PgPool>,
    global: Option<PgPool>,
    placements: RwLock<HashMap<String, Placement>>,
    /// The global database's migrations ran (once per process is enough).
    global_migrated: std::sync::atomic::AtomicBool,
}

impl Stores {
    fn new(topology: &Topology, options: &Options) -> Result<Stores, Error> {
        let pool = |connect: sqlx::postgres::PgConnectOptions| {
            PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                .connect_lazy_with(connect)
        };
        let mut regions = BTreeMap::new();
        let mut readers = BTreeMap::new();
        for (name, r) in &topology.regions {
            let key = format!("regions.{name}.store");
            let connect = tls::connect_options(&key, r.store.expose(), r.ca.as_deref())?;
            let read_only = connect
                .clone()
                .options([("default_transaction_read_only", "on")]);
            regions.insert(name.clone(), pool(connect));
            readers.insert(name.clone(), pool(read_only));
        }
        let global = match &topology.global {
            Some(g) => Some(pool(tls::connect_options(
                "global.store",
                g.store.expose(),
                g.ca.as_deref(),
            )?)),
            None => None,
        };
        Ok(Stores {
            regions,
            readers,
            global,
            placements: RwLock::default(),
            global_migrated: Default::default(),
        })
    }

    fn reader(&self, name: &str) -> Result<&PgPool, Error> {
        self.region(name)?;
        Ok(&self.readers[name])
    }

    fn region(&self, name: &str) -> Result<&PgPool, Error> {
        self.regions.get(name).ok_or_else(|| Error::UnknownRegion {
            region: name.to_owned(),
            known: self.regions.keys().cloned().collect::<Vec<_>>().join(", "),
        })
    }

    fn cached(&self, tenant: &str) -> Option<Placement> {
        let cache = self.placements.read().unwrap_or_else(|e| e.into_inner());
        cache.get(tenant).cloned()
    }

    fn remember(&self, placement: Placement) {
        let mut cache = self.placements.write().unwrap_or_else(|e| e.into_inner());
        match cache.get(&placement.tenant) {
            Some(known) if known.epoch > placement.epoch => {}
            _ => {
                cache.insert(placement.tenant.clone(), placement);
            }
        }
    }
}

/// A handle on every region's store and the multi-region database. Cheap to
/// clone; clones share pools and the placement cache. Use it inside a Tokio
/// runtime.
#[derive(Clone)]
pub struct Client {
    region: String,
    stores: Arc<Stores>,
    global_tables: Arc<Vec<String>>,
    options: Options,
}

impl Client {
    /// Reads the topology file (and the residency policy it names) the way the
    /// agents do, environment overrides included. `region` is where the
    /// caller runs.
    pub fn open(topology: impl AsRef<Path>, region: &str) -> Result<Client, Error> {
        let topology =
            Topology::load(topology.as_ref()).map_err(|e| Error::Config(e.to_string()))?;
        let policy = match &topology.policy {
            Some(path) => Some(read_policy(&topology, path)?),
            None => None,
        };
        Client::new(&topology, policy.as_ref(), region, Options::default())
    }

    /// A client from a parsed topology and policy.
    pub fn new(
        topology: &Topology,
        policy: Option<&Policy>,
        region: &str,
        options: Options,
    ) -> Result<Client, Error> {
        let stores = Stores::new(topology, &options)?;
        stores.region(region)?;
        Ok(Client {
            region: region.to_owned(),
            stores: Arc::new(stores),
            global_tables: Arc::new(policy.map(|p| p.global.clone()).unwrap_or_default()),
            options,
        })
    }

    /// Where this client runs.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Changes the tuning (pools already made keep theirs).
    pub fn with_options(mut self, options: Options) -> Client {
        self.options = options;
        self
    }

    /// Routed writes for one tenant.
    pub fn tenant(&self, tenant: impl Into<String>) -> Tenant<'_> {
        Tenant {
            client: self,
            tenant: tenant.into(),
        }
    }

    /// Reads in `region` (use `client.region()` for local reads).
    pub fn read(&self, region: impl Into<String>) -> Read<'_> {
        Read {
            client: self,
            region: region.into(),
            after: None,
            timeout: self.options.read_timeout,
        }
    }

    /// The multi-region database.
    pub fn global(&self) -> Global<'_> {
        Global {
            client: self,
            max_attempts: self.options.global_max_attempts,
        }
    }

    /// Placement administration (sharing this client's placement cache).
    pub fn placements(&self) -> Placements {
        Placements {
            stores: self.stores.clone(),
        }
    }

    /// The tenant's placement: from the cache, or (with `refresh`, or on a
    /// miss) from the global database.
    async fn placement(&self, tenant: &str, refresh: bool) -> Result<Placement, Error> {
        if !refresh && let Some(p) = self.stores.cached(tenant) {
            return Ok(p);
        }
        let found = self.placements().get(tenant).await?;
        let placement = found.ok_or_else(|| Error::NoPlacement {
            tenant: tenant.to_owned(),
        })?;
        self.stores.remember(placement.clone());
        Ok(placement)
    }
}

fn read_policy(topology: &Topology, path: &str) -> Result<Policy, Error> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read policy file {path}: {e}")))?;
    // the client never hashes; the agents hold the key and check it
    Policy::parse_for(topology, &text, path, true).map_err(|problems| {
        let lines: Vec<String> = problems.iter().map(|d| d.to_string()).collect();
        Error::Config(format!("invalid residency policy:\n{}", lines.join("\n")))
    })
}

/// Whether a transaction whose commit went unanswered committed; see
/// [`Client::commit_outcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitOutcome {
    Committed,
    /// Rolled back (or never reached the store): safe to write again.
    Aborted,
    /// Still open on the store (its session has not ended yet): ask again.
    InProgress,
}

/// A transaction whose COMMIT was sent but not answered; carried by
/// [`Error::CommitOutcomeUnknown`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnknownCommit {
    /// The region whose store ran it, or `global`.
    pub store: String,
    /// The transaction's id on that store.
    pub xid: u64,
    /// The token it has if it committed (routed writes).
    pub token: Option<CommitToken>,
}

impl Client {
    /// Whether the transaction of an [`Error::CommitOutcomeUnknown`]
    /// committed, from its store (`pg_xact_status`). Ask before writing the
    /// same thing again.
    pub async fn commit_outcome(&self, commit: &UnknownCommit) -> Result<CommitOutcome, Error> {
        let pool = match commit.store.as_str() {
            "global" => self.stores.global.as_ref().ok_or(Error::NoGlobalDatabase)?,
            region => self.stores.region(region)?,
        };
        let status: Option<String> = sqlx::query_scalar("SELECT pg_xact_status($1::text::xid8)")
            .bind(commit.xid.to_string())
            .fetch_one(pool)
            .await?;
        match status.as_deref() {
            Some("committed") => Ok(CommitOutcome::Committed),
            Some("aborted") => Ok(CommitOutcome::Aborted),
            Some("in progress") => Ok(CommitOutcome::InProgress),
            _ => Err(Error::Config(format!(
                "{} no longer knows transaction {} (too old); check the data itself",
                commit.store, commit.xid
            ))),
        }
    }
}
