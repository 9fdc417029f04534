//! TLS to a PostgreSQL store for connections that do not go through sqlx
//! (the agent's replication connection), following libpq's `sslmode`:
//! `require` encrypts without checking the certificate, `verify-ca` checks
//! that it chains to `sslrootcert`, `verify-full` also that it names the
//! host.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{ClientConfig, RootCertStore};

use crate::verify::Verifier;

/// What a client checks of the store's certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// Nothing (`sslmode=require`): encrypted, not authenticated.
    Nothing,
    /// That it chains to the CA (`verify-ca`).
    Chain,
    /// That it chains to the CA and names the host (`verify-full`).
    ChainAndName,
}

/// A rustls client configuration for a store; `ca` is required unless
/// `verify` is [`Verify::Nothing`].
pub fn client_config(verify: Verify, ca: Option<&Path>) -> anyhow::Result<Arc<ClientConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| anyhow::anyhow!("{}: cannot read the store's CA: {e}", ca.display()))?
            {
                roots
                    .add(cert)
                    .with_context(|| format!("{}: not a CA certificate", ca.display()))?;
            }
            anyhow::ensure!(
                !roots.is_empty(),
                "{}: no PEM certificate in it",
                ca.display()
            );
            Some(Arc::new(roots))
        }
        None => None,
    };
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let config = match (verify, roots) {
        (Verify::ChainAndName, Some(roots)) => builder.with_root_certificates(roots),
        (Verify::Chain, Some(roots)) => {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Verifier {
                    provider: provider.clone(),
                    check: Box::new(move |end_entity, intermediates, now| {
                        crate::verify::chain(&provider, &roots, end_entity, intermediates, now)
                    }),
                }))
        }
        (Verify::Nothing, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Verifier {
                provider,
                check: Box::new(|_, _, _| Ok(())),
            })),
        (_, None) => anyhow::bail!(
            "sslmode verify-ca and verify-full need the store's CA (sslrootcert, or `ca` in the topology)"
        ),
    };
    Ok(Arc::new(config.with_no_client_auth()))
}
