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
