//! The global path: SERIALIZABLE transactions on the multi-region
//! database, retried on serialization failures.

use std::any::Any;
use std::ops::{Deref, DerefMut};

use sqlx::{PgConnection, PgPool};

use crate::executor::delegate_executor;
use crate::{Client, Error, PgTransaction, UnknownCommit, retry};

/// The multi-region database; see [`Client::global`].
pub struct Global<'a> {
    pub(crate) client: &'a Client,
    pub(crate) max_attempts: u32,
}

/// One attempt of a global transaction; queries run on it as on a sqlx
/// transaction (`.execute(&mut *tx)` or `.execute(&mut **tx)`).
pub struct GlobalTransaction {
    tx: PgTransaction,
    xid: u64,
    attempt: u32,
}

impl GlobalTransaction {
    /// Which run of the closure this is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl std::fmt::Debug for GlobalTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GlobalTransaction")
            .field("xid", &self.xid)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Deref for GlobalTransaction {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for GlobalTransaction {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

delegate_executor!(&'c mut GlobalTransaction, |tx| &mut *tx.tx);

/// How one attempt ended.
enum Attempt<T, E> {
    Done(T),
    /// A serialization failure: run again.
    Conflict(sqlx::Error),
    Failed(E),
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

    /// Runs `f` in a SERIALIZABLE transaction and commits. On a
    /// serialization failure (SQLSTATE 40001, or a deadlock, 40P01), from
    /// any statement or the commit, the transaction is rolled back and
    /// **`f` runs again** from the start, after a jittered exponential
    /// backoff, up to the attempt limit ([`Error::RetriesExhausted`]). So
    /// `f` must be safe to repeat: no side effects outside the transaction,
    /// no state carried between runs. A connection that breaks after COMMIT
    /// was sent gives [`Error::CommitOutcomeUnknown`] (never retried).
    ///
    /// `f` is an async closure (`async |tx| { ... }`); its error type is
    /// the caller's, as long as it converts from [`Error`].
    pub async fn transaction<T, E, F>(self, mut f: F) -> Result<T, E>
    where
        F: AsyncFnMut(&mut GlobalTransaction) -> Result<T, E>,
        E: From<Error> + 'static,
    {
        let mut retries = Retries::new(&self)?;
        loop {
            let outcome = match retries.begin().await? {
                Ok(mut tx) => {
                    let result = f(&mut tx).await;
                    tx.finish(result).await?
                }
                Err(conflict) => Attempt::Conflict(conflict),
            };
            if let Some(done) = retries.after(outcome).await? {
                return done;
            }
        }
    }

    /// [`Global::transaction`] for closures that return a boxed future
    /// (`|tx| Box::pin(async move { ... })`). Use it where the caller's
    /// future must be `Send` (`tokio::spawn`, web handlers): today's rustc
    /// cannot prove an async closure's future `Send` when it borrows its
    /// argument (rust-lang/rust#110338); a boxed `Send` future can.
    pub async fn transaction_boxed<T, E, F>(self, mut f: F) -> Result<T, E>
    where
        F: for<'t> FnMut(&'t mut GlobalTransaction) -> crate::BoxFuture<'t, Result<T, E>>,
        E: From<Error> + 'static,
    {
        let mut retries = Retries::new(&self)?;
        loop {
            let outcome = match retries.begin().await? {
                Ok(mut tx) => {
                    let result = f(&mut tx).await;
                    tx.finish(result).await?
                }
                Err(conflict) => Attempt::Conflict(conflict),
            };
            if let Some(done) = retries.after(outcome).await? {
                return done;
            }
        }
    }
}

/// The attempts of one global transaction.
struct Retries {
    /// Owned, not borrowed: a reference held across the attempts' awaits
    /// trips the compiler's `Send` check of callers' futures.
    pool: PgPool,
    backoff: crate::Backoff,
    max_attempts: u32,
    attempt: u32,
}

impl Retries {
    fn new(global: &Global<'_>) -> Result<Retries, Error> {
        Ok(Retries {
            pool: global.pool()?.clone(),
            backoff: global.client.options.global_backoff,
            max_attempts: global.max_attempts,
            attempt: 0,
        })
    }

    /// Opens the next attempt's transaction (SERIALIZABLE) and reads its
    /// id; a conflict already there is returned as such.
    async fn begin(&mut self) -> Result<Result<GlobalTransaction, sqlx::Error>, Error> {
        self.attempt += 1;
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL SERIALIZABLE")
            .await?;
        // the id, in case the commit's outcome has to be asked for
        let xid: Result<String, sqlx::Error> =
            sqlx::query_scalar("SELECT pg_current_xact_id()::text")
                .fetch_one(&mut *tx)
                .await;
        match xid {
            Ok(xid) => Ok(Ok(GlobalTransaction {
                tx,
                xid: xid.parse().unwrap_or(0),
                attempt: self.attempt,
            })),
            Err(e) if retry::is_retryable(&e) => Ok(Err(e)),
            Err(e) => Err(e.into()),
        }
    }

    /// The transaction's result if this attempt ends it; None after a
    /// conflict that leaves attempts (having slept the backoff).
    async fn after<T, E: From<Error>>(
        &mut self,
        outcome: Attempt<T, E>,
    ) -> Result<Option<Result<T, E>>, Error> {
        let last = match outcome {
            Attempt::Done(value) => return Ok(Some(Ok(value))),
            Attempt::Failed(e) => return Ok(Some(Err(e))),
            Attempt::Conflict(e) => e,
        };
        if self.attempt >= self.max_attempts {
            return Err(Error::RetriesExhausted {
                attempts: self.attempt,
                last,
            });
        }
        let pause = self.backoff.delay(self.attempt);
        tracing::debug!(attempt = self.attempt, pause_ms = pause.as_millis() as u64, error = %last,
            "global transaction conflicted; retrying");
        tokio::time::sleep(pause).await;
        Ok(None)
    }
}

impl GlobalTransaction {
    /// Commits after the closure succeeded, or classifies its error.
    async fn finish<T, E>(self, result: Result<T, E>) -> Result<Attempt<T, E>, Error>
    where
        E: From<Error> + 'static,
    {
        let value = match result {
            Ok(value) => value,
            Err(e) => {
                // a serialization failure inside the closure, reported
                // through the client's error: run again
                let boxed: Box<dyn Any> = Box::new(e);
                return Ok(match boxed.downcast::<Error>() {
                    Ok(ours) => match *ours {
                        Error::Database(e) if retry::is_retryable(&e) => Attempt::Conflict(e),
                        ours => Attempt::Failed(E::from(ours)),
                    },
                    Err(theirs) => {
                        Attempt::Failed(*theirs.downcast::<E>().expect("the closure's own error"))
                    }
                });
            }
        };
        match self.tx.commit().await {
            Ok(()) => Ok(Attempt::Done(value)),
            Err(e) if retry::is_retryable(&e) => Ok(Attempt::Conflict(e)),
            Err(e @ sqlx::Error::Database(_)) => Err(e.into()),
            Err(source) => Err(Error::CommitOutcomeUnknown {
                commit: Box::new(UnknownCommit {
                    store: "global".to_owned(),
                    xid: self.xid,
                    token: None,
                }),
                source,
            }),
        }
    }
}
