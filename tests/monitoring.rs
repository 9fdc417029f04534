//! Lag you can see: metrics against known workloads, `meridian status`,
//! the dashboard in headless Chromium, and the committed Grafana dashboard
//! and alert rules checked against what agents export.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use meridian_testkit::metric_names::{exported_series, referenced};
use meridian_testkit::{Deployment, Spec};

const REGIONS: [&str; 3] = ["na", "eu", "apac"];

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

async fn start() -> anyhow::Result<Deployment> {
    Deployment::start(
        binary(),
        &Spec {
            regions: &REGIONS,
            schema: "CREATE TABLE events (id bigint PRIMARY KEY, region text NOT NULL, body text)",
            tables: &[("public.events", "id", "region")],
            proxied: &["apac"],
            extra_topology: "[replication]\nheartbeat_ms = 200\n",
            policy: None,
            agent_env: &[],
            global_schema: None,
            kafka: false,
        },
    )
    .await
}

/// Writes a row in na every 50 ms until dropped.
fn steady_writes(d: &Deployment) -> tokio::task::JoinHandle<()> {
    let pool = d.pool("na").clone();
    tokio::spawn(async move {
        for id in 0.. {
            let _ = sqlx::query("INSERT INTO events VALUES ($1, 'na', 'steady')")
                .bind(id as i64)
                .execute(&pool)
                .await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// The value of `series` in `region`'s metrics once it is above 0 (within
/// 30 s).
async fn metric_above_zero(d: &Deployment, region: &str, series: &str) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match d.metric(region, series).await? {
            Some(n) if n > 0.0 => return Ok(n),
            other => anyhow::ensure!(Instant::now() < deadline, "{series} in {region}: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn link(source: &str, destination: &str) -> String {
    format!(r#"{{source="{source}",destination="{destination}"}}"#)
}

async fn lag(d: &Deployment, source: &str, destination: &str) -> anyhow::Result<f64> {
    d.metric(
        source,
        &format!("meridian_link_lag_seconds{}", link(source, destination)),
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("no lag metric for {source} -> {destination}"))
}

/// Polls until `source -> destination` lags less than `below` seconds.
async fn wait_lag_below(
    d: &Deployment,
    source: &str,
    destination: &str,
    below: f64,
) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = lag(d, source, destination).await?;
        if now < below {
            return Ok(now);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{source} -> {destination} still lags {now} s after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `meridian status --config ... --json`: (exit success, report).
fn status(d: &Deployment) -> anyhow::Result<(bool, serde_json::Value)> {
    let (code, report) = d.status(binary())?;
    Ok((code == Some(0), report))
}

/// Polls `meridian status` until it reports healthy (exit code 0).
async fn wait_healthy(d: &Deployment) -> anyhow::Result<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (healthy, report) = status(d)?;
        if healthy {
            return Ok(report);
        }
        anyhow::ensure!(Instant::now() < deadline, "never healthy: {report:#}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn link_report<'a>(
    report: &'a serde_json::Value,
    source: &str,
    destination: &str,
) -> &'a serde_json::Value {
    report["links"]
        .as_array()
        .and_then(|links| {
            links
                .iter()
                .find(|l| l["source"] == source && l["destination"] == destination)
        })
        .unwrap_or_else(|| panic!("no link {source} -> {destination} in {report:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_metrics_and_status_follow_a_paused_link() -> anyhow::Result<()> {
    let mut d = start().await?;
    wait_healthy(&d).await?;

    // an idle store: heartbeats alone move the peer's watermark and the slot
    let progress = |d: &Deployment| {
        let (na, eu) = (d.pool("na").clone(), d.pool("eu").clone());
        async move {
            let applied: i64 = sqlx::query_scalar(
                "SELECT coalesce(max(end_lsn), 0) FROM meridian.watermarks WHERE source_region = 'na'",
            )
            .fetch_one(&eu)
            .await?;
            let confirmed: i64 = sqlx::query_scalar(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = 'meridian_na_to_eu'",
            )
            .fetch_one(&na)
            .await?;
            Ok::<_, anyhow::Error>((applied, confirmed))
        }
    };
    let before = progress(&d).await?;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = progress(&d).await?;
    assert!(
        after.0 > before.0 && after.1 > before.1,
        "idle: watermark and slot did not move: {before:?} -> {after:?}"
    );
    let idle = lag(&d, "na", "eu").await?;
    assert!(idle < 1.0, "an idle, healthy link lags {idle} s");

    let writer = steady_writes(&d);
    let report = wait_healthy(&d).await?;
    for peer in ["eu", "apac"] {
        wait_lag_below(&d, "na", peer, 1.0).await?;
    }
    for l in report["links"].as_array().unwrap() {
        assert_eq!(l["state"], "connected", "{l}");
    }
    assert_eq!(report["links"].as_array().unwrap().len(), 6);

    // shipped at the source, applied at the destination, per table (a lag
    // under a second can be read before the first heartbeat, so wait for
    // the first rows)
    let shipped = metric_above_zero(
        &d,
        "na",
        r#"meridian_changes_shipped_total{table="public.events",source="na",destination="eu"}"#,
    )
    .await?;
    assert!(shipped > 0.0);
    let applied = metric_above_zero(
        &d,
        "eu",
        r#"meridian_changes_applied_total{table="public.events",source="na",destination="eu"}"#,
    )
    .await?;
    assert!(applied > 0.0);
    let applies = d
        .metric(
            "eu",
            &format!("meridian_apply_duration_seconds_count{}", link("na", "eu")),
        )
        .await?;
    assert!(applies.is_some_and(|n| n > 0.0), "{applies:?}");
    let retained = d
        .metric(
            "na",
            r#"meridian_slot_retained_wal_bytes{slot="meridian_na_to_apac",destination="apac"}"#,
        )
        .await?;
    assert!(retained.is_some(), "slot retention is exported");

    // the link na -> apac is down for 3.5 s under a steady write rate
    d.proxy("apac").pause();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let paused = lag(&d, "na", "apac").await?;
    assert!(paused >= 3.0, "lag of the paused link: {paused} s");
    let healthy_link = lag(&d, "na", "eu").await?;
    assert!(healthy_link < 1.0, "the other link lags {healthy_link} s");
    let behind = d
        .metric(
            "na",
            &format!("meridian_link_lag_bytes{}", link("na", "apac")),
        )
        .await?;
    assert!(behind.is_some_and(|b| b > 0.0), "{behind:?}");
    let retrying = d
        .metric(
            "na",
            r#"meridian_link_state{source="na",destination="apac",state="retrying"}"#,
        )
        .await?;
    assert_eq!(retrying, Some(1.0));

    let (healthy, report) = status(&d)?;
    assert!(
        !healthy,
        "status must fail while a link is down: {report:#}"
    );
    let down = link_report(&report, "na", "apac");
    assert_ne!(down["state"], "connected", "{down}");
    assert_eq!(down["health"], "critical", "{down}");
    assert_eq!(link_report(&report, "na", "eu")["health"], "ok");

    d.proxy("apac").resume();
    let recovered = wait_lag_below(&d, "na", "apac", 1.0).await?;
    assert!(recovered < 1.0);
    wait_healthy(&d).await?;

    // a region that does not answer is shown, and does not hide the others
    d.agent("apac").kill9();
    let out = Command::new(binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    let apac = text.lines().find(|l| l.starts_with("apac ")).unwrap_or("");
    assert!(apac.contains("UNREACHABLE"), "{text}");
    for up in ["na ", "eu "] {
        let line = text.lines().find(|l| l.starts_with(up)).unwrap_or("");
        assert!(line.contains(" up "), "{text}");
    }
    assert!(
        text.contains("na -> eu") && text.contains("connected"),
        "{text}"
    );
    writer.abort();
    Ok(())
}

/// Where tests leave files for people to look at.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("create target/test-artifacts");
    dir
}

/// Headless Chromium with the flags this machine's closed network needs.
fn chromium(args: &[&str], url: &str) -> anyhow::Result<String> {
    let profile = tempdir();
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot start chromium ({e}); install Debian's chromium package (.ci/run does)"
            )
        })?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("chromium did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(&profile);
    Ok(reader.join().unwrap_or_default())
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meridian-chromium-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("create a chromium profile folder");
    dir
}

/// `data-health` of each matrix cell, by `data-link` ("na-eu").
fn matrix(dom: &str) -> Vec<(String, String)> {
    let table = dom
        .split_once("<table id=\"matrix\">")
        .and_then(|(_, rest)| rest.split_once("</table>"))
        .map_or("", |(table, _)| table);
    table
        .split("data-link=\"")
        .skip(1)
        .filter_map(|rest| {
            let (link, rest) = rest.split_once('"')?;
            let health = rest.split_once("data-health=\"")?.1.split_once('"')?.0;
            Some((link.to_owned(), health.to_owned()))
        })
        .collect()
}

struct Dashboard(std::process::Child);

impl Drop for Dashboard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_every_link_and_turns_a_paused_one_red() -> anyhow::Result<()> {
    let d = start().await?;
    let addr = format!("127.0.0.1:{}", meridian_testkit::free_port());
    let _dashboard = Dashboard(
        Command::new(binary())
            .args([
                "dashboard",
                "--interval-ms",
                "300",
                "--listen",
                &addr,
                "--config",
            ])
            .arg(&d.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let url = format!("http://{addr}/");
    let healthy_within = |want: bool| {
        let addr = addr.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Ok(body) = meridian_testkit::http_get(&addr, "/api/status").await
                    && let Ok(state) = serde_json::from_str::<serde_json::Value>(&body)
                    && state["report"]["healthy"] == want
                {
                    return Ok::<serde_json::Value, anyhow::Error>(state);
                }
                anyhow::ensure!(Instant::now() < deadline, "dashboard never healthy={want}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    healthy_within(true).await?;
    // a few samples of history, so rates and chart lines exist
    tokio::time::sleep(Duration::from_secs(1)).await;

    let dom = chromium(&["--virtual-time-budget=1000", "--dump-dom"], &url)?;
    let cells = matrix(&dom);
    let links: BTreeSet<&str> = cells.iter().map(|(l, _)| l.as_str()).collect();
    let expected: BTreeSet<&str> = ["na-eu", "na-apac", "eu-na", "eu-apac", "apac-na", "apac-eu"]
        .into_iter()
        .collect();
    assert_eq!(links, expected, "{dom}");
    assert!(cells.iter().all(|(_, h)| h == "ok"), "{cells:?}");
    let shown_lag = |dom: &str, link: &str| -> f64 {
        dom.split_once(&format!("data-link=\"{link}\""))
            .and_then(|(_, rest)| rest.split_once("\">"))
            .and_then(|(_, rest)| rest.split_once("<br>"))
            .and_then(|(lag, _)| seconds(lag))
            .unwrap_or(f64::NAN)
    };
    assert!(shown_lag(&dom, "na-eu") < 1.0, "{dom}");
    assert!(dom.contains("data-chart=\"na-&gt;apac\"") || dom.contains("data-chart=\"na->apac\""));
    readable(&dom, 6)?;
    // healthy links draw their lag along the bottom of the chart
    let page = dom
        .split_once("<script>")
        .map_or(dom.as_str(), |(page, _)| page);
    for chart in page.split("<polyline").skip(1) {
        let last = chart
            .split_once("points=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .and_then(|(points, _)| points.rsplit(' ').next())
            .and_then(|p| p.split_once(','))
            .and_then(|(_, y)| y.parse::<f64>().ok())
            .unwrap_or(f64::NAN);
        assert!(last > 80.0, "a healthy link's lag is drawn near 0: {last}");
    }

    d.proxy("apac").pause();
    healthy_within(false).await?;
    let dom = chromium(&["--virtual-time-budget=1000", "--dump-dom"], &url)?;
    let cells = matrix(&dom);
    let health = |link: &str| {
        cells
            .iter()
            .find(|(l, _)| l == link)
            .map(|(_, h)| h.clone())
            .unwrap_or_default()
    };
    assert_eq!(health("na-apac"), "critical", "{cells:?}");
    assert_eq!(health("eu-apac"), "critical", "{cells:?}");
    assert_eq!(health("na-eu"), "ok", "{cells:?}");
    assert!(
        shown_lag(&dom, "na-eu") < 1.0,
        "a healthy link during the pause: {dom}"
    );
    assert!(
        dom.contains(r#"class="cell bad" data-link="na-apac""#),
        "the paused link's cell is red: {dom}"
    );
    // apac answers through its paused proxy: not at all
    readable(&dom, 4)?;

    let shot = artifacts().join("dashboard-link-paused.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            "--virtual-time-budget=1000",
            "--window-size=1280,1100",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    )?;
    let png = std::fs::read(&shot)?;
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{}",
        shot.display()
    );
    d.proxy("apac").resume();
    // once healthy again, the pause's error is history: shown with its age,
    // faded, and not the link's problem
    healthy_within(true).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let dom = loop {
        let dom = chromium(&["--virtual-time-budget=1000", "--dump-dom"], &url)?;
        let row = link_row(&dom, "na-&gt;apac");
        if row.contains(r#"class="history""#) {
            break dom;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the old error never faded: {row}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let row = link_row(&dom, "na-&gt;apac");
    assert!(row.contains(" ago)"), "the error's age is shown: {row}");
    assert!(
        row.contains(r#"<td class="problem"></td>"#),
        "no problem now: {row}"
    );
    readable(&dom, 6)?;
    let shot = artifacts().join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        &[
            "--virtual-time-budget=1000",
            "--window-size=1400,1600",
            &format!("--screenshot={}", shot.display()),
        ],
        &url,
    )?;
    assert!(std::fs::read(&shot)?.starts_with(b"\x89PNG"));
    Ok(())
}

/// Seconds from a shown duration (`850 ms`, `3.2 s`, `4m12s`).
fn seconds(shown: &str) -> Option<f64> {
    let shown = shown.trim();
    if let Some(ms) = shown.strip_suffix(" ms") {
        return ms.parse::<f64>().ok().map(|ms| ms / 1000.0);
    }
    if let Some(s) = shown.strip_suffix(" s") {
        return s.parse().ok();
    }
    let (m, s) = shown.strip_suffix('s')?.split_once('m')?;
    Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// The links table's row of `link` (`na-&gt;apac`).
fn link_row(dom: &str, link: &str) -> String {
    let plain = link.replace("&gt;", ">");
    [link, plain.as_str()]
        .iter()
        .find_map(|l| dom.split_once(&format!("<tr data-link=\"{l}\">")))
        .and_then(|(_, rest)| rest.split_once("</tr>"))
        .map_or_else(String::new, |(row, _)| row.to_owned())
}

/// Up to `n` bytes of `s` either side of `i`, on character boundaries.
fn around(s: &str, i: usize, n: usize) -> &str {
    let mut a = i.saturating_sub(n);
    while !s.is_char_boundary(a) {
        a -= 1;
    }
    let mut b = (i + n).min(s.len());
    while !s.is_char_boundary(b) {
        b += 1;
    }
    &s[a..b]
}

/// What the page shows (not its script) reads like a dashboard: no raw
/// floats, throughput in changes per second, every panel there, lag
/// charts with a wall-clock axis.
/// `rows`: the (destination, source) pairs and the slots of the regions
/// that answer.
fn readable(dom: &str, rows: usize) -> anyhow::Result<()> {
    let shown = dom
        .split_once("<h1>")
        .and_then(|(_, rest)| rest.split_once("<script>"))
        .map_or("", |(body, _)| body);
    anyhow::ensure!(!shown.is_empty(), "no page body: {dom}");
    let bytes = shown.as_bytes();
    for (i, _) in shown.match_indices('.') {
        let before = i > 0 && bytes[i - 1].is_ascii_digit();
        let after = bytes[i + 1..]
            .iter()
            .take_while(|b| b.is_ascii_digit())
            .count();
        // chart coordinates live in attributes, numbers for people in text
        let in_attribute = shown[..i]
            .rfind(['<', '>'])
            .is_some_and(|j| bytes[j] == b'<');
        // people read at most one decimal
        anyhow::ensure!(
            !(before && after >= 2) || in_attribute,
            "a raw float on the page: {}",
            around(shown, i, 40)
        );
    }
    for panel in ["meridian dead-letters list --config", "changes/s"] {
        anyhow::ensure!(shown.contains(panel), "{panel:?} is not on the page");
    }
    // one row per (destination, source) and per slot: 3 regions, 6 links
    let count = |marker: &str| shown.matches(marker).count();
    anyhow::ensure!(
        count("data-aside=\"") == rows,
        "dead letters and violations panel: {shown}"
    );
    anyhow::ensure!(count("data-slot=\"") == rows, "slots panel: {shown}");
    // every chart draws its lag, 0 included, inside the plot
    for chart in shown.split("<polyline").skip(1) {
        let points = chart
            .split_once("points=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("", |(points, _)| points);
        anyhow::ensure!(!points.is_empty(), "a chart without a line: {chart}");
        for point in points.split(' ') {
            let y: f64 = point
                .split_once(',')
                .map_or(f64::NAN, |(_, y)| y.parse().unwrap_or(f64::NAN));
            anyhow::ensure!(
                (0.0..90.0).contains(&y),
                "a point outside the plot: {point}"
            );
        }
    }
    let axis = shown.split("class=\"axis\"").nth(1).unwrap_or("");
    let label = axis
        .split_once('>')
        .map_or("", |(_, rest)| rest.get(..5).unwrap_or(rest));
    anyhow::ensure!(
        label.len() == 5 && label.as_bytes()[2] == b':',
        "the chart's time axis reads {label:?}, not a wall-clock time"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitoring_files_reference_only_exported_metrics() -> anyhow::Result<()> {
    let families: String = meridian_agent::telemetry::FAMILIES
        .iter()
        .map(|(name, kind)| format!("# TYPE {name} {kind}\n"))
        .collect();
    let exported = exported_series(&families);
    assert!(
        exported.contains("meridian_link_lag_seconds"),
        "{exported:?}"
    );
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring");
    let dashboard = std::fs::read_to_string(root.join("grafana-dashboard.json"))?;
    let parsed: serde_json::Value = serde_json::from_str(&dashboard)?;
    assert!(parsed["panels"].as_array().is_some_and(|p| p.len() >= 8));
    let alerts = std::fs::read_to_string(root.join("alerts.yml"))?;
    let global = std::fs::read_to_string(root.join("global-alerts.yml"))?;
    for (file, text, at_least) in [
        ("grafana-dashboard.json", &dashboard, 5),
        ("alerts.yml", &alerts, 5),
        ("global-alerts.yml", &global, 1),
    ] {
        let names = referenced(text);
        assert!(names.len() >= at_least, "{file}: {names:?}");
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} references metrics no agent exports: {unknown:?}"
        );
    }
    for alert in [
        "MeridianLinkLagHigh",
        "MeridianSlotRetainedWalHigh",
        "MeridianLinkDown",
        "MeridianDeadLettersGrowing",
        "MeridianAgentDown",
    ] {
        assert!(alerts.contains(&format!("alert: {alert}")), "{alert}");
    }
    assert!(global.contains("alert: MeridianConfigDrift"));

    // and a live agent exports only families the telemetry defines
    let d = start().await?;
    let live = exported_series(&d.metrics("eu").await?);
    assert!(live.len() >= 5, "{live:?}");
    assert!(live.is_subset(&exported), "{live:?} vs {exported:?}");
    Ok(())
}
