//! The agent's HTTP endpoint: `GET /metrics` (OpenMetrics text; the metrics
//! themselves are defined in [`crate::telemetry`]), and the probes
//! `/healthz` and `/readyz` (see [`crate::health`]).

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::{self, Reply};
use crate::telemetry::Telemetry;

/// The OpenMetrics content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The environment variable that, when set, makes `/metrics` require
/// `Authorization: Bearer <its value>` (for an endpoint exposed beyond
/// localhost; Prometheus's `authorization` scrape setting sends it).
pub const TOKEN_ENV: &str = "MERIDIAN_METRICS_TOKEN";

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `listener` until
/// shutdown.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: watch::Receiver<bool>,
) {
    let handler: http::Handler = Arc::new(move |path: String| {
        let telemetry = telemetry.clone();
        Box::pin(async move {
            match path.as_str() {
                "/metrics" => Reply::ok(CONTENT_TYPE, telemetry.encode()),
                "/healthz" => Reply::probe(telemetry.health.live(telemetry.started)),
                "/readyz" => Reply::probe(telemetry.health.ready()),
                _ => Reply::not_found(),
            }
        })
    });
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    http::serve(listener, handler, token, shutdown).await
}
