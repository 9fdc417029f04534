//! Meridian's client library: write through it, not around it.
//!
//! - **Routed writes**: [`Client::tenant`] runs a transaction on the tenant's
//!   home-region store, wherever the caller runs, and returns a
//!   [`CommitToken`]. The store refuses rows whose home column names another
//!   region, and writes to global tables.
//! - **Read-your-writes across regions**: [`Client::read`] gives a region's
//!   store, optionally [`after`](Read::after) it has applied a token.
//! - **Global consistency**: [`Client::global`] runs SERIALIZABLE
//!   transactions on the multi-region database and retries serialization
//!   failures.
//! - **Placements**: each tenant's home region lives in the multi-region
//!   database; the client caches it ([`Client::placements`] manages it).
//!
//! The client reads the same topology file as the agents (regions, stores,
//! `[global]`, and the residency policy for the list of global tables).
//!
//! ```no_run
//! use meridian_client::{Client, CommitToken, Error};
//!
//! # async fn example() -> Result<(), Error> {
//! // this service runs in eu
//! let client = Client::open("meridian.toml", "eu")?;
//!
//! // tenant acme lives in na: the transaction runs on na's store
//! let committed = client
//!     .tenant("acme")
//!     .write(|tx| {
//!         Box::pin(async move {
//!             let id: i64 = sqlx::query_scalar(
//!                 "INSERT INTO orders (tenant, region, total) VALUES ($1, 'na', 42.5) RETURNING id",
//!             )
//!             .bind("acme")
//!             .fetch_one(&mut **tx)
//!             .await?;
//!             Ok(id)
//!         })
//!     })
//!     .await?;
//! let order_id = committed.value;
//!
//! // the token travels to another service as a short string (an HTTP header)...
//! let header = committed.token.to_string();
//!
//! // ...which reads in apac once apac has applied the write (or times out)
//! let token: CommitToken = header.parse()?;
//! let apac = client.read("apac").after(&token).await?;
//! let total: f64 = sqlx::query_scalar("SELECT total FROM orders WHERE id = $1")
//!     .bind(order_id)
//!     .fetch_one(&apac)
//!     .await?;
//!
//! // globally consistent data: SERIALIZABLE on the multi-region database.
//! // The closure may run more than once: keep side effects out of it.
//! let new_price: f64 = client
//!     .global()
//!     .transaction(|tx| {
//!         Box::pin(async move {
//!             let price: f64 = sqlx::query_scalar("SELECT price FROM plans WHERE name = 'pro'")
//!                 .fetch_one(&mut **tx)
//!                 .await?;
//!             sqlx::query("UPDATE plans SET price = $1 WHERE name = 'pro'")
//!                 .bind(price * 1.1)
//!                 .execute(&mut **tx)
//!                 .await?;
//!             Ok(price * 1.1)
//!         })
//!     })
//!     .await?;
//! # let _ = (total, new_price);
//! # Ok(())
//! # }
//! ```
//!
//! Closures receive `&mut` [`PgTransaction`] and return a boxed future (the
//! `Box::pin(async move { ... })` above), which lets them borrow the
//! transaction across `.await`s. `?` converts `sqlx::Error` into [`Error`];
//! [`Error::aborted`] wraps an application error.

mod error;
pub mod placement;
pub mod retry;
mod token;

use std::collections::{BTreeMap, HashMap};
use std::future::{Future, IntoFuture};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};

use meridian_core::Lsn;
use meridian_core::topology::Topology;
use meridian_policy::Policy;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

pub use error::Error;
pub use placement::{Placement, PlacementChange, Placements};
pub use retry::Backoff;
pub use token::CommitToken;

/// A transaction on a PostgreSQL store.
pub type PgTransaction = sqlx::Transaction<'static, sqlx::Postgres>;

/// What closures return: `Box::pin(async move { ... })`.
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
    global: Option<PgPool>,
    placements: RwLock<HashMap<String, Placement>>,
    /// The global database's migrations ran (once per process is enough).
    global_migrated: std::sync::atomic::AtomicBool,
}

