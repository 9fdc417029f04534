//! `meridian deploy render`: Kubernetes manifests from the topology, so the
//! topology stays the one source of truth. Writes a kustomize base (the
//! same in every region's cluster) and one overlay per region that changes
//! only what differs by region: the region the agent runs as, its store's
//! Secret, the port peers dial, and which addresses may reach it.
//!
//! Every overlay carries the same `topology.toml`, rewritten for the pod
//! (listen on all addresses, certificates where the Secrets are mounted, no
//! operator or global-database sections), so every region's agent reports
//! the same topology hash and drift shows only what really differs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, bail};
use meridian_core::topology::{Topology, kafka_password_env, store_env};

/// The agent's gRPC port in the pod.
pub(crate) const GRPC_PORT: u16 = 7401;
/// The agent's metrics and probe port in the pod.
pub(crate) const METRICS_PORT: u16 = 9464;
/// Where the pod mounts what the topology names.
const TLS_DIR: &str = "/etc/meridian/tls";
const STORE_CA: &str = "/etc/meridian/store-ca/ca.crt";
const KAFKA_CA_DIR: &str = "/etc/meridian/kafka-ca";

/// The base, the same in every cluster (its image filled in by `render`).
const BASE: [(&str, &str); 6] = [
    (
        "kustomization.yaml",
        include_str!("deploy/base/kustomization.yaml"),
    ),
    (
        "statefulset.yaml",
        include_str!("deploy/base/statefulset.yaml"),
    ),
    ("service.yaml", include_str!("deploy/base/service.yaml")),
    (
        "poddisruptionbudget.yaml",
        include_str!("deploy/base/poddisruptionbudget.yaml"),
    ),
    (
        "networkpolicy.yaml",
        include_str!("deploy/base/networkpolicy.yaml"),
    ),
    (
        "servicemonitor.yaml",
        include_str!("deploy/base/servicemonitor.yaml"),
    ),
];

/// The alert rules, also served as a `PrometheusRule`.
const ALERTS: &str = include_str!("../deploy/monitoring/alerts.yml");

/// What `render` needs besides the topology.
pub(crate) struct Options {
    /// Namespace of every object.
    pub namespace: String,
    /// Per region, the addresses (CIDR) its agent's connections come from,
    /// as peers see them: only these reach a peer's gRPC port.
    pub egress: BTreeMap<String, Vec<String>>,
    /// Where operators run `meridian status` and friends from (CIDR): they
    /// reach every agent's gRPC port too. Empty: only through
    /// `kubectl port-forward`.
    pub operators: Vec<String>,
    /// The agent image every region runs, `repository:tag`.
    pub image: String,
}

/// The image of this release.
pub(crate) fn default_image() -> String {
    format!("ghcr.io/meridian/meridian:{}", env!("CARGO_PKG_VERSION"))
}

/// What one region's overlay says.
struct Overlay<'a> {
    region: &'a str,
    namespace: &'a str,
    policy: bool,
    /// The port peers dial (the topology's `connect`).
    peers_port: u16,
    /// Who may reach the gRPC port: the other regions' egress, operators.
    grpc_from: Vec<&'a String>,
    /// TCP ports the agent dials: its store, peer agents, Kafka brokers.
    egress_ports: BTreeSet<u16>,
    /// Kafka clusters whose SASL password the agent reads.
    kafka_users: Vec<String>,
    /// The topology names a store CA (every cluster must mount one).
    store_ca: bool,
    /// The topology names Kafka CAs (every cluster must mount them).
    kafka_ca: bool,
}

