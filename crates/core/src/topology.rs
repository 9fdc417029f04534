//! The topology file: which regions exist, where their stores and agents are,
//! and which tables Meridian replicates.
//!
//! ```toml
//! [regions.na]
//! store = "postgres://meridian@na-db:5432/app"   # or MERIDIAN_NA_STORE in the environment
//! ca = "certs/na-ca.pem"                         # optional: verify the store's TLS certificate
//! listen = "0.0.0.0:7401"                        # the agent's gRPC address
//! connect = "na-agent.internal:7401"             # optional: what peers dial
//! # mTLS between agents: this agent's certificate carries spiffe://meridian/region/na
//! tls = { ca = "certs/ca.pem", cert = "certs/na.pem", key = "certs/na-key.pem" }
//!
//! [operator]                                     # what `meridian status` and friends present
//! tls = { ca = "certs/ca.pem", cert = "certs/operator-alice.pem", key = "certs/operator-alice-key.pem" }
//!
//! [[tables]]
//! name = "public.orders"
//! primary_key = ["id"]
//! home_column = "region"
//!
//! [global]                                       # optional: the multi-region database
//! store = "postgres://meridian@global-db:26257/app"  # or MERIDIAN_GLOBAL_STORE
//! ca = "certs/global-ca.pem"                     # optional, as for regions
//! ```
//!
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A parsed and validated topology.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Regions by name (`na`, `eu`, `apac`, ...).
    pub regions: BTreeMap<String, Region>,
    /// Replicated tables.
    #[serde(default)]
    pub tables: Vec<TableSpec>,
    /// Tuning of the replication links.
    #[serde(default)]
    pub replication: Tuning,
    /// Residency policy file, relative to the topology file. Without one,
    /// every replicated row crosses to every peer.
    pub policy: Option<String>,
    /// The managed multi-region database (PostgreSQL wire protocol) that holds
    /// tenant placements and globally consistent tables. Agents never use it;
    /// the client library and `meridian placement` do.
    pub global: Option<Global>,
    /// The Kafka cluster, for links whose transport is `kafka`.
    pub kafka: Option<Kafka>,
    /// Per-link settings that differ from `[replication]`.
    #[serde(default)]
    pub links: Vec<LinkSpec>,
    /// Transport security switches.
    #[serde(default)]
    pub security: Security,
    /// The credentials operator commands (`status`, `policy reload`,
    /// `dashboard`) present to agents.
    pub operator: Option<Operator>,
    /// sha256 (hex) of the file the topology was loaded from; empty when
    /// parsed from text.
    #[serde(skip)]
    pub sha256: String,
}

/// `[security]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Security {
    /// Agents talk to each other and to operators in plain TCP: no
    /// certificates, no identities, anyone who reaches `listen` can claim to
    /// be any region. Only for a closed test network; agents warn at every
    /// start. Without it, every region needs `tls`.
    #[serde(default)]
    pub plaintext: bool,
}

/// `[operator]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Operator {
    /// A certificate with a `spiffe://meridian/operator/<name>` identity,
    /// and the CA bundle the agents' certificates chain to.
    pub tls: TlsFiles,
}

/// One party's TLS material, relative to the topology file's folder (or
/// absolute). Read where it is used, so a region's files need exist only
/// on that region's machines.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA bundle (PEM) that peers' certificates must chain to.
    pub ca: PathBuf,
    /// This party's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// How a link carries changes.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// A gRPC stream from the source's agent to the destination's agent.
    #[default]
    Grpc,
    /// A Kafka topic per link: the source's agent produces, the
    /// destination's agent consumes.
    Kafka,
}

/// How gRPC links compress batches on the wire.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// zstd (level 1), when the destination's agent reads it (it says so in
    /// its `Welcome`); otherwise none.
    #[default]
    Zstd,
    /// Batches travel as encoded.
    None,
}

/// The Kafka clusters used by `kafka` links, and their topics' settings.
///
/// A topic is data at rest in its cluster's region. A link's topic lives on
/// the cluster its `[[links]]` entry names (`cluster = "na"`), else on the
/// destination's cluster (`[kafka.clusters.<destination>]`), else on the one
/// cluster `brokers` names (whose region `region` declares).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Kafka {
    /// Bootstrap servers, `host:port[,host:port...]`, of a cluster for every
    /// link that has no regional one.
    pub brokers: Option<String>,
    /// The region that cluster runs in (undeclared: residency at rest cannot
    /// be checked, and `policy check` says so).
    pub region: Option<String>,
    /// Clusters by the region they run in.
    #[serde(default)]
    pub clusters: BTreeMap<String, KafkaCluster>,
    /// Topics are `<topic_prefix>.<source>.<destination>`.
    #[serde(default = "default_topic_prefix")]
    pub topic_prefix: String,
    /// Partitions of each link's topic (created when absent); see
    /// [`Kafka::partitions`].
    #[serde(default, rename = "partitions")]
    pub partitions_set: Option<i32>,
    /// In which order a destination commits what a link carries.
    #[serde(default)]
    pub order: KafkaOrder,
    /// Retention (`retention.ms`) of the topics Meridian creates: longer
    /// than the longest outage of a destination to ride out.
    #[serde(default = "default_retention_hours")]
    pub retention_hours: i64,
    /// Replication factor of created topics: 3 on a production cluster.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
}

