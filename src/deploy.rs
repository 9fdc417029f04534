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

use std::collections::BTreeMap;
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

/// The hand-written base, the same in every cluster.
const BASE: [(&str, &str); 6] = [
    (
        "kustomization.yaml",
        include_str!("../deploy/kubernetes/base/kustomization.yaml"),
    ),
    (
        "statefulset.yaml",
        include_str!("../deploy/kubernetes/base/statefulset.yaml"),
    ),
    (
        "service.yaml",
        include_str!("../deploy/kubernetes/base/service.yaml"),
    ),
    (
        "poddisruptionbudget.yaml",
        include_str!("../deploy/kubernetes/base/poddisruptionbudget.yaml"),
    ),
    (
        "networkpolicy.yaml",
        include_str!("../deploy/kubernetes/base/networkpolicy.yaml"),
    ),
    (
        "servicemonitor.yaml",
        include_str!("../deploy/kubernetes/base/servicemonitor.yaml"),
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
    out.insert("base/prometheusrule.yaml".into(), prometheus_rule());
    for (region, spec) in &topology.regions {
        let dir = format!("overlays/{region}");
        let peers_port = port_of(spec.connect_addr()).with_context(|| {
            format!("{file}: regions.{region}: connect (or listen) has no port")
        })?;
        let peer_cidrs: Vec<&String> = options
            .egress
            .iter()
            .filter(|(r, _)| *r != region)
            .flat_map(|(_, cidrs)| cidrs)
            .collect();
        let kafka_users: Vec<String> = topology
            .kafka
            .iter()
            .flat_map(|k| &k.clusters)
            .filter(|(_, c)| c.sasl_username.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        out.insert(
            format!("{dir}/kustomization.yaml"),
            overlay(
                region,
                &options.namespace,
                policy.is_some(),
                peers_port,
                &peer_cidrs,
                &kafka_users,
            ),
        );
        out.insert(format!("{dir}/topology.toml"), pod_topology.clone());
        if let Some(policy) = &policy {
            out.insert(format!("{dir}/policy.toml"), policy.clone());
        }
    }
    Ok(out)
}

/// `meridian deploy render`: writes the files under `out`.
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
        if spec.store.expose().contains('@')
            && spec
                .store
                .expose()
                .split_once("://")
                .is_some_and(|(_, rest)| rest.split('@').next().unwrap_or("").contains(':'))
        {
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

/// One region's overlay.
fn overlay(
    region: &str,
    namespace: &str,
    policy: bool,
    peers_port: u16,
    peer_cidrs: &[&String],
    kafka_users: &[String],
) -> String {
    let mut env = format!(
        "      - op: add
        path: /spec/template/spec/containers/0/env/-
        value:
          name: {}
          valueFrom:
            secretKeyRef:
              name: meridian-store
              key: url\n",
        store_env(region)
    );
    for cluster in kafka_users {
        env.push_str(&format!(
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
    let from: String = peer_cidrs
        .iter()
        .map(|c| format!("            - ipBlock:\n                cidr: {c}\n"))
        .collect();
    let files = if policy {
        "      - topology.toml\n      - policy.toml\n"
    } else {
        "      - topology.toml\n"
    };
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
      - op: replace
        path: /spec/template/spec/containers/0/args/4
        value: {region}
{env}  - target:
      kind: Service
      name: meridian-agent-peers
    patch: |-
      - op: replace
        path: /spec/ports/0/port
        value: {peers_port}
  # only the other regions' agents reach the gRPC port
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
"
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
        let valid = cidr.split_once('/').is_some_and(|(ip, bits)| {
            ip.parse::<std::net::IpAddr>().is_ok() && bits.parse::<u8>().is_ok_and(|b| b <= 128)
        });
        if !valid {
            bail!("--egress-cidr {arg}: {cidr} is not a CIDR such as 203.0.113.0/24");
        }
        out.entry(region.to_owned())
            .or_default()
            .push(cidr.to_owned());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn egress_arguments_are_checked() {
        let parsed =
            parse_egress(&["eu=203.0.113.0/24".into(), "eu=2001:db8::/32".into()]).unwrap();
        assert_eq!(parsed["eu"], ["203.0.113.0/24", "2001:db8::/32"]);
        let e = parse_egress(&["eu:203.0.113.0/24".into()]).unwrap_err();
        assert!(e.to_string().contains("expected REGION=CIDR"), "{e}");
        let e = parse_egress(&["eu=example.com".into()]).unwrap_err();
        assert!(e.to_string().contains("is not a CIDR"), "{e}");
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