/// The files to write, by path relative to the output folder.
pub(crate) fn render(config: &Path, options: &Options) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read the topology file {}", config.display()))?;
    // validated as the agents will read it
    let topology = Topology::parse(&text, &config.display().to_string())?;
    let file = config.display().to_string();
    if topology.security.plaintext {
        bail!(
            "{file}: [security] plaintext = true; the manifests run agents with mTLS only: remove it and give every region `tls`"
        );
    }
    for region in topology.regions.keys() {
        if !options.egress.contains_key(region) {
            bail!(
                "no egress address for region {region}: pass --egress-cidr {region}=CIDR (the addresses its agent's connections come from, as the other clusters see them), so only peers reach the agents' gRPC port"
            );
        }
    }
    if let Some(unknown) = options
        .egress
        .keys()
        .find(|r| !topology.regions.contains_key(*r))
    {
        bail!("--egress-cidr names region {unknown}, which {file} does not have");
    }
    let Some((repository, tag)) = options
        .image
        .rsplit_once(':')
        .filter(|(r, t)| !r.is_empty() && !t.is_empty() && !t.contains('/'))
    else {
        bail!(
            "--image {}: expected REPOSITORY:TAG, such as ghcr.io/meridian/meridian:0.1.0",
            options.image
        );
    };
    let policy = match &topology.policy {
        Some(p) => {
            let path = config.parent().unwrap_or(Path::new(".")).join(p);
            Some(std::fs::read_to_string(&path).with_context(|| {
                format!(
                    "cannot read the policy file {} named by {file}",
                    path.display()
                )
            })?)
        }
        None => None,
    };
    let pod_topology = for_pod(&text, &file, &topology)?;

    let mut out = BTreeMap::new();
    for (name, content) in BASE {
        out.insert(format!("base/{name}"), content.to_owned());
    }
    let kustomization = out
        .get_mut("base/kustomization.yaml")
        .expect("the base has a kustomization");
    *kustomization = kustomization
        .replace("newName: REPOSITORY", &format!("newName: {repository}"))
        .replace("newTag: \"TAG\"", &format!("newTag: \"{tag}\""));
    out.insert("base/prometheusrule.yaml".into(), prometheus_rule());
    let kafka = topology.kafka.as_ref();
    let kafka_users: Vec<String> = kafka
        .iter()
        .flat_map(|k| &k.clusters)
        .filter(|(_, c)| c.sasl_username.is_some())
        .map(|(name, _)| name.clone())
        .collect();
    let kafka_ca = kafka
        .iter()
        .flat_map(|k| k.clusters.values())
        .any(|c| c.ca.is_some());
    let broker_ports: BTreeSet<u16> = kafka
        .iter()
        .flat_map(|k| {
            k.clusters
                .values()
                .map(|c| c.brokers.as_str())
                .chain(k.brokers.as_deref())
        })
        .flat_map(|list| list.split(','))
        .filter_map(|b| port_of(b.trim()))
        .collect();
    for (region, spec) in &topology.regions {
        let dir = format!("overlays/{region}");
        let port =
            |addr: &str| port_of(addr).with_context(|| format!("{file}: {addr} has no port"));
        let mut egress_ports: BTreeSet<u16> = broker_ports.clone();
        egress_ports.insert(store_port(spec.store.expose()));
        for (peer, p) in topology.regions.iter().filter(|(r, _)| *r != region) {
            egress_ports.insert(port(p.connect_addr()).with_context(|| format!("regions.{peer}"))?);
        }
        let grpc_from: Vec<&String> = options
            .egress
            .iter()
            .filter(|(r, _)| *r != region)
            .flat_map(|(_, cidrs)| cidrs)
            .chain(&options.operators)
            .collect();
        out.insert(
            format!("{dir}/kustomization.yaml"),
            overlay(&Overlay {
                region,
                namespace: &options.namespace,
                policy: policy.is_some(),
                peers_port: port(spec.connect_addr())?,
                grpc_from,
                egress_ports,
                kafka_users: kafka_users.clone(),
                store_ca: topology.regions.values().any(|r| r.ca.is_some()),
                kafka_ca,
            }),
        );
        out.insert(format!("{dir}/topology.toml"), pod_topology.clone());
        if let Some(policy) = &policy {
            out.insert(format!("{dir}/policy.toml"), policy.clone());
        }
    }
    Ok(out)
}

/// `meridian deploy render`: writes the files under `out`, and names
/// overlays of regions the topology no longer has.
pub(crate) fn run(config: &Path, out: &Path, options: &Options) -> anyhow::Result<()> {
    let files = render(config, options)?;
    for (path, content) in &files {
        let path = out.join(path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, content)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!(
        "wrote {} files under {}: kubectl kustomize {}/overlays/<region> | kubectl apply -f - (in that region's cluster)",
        files.len(),
        out.display(),
        out.display()
    );
    if let Ok(entries) = std::fs::read_dir(out.join("overlays")) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !files.contains_key(&format!("overlays/{name}/kustomization.yaml")) {
                eprintln!(
                    "warning: {} is for a region the topology no longer has; remove it (and the agent it deploys) when that region is gone",
                    entry.path().display()
                );
            }
        }
    }
    Ok(())
}

