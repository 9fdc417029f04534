//! Routed writes: a tenant's transactions, on its home region's store.

use std::any::Any;
use std::ops::{Deref, DerefMut};

use meridian_core::Lsn;
use sqlx::PgConnection;

use crate::executor::delegate_executor;
use crate::{Client, CommitToken, Error, PgTransaction, Placement, UnknownCommit, error};

/// A committed routed write: the closure's value and its commit token.
#[derive(Debug)]
pub struct Committed<T> {
    pub value: T,
    pub token: CommitToken,
}

/// Routed writes for one tenant; see [`Client::tenant`].
pub struct Tenant<'a> {
    pub(crate) client: &'a Client,
    pub(crate) tenant: String,
}

impl Tenant<'_> {
    /// The tenant's current placement (cached).
    pub async fn home(&self) -> Result<Placement, Error> {
        self.client.placement(&self.tenant, false).await
    }

    /// Opens a transaction on the tenant's home-region store. Every row it
    /// inserts, updates or deletes must be the tenant's: the store checks
    /// the row's home column before and after the change and refuses
    /// ([`Error::WrongHome`]) a row of another region, a copy of another
    /// region's row (read-only here), and a change of a row's home (use
    /// [`Tenant::move_rows`]); writes to global tables are refused too
    /// ([`Error::GlobalTable`]). A placement that changed since it was
    /// cached is refreshed from the global database first. Dropping the
    /// handle without [`RoutedTransaction::commit`] rolls back.
    pub async fn begin(self) -> Result<RoutedTransaction, Error> {
        self.open(None).await
    }

    /// Runs `f` in a routed transaction (see [`Tenant::begin`]) and
    /// commits; the whole transaction rolls back if `f` fails. `f` runs
    /// at most once. `f` is an async closure (`async |tx| { ... }`) and may
    /// borrow from its surroundings; its error type is the caller's, as
    /// long as it converts from [`Error`] (and from `sqlx::Error`, for
    /// `?` on queries).
    pub async fn write<T, E, F>(self, f: F) -> Result<Committed<T>, E>
    where
        F: AsyncFnOnce(&mut RoutedTransaction) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        let tx = self.begin().await?;
        run(tx, f).await
    }

    /// [`Tenant::write`] for closures that return a boxed future
    /// (`|tx| Box::pin(async move { ... })`), for callers whose future must
    /// be `Send` (see [`crate::Global::transaction_boxed`]); the handle
    /// from [`Tenant::begin`] is the other way.
    pub async fn write_boxed<T, E, F>(self, f: F) -> Result<Committed<T>, E>
    where
        F: for<'t> FnOnce(&'t mut RoutedTransaction) -> crate::BoxFuture<'t, Result<T, E>>,
        E: From<Error> + 'static,
    {
        let mut tx = self.begin().await?;
        match f(&mut tx).await {
            Ok(value) => Ok(Committed {
                value,
                token: tx.commit().await?,
            }),
            Err(e) => Err(tx.explain(e)),
        }
    }

    /// Like [`Tenant::write`], and the transaction may also hand rows to
    /// region `to`: an UPDATE may change a row's home column from the
    /// tenant's home to `to` (and only to `to`). This is how a row changes
    /// home region; the update replicates, and each region keeps the form
    /// of the row the residency policy allows it. Everything else is
    /// checked as in any routed write.
    pub async fn move_rows<T, E, F>(self, to: &str, f: F) -> Result<Committed<T>, E>
    where
        F: AsyncFnOnce(&mut RoutedTransaction) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        self.client.stores.region(to)?;
        let tx = self.open(Some(to)).await?;
        if tx.placement.home == to {
            return Err(Error::Config(format!(
                "tenant {:?} already lives in {to}: a row move hands rows to another region",
                tx.tenant()
            ))
            .into());
        }
        run(tx, f).await
    }

    async fn open(self, move_to: Option<&str>) -> Result<RoutedTransaction, Error> {
        let client = self.client;
        let tenant = self.tenant.as_str();
        let mut placement = client.placement(tenant, false).await?;
        let mut refreshes = 0;
        loop {
            let mut tx = client.stores.region(&placement.home)?.begin().await?;
            let token = CommitToken::new(&placement.home, Lsn(0));
            let fenced: Result<(String, i64), sqlx::Error> =
                sqlx::query_as("SELECT xid, lsn FROM meridian.begin_routed_write($1, $2, $3, $4)")
                    .bind(tenant)
                    .bind(&placement.home)
                    .bind(placement.epoch)
                    .bind(token.tag())
                    .fetch_one(&mut *tx)
                    .await;
            match fenced {
                Ok((xid, lsn)) => {
                    if let Some(to) = move_to {
                        sqlx::query("SELECT set_config('meridian.move_to', $1, true)")
                            .bind(to)
                            .execute(&mut *tx)
                            .await?;
                    }
                    let xid = xid.parse().map_err(|_| {
                        Error::Config(format!("the store returned transaction id {xid:?}"))
                    })?;
                    return Ok(RoutedTransaction {
                        tx,
                        tenant: self.tenant,
                        global_tables: client.global_tables.clone(),
                        xid,
                        token: CommitToken {
                            lsn: Lsn(lsn as u64),
                            ..token
                        },
                        placement,
                    });
                }
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
                Err(e) => {
                    return Err(error::routed(
                        e.into(),
                        tenant,
                        &placement.home,
                        &client.global_tables,
                    ));
                }
            }
        }
    }
}

