//! The regional agent: one per region.
//!
//! - [`link`]: the outbound side. For each peer region, a link reads this
//!   region's changes from a dedicated slot and streams them as checksummed
//!   batches to the peer's agent, confirming the slot only past what the peer
//!   acknowledged as durably applied.
//! - [`receiver`]: the inbound side. A gRPC service that applies each peer's
//!   batches into this region's store through [`meridian_apply::Applier`].
//! - [`run`] wires both for one region and runs until shutdown.

/// How often both ends of a link ping an idle HTTP/2 connection, and how
/// long they wait for the answer before dropping it.
pub const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub mod admin;
mod baseline;
pub mod guards;
pub mod health;
pub mod heartbeat;
pub mod http;
mod inbound;
pub mod kafka;
pub mod lifecycle;
pub mod link;
pub mod metrics;
pub mod monitor;
pub mod privileges;
pub mod receiver;
mod reselect;
pub mod residency;
pub mod sync;
pub mod telemetry;
mod wire;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use anyhow::Context;
use link::Outbound;
use meridian_capture::{ensure_publication, publication_name, slot_name};
use meridian_core::topology::{Topology, Transport};
use meridian_proto::admin::admin_server::AdminServer;
use meridian_proto::replication::replication_server::ReplicationServer;
use sqlx::postgres::PgPoolOptions;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

/// Most concurrent gRPC streams on one connection (a peer's link holds
/// one; status calls are short).
const MAX_STREAMS_PER_CONNECTION: u32 = 16;

/// How often the agent looks for rotated certificate files (SIGHUP reloads
/// at once).
const TLS_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The agent's mTLS credentials, checked to speak for `region`, and kept
/// current as their files rotate; `None` under `[security] plaintext =
/// true`, with a warning.
fn credentials(
    me: &meridian_core::topology::Region,
    region: &str,
) -> anyhow::Result<Option<Arc<meridian_trust::tls::Live>>> {
    let Some(files) = &me.tls else {
        tracing::warn!(
            region,
            "[security] plaintext = true: peers and operators are not authenticated and \
             replication traffic is not encrypted; use this only on a closed test network"
        );
        return Ok(None);
    };
    let live = meridian_trust::tls::Live::load(meridian_trust::tls::Files {
        ca: files.ca.clone(),
        cert: files.cert.clone(),
        key: files.key.clone(),
    })
    .with_context(|| format!("regions.{region}.tls"))?;
    let identity = live.current().identity.clone();
    anyhow::ensure!(
        identity == meridian_trust::Identity::Region(region.to_owned()),
        "regions.{region}.tls: {} is a certificate for {identity}, not region {region} \
         (its SPIFFE ID must be {})",
        files.cert.display(),
        meridian_trust::Identity::Region(region.to_owned()).uri()
    );
    let live = Arc::new(live);
    let watched = live.clone();
    let region = region.to_owned();
    tokio::spawn(async move {
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(TLS_RELOAD_INTERVAL);
        loop {
            let forced = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async { match &mut hangup { Some(h) => h.recv().await, None => None } } => true,
            };
            match watched.reload_if_changed(forced) {
                Ok(true) => {
                    tracing::info!(region, "TLS certificate reloaded; new connections use it")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(region, error = %format!("{e:#}"), "TLS files not reloaded; the current ones stay in use")
                }
            }
        }
    });
    Ok(Some(live))
}

/// Reads a topology file and applies environment overrides.
pub fn load_topology(path: &Path) -> anyhow::Result<Topology> {
    Ok(Topology::load(path)?)
}