/// The topology as every region's pod reads it.
fn for_pod(text: &str, file: &str, topology: &Topology) -> anyhow::Result<String> {
    let mut doc: toml::Table = text.parse().with_context(|| format!("parsing {file}"))?;
    doc.remove("operator");
    doc.remove("global");
    if topology.policy.is_some() {
        doc.insert("policy".into(), "policy.toml".into());
    }
    let regions = doc
        .get_mut("regions")
        .and_then(|r| r.as_table_mut())
        .context("the topology has no [regions]")?;
    for (name, spec) in &topology.regions {
        let at = format!("{file}: regions.{name}");
        let connect = spec.connect_addr().to_owned();
        let host = connect
            .rsplit_once(':')
            .map_or(connect.as_str(), |(h, _)| h);
        if ["127.0.0.1", "localhost", "0.0.0.0", "[::1]", "[::]"].contains(&host) {
            bail!(
                "{at}: peers in other clusters cannot dial {connect}; set regions.{name}.connect to the address of that region's meridian-agent-peers Service"
            );
        }
        if has_password(spec.store.expose()) {
            bail!(
                "{at}.store carries a password; keep it out of the file: the pod reads {} from the Secret meridian-store (key url)",
                store_env(name)
            );
        }
        let table = regions
            .get_mut(name)
            .and_then(|r| r.as_table_mut())
            .expect("parsed: every region is a table");
        table.insert("listen".into(), format!("0.0.0.0:{GRPC_PORT}").into());
        table.insert("connect".into(), connect.into());
        table.insert("metrics".into(), format!("0.0.0.0:{METRICS_PORT}").into());
        let mut tls = toml::Table::new();
        tls.insert("ca".into(), format!("{TLS_DIR}/ca.crt").into());
        tls.insert("cert".into(), format!("{TLS_DIR}/tls.crt").into());
        tls.insert("key".into(), format!("{TLS_DIR}/tls.key").into());
        table.insert("tls".into(), tls.into());
        if spec.ca.is_some() {
            table.insert("ca".into(), STORE_CA.into());
        }
    }
    if let Some(clusters) = doc
        .get_mut("kafka")
        .and_then(|k| k.get_mut("clusters"))
        .and_then(|c| c.as_table_mut())
    {
        for (name, cluster) in clusters.iter_mut() {
            if let Some(c) = cluster.as_table_mut()
                && c.contains_key("ca")
            {
                c.insert("ca".into(), format!("{KAFKA_CA_DIR}/{name}.crt").into());
            }
        }
    }
    Ok(format!(
        "# Generated by `meridian deploy render` from {}: the same file in every\n\
         # region's cluster. Change the source topology and render again.\n{}",
        Path::new(file)
            .file_name()
            .map_or(file.into(), |f| f.to_string_lossy()),
        toml::to_string(&doc)?
    ))
}

fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}

/// The authority of a `postgres://` URL and its query, split.
fn url_parts(url: &str) -> (&str, &str) {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let authority = before_query.split('/').next().unwrap_or("");
    (authority, query)
}

/// Whether a store URL carries a password (in its user part or as a
/// `password`/`sslpassword` parameter).
fn has_password(url: &str) -> bool {
    let (authority, query) = url_parts(url);
    let in_user = authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.contains(':'));
    in_user
        || query.split('&').any(|kv| {
            let key = kv.split('=').next().unwrap_or("");
            key.eq_ignore_ascii_case("password") || key.eq_ignore_ascii_case("sslpassword")
        })
}

/// The TCP port of a store URL (5432 when it names none).
fn store_port(url: &str) -> u16 {
    let (authority, _) = url_parts(url);
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    // the first host of a multi-host URL
    let host = host.split(',').next().unwrap_or(host);
    match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(':') => port.parse().unwrap_or(5432),
        _ => 5432,
    }
}

/// One region's overlay.
fn overlay(o: &Overlay) -> String {
    let region = o.region;
    let mut patches = format!(
        "      - op: replace
        path: /spec/template/spec/containers/0/args/4
        value: {region}
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value:
          name: {}
          valueFrom:
            secretKeyRef:
              name: meridian-store
              key: url\n",
        store_env(region)
    );
    for cluster in &o.kafka_users {
        patches.push_str(&format!(
            "      - op: add
        path: /spec/template/spec/containers/0/env/-
        value:
          name: {}
          valueFrom:
            secretKeyRef:
              name: meridian-kafka
              key: password-{cluster}\n",
            kafka_password_env(cluster)
        ));
    }
    // the topology names these files in every region: the Secret must be there
    for (needed, volume) in [(o.store_ca, 2), (o.kafka_ca, 3)] {
        if needed {
            patches.push_str(&format!(
                "      - op: replace
        path: /spec/template/spec/volumes/{volume}/secret/optional
        value: false\n"
            ));
        }
    }
    let from: String = o
        .grpc_from
        .iter()
        .map(|c| format!("            - ipBlock:\n                cidr: {c}\n"))
        .collect();
    let ports: String = o
        .egress_ports
        .iter()
        .map(|p| format!("            - port: {p}\n              protocol: TCP\n"))
        .collect();
    let files = if o.policy {
        "      - topology.toml\n      - policy.toml\n"
    } else {
        "      - topology.toml\n"
    };
    let (namespace, peers_port) = (o.namespace, o.peers_port);
    format!(
        "# Generated by `meridian deploy render`: region {region}. Change the topology
# and render again rather than editing this file.
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: {namespace}
resources:
  - ../../base
labels:
  - pairs:
      meridian.io/region: {region}
configMapGenerator:
  - name: meridian-config
    files:
{files}patches:
  - target:
      kind: StatefulSet
      name: meridian-agent
    patch: |-
{patches}  - target:
      kind: Service
      name: meridian-agent-peers
    patch: |-
      - op: replace
        path: /spec/ports/0/port
        value: {peers_port}
  # the gRPC port: only the other regions' agents (and operators); out:
  # the store, peer agents and Kafka brokers, on the topology's ports
  - target:
      kind: NetworkPolicy
      name: meridian-agent
    patch: |-
      - op: add
        path: /spec/ingress/-
        value:
          from:
{from}          ports:
            - port: grpc
              protocol: TCP
      - op: add
        path: /spec/egress/-
        value:
          ports:
{ports}"
    )
}

