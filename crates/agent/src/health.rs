//! What the agent's health endpoints answer, from the monitor's once-a-second
//! look at the store.
//!
//! - **Live** (`/healthz`): the agent's monitor loop ran within
//!   [`LIVE_WITHIN`]. A failing store does not make the agent dead: a
//!   restart would not bring the store back, and the slot keeps the WAL.
//! - **Ready** (`/readyz`, and `grpc.health.v1` on the gRPC port): the
//!   monitor's last look, within [`READY_WITHIN`], reached the store and
//!   found every link's replication slot.

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
}

struct Look {
    at: Instant,
    /// Why the store could not be read; `None`: it was.
    store_error: Option<String>,
    /// Slots of this region's links the store does not have.
    missing_slots: Vec<String>,
}

impl Health {
    /// Records one look at the store.
    pub fn record(&self, store_error: Option<String>, missing_slots: Vec<String>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Look {
            at: Instant::now(),
            store_error,
            missing_slots,
        });
    }

    /// Ok while the monitor loop runs; `started` is when the agent started
    /// (an agent is live during its first [`LIVE_WITHIN`]).
    pub fn live(&self, started: Instant) -> Result<(), String> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let since = last.as_ref().map_or(started, |l| l.at).elapsed();
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
        if let Some(e) = &look.store_error {
            return Err(format!("the store is unreachable: {e}"));
        }
        if !look.missing_slots.is_empty() {
            return Err(format!(
                "replication slot(s) missing: {} (the link creates its slot when it connects; \
                 a slot lost while the agent ran needs `meridian resync`)",
                look.missing_slots.join(", ")
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
        h.record(Some("connection refused".into()), vec![]);
        assert!(h.ready().unwrap_err().contains("unreachable"));
        h.record(None, vec!["meridian_na_to_eu".into()]);
        assert!(h.ready().unwrap_err().contains("meridian_na_to_eu"));
        h.record(None, vec![]);
        assert_eq!(h.ready(), Ok(()));
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
