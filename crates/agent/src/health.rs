//! What the agent's health endpoints answer, from the monitor's once-a-second
//! look at the store.
//!
//! - **Live** (`/healthz`): the agent's monitor loop began a round within
//!   [`LIVE_WITHIN`] (its store calls are bounded by a timeout). A failing
//!   store does not make the agent dead: a restart would not bring the
//!   store back, and the slots keep the WAL.
//! - **Ready** (`/readyz`, and `grpc.health.v1` on the gRPC port): the
//!   monitor's last look, within [`READY_WITHIN`], reached the store and
//!   found every link's replication slot, none invalidated.
//!
//! The answers name no host, role or error text (the probes need no
//! token); the agent's log has the details.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The monitor loop must have run this recently for the agent to be live.
pub const LIVE_WITHIN: Duration = Duration::from_secs(30);
/// The store must have been reached this recently for the agent to be ready.
pub const READY_WITHIN: Duration = Duration::from_secs(10);

/// The last look at the store.
#[derive(Default)]
pub struct Health {
    last: Mutex<Option<Look>>,
    /// When the monitor loop last began a round.
    beat: Mutex<Option<Instant>>,
}

struct Look {
    at: Instant,
    /// The store could not be read.
    store_failed: bool,
    /// Slots of this region's links the store lacks, or has invalidated.
    unusable_slots: Vec<String>,
}

impl Health {
    /// The monitor loop begins a round.
    pub fn beat(&self) {
        *self.beat.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// Records one look at the store: whether it answered, and the slots
    /// it lacks or has invalidated. A change is logged, with its details.
    pub fn record(&self, store_error: Option<String>, unusable_slots: Vec<String>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let before = last
            .as_ref()
            .map(|l| (l.store_failed, l.unusable_slots.clone()));
        let now = (store_error.is_some(), unusable_slots.clone());
        if before.as_ref() != Some(&now) {
            match (&store_error, unusable_slots.is_empty()) {
                (Some(e), _) => tracing::warn!(error = %e, "not ready: the store does not answer"),
                (None, false) => tracing::warn!(slots = ?unusable_slots,
                    "not ready: replication slots missing or invalidated"),
                (None, true) => tracing::info!("ready"),
            }
        }
        *last = Some(Look {
            at: Instant::now(),
            store_failed: store_error.is_some(),
            unusable_slots,
        });
    }

    /// Ok while the monitor loop runs; `started` is when the agent started
    /// (an agent is live during its first [`LIVE_WITHIN`]).
    pub fn live(&self, started: Instant) -> Result<(), String> {
        let beat = self.beat.lock().unwrap_or_else(|e| e.into_inner());
        let since = beat.unwrap_or(started).elapsed();
        match since <= LIVE_WITHIN {
            true => Ok(()),
            false => Err(format!(
                "the agent's monitor loop has not run for {}s",
                since.as_secs()
            )),
        }
    }

    /// Ok when the last look reached the store and found every slot.
    pub fn ready(&self) -> Result<(), String> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let Some(look) = last.as_ref() else {
            return Err("starting: the store has not been checked yet".into());
        };
        if look.at.elapsed() > READY_WITHIN {
            return Err(format!(
                "the store was last checked {}s ago (the agent's monitor waits on it)",
                look.at.elapsed().as_secs()
            ));
        }
        if look.store_failed {
            return Err("the store is unreachable (the agent's log says why)".into());
        }
        if !look.unusable_slots.is_empty() {
            return Err(format!(
                "replication slot(s) missing or invalidated: {} (`meridian status` shows the link \
                 stopped; `meridian resync` rebuilds the peer's copy)",
                look.unusable_slots.join(", ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_a_clean_look() {
        let h = Health::default();
        assert!(h.ready().unwrap_err().contains("not been checked"));
        assert!(h.live(Instant::now()).is_ok(), "live while starting");
        h.record(Some("db.internal:5432: connection refused".into()), vec![]);
        let why = h.ready().unwrap_err();
        assert!(
            why.contains("unreachable") && !why.contains("db.internal"),
            "{why}"
        );
        h.record(None, vec!["meridian_na_to_eu".into()]);
        assert!(h.ready().unwrap_err().contains("meridian_na_to_eu"));
        h.record(None, vec![]);
        assert_eq!(h.ready(), Ok(()));
        h.beat();
        assert_eq!(h.live(Instant::now()), Ok(()));
    }

    #[test]
    fn not_live_once_the_monitor_stops() {
        let h = Health::default();
        let long_ago = Instant::now()
            .checked_sub(LIVE_WITHIN * 2)
            .expect("the clock goes back a minute");
        assert!(h.live(long_ago).unwrap_err().contains("has not run"));
    }
}
