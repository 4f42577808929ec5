//! WAL record headers and the incremental record walk that finds the exact end of valid WAL.
//!
//! The walk mirrors PostgreSQL's `XLogDecodeNextRecord` checks, one segment at a time:
//! - every page header is validated (`validate_page`); a page that does not belong ends the walk;
//! - a record starts MAXALIGN'd; its 24-byte header may be split across a page boundary;
//! - `xl_tot_len` must be in `[24, RECORD_LEN_MAX]` (0 is the usual end of WAL: zero-filled space);
//! - `xl_prev` must equal the previous record's start (the first record walked is accepted as is);
//! - every continuation page must carry `XLP_FIRST_IS_CONTRECORD` with `xlp_rem_len` equal to the bytes of
//!   the record still to come;
//! - `xl_crc` must match (CRC-32C over the body, then over the header's first 20 bytes);
//! - after `XLOG_SWITCH` the rest of the segment is padding; the next record is at the next segment start.
//!
//! `XLP_FIRST_IS_OVERWRITE_CONTRECORD`: when a record in progress meets a page carrying this flag, that record
//! was abandoned by PostgreSQL (crash mid-record, then recovery wrote an `OVERWRITE_CONTRECORD` record in its
//! place). Like `xlogreader.c` we drop the partial record (the valid end stays at the end of the previous
//! complete record) and continue with the record at that page's first record position; its `xl_prev` must
//! still point at the previous complete record (PostgreSQL sets it so).
//!
//! At the start of a walk (first page of the first segment) a leading continuation (`XLP_FIRST_IS_CONTRECORD`)
//! of a record that began before the walk is skipped: `MAXALIGN(xlp_rem_len)` bytes, possibly over several
//! pages, each of which must chain correctly. The valid end then starts at the first record after it.

use super::lsn::Lsn;
use super::page::{
    page_belongs_here, validate_page, PageError, WalIdentity, XLP_FIRST_IS_CONTRECORD,
    XLP_FIRST_IS_OVERWRITE_CONTRECORD,
};
use super::segment::{is_valid_block_size, is_valid_seg_size};

/// `SizeOfXLogRecord`.
pub const XLOG_RECORD_HEADER_LEN: usize = 24;
/// Largest `xl_tot_len` we accept (PostgreSQL's limit is a little below 1 GiB).
pub const RECORD_LEN_MAX: u32 = 1 << 30;
/// Bytes of the header covered by the CRC (everything before `xl_crc`).
const HEADER_CRC_LEN: usize = 20;
/// `RM_XLOG_ID`.
const RM_XLOG_ID: u8 = 0;
/// `XLOG_SWITCH` (in the high nibble of `xl_info`; the low nibble belongs to `XLR_INFO_MASK`).
const XLOG_SWITCH: u8 = 0x40;

/// A decoded `XLogRecord` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub tot_len: u32,
    pub xid: u32,
    pub prev: Lsn,
    pub info: u8,
    pub rmid: u8,
    pub crc: u32,
}

impl RecordHeader {
    /// Decode (padding ignored).
    pub fn parse(b: &[u8; XLOG_RECORD_HEADER_LEN]) -> RecordHeader {
        let u32_at = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let mut prev = [0u8; 8];
        prev.copy_from_slice(&b[8..16]);
        RecordHeader {
            tot_len: u32_at(0),
            xid: u32_at(4),
            prev: Lsn(u64::from_le_bytes(prev)),
            info: b[16],
            rmid: b[17],
            crc: u32_at(20),
        }
    }

    /// Encode (padding zeroed).
    pub fn encode(&self) -> [u8; XLOG_RECORD_HEADER_LEN] {
        let mut b = [0u8; XLOG_RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&self.tot_len.to_le_bytes());
        b[4..8].copy_from_slice(&self.xid.to_le_bytes());
        b[8..16].copy_from_slice(&self.prev.0.to_le_bytes());
        b[16] = self.info;
        b[17] = self.rmid;
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }

