//! How operator commands reach agents: over mTLS with the `[operator]`
//! certificate of the topology, checking that each agent proves the region
//! it is asked about; in plain TCP only under `[security] plaintext = true`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use meridian_core::topology::Topology;
use meridian_trust::Identity;
use meridian_trust::tls::{Credentials, Files};
use tonic::transport::{Channel, Endpoint};

/// The operator's side of every call to the agents of one topology.
#[derive(Clone)]
pub(crate) struct Dialer {
    credentials: Option<Arc<Credentials>>,
}

impl Dialer {
    /// Loads `[operator] tls`, which must hold an operator identity; none
    /// under `[security] plaintext = true`.
    pub(crate) fn new(topology: &Topology) -> anyhow::Result<Dialer> {
        if topology.security.plaintext {
            return Ok(Dialer { credentials: None });
        }
        let operator = topology.operator.as_ref().context(
            "[operator] tls: missing; agents accept only callers with a certificate. Add \
             [operator] tls = { ca = \"certs/ca.pem\", cert = \"certs/operator-NAME.pem\", \
             key = \"certs/operator-NAME-key.pem\" } (made by `meridian certs init`)",
        )?;
        let t = &operator.tls;
        let credentials = Credentials::load(&Files {
            ca: t.ca.clone(),
            cert: t.cert.clone(),
            key: t.key.clone(),
        })
        .context("[operator] tls")?;
        if !matches!(credentials.identity, Identity::Operator(_)) {
            tracing::warn!(
                "[operator] tls: {} is a certificate for {}, not an operator: agents answer \
                 status calls but refuse changes",
                t.cert.display(),
                credentials.identity
            );
        }
        Ok(Dialer {
            credentials: Some(Arc::new(credentials)),
        })
    }

    /// A channel to `region`'s agent at `addr`.
    pub(crate) async fn connect(
        &self,
        region: &str,
        addr: &str,
        timeout: Duration,
    ) -> anyhow::Result<Channel> {
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(timeout)
            .timeout(timeout);
        let config = match &self.credentials {
            Some(c) => Some(c.client_config(Identity::Region(region.to_owned()))?),
            None => None,
        };
        meridian_trust::net::dial(endpoint, addr, config, timeout)
            .await
            .map_err(|e| {
                // the transport error hides the TLS reason in its sources
                let mut text = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    text = format!("{text}: {s}");
                    source = s.source();
                }
                anyhow::anyhow!("cannot connect to region {region}'s agent at {addr}: {text}")
            })
    }
}
