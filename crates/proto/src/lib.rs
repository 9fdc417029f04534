//! Generated gRPC types and services for agent-to-agent replication.
//!
//! The `.proto` sources live in the top-level `proto/` folder; this crate is the
//! only place they are compiled.

#![allow(unreachable_pub, clippy::all)]

/// `meridian.admin.v1`: operator calls to an agent.
pub mod admin {
    tonic::include_proto!("meridian.admin.v1");
}

/// `meridian.replication.v1`: the replication stream between agents.
pub mod replication {
    tonic::include_proto!("meridian.replication.v1");
}

/// Every service and message above, encoded as a `FileDescriptorSet`, for
/// gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/meridian_descriptor.bin"));
