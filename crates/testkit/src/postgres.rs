//! Throw-away PostgreSQL clusters (`initdb` + `pg_ctl`) with
//! `wal_level = logical`, each in its own temporary folder and port.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// A running cluster; stopped (immediate mode) and deleted on drop.
pub struct PgCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
}

/// Options for [`PgCluster::start_with`].
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// `fsync = off`: much faster, safe while only agents (not PostgreSQL) are
    /// killed. The benchmark keeps it on.
    pub fsync: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
}

/// Where the PostgreSQL server binaries are: `MERIDIAN_PG_BINDIR`,
/// `pg_config --bindir`, or the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("MERIDIAN_PG_BINDIR") {
        return Ok(dir.into());
    }
    let mut candidates = Vec::new();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
        versions.sort();
        candidates.extend(versions.into_iter().rev());
    }
    candidates
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        .context(
            "PostgreSQL server binaries (initdb, pg_ctl) not found; install PostgreSQL 15 \
             (Debian/Ubuntu: apt-get install postgresql) or set MERIDIAN_PG_BINDIR to their folder",
        )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// Starts a cluster with default test options.
    pub fn start() -> anyhow::Result<PgCluster> {
        Self::start_with(&PgOptions::default())
    }

    /// Initialises and starts a cluster on a free port. As root, PostgreSQL
    /// runs as the `postgres` user (it refuses to run as root).
    pub fn start_with(options: &PgOptions) -> anyhow::Result<PgCluster> {
        let bindir = find_bindir()?;
        let as_postgres = is_root();
        let dir =
            std::env::temp_dir().join(format!("meridian-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut cluster = PgCluster {
            dir,
            bindir,
            port: crate::free_port(),
            as_postgres,
        };
        if as_postgres {
            let status = Command::new("chown")
                .arg("postgres:")
                .arg(&cluster.dir)
                .status()?;
            if !status.success() {
                bail!(
                    "cannot chown {} to the postgres user; create that user (it comes with Debian's postgresql package)",
                    cluster.dir.display()
                );
            }
        }
        let data = cluster.data_dir();
        cluster.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ],
        )?;
        let mut conf = vec![
            format!("port = {}", cluster.port),
            "listen_addresses = '127.0.0.1'".to_owned(),
            format!("unix_socket_directories = '{}'", cluster.dir.display()),
            "wal_level = logical".to_owned(),
            "max_replication_slots = 20".to_owned(),
            "max_wal_senders = 20".to_owned(),
            "max_connections = 60".to_owned(),
            "shared_buffers = 128MB".to_owned(),
            format!("fsync = {}", if options.fsync { "on" } else { "off" }),
            "log_min_messages = warning".to_owned(),
        ];
        conf.extend(options.extra_conf.iter().cloned());
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text)?;
        let log = cluster.dir.join("server.log");
        for attempt in 1.. {
            let started = cluster.run(
                "pg_ctl",
                &[
                    "-D",
                    data.to_str().unwrap(),
                    "-l",
                    log.to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ],
            );
            let Err(e) = started else { break };
            let server_log = std::fs::read_to_string(&log).unwrap_or_default();
            if attempt < 5 && server_log.contains("could not bind") {
                // Another test took the port between the check and the bind:
                // take a new one (a later `port` line wins).
                cluster.port = crate::free_port();
                let mut text = std::fs::read_to_string(&conf_path)?;
                text.push_str(&format!("port = {}\n", cluster.port));
                std::fs::write(&conf_path, text)?;
                continue;
            }
            let tail: Vec<&str> = server_log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(e.context(format!(
                "server log {}:\n{}",
                log.display(),
                tail.join("\n")
            )));
        }
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let bin = self.bindir.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&bin);
            c
        } else {
            Command::new(&bin)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// TCP port of the cluster.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's folder (data and server log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// URL of database `db` as the superuser.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// libpq key/value connection string (for CREATE SUBSCRIPTION).
    pub fn conninfo(&self, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={db}",
            self.port
        )
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        );
        if std::env::var_os("MERIDIAN_KEEP_CLUSTERS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
