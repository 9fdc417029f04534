//! Agents as real OS processes, so tests can kill -9 them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A running `meridian agent`; killed on drop. Its output goes to a log file.
pub struct AgentProcess {
    child: Child,
    region: String,
    log: PathBuf,
    binary: PathBuf,
    config: PathBuf,
    env: Vec<(String, String)>,
}

impl AgentProcess {
    /// Starts `binary agent --config config --region region`, logging to
    /// `log_dir/agent-<region>.log` (appended across restarts).
    pub fn spawn(
        binary: &Path,
        config: &Path,
        region: &str,
        log_dir: &Path,
    ) -> anyhow::Result<AgentProcess> {
        Self::spawn_with_env(binary, config, region, log_dir, &[])
    }

    /// [`AgentProcess::spawn`] with extra environment variables (secrets).
    pub fn spawn_with_env(
        binary: &Path,
        config: &Path,
        region: &str,
        log_dir: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<AgentProcess> {
        let log = log_dir.join(format!("agent-{region}.log"));
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let child = Self::start(binary, config, region, &log, &env)?;
        Ok(AgentProcess {
            child,
            region: region.to_owned(),
            log,
            binary: binary.to_owned(),
            config: config.to_owned(),
            env,
        })
    }

    fn start(
        binary: &Path,
        config: &Path,
        region: &str,
        log: &Path,
        env: &[(String, String)],
    ) -> anyhow::Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        Ok(Command::new(binary)
            .args(["agent", "--config"])
            .arg(config)
            .args(["--region", region])
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?)
    }

    /// SIGKILL, then the same agent started from another binary (an
    /// upgrade or a downgrade) and the topology file that release reads.
    pub fn replace_binary(&mut self, binary: &Path, config: &Path) -> anyhow::Result<()> {
        self.kill9();
        self.binary = binary.to_owned();
        self.config = config.to_owned();
        self.restart()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the agent again (after [`AgentProcess::kill9`]).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.child = Self::start(
            &self.binary,
            &self.config,
            &self.region,
            &self.log,
            &self.env,
        )?;
        Ok(())
    }

    /// Sends SIGHUP (the agent reloads its residency policy).
    pub fn hangup(&self) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill -HUP {} failed", self.pid());
        Ok(())
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Peak resident set size in bytes (Linux `VmHWM`), if known.
    pub fn peak_rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}
