//! A whole multi-region deployment on this machine: one PostgreSQL cluster
//! and one agent process per region, optionally with a [`TcpProxy`] in front
//! of a region's agent to inject network faults.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::{AgentProcess, KafkaBroker, PgCluster, TcpProxy, free_port};

/// What to start.
pub struct Spec<'a> {
    pub regions: &'a [&'a str],
    /// Application schema, run in every region before the agents start.
    pub schema: &'a str,
    /// Replicated tables: (schema.table, primary key column, home column).
    /// A composite key is written with commas: `"a,b"`.
    pub tables: &'a [(&'a str, &'a str, &'a str)],
    /// Regions whose agent peers reach through a proxy.
    pub proxied: &'a [&'a str],
    /// Extra topology lines (e.g. a `[replication]` section). Agents and
    /// the kit's operator commands use mTLS with certificates the kit makes
    /// (`certs/` beside the topology), unless these lines set `[security]
    /// plaintext = true`, or agents of another release run (which predate
    /// mTLS).
    pub extra_topology: &'a str,
    /// A residency policy, written beside the topology as `policy.toml`.
    pub policy: Option<&'a str>,
    /// Environment for the agents (secrets such as the policy hash key).
    pub agent_env: &'a [(&'a str, &'a str)],
    /// With `Some(schema)`, one more cluster plays the multi-region database
    /// (`[global]` in the topology), with this schema applied.
    pub global_schema: Option<&'a str>,
    /// Every link over Kafka (a [`KafkaBroker`] started for the deployment)
    /// instead of gRPC.
    pub kafka: bool,
}

/// How a deployment differs from [`Deployment::start`]'s.
#[derive(Clone, Copy, Default)]
struct Options<'a> {
    /// Agents of other binaries, by region.
    others: &'a [(&'a str, &'a Path)],
    /// A SASL user the Kafka broker requires.
    kafka_user: Option<(&'a str, &'a str)>,
    /// Stores accept only TLS.
    tls_stores: bool,
    /// The role agents log into their stores as.
    store_user: Option<&'a str>,
    /// SQL run in a region's store after the schema, before its agent
    /// starts: rows that exist before any slot does.
    seed: &'a [(&'a str, &'a str)],
}

/// A running deployment. Dropping it kills the agents and removes the clusters.
pub struct Deployment {
    pub regions: Vec<String>,
    pub pools: Vec<PgPool>,
    agents: Vec<AgentProcess>,
    proxies: Vec<(String, TcpProxy)>,
    metrics: Vec<String>,
    clusters: Vec<PgCluster>,
    global: Option<(PgCluster, PgPool)>,
    broker: Option<KafkaBroker>,
    pub config: PathBuf,
    /// The CA of the agents' certificates; `None` in plain TCP.
    pub authority: Option<meridian_trust::certs::Authority>,
}

impl Deployment {
    /// Starts clusters, applies the schema, writes the topology, starts the
    /// agents (`binary agent ...`) and waits until every slot exists, so
    /// every change from now on is captured.
    pub async fn start(binary: &Path, spec: &Spec<'_>) -> anyhow::Result<Deployment> {
        Self::start_mixed(binary, &[], spec).await
    }

    /// [`Deployment::start`] with some regions' agents started from other
    /// binaries (`(region, binary)`): agents of different releases.
    pub async fn start_mixed(
        binary: &Path,
        others: &[(&str, &Path)],
        spec: &Spec<'_>,
    ) -> anyhow::Result<Deployment> {
        let options = Options {
            others,
            ..Options::default()
        };
        Self::start_inner(binary, spec, &options).await
    }

    /// [`Deployment::start`] over Kafka (`spec.kafka`) with a broker that
    /// requires SASL/SCRAM-SHA-512 of `user`: every region names the broker
    /// as its cluster (`[kafka.clusters.<region>]`, `sasl_plaintext`), and
    /// each agent gets the password in `MERIDIAN_KAFKA_PASSWORD_<REGION>`.
    pub async fn start_with_kafka_user(
        binary: &Path,
        spec: &Spec<'_>,
        user: (&str, &str),
    ) -> anyhow::Result<Deployment> {
        let options = Options {
            kafka_user: Some(user),
            ..Options::default()
        };
        Self::start_inner(binary, spec, &options).await
    }

