//! The client library over TLS: a store's `ca` in the topology makes the
//! client verify the server's certificate (`sslmode=verify-full`), for
//! regional stores and the global database. The clusters refuse TCP without
//! TLS, and their certificates come from a test CA.

use std::path::Path;

use meridian_client::{Client, Error};
use meridian_testkit::PgCluster;
use meridian_testkit::postgres::TestCa;
use sqlx::{Connection, PgPool};

/// Where stores are in a topology, and their CA files (relative to the
/// topology file, which lives in the cluster's folder next to `ca.pem`).
struct Stores<'a> {
    /// na's and eu's stores (the same cluster, maybe different URLs).
    regions: [&'a str; 2],
    region_ca: Option<&'a str>,
    global: &'a str,
    global_ca: Option<&'a str>,
}

/// Writes `topology.toml` into `dir` (a cluster's folder, deleted with the
/// cluster), and opens a client in na.
fn open(dir: &Path, stores: &Stores<'_>) -> Result<Client, Error> {
    let ca = |ca: Option<&str>| ca.map(|c| format!("ca = {c:?}\n")).unwrap_or_default();
    let mut text = String::new();
    for (i, (region, store)) in ["na", "eu"].into_iter().zip(stores.regions).enumerate() {
        text += &format!(
            "[regions.{region}]\nstore = {store:?}\nlisten = \"127.0.0.1:{}\"\n{}",
            7401 + i,
            ca(stores.region_ca)
        );
    }
    text += "[security]\nplaintext = true\n";
    text += &format!(
        "[global]\nstore = {:?}\n{}",
        stores.global,
        ca(stores.global_ca)
    );
    let path = dir.join("topology.toml");
    std::fs::write(&path, text).expect("write the topology");
    Client::open(&path, "na")
}

/// Whether the session that runs the query is encrypted (after `SELECT 1`).
async fn session_uses_tls(pool: &PgPool) -> Result<bool, Error> {
    let one: i32 = sqlx::query_scalar("SELECT 1").fetch_one(pool).await?;
    assert_eq!(one, 1);
    Ok(
        sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .fetch_one(pool)
            .await?,
    )
}

/// A query's error on `pool`, which must fail.
async fn refused(pool: &PgPool) -> String {
    match sqlx::query("SELECT 1").execute(pool).await {
        Ok(_) => panic!("the connection should have been refused"),
        Err(e) => e.to_string(),
    }
}

/// What rustls says when the server's certificate does not chain to a
/// trusted CA, through sqlx: "error communicating with database: invalid
/// peer certificate: UnknownIssuer" (no CA knows the issuer) or
/// "...: BadSignature" (a CA of the issuer's name, but another key).
fn is_certificate_error(e: &str) -> bool {
    e.contains("invalid peer certificate")
}

#[tokio::test]
async fn the_test_cluster_refuses_tcp_without_tls() -> anyhow::Result<()> {
    let cluster = PgCluster::start_tls()?;
    let plain = format!("{}?sslmode=disable", cluster.url("postgres"));
    let e = sqlx::PgConnection::connect(&plain)
        .await
        .expect_err("a plain TCP connection should be refused")
        .to_string();
    assert!(
        e.contains("pg_hba.conf") && e.contains("no encryption"),
        "{e}"
    );
    // and TLS without verification gets in: the refusal was about TLS
    let unverified = format!("{}?sslmode=require", cluster.url("postgres"));
    sqlx::PgConnection::connect(&unverified)
        .await?
        .close()
        .await?;
    Ok(())
}

#[tokio::test]
async fn region_stores_verify_the_server_against_the_topology_ca() -> anyhow::Result<()> {
    let cluster = PgCluster::start_tls()?;
    assert!(cluster.ca_path().is_some_and(|ca| ca.is_file()));
    let url = cluster.url("postgres");
    // na: the default sslmode (prefer), raised; eu: verify-full, which needs the CA
    let eu = format!("{url}?sslmode=verify-full");
    let client = open(
        cluster.dir(),
        &Stores {
            regions: [&url, &eu],
            region_ca: Some("ca.pem"),
            global: &url,
            global_ca: None,
        },
    )?;
    for region in ["na", "eu"] {
        let store = client.read(region).await?;
        assert!(session_uses_tls(store.pool()).await?, "{region}: not TLS");
    }
    Ok(())
}

#[tokio::test]
async fn the_global_database_verifies_the_server_against_the_topology_ca() -> anyhow::Result<()> {
    let cluster = PgCluster::start_tls()?;
    let url = cluster.url("postgres");
    // a CA raises sslmode=disable to verify-full (the cluster refuses plain TCP)
    let global = format!("{url}?sslmode=disable");
    let ca = cluster.ca_path().expect("a TLS cluster has a CA");
    let client = open(
        cluster.dir(),
        &Stores {
            regions: [&url, &url],
            region_ca: None,
            global: &global,
            // absolute this time
            global_ca: Some(ca.to_str().unwrap()),
        },
    )?;
    assert!(session_uses_tls(client.global().pool()?).await?);
    Ok(())
}

#[tokio::test]
async fn verify_full_without_the_ca_refuses_the_certificate() -> anyhow::Result<()> {
    let cluster = PgCluster::start_tls()?;
    let url = format!("{}?sslmode=verify-full", cluster.url("postgres"));
    let client = open(
        cluster.dir(),
        &Stores {
            regions: [&url, &url],
            region_ca: None,
            global: &url,
            global_ca: None,
        },
    )?;
    for pool in [client.read("na").await?.pool(), client.global().pool()?] {
        let e = refused(pool).await;
        assert!(
            is_certificate_error(&e) && e.contains("UnknownIssuer"),
            "{e}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_ca_that_did_not_sign_the_certificate_is_refused() -> anyhow::Result<()> {
    let cluster = PgCluster::start_tls()?;
    // the same name as the cluster's CA, another key: only the signature differs
    let other = TestCa::new("Meridian test CA")?;
    std::fs::write(cluster.dir().join("other-ca.pem"), other.pem())?;
    let url = cluster.url("postgres");
    let client = open(
        cluster.dir(),
        &Stores {
            regions: [&url, &url],
            region_ca: Some("other-ca.pem"),
            global: &url,
            global_ca: Some("other-ca.pem"),
        },
    )?;
    for pool in [client.read("eu").await?.pool(), client.global().pool()?] {
        let e = refused(pool).await;
        assert!(
            is_certificate_error(&e) && e.contains("BadSignature"),
            "{e}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_missing_ca_file_is_a_configuration_error() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("meridian-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("ca.pem"), TestCa::new("Meridian test CA")?.pem())?;
    let url = "postgres://postgres@127.0.0.1:5432/postgres";
    let opened = open(
        &dir,
        &Stores {
            regions: [url, url],
            region_ca: Some("ca.pem"),
            global: url,
            global_ca: Some("certs/nowhere.pem"),
        },
    );
    std::fs::remove_dir_all(&dir)?;
    let e = opened.err().expect("a missing CA file should be refused");
    let shown = e.to_string();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
    let missing = dir.join("certs/nowhere.pem").display().to_string();
    assert!(
        shown.contains("global.ca: ") && shown.contains(&missing),
        "{shown}"
    );
    let file = dir.join("topology.toml").display().to_string();
    assert!(shown.starts_with(&file), "{shown}");
    Ok(())
}
