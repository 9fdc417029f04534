//! The `Admin` gRPC service: operator calls to this region's agent.

use std::sync::Arc;
use std::time::SystemTime;

use meridian_core::topology::Topology;
use meridian_proto::admin::{
    InboundStatus, LinkStatus, ReloadPolicyReply, ReloadPolicyRequest, SlotStatus, StatusReply,
    StatusRequest, TableChanges, admin_server::Admin,
};
use tonic::{Request, Response, Status};

use crate::residency::{self, SharedPolicy};
use crate::telemetry::Telemetry;

/// Longest wait for the store while answering a status call (the CLI waits
/// 3 s for the whole answer).
const BASELINE_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);

/// Serves operator calls for one region.
pub struct AdminService {
    pub region: String,
    pub topology: Topology,
    pub policy: SharedPolicy,
    /// The store's columns, read at start, for checking reloaded policies.
    pub columns: residency::StoreColumns,
    pub telemetry: Arc<Telemetry>,
    /// Callers are known by their certificates (mTLS): any valid one may
    /// read status; changes need an operator's.
    pub tls: bool,
    /// The region's store, for the baseline status reports.
    pub pool: sqlx::PgPool,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn reload_policy(
        &self,
        request: Request<ReloadPolicyRequest>,
    ) -> Result<Response<ReloadPolicyReply>, Status> {
        let caller = meridian_trust::net::caller(&request);
        if self.tls && !matches!(caller, Some(meridian_trust::Identity::Operator(_))) {
            self.telemetry.refused("not_an_operator");
            let who = caller.map_or("no certificate".to_owned(), |c| c.to_string());
            return Err(Status::permission_denied(format!(
                "reloading the policy needs an operator certificate (spiffe://{}/operator/<name>); this call came from {who}",
                meridian_trust::TRUST_DOMAIN
            )));
        }
        if let Some(who) = caller {
            tracing::info!(region = %self.region, caller = %who, "policy reload requested");
        }
        let version = residency::reload_and_copy(
            &self.topology,
            &self.columns,
            &self.policy,
            &self.pool,
            &self.region,
        )
        .await
        .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(Response::new(ReloadPolicyReply {
            region: self.region.clone(),
            version,
        }))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let t = &self.telemetry;
        let now = SystemTime::now();
        // a store that does not answer must not make the agent look unreachable
        let baseline = tokio::time::timeout(
            BASELINE_TIMEOUT,
            crate::baseline::read(&self.pool, &self.topology, &self.policy),
        )
        .await
        .unwrap_or_else(|_| meridian_proto::admin::Baseline {
            store_error: format!("the store did not answer within {BASELINE_TIMEOUT:?}"),
            ..Default::default()
        });
        let (copies, copies_error) =
            match tokio::time::timeout(BASELINE_TIMEOUT, crate::sync::report(&self.pool)).await {
                Ok(Ok(reports)) => (
                    reports.into_iter().map(copy_status).collect(),
                    String::new(),
                ),
                Ok(Err(e)) => (
                    Vec::new(),
                    format!(
                        "reading meridian.sync_tables: {}",
                        crate::sync::describe(&e.into())
                    ),
                ),
                Err(_) => (
                    Vec::new(),
                    format!("the store did not answer within {BASELINE_TIMEOUT:?}"),
                ),
            };
        Ok(Response::new(StatusReply {
            copies,
            copies_error,
            baseline: Some(baseline),
            region: self.region.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_seconds: t.started.elapsed().as_secs_f64(),
            policy_version: residency::current(&self.policy).map_or(0, |p| p.version()),
            slots: t
                .slots()
                .into_iter()
                .map(|s| SlotStatus {
                    name: s.name,
                    destination: s.destination,
                    active: s.active,
                    wal_status: s.wal_status,
                    retained_bytes: s.retained_bytes,
                    orphaned: s.orphaned,
                })
                .collect(),
            links: t
                .links()
                .into_iter()
                .map(|(destination, l)| LinkStatus {
                    destination,
                    state: l.state.name().to_owned(),
                    state_seconds: l.since.elapsed().as_secs_f64(),
                    lag_seconds: l.lag_seconds,
                    lag_bytes: l.lag_bytes,
                    last_error_age_seconds: l
                        .last_error
                        .as_ref()
                        .map_or(0.0, |(_, at)| at.elapsed().as_secs_f64()),
                    last_error: l.last_error.map(|(e, _)| e).unwrap_or_default(),
                    acked_lsn: l.acked_lsn,
                    changes_shipped: l.changes_shipped,
                    bytes_shipped: l.bytes_shipped,
                    tables: l
                        .tables
                        .into_iter()
                        .map(|(table, changes)| TableChanges { table, changes })
                        .collect(),
                })
                .collect(),
            inbound: t
                .inbound()
                .into_iter()
                .map(|(source, i)| InboundStatus {
                    source,
                    applied_lsn: i.applied_lsn,
                    seconds_since_apply: i.last_applied.map_or(-1.0, |at| {
                        now.duration_since(at).unwrap_or_default().as_secs_f64()
                    }),
                    changes_applied: i.changes_applied,
                    dead_letters: i.dead_letters,
                    dead_letters_pending: i.dead_letters_pending,
                    policy_violations: i.policy_violations,
                    stalled: i.stalled.len() as u32,
                    stalled_error: i
                        .stalled
                        .values()
                        .min_by_key(|(_, since)| *since)
                        .map(|(e, _)| e.clone())
                        .unwrap_or_default(),
                    stalled_seconds: i
                        .stalled
                        .values()
                        .map(|(_, since)| since.elapsed().as_secs_f64())
                        .fold(0.0, f64::max),
                })
                .collect(),
        }))
    }
}

/// A copy as `Admin.Status` reports it.
fn copy_status(r: crate::sync::TableReport) -> meridian_proto::admin::CopyStatus {
    meridian_proto::admin::CopyStatus {
        destination: r.destination,
        table: r.table_name,
        state: r.state,
        reason: r.reason,
        rows: r.rows,
        rows_expected: r.rows_expected.unwrap_or(-1),
        bytes: r.bytes,
        elapsed_seconds: r.elapsed_seconds.unwrap_or(0.0),
        last_error: r.last_error.unwrap_or_default(),
        idle_seconds: r.idle_seconds.unwrap_or(-1.0),
    }
}
