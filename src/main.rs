//! `meridian`: the command line of the Meridian replication service.

mod dashboard;
mod dead_letters;
mod demo;
mod deploy;
mod drift;
mod human;
mod operator;
mod placement;
mod policy;
mod resync;
mod slots;
mod status;
mod sync;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

/// Residency-aware multi-region replication for PostgreSQL.
#[derive(Parser)]
#[command(name = "meridian", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one region's agent: capture its store's changes, ship them to the
    /// peer regions, apply what peers send.
    Agent {
        /// Topology file (TOML).
        #[arg(long)]
        config: PathBuf,
        /// This agent's region, as named in the topology.
        #[arg(long)]
        region: String,
    },
    /// Start three local regions (na, eu, apac) on temporary PostgreSQL
    /// clusters with their agents, write sample tenants and orders, and show
    /// them arriving in the peers. Ctrl-C stops and removes everything.
    Demo {
        /// Stop after this many seconds instead of waiting for Ctrl-C.
        #[arg(long)]
        duration: Option<u64>,
        /// `kafka` carries every link through a local Kafka-protocol broker
        /// (tansu 0.6.0 with the storage patch `.ci/tansu/install` builds, or
        /// the broker binary MERIDIAN_TANSU names).
        #[arg(long, default_value = "grpc")]
        transport: String,
    },
    /// Residency policy tools.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Tenants' home regions, kept in the multi-region database (`[global]`).
    Placement {
        #[command(subcommand)]
        command: PlacementCommand,
    },
    /// Ask every region's agent for its links, lag and slots, and print one
    /// table. Exits non-zero when a link is not connected, lags at or above
    /// --critical-seconds, or a region does not answer.
    Status {
        #[arg(long)]
        config: PathBuf,
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        thresholds: ThresholdArgs,
    },
    /// Data a destination store would not take (a value its column type
    /// refuses, a broken constraint): list, inspect, replay once the cause
    /// is fixed, or discard. Pending dead letters keep commit tokens from
    /// resolving past them.
    DeadLetters {
        #[command(subcommand)]
        command: DeadLetterCommand,
    },
    /// Replication slots: `prune` drops Meridian slots that no link of the
    /// topology uses (a dry run without --yes).
    Slots {
        #[command(subcommand)]
        command: SlotsCommand,
    },
    /// Certificates for mTLS between agents and operators.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Kubernetes manifests from the topology (docs/kubernetes.md).
    Deploy {
        #[command(subcommand)]
        command: DeployCommand,
    },
    /// Rebuild a destination's copy of a source's rows after the link
    /// stopped for a lost slot, another incarnation, or a source restored
    /// to an earlier point (a dry run without --yes).
    Resync {
        #[arg(long)]
        config: PathBuf,
        /// SOURCE:DESTINATION, e.g. na:eu.
        #[arg(long)]
        link: String,
        /// Do it (without: print what would be done).
        #[arg(long)]
        yes: bool,
    },
    /// Initial sync: copy the rows a source already holds to a destination,
    /// filtered by the residency policy as streamed changes are, while
    /// writes continue (new links and new tables are copied without asking).
    Sync {
        #[command(subcommand)]
        command: SyncCommand,
    },
    /// Serve a live page for every region: lag matrix, lag over the last
    /// hour, throughput and slot retention.
    Dashboard {
        #[arg(long)]
        config: PathBuf,
        /// Where to serve the page.
        #[arg(long, default_value = "127.0.0.1:8470")]
        listen: std::net::SocketAddr,
        /// How often to ask the agents, milliseconds.
        #[arg(long, default_value_t = 2000)]
        interval_ms: u64,
        #[command(flatten)]
        thresholds: ThresholdArgs,
    },
}

#[derive(Subcommand)]
enum SyncCommand {
    /// Queue a copy over one link and follow it with a progress bar.
    Start {
        #[arg(long)]
        config: PathBuf,
        /// SOURCE:DESTINATION, e.g. na:eu.
        #[arg(long)]
        link: String,
        /// A table to copy (repeatable); every replicated table without it.
        #[arg(long = "table")]
        tables: Vec<String>,
        /// Return once queued instead of following the copy.
        #[arg(long)]
        detach: bool,
    },
    /// Rows and bytes copied per link and table, rate and time left.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a test CA and a certificate for each region
    /// (spiffe://meridian/region/<r>) and for one operator
    /// (spiffe://meridian/operator/<name>), and print the topology lines
    /// that use them. For tests, demos and first deployments; production
    /// certificates come from the platform's PKI in the same shape.
    Init {
        /// Regions, comma-separated (`na,eu,apac`).
        #[arg(long, value_delimiter = ',', required = true)]
        regions: Vec<String>,
        /// Folder to write into (created; an existing CA is never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// The operator's name.
        #[arg(long, default_value = "admin")]
        operator: String,
    },
}

