//! The agent's Prometheus endpoint: `GET /metrics`, OpenMetrics text. The
//! metrics themselves are defined in [`crate::telemetry`].

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

/// Serves `GET /metrics` on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    telemetry: Arc<Telemetry>,
    shutdown: watch::Receiver<bool>,
) {
    let handler: http::Handler = Arc::new(move |path: String| {
        let telemetry = telemetry.clone();
        Box::pin(async move {
            if path == "/metrics" {
                Reply::ok(CONTENT_TYPE, telemetry.encode())
            } else {
                Reply::not_found()
            }
        })
    });
    let token = std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty());
    http::serve(listener, handler, token, shutdown).await
}
