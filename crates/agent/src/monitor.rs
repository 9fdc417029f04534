//! A periodic look at this region's store from the links' side: slot
//! retention and activity, the WAL end, and each link's lag (see
//! [`crate::telemetry`] for how lag is measured).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;

use crate::residency::{self, SharedPolicy};
use crate::telemetry::{RegionLabels, SlotStatus, Telemetry};

/// slot, active, wal_status, retained bytes, confirmed position, WAL end.
type SlotRow = (String, bool, String, i64, i64, i64, Option<i64>);

/// One outbound link as the monitor sees it.
pub struct Watched {
    pub destination: String,
    pub slot: String,
    /// Highest position the destination acknowledged (shared with the link).
    pub acked: Arc<AtomicU64>,
}

/// Updates lag, slot, policy and dead-letter metrics every `every` until
/// shutdown. `sources` are the regions this store applies changes from.
/// Longest wait for the store's answer in one look (sqlx keeps retrying a
/// refused connection until then).
const STORE_TIMEOUT: Duration = Duration::from_secs(3);

pub async fn run(
    pool: PgPool,
    links: Vec<Watched>,
    sources: Vec<String>,
    telemetry: Arc<Telemetry>,
    policy: SharedPolicy,
    every: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let slot_names: Vec<String> = links.iter().map(|l| l.slot.clone()).collect();
    for link in &links {
        telemetry.watch_link(&link.destination, link.acked.clone());
    }
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        telemetry.health.beat();
        let current = residency::current(&policy);
        let version = current.as_ref().map_or(0, |p| p.version());
        telemetry.set_config_hash("policy", current.as_ref().map_or("", |p| p.digest()));
        telemetry
            .metrics
            .policy_version
            .get_or_create(&RegionLabels {
                region: telemetry.region.clone(),
            })
            .set(version as i64);
        let rows = tokio::time::timeout(
            STORE_TIMEOUT,
            sqlx::query_as::<_, SlotRow>(
                "SELECT slot_name::text, active, coalesce(wal_status, 'lost'),
                    coalesce((pg_current_wal_lsn() - restart_lsn)::bigint, 0),
                    coalesce((confirmed_flush_lsn - '0/0')::bigint, 0),
                    (pg_current_wal_lsn() - '0/0')::bigint,
                    safe_wal_size
               FROM pg_replication_slots
              WHERE database = current_database() AND slot_name LIKE $1",
            )
            .bind(format!("meridian\\_{}\\_to\\_%", telemetry.region))
            .fetch_all(&pool),
        )
        .await
        .unwrap_or_else(|_| {
            Err(sqlx::Error::Protocol(format!(
                "no answer within {STORE_TIMEOUT:?}"
            )))
        });
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "cannot read slot state");
                telemetry.error(&telemetry.region, "", "monitor");
                telemetry.health.record(Some(e.to_string()), Vec::new());
                continue;
            }
        };
        // missing, or invalidated by max_slot_wal_keep_size
        telemetry.health.record(
            None,
            links
                .iter()
                .filter(|l| !rows.iter().any(|r| r.0 == l.slot && r.2 != "lost"))
                .map(|l| l.slot.clone())
                .collect(),
        );
        let mut slots = Vec::new();
        for link in &links {
            let Some((name, active, wal_status, retained, confirmed, current, safe)) =
                rows.iter().find(|r| r.0 == link.slot)
            else {
                continue;
            };
            // the slot's confirmed position survives agent restarts
            link.acked.fetch_max(*confirmed as u64, Ordering::AcqRel);
            telemetry.update_link(&link.destination, *current as u64);
            slots.push(SlotStatus {
                name: name.clone(),
                destination: link.destination.clone(),
                active: *active,
                wal_status: wal_status.clone(),
                retained_bytes: (*retained).max(0) as u64,
                orphaned: false,
                safe_wal_bytes: *safe,
            });
        }
        // this region's Meridian slots that no link uses
        for (name, active, wal_status, retained, _, _, safe) in
            rows.iter().filter(|r| !slot_names.contains(&r.0))
        {
            let destination = name
                .strip_prefix(&format!("meridian_{}_to_", telemetry.region))
                .unwrap_or_default();
            tracing::warn!(slot = %name, "slot belongs to no link of the topology; `meridian slots prune` drops it");
            slots.push(SlotStatus {
                name: name.clone(),
                destination: destination.to_owned(),
                active: *active,
                wal_status: wal_status.clone(),
                retained_bytes: (*retained).max(0) as u64,
                orphaned: true,
                safe_wal_bytes: *safe,
            });
        }
        telemetry.set_slots(slots);
        let pending = tokio::time::timeout(
            STORE_TIMEOUT,
            sqlx::query_as::<_, (String, i64)>(
                "SELECT source_region, count(*) FROM meridian.dead_letters
                  WHERE status = 'pending' GROUP BY source_region",
            )
            .fetch_all(&pool),
        )
        .await;
        match pending {
            Ok(Ok(pending)) => telemetry.set_pending_dead_letters(&sources, &pending),
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot read dead letters"),
            Err(_) => tracing::debug!("no answer about dead letters within {STORE_TIMEOUT:?}"),
        }
        match tokio::time::timeout(STORE_TIMEOUT, prune_tokens(&pool)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "cannot prune applied tokens"),
            Err(_) => tracing::debug!("no answer pruning tokens within {STORE_TIMEOUT:?}"),
        }
    }
}

/// How long a routed write's token id is kept where it was applied. A
/// reader with an older token waits by position instead (the client's
/// `TOKEN_RETENTION` matches).
const TOKEN_RETENTION: &str = "1 day";

/// Deletes token ids past their retention, a bounded number per tick so a
/// backlog never holds a long transaction.
async fn prune_tokens(pool: &PgPool) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM meridian.applied_tokens WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM meridian.applied_tokens
             WHERE applied_at < now() - $1::interval LIMIT 10000))",
    )
    .bind(TOKEN_RETENTION)
    .execute(pool)
    .await?;
    Ok(())
}
