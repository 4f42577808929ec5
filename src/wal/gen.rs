//! Synthetic WAL generator: real PostgreSQL page/record format with random records, for tests, benchmarks
//! and the demo.
//!
//! Output: whole segment files (`seg_size` bytes each) named canonically in `opts.dir`, starting at
//! `start_segno`. Every segment's first page has a long header, other pages short ones; continuation pages
//! carry `XLP_FIRST_IS_CONTRECORD` and `xlp_rem_len`; records are MAXALIGN'd with correct `xl_prev` and CRC.
//! After the end of valid WAL the page holding the end is zero-filled (as PostgreSQL does); later pages of
//! that segment are zeros or, with `fill_tail_with_zeros == false`, stale old WAL (as in a recycled file).
//! `recycled_segments` extra files hold stale WAL whose `xlp_pageaddr`s belong to other positions.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;

use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};

use super::lsn::Lsn;
use super::page::{
    LongPageHeader, PageHeader, WalIdentity, XLP_FIRST_IS_CONTRECORD, XLP_LONG_HEADER,
};
use super::record::{record_crc, RecordHeader, XLOG_RECORD_HEADER_LEN};
use super::segment::{is_valid_block_size, is_valid_seg_size, segment_file_name};

const HEADER_LEN_U32: u32 = XLOG_RECORD_HEADER_LEN as u32;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub dir: PathBuf,
    pub system_id: u64,
    pub tli: u32,
    pub magic: u16,
    pub seg_size: u64,
    pub block_size: u64,
    pub start_segno: u64,
    /// Bytes of valid WAL from the first segment start (the end lands after the record crossing this).
    pub wal_bytes: u64,
    pub seed: u64,
    /// Record sizes are uniform in `24..=record_bytes_max`.
    pub record_bytes_max: u32,
    /// Extra segment files after the last real one, holding stale WAL (wrong `xlp_pageaddr`).
    pub recycled_segments: u32,
    /// Zeros after the page holding the end; otherwise stale WAL there (a recycled file being reused).
    pub fill_tail_with_zeros: bool,
    /// Emit an `XLOG_SWITCH` in the second half of every n-th segment.
    pub switch_every_segments: Option<u32>,
    /// The first file begins with the continuation of a record that started in the (unwritten) previous
    /// segment. Needs `start_segno >= 1`.
    pub start_mid_record: bool,
}

impl Default for GenOptions {
    fn default() -> GenOptions {
        GenOptions {
            dir: PathBuf::from("."),
            system_id: 7_000_000_000_000_000_001,
            tli: 1,
            magic: 0xD110,
            seg_size: 16 << 20,
            block_size: 8192,
            start_segno: 1,
            wal_bytes: 64 << 20,
            seed: 1,
            record_bytes_max: 8192 * 3,
            recycled_segments: 0,
            fill_tail_with_zeros: true,
            switch_every_segments: None,
            start_mid_record: false,
        }
    }
}

impl GenOptions {
    /// The identity every generated page carries.
    pub fn identity(&self) -> WalIdentity {
        WalIdentity {
            system_id: self.system_id,
            seg_size: self.seg_size,
            block_size: self.block_size,
            magic: self.magic,
            tli: self.tli,
        }
    }
}

/// What was generated.
#[derive(Debug, Clone)]
pub struct GenReport {
    /// LSN of the first record that starts in the generated files.
    pub first_lsn: Lsn,
    /// Exact end of valid WAL (MAXALIGN'd end of the last record, or the segment end after a final switch).
    pub end_lsn: Lsn,
    /// Every file written, in LSN order (real segments, then recycled ones).
    pub segment_files: Vec<PathBuf>,
    /// Complete records starting at or after `first_lsn` (what a walker from the first file counts).
    pub records: u64,
}

/// Where finished segments go.
pub(crate) enum Sink {
    /// Write files for segments `>= first_segno`; drop earlier ones (lead-in for `start_mid_record`).
    Files {
        opts: GenOptions,
        files: Vec<PathBuf>,
    },
    /// Keep every finished segment in memory (stale content, hand-built test WAL).
    Capture(Vec<Vec<u8>>),
}

