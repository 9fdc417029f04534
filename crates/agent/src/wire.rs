//! Batch compression on gRPC links, negotiated per stream: the
//! destination's `Welcome` lists the compressions it reads, and the source
//! compresses with one of them or not at all. So agents of different
//! releases always understand each other.

/// zstd, at level 1: a few milliseconds per batch, a third to a fifth of
/// the bytes for row text.
pub(crate) const ZSTD: &str = "zstd";

/// The compressions this agent reads, as its `Welcome` lists them.
pub(crate) fn reads() -> Vec<String> {
    vec![ZSTD.to_owned()]
}

/// Compresses a batch's payload with zstd.
pub(crate) fn compress(payload: &[u8]) -> Vec<u8> {
    zstd::bulk::compress(payload, 1).expect("zstd compresses any input into a Vec")
}

/// Why a payload could not be made readable.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Unreadable {
    /// A compression this agent does not know (a newer sender ignored the
    /// Welcome): the batch is refused, never skipped.
    Unknown(String),
    /// The bytes do not decompress, or to more than `limit`: the sender
    /// made them so (the crc32 covers the bytes as sent), and sends them
    /// again; the batch is refused, never skipped.
    Damaged(String),
}

/// The payload as encoded: decompressed if `compression` says so, at most
/// `limit` bytes.
pub(crate) fn decompress<'a>(
    compression: &str,
    payload: &'a [u8],
    limit: usize,
) -> Result<std::borrow::Cow<'a, [u8]>, Unreadable> {
    match compression {
        "" => Ok(std::borrow::Cow::Borrowed(payload)),
        ZSTD => {
            // streamed, so memory grows with what the payload really holds
            use std::io::Read;
            let mut out = Vec::with_capacity(payload.len().saturating_mul(4).min(limit));
            zstd::stream::read::Decoder::new(payload)
                .and_then(|d| d.take(limit as u64 + 1).read_to_end(&mut out))
                .map_err(|e| {
                    Unreadable::Damaged(format!("zstd payload does not decompress: {e}"))
                })?;
            if out.len() > limit {
                return Err(Unreadable::Damaged(format!(
                    "zstd payload decompresses to more than {limit} bytes"
                )));
            }
            Ok(std::borrow::Cow::Owned(out))
        }
        other => Err(Unreadable::Unknown(format!(
            "batch compressed with {other:?}, which this agent does not read (it reads {:?}); upgrade the receiving agent",
            reads()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_payloads_come_back_whole_and_bounded() {
        let payload: Vec<u8> = (0..100_000u32)
            .flat_map(|i| format!("row {i} text {}", i % 97).into_bytes())
            .collect();
        let packed = compress(&payload);
        assert!(packed.len() * 3 < payload.len(), "{}", packed.len());
        assert_eq!(decompress(ZSTD, &packed, payload.len()).unwrap(), payload);
        assert_eq!(decompress("", &payload, 0).unwrap(), payload);
        // a payload that would decompress past the limit is refused
        assert!(matches!(
            decompress(ZSTD, &packed, payload.len() - 1),
            Err(Unreadable::Damaged(_))
        ));
        assert!(matches!(
            decompress(ZSTD, b"not zstd", 1 << 20),
            Err(Unreadable::Damaged(_))
        ));
        let Err(Unreadable::Unknown(reason)) = decompress("lz9", &packed, 1 << 20) else {
            panic!("unknown compression accepted");
        };
        assert!(
            reason.contains("lz9") && reason.contains("upgrade"),
            "{reason}"
        );
    }
}