    /// `XLOG_SWITCH`: the rest of the segment is padding.
    pub fn is_switch(&self) -> bool {
        self.rmid == RM_XLOG_ID && (self.info & 0xF0) == XLOG_SWITCH
    }
}

/// `xl_crc`: CRC-32C over the body (bytes after the 24-byte header), then over the header's first 20 bytes.
pub fn record_crc(header_first20: &[u8], body: &[u8]) -> u32 {
    debug_assert_eq!(header_first20.len(), HEADER_CRC_LEN);
    crc32c::crc32c_append(crc32c::crc32c(body), header_first20)
}

/// How the walk through one segment went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentWalk {
    /// All records to the segment end are valid; feed the next segment. `valid_end` is the end of the last
    /// COMPLETE record (a record continuing into the next segment is not included yet).
    Continues { valid_end: Lsn },
    /// WAL ends here. The first invalid thing starts at `stop_lsn`: the failing record's start for record
    /// checks (that start may lie in an earlier segment when the record spans segments), or the failing
    /// page's start for page and continuation checks.
    Ended {
        valid_end: Lsn,
        stop_lsn: Lsn,
        reason: EndReason,
    },
}

/// Why the walk stopped. Bad data is always an `EndReason`, never a `WalkError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndReason {
    /// `xl_tot_len == 0`: zero-filled space, the usual end of WAL.
    ZeroLength,
    /// `xl_tot_len` below 24 or above `RECORD_LEN_MAX`.
    BadRecordLength { tot_len: u32 },
    /// `xl_prev` does not point at the previous record.
    BadPrev { found: Lsn, expected: Lsn },
    /// `xl_crc` mismatch.
    BadCrc { found: u32, computed: u32 },
    /// A page header is invalid or belongs elsewhere (stale `xlp_pageaddr`: end of WAL in a recycled file).
    BadPage(PageError),
    /// A record continues onto a page without `XLP_FIRST_IS_CONTRECORD`.
    MissingContrecord { page_lsn: Lsn, record_lsn: Lsn },
    /// A continuation page's `xlp_rem_len` disagrees with the bytes of the record still to come.
    BadContrecordLength {
        page_lsn: Lsn,
        rem_len: u32,
        expected: u32,
    },
    /// A page says it starts with a continuation where a new record must start.
    UnexpectedContrecord { page_lsn: Lsn, rem_len: u32 },
}

/// Misuse of the walker (wrong segment fed, wrong length, walking on after the end).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WalkError {
    #[error("walker expected the segment starting at {expected}, was given {found}")]
    UnexpectedSegment { expected: Lsn, found: Lsn },
    #[error("segment at {seg_start} has {found_bytes} bytes, expected {expected_bytes}")]
    BadSegmentLength {
        seg_start: Lsn,
        found_bytes: u64,
        expected_bytes: u64,
    },
    #[error("the walk already ended at {valid_end}")]
    AlreadyEnded { valid_end: Lsn },
    #[error("walker identity has invalid sizes: seg_size {seg_size}, block_size {block_size}")]
    InvalidIdentity { seg_size: u64, block_size: u64 },
}

/// A record whose bytes are still arriving.
#[derive(Debug, Clone)]
struct PartialRecord {
    start: Lsn,
    header: [u8; XLOG_RECORD_HEADER_LEN],
    /// Bytes of the record consumed so far (header included).
    read_bytes: u32,
    /// Known once `read_bytes >= 4`.
    tot_len: u32,
    /// Running CRC-32C over the body consumed so far.
    body_crc: u32,
}

impl PartialRecord {
    fn remaining_bytes(&self) -> u32 {
        debug_assert!(self.read_bytes >= 4 && self.tot_len >= self.read_bytes);
        self.tot_len - self.read_bytes
    }
}

#[derive(Debug, Clone)]
enum State {
    /// Nothing seen yet: the first page may begin with a continuation to skip.
    Start,
    /// Skipping the tail of a record that began before the walk started.
    SkipContinuation {
        remaining_bytes: u32,
    },
    /// At a record boundary.
    RecordStart,
    InRecord(PartialRecord),
    Ended,
}