#[derive(Subcommand)]
enum DeployCommand {
    /// Write a kustomize base and one overlay per region
    /// (`OUT/overlays/<region>`), with the topology and policy each
    /// region's agent reads; render again whenever the topology changes.
    Render {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// `REGION=CIDR`, for every region, repeatable: the addresses that
        /// region's agent connects from, as the other clusters see them
        /// (its NAT or egress gateway). Only these reach a peer's gRPC port.
        #[arg(long = "egress-cidr", required = true)]
        egress_cidr: Vec<String>,
        /// CIDR, repeatable: where operators run `meridian status`, the
        /// dashboard and `policy reload` from. Without it, operators reach
        /// agents through `kubectl port-forward` only.
        #[arg(long = "operator-cidr")]
        operator_cidr: Vec<String>,
        /// The agent image every region runs, `REPOSITORY:TAG` (this
        /// release's by default). A rolling upgrade renders with the new tag.
        #[arg(long)]
        image: Option<String>,
        /// Namespace of every object.
        #[arg(long, default_value = "meridian")]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum SlotsCommand {
    /// Drop the slots of regions no longer in the topology.
    Prune {
        #[arg(long)]
        config: PathBuf,
        /// Drop them (without: list what would be dropped).
        #[arg(long)]
        yes: bool,
    },
}

#[derive(clap::Args)]
struct ThresholdArgs {
    /// Lag (seconds) from which a link shows amber.
    #[arg(long, default_value_t = 5.0)]
    warn_seconds: f64,
    /// Lag (seconds) from which a link is unhealthy (red).
    #[arg(long, default_value_t = 30.0)]
    critical_seconds: f64,
}

impl ThresholdArgs {
    fn get(&self) -> status::Thresholds {
        status::Thresholds {
            warn_seconds: self.warn_seconds,
            critical_seconds: self.critical_seconds,
        }
    }
}

#[derive(Subcommand)]
enum PlacementCommand {
    /// Make REGION the tenant's home: a new epoch in the global database, then
    /// pushed to every region's store (the old home first). Exits non-zero if
    /// a region could not be told; rerun to repair. Existing rows do not move.
    Set {
        #[arg(long)]
        config: PathBuf,
        tenant: String,
        region: String,
    },
    /// Print a tenant's home region and epoch.
    Get {
        #[arg(long)]
        config: PathBuf,
        tenant: String,
        #[arg(long)]
        json: bool,
    },
    /// Print every placement.
    List {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DeadLetterCommand {
    /// Pending dead letters of every region (or one), oldest first.
    List {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: Option<String>,
        /// Also the replayed and discarded ones.
        #[arg(long)]
        all: bool,
        #[arg(long)]
        json: bool,
    },
    /// One dead letter: where it came from, why, and what it holds (no values).
    Show {
        #[arg(long)]
        config: PathBuf,
        /// The region whose store holds it.
        #[arg(long)]
        region: String,
        id: i64,
    },
    /// Apply a dead letter as it arrived, after fixing the cause. Replay
    /// oldest first: a replay writes the rows' images of that time.
    Replay {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        id: i64,
        /// Who replays it (default: $USER).
        #[arg(long)]
        by: Option<String>,
    },
    /// Give up on a dead letter; who and why are recorded.
    Discard {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        region: String,
        id: i64,
        /// Who discards it (default: $USER).
        #[arg(long)]
        by: Option<String>,
        /// Why (recorded with it).
        #[arg(long)]
        note: Option<String>,
    },
}

/// The operator's name for the record: --by, else $USER.
fn operator(by: Option<String>) -> String {
    by.or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file against a topology; every problem is reported
    /// as file:line:column. Hash rules need MERIDIAN_POLICY_HASH_KEY set.
    Check {
        file: PathBuf,
        /// Topology file (regions and replicated tables).
        #[arg(long)]
        config: PathBuf,
        /// Also check tables and columns against a live store (postgres:// URL).
        #[arg(long)]
        against: Option<String>,
    },
    /// What changing the policy from OLD to NEW does to each route (table,
    /// source -> destination): what is newly sent, what no longer is, and
    /// what a reload will do about it. Run before `policy reload`.
    Diff {
        old: PathBuf,
        new: PathBuf,
        #[arg(long)]
        config: PathBuf,
    },
    /// Make the agents re-read the residency policy file (as SIGHUP does).
    /// An invalid file is refused by each agent and its policy stays.
    Reload {
        #[arg(long)]
        config: PathBuf,
        /// Only this region's agent (default: every region).
        #[arg(long)]
        region: Option<String>,
    },
    /// Show what of one row would cross to a destination, column by column,
    /// and which rule decided.
    Explain {
        file: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// schema.table
        #[arg(long)]
        table: String,
        /// The row as a JSON object of column values (PostgreSQL text forms).
        #[arg(long)]
        row: String,
        /// Region the change is captured in (used as home when the row has no home value).
        #[arg(long)]
        from: String,
        /// Destination region.
        #[arg(long)]
        to: String,
    },
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // the rendered report: every cause, no backtrace
            eprintln!("error: {e:#}");
            match e.downcast_ref::<status::Drifted>() {
                Some(_) => std::process::ExitCode::from(status::Drifted::EXIT_CODE),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,sqlx::postgres::notice=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Agent { config, region } => {
                let topology = meridian_agent::load_topology(&config)?;
                topology
                    .region(&region)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| {
                        format!("--region {region} does not match {}", config.display())
                    })?;
                let shutdown = shutdown_on_signal();
                meridian_agent::run(topology, &region, shutdown).await
            }
            Command::Demo {
                duration,
                transport,
            } => demo::run(duration, &transport).await,
            Command::Policy {
                command: PolicyCommand::Reload { config, region },
            } => policy::reload(&config, region.as_deref()).await,
            Command::Policy {
                command: PolicyCommand::Diff { old, new, config },
            } => policy::diff(&old, &new, &config),
            Command::Policy {
                command:
                    PolicyCommand::Check {
                        file,
                        config,
                        against,
                    },
            } => policy::check(&file, &config, against.as_deref()).await,
            Command::Policy {
                command:
                    PolicyCommand::Explain {
                        file,
                        config,
                        table,
                        row,
                        from,
                        to,
                    },
            } => policy::explain(&file, &config, &table, &row, &from, &to),
            Command::Placement { command } => match command {
                PlacementCommand::Set {
                    config,
                    tenant,
                    region,
                } => placement::set(&config, &tenant, &region).await,
                PlacementCommand::Get {
                    config,
                    tenant,
                    json,
                } => placement::get(&config, &tenant, json).await,
                PlacementCommand::List { config, json } => placement::list(&config, json).await,
            },
            Command::Status {
                config,
                json,
                thresholds,
            } => status::run(&config, thresholds.get(), json).await,
            Command::Resync { config, link, yes } => resync::run(&config, &link, yes).await,
            Command::Sync {
                command:
                    SyncCommand::Start {
                        config,
                        link,
                        tables,
                        detach,
                    },
            } => sync::start(&config, &link, &tables, detach).await,
            Command::Sync {
                command: SyncCommand::Status { config, json },
            } => sync::status(&config, json).await,
            Command::Slots {
                command: SlotsCommand::Prune { config, yes },
            } => slots::prune(&config, yes).await,
            Command::Certs {
                command:
                    CertsCommand::Init {
                        regions,
                        out,
                        operator,
                    },
            } => certs_init(&regions, &out, &operator),
            Command::Deploy {
                command:
                    DeployCommand::Render {
                        config,
                        out,
                        egress_cidr,
                        operator_cidr,
                        image,
                        namespace,
                    },
            } => deploy::run(
                &config,
                &out,
                &deploy::Options {
                    namespace,
                    egress: deploy::parse_egress(&egress_cidr)?,
                    operators: deploy::parse_cidrs("--operator-cidr", operator_cidr)?,
                    image: image.unwrap_or_else(deploy::default_image),
                },
            ),
            Command::DeadLetters { command } => match command {
                DeadLetterCommand::List {
                    config,
                    region,
                    all,
                    json,
                } => dead_letters::list(&config, region.as_deref(), all, json).await,
                DeadLetterCommand::Show { config, region, id } => {
                    dead_letters::show(&config, &region, id).await
                }
                DeadLetterCommand::Replay {
                    config,
                    region,
                    id,
                    by,
                } => dead_letters::replay(&config, &region, id, &operator(by)).await,
                DeadLetterCommand::Discard {
                    config,
                    region,
                    id,
                    by,
                    note,
                } => {
                    dead_letters::discard(&config, &region, id, &operator(by), note.as_deref())
                        .await
                }
            },
            Command::Dashboard {
                config,
                listen,
                interval_ms,
                thresholds,
            } => {
                dashboard::run(
                    &config,
                    listen,
                    thresholds.get(),
                    std::time::Duration::from_millis(interval_ms.max(100)),
                )
                .await
            }
        }
    })
}

