//! Trust between regions, against real agents over mTLS: who may connect,
//! who may speak for which region, and what even a region's own certificate
//! cannot make a receiver write.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use meridian_core::change::{Change, ChangeKind, Column, Table, Value};
use meridian_core::{Lsn, Transaction, codec};
use meridian_proto::admin::{ReloadPolicyRequest, StatusRequest, admin_client::AdminClient};
use meridian_proto::replication::{
    Batch, Hello, SourceMessage, destination_message, replication_client::ReplicationClient,
    source_message,
};
use meridian_testkit::{Deployment, Spec};
use meridian_trust::Identity;
use meridian_trust::certs::{Authority, Validity};

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

const SCHEMA: &str = "CREATE TABLE orders (id bigint PRIMARY KEY, region text NOT NULL, note text)";

async fn start() -> anyhow::Result<Deployment> {
    Deployment::start(binary(), &spec("")).await
}

/// na and eu replicating `orders`, with `extra_topology`.
fn spec(extra_topology: &str) -> Spec<'_> {
    Spec {
        regions: &["na", "eu"],
        schema: SCHEMA,
        tables: &[("public.orders", "id", "region")],
        proxied: &[],
        extra_topology,
        policy: None,
        agent_env: &[],
        global_schema: None,
        kafka: false,
    }
}

async fn count(d: &Deployment, region: &str, sql: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(d.pool(region)).await?)
}

