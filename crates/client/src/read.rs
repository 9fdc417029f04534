//! Reads in a region, optionally after a commit token's write arrived.

use std::future::IntoFuture;
use std::time::{Duration, Instant, SystemTime};

use meridian_core::Lsn;
use sqlx::PgPool;

use crate::executor::delegate_executor;
use crate::{BoxFuture, Client, CommitToken, Error, TOKEN_RETENTION};

/// Reads in one region; see [`Client::read`]. Await it for a [`ReadOnly`]
/// handle on the region's store.
pub struct Read<'a> {
    pub(crate) client: &'a Client,
    pub(crate) region: String,
    pub(crate) after: Option<CommitToken>,
    pub(crate) timeout: Duration,
}

/// A region's store for reading: its sessions are read-only
/// (`default_transaction_read_only`), so a write through it fails. Queries
/// run on `&handle` as on a pool; [`ReadOnly::pool`] gives the pool.
#[derive(Clone, Debug)]
pub struct ReadOnly {
    pool: PgPool,
}

impl ReadOnly {
    /// The read-only pool itself (for `begin()`, `acquire()`, ...).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }
}

delegate_executor!(&'c ReadOnly, |r| &r.pool);

impl Read<'_> {
    /// Waits, when awaited, until the region has applied `token`'s
    /// transaction (immediately in the token's own region): exactly that
    /// transaction, recognized by the id it was tagged with, so the wait is
    /// its replication lag and nothing more. Rows the residency policy keeps
    /// out of the region stay absent after the wait. Fails with
    /// [`Error::DeadLettered`] instead of resolving when a transaction from
    /// the token's region at or before it waits in the region's dead
    /// letters.
    pub fn after(mut self, token: &CommitToken) -> Self {
        self.after = Some(token.clone());
        self
    }

    /// How long [`Read::after`] waits before [`Error::NotYetReplicated`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn wait(self) -> Result<ReadOnly, Error> {
        let stores = &self.client.stores;
        let pool = stores.reader(&self.region)?.clone();
        let Some(token) = self.after else {
            return Ok(ReadOnly { pool });
        };
        stores.region(&token.region)?;
        if token.region == self.region {
            return Ok(ReadOnly { pool });
        }
        // past the retention, the region may no longer know the id: it is
        // enough then that the region applied a transaction the source
        // committed well after the token (a version 1 token has no id at
        // all, and a position at or past its commit)
        let old = SystemTime::now()
            .duration_since(token.committed_at)
            .is_ok_and(|age| age > TOKEN_RETENTION);
        // for clock skew between the token's maker and the source store
        let margin = Duration::from_secs(30);
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            // the watermark, the source's commit time of the last transaction
            // applied, the token's transaction if seen, and (Kafka links)
            // whether every partition applied that transaction's end marker
            let (applied, source_micros, found, partitions_done): Poll = sqlx::query_as(
                "SELECT w.end_lsn,
                        (extract(epoch FROM w.source_commit_time) * 1e6)::bigint,
                        t.end_lsn,
                        (SELECT count(*) > 0
                                AND bool_and(p.lsn > t.end_lsn
                                             OR (p.lsn = t.end_lsn AND p.idx = 4294967295))
                           FROM meridian.kafka_positions p WHERE p.source_region = $1)
                   FROM (SELECT 1) one
                   LEFT JOIN meridian.watermarks w ON w.source_region = $1
                   LEFT JOIN meridian.applied_tokens t
                          ON t.source_region = $1 AND t.token = $2::uuid",
            )
            .bind(&token.region)
            .bind(token.tag().unwrap_or_else(|| "0".repeat(32)))
            .fetch_one(&pool)
            .await?;
            let applied = Lsn(applied.unwrap_or(0) as u64);
            // the source's commit time of the last transaction applied here
            let source_time = source_micros
                .map(|us| std::time::UNIX_EPOCH + Duration::from_micros(us.max(0) as u64));
            let later_applied = source_time.is_some_and(|t| t >= token.committed_at + margin);
            let needed = match found {
                Some(end) => Some(Lsn(end as u64)),
                None if token.id.is_none() => Some(token.lsn),
                None if old && later_applied => Some(token.lsn),
                None => None,
            };
            if let Some(needed) = needed
                && (applied >= needed || partitions_done == Some(true))
            {
                // the watermark moves past dead letters; the token must not
                let dead_letter: Option<i64> = sqlx::query_scalar(
                    "SELECT min(id) FROM meridian.dead_letters
                      WHERE source_region = $1 AND status = 'pending' AND end_lsn <= $2",
                )
                .bind(&token.region)
                .bind(needed.0 as i64)
                .fetch_one(&pool)
                .await?;
                return match dead_letter {
                    None => Ok(ReadOnly { pool }),
                    Some(dead_letter) => Err(Error::DeadLettered {
                        region: self.region,
                        source_region: token.region,
                        wanted: needed,
                        dead_letter,
                    }),
                };
            }
            let waited = started.elapsed();
            if waited >= self.timeout && needed.is_none() && later_applied {
                // the region applied what the source committed well after
                // the token, but never this transaction
                return Err(Error::TokenNotFound {
                    region: self.region,
                    source_region: token.region,
                });
            }
            if waited >= self.timeout {
                return Err(Error::NotYetReplicated {
                    region: self.region,
                    source_region: token.region,
                    wanted: needed.unwrap_or(token.lsn),
                    applied,
                    waited,
                });
            }
            tokio::time::sleep(pause.min(self.timeout - waited)).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// One look at the region: watermark, its source commit time (Unix
/// microseconds), the token's transaction end, every Kafka partition past it.
type Poll = (Option<i64>, Option<i64>, Option<i64>, Option<bool>);

impl<'a> IntoFuture for Read<'a> {
    type Output = Result<ReadOnly, Error>;
    type IntoFuture = BoxFuture<'a, Result<ReadOnly, Error>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.wait())
    }
}
