//! Integration tests that run the real `walship` binary (gen-wal, recv, send, restore) on real files
//! (ext4, never tmpfs: the receiver uses O_DIRECT) and 127.0.0.1 sockets.
//!
//! Every test asserts on exact bytes and exit codes. Each process writes its stdout+stderr to a log file
//! in the test's temp dir; when a test panics, [`Ctx`] prints the tail of every log it started, so a
//! failure shows what both the sender and the receiver said.
//!
//! Sizes are kept small (a few to ~100 MiB of generated WAL, 1 MiB segments where many segments are
//! wanted); the slow paths (killing a process mid-ship) throttle the sender with
//! `--frame-bytes 64KiB --in-flight-bytes-max 64KiB`, which makes every 64 KiB wait for a receiver
//! fdatasync, so there is time to kill something while data is in flight.
//!
//! Env knobs: `WALSHIP_KEEP_TMP=1` keeps the temp dirs (paths printed).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;
const BLCKSZ: u64 = 8192;
const SHIP_TIMEOUT: Duration = Duration::from_secs(60);
/// Sender flags that make it slow enough to be killed mid-ship (every 64 KiB waits for an fdatasync).
const THROTTLE: &[&str] = &["--frame-bytes", "64KiB", "--in-flight-bytes-max", "64KiB"];
const SYSTEM_A: u64 = 7_000_000_000_000_000_001; // gen-wal's default
const SYSTEM_B: u64 = 7_123_456_789_012_345_678;

// ---------------------------------------------------------------------------------------------------------