impl Stores {
    fn new(topology: &Topology, options: &Options) -> Result<Stores, Error> {
        let pool = |url: &str| {
            PgPoolOptions::new()
                .max_connections(options.max_connections)
                .acquire_timeout(options.acquire_timeout)
                .connect_lazy(url)
        };
        let mut regions = BTreeMap::new();
        for (name, r) in &topology.regions {
            let p = pool(r.store.expose())
                .map_err(|e| Error::Config(format!("regions.{name}.store: {e}")))?;
            regions.insert(name.clone(), p);
        }
        let global = match &topology.global {
            Some(g) => Some(
                pool(g.store.expose()).map_err(|e| Error::Config(format!("global.store: {e}")))?,
            ),
            None => None,
        };
        Ok(Stores {
            regions,
            global,
            placements: RwLock::default(),
            global_migrated: Default::default(),
        })
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

/// A committed routed write: the closure's value and where it committed.
#[derive(Debug)]
pub struct Committed<T> {
    pub value: T,
    pub token: CommitToken,
}

/// Routed writes for one tenant; see [`Client::tenant`].
pub struct Tenant<'a> {
    client: &'a Client,
    tenant: String,
}

impl Tenant<'_> {
    /// The tenant's current placement (cached).
    pub async fn home(&self) -> Result<Placement, Error> {
        self.client.placement(&self.tenant, false).await
    }

    /// Runs `f` in one transaction on the tenant's home-region store and
    /// commits. The store refuses, and the whole transaction rolls back:
    /// a row whose home column is not the tenant's home region
    /// ([`Error::WrongHome`], naming the region), a write to a global table
    /// ([`Error::GlobalTable`]). A placement that changed since it was cached
    /// is refreshed from the global database before `f` runs; `f` runs at
    /// most once.
    pub async fn write<T, F>(self, f: F) -> Result<Committed<T>, Error>
    where
        T: Send,
        F: for<'t> FnOnce(&'t mut PgTransaction) -> BoxFuture<'t, Result<T, Error>>,
    {
        let client = self.client;
        let tenant = self.tenant.as_str();
        let mut placement = client.placement(tenant, false).await?;
        let mut refreshes = 0;
        let mut tx = loop {
            let mut tx = client.stores.region(&placement.home)?.begin().await?;
            let fenced = sqlx::query("SELECT meridian.begin_routed_write($1, $2, $3)")
                .bind(tenant)
                .bind(&placement.home)
                .bind(placement.epoch)
                .execute(&mut *tx)
                .await;
            match fenced {
                Ok(_) => break tx,
                Err(e) if error::sqlstate(&e).as_deref() == Some("MR003") => {
                    refreshes += 1;
                    if refreshes > 3 {
                        return Err(Error::PlacementMoving {
                            tenant: tenant.to_owned(),
                        });
                    }
                    tracing::debug!(tenant, stale_home = %placement.home, "stale placement; refreshing");
                    placement = client.placement(tenant, true).await?;
                }
                Err(e) => return Err(self.refused(e.into(), &placement.home)),
            }
        };
        let value = match f(&mut tx).await {
            Ok(value) => value,
            Err(e) => return Err(self.refused(e, &placement.home)),
        };
        tx.commit()
            .await
            .map_err(|e| self.refused(e.into(), &placement.home))?;
        let committed_at = SystemTime::now();
        // at or past the commit record: WAL positions only grow
        let lsn: i64 = sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0')::bigint")
            .fetch_one(client.stores.region(&placement.home)?)
            .await?;
        Ok(Committed {
            value,
            token: CommitToken {
                region: placement.home,
                lsn: Lsn(lsn as u64),
                committed_at,
            },
        })
    }

    fn refused(&self, e: Error, home: &str) -> Error {
        error::routed(e, &self.tenant, home, &self.client.global_tables)
    }
}

/// Reads in one region; see [`Client::read`]. Await it for the region's
/// store (a pool).
pub struct Read<'a> {
    client: &'a Client,
    region: String,
    after: Option<CommitToken>,
    timeout: Duration,
}

