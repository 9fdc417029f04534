//! End-to-end catch-up benchmark: Meridian vs PostgreSQL's native logical
//! replication, on the same clusters and the same WAL backlog, in one run.
//!
//! For each shape, a source cluster gets a backlog of row changes (a
//! ~200-byte row; 60 % inserts, 30 % updates, 10 % deletes) while both a
//! Meridian slot and a native subscription's slot exist but nobody reads
//! them. Then Meridian's agents start and the time until the destination
//! matches the source is measured; then the native subscription is enabled
//! on a second destination and measured the same way. Bytes: what pgoutput
//! sends for the backlog (read once from a third slot) beside what
//! Meridian's source agent shipped (compressed batches). One JSON line per
//! shape:
//!
//! - `single`: single-row transactions (what OLTP services commit);
//! - `ten`: 10-row transactions;
//! - `thousand`: 1,000-row transactions;
//! - `toast`: single-row transactions, 10 % of rows with a 20 kB value
//!   stored out of line (updates leave it unchanged);
//! - `policy`: 10-row transactions under a residency policy that hashes one
//!   column and drops another (native replicates everything: it cannot).
//!
//! ```sh
//! cargo bench --bench replication                                  # every shape, gRPC
//! MERIDIAN_BENCH_SHAPES=single,thousand cargo bench --bench replication
//! MERIDIAN_BENCH_SCALE=0.2 cargo bench --bench replication         # smaller backlogs
//! MERIDIAN_BENCH_TRANSPORT=kafka cargo bench --bench replication   # through tansu
//! MERIDIAN_BENCH_TRANSPORT=kafka-transaction cargo bench ...        # order = "transaction"
//! MERIDIAN_BENCH_TLS=1 cargo bench --bench replication              # gRPC links over mTLS
//!
//! By default agents talk in plain TCP (`[security] plaintext = true`), as
//! the native subscription does; `MERIDIAN_BENCH_TLS=1` measures what mTLS
//! between the agents costs.
//! ```

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use meridian_testkit::postgres::PgOptions;
use meridian_testkit::{AgentProcess, PgCluster};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

const SCHEMA: &str = "
CREATE TABLE bench_rows (
    id bigint PRIMARY KEY,
    region text NOT NULL,
    a integer NOT NULL,
    b text NOT NULL,
    c timestamptz NOT NULL,
    d numeric(12,2),
    e text
);
-- 20 kB values go out of line, uncompressed: an update that leaves them
-- alone carries them as 'unchanged'
ALTER TABLE bench_rows ALTER COLUMN e SET STORAGE EXTERNAL;";

/// Writes `n` row changes in transactions of `per_tx`, server-side (a
/// COMMIT per transaction, as a client would): a change is an insert (6 in
/// 10), an update of a recent row (3 in 10) or a delete of the oldest row
/// (1 in 10). Every `big_every`-th inserted row carries a 20 kB value.
const GENERATOR: &str = "
CREATE PROCEDURE bench_generate(n bigint, per_tx int, big_every int) LANGUAGE plpgsql AS $$
DECLARE
    ins bigint := 0;
    del bigint := 0;
    k bigint := 0;
BEGIN
    WHILE k < n LOOP
        FOR j IN 1..per_tx LOOP
            IF k % 10 < 6 OR ins - del < 100 THEN
                INSERT INTO bench_rows VALUES (ins, 'na', ins % 100000, rpad(md5(ins::text), 150, 'x'),
                    now(), (ins % 10000) / 100.0,
                    CASE WHEN big_every > 0 AND ins % big_every = 0
                         THEN (SELECT string_agg(md5((ins * 1000 + g)::text), '') FROM generate_series(1, 640) g)
                    END);
                ins := ins + 1;
            ELSIF k % 10 < 9 THEN
                UPDATE bench_rows SET a = a + 1, c = now() WHERE id = ins - 1 - (k % 50);
            ELSE
                DELETE FROM bench_rows WHERE id = del;
                del := del + 1;
            END IF;
            k := k + 1;
        END LOOP;
        COMMIT;
    END LOOP;
END $$;";

/// Hashes `b` and drops `d` on the way to eu.
const POLICY: &str = r#"
version = 1