/// A WAL byte stream being laid out into segment buffers.
pub(crate) struct Stream {
    id: WalIdentity,
    buf: Vec<u8>,
    buf_seg_start: Lsn,
    pub(crate) pos: Lsn,
    pub(crate) prev: Lsn,
    /// Seeded random bytes; record bodies are slices of it at random offsets (no per-byte RNG work).
    pool: Vec<u8>,
    rng: SmallRng,
    pub(crate) sink: Sink,
}

impl Stream {
    pub(crate) fn new(id: WalIdentity, pos: Lsn, seed: u64, sink: Sink) -> Stream {
        Stream {
            id,
            buf: vec![0u8; id.seg_size as usize],
            buf_seg_start: pos.segment_start(id.seg_size),
            pos,
            prev: Lsn::INVALID,
            pool: Vec::new(),
            rng: SmallRng::seed_from_u64(seed),
            sink,
        }
    }

    /// Hand the current buffer to the sink and start the segment at `pos`.
    pub(crate) fn emit(&mut self) -> io::Result<()> {
        let segno = self.buf_seg_start.segno(self.id.seg_size);
        match &mut self.sink {
            Sink::Files { opts, files } => {
                if segno >= opts.start_segno {
                    let path = opts
                        .dir
                        .join(segment_file_name(opts.tli, segno, opts.seg_size));
                    let mut f = File::create(&path)?;
                    f.write_all(&self.buf)?;
                    files.push(path);
                }
            }
            Sink::Capture(segments) => segments.push(self.buf.clone()),
        }
        Ok(())
    }

    /// Make the buffer hold the segment containing `pos` (which is at a segment start when they differ).
    pub(crate) fn roll_segment(&mut self) -> io::Result<()> {
        let seg_start = self.pos.segment_start(self.id.seg_size);
        if seg_start != self.buf_seg_start {
            debug_assert_eq!(seg_start, self.buf_seg_start + self.id.seg_size);
            self.emit()?;
            self.buf.fill(0);
            self.buf_seg_start = seg_start;
        }
        Ok(())
    }

    fn offset(&self) -> usize {
        (self.pos - self.buf_seg_start) as usize
    }

    /// Write the page header at `pos` (a page start) and step past it.
    fn page_header(&mut self, info: u16, rem_len: u32) -> io::Result<()> {
        self.roll_segment()?;
        debug_assert_eq!(self.pos.page_offset(self.id.block_size), 0);
        let long = (self.pos.segment_offset(self.id.seg_size) == 0).then_some(LongPageHeader {
            system_id: self.id.system_id,
            seg_size: self.id.seg_size as u32,
            block_size: self.id.block_size as u32,
        });
        let info = if long.is_some() {
            info | XLP_LONG_HEADER
        } else {
            info
        };
        let hdr = PageHeader {
            magic: self.id.magic,
            info,
            tli: self.id.tli,
            pageaddr: self.pos,
            rem_len,
            long,
        };
        let off = self.offset();
        hdr.encode(&mut self.buf[off..]);
        self.pos = self.pos + hdr.header_len() as u64;
        Ok(())
    }

    /// Lay out one whole record (`header` then `body`) at `pos`, inserting page headers.
    fn put_parts(&mut self, header: &[u8], body: &[u8]) -> io::Result<()> {
        let total = header.len() + body.len();
        let mut written = 0usize;
        while written < total {
            if self.pos.page_offset(self.id.block_size) == 0 {
                let (info, rem) = if written > 0 {
                    (XLP_FIRST_IS_CONTRECORD, (total - written) as u32)
                } else {
                    (0, 0)
                };
                self.page_header(info, rem)?;
            }
            let page_left =
                (self.id.block_size - self.pos.page_offset(self.id.block_size)) as usize;
            let n = page_left.min(total - written);
            let off = self.offset();
            let mut dst = &mut self.buf[off..off + n];
            if written < header.len() {
                let h = (header.len() - written).min(n);
                dst[..h].copy_from_slice(&header[written..written + h]);
                dst = &mut dst[h..];
                written += h;
            }
            if !dst.is_empty() {
                let b = written - header.len();
                let len = dst.len();
                dst.copy_from_slice(&body[b..b + len]);
                written += len;
            }
            self.pos = self.pos + n as u64;
        }
        self.pos = self.pos.maxalign();
        Ok(())
    }

