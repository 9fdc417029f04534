//! `meridian policy check` and `meridian policy explain` as an operator runs them.

use std::path::Path;
use std::process::Command;

use meridian_testkit::PgCluster;

const TOPOLOGY: &str = r#"
[regions.na]
store = "postgres://meridian@127.0.0.1:5432/app"
listen = "127.0.0.1:7401"
[regions.eu]
store = "postgres://meridian@127.0.0.1:5433/app"
listen = "127.0.0.1:7402"
[[tables]]
name = "public.orders"
primary_key = ["id"]
home_column = "region"
[security]
plaintext = true
"#;

const POLICY: &str = r#"version = 4
[[rules]]
name = "eu-orders"
table = "public.orders"
from = ["eu"]
to = ["na"]
when = [{ column = "status", equals = "paid" }]
columns = { id = "keep", region = "keep", status = "keep", email = "hash", note = "null" }
"#;

fn meridian(dir: &Path, args: &[&str], hash_key: bool) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meridian"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("MERIDIAN_POLICY_HASH_KEY");
    if hash_key {
        cmd.env("MERIDIAN_POLICY_HASH_KEY", "k");
    }
    let out = cmd.output().expect("run meridian");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn workdir(policy: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("meridian-policy-cli-{}", std::process::id()));
    let dir = dir.join(format!("{:x}", policy.len() ^ (policy.as_ptr() as usize)));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("topology.toml"), TOPOLOGY).unwrap();
    std::fs::write(dir.join("policy.toml"), policy).unwrap();
    dir
}

#[test]
fn check_accepts_a_valid_policy_and_points_at_every_problem() {
    let dir = workdir(POLICY);
    let (ok, out) = meridian(
        &dir,
        &[
            "policy",
            "check",
            "policy.toml",
            "--config",
            "topology.toml",
        ],
        true,
    );
    assert!(ok, "{out}");
    assert!(out.contains("policy version 4 is valid"), "{out}");

    let (ok, out) = meridian(
        &dir,
        &[
            "policy",
            "check",
            "policy.toml",
            "--config",
            "topology.toml",
        ],
        false,
    );
    assert!(!ok);
    assert!(
        out.contains(
            "policy.toml:8:68: rule eu-orders: column email is hashed but no hash key is set"
        ),
        "{out}"
    );

    let bad = POLICY
        .replace(r#"to = ["na"]"#, r#"to = ["mars"]"#)
        .replace(r#""null""#, r#""shred""#);
    let dir = workdir(&bad);
    let (ok, out) = meridian(
        &dir,
        &[
            "policy",
            "check",
            "policy.toml",
            "--config",
            "topology.toml",
        ],
        true,
    );
    assert!(!ok);
    assert!(
        out.contains("policy.toml:6:7: rule eu-orders: unknown region \"mars\""),
        "{out}"
    );
    assert!(
        out.contains("policy.toml:8:83: rule eu-orders: unknown action \"shred\""),
        "{out}"
    );
}

#[test]
fn explain_says_what_crosses_column_by_column() {
    let dir = workdir(POLICY);
    let row = r#"{"id": 9, "region": "eu", "status": "paid", "email": "x@y.eu", "note": "hi", "extra": 1}"#;
    let args = [
        "policy",
        "explain",
        "policy.toml",
        "--config",
        "topology.toml",
        "--table",
        "public.orders",
    ];
    let (ok, out) = meridian(
        &dir,
        &[&args[..], &["--row", row, "--from", "eu", "--to", "na"]].concat(),
        true,
    );
    assert!(ok, "{out}");
    assert!(out.contains("under rule \"eu-orders\""), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("note") && l.ends_with("NULL")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("extra") && l.contains("closed by default")),
        "{out}"
    );
    assert!(!out.contains("x@y.eu"), "the email is hashed: {out}");
    let unpaid = row.replace("paid", "open");
    let (ok, out) = meridian(
        &dir,
        &[&args[..], &["--row", &unpaid, "--from", "eu", "--to", "na"]].concat(),
        true,
    );
    assert!(ok, "{out}");
    assert!(out.contains("does not cross eu -> na"), "{out}");
}

/// `meridian policy check --against` a fresh cluster holding `create`, run
/// in `dir` (each test its own: they run at once); (success, output).
fn check_against(dir: &str, create: &str) -> (bool, String) {
    let cluster = PgCluster::start().unwrap();
    let url = cluster.url("postgres");
    let status = Command::new(
        meridian_testkit::postgres::find_bindir()
            .unwrap()
            .join("psql"),
    )
    .args([&url, "-qc", create])
    .status()
    .unwrap();
    assert!(status.success());
    let dir =
        std::env::temp_dir().join(format!("meridian-policy-cli-{dir}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("topology.toml"), TOPOLOGY).unwrap();
    std::fs::write(dir.join("policy.toml"), POLICY).unwrap();
    let args = [
        "policy",
        "check",
        "policy.toml",
        "--config",
        "topology.toml",
        "--against",
        &url,
    ];
    meridian(&dir, &args, true)
}

#[test]
fn check_against_a_live_store_finds_missing_and_unmentioned_columns() {
    let (ok, out) = check_against(
        "missing",
        "CREATE TABLE orders (id bigint PRIMARY KEY, region text, status text, email text, added_later text)",
    );
    assert!(!ok, "the store lacks a column the policy names: {out}");
    assert!(
        out.contains("names column public.orders.note, which the store does not have"),
        "{out}"
    );
    assert!(
        out.contains("column public.orders.added_later is not named by any rule"),
        "{out}"
    );
}

/// Review finding 3d: actions a destination could not write (a hash into a
/// bigint, a NULL into a NOT NULL column) are refused before any row is sent.
#[test]
fn check_against_a_live_store_refuses_actions_the_columns_cannot_take() {
    let (ok, out) = check_against(
        "fit",
        "CREATE TABLE orders (id bigint PRIMARY KEY, region text, status text, email bigint, note text NOT NULL)",
    );
    assert!(!ok, "{out}");
    assert!(
        out.contains("public.orders.email is hashed, but a hash is 64 hex characters and the column is bigint"),
        "{out}"
    );
    assert!(
        out.contains("public.orders.note is nulled, but the column is NOT NULL"),
        "{out}"
    );
}
