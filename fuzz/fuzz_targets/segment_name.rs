//! Fuzz target: `WalFileName::parse` on arbitrary strings must never panic and must accept only canonical
//! names (whatever parses prints back to exactly the input); names built from arbitrary (timeline, segno)
//! must parse back to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::wal::{segment_file_name, WalFileName};

fuzz_target!(|input: &[u8]| {
    let Some((&sel, rest)) = input.split_first() else {
        return;
    };
    // Mostly valid segment sizes (1 MiB..1 GiB), sometimes invalid ones (parse must refuse them).
    let seg_size = match sel % 16 {
        11 => 0,
        12 => 3 << 20,
        13 => 1 << 31,
        14 => 1 << 19,
        n => 1u64 << (20 + u32::from(n % 11)),
    };
    let valid = seg_size.is_power_of_two() && ((1 << 20)..=(1 << 30)).contains(&seg_size);

    // 1. Arbitrary text.
    if let Ok(name) = std::str::from_utf8(rest) {
        if let Some(parsed) = WalFileName::parse(name, seg_size) {
            assert!(valid, "parsed {name:?} with invalid seg_size {seg_size}");
            assert_eq!(parsed.file_name(seg_size), name, "only canonical names parse");
            assert_eq!(WalFileName::parse(&parsed.file_name(seg_size), seg_size), Some(parsed));
        }
    }
    // 2. Arbitrary (timeline, segno): format, parse back.
    if valid && rest.len() >= 13 {
        let tli = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let raw = u64::from_le_bytes([rest[4], rest[5], rest[6], rest[7], rest[8], rest[9], rest[10], rest[11]]);
        let per_id = 0x1_0000_0000u64 / seg_size;
        let segno = raw % (0x1_0000_0000u64 * per_id);
        let name = match rest[12] % 3 {
            0 => WalFileName::Segment { tli, segno },
            1 => WalFileName::Partial { tli, segno },
            _ => WalFileName::History { tli },
        };
        let text = name.file_name(seg_size);
        if let WalFileName::Segment { .. } = name {
            assert_eq!(text, segment_file_name(tli, segno, seg_size));
            assert_eq!(text.len(), 24);
        }
        assert_eq!(WalFileName::parse(&text, seg_size), Some(name), "round trip of {text}");
        // Lower-case is never canonical.
        let lower = text.to_ascii_lowercase();
        if lower != text {
            assert_eq!(WalFileName::parse(&lower, seg_size), None, "accepted lower-case {lower}");
        }
    }
});
