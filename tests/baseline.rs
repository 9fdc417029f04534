//! One baseline for every region, and drift you can see: `meridian status`
//! compares agent versions, topology and policy files, migrations and
//! columns across regions (exit code 3 on drift), `meridian_config_hash`
//! lets an alert compare them, and the health endpoints (`/healthz`,
//! `/readyz`, `grpc.health.v1`) follow the store.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use meridian_testkit::{Deployment, Spec};
use meridian_trust::Identity;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

const POLICY: &str = r#"
version = 1

[[rules]]
name = "everywhere"
table = "public.events"
from = ["na", "eu", "apac"]
to = ["na", "eu", "apac"]
columns = { id = "keep", region = "keep", body = "keep" }
"#;

async fn start() -> anyhow::Result<Deployment> {
    Deployment::start(
        binary(),
        &Spec {
            regions: &["na", "eu", "apac"],
            schema: "CREATE TABLE events (id bigint PRIMARY KEY, region text NOT NULL, body text)",
            tables: &[("public.events", "id", "region")],
            proxied: &[],
            extra_topology: "[replication]\nheartbeat_ms = 200\n",
            policy: Some(POLICY),
            agent_env: &[],
            global_schema: None,
            kafka: false,
        },
    )
    .await
}

/// `meridian status --json`: (exit code, report).
fn status(d: &Deployment) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
    d.status(binary())
}

