//! Throw-away PostgreSQL clusters (`initdb` + `pg_ctl`) with
//! `wal_level = logical`, each in its own temporary folder and port;
//! optionally TLS-only, with a certificate from a test CA ([`TestCa`]).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};

/// A running cluster; stopped (immediate mode) and deleted on drop.
pub struct PgCluster {
    dir: PathBuf,
    bindir: PathBuf,
    port: u16,
    as_postgres: bool,
    /// `ca.pem` in the cluster's folder, for a TLS cluster.
    ca: Option<PathBuf>,
}

/// Options for [`PgCluster::start_with`].
#[derive(Clone, Debug, Default)]
pub struct PgOptions {
    /// `fsync = off`: much faster, safe while only agents (not PostgreSQL) are
    /// killed. The benchmark keeps it on.
    pub fsync: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_conf: Vec<String>,
    /// TLS only: a new [`TestCa`] signs a certificate for `localhost` and
    /// `127.0.0.1`, and TCP connections without TLS are refused (`hostssl`
    /// lines only in `pg_hba.conf`, replication included, so agents cannot
    /// use it). [`PgCluster::ca_path`] is the CA.
    pub tls: bool,
}

/// A certificate authority for test clusters (ECDSA P-256, made with rcgen).
pub struct TestCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    /// A new CA; `name` is its common name.
    pub fn new(name: &str) -> anyhow::Result<TestCa> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA's certificate, PEM.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A server certificate for `names` (host names or IP addresses) and its
    /// private key, both PEM.
    pub fn server_cert(&self, names: &[&str]) -> anyhow::Result<(String, String)> {
        use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose};
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())?;
        if let Some(first) = names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
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

    /// Starts a TLS-only cluster with default test options (see [`PgOptions::tls`]).
    pub fn start_tls() -> anyhow::Result<PgCluster> {
        Self::start_with(&PgOptions {
            tls: true,
            ..PgOptions::default()
        })
    }

    /// Initialises and starts a cluster on a free port. As root, PostgreSQL
    /// runs as the `postgres` user (it refuses to run as root).
    pub fn start_with(options: &PgOptions) -> anyhow::Result<PgCluster> {
        let mut cluster = PgCluster::in_new_folder(find_bindir()?, is_root())?;
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
        if options.tls {
            conf.extend(cluster.make_certificates()?);
            // TCP without TLS finds no pg_hba.conf line, so it is refused
            let hba_path = data.join("pg_hba.conf");
            let hba: Vec<String> = std::fs::read_to_string(&hba_path)?
                .lines()
                .map(|line| match line.strip_prefix("host") {
                    Some(rest) if rest.starts_with([' ', '\t']) => format!("hostssl{rest}"),
                    _ => line.to_owned(),
                })
                .collect();
            std::fs::write(&hba_path, hba.join("\n") + "\n")?;
        }
        conf.extend(options.extra_conf.iter().cloned());
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&conf.join("\n"));
        text.push('\n');
        std::fs::write(&conf_path, text)?;
        let log = cluster.dir.join("server.log");
        for attempt in 1.. {
            let started = cluster.restart();
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

    /// Writes `ca.pem`, `server.crt` and `server.key` (mode 0600, owned by
    /// the server's user) into the cluster's folder; the `postgresql.conf`
    /// lines that use them.
    fn make_certificates(&mut self) -> anyhow::Result<Vec<String>> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let ca = TestCa::new("Meridian test CA")?;
        let (cert, key) = ca.server_cert(&["localhost", "127.0.0.1"])?;
        let ca_path = self.dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem())?;
        let cert_path = self.dir.join("server.crt");
        let key_path = self.dir.join("server.key");
        for (path, pem) in [(&cert_path, &cert), (&key_path, &key)] {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .with_context(|| format!("cannot create {}", path.display()))?
                .write_all(pem.as_bytes())?;
            if self.as_postgres {
                let status = Command::new("chown").arg("postgres:").arg(path).status()?;
                if !status.success() {
                    bail!("cannot chown {} to the postgres user", path.display());
                }
            }
        }
        self.ca = Some(ca_path);
        Ok(vec![
            "ssl = on".to_owned(),
            format!("ssl_cert_file = '{}'", cert_path.display()),
            format!("ssl_key_file = '{}'", key_path.display()),
        ])
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

    /// A cluster not yet made, in a new temporary folder (owned by the
    /// `postgres` user when run as root) with a free port.
    fn in_new_folder(bindir: PathBuf, as_postgres: bool) -> anyhow::Result<PgCluster> {
        let dir =
            std::env::temp_dir().join(format!("meridian-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        if as_postgres {
            let status = Command::new("chown").arg("postgres:").arg(&dir).status()?;
            if !status.success() {
                bail!(
                    "cannot chown {} to the postgres user; create that user (it comes with Debian's postgresql package)",
                    dir.display()
                );
            }
        }
        Ok(PgCluster {
            dir,
            bindir,
            port: crate::free_port(),
            as_postgres,
            ca: None,
        })
    }

    /// A physical standby of this cluster (`pg_basebackup -R`, streaming),
    /// in its own folder on its own port, started. Logical slots are not
    /// copied to it (PostgreSQL 15).
    pub fn standby(&self) -> anyhow::Result<PgCluster> {
        let standby = PgCluster::in_new_folder(self.bindir.clone(), self.as_postgres)?;
        let data = standby.data_dir();
        standby.run(
            "pg_basebackup",
            &[
                "-D",
                data.to_str().unwrap(),
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-X",
                "stream",
                "-R",
            ],
        )?;
        let conf_path = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf_path)?;
        text.push_str(&format!(
            "port = {}\nunix_socket_directories = '{}'\n",
            standby.port,
            standby.dir.display()
        ));
        std::fs::write(&conf_path, text)?;
        standby.restart()?;
        Ok(standby)
    }

    /// Starts a stopped standby ([`PgCluster::crash`]) as a primary at the
    /// point it had reached, as a store restored from a backup: its standby
    /// signal removed, it never catches up with the old primary.
    pub fn restore_as_primary(&self) -> anyhow::Result<()> {
        let signal = self.data_dir().join("standby.signal");
        if self.as_postgres {
            let status = Command::new("rm").arg("-f").arg(&signal).status()?;
            anyhow::ensure!(status.success(), "cannot remove {}", signal.display());
        } else {
            let _ = std::fs::remove_file(&signal);
        }
        self.restart()
    }

    /// Promotes a standby to a primary (`pg_ctl promote`), waiting for it.
    pub fn promote(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run("pg_ctl", &["-D", data.to_str().unwrap(), "-w", "promote"])
    }

    /// Stops the server the way a crash or power loss would
    /// (`pg_ctl stop -m immediate`: no checkpoint, recovery at next start).
    pub fn crash(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
    }

    /// Starts the server again (after [`PgCluster::crash`]), on the same port.
    pub fn restart(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let log = self.dir.join("server.log");
        self.run(
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
        )
    }

    /// TCP port of the cluster.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's folder (data and server log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA that signed a TLS cluster's certificate (`ca.pem` in
    /// [`PgCluster::dir`]); `None` without TLS.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca.as_deref()
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
