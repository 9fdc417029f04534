//! Heartbeats: at a fixed interval the agent writes a transactional logical
//! decoding message (prefix [`PREFIX`], no content) into its own store's WAL.
//!
//! Each heartbeat reaches every peer as an empty transaction, so every peer's
//! watermark for this region moves even when nothing else is written: lag is
//! measured end to end on idle stores, commit tokens resolve, and the slots
//! are confirmed forward, so an idle store keeps no WAL back.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use sqlx::PgPool;
use tokio::sync::watch;

use crate::telemetry::Telemetry;

/// Prefix of the heartbeat messages (`pg_logical_emit_message`).
pub const PREFIX: &str = "meridian.heartbeat";

/// Writes a heartbeat every `every` until shutdown. A failed write is logged
/// and retried at the next tick; it never stops the agent.
pub async fn run(
    pool: PgPool,
    every: Duration,
    telemetry: Arc<Telemetry>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let at = SystemTime::now();
        let written: Result<i64, _> =
            sqlx::query_scalar("SELECT (pg_logical_emit_message(true, $1, '') - '0/0')::bigint")
                .bind(PREFIX)
                .fetch_one(&pool)
                .await;
        if let Ok(lsn) = written {
            telemetry.heartbeat(lsn as u64, at);
        } else {
            telemetry.error(&telemetry.region, "", "heartbeat");
        }
        match written {
            Ok(_) if failing => {
                tracing::info!("heartbeats written again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "cannot write a heartbeat; lag will read high until the store answers");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
