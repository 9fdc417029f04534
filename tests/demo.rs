//! `meridian demo` as a newcomer runs it (bounded with --duration).

use std::process::Command;

#[test]
fn the_demo_replicates_between_three_regions_and_cleans_up() {
    let out = Command::new(env!("CARGO_BIN_EXE_meridian"))
        .args(["demo", "--duration", "4"])
        .output()
        .expect("run meridian demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("visible in eu") && stdout.contains("visible in na"),
        "{stdout}"
    );
    assert!(!stdout.contains("NOT visible"), "{stdout}");
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
    // every region ends with every tenant: 2 homed in each
    let tenant_cells = stdout
        .lines()
        .filter(|l| ["na ", "eu ", "apac "].iter().any(|r| l.starts_with(r)))
        .filter(|l| l.split_whitespace().nth(1) == Some("2/2/2"))
        .count();
    assert_eq!(tenant_cells, 6, "{stdout}");
    let topology = stdout
        .lines()
        .find_map(|l| l.strip_prefix("topology: "))
        .expect("the demo prints its topology path");
    let dir = std::path::Path::new(topology).parent().unwrap();
    assert!(
        !dir.exists(),
        "the demo removed its clusters ({})",
        dir.display()
    );
}