fn wait_exit(g: &mut ChildGuard, timeout: Duration, what: &str) -> ExitStatus {
    match g.wait_timeout(timeout).expect("wait") {
        Some(st) => st,
        None => panic!("{what} did not exit within {timeout:?}"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// gen-wal

#[derive(Debug, Clone)]
struct Gen {
    dir: PathBuf,
    seg_size: u64,
    first_lsn: u64,
    end_lsn: u64,
    segments: u64,
}

impl Gen {
    fn first_segno(&self) -> u64 {
        self.first_lsn / self.seg_size
    }
    fn seg_path(&self, segno: u64) -> PathBuf {
        self.dir.join(seg_name(1, segno, self.seg_size))
    }
}

fn gen_wal(ctx: &Ctx, dir: &str, wal_bytes: &str, seg_size: u64, extra: &[&str]) -> Gen {
    let d = ctx.path(dir);
    let seg = format!("{seg_size}");
    let mut args = vec!["gen-wal", "--dir", p(&d), "--wal-bytes", wal_bytes, "--seg-size", &seg];
    args.extend_from_slice(extra);
    let out = run_ok(&mut walship(&args)).unwrap_or_else(|e| panic!("{e}"));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    let field = |k: &str| json_field(&json, k).unwrap_or_else(|| panic!("gen-wal output lacks {k}: {json}"));
    let first_lsn = parse_lsn(&field("first_lsn")).expect("first_lsn");
    let end_lsn = parse_lsn(&field("end_lsn")).expect("end_lsn");
    let segments: u64 = field("segments").parse().expect("segments");
    assert_eq!(field("bytes").parse::<u64>().unwrap(), end_lsn - first_lsn, "gen-wal bytes field: {json}");
    Gen { dir: d, seg_size, first_lsn, end_lsn, segments }
}

// ---------------------------------------------------------------------------------------------------------
// recv

struct Recv {
    guard: ChildGuard,
    log: PathBuf,
}

fn start_recv(ctx: &Ctx, dir: &Path, port: u16, extra: &[&str]) -> Recv {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["recv", "--listen", &listen, "--dir", p(dir)];
    args.extend_from_slice(extra);
    let log = ctx.log("recv");
    let mut guard = spawn_logged("recv", walship(&args), &log);
    // Ready once it logged "listening" (after recovering the directory and binding).
    let ready = poll_until(Duration::from_secs(20), Duration::from_millis(5), || {
        if fs::read_to_string(&log).unwrap_or_default().contains("listening") {
            return Some(Ok(()));
        }
        match guard.try_wait() {
            Ok(Some(st)) => Some(Err(st)),
            _ => None,
        }
    });
    match ready {
        Some(Ok(())) => {}
        Some(Err(st)) => {
            guard.child = None;
            panic!("receiver exited at start-up with {st}:\n{}", tail_file(&log, 30));
        }
        None => panic!("receiver did not start listening within 20 s"),
    }
    Recv { guard, log }
}

impl Recv {
    /// SIGTERM; the receiver must flush and exit 0.
    fn stop(mut self) {
        self.guard.signal(libc::SIGTERM).expect("SIGTERM recv");
        let st = wait_exit(&mut self.guard, Duration::from_secs(20), "receiver after SIGTERM");
        assert_eq!(st.code(), Some(0), "receiver exit status after SIGTERM: {st}\n{}", tail_file(&self.log, 30));
    }
    fn kill9(mut self) {
        self.guard.signal(libc::SIGKILL).expect("SIGKILL recv");
        let st = wait_exit(&mut self.guard, Duration::from_secs(10), "receiver after SIGKILL");
        assert_eq!(st.signal(), Some(libc::SIGKILL), "the receiver exited by itself before kill -9: {st}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// send

fn send_args(src: &Path, port: u16, report: &Path, extra: &[&str]) -> Command {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["send", "--pg-wal", p(src), "--to", &to, "--once", "--report-json", p(report)];
    if !extra.contains(&"--retry-for") {
        args.extend_from_slice(&["--retry-for", "20s"]);
    }
    args.extend_from_slice(extra);
    walship(&args)
}

#[derive(Debug)]
struct SendResult {
    status: ExitStatus,
    output: String,
    report: Option<String>,
}

impl SendResult {
    fn report_field(&self, k: &str) -> String {
        let r = self.report.as_deref().unwrap_or_else(|| panic!("no report written; sender output:\n{}", self.output));
        json_field(r, k).unwrap_or_else(|| panic!("report lacks {k}: {r}"))
    }
    fn report_lsn(&self, k: &str) -> u64 {
        parse_lsn(&self.report_field(k)).unwrap_or_else(|| panic!("report {k} is not an LSN"))
    }
    fn assert_ok(&self) {
        assert_eq!(self.status.code(), Some(0), "sender failed ({}):\n{}", self.status, tail_str(&self.output, 40));
    }
    /// The `walship: error: ...` line.
    fn error_line(&self) -> String {
        self.output
            .lines()
            .find(|l| l.starts_with("walship: error:"))
            .unwrap_or_else(|| panic!("no `walship: error:` line in sender output:\n{}", self.output))
            .to_string()
    }
}

fn spawn_send(ctx: &Ctx, src: &Path, port: u16, report: &Path, extra: &[&str]) -> (ChildGuard, PathBuf) {
    let _ = fs::remove_file(report);
    let log = ctx.log("send");
    (spawn_logged("send", send_args(src, port, report, extra), &log), log)
}

fn finish_send(mut g: ChildGuard, log: &Path, report: &Path) -> SendResult {
    let status = wait_exit(&mut g, SHIP_TIMEOUT, "sender");
    SendResult { status, output: fs::read_to_string(log).unwrap_or_default(), report: fs::read_to_string(report).ok() }
}

fn send(ctx: &Ctx, src: &Path, port: u16, extra: &[&str]) -> SendResult {
    let report = ctx.log("report.json");
    let (g, log) = spawn_send(ctx, src, port, &report, extra);
    finish_send(g, &log, &report)
}

// ---------------------------------------------------------------------------------------------------------
// Directory and byte comparisons

/// WAL files in `dir` (the receiver's `.walship-flushed` state file, its `.walship.lock` and its pre-zeroed
/// `.walship-spare-N` files are not WAL and are left out).
fn list_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".walship-flushed" && n != ".walship.lock" && !n.starts_with(".walship-spare-"))
        .collect();
    v.sort();
    v
}

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    list_names(dir).into_iter().map(|n| (n.clone(), fs::read(dir.join(&n)).unwrap())).collect()
}

fn first_diff(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y).or(if a.len() != b.len() { Some(a.len().min(b.len())) } else { None })
}

/// The names a receiver directory must hold after WAL from segment `first_segno` up to `end` arrived:
/// complete segments, then `NAME.partial` for the segment holding `end` (none if `end` is a boundary).
fn expected_names(first_segno: u64, end: u64, seg: u64) -> Vec<String> {
    let mut v = Vec::new();
    for s in first_segno..end / seg {
        v.push(seg_name(1, s, seg));
    }
    if end % seg != 0 {
        v.push(format!("{}.partial", seg_name(1, end / seg, seg)));
    }
    v
}

/// `dst` holds exactly the source's WAL from `first_segno` up to `end`: complete segments byte-identical,
/// the `.partial` segment-sized, identical below `end` and zero from `end` on; no other file.
fn assert_received(src: &Path, dst: &Path, seg: u64, first_segno: u64, end: u64) {
    let names = list_names(dst);
    let want = expected_names(first_segno, end, seg);
    assert_eq!(names, want, "receiver directory {} holds other files than expected (end {})", dst.display(), fmt_lsn(end));
    for name in &names {
        let plain = name.trim_end_matches(".partial");
        let got = fs::read(dst.join(name)).unwrap();
        let orig = fs::read(src.join(plain)).unwrap();
        assert_eq!(got.len() as u64, seg, "{name}: size");
        let segno = end / seg;
        let seg_start = segno * seg;
        if name.ends_with(".partial") {
            let valid = (end - seg_start) as usize;
            if let Some(d) = first_diff(&got[..valid], &orig[..valid]) {
                panic!("{name}: differs from the source at offset {d} (LSN {}), below the end {}", fmt_lsn(seg_start + d as u64), fmt_lsn(end));
            }
            if let Some(nz) = got[valid..].iter().position(|&b| b != 0) {
                panic!("{name}: non-zero byte at offset {} (LSN {}), past the end {}", valid + nz, fmt_lsn(seg_start + (valid + nz) as u64), fmt_lsn(end));
            }
        } else if let Some(d) = first_diff(&got, &orig) {
            panic!("{name}: complete segment differs from the source at offset {d}");
        }
    }
}

fn complete_count(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok()).filter(|e| is_seg_name(e.file_name().to_str().unwrap_or(""))).count())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// A little WAL knowledge for choosing where to damage a segment.

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

const XLP_FIRST_IS_CONTRECORD: u16 = 0x0001;
const RECORD_HEADER: usize = 24;

/// In segment bytes `seg`, the first page at or after `from_page` on which a record starts after the
/// page header (and any continuation) with data bytes on that same page. Returns
/// (record offset in the segment, xl_tot_len, offset in the segment of a byte in the record's data).
fn record_with_data_on_page(seg: &[u8], from_page: usize) -> (usize, u32, usize) {
    let b = BLCKSZ as usize;
    for page in from_page..seg.len() / b {
        let po = page * b;
        let hdr = if page == 0 { 40 } else { 24 };
        let info = u16_at(seg, po + 2);
        let cont = if info & XLP_FIRST_IS_CONTRECORD != 0 { u32_at(seg, po + 16) as usize } else { 0 };
        let rec = (hdr + cont + 7) & !7;
        if rec + RECORD_HEADER + 64 > b {
            continue;
        }
        let tot_len = u32_at(seg, po + rec);
        if tot_len as usize <= RECORD_HEADER + 16 || tot_len > 1 << 20 {
            continue;
        }
        let data_on_page = (tot_len as usize).min(b - rec) - RECORD_HEADER;
        return (po + rec, tot_len, po + rec + RECORD_HEADER + data_on_page / 2);
    }
    panic!("no page at or after {from_page} with a record starting on it");
}

/// Token after `prefix` in `s`, parsed as an LSN.
fn lsn_after(s: &str, prefix: &str) -> u64 {
    let i = s.find(prefix).unwrap_or_else(|| panic!("{prefix:?} not in: {s}")) + prefix.len();
    let tok: String = s[i..].chars().take_while(|c| c.is_ascii_hexdigit() || *c == '/').collect();
    parse_lsn(&tok).unwrap_or_else(|| panic!("{tok:?} after {prefix:?} is not an LSN in: {s}"))
}

fn u64_after(s: &str, prefix: &str) -> u64 {
    let i = s.find(prefix).unwrap_or_else(|| panic!("{prefix:?} not in: {s}")) + prefix.len();
    let tok: String = s[i..].chars().take_while(|c| c.is_ascii_digit()).collect();
    tok.parse().unwrap_or_else(|_| panic!("{tok:?} after {prefix:?} is not a number in: {s}"))
}

/// After a ship the sender stopped because of damage: checks the error names the damaged segment's
/// file, an offset and an LSN; that everything below the reported valid end is at the receiver, byte
/// for byte, and nothing at or after it (no later segment, zeros after the valid end). Returns
/// (error LSN, valid end).
fn assert_stopped_at_damage(g: &Gen, r: &SendResult, dst: &Path, damaged_segno: u64) -> (u64, u64) {
    assert_eq!(r.status.code(), Some(1), "sender must fail on corrupt WAL ({}):\n{}", r.status, tail_str(&r.output, 40));
    let err = r.error_line();
    let seg_name_ = seg_name(1, damaged_segno, g.seg_size);
    assert!(err.contains(&seg_name_), "error does not name segment {seg_name_}: {err}");
    assert!(err.contains("offset"), "error does not say `offset`: {err}");
    assert!(err.contains("LSN"), "error does not say `LSN`: {err}");
    let err_lsn = lsn_after(&err, "(LSN ");
    let offset = u64_after(&err, "at offset ");
    assert_eq!(offset, err_lsn % g.seg_size, "offset and LSN in the error disagree: {err}");
    assert_eq!(err_lsn / g.seg_size, damaged_segno, "error LSN is not in the damaged segment: {err}");
    let valid_end = lsn_after(&err, "valid WAL ends at ");
    assert!(valid_end <= err_lsn, "valid end {} after the error LSN {}: {err}", fmt_lsn(valid_end), fmt_lsn(err_lsn));
    assert!(
        err_lsn - valid_end <= 24576 + BLCKSZ,
        "valid end {} is more than a record before the damage at {}: {err}",
        fmt_lsn(valid_end),
        fmt_lsn(err_lsn)
    );
    assert!(valid_end > damaged_segno * g.seg_size, "valid end {} not inside the damaged segment: {err}", fmt_lsn(valid_end));
    assert_received(&g.dir, dst, g.seg_size, g.first_segno(), valid_end);
    (err_lsn, valid_end)
}

// ---------------------------------------------------------------------------------------------------------
// 1-2: a plain ship

#[test]
fn complete_segments_identical_partial_up_to_horizon() {
    let ctx = Ctx::new("ship-basic");
    let g = gen_wal(&ctx, "src", "20MiB", MIB, &["--seed", "11"]);
    assert!(g.segments >= 20, "{g:?}");
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &dst, port, &[]);
    let r = send(&ctx, &g.dir, port, &[]);
    r.assert_ok();
    recv.stop();
    let first_seg_start = g.first_segno() * g.seg_size;
    assert_eq!(r.report_lsn("end_lsn"), g.end_lsn, "report end_lsn vs gen-wal end_lsn");
    assert_eq!(r.report_lsn("start_lsn"), first_seg_start, "report start_lsn");
    assert_eq!(r.report_field("bytes").parse::<u64>().unwrap(), g.end_lsn - first_seg_start, "report bytes");
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
    // Sanity of the check itself: the end lies inside a segment, so there is a .partial ...
    let names = list_names(&dst);
    let partial = dst.join(names.last().unwrap());
    assert!(partial.to_str().unwrap().ends_with(".partial"));
    // ... and the comparison does catch one wrong byte: in a complete segment, below the end in the
    // .partial, and in the .partial's zero tail.
    let end_off = g.end_lsn % g.seg_size;
    for (file, off) in [(dst.join(&names[3]), 12345u64), (partial.clone(), end_off / 2), (partial.clone(), end_off + 1)] {
        let orig = fs::read(&file).unwrap();
        patch(&file, off, &[orig[off as usize] ^ 1]);
        let caught = std::panic::catch_unwind(|| assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn));
        assert!(caught.is_err(), "assert_received missed a flipped byte at offset {off} of {}", file.display());
        fs::write(&file, &orig).unwrap();
    }
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
}