/// Runs `f` in `tx` and commits.
async fn run<T, E, F>(mut tx: RoutedTransaction, f: F) -> Result<Committed<T>, E>
where
    F: AsyncFnOnce(&mut RoutedTransaction) -> Result<T, E>,
    E: From<Error> + 'static,
{
    match f(&mut tx).await {
        Ok(value) => Ok(Committed {
            value,
            token: tx.commit().await?,
        }),
        Err(e) => Err(tx.explain(e)),
    }
}

/// An open routed transaction on a tenant's home-region store; see
/// [`Tenant::begin`]. Queries run on it as on a sqlx transaction
/// (`.execute(&mut tx)`, or `&mut *tx` for the connection it derefs to).
pub struct RoutedTransaction {
    tx: PgTransaction,
    tenant: String,
    placement: Placement,
    global_tables: std::sync::Arc<Vec<String>>,
    xid: u64,
    token: CommitToken,
}

impl std::fmt::Debug for RoutedTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoutedTransaction")
            .field("tenant", &self.tenant)
            .field("home", &self.placement.home)
            .field("xid", &self.xid)
            .finish_non_exhaustive()
    }
}

impl RoutedTransaction {
    /// The tenant this transaction writes for.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The region whose store runs the transaction (the tenant's home).
    pub fn home(&self) -> &str {
        &self.placement.home
    }

    /// The token the transaction will have once committed. Useful to log
    /// before committing; only [`RoutedTransaction::commit`]'s answer
    /// proves the commit.
    pub fn token(&self) -> &CommitToken {
        &self.token
    }

    /// Commits. A store error at commit (a deferred constraint, say) means
    /// nothing was written. A connection that breaks after COMMIT was sent
    /// gives [`Error::CommitOutcomeUnknown`]: ask
    /// [`Client::commit_outcome`] before writing again.
    pub async fn commit(self) -> Result<CommitToken, Error> {
        let RoutedTransaction {
            tx,
            tenant,
            placement,
            global_tables,
            xid,
            token,
        } = self;
        match tx.commit().await {
            Ok(()) => Ok(token),
            Err(e @ sqlx::Error::Database(_)) => Err(error::routed(
                e.into(),
                &tenant,
                &placement.home,
                &global_tables,
            )),
            Err(source) => Err(Error::CommitOutcomeUnknown {
                commit: Box::new(UnknownCommit {
                    store: placement.home,
                    xid,
                    token: Some(token),
                }),
                source,
            }),
        }
    }

    /// Rolls back (dropping the handle does too, without waiting).
    pub async fn rollback(self) -> Result<(), Error> {
        Ok(self.tx.rollback().await?)
    }

    /// The closure's error, made precise when it is the client's own (a
    /// query on a global table absent from this store reads "relation does
    /// not exist"; it becomes [`Error::GlobalTable`]).
    fn explain<E: From<Error> + 'static>(&self, e: E) -> E {
        let boxed: Box<dyn Any> = Box::new(e);
        match boxed.downcast::<Error>() {
            Ok(ours) => E::from(error::routed(
                *ours,
                &self.tenant,
                &self.placement.home,
                &self.global_tables,
            )),
            Err(theirs) => *theirs.downcast::<E>().expect("the closure's own error"),
        }
    }
}

impl Deref for RoutedTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for RoutedTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

delegate_executor!(&'c mut RoutedTransaction, |tx| &mut *tx.tx);