[[rules]]
name = "bench"
table = "public.bench_rows"
from = ["na"]
to = ["eu"]
columns = { id = "keep", region = "keep", a = "keep", b = "hash", c = "keep", e = "keep" }
"#;

#[derive(Clone, Copy, Debug)]
struct Shape {
    name: &'static str,
    changes: i64,
    per_tx: i32,
    big_every: i32,
    policy: bool,
}

const SHAPES: [Shape; 5] = [
    Shape {
        name: "single",
        changes: 300_000,
        per_tx: 1,
        big_every: 0,
        policy: false,
    },
    Shape {
        name: "ten",
        changes: 500_000,
        per_tx: 10,
        big_every: 0,
        policy: false,
    },
    Shape {
        name: "thousand",
        changes: 1_000_000,
        per_tx: 1000,
        big_every: 0,
        policy: false,
    },
    Shape {
        name: "toast",
        changes: 100_000,
        per_tx: 1,
        big_every: 10,
        policy: false,
    },
    Shape {
        name: "policy",
        changes: 500_000,
        per_tx: 10,
        big_every: 0,
        policy: true,
    },
];

fn main() -> anyhow::Result<()> {
    let scale: f64 = std::env::var("MERIDIAN_BENCH_SCALE")
        .ok()
        .map(|v| v.parse().context("MERIDIAN_BENCH_SCALE must be a number"))
        .transpose()?
        .unwrap_or(1.0);
    let kafka = match std::env::var("MERIDIAN_BENCH_TRANSPORT").as_deref() {
        Ok("kafka") => Some(KafkaOrder::Row),
        Ok("kafka-transaction") => Some(KafkaOrder::Transaction),
        Ok("grpc") | Err(_) => None,
        Ok(other) => anyhow::bail!(
            "MERIDIAN_BENCH_TRANSPORT={other:?}: expected grpc, kafka or kafka-transaction"
        ),
    };
    let wanted: Vec<String> = std::env::var("MERIDIAN_BENCH_SHAPES")
        .map(|s| s.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_else(|_| SHAPES.iter().map(|s| s.name.to_owned()).collect());
    let mut shapes = Vec::new();
    for name in &wanted {
        let shape = SHAPES.iter().find(|s| s.name == name).with_context(|| {
            format!(
                "MERIDIAN_BENCH_SHAPES: unknown shape {name:?}; known: {:?}",
                SHAPES.map(|s| s.name)
            )
        })?;
        shapes.push(Shape {
            changes: ((shape.changes as f64 * scale) as i64).max(1_000),
            ..*shape
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    for shape in shapes {
        runtime.block_on(run(shape, kafka))?;
    }
    Ok(())
}

async fn connect(cluster: &PgCluster) -> anyhow::Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(2)
        .connect(&cluster.url("postgres"))
        .await?)
}

/// Kafka links' order mode (`[kafka] order`).
#[derive(Clone, Copy, Debug)]
enum KafkaOrder {
    Row,
    Transaction,
}

async fn run(shape: Shape, kafka: Option<KafkaOrder>) -> anyhow::Result<()> {
    let kafka_order = kafka.unwrap_or(KafkaOrder::Row);
    let kafka = kafka.is_some();
    let options = PgOptions {
        fsync: true,
        ..PgOptions::default()
    };
    let source = PgCluster::start_with(&options)?;
    let meridian_dst = PgCluster::start_with(&options)?;
    let native_dst = PgCluster::start_with(&options)?;
    let (src, mdst, ndst) = (
        connect(&source).await?,
        connect(&meridian_dst).await?,
        connect(&native_dst).await?,
    );
    for pool in [&src, &mdst, &ndst] {
        sqlx::raw_sql(SCHEMA).execute(pool).await?;
    }
    sqlx::raw_sql(GENERATOR).execute(&src).await?;

    // native: publication + disabled subscription (its slot now holds WAL)
    sqlx::raw_sql("CREATE PUBLICATION bench_native FOR TABLE bench_rows")
        .execute(&src)
        .await?;
    sqlx::raw_sql(&format!(
        "CREATE SUBSCRIPTION bench_native CONNECTION '{}' PUBLICATION bench_native
           WITH (copy_data = false, enabled = false)",
        source.conninfo("postgres")
    ))
    .execute(&ndst)
    .await?;

    // meridian: start the agents once so they create their slot, then stop them
    let broker = if kafka {
        Some(meridian_testkit::KafkaBroker::start()?)
    } else {
        None
    };
    let mut topology = String::new();
    if shape.policy {
        std::fs::write(source.dir().join("policy.toml"), POLICY)?;
        topology.push_str("policy = \"policy.toml\"\n\n");
    }
    let metrics = format!("127.0.0.1:{}", meridian_testkit::free_port());
    let tls = std::env::var("MERIDIAN_BENCH_TLS").is_ok_and(|v| v == "1");
    let (na_tls, eu_tls, security) = match tls {
        true => {
            let regions = ["na".to_owned(), "eu".to_owned()];
            meridian_trust::certs::init(&regions, "bench", &source.dir().join("certs"))?;
            let line = |r: &str| {
                format!(
                    "tls = {{ ca = \"certs/ca.pem\", cert = \"certs/{r}.pem\", key = \"certs/{r}-key.pem\" }}\n"
                )
            };
            (line("na"), line("eu"), "")
        }
        false => (
            String::new(),
            String::new(),
            "[security]\nplaintext = true\n",
        ),
    };
    topology.push_str(&format!(
        "[regions.na]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\nmetrics = \"{metrics}\"\n{na_tls}\n\
         [regions.eu]\nstore = \"{}\"\nlisten = \"127.0.0.1:{}\"\n{eu_tls}\n\
         [[tables]]\nname = \"public.bench_rows\"\nprimary_key = [\"id\"]\nhome_column = \"region\"\n\n\
         {security}",
        source.url("postgres"),
        meridian_testkit::free_port(),
        meridian_dst.url("postgres"),
        meridian_testkit::free_port(),
    ));
    if let Some(broker) = &broker {
        let order = match kafka_order {
            KafkaOrder::Row => "row",
            KafkaOrder::Transaction => "transaction",
        };
        topology.push_str(&format!(
            "\n[replication]\ntransport = \"kafka\"\n\n[kafka]\norder = \"{order}\"\nreplication_factor = 1\n\
             [kafka.clusters.eu]\nbrokers = \"{0}\"\n[kafka.clusters.na]\nbrokers = \"{0}\"\n",
            broker.addr()
        ));
    }
    let config = source.dir().join("topology.toml");
    std::fs::write(&config, topology)?;
    let binary = Path::new(env!("CARGO_BIN_EXE_meridian"));
    let env = [("MERIDIAN_POLICY_HASH_KEY", "bench-key")];
    let mut agents = [
        AgentProcess::spawn_with_env(binary, &config, "na", source.dir(), &env)?,
        AgentProcess::spawn_with_env(binary, &config, "eu", source.dir(), &env)?,
    ];
    wait_for(
        || async {
            let n: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'meridian_na_to_eu'",
            )
            .fetch_one(&src)
            .await?;
            Ok(n == 1)
        },
        Duration::from_secs(60),
    )
    .await
    .context("the source agent did not create its slot")?;
    for a in &mut agents {
        a.kill9();
    }

    // a third slot, only to measure what pgoutput sends for the backlog
    sqlx::query("SELECT pg_create_logical_replication_slot('bench_measure', 'pgoutput')")
        .execute(&src)
        .await?;
    let backlog = Instant::now();
    let wal_before: i64 =
        sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(&src)
            .await?;
    sqlx::query("CALL bench_generate($1, $2, $3)")
        .bind(shape.changes)
        .bind(shape.per_tx)
        .bind(shape.big_every)
        .execute(&src)
        .await?;
    let wal_after: i64 =
        sqlx::query_scalar("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint")
            .fetch_one(&src)
            .await?;
    let generate_s = backlog.elapsed().as_secs_f64();
    let pgoutput_bytes: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(length(data)), 0)::bigint FROM pg_logical_slot_peek_binary_changes(
           'bench_measure', NULL, NULL, 'proto_version', '1', 'publication_names', 'bench_native')",
    )
    .fetch_one(&src)
    .await?;
    sqlx::query("SELECT pg_drop_replication_slot('bench_measure')")
        .execute(&src)
        .await?;
    // the backlog's dirty pages are written now, not during either catch-up
    sqlx::raw_sql("CHECKPOINT").execute(&src).await?;
    let target = fingerprint(&src, shape.policy).await?;

    // Meridian catch-up
    for a in &mut agents {
        a.restart()?;
    }
    let started = Instant::now();
    let clusters = [("source", &source), ("destination", &meridian_dst)];
    let cpu_before = cpu::snapshot(&clusters, &agents)?;
    wait_for(
        || async { Ok(fingerprint(&mdst, shape.policy).await? == target) },
        Duration::from_secs(3600),
    )
    .await
    .context("meridian did not catch up")?;
    let meridian_s = started.elapsed().as_secs_f64();
    let meridian_cpu = cpu::since(&cpu_before, &cpu::snapshot(&clusters, &agents)?);
    let rss: Vec<Option<u64>> = agents.iter().map(|a| a.peak_rss_bytes()).collect();
    let shipped = shipped_bytes(&metrics).await;
    for a in &mut agents {
        a.kill9();
    }
    if shape.policy {
        let hashed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM bench_rows WHERE length(b) <> 64 OR d IS NOT NULL",
        )
        .fetch_one(&mdst)
        .await?;
        anyhow::ensure!(
            hashed == 0,
            "{hashed} rows reached eu without the policy's form"
        );
    }

    // native catch-up
    sqlx::raw_sql("ALTER SUBSCRIPTION bench_native ENABLE")
        .execute(&ndst)
        .await?;
    let started = Instant::now();
    let clusters = [("source", &source), ("destination", &native_dst)];
    let cpu_before = cpu::snapshot(&clusters, &[])?;
    wait_for(
        || async { Ok(fingerprint(&ndst, shape.policy).await? == target) },
        Duration::from_secs(3600),
    )
    .await
    .context("native logical replication did not catch up")?;
    let native_s = started.elapsed().as_secs_f64();
    let native_cpu = cpu::since(&cpu_before, &cpu::snapshot(&clusters, &[])?);
    sqlx::raw_sql("ALTER SUBSCRIPTION bench_native DISABLE")
        .execute(&ndst)
        .await?;

    let transactions = shape.changes / i64::from(shape.per_tx);
    let meridian_rate = shape.changes as f64 / meridian_s;
    let native_rate = shape.changes as f64 / native_s;
    let report = serde_json::json!({
        "benchmark": "catch_up_backlog",
        "shape": shape.name,
        "changes": shape.changes,
        "transactions": transactions,
        "mix": {"insert": 0.6, "update": 0.3, "delete": 0.1, "changes_per_transaction": shape.per_tx},
        "row_bytes_approx": 200,
        "rows_with_20kB_value": if shape.big_every > 0 { 1.0 / f64::from(shape.big_every) } else { 0.0 },
        "policy": if shape.policy { "b hashed, d dropped" } else { "none" },
        "backlog_generation_s": round(generate_s),
        "source_wal_bytes": wal_after - wal_before,
        "pgoutput_bytes_per_change": round(pgoutput_bytes as f64 / shape.changes as f64),
        "shipped_bytes_per_change": shipped.map(|b| round(b as f64 / shape.changes as f64)),
        "shipped_over_pgoutput_bytes": shipped.map(|b| round(b as f64 / pgoutput_bytes as f64)),
        "meridian": {
            "transport": match (kafka, kafka_order) {
                (false, _) if tls => "grpc (mTLS)",
                (false, _) => "grpc",
                (true, KafkaOrder::Row) => "kafka (tansu, sqlite storage, order = row, 4 partitions)",
                (true, KafkaOrder::Transaction) => "kafka (tansu, sqlite storage, order = transaction, 1 partition)",
            },
            "catch_up_s": round(meridian_s),
            "rows_per_s": meridian_rate.round(),
            "transactions_per_s": (transactions as f64 / meridian_s).round(),
            "shipped_bytes": shipped,
            "peak_rss_bytes": {"source_agent": rss[0], "destination_agent": rss[1]},
            "cpu_s": meridian_cpu,
        },
        "native_logical_replication": {
            "catch_up_s": round(native_s),
            "rows_per_s": native_rate.round(),
            "cpu_s": native_cpu,
        },
        "ratio_meridian_over_native": round(meridian_rate / native_rate),
    });
    println!("{report}");
    Ok(())
}

