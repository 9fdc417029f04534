//! Connection parameters from a `postgres://user:password@host:port/db` URL.

/// What the replication connection needs to reach and log into a store.
#[derive(Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
    /// libpq's `sslmode` (`prefer` when absent; `allow` and `prefer`
    /// connect without TLS here).
    pub sslmode: SslMode,
    /// `sslrootcert`: the CA the store's certificate must chain to.
    pub sslrootcert: Option<std::path::PathBuf>,
}

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, String> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(format!(
                    "store URL has sslmode={other:?}; expected disable, allow, prefer, require, verify-ca or verify-full"
                ));
            }
        })
    }
}

impl std::fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

impl ConnInfo {
    /// Parses a URL. Of the query parameters, `sslmode` and `sslrootcert`
    /// are read, the others ignored; only TCP hosts are supported.
    pub fn parse(url: &str) -> Result<ConnInfo, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or("store URL must start with postgres://")?;
        let rest = rest.split('#').next().unwrap_or_default();
        let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut sslmode = SslMode::Prefer;
        let mut sslrootcert = None;
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            match key {
                "sslmode" => sslmode = SslMode::parse(&decode(value)?)?,
                "sslrootcert" => sslrootcert = Some(decode(value)?.into()),
                _ => {}
            }
        }
        let (auth, hostpath) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (user, password) = match auth {
            Some(a) => match a.split_once(':') {
                Some((u, p)) => (decode(u)?, Some(decode(p)?)),
                None => (decode(a)?, None),
            },
            None => ("postgres".to_owned(), None),
        };
        let (hostport, database) = hostpath.split_once('/').unwrap_or((hostpath, ""));
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse()
                    .map_err(|_| format!("store URL has an invalid port {p:?}"))?,
            ),
            None => (hostport, 5432),
        };
        let host = if host.is_empty() { "localhost" } else { host };
        let database = if database.is_empty() {
            user.clone()
        } else {
            decode(database)?
        };
        Ok(ConnInfo {
            host: host.trim_matches(['[', ']']).to_owned(),
            port,
            user,
            password,
            database,
            sslmode,
            sslrootcert,
        })
    }
}

/// Percent-decoding.
fn decode(s: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or("store URL has an invalid %-escape")?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "store URL is not valid UTF-8 after %-decoding".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_tls_parameters() {
        let c = ConnInfo::parse(
            "postgres://app@db:5432/orders?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Fca%20dir%2Fca.pem",
        )
        .unwrap();
        assert_eq!(c.sslmode, SslMode::VerifyFull);
        assert_eq!(
            c.sslrootcert.as_deref(),
            Some(std::path::Path::new("/etc/ca dir/ca.pem"))
        );
        assert_eq!(c.database, "orders");
        assert_eq!(
            ConnInfo::parse("postgres://db/x").unwrap().sslmode,
            SslMode::Prefer
        );
        let e = ConnInfo::parse("postgres://db/x?sslmode=verify")
            .err()
            .unwrap();
        assert!(e.contains("sslmode=\"verify\""), "{e}");
    }

    #[test]
    fn parses_urls() {
        let c = ConnInfo::parse("postgres://app:p%40ss@db.example:6543/orders?sslmode=disable")
            .unwrap();
        assert_eq!((c.host.as_str(), c.port), ("db.example", 6543));
        assert_eq!(
            (c.user.as_str(), c.password.as_deref()),
            ("app", Some("p@ss"))
        );
        assert_eq!(c.database, "orders");
        assert!(!format!("{c:?}").contains("p@ss"));
        let d = ConnInfo::parse("postgresql://postgres@127.0.0.1/").unwrap();
        assert_eq!(
            (d.port, d.database.as_str(), d.password),
            (5432, "postgres", None)
        );
        assert!(ConnInfo::parse("mysql://x").is_err());
        assert!(ConnInfo::parse("postgres://h:notaport/db").is_err());
    }
}
