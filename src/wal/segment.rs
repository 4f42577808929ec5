//! WAL segment sizes and the canonical names of files in `pg_wal` (segments, `.partial`, `.history`,
//! `.backup`).

/// Smallest segment size PostgreSQL accepts (`WalSegMinSize`).
pub const SEG_SIZE_MIN: u64 = 1 << 20;
/// Largest segment size PostgreSQL accepts (`WalSegMaxSize`).
pub const SEG_SIZE_MAX: u64 = 1 << 30;
/// Smallest WAL block size (`--with-wal-blocksize` accepts 1..64 kB; we require >= 1 kB).
pub const BLOCK_SIZE_MIN: u64 = 1024;
/// Largest WAL block size.
pub const BLOCK_SIZE_MAX: u64 = 65536;

const PARTIAL_SUFFIX: &str = ".partial";
const HISTORY_SUFFIX: &str = ".history";
const BACKUP_SUFFIX: &str = ".backup";
/// `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup` (`BackupHistoryFileName`).
const BACKUP_NAME_LEN: usize = SEGMENT_NAME_LEN + 1 + 8 + BACKUP_SUFFIX.len();
const SEGMENT_NAME_LEN: usize = 24;
const HISTORY_NAME_LEN: usize = 8 + HISTORY_SUFFIX.len();

/// A power of two in `[SEG_SIZE_MIN, SEG_SIZE_MAX]` (`IsValidWalSegSize`).
pub fn is_valid_seg_size(seg_size: u64) -> bool {
    seg_size.is_power_of_two() && (SEG_SIZE_MIN..=SEG_SIZE_MAX).contains(&seg_size)
}

/// A power of two in `[BLOCK_SIZE_MIN, BLOCK_SIZE_MAX]`.
pub fn is_valid_block_size(block_size: u64) -> bool {
    block_size.is_power_of_two() && (BLOCK_SIZE_MIN..=BLOCK_SIZE_MAX).contains(&block_size)
}

/// Segments per "xlogid" (the middle 8 hex digits of a name): `0x1_0000_0000 / seg_size`.
fn segments_per_xlogid(seg_size: u64) -> u64 {
    debug_assert!(is_valid_seg_size(seg_size), "bad seg_size {seg_size}");
    (0x1_0000_0000 / seg_size.max(1)).max(1)
}

/// `XLogFileName`: `%08X%08X%08X` of timeline, `segno / per_id`, `segno % per_id`.
pub fn segment_file_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per_id = segments_per_xlogid(seg_size);
    format!("{:08X}{:08X}{:08X}", tli, segno / per_id, segno % per_id)
}

/// Whether `name` has the shape of a segment file name (24 upper-case hex digits), before the segment
/// size is known to check it fully with [`WalFileName::parse`].
pub fn has_segment_name_shape(name: &str) -> bool {
    name.len() == SEGMENT_NAME_LEN && name.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Bytes read from the start of a segment file to find its identity (the long page header).
pub const SEGMENT_HEAD_BYTES: usize = 8192;

/// The first [`SEGMENT_HEAD_BYTES`] of a segment file (fewer if it is shorter), for
/// [`crate::wal::WalIdentity::from_first_page`]. The one place `wal` reads a file outside `gen`.
pub fn read_segment_head(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let mut head = vec![0u8; SEGMENT_HEAD_BYTES];
    let n = file.read_at(&mut head, 0)?;
    head.truncate(n);
    Ok(head)
}

/// `TLHistoryFileName`: `%08X.history`.
pub fn history_file_name(tli: u32) -> String {
    format!("{:08X}{}", tli, HISTORY_SUFFIX)
}

/// A file name that may appear in `pg_wal` or an archive, parsed from its canonical form only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WalFileName {
    /// A complete segment `TTTTTTTTXXXXXXXXYYYYYYYY`.
    Segment { tli: u32, segno: u64 },
    /// An in-progress segment `TTTTTTTTXXXXXXXXYYYYYYYY.partial` (pg_receivewal convention).
    Partial { tli: u32, segno: u64 },
    /// A timeline history file `TTTTTTTT.history`.
    History { tli: u32 },
    /// A backup history file `TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`, written by
    /// `pg_backup_stop()`: the backup started in segment `segno` at byte `offset` of it.
    Backup { tli: u32, segno: u64, offset: u32 },
}

