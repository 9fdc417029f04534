//! The Kubernetes manifests: `meridian deploy render` reproduces the
//! committed `deploy/kubernetes/` from its topology; every overlay renders
//! with kustomize and validates against the Kubernetes API schemas of a
//! named version (`kubernetes-validate --strict`); the manifests use only
//! metrics the agents export, probe paths they serve and ports they listen
//! on; and render refuses a topology a cluster cannot run.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use meridian_core::topology::Topology;
use meridian_testkit::metric_names::{exported_series, referenced};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.31.0";
const REGIONS: [&str; 3] = ["na", "eu", "apac"];
const EGRESS: [(&str, &str); 3] = [
    ("na", "198.51.100.0/27"),
    ("eu", "203.0.113.0/27"),
    ("apac", "192.0.2.0/27"),
];

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_meridian"))
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tempdir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("meridian-kubernetes-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// `meridian deploy render` of `config` into `out`: (success, stdout + stderr).
fn render(config: &Path, out: &Path, egress: &[(&str, &str)]) -> (bool, String) {
    render_with(config, out, egress, &[])
}

/// [`render`] with more arguments.
fn render_with(
    config: &Path,
    out: &Path,
    egress: &[(&str, &str)],
    more: &[&str],
) -> (bool, String) {
    let mut command = Command::new(binary());
    command
        .args(["deploy", "render", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .args(more);
    for (region, cidr) in egress {
        command.arg("--egress-cidr").arg(format!("{region}={cidr}"));
    }
    let output = command.output().expect("meridian runs");
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

fn files_under(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("readable") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let text = std::fs::read_to_string(&path).expect("text");
                out.insert(path.strip_prefix(dir).expect("under").to_owned(), text);
            }
        }
    }
    out
}

/// The `kubernetes-validate` executable: `MERIDIAN_KUBERNETES_VALIDATE`, the
/// one `.ci/run` installs, or the one on PATH.
fn kubernetes_validate() -> PathBuf {
    if let Ok(path) = std::env::var("MERIDIAN_KUBERNETES_VALIDATE") {
        return path.into();
    }
    let cached = std::env::var("HOME")
        .map(|h| PathBuf::from(h).join(".cache/meridian/venv/bin/kubernetes-validate"))
        .unwrap_or_default();
    match cached.exists() {
        true => cached,
        false => "kubernetes-validate".into(),
    }
}

/// The documents `kubectl kustomize` makes of an overlay, as JSON values.
fn kustomize(overlay: &Path) -> (String, Vec<Value>) {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(overlay)
        .output()
        .expect("kubectl (with kustomize) is installed");
    assert!(
        output.status.success(),
        "kubectl kustomize {}: {}",
        overlay.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).expect("utf-8");
    let docs = serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(d).expect("yaml");
            serde_json::to_value(v).expect("json")
        })
        .collect();
    (text, docs)
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn port_of(addr: &str) -> u64 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("address with a port")
}

