//! Commit tokens: which routed write committed, where.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use meridian_core::Lsn;
use uuid::Uuid;

use crate::Error;

/// How long a region keeps the ids of the tokens it applied (the agent
/// prunes older ones). A reader with an older token waits by position.
pub const TOKEN_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Proof of a committed routed write: the region whose store committed it,
/// the transaction's id, and a WAL position just before its commit.
///
/// The id tags the transaction itself (a logical decoding message written
/// in it), and every region records the ids it applies, so
/// [`crate::Read::after`] waits for exactly this transaction: no longer
/// than its replication lag, whatever else writes to the store. The id is
/// a UUIDv7: it also tells when the write committed.
///
/// Tokens travel as short strings (`2.eu.16b3748.AZrK...`: format version,
/// region, position in hex, id in URL-safe base64), safe in an HTTP header;
/// [`fmt::Display`] writes one and [`FromStr`] reads one back. Version 1
/// tokens (position only) are still read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitToken {
    pub region: String,
    /// A position at or before the commit (version 1: at or after it).
    pub lsn: Lsn,
    /// The transaction's tag; None for version 1 tokens.
    pub id: Option<Uuid>,
    pub committed_at: SystemTime,
}

impl CommitToken {
    /// A new token for a transaction about to commit in `region`.
    pub(crate) fn new(region: &str, lsn: Lsn) -> CommitToken {
        let id = Uuid::now_v7();
        CommitToken {
            region: region.to_owned(),
            lsn,
            committed_at: time_of(&id),
            id: Some(id),
        }
    }

    /// The tag's text in the transaction's message: 32 hex digits.
    pub(crate) fn tag(&self) -> Option<String> {
        self.id.map(|id| id.simple().to_string())
    }
}

fn time_of(id: &Uuid) -> SystemTime {
    let (secs, nanos) = id.get_timestamp().map_or((0, 0), |t| t.to_unix());
    UNIX_EPOCH + Duration::new(secs, nanos)
}

impl fmt::Display for CommitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.id {
            Some(id) => write!(
                f,
                "2.{}.{:x}.{}",
                self.region,
                self.lsn.0,
                URL_SAFE_NO_PAD.encode(id.as_bytes())
            ),
            None => {
                let millis = self
                    .committed_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                write!(f, "1.{}.{:x}.{millis:x}", self.region, self.lsn.0)
            }
        }
    }
}

impl FromStr for CommitToken {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |what: &str| Error::BadToken {
            token: text.chars().take(80).collect(),
            problem: what.to_owned(),
        };
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [version, region, lsn, last] = parts[..] else {
            return Err(bad(
                "expected 4 dot-separated parts: version.region.position.id",
            ));
        };
        if version != "1" && version != "2" {
            return Err(bad(&format!(
                "format version {version:?}; this library reads versions 1 and 2"
            )));
        }
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(bad("the region must be a region name"));
        }
        let lsn = Lsn(u64::from_str_radix(lsn, 16).map_err(|_| bad("the position is not hex"))?);
        let region = region.to_owned();
        if version == "1" {
            let millis = u64::from_str_radix(last, 16).map_err(|_| bad("the time is not hex"))?;
            return Ok(CommitToken {
                region,
                lsn,
                id: None,
                committed_at: UNIX_EPOCH + Duration::from_millis(millis),
            });
        }
        let id = URL_SAFE_NO_PAD
            .decode(last)
            .ok()
            .and_then(|bytes| Uuid::from_slice(&bytes).ok())
            .ok_or_else(|| bad("the id is not 22 characters of URL-safe base64"))?;
        if id.get_version_num() != 7 {
            return Err(bad("the id is not one this library made (a UUIDv7)"));
        }
        Ok(CommitToken {
            region,
            lsn,
            committed_at: time_of(&id),
            id: Some(id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn is_short_and_reads_back() {
        let token = CommitToken::new("eu", Lsn(0x16B3748));
        let text = token.to_string();
        assert!(text.starts_with("2.eu.16b3748."), "{text}");
        assert!(text.len() < 40, "{text}");
        let read: CommitToken = text.parse().unwrap();
        assert_eq!(read, token);
        let age = SystemTime::now().duration_since(read.committed_at).unwrap();
        assert!(age < Duration::from_secs(60), "{age:?}");
        assert_eq!(token.tag().unwrap().len(), 32);
    }

    #[test]
    fn reads_version_1_tokens() {
        let token: CommitToken = "1.eu.16b3748.19ab0a2077b".parse().unwrap();
        assert_eq!(token.id, None);
        assert_eq!(token.lsn, Lsn(0x16B3748));
        assert_eq!(
            token.committed_at,
            UNIX_EPOCH + Duration::from_millis(1_763_900_000_123)
        );
        assert_eq!(token.to_string(), "1.eu.16b3748.19ab0a2077b");
    }

    #[test]
    fn says_what_is_wrong() {
        for (text, expected) in [
            ("", "4 dot-separated parts"),
            ("3.eu.1.1", "version \"3\""),
            ("1.EU.1.1", "region name"),
            ("1.eu.xyz.1", "position is not hex"),
            ("1.eu.1.1.1", "4 dot-separated parts"),
            ("2.eu.1.short", "URL-safe base64"),
            ("2.eu.1.AAAAAAAAAAAAAAAAAAAAAA", "UUIDv7"),
        ] {
            let e = text.parse::<CommitToken>().unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn every_token_round_trips(region in "[a-z][a-z0-9_]{0,15}", lsn: u64, id: u128) {
            // a UUIDv7: version and variant bits set
            let id = Uuid::from_u128(
                (id & !(0xF000u128 << 64) & !(0xC000u128 << 48)) | (0x7000u128 << 64) | (0x8000u128 << 48),
            );
            prop_assert_eq!(id.get_version_num(), 7);
            let token = CommitToken {
                region,
                lsn: Lsn(lsn),
                committed_at: time_of(&id),
                id: Some(id),
            };
            let text = token.to_string();
            prop_assert!(text.len() <= 2 + 16 + 1 + 16 + 1 + 22);
            prop_assert_eq!(text.parse::<CommitToken>().unwrap(), token);
        }
    }
}
