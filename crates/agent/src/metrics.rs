//! The agent's Prometheus endpoint (`GET /metrics`, text exposition format).
//!
//! Metric names and labels are constants here, following Prometheus naming
//! (a `meridian_` prefix, base units, `_total` for counters). Labels carry
//! table, rule and region names, never row values.

use std::fmt::Write as _;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::residency::{self, Audit, SharedPolicy};

/// Row changes the residency policy passed, transformed or blocked, per
/// table, rule (`-`: none matched), link and verdict.
pub const POLICY_CHANGES_TOTAL: &str = "meridian_policy_changes_total";
/// Version of the residency policy in force (0: none).
pub const POLICY_VERSION: &str = "meridian_policy_version";

/// What the endpoint reads from.
#[derive(Clone)]
pub struct Sources {
    pub region: String,
    pub audit: Arc<Audit>,
    pub policy: SharedPolicy,
}

/// Renders every metric.
pub fn render(sources: &Sources) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP {POLICY_CHANGES_TOTAL} Row changes the residency policy passed, transformed or blocked."
    );
    let _ = writeln!(out, "# TYPE {POLICY_CHANGES_TOTAL} counter");
    for ((table, rule, destination, verdict), n) in sources.audit.totals() {
        let _ = writeln!(
            out,
            "{POLICY_CHANGES_TOTAL}{{table=\"{}\",rule=\"{}\",source=\"{}\",destination=\"{}\",verdict=\"{}\"}} {n}",
            escape(&table),
            escape(&rule),
            escape(&sources.region),
            escape(&destination),
            residency::verdict_name(verdict)
        );
    }
    let version = residency::current(&sources.policy).map_or(0, |p| p.version());
    let _ = writeln!(
        out,
        "# HELP {POLICY_VERSION} Version of the residency policy in force (0: none)."
    );
    let _ = writeln!(out, "# TYPE {POLICY_VERSION} gauge");
    let _ = writeln!(
        out,
        "{POLICY_VERSION}{{region=\"{}\"}} {version}",
        escape(&sources.region)
    );
    out
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Serves `GET /metrics` on `listener` until shutdown.
pub async fn serve(listener: TcpListener, sources: Sources, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|s| *s) => return,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let Ok(n) = socket.read(&mut request).await else {
                return;
            };
            let line = String::from_utf8_lossy(&request[..n]);
            let response = if line.starts_with("GET /metrics ") {
                let body = render(&sources);
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                    .to_owned()
            };
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}