    /// [`Deployment::start`] on stores that accept only TLS connections,
    /// each with its own CA, named as the region's `ca` in the topology.
    pub async fn start_with_tls_stores(
        binary: &Path,
        spec: &Spec<'_>,
    ) -> anyhow::Result<Deployment> {
        let options = Options {
            tls_stores: true,
            ..Options::default()
        };
        Self::start_inner(binary, spec, &options).await
    }

    /// [`Deployment::start`] with agents logging into their stores as
    /// `user` (which `spec.schema` creates and grants) instead of the
    /// superuser.
    pub async fn start_as_store_user(
        binary: &Path,
        spec: &Spec<'_>,
        user: &str,
    ) -> anyhow::Result<Deployment> {
        let options = Options {
            store_user: Some(user),
            ..Options::default()
        };
        Self::start_inner(binary, spec, &options).await
    }

    /// [`Deployment::start`] with stores that already hold data: each
    /// `(region, sql)` runs in that region's store after the schema and
    /// before the agents start.
    pub async fn start_seeded(
        binary: &Path,
        spec: &Spec<'_>,
        seed: &[(&str, &str)],
    ) -> anyhow::Result<Deployment> {
        let options = Options {
            seed,
            ..Options::default()
        };
        Self::start_inner(binary, spec, &options).await
    }

