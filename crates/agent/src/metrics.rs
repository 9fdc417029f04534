//! The agent's Prometheus endpoint: `GET /metrics`, OpenMetrics text. The
//! metrics themselves are defined in [`crate::telemetry`].

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::http::{self, Reply};
use crate::telemetry::Telemetry;

/// The OpenMetrics content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

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
    http::serve(listener, handler, shutdown).await
}
