//! Tests of the record walk: on generated WAL, hand-built edge cases, corruption, and arbitrary bytes.

use super::*;
use crate::wal::gen::{generate, GenOptions, GenReport, Sink, Stream};
use crate::wal::page::{PageHeader, SHORT_PAGE_HEADER_LEN};
use crate::wal::segment::WalFileName;
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const MIB: u64 = 1 << 20;

fn seg_start_of(path: &Path, seg_size: u64) -> Lsn {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .expect("utf-8 file name");
    match WalFileName::parse(name, seg_size) {
        Some(WalFileName::Segment { segno, .. }) => Lsn(segno * seg_size),
        other => panic!("unexpected file {name}: {other:?}"),
    }
}

/// How a walk over files went.
struct Outcome {
    walker: RecordWalker,
    last: SegmentWalk,
    /// `first_page_claiming_more` on the segment where the walk ended.
    claims_more: Option<Lsn>,
}

/// Feed the files in order until the walk ends or the files run out.
fn walk_files(opts: &GenOptions, files: &[std::path::PathBuf]) -> Outcome {
    let id = opts.identity();
    let first = seg_start_of(&files[0], opts.seg_size);
    let mut walker = RecordWalker::new(id, first);
    let mut last = SegmentWalk::Continues { valid_end: first };
    for path in files {
        let seg_start = seg_start_of(path, opts.seg_size);
        let bytes = std::fs::read(path).unwrap();
        last = walker.walk_segment(seg_start, &bytes).unwrap();
        if let SegmentWalk::Ended { stop_lsn, .. } = last {
            let claims_more = first_page_claiming_more(seg_start, &bytes, stop_lsn, &id);
            return Outcome {
                walker,
                last,
                claims_more,
            };
        }
    }
    Outcome {
        walker,
        last,
        claims_more: None,
    }
}

fn gen(opts: &GenOptions) -> (tempfile::TempDir, GenOptions, GenReport) {
    let dir = tempfile::tempdir().unwrap();
    let opts = GenOptions {
        dir: dir.path().to_path_buf(),
        ..opts.clone()
    };
    let report = generate(&opts).unwrap();
    (dir, opts, report)
}

fn small(seed: u64) -> GenOptions {
    GenOptions {
        seg_size: MIB,
        wal_bytes: 3 * MIB + 12345,
        seed,
        ..GenOptions::default()
    }
}

/// Walk the generated WAL; valid_end must be the generator's end exactly, and the tail must not claim more.
fn check_exact_end(opts: &GenOptions) -> Outcome {
    let (_dir, opts, report) = gen(opts);
    let out = walk_files(&opts, &report.segment_files);
    assert_eq!(out.walker.valid_end(), report.end_lsn, "{opts:?}");
    assert_eq!(out.walker.records_walked(), report.records, "{opts:?}");
    if let SegmentWalk::Ended {
        valid_end,
        stop_lsn,
        ..
    } = &out.last
    {
        assert_eq!(*valid_end, report.end_lsn);
        assert!(*stop_lsn >= report.end_lsn);
    }
    assert_eq!(
        out.claims_more, None,
        "{opts:?}: tail claims more: {:?}",
        out.last
    );
    out
}

#[test]
fn header_round_trip_and_switch() {
    let h = RecordHeader {
        tot_len: 114,
        xid: 7,
        prev: Lsn(0x1_0000_0028),
        info: 0x40,
        rmid: 0,
        crc: 0xDEAD_BEEF,
    };
    assert_eq!(RecordHeader::parse(&h.encode()), h);
    assert!(h.is_switch());
    assert!(RecordHeader { info: 0x41, ..h }.is_switch());
    assert!(!RecordHeader { rmid: 1, ..h }.is_switch());
    assert!(!RecordHeader { info: 0x00, ..h }.is_switch());
    let body = b"payload";
    let mut all = body.to_vec();
    all.extend_from_slice(&h.encode()[..20]);
    assert_eq!(record_crc(&h.encode()[..20], body), crc32c::crc32c(&all));
}

