//! Page checks just before WAL is shipped (safety rule 4): every page header in a frame must
//! belong to its position (magic, `xlp_pageaddr`, timeline, long header at segment starts).
//!
//! One legitimate exception: after an `XLOG_SWITCH` record PostgreSQL leaves the rest of the
//! segment unwritten (zeros, or a recycled file's old pages). A page that fails the check is
//! accepted only when the segment's records, walked from its start, reach the segment end — then
//! it is such padding, and the frame is flagged so the receiver does not reject it either.

use std::collections::BTreeSet;

use crate::uring::SegmentMap;
use crate::wal::{validate_page, Lsn, PageError, RecordWalker, SegmentWalk, WalIdentity};

#[derive(Debug)]
pub struct PageChecker {
    id: WalIdentity,
    /// Segments whose records were walked to the end.
    walked_to_end: BTreeSet<u64>,
}

/// The outcome for one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagesOk {
    AllValid,
    /// Some pages are the padding after a switch record.
    SwitchPadding,
}

impl PageChecker {
    pub fn new(id: WalIdentity) -> PageChecker {
        PageChecker { id, walked_to_end: BTreeSet::new() }
    }

    /// Checks the page headers of `[lsn, lsn + len)` within `map`, the segment holding `lsn`.
    /// A page whose header lies only partly in the range is checked too (its bytes are in the map).
    pub fn check(&mut self, map: &SegmentMap, lsn: Lsn, len: u64) -> Result<PagesOk, (Lsn, PageError)> {
        let block = self.id.block_size;
        let seg_size = self.id.seg_size;
        let segno = lsn.0 / seg_size;
        let mut outcome = PagesOk::AllValid;
        let mut page = Lsn(lsn.0 & !(block - 1));
        while page < lsn + len {
            let off = (page.0 % seg_size) as usize;
            let bytes = &map.bytes()[off..off + block as usize];
            if let Err(e) = validate_page(bytes, page, &self.id) {
                if !self.segment_walks_to_end(segno, map) {
                    return Err((page, e));
                }
                outcome = PagesOk::SwitchPadding;
            }
            page = page + block;
        }
        Ok(outcome)
    }

    fn segment_walks_to_end(&mut self, segno: u64, map: &SegmentMap) -> bool {
        if self.walked_to_end.contains(&segno) {
            return true;
        }
        let seg_start = Lsn(segno * self.id.seg_size);
        let mut walker = RecordWalker::new(self.id, seg_start);
        let complete = matches!(walker.walk_segment(seg_start, map.bytes()), Ok(SegmentWalk::Continues { .. }));
        if complete {
            self.walked_to_end.insert(segno);
        }
        complete
    }

    /// Segments below `segno` will not be checked again.
    pub fn forget_below(&mut self, segno: u64) {
        self.walked_to_end.retain(|&s| s >= segno);
    }
}

/// Frames whose pages were already checked in this run, so that every destination after the
/// first sends them without checking again (several destinations, one check per page). Keyed by
/// frame slot (`lsn / frame_bytes`): the range checked there and whether it held switch padding.
///
/// The caller uses an entry only while the WAL cannot have changed under the mapping since the
/// check: the source is at rest, or the replication slot still protects the range.
#[derive(Debug, Default)]
pub struct CheckedFrames {
    frame_bytes: u64,
    frames: std::collections::BTreeMap<u64, Checked>,
}

/// One checked range: its bounds, the pages' outcome and the CRC32C of exactly its bytes.
#[derive(Debug, Clone, Copy)]
struct Checked {
    start: Lsn,
    end: Lsn,
    ok: PagesOk,
    crc: u32,
}

impl CheckedFrames {
    pub fn new(frame_bytes: u64) -> CheckedFrames {
        assert!(frame_bytes.is_power_of_two());
        CheckedFrames { frame_bytes, frames: Default::default() }
    }

    /// The outcome of an earlier check covering `[lsn, lsn + len)`, if there was one, and the
    /// CRC32C of the range when the earlier one was exactly this range.
    pub fn get(&self, lsn: Lsn, len: u64) -> Option<(PagesOk, Option<u32>)> {
        let c = self.frames.get(&(lsn.0 / self.frame_bytes))?;
        let exact = c.start == lsn && c.end == lsn + len;
        (c.start <= lsn && lsn + len <= c.end).then_some((c.ok, exact.then_some(c.crc)))
    }

    /// `[lsn, lsn + len)` (within one frame slot) was checked with outcome `ok`; `crc` is the
    /// CRC32C of its bytes.
    pub fn insert(&mut self, lsn: Lsn, len: u64, ok: PagesOk, crc: u32) {
        let slot = lsn.0 / self.frame_bytes;
        debug_assert_eq!((lsn.0 + len.max(1) - 1) / self.frame_bytes, slot, "a frame spans one slot");
        let new = Checked { start: lsn, end: lsn + len, ok, crc };
        let entry = self.frames.entry(slot).or_insert(new);
        // Keep the widest range; a range that merely overlaps replaces a narrower one.
        if len >= entry.end - entry.start {
            *entry = new;
        }
    }

    /// Frames wholly below `lsn` will not be sent again (or will be checked again).
    pub fn forget_below(&mut self, lsn: Lsn) {
        let slot = lsn.0 / self.frame_bytes;
        self.frames = self.frames.split_off(&slot);
    }

    pub fn clear(&mut self) {
        self.frames.clear();
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checked_range_answers_only_for_what_it_covers() {
        let mut c = CheckedFrames::new(1 << 20);
        let f = Lsn(5 << 20);
        c.insert(f + 100, (1 << 20) - 100, PagesOk::AllValid, 7);
        assert_eq!(c.get(f + 100, 50), Some((PagesOk::AllValid, None)), "covered, not the same range: no CRC");
        assert_eq!(c.get(f + 100, (1 << 20) - 100), Some((PagesOk::AllValid, Some(7))));
        assert_eq!(c.get(f + 8192, (1 << 20) - 8192), Some((PagesOk::AllValid, None)));
        assert_eq!(c.get(f, 50), None, "starts before the checked range");
        c.insert(f, 1 << 20, PagesOk::SwitchPadding, 9);
        assert_eq!(c.get(f, 50), Some((PagesOk::SwitchPadding, None)), "the wider check replaced the narrower");
        c.insert(f + 4096, 10, PagesOk::AllValid, 1);
        assert_eq!(c.get(f, 1 << 20), Some((PagesOk::SwitchPadding, Some(9))), "a narrower check does not shrink it");
        c.forget_below(f + (1 << 20));
        assert_eq!(c.get(f, 50), None);
    }
}