#[test]
fn the_committed_manifests_are_what_render_writes() {
    let out = tempdir("committed");
    let (ok, said) = render(
        &root().join("deploy/kubernetes/topology.toml"),
        &out,
        &EGRESS,
    );
    assert!(ok, "{said}");
    let rendered = files_under(&out);
    assert_eq!(rendered.len(), 7 + 3 * 3, "{:?}", rendered.keys());
    // nothing committed beside what render writes (a region's stale overlay)
    let committed: BTreeSet<PathBuf> = ["base", "overlays"]
        .iter()
        .flat_map(|d| {
            files_under(&root().join("deploy/kubernetes").join(d))
                .into_keys()
                .map(move |p| Path::new(d).join(p))
        })
        .collect();
    let written: BTreeSet<PathBuf> = rendered.keys().cloned().collect();
    assert_eq!(
        committed, written,
        "deploy/kubernetes holds files render does not write"
    );
    for (path, text) in &rendered {
        let committed = std::fs::read_to_string(root().join("deploy/kubernetes").join(path))
            .unwrap_or_else(|_| panic!("deploy/kubernetes/{} is not committed", path.display()));
        assert!(
            &committed == text,
            "deploy/kubernetes/{} differs from what render writes; render again (see deploy/kubernetes/topology.toml)",
            path.display()
        );
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn every_overlay_validates_and_uses_only_what_the_agent_serves() {
    let out = tempdir("overlays");
    // the example, with ports of its own: eu's agents on 7501, na's store on 6432
    let source = std::fs::read_to_string(root().join("deploy/kubernetes/topology.toml"))
        .expect("the example topology")
        .replace(
            "eu.agents.meridian.example.com:7401",
            "eu.agents.meridian.example.com:7501",
        )
        .replace("na-db.internal:5432", "na-db.internal:6432");
    let config = out.join("topology.toml");
    std::fs::write(&config, source).expect("written");
    std::fs::copy(
        root().join("deploy/kubernetes/policy.toml"),
        out.join("policy.toml"),
    )
    .expect("policy copied");
    let operators = "10.20.0.0/16";
    let (ok, said) = render_with(
        &config,
        &out.join("rendered"),
        &EGRESS,
        &["--operator-cidr", operators],
    );
    assert!(ok, "{said}");
    let out = out.join("rendered");
    let families: String = meridian_agent::telemetry::FAMILIES
        .iter()
        .map(|(name, kind)| format!("# TYPE {name} {kind}\n"))
        .collect();
    let exported = exported_series(&families);
    let mut topologies = BTreeSet::new();
    for region in REGIONS {
        let overlay = out.join("overlays").join(region);
        let (text, docs) = kustomize(&overlay);

        // the Kubernetes API schemas of a named version, strictly
        let file = out.join(format!("{region}.yaml"));
        std::fs::write(&file, &text).expect("written");
        let validate = Command::new(kubernetes_validate())
            .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
            .arg(&file)
            .output()
            .unwrap_or_else(|e| {
                panic!("kubernetes-validate ({e}): `pip install kubernetes-validate` (.ci/run installs it)")
            });
        assert!(
            validate.status.success(),
            "{region}: {}{}",
            String::from_utf8_lossy(&validate.stdout),
            String::from_utf8_lossy(&validate.stderr)
        );

        // metrics: only what agents export
        let names = referenced(&text);
        assert!(names.len() >= 5, "{names:?}");
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(unknown.is_empty(), "{region}: unknown metrics {unknown:?}");

        // the topology the pod reads, parsed as the agent parses it
        let config = &of_kind(&docs, "ConfigMap")[0]["data"];
        let topology_text = config["topology.toml"].as_str().expect("topology.toml");
        let topology = Topology::parse(topology_text, "topology.toml").expect("valid topology");
        assert!(
            config["policy.toml"].as_str().is_some(),
            "the policy travels too"
        );
        topologies.insert(topology_text.to_owned());
        let me = &topology.regions[region];

        // the agent: one replica, its region, its ports, its probes
        let sets = of_kind(&docs, "StatefulSet");
        assert_eq!(sets.len(), 1);
        assert_eq!(sets[0]["spec"]["replicas"], 1);
        let pod = &sets[0]["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        let args = strings(&container["args"]);
        assert_eq!(
            args,
            [
                "agent",
                "--config",
                "/etc/meridian/config/topology.toml",
                "--region",
                region
            ]
        );
        let ports: BTreeMap<String, u64> = container["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| {
                (
                    p["name"].as_str().expect("named").to_owned(),
                    p["containerPort"].as_u64().expect("number"),
                )
            })
            .collect();
        assert_eq!(ports["grpc"], port_of(&me.listen), "{region}: gRPC port");
        assert_eq!(
            ports["metrics"],
            port_of(me.metrics.as_deref().expect("metrics address")),
            "{region}: metrics port"
        );
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let get = &container[probe]["httpGet"];
            let path = get["path"].as_str().expect("path");
            assert!(
                meridian_agent::http::PROBES.contains(&path),
                "{probe} {path}"
            );
            assert!(ports.contains_key(get["port"].as_str().expect("named port")));
        }
        let env: Vec<String> = container["env"]
            .as_array()
            .expect("env")
            .iter()
            .map(|e| e["name"].as_str().expect("name").to_owned())
            .collect();
        assert!(
            env.contains(&meridian_core::topology::store_env(region)),
            "{env:?}"
        );
        // every mount the topology's paths need
        let mounts: Vec<String> = container["volumeMounts"]
            .as_array()
            .expect("mounts")
            .iter()
            .map(|m| m["mountPath"].as_str().expect("path").to_owned())
            .collect();
        let tls = me.tls.as_ref().expect("mTLS");
        for path in [&tls.ca, &tls.cert, &tls.key]
            .into_iter()
            .chain(me.ca.as_ref())
        {
            assert!(
                mounts.iter().any(|m| path.starts_with(m)),
                "{} is not under a mount: {mounts:?}",
                path.display()
            );
        }

        // Services point at container ports; peers dial the topology's port
        for service in of_kind(&docs, "Service") {
            for port in service["spec"]["ports"].as_array().expect("ports") {
                let target = port["targetPort"].as_str().expect("named target");
                assert!(ports.contains_key(target), "{target}");
            }
        }
        let peers = of_kind(&docs, "Service")
            .into_iter()
            .find(|s| s["metadata"]["name"] == "meridian-agent-peers")
            .expect("peers service");
        assert_eq!(
            peers["spec"]["ports"][0]["port"].as_u64(),
            Some(port_of(me.connect_addr()))
        );
        // peers' source addresses survive the load balancer
        assert_eq!(peers["spec"]["externalTrafficPolicy"], "Local");

        // Prometheus scrapes a port that exists, at /metrics, with the token
        let monitor = &of_kind(&docs, "ServiceMonitor")[0];
        let endpoint = &monitor["spec"]["endpoints"][0];
        assert_eq!(endpoint["path"], "/metrics");
        let scraped = of_kind(&docs, "Service")
            .into_iter()
            .filter(|s| {
                monitor["spec"]["selector"]["matchLabels"]
                    .as_object()
                    .expect("labels")
                    .iter()
                    .all(|(k, v)| &s["metadata"]["labels"][k] == v)
            })
            .collect::<Vec<_>>();
        assert_eq!(scraped.len(), 1, "the ServiceMonitor selects one Service");
        assert!(
            scraped[0]["spec"]["ports"]
                .as_array()
                .expect("ports")
                .iter()
                .any(|p| p["name"] == endpoint["port"])
        );

        // only the other regions reach the gRPC port; only Prometheus metrics
        let policy = &of_kind(&docs, "NetworkPolicy")[0]["spec"];
        let grpc_from: BTreeSet<String> = policy["ingress"]
            .as_array()
            .expect("ingress")
            .iter()
            .filter(|rule| rule["ports"][0]["port"] == "grpc")
            .flat_map(|rule| rule["from"].as_array().expect("from").clone())
            .map(|from| from["ipBlock"]["cidr"].as_str().expect("cidr").to_owned())
            .collect();
        let others: BTreeSet<String> = EGRESS
            .iter()
            .filter(|(r, _)| *r != region)
            .map(|(_, c)| (*c).to_owned())
            .chain([operators.to_owned()])
            .collect();
        assert_eq!(grpc_from, others, "{region}");
        // out: DNS, and the store's and the peers' ports as the topology says
        let egress: BTreeSet<u64> = policy["egress"]
            .as_array()
            .expect("egress")
            .iter()
            .flat_map(|rule| rule["ports"].as_array().expect("ports").clone())
            .filter_map(|p| p["port"].as_u64())
            .collect();
        let store_port = if region == "na" { 6432 } else { 5432 };
        let mut expected: BTreeSet<u64> = [53, store_port].into();
        for (peer, spec) in &topology.regions {
            if peer != region {
                expected.insert(port_of(spec.connect_addr()));
            }
        }
        assert_eq!(egress, expected, "{region}");
        for rule in policy["ingress"].as_array().expect("ingress") {
            for port in rule["ports"].as_array().expect("ports") {
                let name = port["port"].as_str().expect("named");
                assert!(ports.contains_key(name), "{name}");
            }
        }
    }
    assert_eq!(
        topologies.len(),
        1,
        "every region's pod reads the same topology file"
    );
    // and the agent loads it where the pod mounts its files
    let pod = out.join("pod");
    let text = topologies.pop_first().expect("one topology");
    let config = pod.join("etc/meridian/config/topology.toml");
    std::fs::create_dir_all(config.parent().expect("folder")).expect("folder");
    std::fs::write(
        &config,
        text.replace(
            "/etc/meridian/",
            &format!("{}/etc/meridian/", pod.display()),
        ),
    )
    .expect("written");
    std::fs::write(
        pod.join("etc/meridian/config/policy.toml"),
        std::fs::read_to_string(root().join("deploy/kubernetes/policy.toml")).expect("policy"),
    )
    .expect("written");
    for file in [
        "tls/ca.crt",
        "tls/tls.crt",
        "tls/tls.key",
        "store-ca/ca.crt",
    ] {
        let path = pod.join("etc/meridian").join(file);
        std::fs::create_dir_all(path.parent().expect("folder")).expect("folder");
        std::fs::write(path, "-----BEGIN CERTIFICATE-----\n").expect("written");
    }
    let loaded = Topology::load(&config).expect("the pod's topology loads");
    assert_eq!(loaded.regions.len(), 3);
    assert!(loaded.policy.is_some());
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn render_refuses_what_a_cluster_cannot_run() {
    let dir = tempdir("refusals");
    let source = std::fs::read_to_string(root().join("deploy/kubernetes/topology.toml"))
        .expect("the example topology");
    std::fs::copy(
        root().join("deploy/kubernetes/policy.toml"),
        dir.join("policy.toml"),
    )
    .expect("policy copied");
    let cases = [
        (
            source.replace(
                "connect = \"eu.agents.meridian.example.com:7401\"",
                "connect = \"127.0.0.1:7401\"",
            ),
            &EGRESS[..],
            "peers in other clusters cannot dial 127.0.0.1:7401",
        ),
        (
            source.replace(
                "postgres://meridian@na-db",
                "postgres://meridian:secret@na-db",
            ),
            &EGRESS[..],
            "regions.na.store carries a password",
        ),
        (
            source.replace(
                "eu-db.internal:5432/app?sslmode=verify-full",
                "eu-db.internal:5432/app?sslmode=verify-full&password=hunter2",
            ),
            &EGRESS[..],
            "regions.eu.store carries a password",
        ),
        (
            source.clone(),
            &EGRESS[..2],
            "no egress address for region apac",
        ),
    ];
    for (i, (topology, egress, expected)) in cases.iter().enumerate() {
        let config = dir.join(format!("topology-{i}.toml"));
        std::fs::write(&config, topology).expect("written");
        let (ok, said) = render(&config, &dir.join(format!("out-{i}")), egress);
        assert!(!ok, "case {i} rendered");
        assert!(said.contains(expected), "case {i}: {said}");
        // the secrets are never echoed
        assert!(
            !said.contains("secret@") && !said.contains("hunter2"),
            "{said}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