#[test]
fn recycled_segments_past_the_end_are_not_shipped() {
    let ctx = Ctx::new("ship-recycled");
    let g = gen_wal(&ctx, "src", "6MiB", MIB, &["--recycled-segments", "3", "--seed", "12"]);
    let last_valid = g.end_lsn / g.seg_size;
    let recycled: Vec<String> = list_names(&g.dir)
        .into_iter()
        .filter(|n| is_seg_name(n) && u64::from_str_radix(&n[16..], 16).unwrap() > last_valid)
        .collect();
    assert_eq!(recycled.len(), 3, "gen-wal should leave 3 recycled segments after the end: {:?}", list_names(&g.dir));
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &dst, port, &[]);
    let r = send(&ctx, &g.dir, port, &[]);
    r.assert_ok();
    recv.stop();
    assert_eq!(r.report_lsn("end_lsn"), g.end_lsn);
    let names = list_names(&dst);
    for n in &recycled {
        assert!(!names.contains(n) && !names.contains(&format!("{n}.partial")), "recycled segment {n} was shipped: {names:?}");
    }
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
}

// ---------------------------------------------------------------------------------------------------------
// 3-4: kill -9 mid-ship and resume

/// Waits until `dst` holds at least `k` complete segments (panics if `sender` exits first or after 30 s).
fn wait_complete_segments(dst: &Path, k: usize, sender: &mut ChildGuard) {
    let got = poll_until(Duration::from_secs(30), Duration::from_millis(2), || {
        if complete_count(dst) >= k {
            return Some(true);
        }
        if let Ok(Some(_)) = sender.try_wait() {
            return Some(false);
        }
        None
    });
    match got {
        Some(true) => {}
        Some(false) => panic!("sender finished before {k} complete segments appeared: nothing was killed mid-ship"),
        None => panic!("{k} complete segments did not appear in {} within 30 s", dst.display()),
    }
}

