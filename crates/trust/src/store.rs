//! TLS to a PostgreSQL store for connections that do not go through sqlx
//! (the agent's replication connection), following libpq's `sslmode`:
//! `require` encrypts without checking the certificate, `verify-ca` checks
//! that it chains to `sslrootcert`, `verify-full` also that it names the
//! host.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

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
                .with_custom_certificate_verifier(Arc::new(Chain {
                    roots: Some(roots),
                    provider,
                }))
        }
        (Verify::Nothing, _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Chain {
                roots: None,
                provider,
            })),
        (_, None) => anyhow::bail!(
            "sslmode verify-ca and verify-full need the store's CA (sslrootcert, or `ca` in the topology)"
        ),
    };
    Ok(Arc::new(config.with_no_client_auth()))
}

/// Checks the chain only (`roots`), or nothing (`None`); signatures of the
/// handshake are always checked.
#[derive(Debug)]
struct Chain {
    roots: Option<Arc<RootCertStore>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Chain {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
