//! `meridian sync start|status`: queue an initial sync (a copy of the rows
//! a source already holds) and follow its progress, read from each source
//! store's `meridian.sync_tables` and `meridian.sync_ranges`.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use meridian_agent::sync::{self, TableReport};
use meridian_core::topology::Topology;

use crate::dead_letters::connect;
use crate::human;

/// `meridian sync start`: queues a copy of `tables` (every replicated table
/// when empty) over the link `SOURCE:DESTINATION`, then follows it with a
/// progress bar until done, unless `detach`.
pub(crate) async fn start(
    config: &Path,
    link: &str,
    tables: &[String],
    detach: bool,
) -> anyhow::Result<()> {
    let topology = Topology::load(config)?;
    let (source, destination) = link
        .split_once(':')
        .with_context(|| format!("--link {link:?}: expected SOURCE:DESTINATION, e.g. na:eu"))?;
    for region in [source, destination] {
        topology.region(region).map_err(anyhow::Error::msg)?;
    }
    anyhow::ensure!(
        source != destination,
        "--link {link}: a link joins two different regions"
    );
    let known: Vec<String> = topology.tables.iter().map(|t| t.name.clone()).collect();
    let tables: Vec<String> = match tables {
        [] => known.clone(),
        named => {
            for t in named {
                anyhow::ensure!(
                    known.contains(t),
                    "--table {t}: not a replicated table of {} (tables: {})",
                    config.display(),
                    known.join(", ")
                );
            }
            named.to_vec()
        }
    };
    let mut conn = connect(&topology, source).await?;
    sync::request(&mut conn, destination, &tables, sync::reason::REQUESTED)
        .await
        .map_err(|e| no_sync_tables(e, source))?;
    println!(
        "queued a copy of {} from {source} to {destination}; {source}'s agent starts it within a second",
        tables.join(", ")
    );
    if detach {
        println!(
            "follow it with: meridian sync status --config {}",
            config.display()
        );
        return Ok(());
    }
    let terminal = std::io::stdout().is_terminal();
    let mut last_line = std::time::Instant::now();
    loop {
        let reports: Vec<TableReport> = sync::report(&mut conn)
            .await?
            .into_iter()
            .filter(|r| r.destination == destination && tables.contains(&r.table_name))
            .collect();
        let done = reports.iter().all(|r| r.state == "done");
        let line = bar(&reports);
        if terminal {
            print!("\r\x1b[2K{line}");
            std::io::stdout().flush()?;
        } else if done || last_line.elapsed() >= Duration::from_secs(5) {
            println!("{line}");
            last_line = std::time::Instant::now();
        }
        if done {
            if terminal {
                println!();
            }
            println!("copy from {source} to {destination} done");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// One line: a bar over every table's rows, rate and time left.
fn bar(reports: &[TableReport]) -> String {
    let rows: i64 = reports.iter().map(|r| r.rows).sum();
    let expected: i64 = reports
        .iter()
        .map(|r| match r.state.as_str() {
            "done" => r.rows,
            _ => r.rows_expected.unwrap_or(0).max(r.rows),
        })
        .sum();
    let bytes: i64 = reports.iter().map(|r| r.bytes).sum();
    let elapsed = reports
        .iter()
        .filter_map(|r| r.elapsed_seconds)
        .fold(0.0, f64::max);
    if reports.iter().any(|r| r.state == "waiting") || reports.is_empty() {
        return format!(
            "planning the copy ({} of {} tables done)",
            reports.iter().filter(|r| r.state == "done").count(),
            reports.len()
        );
    }
    let p = meridian_core::snapshot::progress(rows as u64, expected as u64, elapsed);
    const WIDTH: usize = 30;
    let filled = (p.fraction * WIDTH as f64).round() as usize;
    let done = reports.iter().filter(|r| r.state == "done").count();
    format!(
        "[{}{}] {:>5.1}%  {} of {} rows, {}  {}/s  {}  ({done} of {} tables done)",
        "#".repeat(filled),
        "-".repeat(WIDTH - filled),
        p.fraction * 100.0,
        rows,
        expected,
        human::bytes(bytes.max(0) as f64),
        human::count(p.rows_per_second),
        match p.remaining_seconds {
            Some(s) => format!("{} left", human::duration(s)),
            None => "starting".into(),
        },
        reports.len()
    )
}

/// `meridian sync status`: every region's copies, by link and table.
pub(crate) async fn status(config: &Path, json: bool) -> anyhow::Result<()> {
    let topology = Topology::load(config)?;
    let mut all = Vec::new();
    let mut failed = Vec::new();
    for region in topology.regions.keys() {
        let reports = async {
            let mut conn = connect(&topology, region).await?;
            sync::report(&mut conn)
                .await
                .map_err(|e| no_sync_tables(e, region))
        }
        .await;
        match reports {
            Ok(reports) => all.extend(reports.into_iter().map(|r| (region.clone(), r))),
            Err(e) => failed.push(format!("{region}: {e:#}")),
        }
    }
    if json {
        let rows: Vec<serde_json::Value> = all
            .iter()
            .map(|(source, r)| {
                let p = r.progress();
                serde_json::json!({
                    "source": source, "destination": r.destination, "table": r.table_name,
                    "state": r.state, "reason": r.reason, "rows": r.rows,
                    "rows_expected": r.rows_expected, "bytes": r.bytes, "chunks": r.chunks,
                    "ranges": r.ranges, "ranges_done": r.ranges_done,
                    "elapsed_seconds": r.elapsed_seconds,
                    "fraction": p.map(|p| p.fraction),
                    "rows_per_second": p.map(|p| p.rows_per_second),
                    "remaining_seconds": p.and_then(|p| p.remaining_seconds),
                    "last_error": r.last_error,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({ "copies": rows, "unreadable": failed })
        );
    } else {
        println!(
            "{:<14} {:<28} {:<10} {:>7} {:>12} {:>10} {:>10} {:>10}  why",
            "link", "table", "state", "done", "rows", "bytes", "rows/s", "left"
        );
        for (source, r) in &all {
            let p = r.progress();
            let (done, left) = match p {
                Some(p) => (
                    format!("{:.1}%", p.fraction * 100.0),
                    match (r.state.as_str(), p.remaining_seconds) {
                        ("done", _) => "-".to_owned(),
                        (_, Some(s)) => human::duration(s),
                        (_, None) => "?".to_owned(),
                    },
                ),
                None => ("-".to_owned(), "-".to_owned()),
            };
            println!(
                "{:<14} {:<28} {:<10} {:>7} {:>12} {:>10} {:>10} {:>10}  {}",
                format!("{source}->{}", r.destination),
                r.table_name,
                r.state,
                done,
                r.rows,
                human::bytes(r.bytes.max(0) as f64),
                p.map_or("-".to_owned(), |p| human::count(p.rows_per_second)),
                left,
                r.reason
            );
            if let Some(e) = &r.last_error {
                println!("{:<14} failing, retried: {e}", "");
            }
        }
        for f in &failed {
            eprintln!("could not read {f}");
        }
    }
    anyhow::ensure!(failed.is_empty(), "{} region(s) unreadable", failed.len());
    Ok(())
}

/// A store without the initial-sync tables has an agent older than them.
fn no_sync_tables(e: sqlx::Error, region: &str) -> anyhow::Error {
    let missing = e
        .as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "42P01");
    match missing {
        true => anyhow::anyhow!(
            "region {region}'s store has no meridian.sync_tables: its agent predates initial \
             sync; upgrade and start it once (it migrates the store)"
        ),
        false => anyhow::Error::new(e).context(format!("reading region {region}'s copies")),
    }
}
