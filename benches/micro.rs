//! Micro benches of walship's per-byte work, each reporting throughput (criterion `Throughput::Bytes`;
//! criterion prints GiB/s or GB/s — the JSON under `<target>/criterion/` has the raw numbers):
//! - `crc32c`: the crate walship uses for frame and record CRCs, over 8 KiB, 1 MiB and 16 MiB.
//! - `validate_page`: `walship::wal::validate_page` over every 8 KiB page of a generated 16 MiB segment.
//! - `record_walk`: `walship::wal::RecordWalker` over generated segments (records + CRCs + page checks).
//! - `frame_encode` / `frame_decode`: `FrameHeader::data` + `encode` (CRC of the payload) for 256 KiB,
//!   1 MiB and 4 MiB payloads; the incremental `Decoder` fed 64 KiB reads (header check, body CRC, copy).
//!
//! Run: `cargo bench --bench micro` (filter: `cargo bench --bench micro -- record_walk`). Quick
//! validation: `cargo bench --bench micro -- --warm-up-time 0.2 --measurement-time 0.5`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;
use walship::wal::gen::{generate, GenOptions};
use walship::wal::{validate_page, Lsn, RecordWalker, SegmentWalk, WalIdentity};
use walship::wire::{Decoder, FrameHeader, Limits, Message};

const SEG: u64 = 16 << 20;
const BLOCK: u64 = 8192;

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for c in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    v
}

/// Generated WAL: `segments` full 16 MiB segments starting at segment 1, read back into memory.
struct GenWal {
    _dir: tempfile::TempDir,
    id: WalIdentity,
    segs: Vec<Vec<u8>>,
    first_seg_start: u64,
}

fn gen_wal(segments: u64) -> GenWal {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = GenOptions {
        dir: dir.path().to_path_buf(),
        // Past the last segment's end so every segment is full of records.
        wal_bytes: segments * SEG + SEG / 2,
        ..GenOptions::default()
    };
    let report = generate(&opts).expect("generate WAL");
    let segs: Vec<Vec<u8>> = report
        .segment_files
        .iter()
        .take(segments as usize)
        .map(|p| std::fs::read(p).expect("read generated segment"))
        .collect();
    assert_eq!(segs.len() as u64, segments);
    GenWal {
        _dir: dir,
        id: opts.identity(),
        segs,
        first_seg_start: opts.start_segno * opts.seg_size,
    }
}

fn crc(c: &mut Criterion) {
    let mut g = c.benchmark_group("crc32c");
    for len in [8 << 10, 1 << 20, 16 << 20] {
        let buf = pattern(len, 3);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(human(len)), &buf, |b, buf| {
            b.iter(|| crc32c::crc32c(black_box(buf)))
        });
    }
    g.finish();
}

fn pages(c: &mut Criterion, wal: &GenWal) {
    let seg = &wal.segs[0];
    let mut g = c.benchmark_group("validate_page");
    g.throughput(Throughput::Bytes(seg.len() as u64));
    g.bench_function("16MiB_segment_8KiB_pages", |b| {
        b.iter(|| {
            let mut ok = 0u32;
            for (i, page) in seg.chunks_exact(BLOCK as usize).enumerate() {
                let lsn = Lsn(wal.first_seg_start + i as u64 * BLOCK);
                ok += validate_page(black_box(page), lsn, &wal.id).is_ok() as u32;
            }
            assert_eq!(ok as u64, SEG / BLOCK);
            ok
        })
    });
    g.finish();
}

fn walk(c: &mut Criterion, wal: &GenWal) {
    let mut g = c.benchmark_group("record_walk");
    let bytes: u64 = wal.segs.iter().map(|s| s.len() as u64).sum();
    g.throughput(Throughput::Bytes(bytes));
    g.bench_function(format!("{}_segments_16MiB", wal.segs.len()), |b| {
        b.iter(|| {
            let mut w = RecordWalker::new(wal.id, Lsn(wal.first_seg_start));
            for (i, seg) in wal.segs.iter().enumerate() {
                let start = Lsn(wal.first_seg_start + i as u64 * SEG);
                match w.walk_segment(start, black_box(seg)).expect("walk") {
                    SegmentWalk::Continues { .. } => {}
                    other => panic!("generated WAL ended early: {other:?}"),
                }
            }
            w.records_walked()
        })
    });
    g.finish();
}

fn frames(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame_encode");
    for len in [256 << 10, 1 << 20, 4 << 20] {
        let payload = pattern(len, 5);
        g.throughput(Throughput::Bytes(len as u64));
        g.bench_with_input(BenchmarkId::from_parameter(human(len)), &payload, |b, p| {
            b.iter(|| FrameHeader::data(0x1_0000_0000, black_box(p)).encode())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("frame_decode");
    for len in [256usize << 10, 1 << 20, 4 << 20] {
        // A 16 MiB stream of Data frames of `len` bytes, as the receiver sees it.
        let frames = (16 << 20) / len;
        let payload = pattern(len, 9);
        let mut stream = Vec::with_capacity(frames * (len + 32));
        for i in 0..frames {
            let lsn = 0x1_0000_0000 + (i * len) as u64;
            stream.extend_from_slice(&FrameHeader::data(lsn, &payload).encode());
            stream.extend_from_slice(&payload);
        }
        let limits = Limits::new(8 << 20).expect("limits");
        g.throughput(Throughput::Bytes(stream.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("decoder_64KiB_reads", human(len)),
            &stream,
            |b, stream| {
                b.iter(|| {
                    let mut d = Decoder::new(limits);
                    let mut n = 0usize;
                    for chunk in stream.chunks(64 << 10) {
                        d.feed(chunk);
                        while let Some(m) = d.next_message().expect("decode") {
                            if let Message::Data { payload, .. } = m {
                                n += payload.len();
                            }
                        }
                    }
                    assert_eq!(n, frames * len);
                    n
                })
            },
        );
        // The receiver's zero-copy path: header check + body CRC in place, no Decoder copy.
        g.bench_with_input(
            BenchmarkId::new("header_decode_verify_body", human(len)),
            &stream,
            |b, stream| {
                b.iter(|| {
                    let mut off = 0usize;
                    while off < stream.len() {
                        let h: &[u8; 32] = stream[off..off + 32].try_into().unwrap();
                        let hdr = FrameHeader::decode(black_box(h), &limits).expect("header");
                        let body = &stream[off + 32..off + 32 + hdr.body_len as usize];
                        hdr.verify_body(body).expect("body");
                        off += 32 + hdr.body_len as usize;
                    }
                    off
                })
            },
        );
    }
    g.finish();
}

fn human(len: usize) -> String {
    if len >= 1 << 20 {
        format!("{}MiB", len >> 20)
    } else {
        format!("{}KiB", len >> 10)
    }
}

fn all(c: &mut Criterion) {
    crc(c);
    frames(c);
    let wal = gen_wal(4);
    pages(c, &wal);
    walk(c, &wal);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = all
}
criterion_main!(benches);