/// Upper-case hex digits only, exactly 8 of them.
fn parse_hex8(s: &str) -> Option<u32> {
    if s.len() != 8
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
    {
        return None;
    }
    u32::from_str_radix(s, 16).ok()
}

fn parse_segment_name(name: &str, seg_size: u64) -> Option<(u32, u64)> {
    if name.len() != SEGMENT_NAME_LEN || !name.is_ascii() {
        return None;
    }
    let tli = parse_hex8(&name[0..8])?;
    let xlogid = u64::from(parse_hex8(&name[8..16])?);
    let low = u64::from(parse_hex8(&name[16..24])?);
    let per_id = segments_per_xlogid(seg_size);
    if low >= per_id {
        return None;
    }
    // Overflow is impossible: xlogid < 2^32 and per_id <= 2^12.
    Some((tli, xlogid * per_id + low))
}

impl WalFileName {
    /// Parse a bare file name (no directory part). Accepts only what PostgreSQL itself writes: upper-case
    /// hex of exact length, a low part below `0x1_0000_0000 / seg_size`, and the exact suffixes.
    pub fn parse(name: &str, seg_size: u64) -> Option<WalFileName> {
        // Every canonical name is ASCII; checking first makes every byte index below a char boundary.
        if !is_valid_seg_size(seg_size) || !name.is_ascii() {
            return None;
        }
        if let Some(base) = name.strip_suffix(PARTIAL_SUFFIX) {
            let (tli, segno) = parse_segment_name(base, seg_size)?;
            return Some(WalFileName::Partial { tli, segno });
        }
        if let Some(base) = name.strip_suffix(BACKUP_SUFFIX).filter(|_| name.len() == BACKUP_NAME_LEN) {
            let (seg, offset) = base.split_at(SEGMENT_NAME_LEN);
            let (tli, segno) = parse_segment_name(seg, seg_size)?;
            let offset = parse_hex8(offset.strip_prefix('.')?)?;
            return (u64::from(offset) < seg_size).then_some(WalFileName::Backup { tli, segno, offset });
        }
        if name.len() == HISTORY_NAME_LEN {
            let tli = parse_hex8(name.strip_suffix(HISTORY_SUFFIX)?)?;
            return Some(WalFileName::History { tli });
        }
        let (tli, segno) = parse_segment_name(name, seg_size)?;
        Some(WalFileName::Segment { tli, segno })
    }

    /// The canonical file name.
    pub fn file_name(&self, seg_size: u64) -> String {
        match *self {
            WalFileName::Segment { tli, segno } => segment_file_name(tli, segno, seg_size),
            WalFileName::Partial { tli, segno } => {
                segment_file_name(tli, segno, seg_size) + PARTIAL_SUFFIX
            }
            WalFileName::History { tli } => history_file_name(tli),
            WalFileName::Backup { tli, segno, offset } => {
                format!("{}.{offset:08X}{BACKUP_SUFFIX}", segment_file_name(tli, segno, seg_size))
            }
        }
    }

