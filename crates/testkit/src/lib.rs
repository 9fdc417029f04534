//! Real parts for tests, benchmarks and the demo: PostgreSQL clusters in
//! temporary folders, agents as OS processes, and a TCP proxy that injects
//! network faults. Everything cleans up on drop, also when a test panics.

pub mod agent;
pub mod deployment;
pub mod postgres;
pub mod proxy;

pub use agent::AgentProcess;
pub use deployment::{Deployment, Spec};
pub use postgres::PgCluster;
pub use proxy::TcpProxy;

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port on 127.0.0.1")
}
