//! The previous release's agent, for tests that run two releases together.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The commit the previous release was built from: the last one before
/// the wire carried commit tokens and slot incarnations (batch format
/// version 2, no `Hello.incarnation`).
pub const PREVIOUS_RELEASE: &str = "98b6432";

/// The `meridian` binary of [`PREVIOUS_RELEASE`], built once per machine
/// under `target/previous-release/` from the repository's own history
/// (`git archive`), then reused.
pub fn previous_release_binary() -> anyhow::Result<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let base = root.join("target/previous-release");
    let binary = base.join(format!("target/debug/meridian-{PREVIOUS_RELEASE}"));
    if binary.exists() {
        return Ok(binary);
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    let archive = Command::new("git")
        .current_dir(&root)
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .output()
        .context("running git archive")?;
    if !archive.status.success() {
        bail!(
            "git archive {PREVIOUS_RELEASE} failed (a shallow clone lacks it: fetch the history): {}",
            String::from_utf8_lossy(&archive.stderr)
        );
    }
    let mut tar = Command::new("tar")
        .current_dir(&src)
        .arg("-x")
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(tar.stdin.as_mut().expect("piped"), &archive.stdout)?;
    anyhow::ensure!(tar.wait()?.success(), "tar -x failed");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", base.join("target"))
        .args(["build", "--locked", "--bin", "meridian"])
        .output()
        .context("building the previous release")?;
    if !built.status.success() {
        bail!(
            "building {PREVIOUS_RELEASE} failed:\n{}",
            String::from_utf8_lossy(&built.stderr)
        );
    }
    std::fs::rename(base.join("target/debug/meridian"), &binary)?;
    Ok(binary)
}
