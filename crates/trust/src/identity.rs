//! Identities carried in certificates: SPIFFE IDs in the URI subject
//! alternative name, `spiffe://meridian/region/<region>` for an agent and
//! `spiffe://meridian/operator/<name>` for a person or tool that operates
//! agents.
//!
//! SPIFFE IDs are what SPIRE issues and what cert-manager (csi-driver-spiffe,
//! or a `uris:` entry of a Certificate) puts in certificates, so a region's
//! identity can come from the platform's own issuer. The identity is read
//! from the certificate the TLS handshake verified, never from anything the
//! peer says afterwards.

use std::fmt;

/// The SPIFFE trust domain of every Meridian identity.
pub const TRUST_DOMAIN: &str = "meridian";

/// Who a certificate speaks for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// The agent of one region.
    Region(String),
    /// An operator: may change agents (policy reload), not only read them.
    Operator(String),
}

impl Identity {
    /// Parses `spiffe://meridian/region/<name>` or
    /// `spiffe://meridian/operator/<name>`; anything else is `None`.
    pub fn from_uri(uri: &str) -> Option<Identity> {
        let path = uri.strip_prefix("spiffe://")?.strip_prefix(TRUST_DOMAIN)?;
        let (kind, name) = path.strip_prefix('/')?.split_once('/')?;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !valid {
            return None;
        }
        match kind {
            "region" => Some(Identity::Region(name.to_owned())),
            "operator" => Some(Identity::Operator(name.to_owned())),
            _ => None,
        }
    }

    /// The SPIFFE ID.
    pub fn uri(&self) -> String {
        match self {
            Identity::Region(r) => format!("spiffe://{TRUST_DOMAIN}/region/{r}"),
            Identity::Operator(o) => format!("spiffe://{TRUST_DOMAIN}/operator/{o}"),
        }
    }

    /// The identity of a certificate (DER): its one Meridian SPIFFE ID.
    /// A certificate with none, or with more than one, speaks for no one.
    pub fn of_certificate(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("unreadable certificate: {e}"))?;
        let mut found = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let x509_parser::extensions::GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    found.push(*uri);
                }
            }
        }
        match found.as_slice() {
            [uri] => Identity::from_uri(uri).ok_or_else(|| {
                format!(
                    "the certificate's SPIFFE ID {uri} is not spiffe://{TRUST_DOMAIN}/region/<region> or spiffe://{TRUST_DOMAIN}/operator/<name>"
                )
            }),
            [] => Err(format!(
                "the certificate has no SPIFFE ID (a URI subject alternative name like spiffe://{TRUST_DOMAIN}/region/eu)"
            )),
            _ => Err("the certificate has more than one SPIFFE ID".to_owned()),
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Region(r) => write!(f, "region {r}"),
            Identity::Operator(o) => write!(f, "operator {o}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip() {
        for id in [
            Identity::Region("eu-west".into()),
            Identity::Operator("oncall.sre".into()),
        ] {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id));
        }
    }

    #[test]
    fn other_trust_domains_and_shapes_are_no_one() {
        for uri in [
            "spiffe://other/region/eu",
            "spiffe://meridianx/region/eu",
            "spiffe://meridian/region/",
            "spiffe://meridian/region/eu/extra",
            "spiffe://meridian/tenant/eu",
            "spiffe://meridian/region",
            "https://meridian/region/eu",
            "spiffe://meridian/region/e u",
        ] {
            assert_eq!(Identity::from_uri(uri), None, "{uri}");
        }
    }
}