#[test]
fn resume_after_receiver_killed_mid_ship() {
    let ctx = Ctx::new("ship-kill-recv");
    let g = gen_wal(&ctx, "src", "80MiB", 8 * MIB, &["--seed", "13"]);
    assert!(g.segments >= 10, "{g:?}");
    // (complete segments to wait for, extra delay before kill -9): at least 4 segments (32 MiB) are left to
    // ship after the kill point, so the (throttled) sender is still busy when the receiver dies.
    for (i, (k, delay_ms)) in [(1usize, 0u64), (3, 50), (5, 100)].into_iter().enumerate() {
        let dst = ctx.path(&format!("dst{i}"));
        let port = free_port();
        let recv = start_recv(&ctx, &dst, port, &[]);
        let report = ctx.log("report.json");
        let mut extra = THROTTLE.to_vec();
        extra.extend_from_slice(&["--retry-for", "30s"]);
        let (mut sender, slog) = spawn_send(&ctx, &g.dir, port, &report, &extra);
        wait_complete_segments(&dst, k, &mut sender);
        std::thread::sleep(Duration::from_millis(delay_ms));
        assert!(
            sender.try_wait().unwrap().is_none(),
            "iteration {i}: the sender finished before the receiver was killed; the test would prove nothing"
        );
        recv.kill9();
        let killed_at = Instant::now();
        // Leave the sender without a receiver for a moment (it must keep retrying), then restart on the same dir and port.
        std::thread::sleep(Duration::from_millis(150));
        let recv = start_recv(&ctx, &dst, port, &[]);
        let r = finish_send(sender, &slog, &report);
        r.assert_ok();
        recv.stop();
        assert!(killed_at.elapsed() < SHIP_TIMEOUT);
        assert_eq!(r.report_lsn("end_lsn"), g.end_lsn, "iteration {i}: report end_lsn");
        let conns: u64 = r.report_field("connections").parse().unwrap();
        assert!(conns >= 2, "iteration {i}: the sender should have reconnected (connections = {conns})");
        assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
    }
}

#[test]
fn resume_after_sender_killed() {
    let ctx = Ctx::new("ship-kill-send");
    let g = gen_wal(&ctx, "src", "64MiB", 8 * MIB, &["--seed", "14"]);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &dst, port, &[]);
    let first_seg_start = g.first_segno() * g.seg_size;
    // Kill the sender twice at different points, then let a third one finish.
    let mut durable_floor = first_seg_start;
    for (i, k) in [1usize, 3].into_iter().enumerate() {
        let report = ctx.log("report.json");
        let (mut sender, _log) = spawn_send(&ctx, &g.dir, port, &report, THROTTLE);
        wait_complete_segments(&dst, k, &mut sender);
        sender.signal(libc::SIGKILL).unwrap();
        let st = wait_exit(&mut sender, Duration::from_secs(10), "sender after SIGKILL");
        assert_eq!(st.signal(), Some(libc::SIGKILL), "kill {i}: the sender finished before kill -9 ({st}): nothing was killed mid-ship");
        let complete = complete_count(&dst) as u64;
        assert!(complete >= k as u64, "kill {i}");
        durable_floor = durable_floor.max((g.first_segno() + complete) * g.seg_size);
    }
    let r = send(&ctx, &g.dir, port, &[]);
    r.assert_ok();
    let start = r.report_lsn("start_lsn");
    assert!(start > g.first_lsn, "the restarted sender did not resume: start_lsn {} <= WAL first_lsn {}", fmt_lsn(start), fmt_lsn(g.first_lsn));
    assert!(
        start >= durable_floor,
        "the restarted sender resumed at {} although the receiver held complete segments up to {}",
        fmt_lsn(start),
        fmt_lsn(durable_floor)
    );
    assert_eq!(r.report_lsn("end_lsn"), g.end_lsn);
    assert_eq!(r.report_field("bytes").parse::<u64>().unwrap(), g.end_lsn - start, "report bytes vs start/end");
    recv.stop();
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
}

// ---------------------------------------------------------------------------------------------------------
// 5-6: damaged WAL stops the ship with file, offset and LSN

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
    f.sync_all().unwrap();
}

fn read_seg(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn corrupt_page_stops_the_ship_with_file_offset_lsn() {
    let ctx = Ctx::new("ship-corrupt-record");
    let g = gen_wal(&ctx, "src", "8MiB", MIB, &["--seed", "15"]);
    let segno = g.first_segno() + 2; // the 3rd segment
    let path = g.seg_path(segno);
    let seg = read_seg(&path);
    let pages = (g.seg_size / BLCKSZ) as usize;
    let (rec_off, tot_len, byte_off) = record_with_data_on_page(&seg, pages / 2);
    let rec_lsn = segno * g.seg_size + rec_off as u64;
    patch(&path, byte_off as u64, &[seg[byte_off] ^ 0x5A]);
    eprintln!("flipped byte at {} offset {byte_off} inside the record at {} (xl_tot_len {tot_len})", path.display(), fmt_lsn(rec_lsn));

    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &dst, port, &[]);
    let r = send(&ctx, &g.dir, port, &[]);
    recv.stop();
    let (err_lsn, valid_end) = assert_stopped_at_damage(&g, &r, &dst, segno);
    assert_eq!(err_lsn, rec_lsn, "the error should name the damaged record's LSN: {}", r.error_line());
    assert!(r.error_line().contains(&format!("at offset {rec_off} ")), "offset of the damaged record ({rec_off}): {}", r.error_line());
    assert!(r.error_line().contains("CRC"), "a flipped data byte is a CRC failure: {}", r.error_line());
    // Valid WAL ends where the damaged record starts (the previous record's end, up to alignment padding).
    assert!(rec_lsn - valid_end < 8, "valid end {} is not the start of the damaged record {}", fmt_lsn(valid_end), fmt_lsn(rec_lsn));
}

