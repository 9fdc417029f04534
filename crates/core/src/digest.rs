//! Content fingerprints: what `meridian status` compares across regions to
//! show drift.

use sha2::{Digest, Sha256};

/// sha256 of `bytes`, as 64 lowercase hex digits.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The first 48 bits of a hex digest as a number: exact in a Prometheus
/// sample (a float), so an alert can compare regions' fingerprints
/// (`max by (file) (...) != min by (file) (...)`). 0 for an empty digest.
pub fn gauge_value(hex: &str) -> i64 {
    hex.get(..12)
        .and_then(|h| i64::from_str_radix(h, 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(gauge_value(&sha256_hex(b"abc")), 0xba7816bf8f01);
        assert_eq!(gauge_value(""), 0);
    }
}