    /// Make the pool hold at least `len` seeded random bytes (1 MiB minimum).
    fn reserve_pool(&mut self, len: usize) {
        if self.pool.len() < len.max(1 << 20) {
            self.pool.resize(len.max(1 << 20), 0);
            self.rng.fill_bytes(&mut self.pool);
        }
    }

    /// Build a record of `tot_len` bytes with a random body, then lay it out. Returns its LSN.
    pub(crate) fn put_record(&mut self, tot_len: u32, rmid: u8, info: u8) -> io::Result<Lsn> {
        debug_assert!(tot_len >= HEADER_LEN_U32);
        if self.pos.page_offset(self.id.block_size) == 0 {
            self.page_header(0, 0)?;
        }
        let start = self.pos;
        let body_len = tot_len as usize - XLOG_RECORD_HEADER_LEN;
        self.reserve_pool(body_len);
        let pool = std::mem::take(&mut self.pool);
        let at = self.rng.random_range(0..=pool.len() - body_len);
        let body = &pool[at..at + body_len];
        let mut hdr = RecordHeader {
            tot_len,
            xid: self.rng.random(),
            prev: self.prev,
            info,
            rmid,
            crc: 0,
        };
        hdr.crc = record_crc(&hdr.encode()[..20], body);
        let result = self.put_parts(&hdr.encode(), body);
        self.pool = pool;
        result?;
        self.prev = start;
        Ok(start)
    }

    /// A random ordinary (non-switch) record.
    pub(crate) fn put_random_record(&mut self, record_bytes_max: u32) -> io::Result<Lsn> {
        let tot_len = self
            .rng
            .random_range(HEADER_LEN_U32..=record_bytes_max.max(HEADER_LEN_U32));
        let rmid = self.rng.random_range(0..22u8);
        let mut info = self.rng.random::<u8>() & 0xF0;
        if rmid == 0 && info == 0x40 {
            info = 0; // never an accidental XLOG_SWITCH
        }
        self.put_record(tot_len, rmid, info)
    }

    /// An `XLOG_SWITCH` record, then padding pages (header only) to the segment end. Returns its LSN;
    /// `pos` is then the next segment start.
    pub(crate) fn put_switch(&mut self) -> io::Result<Lsn> {
        let start = self.put_record(HEADER_LEN_U32, 0, 0x40)?;
        let block = self.id.block_size;
        self.pos = Lsn(self.pos.0.div_ceil(block) * block);
        while self.pos.segment_offset(self.id.seg_size) != 0 {
            self.page_header(0, 0)?;
            self.pos = self.pos.page_start(block) + block;
        }
        Ok(start)
    }
}

/// When to emit `XLOG_SWITCH`: in the second half of every n-th segment, where a header fits on the page.
struct SwitchSchedule {
    every_segments: u64,
    next_segno: u64,
}

impl SwitchSchedule {
    fn new(opts: &GenOptions) -> SwitchSchedule {
        let every_segments = opts.switch_every_segments.map_or(0, u64::from);
        SwitchSchedule {
            every_segments,
            next_segno: opts.start_segno + every_segments.saturating_sub(1),
        }
    }

    fn due(&mut self, opts: &GenOptions, pos: Lsn) -> bool {
        if self.every_segments == 0 {
            return false;
        }
        let segno = pos.segno(opts.seg_size);
        if segno > self.next_segno {
            // A long record jumped over the chosen segment: pick the next one in the schedule.
            self.next_segno +=
                self.every_segments * (segno - self.next_segno).div_ceil(self.every_segments);
        }
        let in_second_half = pos.segment_offset(opts.seg_size) >= opts.seg_size / 2;
        let header_fits =
            opts.block_size - pos.page_offset(opts.block_size) >= XLOG_RECORD_HEADER_LEN as u64;
        if segno == self.next_segno && in_second_half && header_fits {
            self.next_segno += self.every_segments;
            return true;
        }
        false
    }
}

fn stale_segno(segno: u64) -> u64 {
    if segno > 64 {
        segno - 64
    } else {
        segno + 1_000_000
    }
}