    /// The timeline in the name.
    pub fn tli(&self) -> u32 {
        match *self {
            WalFileName::Segment { tli, .. }
            | WalFileName::Partial { tli, .. }
            | WalFileName::History { tli }
            | WalFileName::Backup { tli, .. } => tli,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::Lsn;
    use proptest::prelude::*;

    const MIB16: u64 = 16 << 20;

    #[test]
    fn sizes() {
        assert!(
            is_valid_seg_size(1 << 20) && is_valid_seg_size(16 << 20) && is_valid_seg_size(1 << 30)
        );
        assert!(
            !is_valid_seg_size(0) && !is_valid_seg_size(1 << 19) && !is_valid_seg_size(1 << 31)
        );
        assert!(!is_valid_seg_size(3 << 20));
        assert!(
            is_valid_block_size(1024) && is_valid_block_size(8192) && is_valid_block_size(65536)
        );
        assert!(
            !is_valid_block_size(512) && !is_valid_block_size(131072) && !is_valid_block_size(9000)
        );
    }

    #[test]
    fn known_names() {
        let segno = Lsn(0x0100_0000).segno(MIB16);
        assert_eq!(
            segment_file_name(1, segno, MIB16),
            "000000010000000000000001"
        );
        assert_eq!(
            segment_file_name(1, 0x100, MIB16),
            "000000010000000100000000"
        );
        assert_eq!(
            segment_file_name(0xA, 0x1FF, MIB16),
            "0000000A00000001000000FF"
        );
        assert_eq!(history_file_name(2), "00000002.history");
        // 1 GiB segments: 4 per xlogid.
        let gib = 1 << 30;
        assert_eq!(segment_file_name(1, 5, gib), "000000010000000100000001");
        assert_eq!(
            WalFileName::parse("000000010000000100000003", gib),
            Some(WalFileName::Segment { tli: 1, segno: 7 })
        );
        assert_eq!(WalFileName::parse("000000010000000100000004", gib), None);
        assert_eq!(
            WalFileName::parse("000000010000000000000001.partial", MIB16),
            Some(WalFileName::Partial { tli: 1, segno: 1 })
        );
        assert_eq!(
            WalFileName::parse("0000000A.history", MIB16),
            Some(WalFileName::History { tli: 10 })
        );
        let b = "00000001000000000000000B.00000028.backup";
        let parsed = WalFileName::parse(b, MIB16);
        assert_eq!(parsed, Some(WalFileName::Backup { tli: 1, segno: 0xB, offset: 0x28 }));
        assert_eq!(parsed.unwrap().file_name(MIB16), b);
        // offset beyond the segment, lower-case, wrong length
        assert_eq!(WalFileName::parse("00000001000000000000000B.01000000.backup", MIB16), None);
        assert_eq!(WalFileName::parse("00000001000000000000000B.0000002a.backup", MIB16), None);
        assert_eq!(WalFileName::parse("00000001000000000000000B.028.backup", MIB16), None);
    }

    #[test]
    fn rejects_non_canonical() {
        for name in [
            "",
            "../x",
            "../000000010000000000000001",
            "pg_wal/000000010000000000000001",
            "00000001000000000000000a",
            "0000000a.history",
            "00000001000000000000001",
            "0000000100000000000000011",
            "000000010000000000000001.partial.partial",
            "000000010000000000000001.PARTIAL",
            "000000010000000000000001.partia",
            "000000010000000000000001.partialx",
            "000000010000000000000001.history",
            ".partial",
            "00000001.partial",
            "0000001.history",
            "000000001.history",
            "00000001000000000000000G",
            "+00000010000000000000001",
            " 00000010000000000000001",
            "000000010000000000000100", // low part 0x100 >= 0x100 segments per id at 16 MiB
            "000000010000000000000001.backup",
            "0000000100000000000000é1",
            // The length of a .backup name with a multi-byte character where the offset's dot goes
            // (found by the segment_name fuzz target: it used to panic slicing inside the 'δ').
            "00000001000000000000000δ00000000.backup",
        ] {
            assert_eq!(WalFileName::parse(name, MIB16), None, "{name:?} parsed");
        }
        assert_eq!(WalFileName::parse("000000010000000000000001", 12345), None);
    }

    proptest! {
        #[test]
        fn names_round_trip(tli in any::<u32>(), shift in 20u32..=30, raw_segno in any::<u64>(), kind in 0u8..3) {
            let seg_size = 1u64 << shift;
            let segno = raw_segno % ((1u64 << 32) * (0x1_0000_0000 / seg_size));
            let name = match kind {
                0 => WalFileName::Segment { tli, segno },
                1 => WalFileName::Partial { tli, segno },
                _ => WalFileName::History { tli },
            };
            let text = name.file_name(seg_size);
            prop_assert_eq!(WalFileName::parse(&text, seg_size), Some(name));
            prop_assert_eq!(WalFileName::parse(&text.to_lowercase(), seg_size).is_some(),
                            text == text.to_lowercase());
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}", shift in 0u32..40) {
            let _ = WalFileName::parse(&s, 1u64 << shift);
        }
    }
}
