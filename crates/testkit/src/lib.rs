//! Real parts for tests, benchmarks and the demo: PostgreSQL clusters in
//! temporary folders, agents as OS processes, and a TCP proxy that injects
//! network faults. Everything cleans up on drop, also when a test panics.

pub mod agent;
pub mod deployment;
pub mod kafka;
pub mod metric_names;
pub mod postgres;
pub mod proxy;
pub mod release;

pub use agent::AgentProcess;
pub use deployment::{Deployment, Spec};
pub use kafka::KafkaBroker;
pub use postgres::PgCluster;
pub use proxy::TcpProxy;

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process
/// has not handed out before.
///
/// Ports come from 20000..32000, below Linux's default ephemeral range
/// (32768..60999), so the kernel does not give them to outgoing connections
/// between the check and the moment a server binds them. Tests run in
/// parallel; a collision is still possible, so servers retry on
/// "address in use" (see [`PgCluster`]).
pub fn free_port() -> u16 {
    use std::collections::HashSet;
    use std::hash::{BuildHasher, RandomState};
    use std::sync::Mutex;
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

    let seed = RandomState::new();
    for attempt in 0u64..10_000 {
        let port = 20_000 + (seed.hash_one((std::process::id(), attempt)) % 12_000) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        let given = given.get_or_insert_with(HashSet::new);
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free TCP port on 127.0.0.1 in 20000..32000")
}

/// `GET path` from `addr` (`host:port`); the body of a 200 answer.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let (status, body) = http_get_status(addr, path).await?;
    anyhow::ensure!(
        status == 200,
        "GET {path} from {addr} answered {status}: {body}"
    );
    Ok(body)
}

/// `GET path` from `addr`, whatever the status: (status code, body).
pub async fn http_get_status(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    let status = response
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("GET {path} from {addr}: not HTTP: {response}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A replication batch of `payload` (an encoded batch, uncompressed) as an
/// agent seals it, for tests that speak to a receiver themselves: it ends
/// at `end_lsn`, claims `wal_end` as the source's WAL end, and is bound to
/// `incarnation`.
pub fn sealed_batch(
    seq: u64,
    payload: Vec<u8>,
    end_lsn: u64,
    wal_end: u64,
    incarnation: &str,
) -> meridian_proto::replication::Batch {
    let claims = meridian_core::codec::Claims {
        crc32: meridian_core::codec::checksum(&payload),
        seq,
        end_lsn,
        source_wal_end: wal_end,
        compression: "",
        policy_version: 0,
        incarnation,
    };
    meridian_proto::replication::Batch {
        seq,
        end_lsn,
        crc32: claims.crc32,
        payload,
        policy_version: 0,
        compression: String::new(),
        source_wal_end: wal_end,
        seal: Some(claims.seal()),
    }
}