/// A full segment of valid-looking WAL written for a different position than `segno`'s.
fn stale_segment(opts: &GenOptions, segno: u64) -> io::Result<Vec<u8>> {
    let id = opts.identity();
    let start = Lsn(stale_segno(segno) * opts.seg_size);
    let seed = opts.seed ^ segno.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut stream = Stream::new(id, start, seed, Sink::Capture(Vec::new()));
    while stream.pos < start + opts.seg_size {
        stream.put_random_record(opts.record_bytes_max)?;
    }
    stream.roll_segment()?;
    match stream.sink {
        Sink::Capture(mut segments) if !segments.is_empty() => Ok(segments.swap_remove(0)),
        _ => Err(io::Error::other(
            "stale segment generation produced nothing",
        )),
    }
}

fn check_options(opts: &GenOptions) -> io::Result<()> {
    let bad = |what: &str| {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("GenOptions: {what}"),
        ))
    };
    if !is_valid_seg_size(opts.seg_size) || !is_valid_block_size(opts.block_size) {
        return bad("seg_size/block_size invalid");
    }
    if opts.record_bytes_max < HEADER_LEN_U32
        || opts.record_bytes_max > super::record::RECORD_LEN_MAX
    {
        return bad("record_bytes_max must be in 24..=1 GiB");
    }
    if opts.start_mid_record && opts.start_segno == 0 {
        return bad("start_mid_record needs start_segno >= 1");
    }
    if opts.switch_every_segments == Some(0) {
        return bad("switch_every_segments must be >= 1");
    }
    Ok(())
}

/// Generate the WAL described by `opts` into `opts.dir`.
pub fn generate(opts: &GenOptions) -> io::Result<GenReport> {
    check_options(opts)?;
    std::fs::create_dir_all(&opts.dir)?;
    let id = opts.identity();
    let first_seg_start = Lsn(opts.start_segno * opts.seg_size);
    let sink = Sink::Files {
        opts: opts.clone(),
        files: Vec::new(),
    };
    let mut stream = Stream::new(id, first_seg_start, opts.seed, sink);
    if opts.start_mid_record {
        // A record starting 3.5 pages before the first segment and spilling ~2.5 pages into it.
        let lead_bytes = 3 * opts.block_size + opts.block_size / 2;
        stream = Stream::new(
            id,
            Lsn(first_seg_start.0 - lead_bytes),
            opts.seed,
            stream.sink,
        );
        stream.put_record(
            (lead_bytes + 2 * opts.block_size + opts.block_size / 2) as u32,
            11,
            0x10,
        )?;
    }
    let target_end = first_seg_start + opts.wal_bytes;
    let mut first_lsn = None;
    let mut records = 0u64;
    let mut end_lsn = stream.pos;
    let mut switches = SwitchSchedule::new(opts);
    while stream.pos < target_end {
        let start = if switches.due(opts, stream.pos) {
            stream.put_switch()?
        } else {
            stream.put_random_record(opts.record_bytes_max)?
        };
        end_lsn = stream.pos;
        first_lsn.get_or_insert(start);
        records += 1;
    }
    finish(opts, stream, first_lsn.unwrap_or(end_lsn), end_lsn, records)
}