/// Overwrites a header field of the page in the middle of the middle segment with `value(page_lsn)`.
fn damage_page_header(ctx: &Ctx, what: &str, field_off: u64, value: impl Fn(u64) -> Vec<u8>) {
    let g = gen_wal(ctx, "src", "8MiB", MIB, &["--seed", "16"]);
    let segno = g.first_segno() + g.segments / 2; // the middle segment
    assert!((segno + 1) * g.seg_size < g.end_lsn, "the damaged segment must be followed by valid WAL");
    let path = g.seg_path(segno);
    let page = g.seg_size / BLCKSZ / 2;
    let page_lsn = segno * g.seg_size + page * BLCKSZ;
    let seg = read_seg(&path);
    let po = (page * BLCKSZ) as usize;
    assert_eq!(u64_at(&seg, po + 8), page_lsn, "gen-wal page header xlp_pageaddr");
    patch(&path, page * BLCKSZ + field_off, &value(page_lsn));
    eprintln!("{what}: page at {} in {}", fmt_lsn(page_lsn), path.display());

    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(ctx, &dst, port, &[]);
    let r = send(ctx, &g.dir, port, &[]);
    recv.stop();
    let (err_lsn, valid_end) = assert_stopped_at_damage(&g, &r, &dst, segno);
    // The failing record starts before the damaged page (or is its first record) and cannot be a whole
    // record's length earlier; the valid end cannot be past the damaged page.
    assert_eq!(err_lsn, page_lsn, "the error should name the damaged page's LSN: {}", r.error_line());
    assert!(valid_end <= page_lsn, "valid end past the damaged page: {}", r.error_line());
    assert!(r.error_line().contains("page"), "the reason should mention the page: {}", r.error_line());
}

#[test]
fn stale_pageaddr_in_the_middle() {
    let ctx = Ctx::new("ship-stale-pageaddr");
    // xlp_pageaddr (byte 8 of the page header) claiming the page is 3 segments older, as in a recycled
    // segment, in the middle of valid WAL.
    damage_page_header(&ctx, "stale xlp_pageaddr", 8, |page_lsn| (page_lsn - 3 * MIB).to_le_bytes().to_vec());
}

#[test]
fn wrong_magic_page_is_corruption() {
    let ctx = Ctx::new("ship-wrong-magic");
    damage_page_header(&ctx, "wrong xlp_magic", 0, |_| 0xBEEFu16.to_le_bytes().to_vec());
}

// ---------------------------------------------------------------------------------------------------------
// 7: identity

#[test]
fn second_sender_with_other_system_id_is_refused() {
    let ctx = Ctx::new("ship-sysid");
    let a = gen_wal(&ctx, "srcA", "3MiB", MIB, &["--seed", "17"]);
    let sys_b = SYSTEM_B.to_string();
    let b = gen_wal(&ctx, "srcB", "5MiB", MIB, &["--seed", "18", "--system-id", &sys_b]);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &dst, port, &[]);
    send(&ctx, &a.dir, port, &[]).assert_ok();
    let before = snapshot(&dst);
    assert_received(&a.dir, &dst, a.seg_size, a.first_segno(), a.end_lsn);

    let check_refused = |r: &SendResult, when: &str| {
        assert_eq!(r.status.code(), Some(1), "{when}: sender of system B must fail ({}):\n{}", r.status, tail_str(&r.output, 30));
        let err = r.error_line();
        assert!(err.contains("system identifier"), "{when}: error should name the system identifier mismatch: {err}");
        assert!(err.contains(&SYSTEM_A.to_string()) && err.contains(&sys_b), "{when}: error should name both systems: {err}");
        assert!(r.report.is_none(), "{when}: no report for a refused ship");
    };
    // To the running receiver (identity learnt from sender A) ...
    let r = send(&ctx, &b.dir, port, &["--retry-for", "2s"]);
    check_refused(&r, "running receiver");
    assert_eq!(snapshot(&dst), before, "receiver directory changed after the refused sender");
    // ... and to a restarted one (identity recovered from the directory).
    recv.stop();
    let recv = start_recv(&ctx, &dst, port, &[]);
    let r = send(&ctx, &b.dir, port, &["--retry-for", "2s"]);
    check_refused(&r, "restarted receiver");
    // The receiver still serves system A afterwards (nothing new to ship).
    let r = send(&ctx, &a.dir, port, &[]);
    r.assert_ok();
    assert_eq!(r.report_lsn("end_lsn"), a.end_lsn);
    recv.stop();
    assert_eq!(snapshot(&dst), before, "receiver directory changed after the refused sender");
}

// ---------------------------------------------------------------------------------------------------------
// 8: receiver restart recovers its durable end from the files

