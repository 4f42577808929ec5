//! The key layout: `PREFIX/<system identifier>/<timeline, 8 hex>/<file name>`, so several clusters
//! (and timelines) share one bucket; a timeline's history file lives beside its segments.
use crate::wal::WalFileName;

/// The folder of one cluster's timeline: `PREFIX/SYSID/TTTTTTTT/` (ends with `/`).
pub fn timeline_prefix(prefix: &str, system_id: u64, tli: u32) -> String {
    let mut k = String::new();
    if !prefix.is_empty() {
        k.push_str(prefix);
        k.push('/');
    }
    k.push_str(&format!("{system_id}/{tli:08X}/"));
    k
}

/// The key of a complete segment, a timeline history file or a backup history file; None for
/// anything else (`.partial` files are not archived by the complete-file uploads: see
/// [`partial_key`]).
pub fn object_key(prefix: &str, system_id: u64, file: WalFileName, seg_size: u64) -> Option<String> {
    let tli = match file {
        WalFileName::Segment { tli, .. } | WalFileName::History { tli } | WalFileName::Backup { tli, .. } => tli,
        WalFileName::Partial { .. } => return None,
    };
    Some(timeline_prefix(prefix, system_id, tli) + &file.file_name(seg_size))
}

/// The key of the `.partial` object of segment `segno` (see `archive::partial`).
pub fn partial_key(prefix: &str, system_id: u64, tli: u32, segno: u64, seg_size: u64) -> String {
    timeline_prefix(prefix, system_id, tli) + &WalFileName::Partial { tli, segno }.file_name(seg_size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout() {
        let seg = WalFileName::Segment { tli: 2, segno: 0x103 };
        let k = object_key("prod/db1", 7_000_000_000_000_000_001, seg, 16 << 20).unwrap();
        assert_eq!(k, format!("prod/db1/7000000000000000001/00000002/{}", seg.file_name(16 << 20)));
        let h = object_key("", 42, WalFileName::History { tli: 10 }, 16 << 20).unwrap();
        assert_eq!(h, "42/0000000A/0000000A.history");
        assert_eq!(object_key("p", 1, WalFileName::Partial { tli: 1, segno: 1 }, 16 << 20), None);
    }
}