/// One regional Kafka cluster.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KafkaCluster {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// How clients reach the brokers.
    #[serde(default)]
    pub security_protocol: KafkaProtocol,
    /// `SCRAM-SHA-256`, `SCRAM-SHA-512` or `PLAIN`, with a `sasl_*` protocol.
    pub sasl_mechanism: Option<String>,
    /// The SASL user; its password comes from the environment,
    /// `MERIDIAN_KAFKA_PASSWORD_<REGION>` (never from the file).
    pub sasl_username: Option<String>,
    /// The CA certificate (PEM) that signed the brokers' certificates, with
    /// a TLS protocol; relative to the topology file's folder.
    pub ca: Option<PathBuf>,
}

/// `security.protocol` of a Kafka cluster.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum KafkaProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaProtocol {
    /// librdkafka's name.
    pub fn name(self) -> &'static str {
        match self {
            KafkaProtocol::Plaintext => "plaintext",
            KafkaProtocol::Ssl => "ssl",
            KafkaProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaProtocol::SaslSsl => "sasl_ssl",
        }
    }

    pub fn sasl(self) -> bool {
        matches!(self, KafkaProtocol::SaslPlaintext | KafkaProtocol::SaslSsl)
    }

    pub fn tls(self) -> bool {
        matches!(self, KafkaProtocol::Ssl | KafkaProtocol::SaslSsl)
    }
}

/// The environment variable that overrides `region`'s store URL (keeps
/// passwords out of the file): `MERIDIAN_<REGION>_STORE`.
pub fn store_env(region: &str) -> String {
    format!("MERIDIAN_{}_STORE", region.to_uppercase())
}

/// The environment variable holding the SASL password of `region`'s Kafka
/// cluster.
pub fn kafka_password_env(region: &str) -> String {
    format!("MERIDIAN_KAFKA_PASSWORD_{}", region.to_uppercase())
}

/// Where a link's topic lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KafkaSite {
    /// The cluster (for the older `[kafka] brokers` form, plaintext).
    pub cluster: KafkaCluster,
    /// The cluster's region, if declared.
    pub region: Option<String>,
}

/// In which order a destination commits what a Kafka link carries.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum KafkaOrder {
    /// A row's changes in order, partitions applied in parallel (4 by
    /// default): a source transaction touching rows of several partitions
    /// commits in several destination transactions, so an invariant across
    /// rows (a foreign key, a sum) may be briefly broken at the destination.
    #[default]
    Row,
    /// One partition per link: whole source transactions commit in source
    /// commit order (transactions larger than a capture fragment, 10,000
    /// changes or 1 MiB, excepted), on one apply session.
    Transaction,
}

impl Kafka {
    /// Partitions of each link's topic: 1 in transaction order, else
    /// `partitions` (4 by default).
    pub fn partitions(&self) -> i32 {
        match self.order {
            KafkaOrder::Transaction => 1,
            KafkaOrder::Row => self.partitions_set.unwrap_or_else(default_partitions),
        }
    }
}

fn default_topic_prefix() -> String {
    "meridian".to_owned()
}
fn default_partitions() -> i32 {
    4
}
fn default_retention_hours() -> i64 {
    7 * 24
}
fn default_replication_factor() -> i32 {
    3
}

/// One link's overrides.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    pub source: String,
    pub destination: String,
    #[serde(default)]
    pub transport: Option<Transport>,
    /// Kafka links: the region whose cluster (`[kafka.clusters.<region>]`)
    /// carries the topic, instead of the destination's.
    pub cluster: Option<String>,
}

/// The multi-region database.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Global {
    /// Its connection URL.
    pub store: Dsn,
    /// The CA certificate (PEM) that signed the database's TLS certificate,
    /// relative to the topology file's folder; see [`Region::ca`]. Kept when
    /// `MERIDIAN_GLOBAL_STORE` overrides `store`.
    pub ca: Option<PathBuf>,
}

/// One region: its store and its agent.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Connection URL of the region's PostgreSQL store.
    pub store: Dsn,
    /// The CA certificate (PEM) that signed the store's TLS certificate,
    /// relative to the topology file's folder (or absolute). With one, the
    /// client library connects with `sslmode=verify-full`: TLS only, a
    /// certificate chaining to this CA, and the URL's host named in it
    /// (`verify-ca` in the URL is kept; weaker modes are raised). [`Topology::load`]
    /// resolves the path and checks that the file exists. Agents do not read it.
    pub ca: Option<PathBuf>,
    /// Address the region's agent listens on for peers (`host:port`).
    pub listen: String,
    /// Address peers dial to reach the agent; defaults to `listen`.
    pub connect: Option<String>,
    /// Address of the agent's Prometheus endpoint (`GET /metrics`); none if unset.
    pub metrics: Option<String>,
    /// The agent's mTLS material: its certificate must carry
    /// `spiffe://meridian/region/<this region>`. Required unless
    /// `[security] plaintext = true`.
    pub tls: Option<TlsFiles>,
}

impl Region {
    /// The address peers dial.
    pub fn connect_addr(&self) -> &str {
        self.connect.as_deref().unwrap_or(&self.listen)
    }
}

/// A replicated table.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// `schema.table`.
    pub name: String,
    /// Primary key columns; must be the table's replica identity.
    pub primary_key: Vec<String>,
    /// Column holding each row's home region.
    pub home_column: String,
}

impl TableSpec {
    /// `(schema, table)`.
    pub fn split_name(&self) -> (&str, &str) {
        self.name.split_once('.').unwrap_or(("public", &self.name))
    }
}