/// Incremental, segment-at-a-time walk that finds the exact end of valid WAL.
#[derive(Debug, Clone)]
pub struct RecordWalker {
    id: WalIdentity,
    /// Next byte to look at.
    pos: Lsn,
    next_seg_start: Lsn,
    prev_record: Option<Lsn>,
    valid_end: Lsn,
    records: u64,
    state: State,
}

impl RecordWalker {
    /// Start at `start`, a segment start LSN, with no record in progress (a leading continuation is skipped).
    pub fn new(id: WalIdentity, start: Lsn) -> RecordWalker {
        debug_assert_eq!(
            start.segment_offset(id.seg_size),
            0,
            "walk must start at a segment start"
        );
        RecordWalker {
            id,
            pos: start,
            next_seg_start: start,
            prev_record: None,
            valid_end: start,
            records: 0,
            state: State::Start,
        }
    }

    /// End (exclusive, MAXALIGN'd) of the last complete valid record, or of the switch padding after it.
    pub fn valid_end(&self) -> Lsn {
        self.valid_end
    }

    /// Complete valid records walked so far.
    pub fn records_walked(&self) -> u64 {
        self.records
    }

    /// The segment the next `walk_segment` call must be given.
    pub fn next_segment_start(&self) -> Lsn {
        self.next_seg_start
    }

    /// Feed the whole segment that starts at `seg_start` (the one the walker expects; `bytes.len() ==
    /// seg_size`). Walks records until the segment end or the first invalid thing.
    pub fn walk_segment(&mut self, seg_start: Lsn, bytes: &[u8]) -> Result<SegmentWalk, WalkError> {
        if !is_valid_seg_size(self.id.seg_size) || !is_valid_block_size(self.id.block_size) {
            return Err(WalkError::InvalidIdentity {
                seg_size: self.id.seg_size,
                block_size: self.id.block_size,
            });
        }
        if matches!(self.state, State::Ended) {
            return Err(WalkError::AlreadyEnded {
                valid_end: self.valid_end,
            });
        }
        if seg_start != self.next_seg_start {
            return Err(WalkError::UnexpectedSegment {
                expected: self.next_seg_start,
                found: seg_start,
            });
        }
        if bytes.len() as u64 != self.id.seg_size {
            let found_bytes = bytes.len() as u64;
            return Err(WalkError::BadSegmentLength {
                seg_start,
                found_bytes,
                expected_bytes: self.id.seg_size,
            });
        }
        let seg_end = seg_start + self.id.seg_size;
        self.next_seg_start = seg_end;
        while self.pos < seg_end {
            debug_assert!(self.pos >= seg_start);
            if let Some(ended) = self.step(seg_start, bytes) {
                return Ok(ended);
            }
        }
        Ok(SegmentWalk::Continues {
            valid_end: self.valid_end,
        })
    }

    /// Advance by one page header or one chunk of record bytes within the current page.
    fn step(&mut self, seg_start: Lsn, bytes: &[u8]) -> Option<SegmentWalk> {
        let block = self.id.block_size as usize;
        let offset = (self.pos - seg_start) as usize;
        let page_off = offset - offset % block;
        let page = &bytes[page_off..page_off + block];
        let in_page = offset - page_off;
        if in_page == 0 {
            return self.enter_page(page, self.pos);
        }
        let avail = &page[in_page..];
        match &mut self.state {
            State::SkipContinuation { remaining_bytes } => {
                let n = avail.len().min(*remaining_bytes as usize);
                *remaining_bytes -= n as u32;
                self.pos = self.pos + n as u64;
                if *remaining_bytes == 0 {
                    self.pos = self.pos.maxalign();
                    self.valid_end = self.pos;
                    self.state = State::RecordStart;
                }
                None
            }
            State::InRecord(_) => self.consume(avail),
            State::Start | State::RecordStart | State::Ended => {
                debug_assert!(
                    matches!(self.state, State::RecordStart),
                    "unexpected state {:?}",
                    self.state
                );
                debug_assert_eq!(self.pos.maxalign(), self.pos);
                self.state = State::InRecord(PartialRecord {
                    start: self.pos,
                    header: [0; XLOG_RECORD_HEADER_LEN],
                    read_bytes: 0,
                    tot_len: 0,
                    body_crc: 0,
                });
                None
            }
        }
    }