async fn wait_for(d: &Deployment, region: &str, sql: &str, want: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = count(d, region, sql).await?;
        if n == want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{sql} in {region}: {n}, expected {want}\n{}",
            d.agent_log(region)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `eu`'s count of refusals for `reason`.
async fn refused(d: &Deployment, reason: &str) -> anyhow::Result<f64> {
    Ok(d.metric(
        "eu",
        &format!("meridian_refused_total{{reason=\"{reason}\"}}"),
    )
    .await?
    .unwrap_or(0.0))
}

async fn wait_refused(d: &Deployment, reason: &str, at_least: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while refused(d, reason).await? < at_least {
        anyhow::ensure!(
            Instant::now() < deadline,
            "no refusal counted for {reason}:\n{}",
            d.metrics("eu").await?
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// na's slot incarnation, as eu recorded it from the real na.
async fn na_incarnation(d: &Deployment) -> anyhow::Result<String> {
    d.incarnation("na", "eu").await
}

/// Batch `seq` of `transactions`, sealed for `incarnation` as a sender
/// claiming `wal_end` as its WAL end (the batch's own end when `None`).
fn sealed(
    seq: u64,
    transactions: &[Transaction],
    incarnation: &str,
    wal_end: Option<u64>,
) -> Batch {
    let end_lsn = transactions.last().map_or(0, |t| t.end_lsn.0);
    meridian_testkit::sealed_batch(
        seq,
        codec::encode(transactions),
        end_lsn,
        wal_end.unwrap_or(end_lsn),
        incarnation,
    )
}

/// Sends `batch` as na on a new stream to eu; the Nack's reason.
async fn refused_as_na(d: &Deployment, incarnation: &str, batch: Batch) -> anyhow::Result<String> {
    send_as_na(
        d.channel_as(Identity::Region("na".into()), "eu").await?,
        incarnation,
        vec![batch],
    )
    .await
    .map_err(anyhow::Error::msg)?
    .ok_or_else(|| anyhow::anyhow!("the batch was taken, not refused"))
}

/// Opens a replication stream to eu as `na` (a Hello with `incarnation`)
/// and sends `batches`; the first Nack's reason, or the error that ended
/// the call.
async fn send_as_na(
    channel: tonic::transport::Channel,
    incarnation: &str,
    batches: Vec<Batch>,
) -> Result<Option<String>, String> {
    let mut messages = vec![SourceMessage {
        kind: Some(source_message::Kind::Hello(Hello {
            source_region: "na".into(),
            destination_region: "eu".into(),
            incarnation: incarnation.to_owned(),
        })),
    }];
    for batch in batches {
        messages.push(SourceMessage {
            kind: Some(source_message::Kind::Batch(batch)),
        });
    }
    let mut replies = ReplicationClient::new(channel)
        .replicate(futures::stream::iter(messages))
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    while let Some(m) = replies
        .message()
        .await
        .map_err(|e| e.message().to_owned())?
    {
        if let Some(destination_message::Kind::Nack(n)) = m.kind {
            return Ok(Some(n.reason));
        }
    }
    Ok(None)
}

fn table(schema: &str, name: &str, columns: &[(&str, bool)]) -> Arc<Table> {
    Arc::new(Table {
        schema: schema.into(),
        name: name.into(),
        columns: columns
            .iter()
            .map(|(n, key)| Column {
                name: (*n).into(),
                type_oid: 25,
                key: *key,
            })
            .collect(),
    })
}

fn transaction(end_lsn: u64, changes: Vec<Change>) -> Transaction {
    Transaction {
        commit_lsn: Lsn(end_lsn - 8),
        end_lsn: Lsn(end_lsn),
        commit_time: 0,
        changes,
        continues: false,
        token: None,
    }
}

fn text(v: &str) -> Value {
    Value::Text(v.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_certificates_of_the_ca_that_speak_for_the_source_get_in() -> anyhow::Result<()> {
    let d = start().await?;
    sqlx::raw_sql("INSERT INTO orders VALUES (1, 'na', 'first')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 1).await?;
    let ca = d.authority.as_ref().expect("the deployment runs mTLS");
    let na = Identity::Region("na".into());

    // plain TCP: no TLS at all
    let plain = d.channel_with(None, "eu").await;
    if let Ok(channel) = plain {
        assert!(send_as_na(channel, "", vec![]).await.is_err());
    }
    wait_refused(&d, "not_tls", 1.0).await?;

    // a certificate for na from a CA eu does not trust
    let stranger = Authority::new("not the deployment's CA")?;
    let (cert, key) = stranger.issue(&na, Validity::default())?;
    let creds = d.credentials(&ca.pem(), &cert, &key)?;
    if let Ok(channel) = d.channel_with(Some(&creds), "eu").await {
        assert!(send_as_na(channel, "", vec![]).await.is_err());
    }
    wait_refused(&d, "unknown_ca", 1.0).await?;

    // an expired certificate for na from the right CA
    let old = Validity {
        not_before: (2020, 1, 1),
        not_after: (2021, 1, 1),
    };
    let (cert, key) = ca.issue(&na, old)?;
    let creds = d.credentials(&ca.pem(), &cert, &key)?;
    if let Ok(channel) = d.channel_with(Some(&creds), "eu").await {
        assert!(send_as_na(channel, "", vec![]).await.is_err());
    }
    wait_refused(&d, "expired", 1.0).await?;

    // a valid certificate of another region claiming to be na
    let apac = d.channel_as(Identity::Region("apac".into()), "eu").await?;
    let e = send_as_na(apac, "", vec![]).await.unwrap_err();
    assert!(
        e.contains("certificate is for region apac; only region na's agent may send"),
        "{e}"
    );
    wait_refused(&d, "wrong_region", 1.0).await?;
    // an operator's certificate is not a region's
    let operator = d
        .channel_as(Identity::Operator("alice".into()), "eu")
        .await?;
    let e = send_as_na(operator, "", vec![]).await.unwrap_err();
    assert!(e.contains("operator alice"), "{e}");
    wait_refused(&d, "not_a_region", 1.0).await?;

    // none of it touched the link: na's rows still arrive
    sqlx::raw_sql("INSERT INTO orders VALUES (2, 'na', 'second')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 2).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_needs_a_certificate_and_policy_reload_an_operators() -> anyhow::Result<()> {
    let d = start().await?;
    let region = d.channel_as(Identity::Region("na".into()), "eu").await?;
    let reply = AdminClient::new(region.clone())
        .status(StatusRequest {})
        .await?
        .into_inner();
    assert_eq!(reply.region, "eu");
    let e = AdminClient::new(region)
        .reload_policy(ReloadPolicyRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert!(
        e.message().contains("needs an operator certificate"),
        "{e:?}"
    );
    wait_refused(&d, "not_an_operator", 1.0).await?;

    let operator = d
        .channel_as(Identity::Operator("alice".into()), "eu")
        .await?;
    let reply = AdminClient::new(operator)
        .reload_policy(ReloadPolicyRequest {})
        .await?
        .into_inner();
    assert_eq!(reply.region, "eu");
    // the CLI presents the topology's [operator] certificate
    let out = std::process::Command::new(binary())
        .args(["status", "--config"])
        .arg(&d.config)
        .output()?;
    let shown = String::from_utf8_lossy(&out.stdout);
    for region in ["na", "eu"] {
        assert!(
            shown
                .lines()
                .any(|l| l.starts_with(&format!("{region} ")) && l.contains(" up ")),
            "{shown}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Review finding 2, from a peer that holds na's own certificate (stolen,
/// or a misconfigured staging agent): it can still not write what eu's
/// topology does not replicate, nor choose the key columns rows are
/// matched and deleted by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn even_the_sources_certificate_cannot_write_outside_the_topology() -> anyhow::Result<()> {
    let mut d = start().await?;
    sqlx::raw_sql("INSERT INTO orders SELECT g, 'na', 'kept' FROM generate_series(1, 20) g")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 20).await?;
    d.agent("na").kill9();
    let before: i64 = count(
        &d,
        "eu",
        "SELECT end_lsn FROM meridian.watermarks WHERE source_region = 'na'",
    )
    .await?;
    let incarnation = na_incarnation(&d).await?;

    // a write to Meridian's own watermark table
    let watermarks = table(
        "meridian",
        "watermarks",
        &[("source_region", true), ("end_lsn", false)],
    );
    let forged = transaction(
        before as u64 + 1_000,
        vec![Change {
            table: watermarks,
            kind: ChangeKind::Insert {
                new: vec![text("na"), text(&i64::MAX.to_string())],
            },
        }],
    );
    let nack = refused_as_na(&d, &incarnation, sealed(1, &[forged], &incarnation, None)).await?;
    assert!(
        nack.contains("\"meridian.watermarks\" is not replicated by this region's topology"),
        "{nack}"
    );

    // a delete keyed by the home column: would match every na row
    let by_home = table(
        "public",
        "orders",
        &[("id", false), ("region", true), ("note", false)],
    );
    let forged = transaction(
        before as u64 + 2_000,
        vec![Change {
            table: by_home,
            kind: ChangeKind::Delete {
                old: vec![Value::Null, text("na"), Value::Null],
            },
        }],
    );
    let nack = refused_as_na(&d, &incarnation, sealed(1, &[forged], &incarnation, None)).await?;
    assert!(
        nack.contains("marks [\"region\"] as its key columns"),
        "{nack}"
    );

    assert_eq!(count(&d, "eu", "SELECT count(*) FROM orders").await?, 20);
    let after: i64 = count(
        &d,
        "eu",
        "SELECT end_lsn FROM meridian.watermarks WHERE source_region = 'na'",
    )
    .await?;
    assert_eq!(after, before, "no forged batch moved the watermark");
    // the real na comes back and carries on where it was
    d.agent("na").restart()?;
    sqlx::raw_sql("INSERT INTO orders VALUES (21, 'na', 'after')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 21).await?;
    Ok(())
}

/// Certificates rotate without a restart: eu moves to a certificate of a
/// new CA (every bundle already trusts both), SIGHUP, and the next
/// connection from na uses it; a client that trusts only the old CA can no
/// longer reach eu.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_on_sighup_without_a_restart() -> anyhow::Result<()> {
    let mut d = start().await?;
    let certs = d.config.parent().expect("a folder").join("certs");
    let old_ca = d.authority.as_ref().expect("mTLS").pem();
    let next = Authority::new("next CA")?;
    // first every party trusts both CAs
    std::fs::write(certs.join("ca.pem"), format!("{old_ca}{}", next.pem()))?;
    d.agent("na").hangup()?;
    d.agent("eu").hangup()?;
    // then eu takes a certificate of the new CA
    let eu = Identity::Region("eu".into());
    let (cert, key) = next.issue(&eu, Validity::default())?;
    std::fs::write(certs.join("eu.pem"), cert)?;
    std::fs::write(certs.join("eu-key.pem"), key)?;
    d.agent("eu").hangup()?;
    // a client trusting only the old CA is soon refused: eu serves the new
    // certificate, without a restart
    let (cert, key) = d
        .authority
        .as_ref()
        .expect("mTLS")
        .issue(&Identity::Region("na".into()), Validity::default())?;
    let old_only = d.credentials(&old_ca, &cert, &key)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while d.channel_with(Some(&old_only), "eu").await.is_ok() {
        anyhow::ensure!(Instant::now() < deadline, "{}", d.agent_log("eu"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(d.agent_log("eu").contains("TLS certificate reloaded"));
    // na's link reconnects (its agent restarts) and goes on
    d.agent("na").restart()?;
    sqlx::raw_sql("INSERT INTO orders VALUES (7, 'na', 'rotated')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders WHERE id = 7", 1).await?;
    Ok(())
}

/// Idle clients cannot take an agent's file descriptors: 10,000 connections
/// to eu's metrics port that never send a request, and replication goes on;
/// scrapes are answered again once the idle ones time out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_idle_connections_to_the_metrics_port_do_not_stop_replication()
-> anyhow::Result<()> {
    let mut d = start().await?;
    let topology = meridian_core::topology::Topology::load(&d.config)?;
    let metrics = topology.regions["eu"]
        .metrics
        .clone()
        .expect("the kit gives every agent a metrics port");
    // 10,000, or as many as this process may open (a machine with a lower
    // descriptor limit still gets far more than the agent's cap of 256)
    let allowed = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(10_500);
    let clients = 10_000.min(allowed.saturating_sub(500));
    assert!(clients >= 2_000, "only {allowed} descriptors allowed");
    let mut idle = Vec::with_capacity(clients);
    for _ in 0..clients {
        idle.push(tokio::net::TcpStream::connect(&metrics).await?);
    }
    // the agent holds a bounded number of them, not one descriptor each
    let pid = d.agent("eu").pid();
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    assert!(open < 1_000, "eu's agent holds {open} file descriptors");
    sqlx::raw_sql("INSERT INTO orders SELECT g, 'na', 'during' FROM generate_series(1, 100) g")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 100).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let scraped = loop {
        match d.metrics("eu").await {
            Ok(text) => break text,
            Err(e) => anyhow::ensure!(Instant::now() < deadline, "no scrape answered: {e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(scraped.contains("meridian_agent_info"), "{scraped}");
    drop(idle);
    Ok(())
}

/// Stores that accept only TLS: agents connect to them (SQL and the
/// replication connection) with `sslmode=verify-full` against the region's
/// `ca`, and an agent given the wrong CA refuses its store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_verify_their_stores_over_tls() -> anyhow::Result<()> {
    let mut d = Deployment::start_with_tls_stores(binary(), &spec("")).await?;
    sqlx::raw_sql("INSERT INTO orders VALUES (1, 'na', 'over tls')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 1).await?;
    // the walsenders serving na's links are TLS sessions
    let plain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE NOT s.ssl",
    )
    .fetch_one(d.pool("na"))
    .await?;
    let tls: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE s.ssl",
    )
    .fetch_one(d.pool("na"))
    .await?;
    assert_eq!((plain, tls), (0, 1));

    // na's agent given eu's CA for na's store: it does not connect
    let text = std::fs::read_to_string(&d.config)?;
    let na_ca = d
        .cluster("na")
        .ca_path()
        .expect("tls")
        .display()
        .to_string();
    let eu_ca = d
        .cluster("eu")
        .ca_path()
        .expect("tls")
        .display()
        .to_string();
    let wrong = text.replacen(
        &format!("ca = \"{na_ca}\""),
        &format!("ca = \"{eu_ca}\""),
        1,
    );
    assert_ne!(wrong, text);
    std::fs::write(&d.config, wrong)?;
    d.agent("na").restart()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !d
        .agent_log("na")
        .contains("cannot connect to region na's store")
    {
        anyhow::ensure!(Instant::now() < deadline, "{}", d.agent_log("na"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = d.agent_log("na");
    assert!(
        log.contains("UnknownIssuer")
            || log.contains("unknown issuer")
            || log.contains("certificate"),
        "{log}"
    );
    Ok(())
}

/// The agent's store role as the README documents it: no superuser, only
/// what the agent needs.
const LEAST_PRIVILEGE: &str = "
CREATE ROLE app_owner;
ALTER TABLE orders OWNER TO app_owner;
CREATE ROLE meridian_agent LOGIN REPLICATION;
GRANT app_owner TO meridian_agent;
GRANT CREATE ON DATABASE postgres TO meridian_agent;
GRANT CREATE ON SCHEMA public TO meridian_agent;
GRANT SET ON PARAMETER session_replication_role TO meridian_agent;
GRANT EXECUTE ON FUNCTION pg_replication_origin_create(text),
                          pg_replication_origin_session_setup(text) TO meridian_agent;
";

/// Agents replicate both ways as a role that is not a superuser, and an
/// agent whose role lost a privilege says which, and how to grant it, at
/// start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_run_as_a_least_privilege_role_and_name_what_is_missing() -> anyhow::Result<()> {
    let schema = format!("{SCHEMA};\n{LEAST_PRIVILEGE}");
    let mut d = Deployment::start_as_store_user(
        binary(),
        &Spec {
            schema: &schema,
            ..spec("")
        },
        "meridian_agent",
    )
    .await?;
    sqlx::raw_sql("INSERT INTO orders VALUES (1, 'na', 'from na')")
        .execute(d.pool("na"))
        .await?;
    sqlx::raw_sql("INSERT INTO orders VALUES (2, 'eu', 'from eu')")
        .execute(d.pool("eu"))
        .await?;
    for region in ["na", "eu"] {
        wait_for(&d, region, "SELECT count(*) FROM orders", 2).await?;
    }
    let sessions: i64 = count(
        &d,
        "eu",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'meridian_agent'",
    )
    .await?;
    assert!(sessions > 0, "eu's agent logs in as meridian_agent");
    let superuser: bool =
        sqlx::query_scalar("SELECT rolsuper FROM pg_roles WHERE rolname = 'meridian_agent'")
            .fetch_one(d.pool("eu"))
            .await?;
    assert!(!superuser);

    sqlx::raw_sql("REVOKE SET ON PARAMETER session_replication_role FROM meridian_agent")
        .execute(d.pool("eu"))
        .await?;
    d.agent("eu").restart()?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let wanted = "GRANT SET ON PARAMETER session_replication_role TO \"meridian_agent\";";
    while !d.agent_log("eu").contains(wanted) {
        anyhow::ensure!(Instant::now() < deadline, "{}", d.agent_log("eu"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Review finding 2, attack 4, from na's own certificate: a Hello and then
/// silence holds no lock the real na waits behind; na's next stream takes
/// over and its rows arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_and_silence_does_not_hold_back_the_real_source() -> anyhow::Result<()> {
    let mut d = start().await?;
    sqlx::raw_sql("INSERT INTO orders VALUES (1, 'na', 'before')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 1).await?;
    d.agent("na").kill9();
    let channel = d.channel_as(Identity::Region("na".into()), "eu").await?;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(SourceMessage {
        kind: Some(source_message::Kind::Hello(Hello {
            source_region: "na".into(),
            destination_region: "eu".into(),
            incarnation: na_incarnation(&d).await?,
        })),
    })
    .await?;
    let silent = ReplicationClient::new(channel)
        .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?;
    // the silent stream got its Welcome and holds eu's session for na
    let mut silent = silent.into_inner();
    assert!(matches!(
        silent.message().await?.and_then(|m| m.kind),
        Some(destination_message::Kind::Welcome(_))
    ));
    d.agent("na").restart()?;
    sqlx::raw_sql("INSERT INTO orders VALUES (2, 'na', 'after')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 2).await?;
    drop(tx);
    Ok(())
}

/// Messages are bounded by the topology (`batch_max_changes`,
/// `max_change_bytes`), not by a fixed half gigabyte: a row change larger
/// than `max_change_bytes` stops its link with an error naming the table
/// and what to raise, nothing is skipped, and it arrives once the limit is
/// raised; a peer's message past the limit is refused before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_bounded_by_the_topology() -> anyhow::Result<()> {
    let mut d = Deployment::start(
        binary(),
        &spec("[replication]\nmax_change_bytes = 1048576\n"),
    )
    .await?;
    // 3 MiB of text that does not compress away
    for sql in [
        "INSERT INTO orders VALUES (1, 'na', 'small')",
        "INSERT INTO orders SELECT 2, 'na', string_agg(md5(g::text), '') FROM generate_series(1, 98304) g",
        "INSERT INTO orders VALUES (3, 'na', 'after')",
    ] {
        sqlx::raw_sql(sql).execute(d.pool("na")).await?;
    }
    wait_for(&d, "eu", "SELECT count(*) FROM orders WHERE id = 1", 1).await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let error = loop {
        let (_, link) = d.link_status(binary(), "na", "eu")?;
        let error = link["last_error"].as_str().unwrap_or_default().to_owned();
        if error.contains("max_change_bytes") {
            break error;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no error about the large change: {link:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(
        error.contains("a change to public.orders in the transaction ending at"),
        "{error}"
    );
    assert!(
        !error.contains("c4ca4238"),
        "no row value in the error: {error}"
    );
    // nothing after it was skipped
    assert_eq!(count(&d, "eu", "SELECT count(*) FROM orders").await?, 1);

    // a forged message past eu's limit is refused before it is read
    let limit = meridian_core::topology::Tuning {
        max_change_bytes: 1 << 20,
        ..Default::default()
    }
    .message_limit();
    let huge = transaction(
        1 << 40,
        vec![Change {
            table: table(
                "public",
                "orders",
                &[("id", true), ("region", false), ("note", false)],
            ),
            kind: ChangeKind::Insert {
                new: vec![text("9"), text("na"), text(&"x".repeat(limit))],
            },
        }],
    );
    let incarnation = na_incarnation(&d).await?;
    let refused = send_as_na(
        d.channel_as(Identity::Region("na".into()), "eu").await?,
        &incarnation,
        vec![sealed(1, &[huge], &incarnation, None)],
    )
    .await;
    let Err(message) = refused else {
        anyhow::bail!("a message past the limit was taken: {refused:?}");
    };
    assert!(message.contains("message length too large"), "{message}");

    // raised on both agents (receiver first): the change arrives, in order
    let config = std::fs::read_to_string(&d.config)?
        .replace("max_change_bytes = 1048576", "max_change_bytes = 8388608");
    std::fs::write(&d.config, config)?;
    d.agent("eu").restart()?;
    d.agent("na").restart()?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 3).await?;
    assert_eq!(
        count(
            &d,
            "eu",
            "SELECT length(note)::bigint FROM orders WHERE id = 2"
        )
        .await?,
        98304 * 32
    );
    Ok(())
}

/// A watermark moves only to a position the sender sealed with the batch's
/// payload and its slot incarnation, and never past the source's WAL end
/// it states: a batch whose position was changed after sealing, one that
/// ends past its WAL end, and a Hello without the incarnation eu already
/// applied from na are each refused, and the watermark stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermark_moves_only_to_a_sealed_position_within_the_sources_wal() -> anyhow::Result<()>
{
    let mut d = start().await?;
    sqlx::raw_sql("INSERT INTO orders SELECT g, 'na', 'kept' FROM generate_series(1, 5) g")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 5).await?;
    d.agent("na").kill9();
    let watermark = "SELECT end_lsn FROM meridian.watermarks WHERE source_region = 'na'";
    let before = count(&d, "eu", watermark).await? as u64;
    let incarnation = na_incarnation(&d).await?;
    let na = Identity::Region("na".into());
    let empty = transaction(before + 64, vec![]);

    // the position raised after the batch was sealed
    let mut moved = sealed(1, std::slice::from_ref(&empty), &incarnation, None);
    moved.end_lsn = u64::MAX / 2;
    let nack = refused_as_na(&d, &incarnation, moved).await?;
    assert!(nack.contains("does not match its seal"), "{nack}");

    // sealed, but past the WAL end it states
    let past = sealed(
        1,
        std::slice::from_ref(&empty),
        &incarnation,
        Some(before + 8),
    );
    let nack = refused_as_na(&d, &incarnation, past).await?;
    assert!(nack.contains("past the source's WAL end"), "{nack}");

    // no seal at all, as an agent older than incarnations would send
    let mut bare = sealed(1, &[empty], &incarnation, None);
    bare.seal = None;
    let nack = refused_as_na(&d, &incarnation, bare).await?;
    assert!(nack.contains("carries no seal"), "{nack}");

    // and such an agent cannot take na's place: eu applied an incarnation
    let e = send_as_na(d.channel_as(na, "eu").await?, "", vec![])
        .await
        .expect_err("refused at the Hello");
    assert!(e.contains("sends without a slot incarnation"), "{e}");

    assert_eq!(count(&d, "eu", watermark).await? as u64, before);
    assert!(refused_errors(&d).await? >= 3.0);
    // the real na carries on
    d.agent("na").restart()?;
    sqlx::raw_sql("INSERT INTO orders VALUES (6, 'na', 'after')")
        .execute(d.pool("na"))
        .await?;
    wait_for(&d, "eu", "SELECT count(*) FROM orders", 6).await?;
    assert!(count(&d, "eu", watermark).await? as u64 > before);
    Ok(())
}

/// eu's count of batches refused as unproven.
async fn refused_errors(d: &Deployment) -> anyhow::Result<f64> {
    Ok(d.metric(
        "eu",
        r#"meridian_errors_total{source="na",destination="eu",kind="unproven"}"#,
    )
    .await?
    .unwrap_or(0.0))
}