#[test]
fn exact_end_1mib_segments_several_seeds_and_blocks() {
    for (seed, block) in [(1, 8192), (2, 8192), (3, 4096), (4, 16384), (5, 1024)] {
        let out = check_exact_end(&GenOptions {
            block_size: block,
            ..small(seed)
        });
        assert!(
            matches!(
                out.last,
                SegmentWalk::Ended {
                    reason: EndReason::ZeroLength,
                    ..
                } | SegmentWalk::Ended {
                    reason: EndReason::BadPage(_),
                    ..
                }
            ),
            "{:?}",
            out.last
        );
    }
}

#[test]
fn exact_end_16mib_segments() {
    check_exact_end(&GenOptions {
        wal_bytes: 20 * MIB + 777,
        seed: 9,
        ..GenOptions::default()
    });
}

#[test]
fn exact_end_with_recycled_segments_and_stale_tail() {
    for (seed, zeros) in [(11, true), (12, false), (13, false)] {
        let opts = GenOptions {
            recycled_segments: 2,
            fill_tail_with_zeros: zeros,
            ..small(seed)
        };
        let (_dir, opts, report) = gen(&opts);
        assert_eq!(report.segment_files.len(), 4 + 2);
        let out = walk_files(&opts, &report.segment_files);
        assert_eq!(out.walker.valid_end(), report.end_lsn);
        let SegmentWalk::Ended { stop_lsn, .. } = out.last else {
            panic!("walk did not end: {:?}", out.last)
        };
        // The walk ends in the last real segment, not in a recycled one.
        assert_eq!(
            stop_lsn.segno(opts.seg_size),
            report.end_lsn.segno(opts.seg_size)
        );
        assert_eq!(out.claims_more, None);
        // A recycled file on its own: its first page belongs elsewhere.
        let recycled = std::fs::read(&report.segment_files[4]).unwrap();
        let seg_start = seg_start_of(&report.segment_files[4], opts.seg_size);
        let mut w = RecordWalker::new(opts.identity(), seg_start);
        let r = w.walk_segment(seg_start, &recycled).unwrap();
        assert!(
            matches!(
                r,
                SegmentWalk::Ended {
                    reason: EndReason::BadPage(PageError::BadPageAddr { .. }),
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(
            first_page_claiming_more(seg_start, &recycled, seg_start, &opts.identity()),
            None
        );
    }
}

#[test]
fn end_exactly_at_segment_boundary_continues() {
    let (_dir, opts, report) = gen(&GenOptions {
        switch_every_segments: Some(1),
        wal_bytes: MIB * 3 / 4,
        ..small(21)
    });
    assert_eq!(
        report.end_lsn,
        Lsn(2 * MIB),
        "a switch in the first segment ends the WAL at the next segment"
    );
    let out = walk_files(&opts, &report.segment_files);
    assert_eq!(
        out.last,
        SegmentWalk::Continues {
            valid_end: Lsn(2 * MIB)
        }
    );
}

#[test]
fn switch_records() {
    for seed in [31, 32] {
        let opts = GenOptions {
            switch_every_segments: Some(2),
            wal_bytes: 5 * MIB + 100,
            ..small(seed)
        };
        let out = check_exact_end(&opts);
        assert!(out.walker.records_walked() > 0);
        // Segment 2 (the second file) ends in switch padding: header-only pages.
        let (_dir, _opts, report) = gen(&opts);
        let seg2 = std::fs::read(&report.segment_files[1]).unwrap();
        let last_page = &seg2[seg2.len() - 8192..];
        assert!(last_page[24..].iter().all(|&b| b == 0));
        assert_eq!(PageHeader::parse(last_page).unwrap().rem_len, 0);
    }
}

#[test]
fn first_segment_begins_with_continuation() {
    for block in [8192, 4096] {
        let opts = GenOptions {
            start_mid_record: true,
            block_size: block,
            ..small(41)
        };
        let (_dir, opts, report) = gen(&opts);
        let first = std::fs::read(&report.segment_files[0]).unwrap();
        let hdr = PageHeader::parse(&first).unwrap();
        assert_ne!(hdr.info & XLP_FIRST_IS_CONTRECORD, 0);
        assert!(
            hdr.rem_len as u64 > 2 * block,
            "continuation spans several pages"
        );
        assert!(report.first_lsn > Lsn(MIB + 2 * block));
        let out = walk_files(&opts, &report.segment_files);
        assert_eq!(out.walker.valid_end(), report.end_lsn);
        assert_eq!(out.walker.records_walked(), report.records);
    }
}

/// LSN of the first record that starts on a page of `seg` after `from` (a whole header on that page).
fn a_record_start(seg: &[u8], seg_start: Lsn, from: usize, block: usize) -> Lsn {
    let mut page_off = from;
    loop {
        let hdr = PageHeader::parse(&seg[page_off..]).unwrap();
        let rec_off = page_off + hdr.header_len() + (hdr.rem_len as usize).next_multiple_of(8);
        if rec_off + XLOG_RECORD_HEADER_LEN <= page_off + block {
            return seg_start + rec_off as u64;
        }
        page_off += block;
    }
}

#[test]
fn flipped_byte_is_bad_crc_and_detectable_corruption() {
    for (seed, block) in [(51, 8192usize), (52, 4096)] {
        let (_dir, opts, report) = gen(&GenOptions {
            block_size: block as u64,
            ..small(seed)
        });
        let path = &report.segment_files[1];
        let seg_start = seg_start_of(path, opts.seg_size);
        let mut bytes = std::fs::read(path).unwrap();
        let rec = a_record_start(&bytes, seg_start, 5 * block, block);
        // xl_xid is covered by the CRC and changes neither the length nor xl_prev.
        bytes[(rec - seg_start) as usize + 5] ^= 0x20;
        std::fs::write(path, &bytes).unwrap();
        let out = walk_files(&opts, &report.segment_files);
        let SegmentWalk::Ended {
            stop_lsn,
            reason,
            valid_end,
        } = out.last
        else {
            panic!("{:?}", out.last)
        };
        assert_eq!(stop_lsn, rec);
        assert!(matches!(reason, EndReason::BadCrc { .. }), "{reason:?}");
        assert!(
            valid_end <= rec && rec - valid_end <= 40,
            "{valid_end} {rec}"
        );
        assert!(
            out.claims_more.is_some(),
            "valid pages follow the bad record: corruption, not end of WAL"
        );
    }
}

#[test]
fn bad_prev_and_bad_length() {
    let (_dir, opts, report) = gen(&small(61));
    let path = &report.segment_files[1];
    let seg_start = seg_start_of(path, opts.seg_size);
    let orig = std::fs::read(path).unwrap();
    let rec = a_record_start(&orig, seg_start, 8 * 8192, 8192);
    let off = (rec - seg_start) as usize;
    for (field_off, check) in [(8usize, 0u8), (0, 1), (3, 2)] {
        let mut bytes = orig.clone();
        bytes[off + field_off] ^= 0x40;
        std::fs::write(path, &bytes).unwrap();
        let out = walk_files(&opts, &report.segment_files);
        let SegmentWalk::Ended {
            stop_lsn,
            reason,
            valid_end,
        } = out.last
        else {
            panic!()
        };
        assert!(valid_end <= rec);
        match check {
            0 => {
                assert_eq!(stop_lsn, rec);
                assert!(matches!(reason, EndReason::BadPrev { .. }), "{reason:?}");
            }
            // A wrong length shows up at once, at the next continuation page, or as a bad CRC.
            _ => assert!(
                stop_lsn >= rec
                    && matches!(
                        reason,
                        EndReason::BadRecordLength { .. }
                            | EndReason::BadCrc { .. }
                            | EndReason::BadContrecordLength { .. }
                            | EndReason::MissingContrecord { .. }
                    ),
                "{reason:?}"
            ),
        }
    }
}

fn id_1mib(block: u64) -> WalIdentity {
    GenOptions {
        seg_size: MIB,
        block_size: block,
        ..GenOptions::default()
    }
    .identity()
}

fn captured(stream: Stream) -> Vec<Vec<u8>> {
    match stream.sink {
        Sink::Capture(segs) => segs,
        Sink::Files { .. } => unreachable!(),
    }
}

fn walk_all(id: WalIdentity, start: Lsn, segs: &[Vec<u8>]) -> (RecordWalker, SegmentWalk) {
    let mut w = RecordWalker::new(id, start);
    let mut last = SegmentWalk::Continues { valid_end: start };
    for (i, seg) in segs.iter().enumerate() {
        last = w.walk_segment(start + i as u64 * id.seg_size, seg).unwrap();
        if matches!(last, SegmentWalk::Ended { .. }) {
            break;
        }
    }
    (w, last)
}

#[test]
fn header_split_across_pages_and_segments() {
    let id = id_1mib(8192);
    let start = Lsn(MIB);
    let mut s = Stream::new(id, start, 1, Sink::Capture(Vec::new()));
    // Fill page 0 so the next record starts 8 bytes before the page end: its header is split 8 + 16.
    s.put_record(8192 - 40 - 8, 3, 0).unwrap();
    let split = s.put_record(100, 4, 0).unwrap();
    assert_eq!(split, start + (8192 - 8));
    // Then 16 bytes before a page end, and a header split across the segment boundary.
    while s.pos.segment_offset(MIB) < MIB - 3 * 8192 {
        s.put_record(5000, 5, 0).unwrap();
    }
    let mut from = s.pos.segment_offset(MIB);
    if from % 8192 == 0 {
        from += 24;
    }
    let target = MIB - 16;
    let headers_crossed = target / 8192 - from / 8192;
    s.put_record((target - from - headers_crossed * 24) as u32, 6, 0)
        .unwrap();
    assert_eq!(
        s.pos.segment_offset(MIB),
        MIB - 16,
        "next header straddles the segment end"
    );
    let straddler = s.put_record(200, 7, 0).unwrap();
    s.put_record(64, 8, 0).unwrap();
    let end = s.pos;
    s.roll_segment().unwrap();
    s.emit().unwrap();
    let segs = captured(s);
    assert_eq!(segs.len(), 2);
    // Walk the first segment alone: the straddling record is not complete yet.
    let mut w = RecordWalker::new(id, start);
    assert_eq!(
        w.walk_segment(start, &segs[0]).unwrap(),
        SegmentWalk::Continues {
            valid_end: straddler
        }
    );
    let r = w.walk_segment(start + MIB, &segs[1]).unwrap();
    assert!(
        matches!(r, SegmentWalk::Ended { valid_end, reason: EndReason::ZeroLength, .. } if valid_end == end),
        "{r:?}"
    );
    assert!(w.records_walked() > 5);
    assert_eq!(
        w.walk_segment(start + 2 * MIB, &segs[1]),
        Err(WalkError::AlreadyEnded { valid_end: end })
    );
}

#[test]
fn misuse_is_an_error() {
    let id = id_1mib(8192);
    let mut w = RecordWalker::new(id, Lsn(MIB));
    let seg = vec![0u8; MIB as usize];
    assert!(matches!(
        w.walk_segment(Lsn(2 * MIB), &seg),
        Err(WalkError::UnexpectedSegment { .. })
    ));
    assert!(matches!(
        w.walk_segment(Lsn(MIB), &seg[..100]),
        Err(WalkError::BadSegmentLength { .. })
    ));
    let r = w.walk_segment(Lsn(MIB), &seg).unwrap();
    assert!(matches!(
        r,
        SegmentWalk::Ended {
            stop_lsn: Lsn(0x10_0000),
            reason: EndReason::BadPage(_),
            ..
        }
    ));
    let mut w = RecordWalker::new(
        WalIdentity {
            block_size: 0,
            ..id
        },
        Lsn(MIB),
    );
    assert!(matches!(
        w.walk_segment(Lsn(MIB), &seg),
        Err(WalkError::InvalidIdentity { .. })
    ));
}

#[test]
fn overwrite_contrecord_abandons_partial_record() {
    let id = id_1mib(8192);
    let start = Lsn(MIB);
    let mut s = Stream::new(id, start, 2, Sink::Capture(Vec::new()));
    let a = s.put_record(3000, 3, 0).unwrap();
    let a_end = s.pos;
    s.put_record(8000, 4, 0).unwrap(); // continues onto page 1
    s.roll_segment().unwrap();
    s.emit().unwrap();
    let mut seg = captured(s).remove(0);
    // PostgreSQL's view after a crash: page 1 was never written; recovery then wrote an OVERWRITE_CONTRECORD
    // record at the start of page 1. Build that page by hand.
    let page1 = &mut seg[8192..16384];
    page1.fill(0);
    let hdr = PageHeader {
        magic: id.magic,
        info: XLP_FIRST_IS_OVERWRITE_CONTRECORD,
        tli: id.tli,
        pageaddr: start + 8192,
        rem_len: 0,
        long: None,
    };
    hdr.encode(page1);
    let body = [7u8; 16];
    let mut rec = RecordHeader {
        tot_len: 40,
        xid: 0,
        prev: a,
        info: 0x10,
        rmid: 0,
        crc: 0,
    };
    rec.crc = record_crc(&rec.encode()[..20], &body);
    page1[24..48].copy_from_slice(&rec.encode());
    page1[48..64].copy_from_slice(&body);
    let (w, last) = walk_all(id, start, &[seg.clone()]);
    let overwrite_rec = start + 8192 + 24;
    let expected_end = overwrite_rec + 40;
    assert!(
        matches!(last, SegmentWalk::Ended { valid_end, stop_lsn, reason: EndReason::ZeroLength }
        if valid_end == expected_end && stop_lsn == expected_end),
        "{last:?}"
    );
    assert_eq!(w.records_walked(), 2);
    // Without the flag (and without CONTRECORD) it is a missing continuation: the end is after record A.
    let page1 = &mut seg[8192..16384];
    PageHeader { info: 0, ..hdr }.encode(page1);
    let (_, last) = walk_all(id, start, &[seg]);
    assert!(
        matches!(last, SegmentWalk::Ended { valid_end, reason: EndReason::MissingContrecord { .. }, .. }
        if valid_end == a_end),
        "{last:?}"
    );
}

#[test]
fn unexpected_contrecord_and_bad_rem_len() {
    let id = id_1mib(8192);
    let start = Lsn(MIB);
    let mut s = Stream::new(id, start, 3, Sink::Capture(Vec::new()));
    s.put_record(8192 - 40, 3, 0).unwrap(); // ends exactly at the page end
    let after = s.pos;
    assert_eq!(after, start + 8192);
    s.put_record(9000, 4, 0).unwrap();
    s.roll_segment().unwrap();
    s.emit().unwrap();
    let seg = captured(s).remove(0);
    let (_, last) = walk_all(id, start, std::slice::from_ref(&seg));
    assert!(
        matches!(last, SegmentWalk::Ended { valid_end, reason: EndReason::ZeroLength, .. } if valid_end == start + (8192 + 24 + 9000 + 24))
    );
    // Page 1 now claims a continuation where a record must start.
    let mut bad = seg.clone();
    let mut hdr = PageHeader::parse(&bad[8192..]).unwrap();
    hdr.info |= XLP_FIRST_IS_CONTRECORD;
    hdr.rem_len = 5;
    hdr.encode(&mut bad[8192..]);
    let (_, last) = walk_all(id, start, &[bad]);
    assert!(
        matches!(last, SegmentWalk::Ended { valid_end, stop_lsn, reason: EndReason::UnexpectedContrecord { .. } }
        if valid_end == after && stop_lsn == after),
        "{last:?}"
    );
    // Page 2 continues the 9000-byte record with a wrong xlp_rem_len.
    let mut bad = seg;
    let mut hdr = PageHeader::parse(&bad[16384..]).unwrap();
    assert_eq!(hdr.info, XLP_FIRST_IS_CONTRECORD);
    hdr.rem_len += 8;
    hdr.encode(&mut bad[16384..]);
    let (_, last) = walk_all(id, start, &[bad]);
    assert!(
        matches!(last, SegmentWalk::Ended { valid_end, reason: EndReason::BadContrecordLength { .. }, .. }
        if valid_end == after),
        "{last:?}"
    );
}

#[test]
fn claiming_more_scans_pages_after_the_stop_page() {
    let id = id_1mib(8192);
    let start = Lsn(MIB);
    let mut seg = vec![0u8; MIB as usize];
    assert_eq!(
        first_page_claiming_more(start, &seg, start + 100, &id),
        None
    );
    let hdr = PageHeader {
        magic: id.magic,
        info: 0,
        tli: 1,
        pageaddr: start + 5 * 8192,
        rem_len: 0,
        long: None,
    };
    hdr.encode(&mut seg[5 * 8192..]);
    assert_eq!(
        first_page_claiming_more(start, &seg, start + 100, &id),
        Some(start + 5 * 8192)
    );
    assert_eq!(
        first_page_claiming_more(start, &seg, start + 5 * 8192 + 8, &id),
        None
    );
    assert_eq!(
        first_page_claiming_more(start, &seg, Lsn(0), &id),
        Some(start + 5 * 8192)
    );
    assert_eq!(
        first_page_claiming_more(start, &seg, Lsn(u64::MAX), &id),
        None
    );
    assert_eq!(
        first_page_claiming_more(start, &seg[..SHORT_PAGE_HEADER_LEN], Lsn(0), &id),
        None
    );
}

/// One valid 1 MiB segment with small pages (many boundaries), generated once.
fn valid_segment() -> &'static (WalIdentity, Vec<u8>) {
    static SEG: OnceLock<(WalIdentity, Vec<u8>)> = OnceLock::new();
    SEG.get_or_init(|| {
        let id = id_1mib(1024);
        let mut s = Stream::new(id, Lsn(MIB), 4, Sink::Capture(Vec::new()));
        while s.pos < Lsn(MIB + MIB / 2) {
            s.put_random_record(3000).unwrap();
        }
        s.roll_segment().unwrap();
        s.emit().unwrap();
        (id, captured(s).remove(0))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn corrupted_wal_never_panics(edits in proptest::collection::vec((0usize..(MIB as usize / 2 + 4096), any::<u8>()), 1..12),
                                  splice_at in 0usize..(MIB as usize - 600), splice in proptest::collection::vec(any::<u8>(), 0..600)) {
        let (id, orig) = valid_segment();
        let (_, intact) = walk_all(*id, Lsn(MIB), std::slice::from_ref(orig));
        let mut seg = orig.clone();
        for (at, v) in edits { seg[at] = v; }
        seg[splice_at..splice_at + splice.len()].copy_from_slice(&splice);
        let mut w = RecordWalker::new(*id, Lsn(MIB));
        let r = w.walk_segment(Lsn(MIB), &seg).unwrap();
        let intact_end = match intact { SegmentWalk::Ended { valid_end, .. } => valid_end, _ => unreachable!() };
        prop_assert!(w.valid_end() <= intact_end, "corruption never extends the valid WAL");
        if let SegmentWalk::Ended { stop_lsn, valid_end, .. } = r {
            prop_assert!(stop_lsn >= valid_end);
            let _ = first_page_claiming_more(Lsn(MIB), &seg, stop_lsn, id);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(seed in any::<u64>(), header_first in any::<bool>(), block_shift in 10u32..=16) {
        use rand::{RngCore, SeedableRng};
        let id = id_1mib(1 << block_shift);
        let mut seg = vec![0u8; MIB as usize];
        rand::rngs::SmallRng::seed_from_u64(seed).fill_bytes(&mut seg);
        if header_first {
            let long = Some(crate::wal::page::LongPageHeader { system_id: id.system_id, seg_size: MIB as u32, block_size: id.block_size as u32 });
            PageHeader { magic: id.magic, info: 0x2 | (seg[2] as u16 & 1), tli: id.tli, pageaddr: Lsn(MIB), rem_len: u32::from(seg[3]), long }.encode(&mut seg);
        }
        let mut w = RecordWalker::new(id, Lsn(MIB));
        let r = w.walk_segment(Lsn(MIB), &seg).unwrap();
        if let SegmentWalk::Ended { stop_lsn, .. } = r {
            let _ = first_page_claiming_more(Lsn(MIB), &seg, stop_lsn, &id);
        }
    }
}

/// Manual check against a real cluster's `pg_wal` (not run by default; needs a stopped PostgreSQL cluster):
/// `WALSHIP_PG_WAL=/path/pg_wal WALSHIP_EXPECT_END=0/7125430 cargo test --lib real_pg_wal -- --ignored --nocapture`.
/// Compare with `pg_waldump`'s last record (the shutdown checkpoint) and the zero-length record after it.
///
/// Checked 2026-11-24 on Debian PostgreSQL 15 (magic 0xD110, 16 MiB, 8 KiB): after `pgbench -i -s 5`, pgbench
/// runs, one `pg_switch_wal()` (at 0/C496230) and `pg_ctl -m fast stop`, pg_wal held segments 7..D (7..C full,
/// D current with a stale recycled tail). `pg_controldata`: latest checkpoint 0/DC77C18; pg_waldump: that
/// CHECKPOINT_SHUTDOWN is 114 bytes and the next read fails "invalid record length at 0/DC77C90: wanted 24,
/// got 0". The walker: Continues through 7..B, `Continues { valid_end: 0/0D000000 }` after C (switch padding),
/// `Ended { valid_end: 0/0DC77C90, reason: ZeroLength }` in D, 507443 records, no page claiming more. Walking
/// from segment 9 (first page XLP_FIRST_IS_CONTRECORD, rem_len 6355) gives the same end. A flipped byte at
/// 8 MiB + 1000 in segment B: `BadCrc` at 0/0B8003D8 (pg_waldump: "incorrect resource manager data checksum in
/// record at 0/B8003D8"), and `first_page_claiming_more` = Some(0/0B802000).
#[test]
#[ignore]
fn real_pg_wal_end() {
    let dir = std::env::var("WALSHIP_PG_WAL").expect("set WALSHIP_PG_WAL to a pg_wal directory");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.len() == 24)
        .collect();
    names.sort();
    let first = std::fs::read(Path::new(&dir).join(&names[0])).unwrap();
    let id = WalIdentity::from_first_page(&first).unwrap();
    println!("identity: {id:?}");
    let files: Vec<_> = names.iter().map(|n| Path::new(&dir).join(n)).collect();
    let mut walker = RecordWalker::new(id, seg_start_of(&files[0], id.seg_size));
    for path in &files {
        let seg_start = seg_start_of(path, id.seg_size);
        let bytes = std::fs::read(path).unwrap();
        let r = walker.walk_segment(seg_start, &bytes).unwrap();
        println!("{}: {r:?}", path.display());
        if let SegmentWalk::Ended { stop_lsn, .. } = r {
            println!(
                "claims more: {:?}",
                first_page_claiming_more(seg_start, &bytes, stop_lsn, &id)
            );
            break;
        }
    }
    println!(
        "valid_end {} after {} records",
        walker.valid_end(),
        walker.records_walked()
    );
    if let Ok(expected) = std::env::var("WALSHIP_EXPECT_END") {
        assert_eq!(walker.valid_end(), expected.parse::<Lsn>().unwrap());
    }
}

/// `cargo test --release --lib walk_throughput -- --ignored --nocapture` (generates 512 MiB, walks it in memory).
#[test]
#[ignore]
fn walk_throughput() {
    let dir = tempfile::tempdir_in(std::env::var("WALSHIP_GEN_DIR").unwrap_or_else(|_| "/tmp".into())).unwrap();
    let opts = GenOptions { dir: dir.path().to_path_buf(), wal_bytes: 512 << 20, ..GenOptions::default() };
    let report = generate(&opts).unwrap();
    let segs: Vec<Vec<u8>> = report.segment_files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let start = seg_start_of(&report.segment_files[0], opts.seg_size);
    let t = std::time::Instant::now();
    let (w, _) = walk_all(opts.identity(), start, &segs);
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(w.valid_end(), report.end_lsn);
    let mb = (segs.len() as u64 * opts.seg_size) as f64 / 1e6;
    println!("walked {} records, {mb:.0} MB in {secs:.3}s = {:.0} MB/s", w.records_walked(), mb / secs);
}