/// Runs `region`'s agent until `shutdown` turns true: prepares the store
/// (migrations, publication, one slot per peer), serves peers, and runs one
/// outbound link per peer.
pub async fn run(
    topology: Topology,
    region: &str,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let me = topology.region(region).map_err(anyhow::Error::msg)?.clone();
    let store = me.store.expose().to_owned();
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect(&store)
        .await
        .with_context(|| format!("cannot connect to region {region}'s store {}", me.store))?;
    let tables: Vec<String> = topology.tables.iter().map(|t| t.name.clone()).collect();
    let held = privileges::held(&pool, &tables)
        .await
        .with_context(|| format!("reading the privileges of region {region}'s store role"))?;
    let missing = privileges::missing(&held);
    if !missing.is_empty() {
        anyhow::bail!(
            "region {region}'s store role {:?} lacks what the agent needs (run these as the tables' owner or a superuser):\n  {}",
            held.role,
            missing.join("\n  ")
        );
    }
    let columns = residency::store_columns(&pool, &topology.tables)
        .await
        .with_context(|| format!("reading the replicated tables of region {region}'s store"))?;
    let policy = residency::load(&topology, &columns)?;
    let (refused, warnings) = residency::topics_at_rest(&topology, policy.is_some());
    if !refused.is_empty() {
        anyhow::bail!(
            "the topology keeps Kafka topics where the residency policy does not allow:\n{}",
            refused.join("\n")
        );
    }
    for w in warnings {
        tracing::warn!(region, "{w}");
    }
    match &policy {
        Some(p) => tracing::info!(region, version = p.version(), "residency policy loaded"),
        None => tracing::warn!(
            region,
            "no residency policy in the topology: every replicated row crosses to every peer"
        ),
    }
    let policy: residency::SharedPolicy = Arc::new(std::sync::RwLock::new(policy.map(Arc::new)));
    meridian_apply::migrate(&pool)
        .await
        .with_context(|| format!("migrating region {region}'s store"))?;
    residency::reload_on_hangup(
        topology.clone(),
        columns.clone(),
        policy.clone(),
        pool.clone(),
        region.to_owned(),
    );
    let publication = publication_name(region);
    ensure_publication(&pool, &publication, &topology.tables)
        .await
        .with_context(|| format!("preparing region {region}'s store for capture"))?;
    let peers: Vec<String> = topology
        .regions
        .keys()
        .filter(|r| *r != region)
        .cloned()
        .collect();
    for peer in &peers {
        let slot = slot_name(region, peer);
        let queueing = || format!("queueing the initial sync of link {region} -> {peer}");
        if lifecycle::slot_is_new(&pool, &slot).await? {
            sync::queue_new_link(&pool, peer, &topology.tables)
                .await
                .with_context(queueing)?;
        }
        let created = lifecycle::prepare_slot(&pool, &slot)
            .await
            .with_context(|| format!("creating the slot for link {region} -> {peer}"))?;
        sync::queue_at_start(&pool, region, peer, &topology.tables, created)
            .await
            .with_context(queueing)?;
    }
    // a policy changed while the agent was down: copy the routes it changed
    residency::queue_policy_changes(
        &pool,
        &topology,
        region,
        residency::current(&policy).as_deref(),
    )
    .await
    .with_context(|| format!("queueing the copies of region {region}'s policy changes"))?;
    let global_tables = residency::current(&policy)
        .map(|p| p.policy().global.clone())
        .unwrap_or_default();
    guards::install(&pool, &topology.tables, &global_tables)
        .await
        .with_context(|| format!("attaching routed-write guards in region {region}'s store"))?;
    let telemetry = Arc::new(telemetry::Telemetry::new(region, &peers));
    telemetry.set_config_hash("topology", &topology.sha256);
    let heartbeats = tokio::spawn(heartbeat::run(
        pool.clone(),
        std::time::Duration::from_millis(topology.replication.heartbeat_ms),
        telemetry.clone(),
        shutdown.clone(),
    ));
    let acked: Vec<Arc<AtomicU64>> = peers.iter().map(|_| Arc::default()).collect();
    // its own connection, so a busy pool never makes readiness flap
    let monitor_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(std::time::Duration::from_secs(3))
        .connect_lazy(&store)
        .with_context(|| format!("region {region}'s store URL"))?;
    let monitor = tokio::spawn(monitor::run(
        monitor_pool,
        peers
            .iter()
            .zip(&acked)
            .map(|(peer, acked)| monitor::Watched {
                destination: peer.clone(),
                slot: slot_name(region, peer),
                acked: acked.clone(),
            })
            .collect(),
        peers.clone(),
        telemetry.clone(),
        policy.clone(),
        std::time::Duration::from_secs(1),
        shutdown.clone(),
    ));
    let audit = Arc::new(residency::Audit::new(telemetry.clone()));
    let audit_task = tokio::spawn(audit.clone().run(
        pool.clone(),
        region.to_owned(),
        std::time::Duration::from_secs(2),
        shutdown.clone(),
    ));

    let keys = topology.keys();
    let message_limit = topology.replication.message_limit();
    let tls = credentials(&me, region)?;
    let listener = tokio::net::TcpListener::bind(&me.listen)
        .await
        .with_context(|| format!("cannot listen on {} (regions.{region}.listen)", me.listen))?;
    tracing::info!(region, listen = %me.listen, "agent started");
    let service = receiver::ReplicationService::new(
        region,
        &store,
        pool.clone(),
        topology.regions.keys().cloned(),
        policy.clone(),
        telemetry.clone(),
        receiver::Admission {
            keys: Arc::new(keys.clone()),
            tls: tls.is_some(),
            message_limit,
        },
    );
    let server = ReplicationServer::new(service)
        .max_decoding_message_size(message_limit)
        .max_encoding_message_size(message_limit);
    let mut server_shutdown = shutdown.clone();
    // grpc.health.v1 follows readiness; reflection lets grpcurl list the services
    let (reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(report_health(reporter, telemetry.clone(), shutdown.clone()));
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(meridian_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the gRPC reflection service")?;
    let router = tonic::transport::Server::builder()
        // a peer gone without FIN or RST is noticed within ~40 s
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        // at most a window of batches in flight per stream, a few streams per peer
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .add_service(server)
        .add_service(AdminServer::new(admin::AdminService {
            region: region.to_owned(),
            topology: topology.clone(),
            policy: policy.clone(),
            columns: columns.clone(),
            telemetry: telemetry.clone(),
            tls: tls.is_some(),
            pool: pool.clone(),
        }))
        .add_service(health_service)
        .add_service(reflection);
    let stopped = async move {
        let _ = server_shutdown.wait_for(|s| *s).await;
    };
    let server = match &tls {
        Some(live) => {
            let t = telemetry.clone();
            let incoming = meridian_trust::net::incoming(
                listener,
                live.clone(),
                meridian_trust::net::Limits::default(),
                Arc::new(move |reason| t.refused(reason)),
            );
            tokio::spawn(router.serve_with_incoming_shutdown(incoming, stopped))
        }
        None => tokio::spawn(
            router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped),
        ),
    };
    if let Some(addr) = &me.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on {addr} (regions.{region}.metrics)"))?;
        tokio::spawn(metrics::serve(
            listener,
            telemetry.clone(),
            shutdown.clone(),
        ));
    }
    // the cluster of a Kafka link (validated when the topology was read)
    let cluster = |source: &str, destination: &str| -> anyhow::Result<kafka::Cluster> {
        let k = topology
            .kafka
            .as_ref()
            .expect("validated: [kafka] is present");
        let site = topology
            .kafka_site(source, destination)
            .expect("validated: every Kafka link has a cluster");
        Ok(kafka::Cluster {
            security: kafka::Security::of(&site.cluster, site.region.as_deref())?,
            brokers: site.cluster.brokers,
            topic_prefix: k.topic_prefix.clone(),
            partitions: k.partitions(),
            replication_factor: k.replication_factor,
            retention_hours: k.retention_hours,
            whole_transactions: k.order == meridian_core::topology::KafkaOrder::Transaction,
        })
    };
    // every Kafka link's cluster and secrets, before any link starts
    let mut inbound_clusters = std::collections::BTreeMap::new();
    let mut outbound_clusters = std::collections::BTreeMap::new();
    for peer in &peers {
        if topology.transport(peer, region) == Transport::Kafka {
            inbound_clusters.insert(peer.clone(), cluster(peer, region)?);
        }
        if topology.transport(region, peer) == Transport::Kafka {
            outbound_clusters.insert(peer.clone(), cluster(region, peer)?);
        }
    }
    let mut links: Vec<_> = peers
        .iter()
        .filter(|peer| topology.transport(peer, region) == Transport::Kafka)
        .map(|peer| {
            let inbound = kafka::KafkaInbound {
                source: peer.clone(),
                destination: region.to_owned(),
                store: store.clone(),
                cluster: inbound_clusters[peer].clone(),
                policy: policy.clone(),
                keys: Arc::new(keys.clone()),
                telemetry: telemetry.clone(),
                waiting: Default::default(),
            };
            tokio::spawn(inbound.run(shutdown.clone()))
        })
        .collect();
    links.extend(peers.iter().zip(acked).map(|(peer, acked)| {
        if topology.transport(region, peer) == Transport::Kafka {
            let link = kafka::KafkaLink {
                source: region.to_owned(),
                destination: peer.clone(),
                store: store.clone(),
                slot: slot_name(region, peer),
                publication: publication.clone(),
                cluster: outbound_clusters[peer].clone(),
                policy: policy.clone(),
                audit: audit.clone(),
                keys: keys.clone(),
                telemetry: telemetry.clone(),
                acked,
                tables: topology.tables.clone(),
            };
            tokio::spawn(link.run(shutdown.clone()))
        } else {
            let link = link::Link {
                source: region.to_owned(),
                destination: peer.clone(),
                store: store.clone(),
                peer_addr: topology.regions[peer].connect_addr().to_owned(),
                tls: tls.clone(),
                slot: slot_name(region, peer),
                publication: publication.clone(),
                batch_max_changes: topology.replication.batch_max_changes,
                message_limit,
                max_change_bytes: topology.replication.max_change_bytes,
                window: topology.replication.window,
                compress: topology.replication.compression
                    == meridian_core::topology::Compression::Zstd,
                policy: policy.clone(),
                audit: audit.clone(),
                telemetry: telemetry.clone(),
                acked,
                keys: keys.clone(),
                tables: topology.tables.clone(),
            };
            tokio::spawn(link.run(shutdown.clone()))
        }
    }));
    let _ = shutdown.wait_for(|s| *s).await;
    for l in links {
        let _ = l.await;
    }
    let _ = audit_task.await;
    let _ = heartbeats.await;
    let _ = monitor.await;
    pool.close().await;
    server.await?.context("gRPC server failed")?;
    tracing::info!(region, "agent stopped");
    Ok(())
}

/// Keeps `grpc.health.v1` in step with readiness ([`health::Health::ready`]),
/// for the whole server (`""`) and the replication service, once a second.
async fn report_health(
    reporter: tonic_health::server::HealthReporter,
    telemetry: Arc<telemetry::Telemetry>,
    mut shutdown: watch::Receiver<bool>,
) {
    use tonic_health::ServingStatus;
    const REPLICATION: &str = "meridian.replication.v1.Replication";
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let status = match telemetry.health.ready() {
            Ok(()) => ServingStatus::Serving,
            Err(_) => ServingStatus::NotServing,
        };
        for service in ["", REPLICATION] {
            reporter.set_service_status(service, status).await;
        }
    }
}