/// Where the CPU goes during a catch-up: each process's user + system
/// time from `/proc`, summed by role (an agent, or a cluster's walsender,
/// logical replication worker, client backends, background processes).
/// Processes that end inside the window are not counted.
mod cpu {
    use std::collections::{BTreeMap, HashMap};

    use meridian_testkit::{AgentProcess, PgCluster};

    /// CPU seconds by process id, with the process's role.
    pub(crate) type Snapshot = HashMap<u32, (String, f64)>;

    pub(crate) fn snapshot(
        clusters: &[(&str, &PgCluster)],
        agents: &[AgentProcess],
    ) -> anyhow::Result<Snapshot> {
        let tick = ticks_per_second();
        let mut postmasters = HashMap::new();
        for (name, cluster) in clusters {
            let pid = std::fs::read_to_string(cluster.dir().join("data/postmaster.pid"))?;
            let pid: u32 = pid.lines().next().unwrap_or_default().trim().parse()?;
            postmasters.insert(pid, *name);
        }
        let agent_role = |pid: u32| match agents.iter().position(|a| a.pid() == pid) {
            Some(0) => Some("source_agent"),
            Some(_) => Some("destination_agent"),
            None => None,
        };
        let mut out = Snapshot::new();
        for entry in std::fs::read_dir("/proc")? {
            let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            // fields after the parenthesised command name
            let Some((_, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let (Some(ppid), Some(utime), Some(stime)) = (
                fields.get(1).and_then(|f| f.parse::<u32>().ok()),
                fields.get(11).and_then(|f| f.parse::<u64>().ok()),
                fields.get(12).and_then(|f| f.parse::<u64>().ok()),
            ) else {
                continue;
            };
            let role = if let Some(role) = agent_role(pid) {
                role.to_owned()
            } else if let Some(cluster) = postmasters.get(&ppid) {
                let cmdline =
                    std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let kind = if cmdline.contains("walsender") {
                    "walsender"
                } else if cmdline.contains("logical replication") {
                    "replication_worker"
                } else if cmdline.contains("postgres: postgres ") {
                    "backends"
                } else {
                    "background"
                };
                format!("{cluster}_{kind}")
            } else {
                continue;
            };
            out.insert(pid, (role, (utime + stime) as f64 / tick));
        }
        Ok(out)
    }

    /// CPU seconds by role between two snapshots.
    pub(crate) fn since(before: &Snapshot, after: &Snapshot) -> BTreeMap<String, f64> {
        let mut roles = BTreeMap::new();
        for (pid, (role, seconds)) in after {
            let start = before.get(pid).map_or(0.0, |(_, s)| *s);
            *roles.entry(role.clone()).or_insert(0.0) += seconds - start;
        }
        roles.values_mut().for_each(|s| *s = super::round(*s));
        roles
    }

    fn ticks_per_second() -> f64 {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    }
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Bytes the source agent shipped over the link (encoded batches), from
/// its `meridian_shipped_bytes_total`.
async fn shipped_bytes(metrics: &str) -> Option<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(metrics).await.ok()?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await.ok()?;
    text.lines()
        .filter(|l| l.starts_with("meridian_shipped_bytes_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .reduce(|a, b| a + b)
}

/// What must match between source and destination: row count, a sum, and
/// a hash over the values the destination holds as the source does (with
/// the policy, `b` and `d` differ by design and are left out).
async fn fingerprint(pool: &PgPool, policy: bool) -> anyhow::Result<(i64, i64, i64)> {
    let values = if policy {
        "c::text || coalesce(md5(e), '')"
    } else {
        "b || c::text || d::text || coalesce(md5(e), '')"
    };
    Ok(sqlx::query_as(&format!(
        "SELECT count(*), coalesce(sum(a), 0)::bigint, coalesce(sum(hashtext({values})), 0)::bigint FROM bench_rows"
    ))
    .fetch_one(pool)
    .await?)
}

async fn wait_for<F, Fut>(mut check: F, timeout: Duration) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    while !check().await? {
        anyhow::ensure!(Instant::now() < deadline, "timed out after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}
