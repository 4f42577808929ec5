//! Fuzz target: `RecordWalker` over one 1 MiB segment built from fuzz bytes must never panic or error (bad
//! data is an end reason, never a `WalkError`), and its valid end must stay inside the segment.
//!
//! Input: `flags u8 | segno u8 | nrec u8 | ...`.
//! - flags bit 0: 1 KiB blocks (else 8 KiB); more page crossings per record.
//! - flags bit 1: raw mode: the segment is a valid long page header followed by the fuzz bytes (repeated),
//!   so the walker gets past the first page header and meets arbitrary record bytes.
//! - otherwise structured mode: `nrec` records `len_lo len_hi info rmid` laid out like PostgreSQL does (page
//!   headers, XLP_FIRST_IS_CONTRECORD + xlp_rem_len, xl_prev chain, CRC), bodies taken from the input, then the
//!   remaining input read as mutations `off0 off1 off2 xor` applied to the segment. With no mutation and no
//!   XLOG_SWITCH, the walker must find exactly the end of the last complete record.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walship::wal::{
    record_crc, Lsn, LongPageHeader, PageHeader, RecordHeader, RecordWalker, SegmentWalk, WalIdentity,
    LONG_PAGE_HEADER_LEN, SHORT_PAGE_HEADER_LEN, XLOG_RECORD_HEADER_LEN, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER,
};

const SEG: u64 = 1 << 20;
const MAGIC: u16 = 0xD116;
const SYSID: u64 = 7_000_000_000_000_000_001;

struct Layout<'a> {
    id: WalIdentity,
    seg_start: u64,
    buf: &'a mut [u8],
    /// Absolute LSN of the next byte.
    pos: u64,
}

impl Layout<'_> {
    fn page_header(&mut self, contrecord_rem: Option<u32>) {
        let off = (self.pos - self.seg_start) as usize;
        let long = self.pos == self.seg_start;
        let h = PageHeader {
            magic: MAGIC,
            info: if long { XLP_LONG_HEADER } else { 0 } | if contrecord_rem.is_some() { XLP_FIRST_IS_CONTRECORD } else { 0 },
            tli: self.id.tli,
            pageaddr: Lsn(self.pos),
            rem_len: contrecord_rem.unwrap_or(0),
            long: long.then_some(LongPageHeader {
                system_id: SYSID,
                seg_size: SEG as u32,
                block_size: self.id.block_size as u32,
            }),
        };
        h.encode(&mut self.buf[off..]);
        self.pos += if long { LONG_PAGE_HEADER_LEN } else { SHORT_PAGE_HEADER_LEN } as u64;
    }

    /// Writes one record; false when the segment end cut it.
    fn record(&mut self, rec: &[u8]) -> bool {
        let bs = self.id.block_size;
        let mut i = 0usize;
        while i < rec.len() {
            if self.pos == self.seg_start + SEG {
                return false;
            }
            if self.pos % bs == 0 {
                let rem = (i > 0).then_some((rec.len() - i) as u32);
                self.page_header(rem);
            }
            let room = (bs - self.pos % bs) as usize;
            let n = room.min(rec.len() - i);
            let off = (self.pos - self.seg_start) as usize;
            self.buf[off..off + n].copy_from_slice(&rec[i..i + n]);
            self.pos += n as u64;
            i += n;
        }
        self.pos = (self.pos + 7) & !7;
        true
    }
}

fn build_record(prev: u64, tot_len: usize, info: u8, rmid: u8, body_src: &[u8], salt: usize) -> Vec<u8> {
    let body: Vec<u8> = (0..tot_len - XLOG_RECORD_HEADER_LEN)
        .map(|k| if body_src.is_empty() { k as u8 } else { body_src[(k + salt) % body_src.len()] })
        .collect();
    let mut h = RecordHeader { tot_len: tot_len as u32, xid: salt as u32, prev: Lsn(prev), info, rmid, crc: 0 };
    let first20 = h.encode();
    h.crc = record_crc(&first20[..20], &body);
    let mut rec = h.encode().to_vec();
    rec.extend_from_slice(&body);
    rec
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 3 {
        return;
    }
    let (flags, segno, nrec) = (input[0], u64::from(input[1] % 8), usize::from(input[2] % 64));
    let rest = &input[3..];
    let block_size: u64 = if flags & 1 == 1 { 1024 } else { 8192 };
    let id = WalIdentity { system_id: SYSID, seg_size: SEG, block_size, magic: MAGIC, tli: 1 };
    let seg_start = segno * SEG;
    let mut seg = vec![0u8; SEG as usize];
    let mut expected_end: Option<u64> = None;
    {
        let mut lay = Layout { id, seg_start, buf: &mut seg, pos: seg_start };
        lay.page_header(None);
        if flags & 2 == 2 {
            // Raw mode: arbitrary bytes after the long header, up to the end of the first page and beyond.
            if !rest.is_empty() {
                let start = LONG_PAGE_HEADER_LEN;
                let len = (rest.len() * 4).min(SEG as usize - start);
                for k in 0..len {
                    seg[start + k] = rest[k % rest.len()];
                }
            }
        } else {
            let recs_len = (nrec * 4).min(rest.len() / 4 * 4);
            let (recs, muts) = rest.split_at(recs_len);
            let mut prev = 0u64;
            let mut last_end = lay.pos;
            let mut any_switch = false;
            let mut written = 0usize;
            for (k, r) in recs.chunks_exact(4).enumerate() {
                let tot_len = XLOG_RECORD_HEADER_LEN + usize::from(u16::from_le_bytes([r[0], r[1]]));
                let (info, rmid) = (r[2], r[3]);
                let is_switch = rmid == 0 && info & 0xF0 == 0x40;
                // A record that starts on a page boundary starts after that page's header.
                let start = if lay.pos % block_size == 0 { lay.pos + SHORT_PAGE_HEADER_LEN as u64 } else { lay.pos };
                let rec = build_record(prev, tot_len, info, rmid, muts, k);
                if !lay.record(&rec) {
                    break;
                }
                prev = start;
                last_end = lay.pos;
                written += 1;
                if is_switch {
                    any_switch = true;
                    break;
                }
            }
            let muts = &muts[..muts.len() / 4 * 4];
            for m in muts.chunks_exact(4) {
                let off = (usize::from(m[0]) | usize::from(m[1]) << 8 | usize::from(m[2]) << 16) % SEG as usize;
                seg[off] ^= m[3];
            }
            if muts.is_empty() && !any_switch && written > 0 {
                expected_end = Some(last_end);
            }
        }
    }
    let mut walker = RecordWalker::new(id, Lsn(seg_start));
    let walk = walker.walk_segment(Lsn(seg_start), &seg).expect("bad data must be an end reason, not an error");
    let valid_end = match &walk {
        SegmentWalk::Continues { valid_end } => *valid_end,
        SegmentWalk::Ended { valid_end, .. } => *valid_end,
    };
    assert_eq!(valid_end, walker.valid_end());
    assert!(valid_end.0 >= seg_start && valid_end.0 <= seg_start + SEG, "valid end {valid_end} outside the segment");
    if let Some(end) = expected_end {
        assert_eq!(valid_end.0, end, "walker end {valid_end} != end of the last complete record ({walk:?})");
    }
    // Walking on after the end is refused as misuse, never a panic.
    if matches!(walk, SegmentWalk::Continues { .. }) {
        let next = walker.next_segment_start();
        let _ = walker.walk_segment(next, &vec![0u8; SEG as usize]);
    }
});