    async fn start_inner(
        binary: &Path,
        spec: &Spec<'_>,
        options: &Options<'_>,
    ) -> anyhow::Result<Deployment> {
        let Options {
            others,
            kafka_user,
            tls_stores,
            store_user,
            seed,
        } = *options;
        let mut clusters = Vec::new();
        let mut pools = Vec::new();
        for region in spec.regions {
            let cluster = match tls_stores {
                true => PgCluster::start_tls()?,
                false => PgCluster::start()?,
            };
            let pool = PgPoolOptions::new()
                .max_connections(4)
                .connect(&cluster.url("postgres"))
                .await?;
            sqlx::raw_sql(spec.schema)
                .execute(&pool)
                .await
                .context("applying the test schema")?;
            for (_, sql) in seed.iter().filter(|(r, _)| r == region) {
                sqlx::raw_sql(sql)
                    .execute(&pool)
                    .await
                    .with_context(|| format!("seeding {region}'s store"))?;
            }
            clusters.push(cluster);
            pools.push(pool);
        }
        let mut topology = String::new();
        let global = match spec.global_schema {
            Some(schema) => {
                let cluster = PgCluster::start()?;
                let pool = PgPoolOptions::new()
                    .max_connections(4)
                    .connect(&cluster.url("postgres"))
                    .await?;
                sqlx::raw_sql(schema)
                    .execute(&pool)
                    .await
                    .context("applying the global schema")?;
                Some((cluster, pool))
            }
            None => None,
        };
        if let Some(policy) = spec.policy {
            std::fs::write(clusters[0].dir().join("policy.toml"), policy)?;
            topology.push_str("policy = \"policy.toml\"\n\n");
        }
        let plaintext = spec.extra_topology.contains("plaintext = true") || !others.is_empty();
        let authority = match plaintext {
            true => None,
            false => {
                let ca = meridian_trust::certs::Authority::new("test CA")?;
                let regions: Vec<String> = spec.regions.iter().map(|r| r.to_string()).collect();
                meridian_trust::certs::write_all(
                    &ca,
                    &regions,
                    "tests",
                    &clusters[0].dir().join("certs"),
                )?;
                Some(ca)
            }
        };
        let mut proxies = Vec::new();
        let mut metrics = Vec::new();
        for (region, cluster) in spec.regions.iter().zip(&clusters) {
            let listen = format!("127.0.0.1:{}", free_port());
            let metrics_addr = format!("127.0.0.1:{}", free_port());
            topology.push_str(&format!(
                "[regions.{region}]\nstore = \"{}\"\nlisten = \"{listen}\"\nmetrics = \"{metrics_addr}\"\n",
                match store_user {
                    Some(user) => cluster.url("postgres").replacen("postgres@", &format!("{user}@"), 1),
                    None => cluster.url("postgres"),
                },
            ));
            metrics.push(metrics_addr);
            if let Some(ca) = cluster.ca_path() {
                topology.push_str(&format!("ca = \"{}\"\n", ca.display()));
            }
            if authority.is_some() {
                topology.push_str(&format!(
                    "tls = {{ ca = \"certs/ca.pem\", cert = \"certs/{region}.pem\", key = \"certs/{region}-key.pem\" }}\n"
                ));
            }
            if spec.proxied.contains(region) {
                let proxy = TcpProxy::start(&listen).await?;
                topology.push_str(&format!("connect = \"{}\"\n", proxy.addr()));
                proxies.push((region.to_string(), proxy));
            }
            topology.push('\n');
        }
        for (name, pk, home) in spec.tables {
            let pk = pk
                .split(',')
                .map(|c| format!("\"{}\"", c.trim()))
                .collect::<Vec<_>>()
                .join(", ");
            topology.push_str(&format!(
                "[[tables]]\nname = \"{name}\"\nprimary_key = [{pk}]\nhome_column = \"{home}\"\n\n"
            ));
        }
        topology.push_str(spec.extra_topology);
        let mut agent_env: Vec<(String, String)> = spec
            .agent_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let broker = if spec.kafka {
            let broker = match kafka_user {
                None => {
                    let broker = KafkaBroker::start()?;
                    topology.push_str(&format!(
                        "\n[kafka]\nbrokers = \"{}\"\npartitions = 4\nreplication_factor = 1\n",
                        broker.addr()
                    ));
                    broker
                }
                Some((user, password)) => {
                    let broker = KafkaBroker::start_with_user(user, password)?;
                    topology.push_str("\n[kafka]\npartitions = 4\nreplication_factor = 1\n");
                    for region in spec.regions {
                        topology.push_str(&format!(
                            "[kafka.clusters.{region}]\nbrokers = \"{}\"\n\
                             security_protocol = \"sasl_plaintext\"\n\
                             sasl_mechanism = \"SCRAM-SHA-512\"\nsasl_username = \"{user}\"\n",
                            broker.addr()
                        ));
                        agent_env.push((
                            format!("MERIDIAN_KAFKA_PASSWORD_{}", region.to_uppercase()),
                            password.to_owned(),
                        ));
                    }
                    broker
                }
            };
            for source in spec.regions {
                for destination in spec.regions.iter().filter(|d| *d != source) {
                    topology.push_str(&format!(
                        "\n[[links]]\nsource = \"{source}\"\ndestination = \"{destination}\"\ntransport = \"kafka\"\n"
                    ));
                }
            }
            Some(broker)
        } else {
            None
        };
        if let Some((cluster, _)) = &global {
            topology.push_str(&format!(
                "\n[global]\nstore = \"{}\"\n",
                cluster.url("postgres")
            ));
        }
        let config = clusters[0].dir().join("topology.toml");
        // agents of another release read the topology without the switch
        // they do not know
        let previous = clusters[0].dir().join("topology-previous.toml");
        std::fs::write(&previous, &topology)?;
        match authority.is_some() {
            true => topology.push_str(
                "\n[operator]\ntls = { ca = \"certs/ca.pem\", cert = \"certs/operator-tests.pem\", \
                 key = \"certs/operator-tests-key.pem\" }\n",
            ),
            false if !spec.extra_topology.contains("plaintext = true") => {
                topology.push_str("\n[security]\nplaintext = true\n")
            }
            false => {}
        }
        std::fs::write(&config, topology)?;
        let log_dir = clusters[0].dir().to_owned();
        let agents = spec
            .regions
            .iter()
            .map(|r| {
                let other = others.iter().find(|(region, _)| region == r);
                let binary = other.map_or(binary, |(_, b)| *b);
                let config = match other {
                    Some(_) => &previous,
                    None => &config,
                };
                let env: Vec<(&str, &str)> = agent_env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                AgentProcess::spawn_with_env(binary, config, r, &log_dir, &env)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let deployment = Deployment {
            regions: spec.regions.iter().map(|r| r.to_string()).collect(),
            pools,
            agents,
            proxies,
            metrics,
            clusters,
            global,
            broker,
            config,
            authority,
        };
        for i in 0..deployment.regions.len() {
            deployment.wait_for_slots(i).await?;
            deployment.wait_for_metrics(i).await?;
        }
        Ok(deployment)
    }

    /// A gRPC channel to `to`'s agent presenting the certificate of
    /// `identity` issued by the deployment's CA (plain TCP when the
    /// deployment runs without mTLS): for tests that play a peer or an
    /// operator.
    pub async fn channel_as(
        &self,
        identity: meridian_trust::Identity,
        to: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let ca = self.authority.as_ref();
        let credentials = match ca {
            Some(ca) => {
                let (cert, key) = ca.issue(&identity, Default::default())?;
                Some(self.credentials(&ca.pem(), &cert, &key)?)
            }
            None => None,
        };
        self.channel_with(credentials.as_ref(), to).await
    }

    /// Credentials from PEM texts (written beside the topology).
    pub fn credentials(
        &self,
        ca: &str,
        cert: &str,
        key: &str,
    ) -> anyhow::Result<meridian_trust::tls::Credentials> {
        let dir = self.clusters[0]
            .dir()
            .join(format!("certs/extra-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let files = meridian_trust::tls::Files {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        };
        std::fs::write(&files.ca, ca)?;
        std::fs::write(&files.cert, cert)?;
        std::fs::write(&files.key, key)?;
        meridian_trust::tls::Credentials::load(&files)
    }

    /// A gRPC channel to `to`'s agent with `credentials` (expecting `to`'s
    /// certificate), or in plain TCP without.
    pub async fn channel_with(
        &self,
        credentials: Option<&meridian_trust::tls::Credentials>,
        to: &str,
    ) -> anyhow::Result<tonic::transport::Channel> {
        let topology = meridian_core::topology::Topology::load(&self.config)?;
        let addr = topology
            .region(to)
            .map_err(anyhow::Error::msg)?
            .listen
            .clone();
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
        let config = match credentials {
            Some(c) => Some(c.client_config(meridian_trust::Identity::Region(to.to_owned()))?),
            None => None,
        };
        Ok(meridian_trust::net::dial(endpoint, &addr, config, Duration::from_secs(10)).await?)
    }

    fn index(&self, region: &str) -> usize {
        self.regions
            .iter()
            .position(|r| r == region)
            .expect("known region")
    }

    /// The store of `region`.
    pub fn pool(&self, region: &str) -> &PgPool {
        &self.pools[self.index(region)]
    }

    /// The multi-region database (with [`Spec::global_schema`]).
    pub fn global_pool(&self) -> &PgPool {
        &self
            .global
            .as_ref()
            .expect("deployment has a global database")
            .1
    }

    /// The Kafka broker (with [`Spec::kafka`]).
    pub fn broker(&mut self) -> &mut KafkaBroker {
        self.broker.as_mut().expect("deployment runs over kafka")
    }

    /// The agent of `region`.
    pub fn agent(&mut self, region: &str) -> &mut AgentProcess {
        let i = self.index(region);
        &mut self.agents[i]
    }

    /// The address of `region`'s agent's metrics endpoint.
    pub fn metrics_addr(&self, region: &str) -> &str {
        &self.metrics[self.index(region)]
    }

    /// The text `region`'s agent serves at `GET /metrics`.
    pub async fn metrics(&self, region: &str) -> anyhow::Result<String> {
        crate::http_get(&self.metrics[self.index(region)], "/metrics").await
    }

    /// The value of one sample of `region`'s metrics: the line that starts
    /// with `series` (name and labels, as exported). None if absent.
    pub async fn metric(&self, region: &str, series: &str) -> anyhow::Result<Option<f64>> {
        let text = self.metrics(region).await?;
        Ok(text
            .lines()
            .find(|l| l.starts_with(series))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok()))
    }

    /// Everything `region`'s agent logged so far.
    pub fn agent_log(&self, region: &str) -> String {
        self.agents[self.index(region)].log()
    }

    /// The proxy in front of `region`'s agent.
    pub fn proxy(&self, region: &str) -> &TcpProxy {
        &self
            .proxies
            .iter()
            .find(|(r, _)| r == region)
            .expect("region is proxied")
            .1
    }

    /// Replaces the policy file (agents pick it up on SIGHUP).
    pub fn write_policy(&self, policy: &str) -> anyhow::Result<()> {
        Ok(std::fs::write(
            self.clusters[0].dir().join("policy.toml"),
            policy,
        )?)
    }

    /// The cluster of `region`.
    pub fn cluster(&self, region: &str) -> &PgCluster {
        &self.clusters[self.index(region)]
    }

    async fn wait_for_slots(&self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'meridian\\_%'",
            )
            .fetch_one(&self.pools[i])
            .await?;
            if n as usize >= self.regions.len() - 1 {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {} created no slots in 60 s; log:\n{}",
                    self.regions[i],
                    self.agents[i].log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until agent `i` serves `/metrics`: slots may exist before the
    /// agent binds its metrics address.
    async fn wait_for_metrics(&self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match crate::http_get(&self.metrics[i], "/metrics").await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!(
                    "agent {} serves no metrics at {} after 60 s ({e}); log:\n{}",
                    self.regions[i],
                    self.metrics[i],
                    self.agents[i].log()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// `source`'s slot incarnation as `destination` recorded it.
    pub async fn incarnation(&self, source: &str, destination: &str) -> anyhow::Result<String> {
        Ok(sqlx::query_scalar(
            "SELECT incarnation::text FROM meridian.source_incarnations WHERE source_region = $1",
        )
        .bind(source)
        .fetch_one(self.pool(destination))
        .await?)
    }

    /// `binary status --json`: its exit code and report.
    pub fn status(&self, binary: &Path) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
        self.status_with(binary, &[])
    }

    /// [`Deployment::status`] with more arguments (thresholds).
    pub fn status_with(
        &self,
        binary: &Path,
        args: &[&str],
    ) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
        let out = std::process::Command::new(binary)
            .args(["status", "--json"])
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()?;
        let report = serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "status --json printed no JSON: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
        Ok((out.status.code(), report))
    }

    /// The link `source -> destination` as `binary status --json` reports
    /// it (null when absent), and whether `status` exited healthy.
    pub fn link_status(
        &self,
        binary: &Path,
        source: &str,
        destination: &str,
    ) -> anyhow::Result<(bool, serde_json::Value)> {
        let (code, link) = self.link_status_with(binary, source, destination, &[])?;
        Ok((code == Some(0), link))
    }

    /// The link `source -> destination` as `binary status --json <args>`
    /// reports it (null when absent), and the exit code.
    pub fn link_status_with(
        &self,
        binary: &Path,
        source: &str,
        destination: &str,
        args: &[&str],
    ) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
        let (code, report) = self.status_with(binary, args)?;
        let link = report["links"]
            .as_array()
            .and_then(|l| {
                l.iter()
                    .find(|l| l["source"] == source && l["destination"] == destination)
            })
            .cloned()
            .unwrap_or_default();
        Ok((code, link))
    }

    /// md5 and row count of a table's rows in primary-key order.
    pub async fn fingerprint(
        &self,
        region: &str,
        table: &str,
        key: &str,
    ) -> anyhow::Result<(i64, String)> {
        Ok(sqlx::query_as(&format!(
            "SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t.{key})), '') FROM {table} t"
        ))
        .fetch_one(self.pool(region))
        .await?)
    }

    /// Waits until `table` is identical in every region and holds at least
    /// `min_rows` rows; returns the common row count. On timeout, the error
    /// shows each region's fingerprint and the agents' logs' last lines.
    pub async fn wait_converged(
        &self,
        table: &str,
        key: &str,
        min_rows: i64,
        timeout: Duration,
    ) -> anyhow::Result<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut prints = Vec::new();
            for r in &self.regions {
                prints.push(self.fingerprint(r, table, key).await?);
            }
            if prints.windows(2).all(|w| w[0] == w[1]) && prints[0].0 >= min_rows {
                return Ok(prints[0].0);
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .agents
                    .iter()
                    .zip(&self.regions)
                    .map(|(a, r)| {
                        let log = a.log();
                        let tail: Vec<&str> = log.lines().rev().take(15).collect();
                        format!(
                            "--- agent {r}:\n{}",
                            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                        )
                    })
                    .collect();
                bail!(
                    "{table} did not converge within {timeout:?}: {prints:?}\n{}",
                    logs.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