/// Link tuning. Defaults suit a WAN link between regions.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tuning {
    /// Most row changes in one shipped batch (whole transactions are never split,
    /// so a larger transaction makes a larger batch).
    pub batch_max_changes: usize,
    /// Most batches in flight (sent, not yet acknowledged) per link.
    pub window: usize,
    /// Interval of the heartbeat each agent writes into its own store's WAL,
    /// in milliseconds. Heartbeats move every peer's watermark even when the
    /// store is idle: lag stays measurable, commit tokens resolve, and idle
    /// slots release WAL.
    pub heartbeat_ms: u64,
    /// Transport of every link without its own `[[links]]` entry.
    pub transport: Transport,
    /// Batch compression on gRPC links.
    pub compression: Compression,
    /// Largest single row change a gRPC link carries, in bytes as encoded.
    /// With `batch_max_changes` it bounds every batch message both ways
    /// ([`Tuning::message_limit`]); a larger change stops the link with an
    /// error naming its table. Raise it on every agent, receivers first.
    pub max_change_bytes: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            batch_max_changes: 10_000,
            window: 8,
            heartbeat_ms: 1_000,
            transport: Transport::Grpc,
            compression: Compression::Zstd,
            max_change_bytes: 64 << 20,
        }
    }
}

impl Tuning {
    /// A batch is closed once its values reach about this many bytes (or
    /// `batch_max_changes` changes).
    pub const BATCH_BYTES: usize = 8 << 20;
    /// Encoding overhead per change, at most (kind, table, value headers),
    /// for message limits.
    pub const CHANGE_FRAMING_BYTES: usize = 1 << 10;

    /// Most bytes one batch message may take on a gRPC link, and its
    /// payload once decompressed: a batch closes past [`Tuning::BATCH_BYTES`]
    /// or `batch_max_changes`, so it holds at most that, plus the
    /// transaction that crossed the line (a fragment of at most
    /// [`crate::pgoutput::FRAGMENT_BYTES`] and
    /// [`crate::pgoutput::FRAGMENT_CHANGES`], or one change of at most
    /// `max_change_bytes`), plus framing per change. Checked before
    /// anything of that size is allocated.
    pub fn message_limit(&self) -> usize {
        let changes = self.batch_max_changes + crate::pgoutput::FRAGMENT_CHANGES;
        Self::BATCH_BYTES
            + crate::pgoutput::FRAGMENT_BYTES
            + self.max_change_bytes
            + changes.saturating_mul(Self::CHANGE_FRAMING_BYTES)
    }
}

fn check_url(key: &str, store: &Dsn) -> Result<(), String> {
    let url = store.expose();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(())
    } else {
        Err(format!(
            "{key}: found {:?}; expected a URL like postgres://user@host:5432/db",
            store.to_string()
        ))
    }
}

/// `url` with TLS verified against `ca`: `sslmode=verify-full` (a
/// `verify-ca` or `verify-full` already there is kept; weaker modes are
/// raised) and `sslrootcert` set to `ca`, replacing any other.
pub fn with_ca(url: &str, ca: &Path) -> String {
    let (base, fragment) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let (path, query) = base.split_once('?').unwrap_or((base, ""));
    let mut mode = "verify-full";
    let mut params: Vec<&str> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "")) {
            ("sslmode", m @ ("verify-ca" | "verify-full")) => mode = m,
            ("sslmode" | "sslrootcert", _) => {}
            _ => params.push(pair),
        }
    }
    let ca: String = ca
        .display()
        .to_string()
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    let sslmode = format!("sslmode={mode}");
    let sslrootcert = format!("sslrootcert={ca}");
    params.push(&sslmode);
    params.push(&sslrootcert);
    let mut out = format!("{path}?{}", params.join("&"));
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

fn check_ca(key: &str, ca: Option<&Path>) -> Result<(), String> {
    match ca {
        Some(ca) if ca.as_os_str().is_empty() => Err(format!(
            "{key}: found an empty path; expected the PEM file of the CA that signed the \
             store's certificate, like \"certs/ca.pem\" (or remove the key)"
        )),
        _ => Ok(()),
    }
}

/// A PostgreSQL connection URL. Its `Debug` and `Display` hide the password.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Dsn(String);

impl Dsn {
    pub fn new(url: impl Into<String>) -> Self {
        Dsn(url.into())
    }
    /// The full URL, password included. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // postgres://user:password@host/db -> postgres://user:***@host/db
        match (self.0.find("://"), self.0.rfind('@')) {
            (Some(s), Some(at)) if at > s => {
                let creds = &self.0[s + 3..at];
                match creds.split_once(':') {
                    Some((user, _)) => write!(f, "{}{user}:***{}", &self.0[..s + 3], &self.0[at..]),
                    None => f.write_str(&self.0),
                }
            }
            _ => f.write_str(&self.0),
        }
    }
}

impl fmt::Debug for Dsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dsn({self})")
    }
}

/// A topology file that is not valid. The message names the file, the key, what
/// was found and what is expected.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct TopologyError {
    pub file: String,
    pub message: String,
}

