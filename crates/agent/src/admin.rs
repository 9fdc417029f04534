//! The `Admin` gRPC service: operator calls to this region's agent.

use meridian_core::topology::Topology;
use meridian_proto::admin::{ReloadPolicyReply, ReloadPolicyRequest, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::residency::{self, SharedPolicy};

/// Serves operator calls for one region.
pub struct AdminService {
    pub region: String,
    pub topology: Topology,
    pub policy: SharedPolicy,
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn reload_policy(
        &self,
        _: Request<ReloadPolicyRequest>,
    ) -> Result<Response<ReloadPolicyReply>, Status> {
        let version = residency::reload(&self.topology, &self.policy)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(Response::new(ReloadPolicyReply {
            region: self.region.clone(),
            version,
        }))
    }
}