/// Safety rule 3: acknowledgements never move backwards, also not across a receiver restart. A receiver
/// stopped cleanly (SIGTERM) mid-ship says "everything below X is durable" and told the sender X; after a
/// restart on the same directory it must still hold (and announce) at least X.
#[test]
fn receiver_restart_keeps_what_it_acknowledged() {
    let ctx = Ctx::new("ship-ack-monotonic");
    let g = gen_wal(&ctx, "src", "40MiB", 8 * MIB, &["--seed", "23"]);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &dst, port, &[]);
    let report = ctx.log("report.json");
    let mut extra = THROTTLE.to_vec();
    extra.extend_from_slice(&["--retry-for", "30s"]);
    let (mut sender, slog) = spawn_send(&ctx, &g.dir, port, &report, &extra);
    wait_complete_segments(&dst, 1, &mut sender);
    // Stop inside the second segment (a stop exactly at a segment boundary is a record boundary too).
    std::thread::sleep(Duration::from_millis(50));
    let recv_log = recv.log.clone();
    recv.stop();
    let said_durable = lsn_after(&fs::read_to_string(&recv_log).unwrap(), "everything below ");
    assert!(sender.try_wait().unwrap().is_none(), "the sender finished before the receiver was stopped");
    let recv = start_recv(&ctx, &dst, port, &[]);
    let recovered = lsn_after(&fs::read_to_string(&recv.log).unwrap(), "directory holds WAL durably up to ");
    let r = finish_send(sender, &slog, &report);
    r.assert_ok();
    recv.stop();
    assert_eq!(r.report_lsn("end_lsn"), g.end_lsn);
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
    assert!(
        recovered >= said_durable,
        "the receiver said everything below {} was durable (and acknowledged it), but after a restart the \
         directory holds WAL durably only up to {}",
        fmt_lsn(said_durable),
        fmt_lsn(recovered)
    );
    assert!(!r.output.contains("now holds only"), "the sender saw the acknowledged LSN move backwards:\n{}", r.output);
}

/// Ships `g` into a new `dst`, stops the receiver, applies `damage(partial, cut)` to the `.partial` where `cut`
/// is `cut_of(valid bytes in the .partial)`: bytes the receiver had acknowledged. Recovery must not cut
/// acknowledged bytes (issue #10): the restarted receiver refuses, naming the file and the acknowledged LSN,
/// and changes nothing. Then, as its message says, the damaged file is moved aside; the receiver resumes at the
/// segment's start and a second ship ends with the full WAL, byte for byte. Returns the second ship's start LSN
/// and the `.partial`'s start LSN.
fn ship_damage_partial_reship(ctx: &Ctx, g: &Gen, cut_of: impl FnOnce(u64) -> u64, damage: impl FnOnce(&Path, u64)) -> (u64, u64) {
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(ctx, &dst, port, &[]);
    send(ctx, &g.dir, port, &[]).assert_ok();
    recv.stop();
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
    let end_segno = g.end_lsn / g.seg_size;
    let seg_start = end_segno * g.seg_size;
    let partial = dst.join(format!("{}.partial", seg_name(1, end_segno, g.seg_size)));
    let valid = g.end_lsn - seg_start;
    assert!(valid > 3 * 4096, "want the end well inside the last segment ({})", fmt_lsn(g.end_lsn));
    let cut = cut_of(valid);
    damage(&partial, cut);
    let damaged = fs::read(&partial).unwrap();

    let listen = format!("127.0.0.1:{port}");
    let log = ctx.log("recv-refused");
    let mut refused = spawn_logged("recv", walship(&["recv", "--listen", &listen, "--dir", p(&dst)]), &log);
    let st = wait_exit(&mut refused, Duration::from_secs(20), "receiver on damaged acknowledged bytes");
    let out = fs::read_to_string(&log).unwrap();
    assert!(!st.success(), "the receiver must refuse to start:\n{out}");
    assert!(out.contains(p(&partial)) && out.contains("acknowledged"), "the refusal must name the file:\n{out}");
    assert_eq!(fs::read(&partial).unwrap(), damaged, "recovery changed the damaged file");
    fs::rename(&partial, ctx.path("damaged.partial")).unwrap();

    let recv = start_recv(ctx, &dst, port, &[]);
    let r = send(ctx, &g.dir, port, &[]);
    r.assert_ok();
    recv.stop();
    assert_eq!(r.report_lsn("end_lsn"), g.end_lsn);
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
    (r.report_lsn("start_lsn"), seg_start)
}

/// The middle of a 4096-byte block, about halfway through the valid data.
fn mid_block_halfway(valid: u64) -> u64 {
    (valid / 2) / 4096 * 4096 + 2048
}

#[test]
fn receiver_refuses_a_truncated_acknowledged_partial_until_it_is_moved_aside() {
    let ctx = Ctx::new("ship-torn-truncate");
    let g = gen_wal(&ctx, "src", "5800000", MIB, &["--seed", "19"]);
    let (start, seg_start) = ship_damage_partial_reship(&ctx, &g, mid_block_halfway, |partial, cut| {
        let f = OpenOptions::new().write(true).open(partial).unwrap();
        f.set_len(cut).unwrap();
        f.sync_all().unwrap();
    });
    assert_eq!(start, seg_start, "resumes at the start of the segment that was moved aside");
}

#[test]
fn receiver_refuses_an_emptied_acknowledged_partial_until_it_is_moved_aside() {
    let ctx = Ctx::new("ship-empty-partial");
    let g = gen_wal(&ctx, "src", "5800000", MIB, &["--seed", "22"]);
    let (start, seg_start) = ship_damage_partial_reship(&ctx, &g, |_| 0, |partial, _| {
        let f = OpenOptions::new().write(true).open(partial).unwrap();
        f.set_len(0).unwrap();
        f.sync_all().unwrap();
    });
    assert_eq!(start, seg_start, "the durable end is the end of the last complete segment");
}

#[test]
fn receiver_refuses_a_torn_acknowledged_partial_until_it_is_moved_aside() {
    // The torn tail as it happens with a preallocated file: the size stays, the bytes after some point
    // in the middle of a block are garbage (here: half a block of 0xA5, then zeros).
    let ctx = Ctx::new("ship-torn-garbage");
    let g = gen_wal(&ctx, "src", "5800000", MIB, &["--seed", "20"]);
    let (start, seg_start) = ship_damage_partial_reship(&ctx, &g, mid_block_halfway, |partial, cut| {
        let len = fs::metadata(partial).unwrap().len();
        patch(partial, cut, &vec![0xA5; 2048]);
        patch(partial, cut + 2048, &vec![0; (len - cut - 2048) as usize]);
    });
    assert_eq!(start, seg_start, "resumes at the start of the segment that was moved aside");
}

// ---------------------------------------------------------------------------------------------------------
// 9: CLI errors

