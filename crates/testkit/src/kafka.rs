//! A real Kafka-protocol broker for tests and benchmarks: `tansu`, an
//! Apache Kafka API compatible broker, with its sqlite storage engine (so it
//! survives a kill -9 and restart), in a temporary folder on a free port.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Where the `tansu` binary is: `MERIDIAN_TANSU`, or the patched build
/// `.ci/tansu/install` makes (`~/.cache/meridian/tansu/bin/tansu`, or under
/// `MERIDIAN_TANSU_ROOT`). Crates.io's tansu 0.6.0 as released is not used:
/// its sqlite storage slows down with everything a topic ever held (see
/// `.ci/tansu/install`).
pub fn find_tansu() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("MERIDIAN_TANSU") {
        return Ok(path.into());
    }
    let root = match (
        std::env::var_os("MERIDIAN_TANSU_ROOT"),
        std::env::var_os("HOME"),
    ) {
        (Some(root), _) => PathBuf::from(root),
        (None, Some(home)) => Path::new(&home).join(".cache/meridian/tansu"),
        (None, None) => PathBuf::from(".cache/meridian/tansu"),
    };
    let binary = root.join("bin/tansu");
    if binary.is_file() {
        return Ok(binary);
    }
    bail!(
        "the patched tansu broker is not at {}; build it with `.ci/tansu/install` \
         (about 8 minutes, once; .ci/run does), or set MERIDIAN_TANSU to a broker's path",
        binary.display()
    )
}

/// A running broker; killed and its folder removed on drop.
pub struct KafkaBroker {
    binary: PathBuf,
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    /// A SASL/SCRAM-SHA-512 user the broker requires, once set.
    user: Option<(String, String)>,
}

impl KafkaBroker {
    /// Starts a broker with durable (sqlite) storage and waits until it
    /// answers metadata requests.
    pub fn start() -> anyhow::Result<KafkaBroker> {
        let dir = broker_root().join(format!("meridian-kafka-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir)?;
        let mut broker = KafkaBroker {
            binary: find_tansu()?,
            dir,
            port: crate::free_port(),
            child: None,
            user: None,
        };
        broker.spawn()?;
        Ok(broker)
    }

    /// Starts a broker that requires SASL authentication (SCRAM-SHA-512) of
    /// the one user `name` with `password`.
    pub fn start_with_user(name: &str, password: &str) -> anyhow::Result<KafkaBroker> {
        let mut broker = Self::start()?;
        let status = Command::new(&broker.binary)
            .args(["user", "create", "--mechanism", "scram512", "--broker"])
            .arg(format!("tcp://127.0.0.1:{}", broker.port))
            .args([name, password])
            .current_dir(&broker.dir)
            .stdin(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "tansu user create failed: {status}");
        broker.user = Some((name.to_owned(), password.to_owned()));
        broker.restart()?;
        Ok(broker)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("broker.log"))?;
        let child = Command::new(&self.binary)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://broker.db"])
            .args(self.user.is_some().then_some("--authentication"))
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", self.addr())
            .set("log_level", "0");
        if let Some((name, password)) = &self.user {
            config
                .set("security.protocol", "sasl_plaintext")
                .set("sasl.mechanisms", "SCRAM-SHA-512")
                .set("sasl.username", name)
                .set("sasl.password", password);
        }
        let consumer: BaseConsumer = config.create()?;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("tansu exited ({status}); log:\n{}", self.log());
            }
            if consumer
                .fetch_metadata(None, Duration::from_millis(500))
                .is_ok_and(|m| !m.brokers().is_empty())
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("tansu did not answer within 60 s; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the broker without warning.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again on the same port and storage.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default()
    }

    /// Every record of every topic starting with `prefix`: (topic, key,
    /// header values, value), read from the beginning of each partition to
    /// its end.
    pub fn read_all(&self, prefix: &str) -> anyhow::Result<Vec<Stored>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.addr())
            .set("group.id", "meridian-test-reader")
            .set("enable.auto.commit", "false")
            .set("log_level", "0")
            .create()?;
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(10))?;
        let mut assignment = TopicPartitionList::new();
        let mut ends = Vec::new();
        for topic in metadata
            .topics()
            .iter()
            .filter(|t| t.name().starts_with(prefix))
        {
            for p in topic.partitions() {
                let (low, high) =
                    consumer.fetch_watermarks(topic.name(), p.id(), Duration::from_secs(10))?;
                if high > low {
                    assignment.add_partition_offset(topic.name(), p.id(), Offset::Offset(low))?;
                    ends.push((topic.name().to_owned(), p.id(), high));
                }
            }
        }
        let mut records = Vec::new();
        if ends.is_empty() {
            return Ok(records);
        }
        consumer.assign(&assignment)?;
        let mut remaining = ends.len();
        let mut done = std::collections::HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while remaining > 0 {
            anyhow::ensure!(
                Instant::now() < deadline,
                "reading the topics took over 120 s"
            );
            let Some(message) = consumer.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = message?;
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| h.value.unwrap_or_default().to_vec())
                        .collect()
                })
                .unwrap_or_default();
            records.push(Stored {
                topic: m.topic().to_owned(),
                key: m.key().map(<[u8]>::to_vec),
                headers,
                value: m.payload().map(<[u8]>::to_vec),
            });
            let end = ends
                .iter()
                .find(|(t, p, _)| t == m.topic() && *p == m.partition())
                .map_or(0, |e| e.2);
            if m.offset() + 1 >= end && done.insert((m.topic().to_owned(), m.partition())) {
                remaining -= 1;
            }
        }
        Ok(records)
    }
}

/// One record read back from the broker.
pub struct Stored {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<Vec<u8>>,
    pub value: Option<Vec<u8>>,
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill9();
        if std::env::var_os("MERIDIAN_KEEP_CLUSTERS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Where brokers keep their storage: `/dev/shm` when present. The sqlite
/// file then survives a kill -9 of the broker (the process, not the
/// machine), and the broker's fsyncs cost nothing, as with the test
/// clusters' `fsync = off`.
fn broker_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    }
}
