//! Connection options of a store: its URL, plus the topology's `ca` for TLS.

use std::path::Path;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

use crate::Error;

/// Connection options from a store's URL and the topology's CA file for it.
/// `key` names the store in errors (`regions.eu.store`, `global.store`).
///
/// Without a CA the URL decides alone (`sslmode`, `sslrootcert`, ...). With
/// one, the server's certificate must chain to that CA (it replaces any
/// `sslrootcert` of the URL) and name the URL's host: the mode becomes
/// `verify-full`. A URL that asks for `verify-ca` or `verify-full` keeps its
/// mode; `disable`, `allow`, `prefer` (the default) and `require` are raised
/// to `verify-full`, so naming a CA never leaves a connection unverified or
/// in plain text.
///
/// Pure: the CA file is read when a connection is made.
pub(crate) fn connect_options(
    key: &str,
    url: &str,
    ca: Option<&Path>,
) -> Result<PgConnectOptions, Error> {
    let options =
        PgConnectOptions::from_str(url).map_err(|e| Error::Config(format!("{key}: {e}")))?;
    let Some(ca) = ca else {
        return Ok(options);
    };
    let mode = match options.get_ssl_mode() {
        mode @ (PgSslMode::VerifyCa | PgSslMode::VerifyFull) => mode,
        PgSslMode::Disable | PgSslMode::Allow | PgSslMode::Prefer | PgSslMode::Require => {
            PgSslMode::VerifyFull
        }
    };
    Ok(options.ssl_root_cert(ca).ssl_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(options: &PgConnectOptions) -> &'static str {
        match options.get_ssl_mode() {
            PgSslMode::Disable => "disable",
            PgSslMode::Allow => "allow",
            PgSslMode::Prefer => "prefer",
            PgSslMode::Require => "require",
            PgSslMode::VerifyCa => "verify-ca",
            PgSslMode::VerifyFull => "verify-full",
        }
    }

    /// The root certificate has no getter; `Debug` shows it.
    fn root_cert(options: &PgConnectOptions) -> String {
        let shown = format!("{options:?}");
        let start = shown
            .find("ssl_root_cert: ")
            .expect("Debug shows ssl_root_cert");
        let rest = &shown[start + "ssl_root_cert: ".len()..];
        rest[..rest.find(", ssl_").unwrap_or(rest.len())].to_owned()
    }

    const URL: &str = "postgres://meridian@db.internal:5432/app";

    #[test]
    fn without_a_ca_the_url_decides() {
        let o = connect_options("regions.eu.store", URL, None).unwrap();
        assert_eq!(root_cert(&o), "None");
        assert_eq!(o.get_host(), "db.internal");
        for m in ["disable", "require", "verify-ca", "verify-full"] {
            let o =
                connect_options("regions.eu.store", &format!("{URL}?sslmode={m}"), None).unwrap();
            assert_eq!(mode(&o), m);
        }
        let o = connect_options(
            "global.store",
            &format!("{URL}?sslmode=verify-full&sslrootcert=/etc/url-ca.pem"),
            None,
        )
        .unwrap();
        assert!(
            root_cert(&o).contains("/etc/url-ca.pem"),
            "{}",
            root_cert(&o)
        );
    }

    #[test]
    fn a_ca_means_verify_full_unless_the_url_already_verifies() {
        let ca = Path::new("/etc/meridian/eu-ca.pem");
        let cases = [
            ("", "verify-full"),
            ("?sslmode=disable", "verify-full"),
            ("?sslmode=allow", "verify-full"),
            ("?sslmode=prefer", "verify-full"),
            ("?sslmode=require", "verify-full"),
            ("?sslmode=verify-ca", "verify-ca"),
            ("?sslmode=verify-full", "verify-full"),
        ];
        for (query, expected) in cases {
            let o =
                connect_options("regions.eu.store", &format!("{URL}{query}"), Some(ca)).unwrap();
            assert_eq!(mode(&o), expected, "{query}");
            assert!(
                root_cert(&o).contains("/etc/meridian/eu-ca.pem"),
                "{query}: {}",
                root_cert(&o)
            );
        }
    }

    #[test]
    fn the_topology_ca_replaces_the_urls() {
        let o = connect_options(
            "global.store",
            &format!("{URL}?sslrootcert=/etc/url-ca.pem"),
            Some(Path::new("/etc/topology-ca.pem")),
        )
        .unwrap();
        let root = root_cert(&o);
        assert!(
            root.contains("/etc/topology-ca.pem") && !root.contains("url-ca"),
            "{root}"
        );
    }

    #[test]
    fn errors_name_the_store() {
        let ca = Some(Path::new("ca.pem"));
        for (key, url) in [
            (
                "regions.eu.store",
                "postgres://meridian:s3cret@db:notaport/app",
            ),
            ("global.store", "postgres://db/app?sslmode=paranoid"),
        ] {
            let e = connect_options(key, url, ca).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{e:?}");
            let e = e.to_string();
            assert!(e.starts_with(&format!("{key}: ")), "{e}");
            assert!(!e.contains("s3cret"), "{e}");
        }
    }
}