/// Polls `meridian status` until `done` holds for (exit code, report).
async fn wait_status(
    d: &Deployment,
    what: &str,
    done: impl Fn(Option<i32>, &serde_json::Value) -> bool,
) -> anyhow::Result<(Option<i32>, serde_json::Value)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, report) = status(d)?;
        if done(code, &report) {
            return Ok((code, report));
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: never; last exit code {code:?}, report {report:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn drift(report: &serde_json::Value) -> Vec<(String, String)> {
    report["drift"]
        .as_array()
        .expect("drift is a list")
        .iter()
        .map(|d| {
            (
                d["what"].as_str().unwrap_or_default().to_owned(),
                d["message"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn config_hash(d: &Deployment, region: &str, file: &str) -> anyhow::Result<f64> {
    d.metric(
        region,
        &format!(r#"meridian_config_hash{{region="{region}",file="{file}"}}"#),
    )
    .await?
    .ok_or_else(|| anyhow::anyhow!("no {file} hash in {region}'s metrics"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_policy_and_a_missing_migration_show_as_drift() -> anyhow::Result<()> {
    let mut d = start().await?;
    // alike at first: healthy, no drift, exit code 0
    let (_, report) = wait_status(&d, "healthy", |code, _| code == Some(0)).await?;
    assert_eq!(drift(&report), vec![], "{report:#}");
    let policy_na = config_hash(&d, "na", "policy").await?;
    assert!(policy_na > 0.0);
    assert_eq!(config_hash(&d, "eu", "policy").await?, policy_na);
    assert_eq!(
        config_hash(&d, "apac", "topology").await?,
        config_hash(&d, "na", "topology").await?
    );

    // eu runs with its own topology file naming another policy file
    let dir = d
        .config
        .parent()
        .expect("the topology has a folder")
        .to_owned();
    std::fs::write(
        dir.join("policy-eu.toml"),
        POLICY.replace("body = \"keep\"", "body = \"null\""),
    )?;
    let topology = std::fs::read_to_string(&d.config)?;
    assert!(topology.contains("policy = \"policy.toml\""), "{topology}");
    let eu_config = dir.join("topology-eu.toml");
    std::fs::write(
        &eu_config,
        topology.replace("policy = \"policy.toml\"", "policy = \"policy-eu.toml\""),
    )?;
    d.agent("eu").replace_binary(binary(), &eu_config)?;

    // apac's store lacks its newest migration
    let newest: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
        .fetch_one(d.pool("apac"))
        .await?;
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newest)
        .execute(d.pool("apac"))
        .await?;

    let (code, report) = wait_status(&d, "drift shown", |_, r| {
        let what: Vec<String> = drift(r).into_iter().map(|(w, _)| w).collect();
        ["topology", "policy", "migrations"]
            .iter()
            .all(|w| what.iter().any(|x| x == w))
    })
    .await?;
    let found = drift(&report);
    let message = |what: &str| {
        found
            .iter()
            .find(|(w, _)| w == what)
            .map(|(_, m)| m.clone())
            .unwrap_or_default()
    };
    assert!(
        message("policy").contains("apac, na have sha256")
            && message("policy").contains("eu have sha256"),
        "{found:?}"
    );
    assert!(message("topology").contains("eu have sha256"), "{found:?}");
    assert_eq!(
        message("migrations"),
        format!(
            "apac's store lacks migration(s) {newest} (the agent applies its migrations at start: run the release that carries them)"
        )
    );
    assert!(
        !found.iter().any(|(w, _)| w == "version" || w == "columns"),
        "{found:?}"
    );
    // healthy but drifted: exit code 3, told apart from an outage (1)
    assert_eq!(code, Some(3), "{report:#}");
    assert_eq!(report["healthy"], true, "{report:#}");
    // the text report warns too
    let text = Command::new(binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()?;
    let printed = String::from_utf8_lossy(&text.stdout);
    assert!(
        printed.contains("DRIFT (policy): residency policy files differ"),
        "{printed}"
    );
    assert_eq!(text.status.code(), Some(3));

    // and the metric lets an alert see it
    let deadline = Instant::now() + Duration::from_secs(30);
    while config_hash(&d, "eu", "policy").await? == policy_na {
        anyhow::ensure!(Instant::now() < deadline, "eu's policy hash never changed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(config_hash(&d, "apac", "policy").await?, policy_na);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_store_and_liveness_the_agent() -> anyhow::Result<()> {
    let d = start().await?;
    let addr = d.metrics_addr("eu").to_owned();
    let probe = |path: &'static str| {
        let addr = addr.clone();
        async move { meridian_testkit::http_get_status(&addr, path).await }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while probe("/readyz").await?.0 != 200 {
        anyhow::ensure!(Instant::now() < deadline, "eu never ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(probe("/healthz").await?, (200, "ok\n".to_owned()));

    // grpc.health.v1 on the gRPC port says the same, to any certificate of the CA
    let channel = d
        .channel_as(Identity::Operator("probe".into()), "eu")
        .await?;
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let serving = |service: &str| {
        let mut health = health.clone();
        let service = service.to_owned();
        async move {
            health
                .check(tonic_health::pb::HealthCheckRequest { service })
                .await
                .map(|r| r.into_inner().status)
        }
    };
    let serving_now = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    // it follows readiness once a second
    let deadline = Instant::now() + Duration::from_secs(10);
    while serving("").await? != serving_now {
        anyhow::ensure!(Instant::now() < deadline, "grpc health never serving");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        serving("meridian.replication.v1.Replication").await?,
        serving_now
    );

    // reflection lists the services, so grpcurl works with an operator certificate
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(
        d.channel_as(Identity::Operator("probe".into()), "eu")
            .await?,
    );
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([ask]))
        .await?
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(listed)) =
        answers.message().await?.and_then(|m| m.message_response)
    else {
        anyhow::bail!("reflection did not list services");
    };
    let names: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    for service in [
        "meridian.admin.v1.Admin",
        "meridian.replication.v1.Replication",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not in {names:?}"
        );
    }

    // the store goes away: not ready (with why), still live
    d.cluster("eu").crash()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (code, why) = loop {
        let (code, body) = probe("/readyz").await?;
        if code != 200 {
            break (code, body);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "eu still ready without its store"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(code, 503);
    assert!(why.contains("the store is unreachable"), "{why}");
    assert_eq!(probe("/healthz").await?.0, 200);
    let deadline = Instant::now() + Duration::from_secs(10);
    while serving("").await? == serving_now {
        anyhow::ensure!(Instant::now() < deadline, "grpc health still serving");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // back: ready again
    d.cluster("eu").restart()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe("/readyz").await?.0 != 200 {
        anyhow::ensure!(Instant::now() < deadline, "eu never ready again");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // a slot lost under the running agent: not ready, naming it
    let slot = "meridian_eu_to_na";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dropped = sqlx::raw_sql(&format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
              WHERE slot_name = '{slot}' AND active_pid IS NOT NULL;
             SELECT pg_drop_replication_slot('{slot}');"
        ))
        .execute(d.pool("eu"))
        .await;
        match dropped {
            Ok(_) => break,
            // the link reconnected in between: try again
            Err(e) => anyhow::ensure!(Instant::now() < deadline, "cannot drop {slot}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let why = loop {
        let (code, body) = probe("/readyz").await?;
        if code == 503 {
            break body;
        }
        anyhow::ensure!(Instant::now() < deadline, "eu still ready without {slot}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        why.contains("replication slot(s) missing or invalidated: meridian_eu_to_na"),
        "{why}"
    );
    assert_eq!(probe("/healthz").await?.0, 200);
    Ok(())
}
