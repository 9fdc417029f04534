//! `meridian dashboard`: one page for every region. It asks every agent's
//! admin service at a fixed interval (like `meridian status`), keeps an hour
//! of lag samples per link, and serves the page (embedded in the binary) and
//! `/api/status` (the latest report and the history, JSON). The page renders
//! the state it was served with and then polls `/api/status`.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use meridian_agent::http::{self, Reply};
use serde::Serialize;

use crate::status::{self, Report, Thresholds};

const PAGE: &str = include_str!("dashboard.html");
/// History kept per link.
const HISTORY_SECONDS: f64 = 3600.0;

/// (unix seconds, lag seconds, bytes shipped so far, changes shipped so far)
type Sample = (f64, f64, Option<u64>, Option<u64>);

#[derive(Serialize)]
struct State {
    /// The topology file, for the commands the page names.
    config: String,
    report: Report,
    history: BTreeMap<String, VecDeque<Sample>>,
}

impl State {
    fn record(&mut self, report: Report) {
        for l in &report.links {
            let samples = self
                .history
                .entry(format!("{}->{}", l.source, l.destination))
                .or_default();
            // an unknown lag (source unreachable) is drawn as a gap-free high value
            let lag = l
                .lag_seconds
                .unwrap_or(report.thresholds.critical_seconds * 1.2);
            samples.push_back((report.at, lag, l.bytes_shipped, l.changes_shipped));
            while samples
                .front()
                .is_some_and(|(t, _, _, _)| report.at - t > HISTORY_SECONDS)
            {
                samples.pop_front();
            }
        }
        self.report = report;
    }
}

pub(crate) async fn run(
    config: &Path,
    listen: SocketAddr,
    thresholds: Thresholds,
    every: Duration,
) -> anyhow::Result<()> {
    let topology = meridian_agent::load_topology(config)?;
    let config_path = config.to_owned();
    let timeout = every.min(Duration::from_secs(3));
    let first = status::gather(&topology, &config_path, thresholds, timeout).await;
    let state = Arc::new(Mutex::new(State {
        config: config.display().to_string(),
        report: first.clone(),
        history: BTreeMap::new(),
    }));
    state.lock().expect("state").record(first);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen} (--listen)"))?;
    println!("dashboard: http://{listen}/");
    let shutdown = crate::shutdown_on_signal();

    let poller = {
        let state = state.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = shutdown.wait_for(|s| *s) => return,
                }
                let report = status::gather(&topology, &config_path, thresholds, timeout).await;
                state.lock().expect("state").record(report);
            }
        })
    };
    let handler: http::Handler = Arc::new(move |path: String| {
        let state = state.clone();
        Box::pin(async move {
            let json = || serde_json::to_string(&*state.lock().expect("state")).unwrap_or_default();
            match path.split('?').next().unwrap_or_default() {
                "/" => Reply::ok(
                    "text/html; charset=utf-8",
                    // no `<` in the script: neither `</script>` nor `<!--` can end or confuse it
                    PAGE.replace("/*INITIAL*/null", &json().replace('<', "\\u003c")),
                ),
                "/api/status" => Reply::ok("application/json", json()),
                _ => Reply::not_found(),
            }
        })
    });
    // exposed beyond localhost, the page can require a bearer token
    let token = std::env::var("MERIDIAN_DASHBOARD_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    http::serve(listener, handler, token, shutdown).await;
    poller.abort();
    Ok(())
}
