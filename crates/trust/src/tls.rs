//! mTLS for every connection an agent takes or makes (rustls, ring).
//!
//! - Both sides present a certificate chaining to the CA bundle of the
//!   topology, and both read the other's [`Identity`] from it: a client
//!   dialing region `eu` accepts only a certificate of `region/eu`, whatever
//!   its host names; a server accepts any valid certificate at the handshake
//!   and lets each service decide what that identity may do.
//! - Files are read again when they change ([`Live::reload_if_changed`]):
//!   new connections use the new certificate, streams already open go on
//!   until they reconnect.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use anyhow::Context;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::Identity;

/// Where one party's TLS material lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Files {
    /// CA bundle (PEM): the roots peers' certificates must chain to.
    pub ca: PathBuf,
    /// This party's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
}

/// Loaded TLS material and the identity it proves.
pub struct Credentials {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    /// Who this party is, from its own certificate.
    pub identity: Identity,
    server: Arc<ServerConfig>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const ALPN_H2: &[u8] = b"h2";

impl Credentials {
    /// Reads and checks `files`; errors name the file and what is wrong.
    pub fn load(files: &Files) -> anyhow::Result<Credentials> {
        let read_certs =
            |path: &Path, what: &str| -> anyhow::Result<Vec<CertificateDer<'static>>> {
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| anyhow::anyhow!("{}: cannot read {what}: {e}", path.display()))?;
                anyhow::ensure!(
                    !certs.is_empty(),
                    "{}: no PEM certificate in it (expected {what})",
                    path.display()
                );
                Ok(certs)
            };
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&files.ca, "the CA bundle")? {
            roots.add(ca).map_err(|e| {
                anyhow::anyhow!("{}: not a CA certificate: {e}", files.ca.display())
            })?;
        }
        let chain = read_certs(&files.cert, "this agent's certificate")?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| {
            anyhow::anyhow!("{}: cannot read the private key: {e}", files.key.display())
        })?;
        let identity = Identity::of_certificate(&chain[0])
            .map_err(|e| anyhow::anyhow!("{}: {e}", files.cert.display()))?;
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .context("building the client certificate verifier")?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .with_context(|| {
                format!(
                    "{} and {} do not make a usable certificate and key",
                    files.cert.display(),
                    files.key.display()
                )
            })?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Credentials {
            roots,
            chain,
            key,
            identity,
            server: Arc::new(server),
        })
    }

    /// Whether this party's own certificate is valid now and chains to its
    /// own CA bundle: what its peers will check. Expired, not yet valid, or
    /// from a CA the bundle does not hold (a CA rotation done halfway) is
    /// an error naming the file.
    fn check_own(&self, files: &Files) -> anyhow::Result<()> {
        let crypto = provider();
        crate::verify::chain(
            &crypto,
            &self.roots,
            &self.chain[0],
            &self.chain[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .map_err(|e| {
            anyhow::anyhow!(
                "{}: this certificate would be refused by peers: {e} (checked against {})",
                files.cert.display(),
                files.ca.display()
            )
        })
    }

    /// The server side: a client certificate is required.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server.clone()
    }

    /// The client side, for dialing `expect`: the server's certificate must
    /// chain to the CA bundle and carry `expect`'s SPIFFE ID.
    pub fn client_config(&self, expect: Identity) -> anyhow::Result<Arc<ClientConfig>> {
        // the chain as WebPKI checks it, the name as a SPIFFE ID
        let (roots, crypto) = (self.roots.clone(), provider());
        let verifier = Arc::new(crate::verify::Verifier {
            provider: crypto.clone(),
            check: Box::new(move |end_entity, intermediates, now| {
                crate::verify::chain(&crypto, &roots, end_entity, intermediates, now)?;
                match Identity::of_certificate(end_entity) {
                    Ok(id) if id == expect => Ok(()),
                    Ok(id) => Err(refused(format!(
                        "the peer's certificate is for {id}, expected {expect}"
                    ))),
                    Err(e) => Err(refused(e)),
                }
            }),
        });
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .context("the client certificate and key")?;
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Arc::new(config))
    }
}

fn refused(message: String) -> rustls::Error {
    #[derive(Debug)]
    struct Refused(String);
    impl std::fmt::Display for Refused {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Refused {}
    rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
        Arc::new(Refused(message)),
    )))
}

/// Credentials that follow their files: [`Live::reload_if_changed`] reads
/// them again when a file's modification time changed, and keeps the ones
/// in use if the new files do not load (a half-written rotation).
pub struct Live {
    files: Files,
    current: RwLock<(Arc<Credentials>, [Option<SystemTime>; 3])>,
}

fn stamps(files: &Files) -> [Option<SystemTime>; 3] {
    [&files.ca, &files.cert, &files.key]
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

impl Live {
    /// Loads `files`; the certificate must be valid now and chain to the
    /// bundle (see [`Live::reload_if_changed`]).
    pub fn load(files: Files) -> anyhow::Result<Live> {
        let stamp = stamps(&files);
        let credentials = Credentials::load(&files)?;
        credentials.check_own(&files)?;
        let credentials = Arc::new(credentials);
        Ok(Live {
            files,
            current: RwLock::new((credentials, stamp)),
        })
    }

    /// The credentials for a new connection.
    pub fn current(&self) -> Arc<Credentials> {
        self.current.read().expect("credentials lock").0.clone()
    }

    /// Reloads if any file changed (or if `force`); `Ok(true)` when new
    /// credentials are in use. The identity may not change: a region's
    /// agent stays that region.
    pub fn reload_if_changed(&self, force: bool) -> anyhow::Result<bool> {
        let stamp = stamps(&self.files);
        {
            let current = self.current.read().expect("credentials lock");
            if !force && current.1 == stamp {
                return Ok(false);
            }
        }
        let loaded = Credentials::load(&self.files);
        let mut current = self.current.write().expect("credentials lock");
        current.1 = stamp; // a bad file is reported once, not every tick
        let loaded = loaded?;
        loaded
            .check_own(&self.files)
            .context("keeping the certificate in use")?;
        anyhow::ensure!(
            loaded.identity == current.0.identity,
            "{}: the new certificate is for {}, not {}; keeping the old one",
            self.files.cert.display(),
            loaded.identity,
            current.0.identity
        );
        current.0 = Arc::new(loaded);
        Ok(true)
    }
}