/// A watch that turns true on SIGINT or SIGTERM.
pub(crate) fn shutdown_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        let _ = tx.send(true);
    });
    rx
}

/// `meridian certs init`: writes the files and shows how to use them.
fn certs_init(regions: &[String], out: &std::path::Path, operator: &str) -> anyhow::Result<()> {
    let written = meridian_trust::certs::init(regions, operator, out)?;
    println!("wrote a test CA and certificates to {}:", out.display());
    println!(
        "  {}  (CA bundle every party trusts; ca-key.pem signs more: keep it safe)",
        written.ca.display()
    );
    for (id, cert, key) in &written.certs {
        println!("  {}  {}  ({})", cert.display(), key.display(), id.uri());
    }
    println!(
        "\ntopology lines (paths relative to the topology file's folder if it is not this one):"
    );
    for (id, cert, key) in &written.certs {
        let line = format!(
            "tls = {{ ca = {:?}, cert = {:?}, key = {:?} }}",
            written.ca.display().to_string(),
            cert.display().to_string(),
            key.display().to_string()
        );
        match id {
            meridian_trust::Identity::Region(r) => println!("[regions.{r}]     {line}"),
            meridian_trust::Identity::Operator(_) => println!("[operator]        {line}"),
        }
    }
    Ok(())
}