fn assert_fails_with(args: &[&str], code: i32, needles: &[&str]) -> String {
    let mut c = walship(args);
    let out = run(&mut c).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "`{}` exit status:\n{}", cmdline(&c), describe_failure(&c, &out));
    for n in needles {
        assert!(stderr.contains(n), "`{}`: stderr lacks {n:?}:\n{stderr}", cmdline(&c));
    }
    stderr
}

#[test]
fn bad_cli_input_is_explained() {
    let ctx = Ctx::new("cli");
    let g = gen_wal(&ctx, "src", "1MiB", MIB, &[]);
    let port = free_port().to_string();
    let to = format!("127.0.0.1:{port}");
    // send without --once needs a server to follow: clap names --conninfo
    assert_fails_with(&["send", "--pg-wal", p(&g.dir), "--to", &to], 2, &["--conninfo"]);
    // recv --chunk-bytes not a power of two: named, and no directory created
    let rdir = ctx.path("recv-dir");
    let listen = format!("127.0.0.1:{port}");
    assert_fails_with(&["recv", "--listen", &listen, "--dir", p(&rdir), "--chunk-bytes", "1000"], 1, &["--chunk-bytes", "1000"]);
    assert!(!rdir.exists(), "a rejected recv created its directory");
    // not a size at all: clap usage error
    assert_fails_with(&["recv", "--listen", &listen, "--dir", p(&rdir), "--chunk-bytes", "lots"], 2, &["--chunk-bytes"]);
    // nonexistent --pg-wal names the path
    let missing = ctx.path("no-such-pg_wal");
    assert_fails_with(&["send", "--pg-wal", p(&missing), "--to", &to, "--once", "--retry-for", "1s"], 1, &[p(&missing)]);
    // a directory without WAL names the path
    let empty = ctx.path("empty");
    fs::create_dir(&empty).unwrap();
    assert_fails_with(&["send", "--pg-wal", p(&empty), "--to", &to, "--once", "--retry-for", "1s"], 1, &[p(&empty), "no WAL segment"]);
    // nobody listening: gives up after --retry-for, naming the address
    let t = Instant::now();
    assert_fails_with(&["send", "--pg-wal", p(&g.dir), "--to", &to, "--once", "--retry-for", "500ms"], 1, &["gave up", &to]);
    assert!(t.elapsed() < Duration::from_secs(15), "giving up took {:?}", t.elapsed());
    // --frame-bytes not a power of two
    assert_fails_with(&["send", "--pg-wal", p(&g.dir), "--to", &to, "--once", "--frame-bytes", "100000"], 1, &["--frame-bytes"]);
}

// ---------------------------------------------------------------------------------------------------------
// 10: restore

#[test]
fn restore_serves_partial_under_plain_name() {
    let ctx = Ctx::new("restore");
    let g = gen_wal(&ctx, "src", "3MiB", MIB, &["--seed", "21"]);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &dst, port, &[]);
    send(&ctx, &g.dir, port, &[]).assert_ok();
    recv.stop();
    assert_received(&g.dir, &dst, g.seg_size, g.first_segno(), g.end_lsn);
    let restore = |name: &str, target: &Path| {
        let mut c = walship(&["restore", name, p(target), "--dir", p(&dst)]);
        (run(&mut c).unwrap(), cmdline(&c))
    };
    // The newest segment exists only as .partial: served under its plain name, byte for byte.
    let end_name = seg_name(1, g.end_lsn / g.seg_size, g.seg_size);
    assert!(dst.join(format!("{end_name}.partial")).exists() && !dst.join(&end_name).exists());
    let target = ctx.path("restored-partial");
    let (out, c) = restore(&end_name, &target);
    assert_eq!(out.status.code(), Some(0), "`{c}`: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(&target).unwrap(), fs::read(dst.join(format!("{end_name}.partial"))).unwrap(), "restored partial bytes");
    // A complete segment is served as is.
    let first_name = seg_name(1, g.first_segno(), g.seg_size);
    let target = ctx.path("restored-complete");
    let (out, c) = restore(&first_name, &target);
    assert_eq!(out.status.code(), Some(0), "`{c}`: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(fs::read(&target).unwrap(), fs::read(g.seg_path(g.first_segno())).unwrap(), "restored complete bytes");
    // A missing segment: non-zero, nothing created.
    let missing = seg_name(1, g.end_lsn / g.seg_size + 1, g.seg_size);
    let target = ctx.path("restored-missing");
    let (out, c) = restore(&missing, &target);
    assert_ne!(out.status.code(), Some(0), "`{c}` of a missing segment succeeded");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&missing), "`{c}` stderr should name {missing}");
    assert!(!target.exists(), "a failed restore created its target");
    // Not a WAL name (path traversal): refused, nothing created.
    let (out, c) = restore("../dst/x", &target);
    assert_ne!(out.status.code(), Some(0), "`{c}` succeeded");
    assert!(!target.exists());
}

// ---------------------------------------------------------------------------------------------------------
// TLS

/// A self-signed certificate for `names` (its own CA): (cert.pem, key.pem) under `dir`.
fn self_signed(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("rcgen");
    let (cert, key) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}.key")));
    fs::write(&cert, ck.cert.pem()).unwrap();
    fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

struct TlsSetup {
    ctx: Ctx,
    g: Gen,
    dst: PathBuf,
    port: u16,
    cert: PathBuf,
    key: PathBuf,
    /// A CA that did not sign the receiver's certificate.
    other_ca: PathBuf,
}

impl TlsSetup {
    fn new(name: &str) -> TlsSetup {
        let ctx = Ctx::new(name);
        let g = gen_wal(&ctx, "src", "6MiB", MIB, &["--seed", "41"]);
        let (cert, key) = self_signed(ctx.dir.path(), "receiver", &["localhost", "127.0.0.1"]);
        let (other_ca, _) = self_signed(ctx.dir.path(), "stranger", &["localhost", "127.0.0.1"]);
        let dst = ctx.path("dst");
        TlsSetup { ctx, g, dst, port: free_port(), cert, key, other_ca }
    }