impl Topology {
    /// Parses and validates a topology. `file` names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<Topology, TopologyError> {
        let err = |message: String| TopologyError {
            file: file.to_owned(),
            message,
        };
        let topology: Topology =
            toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_owned()))?;
        if topology.regions.len() < 2 {
            return Err(err(format!(
                "[regions] defines {} region(s); expected at least two, like [regions.na] and [regions.eu]",
                topology.regions.len()
            )));
        }
        for (name, region) in &topology.regions {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            {
                return Err(err(format!(
                    "regions.{name}: region names must be lowercase letters, digits and '_' (they name slots and origins)"
                )));
            }
            check_url(&format!("regions.{name}.store"), &region.store).map_err(err)?;
            check_ca(&format!("regions.{name}.ca"), region.ca.as_deref()).map_err(err)?;
            for (key, addr) in [
                ("listen", Some(&region.listen)),
                ("connect", region.connect.as_ref()),
            ] {
                if let Some(addr) = addr
                    && addr
                        .rsplit_once(':')
                        .and_then(|(_, p)| p.parse::<u16>().ok())
                        .is_none()
                {
                    return Err(err(format!(
                        "regions.{name}.{key}: found {addr:?}; expected host:port, like 127.0.0.1:7401"
                    )));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, t) in topology.tables.iter().enumerate() {
            let at = format!("tables[{i}] ({})", t.name);
            if t.name.split('.').count() != 2 || t.name.split('.').any(str::is_empty) {
                return Err(err(format!(
                    "{at}.name: found {:?}; expected schema.table, like public.orders",
                    t.name
                )));
            }
            if !seen.insert(&t.name) {
                return Err(err(format!(
                    "{at}.name: the table is listed twice; keep one entry"
                )));
            }
            if t.split_name().0 == "meridian" {
                return Err(err(format!(
                    "{at}.name: schema meridian holds Meridian's own state (watermarks, positions, dead letters) and is never replicated; move the table to another schema"
                )));
            }
            if t.primary_key.is_empty() {
                return Err(err(format!(
                    "{at}.primary_key: found an empty list; expected the key columns, like [\"id\"]"
                )));
            }
            if t.home_column.is_empty() {
                return Err(err(format!(
                    "{at}.home_column: found an empty name; expected the column holding the row's home region"
                )));
            }
        }
        if topology.replication.batch_max_changes == 0
            || topology.replication.window == 0
            || topology.replication.heartbeat_ms == 0
        {
            return Err(err(
                "replication: batch_max_changes, window and heartbeat_ms must be at least 1"
                    .to_owned(),
            ));
        }
        let change = topology.replication.max_change_bytes;
        if !(1 << 20..=1 << 30).contains(&change) {
            return Err(err(format!(
                "replication.max_change_bytes: found {change}; expected 1048576 (1 MiB) to 1073741824 (1 GiB)"
            )));
        }
        if let Some(global) = &topology.global {
            check_url("global.store", &global.store).map_err(err)?;
            check_ca("global.ca", global.ca.as_deref()).map_err(err)?;
        }
        for (i, link) in topology.links.iter().enumerate() {
            for (key, region) in [("source", &link.source), ("destination", &link.destination)] {
                topology
                    .region(region)
                    .map_err(|e| err(format!("links[{i}].{key}: {e}")))?;
            }
            if link.source == link.destination {
                return Err(err(format!(
                    "links[{i}]: source and destination are both {:?}; a link joins two regions",
                    link.source
                )));
            }
        }
        for (region, cluster) in topology.kafka.iter().flat_map(|k| &k.clusters) {
            if !topology.regions.contains_key(region) {
                return Err(err(format!(
                    "kafka.clusters.{region}: unknown region; a cluster is named by the region \
                     it runs in, one of {}",
                    topology
                        .regions
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            if cluster.brokers.trim().is_empty() {
                return Err(err(format!(
                    "kafka.clusters.{region}.brokers is empty; expected host:port[,host:port]"
                )));
            }
            let protocol = cluster.security_protocol;
            let problem = match (&cluster.sasl_mechanism, &cluster.sasl_username) {
                (Some(_), _) | (_, Some(_)) if !protocol.sasl() => Some(format!(
                    "sasl_mechanism and sasl_username need security_protocol = \"sasl_ssl\" \
                     (or \"sasl_plaintext\"), not {:?}",
                    protocol.name()
                )),
                (None, _) | (_, None) if protocol.sasl() => Some(format!(
                    "security_protocol = {:?} needs sasl_mechanism (SCRAM-SHA-512, \
                     SCRAM-SHA-256 or PLAIN) and sasl_username; the password comes from {}",
                    protocol.name(),
                    kafka_password_env(region)
                )),
                (Some(m), _)
                    if !["SCRAM-SHA-256", "SCRAM-SHA-512", "PLAIN"].contains(&m.as_str()) =>
                {
                    Some(format!(
                        "sasl_mechanism {m:?}: expected SCRAM-SHA-512, SCRAM-SHA-256 or PLAIN"
                    ))
                }
                _ if cluster.ca.is_some() && !protocol.tls() => Some(format!(
                    "ca needs security_protocol = \"ssl\" or \"sasl_ssl\", not {:?}",
                    protocol.name()
                )),
                _ => None,
            };
            if let Some(problem) = problem {
                return Err(err(format!("kafka.clusters.{region}: {problem}")));
            }
        }
        if let Some(region) = topology.kafka.as_ref().and_then(|k| k.region.as_ref())
            && !topology.regions.contains_key(region)
        {
            return Err(err(format!("kafka.region: unknown region {region:?}")));
        }
        for source in topology.regions.keys() {
            for destination in topology.regions.keys().filter(|d| *d != source) {
                if topology.transport(source, destination) == Transport::Kafka {
                    topology.kafka_site(source, destination).map_err(&err)?;
                }
            }
        }
        match &topology.kafka {
            Some(k)
                if k.brokers.as_ref().is_some_and(|b| b.trim().is_empty())
                    || k.partitions() < 1
                    || k.replication_factor < 1
                    || k.retention_hours < 1 =>
            {
                return Err(err(format!(
                    "kafka: found brokers {:?}, partitions {}, replication_factor {}, \
                     retention_hours {}; expected a host:port list and numbers of at least 1",
                    k.brokers.as_deref().unwrap_or_default(),
                    k.partitions(),
                    k.replication_factor,
                    k.retention_hours
                )));
            }
            Some(Kafka {
                order: KafkaOrder::Transaction,
                partitions_set: Some(n),
                ..
            }) if *n != 1 => {
                return Err(err(format!(
                    "kafka: order = \"transaction\" keeps each link on one partition, but \
                     partitions = {n}; remove partitions, or use order = \"row\" for {n} \
                     partitions applied in parallel"
                )));
            }
            _ => {}
        }
        let without: Vec<&str> = topology
            .regions
            .iter()
            .filter(|(_, r)| r.tls.is_none())
            .map(|(n, _)| n.as_str())
            .collect();
        if !topology.security.plaintext {
            if let Some(name) = without.first() {
                return Err(err(format!(
                    "regions.{name}.tls: missing; every agent needs a certificate for mTLS \
                     (tls = {{ ca = \"certs/ca.pem\", cert = \"certs/{name}.pem\", key = \"certs/{name}-key.pem\" }}, \
                     made by `meridian certs init`), or set [security] plaintext = true for a closed test network"
                )));
            }
        } else if let Some((name, _)) = topology.regions.iter().find(|(_, r)| r.tls.is_some()) {
            return Err(err(format!(
                "regions.{name}.tls: given, but [security] plaintext = true; agents either all use mTLS \
                 or all use plain TCP: remove plaintext, or the tls keys"
            )));
        }
        Ok(topology)
    }

    /// Reads and parses a topology file, applies the environment's store
    /// overrides ([`Topology::override_stores`]), resolves the policy and CA
    /// paths against the file's folder and checks that every CA file exists.
    /// The one function of this crate that does I/O.
    pub fn load(path: &Path) -> Result<Topology, TopologyError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            file: file.clone(),
            message: format!("cannot read the topology file: {e}"),
        })?;
        let mut topology = Topology::parse(&text, &file)?;
        topology.sha256 = crate::digest::sha256_hex(text.as_bytes());
        topology.override_stores(|k| std::env::var(k).ok());
        let dir = path.parent().unwrap_or(Path::new("."));
        if let Some(policy) = &topology.policy {
            topology.policy = Some(dir.join(policy).display().to_string());
        }
        let tls = topology
            .regions
            .values_mut()
            .filter_map(|r| r.tls.as_mut())
            .chain(topology.operator.as_mut().map(|o| &mut o.tls));
        for files in tls {
            for path in [&mut files.ca, &mut files.cert, &mut files.key] {
                *path = dir.join(&*path);
            }
        }
        let cas = topology
            .regions
            .iter_mut()
            .map(|(name, r)| (format!("regions.{name}.ca"), &mut r.ca))
            .chain(
                topology
                    .global
                    .as_mut()
                    .map(|g| ("global.ca".to_owned(), &mut g.ca)),
            )
            .chain(topology.kafka.iter_mut().flat_map(|k| {
                k.clusters
                    .iter_mut()
                    .map(|(name, c)| (format!("kafka.clusters.{name}.ca"), &mut c.ca))
            }));
        for (key, ca) in cas {
            let Some(ca) = ca else { continue };
            *ca = dir.join(&*ca);
            if !ca.is_file() {
                return Err(TopologyError {
                    file,
                    message: format!(
                        "{key}: {} is not a file; expected the PEM file of the CA that signed \
                         the server's certificate (a path relative to the topology file's \
                         folder, or absolute): fix the path or remove the key",
                        ca.display()
                    ),
                });
            }
        }
        // every connection to a region's store verifies it, not only the
        // client library's: agents and operator commands read the URL
        for region in topology.regions.values_mut() {
            if let Some(ca) = &region.ca {
                region.store = Dsn(with_ca(region.store.expose(), ca));
            }
        }
        Ok(topology)
    }

    /// Applies `MERIDIAN_<REGION>_STORE` and `MERIDIAN_GLOBAL_STORE` overrides
    /// (for secrets kept out of the file). `lookup` reads the environment.
    pub fn override_stores(&mut self, lookup: impl Fn(&str) -> Option<String>) {
        for (name, region) in &mut self.regions {
            if let Some(url) = lookup(&store_env(name)) {
                region.store = Dsn(url);
            }
        }
        if let Some(url) = lookup("MERIDIAN_GLOBAL_STORE") {
            match &mut self.global {
                Some(global) => global.store = Dsn(url),
                None => {
                    self.global = Some(Global {
                        store: Dsn(url),
                        ca: None,
                    })
                }
            }
        }
    }

    /// The transport of the link `source -> destination`.
    pub fn transport(&self, source: &str, destination: &str) -> Transport {
        self.links
            .iter()
            .find(|l| l.source == source && l.destination == destination)
            .and_then(|l| l.transport)
            .unwrap_or(self.replication.transport)
    }

    /// The cluster that carries the Kafka link `source -> destination`'s
    /// topic (see [`Kafka`]); an error names what is missing.
    pub fn kafka_site(&self, source: &str, destination: &str) -> Result<KafkaSite, String> {
        let kafka = self.kafka.as_ref().ok_or_else(|| {
            "a link uses transport \"kafka\" but there is no [kafka] section; add \
             [kafka.clusters.<region>] brokers = \"host:9092\""
                .to_owned()
        })?;
        let named = self
            .links
            .iter()
            .find(|l| l.source == source && l.destination == destination)
            .and_then(|l| l.cluster.as_deref());
        let regional = |region: &str| {
            kafka.clusters.get(region).map(|c| KafkaSite {
                cluster: c.clone(),
                region: Some(region.to_owned()),
            })
        };
        match named {
            Some(region) => regional(region).ok_or_else(|| {
                format!(
                    "the link {source} -> {destination} names cluster {region:?}, but there is \
                     no [kafka.clusters.{region}]"
                )
            }),
            None => regional(destination)
                .or_else(|| {
                    kafka.brokers.as_ref().map(|b| KafkaSite {
                        cluster: KafkaCluster {
                            brokers: b.clone(),
                            ..KafkaCluster::default()
                        },
                        region: kafka.region.clone(),
                    })
                })
                .ok_or_else(|| {
                    format!(
                        "the Kafka link {source} -> {destination} has no cluster: add \
                         [kafka.clusters.{destination}] brokers = \"host:9092\", name one with \
                         cluster = \"<region>\" in its [[links]] entry, or set [kafka] brokers"
                    )
                }),
        }
    }

    /// Looks a region up, with an error that lists the known ones.
    /// Each replicated table's primary key columns, by `(schema, table)`:
    /// what capture marks as keys and what a receiver admits.
    pub fn keys(&self) -> crate::pgoutput::Keys {
        self.tables
            .iter()
            .map(|t| {
                let (schema, name) = t.split_name();
                ((schema.to_owned(), name.to_owned()), t.primary_key.clone())
            })
            .collect()
    }

    pub fn region(&self, name: &str) -> Result<&Region, String> {
        self.regions.get(name).ok_or_else(|| {
            format!(
                "unknown region {name:?}; the topology defines {}",
                self.regions.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [regions.na]
        store = "postgres://meridian:s3cret@127.0.0.1:5432/app"
        listen = "127.0.0.1:7401"
        [regions.eu]
        store = "postgres://meridian@127.0.0.1:5433/app"
        listen = "127.0.0.1:7402"
        connect = "127.0.0.1:17402"
        [[tables]]
        name = "public.orders"
        primary_key = ["id"]
        home_column = "region"
        [security]
        plaintext = true
    "#;

    #[test]
    fn a_store_ca_makes_every_connection_verify_the_store() {
        let ca = Path::new("/etc/meridian/ca dir/na.pem");
        assert_eq!(
            with_ca("postgres://u:p@db:5432/app", ca),
            "postgres://u:p@db:5432/app?sslmode=verify-full&sslrootcert=/etc/meridian/ca%20dir/na.pem"
        );
        assert_eq!(
            with_ca(
                "postgres://db/app?sslmode=require&application_name=x&sslrootcert=old.pem",
                ca
            ),
            "postgres://db/app?application_name=x&sslmode=verify-full&sslrootcert=/etc/meridian/ca%20dir/na.pem"
        );
        assert!(with_ca("postgres://db/app?sslmode=verify-ca", ca).contains("sslmode=verify-ca&"));
    }

    #[test]
    fn meridians_own_schema_is_never_replicated() {
        let text = GOOD.replace("public.orders", "meridian.watermarks");
        let e = Topology::parse(&text, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("schema meridian holds Meridian's own state"),
            "{e}"
        );
    }

    /// Every agent has a certificate, or none does and the file says so.
    #[test]
    fn agents_use_mtls_unless_plaintext_is_explicit() {
        let secure = GOOD.replace("[security]\n        plaintext = true", "").replace(
            "listen = \"127.0.0.1:7401\"",
            "listen = \"127.0.0.1:7401\"\ntls = { ca = \"ca.pem\", cert = \"na.pem\", key = \"na-key.pem\" }",
        );
        let e = Topology::parse(&secure, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("regions.eu.tls: missing") && e.contains("certs init"),
            "{e}"
        );
        let both = secure.replace(
            "listen = \"127.0.0.1:7402\"",
            "listen = \"127.0.0.1:7402\"\ntls = { ca = \"ca.pem\", cert = \"eu.pem\", key = \"eu-key.pem\" }",
        );
        let t = Topology::parse(&both, "t.toml").unwrap();
        assert_eq!(
            t.regions["eu"].tls.as_ref().unwrap().cert,
            Path::new("eu.pem")
        );
        assert!(!t.security.plaintext);
        let mixed = format!("{secure}\n[security]\nplaintext = true\n");
        let e = Topology::parse(&mixed, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("regions.na.tls: given, but [security] plaintext = true"),
            "{e}"
        );
        let typo = both.replace("cert = \"eu.pem\"", "certificate = \"eu.pem\"");
        let e = Topology::parse(&typo, "t.toml").unwrap_err().to_string();
        assert!(e.contains("certificate"), "{e}");
    }

    #[test]
    fn parses_a_valid_topology() {
        let t = Topology::parse(GOOD, "t.toml").unwrap();
        assert_eq!(t.regions.len(), 2);
        assert_eq!(t.regions["eu"].connect_addr(), "127.0.0.1:17402");
        assert_eq!(t.regions["na"].connect_addr(), "127.0.0.1:7401");
        assert_eq!(t.tables[0].split_name(), ("public", "orders"));
        assert_eq!(t.replication.window, 8);
    }

    /// A link's topic rests on the cluster its entry names, else on the
    /// destination's, else on the one `[kafka] brokers` cluster; a link
    /// with none, or a cluster in no region, is refused.
    #[test]
    fn places_each_kafka_topic_on_a_regional_cluster() {
        let text = format!(
            "{GOOD}\n[replication]\ntransport = \"kafka\"\n\
             [kafka.clusters.eu]\nbrokers = \"kafka.eu:9092\"\n\
             [kafka.clusters.na]\nbrokers = \"kafka.na:9092\"\n"
        );
        let t = Topology::parse(&text, "t.toml").unwrap();
        let site = |s, d| t.kafka_site(s, d).unwrap();
        assert_eq!(site("na", "eu").region.as_deref(), Some("eu"));
        assert_eq!(site("na", "eu").cluster.brokers, "kafka.eu:9092");
        assert_eq!(site("eu", "na").region.as_deref(), Some("na"));

        let named =
            format!("{text}[[links]]\nsource = \"na\"\ndestination = \"eu\"\ncluster = \"na\"\n");
        let t = Topology::parse(&named, "t.toml").unwrap();
        assert_eq!(
            t.kafka_site("na", "eu").unwrap().cluster.brokers,
            "kafka.na:9092"
        );
        assert_eq!(
            t.transport("na", "eu"),
            Transport::Kafka,
            "the default transport stays"
        );

        let only_eu = text.replace("[kafka.clusters.na]\nbrokers = \"kafka.na:9092\"\n", "");
        let e = Topology::parse(&only_eu, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("eu -> na has no cluster") && e.contains("[kafka.clusters.na]"),
            "{e}"
        );
        let shared = format!(
            "{GOOD}\n[replication]\ntransport = \"kafka\"\n\
             [kafka]\nbrokers = \"kafka.all:9092\"\nregion = \"eu\"\n\
             [kafka.clusters.eu]\nbrokers = \"kafka.eu:9092\"\n"
        );
        let t = Topology::parse(&shared, "t.toml").unwrap();
        assert_eq!(
            t.kafka_site("eu", "na").unwrap(),
            KafkaSite {
                cluster: KafkaCluster {
                    brokers: "kafka.all:9092".into(),
                    ..KafkaCluster::default()
                },
                region: Some("eu".into())
            }
        );
        let nowhere = text.replace("[kafka.clusters.na]", "[kafka.clusters.mars]");
        let e = Topology::parse(&nowhere, "t.toml").unwrap_err().to_string();
        assert!(e.contains("kafka.clusters.mars: unknown region"), "{e}");
        let secure = text.replace(
            "brokers = \"kafka.eu:9092\"\n",
            "brokers = \"kafka.eu:9093\"\nsecurity_protocol = \"sasl_ssl\"\n\
             sasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"meridian\"\n",
        );
        let t = Topology::parse(&secure, "t.toml").unwrap();
        let eu = &t.kafka_site("na", "eu").unwrap().cluster;
        assert_eq!(eu.security_protocol, KafkaProtocol::SaslSsl);
        assert_eq!(eu.sasl_username.as_deref(), Some("meridian"));
        let e = Topology::parse(
            &secure.replace("sasl_username = \"meridian\"\n", ""),
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("kafka.clusters.eu") && e.contains("MERIDIAN_KAFKA_PASSWORD_EU"),
            "{e}"
        );
        let e = Topology::parse(&secure.replace("sasl_ssl", "plaintext"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("need security_protocol"), "{e}");
        let e = Topology::parse(&secure.replace("SCRAM-SHA-512", "GSSAPI"), "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"GSSAPI\""), "{e}");
        let missing = named.replace("cluster = \"na\"", "cluster = \"apac\"");
        let e = Topology::parse(&missing, "t.toml").unwrap_err().to_string();
        assert!(e.contains("no [kafka.clusters.apac]"), "{e}");
    }

    #[test]
    fn chooses_the_transport_per_link() {
        let text = format!(
            "{GOOD}\n[replication]\ntransport = \"grpc\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"\n\
             [[links]]\nsource = \"na\"\ndestination = \"eu\"\ntransport = \"kafka\"\n"
        );
        let t = Topology::parse(&text, "t.toml").unwrap();
        assert_eq!(t.transport("na", "eu"), Transport::Kafka);
        assert_eq!(t.transport("eu", "na"), Transport::Grpc);
        assert_eq!(t.kafka.as_ref().unwrap().partitions(), 4);
        let ordered = text.replace(
            "brokers = \"127.0.0.1:9092\"\n",
            "brokers = \"127.0.0.1:9092\"\norder = \"transaction\"\n",
        );
        let t = Topology::parse(&ordered, "t.toml").unwrap();
        assert_eq!(t.kafka.as_ref().unwrap().order, KafkaOrder::Transaction);
        assert_eq!(t.kafka.as_ref().unwrap().partitions(), 1);
        let clash = ordered.replace("order = ", "partitions = 4\norder = ");
        let e = Topology::parse(&clash, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("one partition") && e.contains("partitions = 4"),
            "{e}"
        );

        let no_kafka = text.replace("[kafka]\nbrokers = \"127.0.0.1:9092\"\n", "");
        let e = Topology::parse(&no_kafka, "t.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [kafka] section"), "{e}");
        let bad = text.replace("transport = \"kafka\"", "transport = \"carrier-pigeon\"");
        let e = Topology::parse(&bad, "t.toml").unwrap_err().to_string();
        assert!(e.contains("carrier-pigeon") && e.contains("grpc"), "{e}");
        let unknown = text.replace("destination = \"eu\"", "destination = \"mars\"");
        let e = Topology::parse(&unknown, "t.toml").unwrap_err().to_string();
        assert!(
            e.contains("links[0].destination") && e.contains("mars"),
            "{e}"
        );
    }

    #[test]
    fn never_prints_passwords() {
        let t = Topology::parse(GOOD, "t.toml").unwrap();
        let shown = format!("{:?} {}", t, t.regions["na"].store);
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("meridian:***@127.0.0.1"), "{shown}");
    }

    #[test]
    fn errors_name_the_file_and_key() {
        let cases = [
            (
                GOOD.replace("listen = \"127.0.0.1:7401\"", "listne = \"x:1\""),
                "listne",
            ),
            (
                GOOD.replace("127.0.0.1:7402\"", "nowhere\""),
                "regions.eu.listen",
            ),
            (
                GOOD.replace("postgres://meridian@", "mysql://x@"),
                "regions.eu.store",
            ),
            (
                GOOD.replace("public.orders", "orders"),
                "tables[0] (orders).name",
            ),
            (GOOD.replace("[\"id\"]", "[]"), "primary_key"),
            (GOOD.replace("[regions.eu]", "[regions.EU]"), "regions.EU"),
        ];
        for (text, key) in cases {
            let e = Topology::parse(&text, "topo.toml").unwrap_err().to_string();
            assert!(e.starts_with("topo.toml: "), "{e}");
            assert!(e.contains(key), "{key} not in {e}");
        }
    }

    #[test]
    fn message_limits_follow_the_tuning() {
        let mut t = Tuning::default();
        let default = t.message_limit();
        assert!((90 << 20..95 << 20).contains(&default), "{default}");
        t.batch_max_changes = 100;
        t.max_change_bytes = 1 << 20;
        assert!(t.message_limit() < 21 << 20, "{}", t.message_limit());
        for (key, bad) in [
            ("max_change_bytes", "1000"),
            ("max_change_bytes", "2147483648"),
        ] {
            let text = format!("{GOOD}\n[replication]\n{key} = {bad}\n");
            let e = Topology::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(
                e.contains(&format!("replication.{key}: found {bad}")),
                "{e}"
            );
        }
    }

    #[test]
    fn environment_overrides_stores() {
        let mut t = Topology::parse(GOOD, "t.toml").unwrap();
        t.override_stores(|k| (k == "MERIDIAN_EU_STORE").then(|| "postgres://other/db".to_owned()));
        assert_eq!(t.regions["eu"].store.expose(), "postgres://other/db");
        assert!(t.region("apac").unwrap_err().contains("eu, na"));
    }

    #[test]
    fn the_global_override_keeps_the_ca() {
        let text = format!("{GOOD}\n[global]\nstore = \"postgres://g/db\"\nca = \"g.pem\"\n");
        let mut t = Topology::parse(&text, "t.toml").unwrap();
        t.override_stores(|k| (k == "MERIDIAN_GLOBAL_STORE").then(|| "postgres://h/db".to_owned()));
        let global = t.global.unwrap();
        assert_eq!(global.store.expose(), "postgres://h/db");
        assert_eq!(global.ca.as_deref(), Some(Path::new("g.pem")));

        let mut t = Topology::parse(GOOD, "t.toml").unwrap();
        t.override_stores(|k| (k == "MERIDIAN_GLOBAL_STORE").then(|| "postgres://h/db".to_owned()));
        assert_eq!(t.global.unwrap().ca, None);
    }

    #[test]
    fn parses_store_cas() {
        let text = GOOD.replace(
            "listen = \"127.0.0.1:7401\"",
            "listen = \"127.0.0.1:7401\"\nca = \"certs/na.pem\"",
        ) + "[global]\nstore = \"postgres://g/db\"\nca = \"/etc/ca.pem\"\n";
        let t = Topology::parse(&text, "t.toml").unwrap();
        assert_eq!(
            t.regions["na"].ca.as_deref(),
            Some(Path::new("certs/na.pem"))
        );
        assert_eq!(t.regions["eu"].ca, None);
        assert_eq!(
            t.global.unwrap().ca.as_deref(),
            Some(Path::new("/etc/ca.pem"))
        );

        let empty = text.replace("\"certs/na.pem\"", "\"\"");
        let e = Topology::parse(&empty, "t.toml").unwrap_err().to_string();
        assert!(e.contains("regions.na.ca: found an empty path"), "{e}");
        let empty = text.replace("\"/etc/ca.pem\"", "\"\"");
        let e = Topology::parse(&empty, "t.toml").unwrap_err().to_string();
        assert!(e.contains("global.ca: found an empty path"), "{e}");
        let typo = text.replace("ca = \"certs", "cafile = \"certs");
        let e = Topology::parse(&typo, "t.toml").unwrap_err().to_string();
        assert!(e.contains("cafile"), "{e}");
    }

    /// `load` resolves CA paths against the file's folder and refuses missing files.
    #[test]
    fn load_resolves_and_checks_cas() {
        let dir = std::env::temp_dir().join(format!("meridian-topology-ca-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        std::fs::write(dir.join("certs/na.pem"), "not checked here").unwrap();
        let file = dir.join("topology.toml");
        let with = |global_ca: &str| {
            let text =
                GOOD.replace(
                    "listen = \"127.0.0.1:7401\"",
                    "listen = \"127.0.0.1:7401\"\nca = \"certs/na.pem\"",
                ) + &format!("[global]\nstore = \"postgres://g/db\"\nca = \"{global_ca}\"\n");
            std::fs::write(&file, text).unwrap();
            Topology::load(&file)
        };

        let t = with("certs/na.pem").unwrap();
        assert_eq!(
            t.regions["na"].ca.as_deref(),
            Some(&*dir.join("certs/na.pem"))
        );
        assert_eq!(
            t.global.unwrap().ca.as_deref(),
            Some(&*dir.join("certs/na.pem"))
        );

        let e = with("certs/missing.pem").unwrap_err().to_string();
        let missing = dir.join("certs/missing.pem").display().to_string();
        assert!(e.contains("global.ca: ") && e.contains(&missing), "{e}");
        assert!(e.contains("relative to the topology file's folder"), "{e}");
        let e = with("certs").unwrap_err().to_string();
        assert!(e.contains("is not a file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