/// Write the last real segment (stale tail if asked) and the recycled segments.
fn finish(
    opts: &GenOptions,
    mut stream: Stream,
    first_lsn: Lsn,
    end_lsn: Lsn,
    records: u64,
) -> io::Result<GenReport> {
    if !opts.fill_tail_with_zeros {
        let stale = stale_segment(opts, stream.buf_seg_start.segno(opts.seg_size))?;
        let tail_from = end_lsn.0.div_ceil(opts.block_size) * opts.block_size;
        let tail_off = (tail_from - stream.buf_seg_start.0).min(opts.seg_size) as usize;
        stream.buf[tail_off..].copy_from_slice(&stale[tail_off..]);
    }
    stream.emit()?;
    let Sink::Files {
        files: mut segment_files,
        ..
    } = stream.sink
    else {
        return Err(io::Error::other("generator sink lost"));
    };
    let last_segno = stream.buf_seg_start.segno(opts.seg_size);
    for k in 1..=u64::from(opts.recycled_segments) {
        let segno = last_segno + k;
        let path = opts
            .dir
            .join(segment_file_name(opts.tli, segno, opts.seg_size));
        File::create(&path)?.write_all(&stale_segment(opts, segno)?)?;
        segment_files.push(path);
    }
    Ok(GenReport {
        first_lsn,
        end_lsn,
        segment_files,
        records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::page::validate_page;
    use crate::wal::segment::WalFileName;

    fn opts_in(dir: &std::path::Path) -> GenOptions {
        GenOptions {
            dir: dir.to_path_buf(),
            seg_size: 1 << 20,
            wal_bytes: (2 << 20) + 5000,
            ..GenOptions::default()
        }
    }

    #[test]
    fn writes_whole_canonical_files_with_valid_first_pages() {
        let dir = tempfile::tempdir().unwrap();
        let opts = GenOptions {
            recycled_segments: 1,
            ..opts_in(dir.path())
        };
        let report = generate(&opts).unwrap();
        assert_eq!(report.first_lsn, Lsn((1 << 20) + 40));
        assert!(
            report.end_lsn >= Lsn((3 << 20) + 5000) && report.end_lsn.maxalign() == report.end_lsn
        );
        assert_eq!(report.segment_files.len(), 3 + 1);
        assert!(report.records > 100);
        for (i, path) in report.segment_files.iter().enumerate() {
            let bytes = std::fs::read(path).unwrap();
            assert_eq!(bytes.len() as u64, opts.seg_size);
            let name = path.file_name().unwrap().to_str().unwrap();
            let segno = 1 + i as u64;
            assert_eq!(
                WalFileName::parse(name, opts.seg_size),
                Some(WalFileName::Segment { tli: 1, segno })
            );
            let first_page = validate_page(&bytes, Lsn(segno << 20), &opts.identity());
            assert_eq!(first_page.is_ok(), i < 3, "segment {i}: {first_page:?}");
        }
    }

    #[test]
    fn same_seed_same_bytes() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let ra = generate(&GenOptions {
            seed: 5,
            ..opts_in(a.path())
        })
        .unwrap();
        let rb = generate(&GenOptions {
            seed: 5,
            ..opts_in(b.path())
        })
        .unwrap();
        assert_eq!((ra.end_lsn, ra.records), (rb.end_lsn, rb.records));
        for (fa, fb) in ra.segment_files.iter().zip(&rb.segment_files) {
            assert!(std::fs::read(fa).unwrap() == std::fs::read(fb).unwrap());
        }
    }

    #[test]
    fn rejects_bad_options() {
        let dir = tempfile::tempdir().unwrap();
        let base = opts_in(dir.path());
        for bad in [
            GenOptions {
                seg_size: 3 << 20,
                ..base.clone()
            },
            GenOptions {
                block_size: 100,
                ..base.clone()
            },
            GenOptions {
                record_bytes_max: 10,
                ..base.clone()
            },
            GenOptions {
                switch_every_segments: Some(0),
                ..base.clone()
            },
            GenOptions {
                start_mid_record: true,
                start_segno: 0,
                ..base.clone()
            },
        ] {
            assert_eq!(
                generate(&bad).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }

    /// `cargo test --release --lib gen_throughput -- --ignored --nocapture` (writes 1 GiB to a temp dir).
    #[test]
    #[ignore]
    fn gen_throughput() {
        let dir = tempfile::tempdir_in(
            std::env::var("WALSHIP_GEN_DIR").unwrap_or_else(|_| "/tmp".into()),
        )
        .unwrap();
        let opts = GenOptions {
            dir: dir.path().to_path_buf(),
            wal_bytes: 1 << 30,
            ..GenOptions::default()
        };
        let t = std::time::Instant::now();
        let report = generate(&opts).unwrap();
        let secs = t.elapsed().as_secs_f64();
        let bytes = report.segment_files.len() as f64 * opts.seg_size as f64;
        println!(
            "{} records, {:.0} MB in {secs:.2}s = {:.0} MB/s",
            report.records,
            bytes / 1e6,
            bytes / 1e6 / secs
        );
    }
}
