//! A certificate authority for tests, demos and first deployments
//! (`meridian certs init`): ECDSA P-256 certificates whose only name is a
//! Meridian SPIFFE ID. Production deployments issue the same shape from
//! their own PKI (SPIRE, cert-manager, Vault).

use std::path::{Path, PathBuf};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::Identity;

/// A CA that signs region and operator certificates.
pub struct Authority {
    cert: rcgen::Certificate,
    key_pem: String,
    issuer: rcgen::Issuer<'static, KeyPair>,
}

/// When a certificate is valid, as (year, month, day) dates.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: (i32, u8, u8),
    pub not_after: (i32, u8, u8),
}

impl Default for Validity {
    /// From 2025 to 2035: long enough for a test CA, never for production.
    fn default() -> Validity {
        Validity {
            not_before: (2025, 1, 1),
            not_after: (2035, 1, 1),
        }
    }
}

fn dates(params: &mut CertificateParams, v: Validity) {
    params.not_before = rcgen::date_time_ymd(v.not_before.0, v.not_before.1, v.not_before.2);
    params.not_after = rcgen::date_time_ymd(v.not_after.0, v.not_after.1, v.not_after.2);
}

impl Authority {
    /// A new CA named `name`.
    pub fn new(name: &str) -> anyhow::Result<Authority> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        dates(&mut params, Validity::default());
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert,
            key_pem: key.serialize_pem(),
            issuer: rcgen::Issuer::new(params, key),
        })
    }

    /// The CA's certificate, PEM: the bundle peers trust.
    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A certificate for `id`, valid for client and server use, and its
    /// private key (both PEM).
    pub fn issue(&self, id: &Identity, validity: Validity) -> anyhow::Result<(String, String)> {
        let mut params = CertificateParams::new(Vec::new())?;
        params.distinguished_name.push(DnType::CommonName, id.uri());
        params.subject_alt_names = vec![SanType::URI(id.uri().try_into()?)];
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        dates(&mut params, validity);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// What [`init`] wrote.
#[derive(Debug)]
pub struct Written {
    pub ca: PathBuf,
    /// `(identity, certificate, key)`.
    pub certs: Vec<(Identity, PathBuf, PathBuf)>,
}

/// Writes a new CA (`ca.pem`, `ca-key.pem`) and a certificate and key for
/// each region (`<region>.pem`, `<region>-key.pem`) and for `operator`
/// (`operator-<name>.pem`, ...) into `out`. Keys are readable by the owner
/// only. Refuses to overwrite an existing CA.
pub fn init(regions: &[String], operator: &str, out: &Path) -> anyhow::Result<Written> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    anyhow::ensure!(
        !out.join("ca.pem").exists(),
        "{} exists: certs init makes a new CA; remove the folder's files first or choose another --out",
        out.join("ca.pem").display()
    );
    write_all(&Authority::new("Meridian test CA")?, regions, operator, out)
}

/// [`init`] with a given CA.
pub fn write_all(
    ca: &Authority,
    regions: &[String],
    operator: &str,
    out: &Path,
) -> anyhow::Result<Written> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ca_path = out.join("ca.pem");
    write(&ca_path, &ca.pem(), false)?;
    write(&out.join("ca-key.pem"), &ca.key_pem, true)?;
    let mut certs = Vec::new();
    let ids = regions
        .iter()
        .map(|r| (Identity::Region(r.clone()), r.clone()))
        .chain([(
            Identity::Operator(operator.to_owned()),
            format!("operator-{operator}"),
        )]);
    for (id, stem) in ids {
        anyhow::ensure!(
            Identity::from_uri(&id.uri()).as_ref() == Some(&id),
            "{stem}: names may hold letters, digits, '-', '_' and '.'"
        );
        let (cert, key) = ca.issue(&id, Validity::default())?;
        let cert_path = out.join(format!("{stem}.pem"));
        let key_path = out.join(format!("{stem}-key.pem"));
        write(&cert_path, &cert, false)?;
        write(&key_path, &key, true)?;
        certs.push((id, cert_path, key_path));
    }
    Ok(Written { ca: ca_path, certs })
}

fn write(path: &Path, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    // the mode of a file that existed before is set too
    let mode = if secret { 0o600 } else { 0o644 };
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))
        .with_context(|| format!("setting the mode of {}", path.display()))?;
    file.write_all(contents.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