    fn end(&mut self, stop_lsn: Lsn, reason: EndReason) -> Option<SegmentWalk> {
        self.state = State::Ended;
        Some(SegmentWalk::Ended {
            valid_end: self.valid_end,
            stop_lsn,
            reason,
        })
    }

    /// Validate a page header and check its continuation flags against the walk state.
    fn enter_page(&mut self, page: &[u8], page_lsn: Lsn) -> Option<SegmentWalk> {
        let hdr = match validate_page(page, page_lsn, &self.id) {
            Ok(hdr) => hdr,
            Err(e) => return self.end(page_lsn, EndReason::BadPage(e)),
        };
        self.pos = page_lsn + hdr.header_len() as u64;
        let is_cont = hdr.info & XLP_FIRST_IS_CONTRECORD != 0;
        let is_overwrite = hdr.info & XLP_FIRST_IS_OVERWRITE_CONTRECORD != 0;
        let rem_len = hdr.rem_len;
        match &self.state {
            State::Start => {
                self.state = if is_cont && !is_overwrite && rem_len > 0 {
                    State::SkipContinuation {
                        remaining_bytes: rem_len,
                    }
                } else {
                    State::RecordStart
                };
                None
            }
            State::SkipContinuation { remaining_bytes } => {
                let expected = *remaining_bytes;
                if !is_cont {
                    return self.end(
                        page_lsn,
                        EndReason::MissingContrecord {
                            page_lsn,
                            record_lsn: Lsn::INVALID,
                        },
                    );
                }
                if rem_len != expected {
                    return self.end(
                        page_lsn,
                        EndReason::BadContrecordLength {
                            page_lsn,
                            rem_len,
                            expected,
                        },
                    );
                }
                None
            }
            State::RecordStart => {
                if is_cont {
                    return self.end(
                        page_lsn,
                        EndReason::UnexpectedContrecord { page_lsn, rem_len },
                    );
                }
                None
            }
            State::InRecord(rec) => {
                if is_overwrite {
                    // The partial record was abandoned by PostgreSQL; a new record starts on this page.
                    self.state = State::RecordStart;
                    return None;
                }
                let record_lsn = rec.start;
                let expected = rec.remaining_bytes();
                if !is_cont {
                    return self.end(
                        page_lsn,
                        EndReason::MissingContrecord {
                            page_lsn,
                            record_lsn,
                        },
                    );
                }
                if rem_len != expected {
                    return self.end(
                        page_lsn,
                        EndReason::BadContrecordLength {
                            page_lsn,
                            rem_len,
                            expected,
                        },
                    );
                }
                None
            }
            State::Ended => {
                debug_assert!(false, "stepping an ended walk");
                None
            }
        }
    }

