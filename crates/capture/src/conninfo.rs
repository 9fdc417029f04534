//! Connection parameters from a `postgres://user:password@host:port/db` URL.

/// What the replication connection needs to reach and log into a store.
#[derive(Clone)]
pub struct ConnInfo {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
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
    /// Parses a URL. Query parameters are ignored; only TCP hosts are supported.
    pub fn parse(url: &str) -> Result<ConnInfo, String> {
        let rest = url
            .strip_prefix("postgres://")
            .or_else(|| url.strip_prefix("postgresql://"))
            .ok_or("store URL must start with postgres://")?;
        let rest = rest.split(['?', '#']).next().unwrap_or_default();
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