impl Read<'_> {
    /// Waits, when awaited, until the region has applied `token`'s write
    /// (immediately in the token's own region). Rows the residency policy
    /// keeps out of the region stay absent after the wait. Fails with
    /// [`Error::DeadLettered`] instead of resolving when a transaction from
    /// the token's region at or before it waits in the region's dead letters.
    pub fn after(mut self, token: &CommitToken) -> Self {
        self.after = Some(token.clone());
        self
    }

    /// How long [`Read::after`] waits before [`Error::NotYetReplicated`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn wait(self) -> Result<PgPool, Error> {
        let stores = &self.client.stores;
        let pool = stores.region(&self.region)?.clone();
        let Some(token) = self.after else {
            return Ok(pool);
        };
        stores.region(&token.region)?;
        if token.region == self.region {
            return Ok(pool);
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(2);
        loop {
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT end_lsn FROM meridian.watermarks WHERE source_region = $1",
            )
            .bind(&token.region)
            .fetch_optional(&pool)
            .await?;
            let applied = Lsn(applied.unwrap_or(0) as u64);
            if applied >= token.lsn {
                // the watermark moves past dead letters; the token must not
                let dead_letter: Option<i64> = sqlx::query_scalar(
                    "SELECT min(id) FROM meridian.dead_letters
                      WHERE source_region = $1 AND status = 'pending' AND end_lsn <= $2",
                )
                .bind(&token.region)
                .bind(token.lsn.0 as i64)
                .fetch_one(&pool)
                .await?;
                return match dead_letter {
                    None => Ok(pool),
                    Some(dead_letter) => Err(Error::DeadLettered {
                        region: self.region,
                        source_region: token.region,
                        wanted: token.lsn,
                        dead_letter,
                    }),
                };
            }
            let waited = started.elapsed();
            if waited >= self.timeout {
                return Err(Error::NotYetReplicated {
                    region: self.region,
                    source_region: token.region,
                    wanted: token.lsn,
                    applied,
                    waited,
                });
            }
            tokio::time::sleep(pause.min(self.timeout - waited)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

impl<'a> IntoFuture for Read<'a> {
    type Output = Result<PgPool, Error>;
    type IntoFuture = BoxFuture<'a, Result<PgPool, Error>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}

/// The multi-region database; see [`Client::global`].
pub struct Global<'a> {
    client: &'a Client,
    max_attempts: u32,
}

impl Global<'_> {
    /// Most runs of the transaction, the first included (at least 1).
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// The multi-region database's pool, for reads and non-transactional work.
    pub fn pool(&self) -> Result<&PgPool, Error> {
        self.client
            .stores
            .global
            .as_ref()
            .ok_or(Error::NoGlobalDatabase)
    }

    /// Runs `f` in a SERIALIZABLE transaction and commits. On a serialization
    /// failure (SQLSTATE 40001, or a deadlock, 40P01), from any statement or
    /// the commit, the transaction is rolled back and **`f` runs again** from
    /// the start, after a jittered exponential backoff, up to the attempt
    /// limit ([`Error::RetriesExhausted`]). So `f` must be safe to repeat:
    /// no side effects outside the transaction, no state carried between runs.
    pub async fn transaction<T, F>(self, mut f: F) -> Result<T, Error>
    where
        T: Send,
        F: for<'t> FnMut(&'t mut PgTransaction) -> BoxFuture<'t, Result<T, Error>>,
    {
        let pool = self.pool()?;
        let backoff = self.client.options.global_backoff;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let outcome = async {
                let mut tx = pool.begin().await?;
                sqlx::query("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE")
                    .execute(&mut *tx)
                    .await?;
                let value = f(&mut tx).await?;
                tx.commit().await?;
                Ok::<T, Error>(value)
            }
            .await;
            match outcome {
                Err(Error::Database(e)) if retry::is_retryable(&e) => {
                    if attempt >= self.max_attempts {
                        return Err(Error::RetriesExhausted {
                            attempts: attempt,
                            last: e,
                        });
                    }
                    let pause = backoff.delay(attempt);
                    tracing::debug!(attempt, pause_ms = pause.as_millis() as u64, error = %e,
                        "global transaction conflicted; retrying");
                    tokio::time::sleep(pause).await;
                }
                other => return other,
            }
        }
    }
}