    /// Consume record bytes from `avail` (the rest of the current page).
    fn consume(&mut self, avail: &[u8]) -> Option<SegmentWalk> {
        let State::InRecord(rec) = &mut self.state else {
            debug_assert!(false, "consume outside a record");
            return None;
        };
        debug_assert!(!avail.is_empty());
        let hdr_len = XLOG_RECORD_HEADER_LEN as u32;
        if rec.read_bytes < hdr_len {
            // Header bytes: first the length (checked as soon as it is known, like PostgreSQL), then the rest.
            let want = if rec.read_bytes < 4 {
                4 - rec.read_bytes
            } else {
                hdr_len - rec.read_bytes
            };
            let n = (want as usize).min(avail.len());
            let at = rec.read_bytes as usize;
            rec.header[at..at + n].copy_from_slice(&avail[..n]);
            rec.read_bytes += n as u32;
            self.pos = self.pos + n as u64;
            if rec.read_bytes == 4 {
                let tot_len = u32::from_le_bytes([
                    rec.header[0],
                    rec.header[1],
                    rec.header[2],
                    rec.header[3],
                ]);
                let start = rec.start;
                if tot_len == 0 {
                    return self.end(start, EndReason::ZeroLength);
                }
                if tot_len < hdr_len || tot_len > RECORD_LEN_MAX {
                    return self.end(start, EndReason::BadRecordLength { tot_len });
                }
                rec.tot_len = tot_len;
            }
            if rec.read_bytes == hdr_len {
                let found = RecordHeader::parse(&rec.header).prev;
                if let Some(expected) = self.prev_record {
                    if found != expected {
                        let start = rec.start;
                        return self.end(start, EndReason::BadPrev { found, expected });
                    }
                }
            }
        } else {
            let n = (rec.remaining_bytes() as usize).min(avail.len());
            rec.body_crc = crc32c::crc32c_append(rec.body_crc, &avail[..n]);
            rec.read_bytes += n as u32;
            self.pos = self.pos + n as u64;
        }
        if rec.read_bytes >= hdr_len && rec.read_bytes == rec.tot_len {
            return self.finish_record();
        }
        None
    }

    /// All bytes of the record are in: check the CRC and move past it.
    fn finish_record(&mut self) -> Option<SegmentWalk> {
        let State::InRecord(rec) = &self.state else {
            debug_assert!(false, "finish outside a record");
            return None;
        };
        let header = RecordHeader::parse(&rec.header);
        let computed = crc32c::crc32c_append(rec.body_crc, &rec.header[..HEADER_CRC_LEN]);
        let start = rec.start;
        if computed != header.crc {
            return self.end(
                start,
                EndReason::BadCrc {
                    found: header.crc,
                    computed,
                },
            );
        }
        // `pos` is just past the record's last byte (page headers crossed included).
        debug_assert!(self.pos >= start + u64::from(header.tot_len));
        let end = self.pos.maxalign();
        self.records += 1;
        self.prev_record = Some(start);
        self.valid_end = if header.is_switch() {
            round_up_to_segment(end, self.id.seg_size)
        } else {
            end
        };
        self.pos = self.valid_end;
        self.state = State::RecordStart;
        None
    }
}

fn round_up_to_segment(lsn: Lsn, seg_size: u64) -> Lsn {
    match lsn.segment_offset(seg_size) {
        0 => lsn,
        off => lsn + (seg_size - off),
    }
}

/// After a walk ended at `stop_lsn`: the first page of `seg_bytes` (the segment starting at `seg_start`)
/// strictly after the page containing `stop_lsn` whose header belongs to its position (`page_belongs_here`).
/// `Some` means the WAL claims to continue past the end we found: corruption rather than end of WAL (a
/// recycled tail has stale `xlp_pageaddr`s, a fresh tail zeros).
///
/// Caveat: a multi-page record torn by a crash (later pages written, record incomplete) also answers `Some`;
/// PostgreSQL would treat that as end of WAL. Callers decide how loudly to complain.
pub fn first_page_claiming_more(
    seg_start: Lsn,
    seg_bytes: &[u8],
    stop_lsn: Lsn,
    id: &WalIdentity,
) -> Option<Lsn> {
    let block = id.block_size;
    if block == 0 || seg_start.page_offset(block) != 0 {
        return None;
    }
    let seg_end = seg_start.0.checked_add(seg_bytes.len() as u64)?;
    let mut page_lsn = if stop_lsn < seg_start {
        seg_start
    } else {
        Lsn(stop_lsn.page_start(block).0.checked_add(block)?)
    };
    while page_lsn.0 < seg_end {
        let off = (page_lsn - seg_start) as usize;
        let page = &seg_bytes[off..(off + block as usize).min(seg_bytes.len())];
        if page_belongs_here(page, page_lsn, id) {
            return Some(page_lsn);
        }
        page_lsn = Lsn(page_lsn.0.checked_add(block)?);
    }
    None
}

#[cfg(test)]
mod tests;
