//! `meridian demo` as a newcomer runs it (bounded with --duration), and the
//! client library's example service run against it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn example(name: &str) -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_meridian"));
    let path = bin.parent().unwrap().join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples; run it from the workspace root",
        path.display()
    );
    path
}

#[test]
fn the_demo_replicates_between_three_regions_and_cleans_up() {
    let mut demo = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["demo", "--duration", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run meridian demo");
    let (lines_tx, lines) = mpsc::channel::<String>();
    let stdout = BufReader::new(demo.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let stderr = demo.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    // while the demo writes orders, the example service runs against its regions
    let mut seen = Vec::new();
    let mut topology = None;
    while let Ok(line) = lines.recv_timeout(Duration::from_secs(120)) {
        if let Some(path) = line.strip_prefix("topology: ") {
            topology = Some(path.to_owned());
        }
        let orders_started = line.starts_with("writing one order a second");
        seen.push(line);
        if orders_started {
            break;
        }
    }
    let topology = topology.unwrap_or_else(|| panic!("no topology line: {seen:#?}"));
    let service = Command::new(example("orders"))
        .args(["--config", &topology, "--region", "eu"])
        .output()
        .expect("run the orders example");
    let service_out = String::from_utf8_lossy(&service.stdout);
    assert!(
        service.status.success(),
        "{service_out}\n{}",
        String::from_utf8_lossy(&service.stderr)
    );
    for expected in [
        "initech (home na): order ",
        "umbrella (home eu): order ",
        "tyrell (home apac): order ",
        "read in eu after",
        // umbrella's eu order read in apac: the policy keeps its items in eu
        "items NULL (kept home by the residency policy)",
        "plan 'starter' now costs 10.00 everywhere",
    ] {
        assert!(service_out.contains(expected), "{expected}: {service_out}");
    }

    seen.extend(lines.iter());
    reader.join().unwrap();
    let status = demo.wait().unwrap();
    let stdout = seen.join("\n");
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("visible in eu") && stdout.contains("visible in na"),
        "{stdout}"
    );
    assert!(!stdout.contains("NOT visible"), "{stdout}");
    assert!(stdout.contains("commit token: 2.na."), "{stdout}");
    assert!(
        stdout.contains("plan 'pro' now costs 53.90"),
        "the global path ran: {stdout}"
    );
    // eu orders reach the other regions without their line items
    let residency = stdout
        .lines()
        .find(|l| l.contains("residency:"))
        .expect("an eu order was written");
    assert!(residency.contains("eu: items = [{"), "{residency}");
    assert!(
        residency.contains("na: items = NULL") && residency.contains("apac: items = NULL"),
        "{residency}"
    );
    // every region ends with every tenant: 2 of the demo's homed in each, plus
    // the example's one per region
    let tenant_cells = stdout
        .lines()
        .filter(|l| ["na ", "eu ", "apac "].iter().any(|r| l.starts_with(r)))
        .filter(|l| l.split_whitespace().nth(1) == Some("3/3/3"))
        .count();
    assert_eq!(tenant_cells, 3, "{stdout}");
    let dir = Path::new(&topology).parent().unwrap();
    assert!(
        !dir.exists(),
        "the demo removed its clusters ({})",
        dir.display()
    );
}

#[test]
fn the_demo_runs_over_kafka() {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["demo", "--duration", "5", "--transport", "kafka"])
        .output()
        .expect("run meridian demo --transport kafka");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("transport = \"kafka\""), "{stdout}");
    assert!(
        stdout.contains("visible in eu") && stdout.contains("visible in na"),
        "{stdout}"
    );
    assert!(!stdout.contains("NOT visible"), "{stdout}");
    let residency = stdout
        .lines()
        .find(|l| l.contains("residency:"))
        .expect("an eu order was written");
    assert!(residency.contains("na: items = NULL"), "{residency}");
}

/// The README's client code is the example's, verbatim: the example is what
/// the demo test runs, so the README's code runs against the demo.
#[test]
fn the_readme_client_code_is_the_example_that_runs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/orders.rs")).unwrap();
    let mut blocks = 0;
    for part in example.split("// README: begin\n").skip(1) {
        let block = part.split("// README: end").next().unwrap();
        let lines: Vec<&str> = block.lines().filter(|l| !l.trim().is_empty()).collect();
        let indent = lines
            .iter()
            .map(|l| l.len() - l.trim_start().len())
            .min()
            .unwrap();
        let dedented: Vec<&str> = block
            .trim_end()
            .lines()
            .map(|l| l.get(indent..).unwrap_or(""))
            .collect();
        let dedented = dedented.join("\n");
        assert!(
            readme.contains(&dedented),
            "README.md lacks this block of examples/orders.rs:\n{dedented}"
        );
        blocks += 1;
    }
    assert_eq!(blocks, 2);
}