    fn recv_tls(&self) -> Recv {
        start_recv(&self.ctx, &self.dst, self.port, &["--tls-cert", p(&self.cert), "--tls-key", p(&self.key)])
    }

    fn received_files(&self) -> usize {
        fs::read_dir(&self.dst).map(|d| d.filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count()).unwrap_or(0)
    }
}

#[test]
fn tls_ships_byte_identical_and_resumes_after_a_receiver_crash() {
    let s = TlsSetup::new("tls-ship");
    let recv = s.recv_tls();
    let ca = p(&s.cert);
    let report = s.ctx.log("report.json");
    let (mut g, log) = spawn_send(&s.ctx, &s.g.dir, s.port, &report, &[&["--tls-ca", ca, "--tls-server-name", "localhost"], THROTTLE].concat());
    // Crash the receiver mid-ship; the sender reconnects (new TLS session) and finishes.
    wait_complete_segments(&s.dst, 2, &mut g);
    recv.kill9();
    let recv = s.recv_tls();
    let r = finish_send(g, &log, &report);
    r.assert_ok();
    assert!(r.output.contains("TLS established"), "sender log lacks the TLS session:\n{}", r.output);
    assert!(r.report_field("connections").parse::<u64>().unwrap() >= 2, "{:?}", r.report);
    assert_eq!(r.report_field("zero_copy_sends"), "0", "zero-copy does not apply to TLS");
    let recv_log = fs::read_to_string(&recv.log).unwrap();
    assert!(recv_log.contains("TLS established") && recv_log.contains("tls=true"), "{recv_log}");
    recv.stop();
    assert_received(&s.g.dir, &s.dst, s.g.seg_size, s.g.first_segno(), s.g.end_lsn);
}

#[test]
fn tls_refuses_an_untrusted_or_misnamed_receiver() {
    let s = TlsSetup::new("tls-untrusted");
    let recv = s.recv_tls();
    let r = send(&s.ctx, &s.g.dir, s.port, &["--tls-ca", p(&s.other_ca)]);
    assert_eq!(r.status.code(), Some(1), "{}", r.output);
    let e = r.error_line();
    assert!(e.contains("TLS handshake with 127.0.0.1") && e.contains("certificate") && e.contains("--tls-ca"), "{e}");
    let r = send(&s.ctx, &s.g.dir, s.port, &["--tls-ca", p(&s.cert), "--tls-server-name", "standby.example"]);
    assert_eq!(r.status.code(), Some(1), "{}", r.output);
    assert!(r.error_line().contains("certificate"), "{}", r.error_line());
    assert_eq!(s.received_files(), 0, "an untrusted receiver was sent WAL");
    let log = fs::read_to_string(&recv.log).unwrap();
    assert!(log.contains("TLS handshake with sender") && log.contains("received fatal alert"), "{log}");
    // The receiver still serves a sender that trusts it (by default the name checked is the host
    // of --to, here the IP address the certificate carries).
    let r = send(&s.ctx, &s.g.dir, s.port, &["--tls-ca", p(&s.cert)]);
    r.assert_ok();
    recv.stop();
}

#[test]
fn tls_and_plaintext_peers_are_told_what_the_other_expects() {
    let s = TlsSetup::new("tls-mismatch");
    // A plaintext sender against a TLS receiver.
    let recv = s.recv_tls();
    let r = send(&s.ctx, &s.g.dir, s.port, &[]);
    assert_eq!(r.status.code(), Some(1), "{}", r.output);
    assert!(r.error_line().contains("requires TLS") && r.error_line().contains("--tls-ca"), "{}", r.error_line());
    let log = fs::read_to_string(&recv.log).unwrap();
    assert!(log.contains("did not start TLS"), "{log}");
    recv.stop();
    assert_eq!(s.received_files(), 0);
    // A TLS sender against a plaintext receiver.
    let recv = start_recv(&s.ctx, &s.dst, s.port, &[]);
    let r = send(&s.ctx, &s.g.dir, s.port, &["--tls-ca", p(&s.cert)]);
    assert_eq!(r.status.code(), Some(1), "{}", r.output);
    assert!(r.error_line().contains("not TLS") && r.error_line().contains("--tls-cert"), "{}", r.error_line());
    let log = fs::read_to_string(&recv.log).unwrap();
    assert!(log.contains("started a TLS handshake"), "{log}");
    recv.stop();
    assert_eq!(s.received_files(), 0);
    // Bad certificate files: named in the error, at start-up.
    let bogus = s.ctx.path("bogus.pem");
    fs::write(&bogus, "not a certificate\n").unwrap();
    let out = run(&mut walship(&["recv", "--listen", "127.0.0.1:1", "--dir", p(&s.dst), "--tls-cert", p(&bogus), "--tls-key", p(&s.key)])).unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success() && err.contains("bogus.pem") && err.contains("no certificate"), "{err}");
}

#[test]
fn tls_sender_killed_mid_frame_then_a_new_sender_completes() {
    let s = TlsSetup::new("tls-sender-kill");
    let recv = s.recv_tls();
    let ca = p(&s.cert);
    let report = s.ctx.log("report.json");
    let (mut g, _log) = spawn_send(&s.ctx, &s.g.dir, s.port, &report, &[&["--tls-ca", ca], THROTTLE].concat());
    wait_complete_segments(&s.dst, 2, &mut g);
    g.signal(libc::SIGKILL).expect("SIGKILL sender");
    let _ = wait_exit(&mut g, Duration::from_secs(10), "sender after SIGKILL");
    // The receiver drops the half-received frame (the TLS session just ends) and serves the next sender.
    let r = send(&s.ctx, &s.g.dir, s.port, &["--tls-ca", ca]);
    r.assert_ok();
    let log = fs::read_to_string(&recv.log).unwrap();
    assert!(log.contains("TLS connection with") || log.contains("sender closed the connection"), "{log}");
    recv.stop();
    assert_received(&s.g.dir, &s.dst, s.g.seg_size, s.g.first_segno(), s.g.end_lsn);
}
