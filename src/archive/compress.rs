//! Per-object compression of archived files (`--archive-compress none|zstd|lz4`): the object key
//! never changes with it, the `walship-compression` metadata names it, and the `walship-sha256`
//! checksum is always of the uncompressed file, so "already there with the same checksum" holds
//! whatever setting wrote the object. Decompression is bounded by [`OBJECT_BYTES_MAX`].
use std::io::{Read, Write};

/// The object metadata key (`x-amz-meta-walship-compression`) naming the compression.
pub const COMPRESSION_META: &str = "walship-compression";
/// The largest file an object may decompress to: the largest WAL segment size (1 GiB).
pub const OBJECT_BYTES_MAX: u64 = 1 << 30;
/// zstd's level: 3 is zstd's own default, fast enough to keep up with a disk on one core.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Zstd,
    Lz4,
}

impl Compression {
    /// `none`, `zstd` or `lz4` (the metadata value and the flag value).
    pub fn parse(s: &str) -> Option<Compression> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "" => Some(Compression::None),
            "zstd" => Some(Compression::Zstd),
            "lz4" => Some(Compression::Lz4),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
        }
    }

    /// The object body for `raw` (a copy of it for `None`).
    pub fn compress(self, raw: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(raw.to_vec()),
            Compression::Zstd => zstd::bulk::compress(raw, ZSTD_LEVEL),
            Compression::Lz4 => {
                let mut enc = lz4_flex::frame::FrameEncoder::new(Vec::with_capacity(raw.len() / 2));
                enc.write_all(raw)?;
                enc.finish().map_err(std::io::Error::other)
            }
        }
    }

    /// The file `body` holds; an error if it does not decode or is larger than `bytes_max`.
    pub fn decompress(self, body: &[u8], bytes_max: u64) -> std::io::Result<Vec<u8>> {
        let reader: Box<dyn Read + '_> = match self {
            Compression::None => return Ok(body.to_vec()),
            Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(body)?),
            Compression::Lz4 => Box::new(lz4_flex::frame::FrameDecoder::new(body)),
        };
        let mut out = Vec::new();
        reader.take(bytes_max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > bytes_max {
            return Err(std::io::Error::other(format!("decompresses to more than {bytes_max} bytes")));
        }
        Ok(out)
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn names() {
        for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
            assert_eq!(Compression::parse(c.as_str()), Some(c));
        }
        assert_eq!(Compression::parse("gzip"), None);
    }

    #[test]
    fn bounded_and_damage_detected() {
        let raw = vec![7u8; 1 << 20];
        for c in [Compression::Zstd, Compression::Lz4] {
            let body = c.compress(&raw).unwrap();
            assert!(body.len() < raw.len() / 10, "{c}: {}", body.len());
            assert!(c.decompress(&body, (1 << 20) - 1).is_err(), "{c}: limit not applied");
            let mut bad = body.clone();
            bad.truncate(bad.len() / 2);
            assert!(c.decompress(&bad, 1 << 30).is_err(), "{c}: truncated body decoded");
        }
    }

    proptest! {
        #[test]
        fn round_trip(raw in proptest::collection::vec(0u8..4, 0..20_000)) {
            for c in [Compression::None, Compression::Zstd, Compression::Lz4] {
                let body = c.compress(&raw).unwrap();
                prop_assert_eq!(c.decompress(&body, OBJECT_BYTES_MAX).unwrap(), raw.clone());
            }
        }
    }
}