/// `deploy/monitoring/alerts.yml` as a Prometheus Operator `PrometheusRule`.
fn prometheus_rule() -> String {
    let mut out = String::from(
        "# Generated by `meridian deploy render` from deploy/monitoring/alerts.yml.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: meridian\nspec:\n",
    );
    for line in ALERTS.lines().skip_while(|l| l.starts_with('#')) {
        match line.is_empty() {
            true => out.push('\n'),
            false => {
                out.push_str("  ");
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `REGION=CIDR` arguments, by region.
pub(crate) fn parse_egress(args: &[String]) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for arg in args {
        let Some((region, cidr)) = arg.split_once('=') else {
            bail!("--egress-cidr {arg}: expected REGION=CIDR, such as eu=203.0.113.0/24");
        };
        if !valid_cidr(cidr) {
            bail!("--egress-cidr {arg}: {cidr} is not a CIDR such as 203.0.113.0/24");
        }
        out.entry(region.to_owned())
            .or_default()
            .push(cidr.to_owned());
    }
    Ok(out)
}

/// `CIDR` arguments of `flag`, checked.
pub(crate) fn parse_cidrs(flag: &str, args: Vec<String>) -> anyhow::Result<Vec<String>> {
    for cidr in &args {
        if !valid_cidr(cidr) {
            bail!("{flag} {cidr}: not a CIDR such as 203.0.113.0/24");
        }
    }
    Ok(args)
}

/// An IPv4 or IPv6 address with a prefix length its family allows.
fn valid_cidr(cidr: &str) -> bool {
    cidr.split_once('/').is_some_and(|(ip, bits)| {
        let most = match ip.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(_)) => 32,
            Ok(std::net::IpAddr::V6(_)) => 128,
            Err(_) => return false,
        };
        bits.parse::<u8>().is_ok_and(|b| b <= most)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_give_their_port_and_betray_passwords() {
        assert_eq!(store_port("postgres://u@db:6432/app"), 6432);
        assert_eq!(store_port("postgres://u@db/app?sslmode=verify-full"), 5432);
        assert_eq!(store_port("postgres://u@[2001:db8::1]:7000/app"), 7000);
        assert_eq!(store_port("postgres://u@[2001:db8::1]/app"), 5432);
        assert!(has_password("postgres://u:secret@db/app"));
        assert!(has_password(
            "postgres://u@db/app?sslmode=require&password=secret"
        ));
        assert!(has_password("postgres://u@db/app?sslpassword=x"));
        assert!(!has_password("postgres://u@db/app?application_name=a@b:c"));
        assert!(!has_password("postgres://u@db:5432/app"));
    }

    #[test]
    fn egress_arguments_are_checked() {
        let parsed =
            parse_egress(&["eu=203.0.113.0/24".into(), "eu=2001:db8::/32".into()]).unwrap();
        assert_eq!(parsed["eu"], ["203.0.113.0/24", "2001:db8::/32"]);
        let e = parse_egress(&["eu:203.0.113.0/24".into()]).unwrap_err();
        assert!(e.to_string().contains("expected REGION=CIDR"), "{e}");
        let e = parse_egress(&["eu=example.com".into()]).unwrap_err();
        assert!(e.to_string().contains("is not a CIDR"), "{e}");
        assert!(parse_egress(&["eu=203.0.113.0/33".into()]).is_err());
        assert!(parse_cidrs("--operator-cidr", vec!["10.0.0.0/8".into()]).is_ok());
        assert!(parse_cidrs("--operator-cidr", vec!["10.0.0.0".into()]).is_err());
    }

    #[test]
    fn the_alert_rules_become_a_prometheus_rule() {
        let rule = prometheus_rule();
        assert!(rule.contains("kind: PrometheusRule\n"));
        assert!(
            rule.contains("\n  groups:\n    - name: meridian\n"),
            "{rule}"
        );
        assert!(rule.contains("      - alert: MeridianLinkLagHigh\n"));
    }
}
