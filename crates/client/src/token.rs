//! Commit tokens: where and when a routed write committed.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use meridian_core::Lsn;

use crate::Error;

/// Proof of a committed routed write: the region whose store committed it,
/// the WAL position at or past its commit record, and the commit time.
///
/// A reader in another region waits with [`crate::Read::after`] until that
/// region has applied the position. Tokens travel as short strings
/// (`1.eu.16b3748.19355d1a2b0`: format version, region, position and Unix
/// milliseconds in hex), safe in an HTTP header; [`fmt::Display`] writes one
/// and [`FromStr`] reads one back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitToken {
    pub region: String,
    pub lsn: Lsn,
    pub committed_at: SystemTime,
}

impl fmt::Display for CommitToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let millis = self
            .committed_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        write!(f, "1.{}.{:x}.{millis:x}", self.region, self.lsn.0)
    }
}

impl FromStr for CommitToken {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self, Error> {
        let bad = |what: &str| Error::BadToken {
            token: text.chars().take(80).collect(),
            problem: what.to_owned(),
        };
        let mut parts = text.trim().split('.');
        let (Some(version), Some(region), Some(lsn), Some(millis), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(bad(
                "expected 4 dot-separated parts: version.region.lsn.millis",
            ));
        };
        if version != "1" {
            return Err(bad(&format!(
                "format version {version:?}; this library reads version 1"
            )));
        }
        if region.is_empty()
            || !region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(bad("the region must be a region name"));
        }
        let lsn = u64::from_str_radix(lsn, 16).map_err(|_| bad("the position is not hex"))?;
        let millis = u64::from_str_radix(millis, 16).map_err(|_| bad("the time is not hex"))?;
        Ok(CommitToken {
            region: region.to_owned(),
            lsn: Lsn(lsn),
            committed_at: UNIX_EPOCH + Duration::from_millis(millis),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn is_short_and_reads_back() {
        let token = CommitToken {
            region: "eu".into(),
            lsn: Lsn(0x16B3748),
            committed_at: UNIX_EPOCH + Duration::from_millis(1_763_900_000_123),
        };
        let text = token.to_string();
        assert_eq!(text, "1.eu.16b3748.19ab0a2077b");
        assert_eq!(text.parse::<CommitToken>().unwrap(), token);
    }

    #[test]
    fn says_what_is_wrong() {
        for (text, expected) in [
            ("", "4 dot-separated parts"),
            ("2.eu.1.1", "version \"2\""),
            ("1.EU.1.1", "region name"),
            ("1.eu.xyz.1", "position is not hex"),
            ("1.eu.1.1.1", "4 dot-separated parts"),
        ] {
            let e = text.parse::<CommitToken>().unwrap_err().to_string();
            assert!(e.contains(expected), "{text:?}: {e}");
        }
    }

    proptest! {
        #[test]
        fn every_token_round_trips(region in "[a-z][a-z0-9_]{0,15}", lsn: u64, millis in 0u64..(1 << 50)) {
            let token = CommitToken {
                region,
                lsn: Lsn(lsn),
                committed_at: UNIX_EPOCH + Duration::from_millis(millis),
            };
            let text = token.to_string();
            prop_assert!(text.len() <= 2 + 16 + 1 + 16 + 1 + 13 + 2);
            prop_assert_eq!(text.parse::<CommitToken>().unwrap(), token);
        }
    }
}
