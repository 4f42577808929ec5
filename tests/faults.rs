//! Faults and bad input, on real files and 127.0.0.1 with the real `walship` binary: nothing lost, nothing
//! acknowledged that is not durable, bad input refused with a clear error and no damage.
//!
//! - kill -9 of the receiver and the sender at seeded random points, many times, during a multi-segment ship;
//! - a receiver `.partial` truncated / torn while the receiver is stopped;
//! - the receiver's filesystem filling up (loop-mounted ext4; skipped with a reason if mounting is not allowed,
//!   unless `WALSHIP_REQUIRE_LOOP=1`);
//! - bad `pg_wal` contents (truncated, garbage, wrong magic, another system, non-canonical names);
//! - bad peers speaking (or not speaking) protocol v1 by hand over raw TCP, and a silent peer.
//!
//! Seeds: `WALSHIP_FAULT_SEED` (default fixed) drives kill timing; every run prints what it did.
//! Keep temp dirs with `WALSHIP_KEEP_TMP=1`.
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::hash::{DefaultHasher, Hasher};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::*;
use walship::wire::{
    Decoder, ErrorCode, FrameHeader, FrameKind, Hello, Limits, Message, FRAME_HEADER_LEN, PROTOCOL_VERSION,
};

const SEG: u64 = 1 << 20;
const SYSID: u64 = 7_000_000_000_000_000_001;
/// Throttled sender flags: small frames, little in flight, so a ship takes long enough to be killed mid-way.
const THROTTLE: [&str; 6] = ["--in-flight-bytes-max", "2MiB", "--frame-bytes", "64KiB", "--send-batch-bytes-max", "64KiB"];

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

/// splitmix64: a tiny seeded RNG (reproducible kill schedules without depending on rand's API).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

fn seed() -> u64 {
    std::env::var("WALSHIP_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_2026)
}

/// Generates WAL with 1 MiB segments; returns the exact end of valid WAL.
fn gen_wal(dir: &Path, wal_bytes: &str, seed: u64, system_id: u64) -> u64 {
    let out = run_ok(&mut cmd(
        walship_bin(),
        [
            "gen-wal".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--wal-bytes".into(),
            wal_bytes.into(),
            "--seg-size".into(),
            "1MiB".into(),
            "--seed".into(),
            seed.to_string(),
            "--system-id".into(),
            system_id.to_string(),
        ],
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    let end = json_field(&json, "end_lsn").expect("end_lsn in gen-wal output");
    parse_lsn(&end).expect("end_lsn parses")
}

fn log_file(path: &Path) -> fs::File {
    fs::OpenOptions::new().create(true).append(true).open(path).expect("open log")
}

/// The receiver's published durable LSN: the one non-WAL file it keeps in its directory.
const STATE_FILE: &str = ".walship-flushed";
/// The receiver's pre-zeroed spare segment files (not WAL).
const SPARE_PREFIX: &str = ".walship-spare-";
/// The receiver's directory lock (not WAL).
const LOCK_FILE: &str = ".walship.lock";

fn spawn_logged(name: &str, args: &[String], log: &Path) -> ChildGuard {
    let mut c = Command::new(walship_bin());
    c.args(args).stdin(Stdio::null()).stdout(log_file(log)).stderr(log_file(log)).env("NO_COLOR", "1");
    c.env("WALSHIP_LOG", "info").env("WALSHIP_INSECURE_NO_AUTH", "true");
    ChildGuard::spawn(name, &mut c).expect("spawn walship")
}

struct Recv {
    guard: ChildGuard,
    log: PathBuf,
}

fn start_recv(dir: &Path, port: u16, log: &Path, extra: &[&str]) -> Recv {
    try_start_recv(dir, port, log, extra).unwrap_or_else(|e| panic!("{e}"))
}

fn try_start_recv(dir: &Path, port: u16, log: &Path, extra: &[&str]) -> Result<Recv, String> {
    let before = fs::read_to_string(log).map(|s| s.matches("listening").count()).unwrap_or(0);
    let mut args: Vec<String> = vec![
        "recv".into(),
        "--listen".into(),
        format!("127.0.0.1:{port}"),
        "--dir".into(),
        dir.display().to_string(),
        "--chunk-bytes".into(),
        "256KiB".into(),
        "--in-flight-bytes-max".into(),
        "8MiB".into(),
        "--frame-bytes-max".into(),
        "1MiB".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut guard = spawn_logged("recv", &args, log);
    let up = poll_until(Duration::from_secs(20), Duration::from_millis(5), || {
        if let Ok(Some(st)) = guard.try_wait() {
            return Some(Err(st));
        }
        let n = fs::read_to_string(log).map(|s| s.matches("listening").count()).unwrap_or(0);
        (n > before).then_some(Ok(()))
    });
    match up {
        Some(Ok(())) => Ok(Recv { guard, log: log.to_path_buf() }),
        Some(Err(st)) => Err(format!("receiver exited at start-up ({st}):\n{}", tail_file(log, 30))),
        None => Err(format!("receiver did not start listening:\n{}", tail_file(log, 30))),
    }
}

/// Restarts the receiver after a kill. With `workaround`, a start-up refused because of an EMPTY `.partial`
/// (created, then killed before it was sized: see the ignored BUG test) is worked around the way an operator
/// would: the 0-byte file (it holds nothing) is removed and the start retried. Returns the receiver and the
/// files removed.
fn restart_recv(dir: &Path, port: u16, log: &Path, workaround: bool) -> (Recv, Vec<String>) {
    let mut removed = Vec::new();
    loop {
        match try_start_recv(dir, port, log, &[]) {
            Ok(r) => return (r, removed),
            Err(e) => {
                let line = e.lines().rev().find(|l| l.contains("walship: error")).unwrap_or("").to_string();
                let empty = line.contains(".partial: not a WAL segment this receiver can use: 0 bytes, expected");
                if !(workaround && empty) || removed.len() > 8 {
                    panic!("{e}");
                }
                let path = line.split_whitespace().nth(2).unwrap().trim_end_matches(':').to_string();
                assert_eq!(fs::metadata(&path).unwrap().len(), 0, "{path}");
                fs::remove_file(&path).unwrap();
                removed.push(Path::new(&path).file_name().unwrap().to_string_lossy().into_owned());
            }
        }
    }
}

fn send_args(src: &Path, port: u16, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "send".into(),
        "--once".into(),
        "--pg-wal".into(),
        src.display().to_string(),
        "--to".into(),
        format!("127.0.0.1:{port}"),
        "--name".into(),
        "faults".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn start_send(src: &Path, port: u16, log: &Path, extra: &[&str]) -> ChildGuard {
    spawn_logged("send", &send_args(src, port, extra), log)
}

/// Runs a sender to completion (bounded); returns its exit status and its log.
fn run_send(src: &Path, port: u16, log: &Path, extra: &[&str], timeout: Duration) -> (ExitStatus, String) {
    let start = fs::metadata(log).map(|m| m.len()).unwrap_or(0) as usize;
    let mut g = start_send(src, port, log, extra);
    let st = g.wait_timeout(timeout).expect("wait").unwrap_or_else(|| panic!("sender still running after {timeout:?}:\n{}", tail_file(log, 40)));
    let all = fs::read_to_string(log).unwrap_or_default();
    (st, all.get(start..).unwrap_or("").to_string())
}

/// SIGTERM the receiver and wait for it: it drains and flushes.
fn stop_recv(r: &mut Recv) -> ExitStatus {
    let _ = r.guard.signal(libc::SIGTERM);
    r.guard
        .wait_timeout(Duration::from_secs(20))
        .expect("wait")
        .unwrap_or_else(|| panic!("receiver ignored SIGTERM:\n{}", tail_file(&r.log, 30)))
}

fn kill9(g: &mut ChildGuard) {
    let _ = g.signal(libc::SIGKILL);
    let _ = g.wait_timeout(Duration::from_secs(10));
}

fn seg_file(tli: u32, segno: u64) -> String {
    seg_name(tli, segno, SEG)
}

/// The receiver directory holds exactly `src`'s WAL from `first` to `end`: complete segments byte-identical,
/// the last one as `.partial` identical up to `end` and zeros after, and no other file.
fn assert_identical(src: &Path, dst: &Path, first: u64, end: u64) {
    let mut expected: Vec<String> = Vec::new();
    let first_seg = first / SEG;
    let last_seg = (end - 1) / SEG;
    for segno in first_seg..=last_seg {
        let name = seg_file(1, segno);
        let want = fs::read(src.join(&name)).unwrap_or_else(|e| panic!("read source {name}: {e}"));
        let seg_end = (segno + 1) * SEG;
        if end >= seg_end {
            let got = fs::read(dst.join(&name)).unwrap_or_else(|e| panic!("receiver lacks complete segment {name}: {e}"));
            assert!(got == want, "complete segment {name} differs from the source");
            expected.push(name);
        } else {
            let pname = format!("{name}.partial");
            let got = fs::read(dst.join(&pname)).unwrap_or_else(|e| panic!("receiver lacks {pname}: {e}"));
            assert_eq!(got.len() as u64, SEG, "{pname} size");
            let cut = (end - segno * SEG) as usize;
            if let Some(i) = (0..cut).find(|&i| got[i] != want[i]) {
                panic!("{pname} differs from the source at offset {i} (valid WAL ends at offset {cut})");
            }
            if let Some(i) = (cut..got.len()).find(|&i| got[i] != 0) {
                panic!("{pname} has a nonzero byte at offset {i}, past the end of WAL at offset {cut}");
            }
            expected.push(pname);
        }
    }
    let mut found: Vec<String> = fs::read_dir(dst)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != STATE_FILE && n != LOCK_FILE && !n.starts_with(SPARE_PREFIX))
        .collect();
    found.sort();
    expected.sort();
    assert_eq!(found, expected, "receiver directory holds exactly the shipped segments");
}

/// What the receiver holds is a correct prefix of `src`: complete segments identical, a `.partial` holding only
/// source bytes or zeros (nothing invented), no non-canonical names. Returns (complete segments, partial
/// count).
fn assert_prefix(src: &Path, dst: &Path) -> (usize, usize) {
    let (mut complete, mut partial) = (0, 0);
    let Ok(rd) = fs::read_dir(dst) else { return (0, 0) };
    for e in rd {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name == STATE_FILE || name == LOCK_FILE || name.starts_with(SPARE_PREFIX) {
            continue;
        }
        let stem = name.strip_suffix(".partial").unwrap_or(&name);
        assert!(is_seg_name(stem), "receiver directory holds a non-canonical name {name:?}");
        let want = fs::read(src.join(stem)).unwrap_or_else(|e| panic!("{name} has no source twin: {e}"));
        let got = fs::read(dst.join(&name)).unwrap();
        if name.ends_with(".partial") {
            partial += 1;
            assert_eq!(got.len(), want.len(), "{name} size");
            if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i] && got[i] != 0) {
                panic!("{name} holds a byte at offset {i} that is neither the source's nor zero");
            }
        } else {
            complete += 1;
            assert!(got == want, "complete segment {name} differs from the source");
        }
    }
    (complete, partial)
}

/// (name -> (size, hash)) of every entry under `dir`, recursively; directories as size u64::MAX.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, u64)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, u64)>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if e.file_name().to_string_lossy().starts_with(SPARE_PREFIX) {
                // Spares are zeroed and renamed in the background while the receiver is idle: not WAL.
                continue;
            }
            let meta = fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                out.insert(rel, (u64::MAX, 0));
                walk(base, &p, out);
            } else {
                let mut h = DefaultHasher::new();
                h.write(&fs::read(&p).unwrap_or_default());
                out.insert(rel, (meta.len(), h.finish()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// Copies segments `from..=to` (by segno) of `src` into a new directory `dst`.
fn copy_segments(src: &Path, dst: &Path, from: u64, to: u64) {
    fs::create_dir_all(dst).unwrap();
    for segno in from..=to {
        let n = seg_file(1, segno);
        fs::copy(src.join(&n), dst.join(&n)).unwrap();
    }
}

fn copy_dir(src: &Path, dst: &Path) {
    fs::create_dir_all(dst).unwrap();
    for e in fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

/// Durable end the receiver announced at its last start-up ("directory holds WAL durably up to X").
fn announced_durable(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("directory holds WAL durably up to"))?;
    let at = line.find("durably up to ")? + "durably up to ".len();
    parse_lsn(line[at..].split_whitespace().next()?)
}

fn count(log: &Path, pat: &str) -> usize {
    fs::read_to_string(log).map(|s| s.matches(pat).count()).unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------------------
// 1. kill -9, many times, at random points
// ---------------------------------------------------------------------------------------------------------

/// Kills the receiver and the sender (SIGKILL) at seeded random points during several 48 MiB ships of 1 MiB
/// segments, restarting each; every ship must end byte-identical to the source, and a surviving sender must
/// never see the receiver come back holding less than it had acknowledged.
#[test]
fn kill9_sender_and_receiver_many_times() {
    kill9_many_times(false, true, 60);
}

/// The same, with the operator work-around for the empty-.partial bug (the 0-byte file is removed when the
/// receiver refuses to start because of it), and acknowledgement regressions across a receiver restart
/// counted and printed rather than failed (see the next, ignored, test). Nothing lost: byte-identical.
#[test]
fn kill9_sender_and_receiver_many_times_with_empty_partial_workaround() {
    kill9_many_times(true, false, 24);
}

/// After a receiver kill -9 and restart, the receiver must still hold everything it acknowledged as flushed.
/// It does not: it acknowledges frame ends (mid-record), and its start-up recovery cuts a `.partial` back to
/// the end of the last complete record, zeroing acknowledged bytes (the sender warns "its storage lost
/// acknowledged WAL" and re-sends). Seeds 1 and 0x5EED2026 show it within 24 kills.
#[test]
fn kill9_receiver_restart_never_regresses_acknowledged_lsn() {
    kill9_many_times(true, true, 60);
}

fn kill9_many_times(workaround: bool, strict_acks: bool, kills_wanted: u32) {
    let seed = seed();
    let mut rng = Rng(seed);
    let td = TestDir::new("kill9");
    let src = td.join("pg_wal");
    let end = gen_wal(&src, "48MiB", 11, SYSID);
    let first = SEG; // gen-wal starts at segment 1
    let (mut kills_recv, mut kills_send, mut cycles) = (0u32, 0u32, 0u32);
    let mut resumes: Vec<String> = Vec::new();
    let mut empty_partials: Vec<String> = Vec::new();
    let mut ack_regressions = 0usize;
    let started = Instant::now();
    while kills_recv + kills_send < kills_wanted {
        cycles += 1;
        assert!(cycles <= 30, "could not place {kills_wanted} kills in 30 ships (ships too fast?)");
        let port = free_port();
        let dst = td.join(format!("recv{cycles}"));
        let rlog = td.join(format!("recv{cycles}.log"));
        let slog = td.join(format!("send{cycles}.log"));
        let sargs: Vec<&str> = THROTTLE.iter().copied().chain(["--retry-for", "60s"]).collect();
        let mut recv = start_recv(&dst, port, &rlog, &[]);
        let mut send = start_send(&src, port, &slog, &sargs);
        // Kill until the sender finishes by itself; each cycle places a few kills.
        loop {
            std::thread::sleep(Duration::from_millis(rng.range(3, 90)));
            if let Some(st) = send.try_wait().unwrap() {
                assert!(st.success(), "sender failed:\n{}\n--- receiver ---\n{}", tail_file(&slog, 30), tail_file(&rlog, 30));
                send.child = None;
                break;
            }
            if let Some(st) = recv.guard.try_wait().unwrap() {
                panic!("receiver died by itself ({st}):\n{}", tail_file(&rlog, 30));
            }
            if kills_recv + kills_send >= kills_wanted {
                continue;
            }
            if rng.next() % 2 == 0 {
                kill9(&mut recv.guard);
                kills_recv += 1;
                // Sometimes leave the receiver down a while, so the sender goes through its backoff.
                std::thread::sleep(Duration::from_millis(rng.range(0, 150)));
                let (r, removed) = restart_recv(&dst, port, &rlog, workaround);
                recv = r;
                empty_partials.extend(removed);
                if let Some(d) = announced_durable(&fs::read_to_string(&rlog).unwrap_or_default()) {
                    resumes.push(fmt_lsn(d));
                }
            } else {
                kill9(&mut send);
                kills_send += 1;
                send = start_send(&src, port, &slog, &sargs);
            }
        }
        assert_eq!(stop_recv(&mut recv).code(), Some(0), "receiver exit:\n{}", tail_file(&rlog, 20));
        assert_identical(&src, &dst, first, end);
        let regressions = count(&slog, "lost acknowledged WAL");
        ack_regressions += regressions;
        assert!(
            !strict_acks || regressions == 0,
            "{regressions} time(s) a sender saw the restarted receiver hold less than it had acknowledged:\n{}",
            fs::read_to_string(&slog).unwrap().lines().filter(|l| l.contains("lost acknowledged")).collect::<Vec<_>>().join("\n")
        );
        let _ = fs::remove_dir_all(&dst);
    }
    eprintln!(
        "kill9: seed {seed:#x}: {cycles} ships of {} bytes, {kills_recv} receiver kills + {kills_send} sender kills, \
         all byte-identical, in {:.1} s; receiver restarted at {resumes:?}; empty .partial removed (work-around) {}x: {empty_partials:?}; \
         acknowledged LSN regressed across a receiver restart {ack_regressions}x",
        end - first,
        started.elapsed().as_secs_f64(),
        empty_partials.len()
    );
}

// ---------------------------------------------------------------------------------------------------------
// 1b. A damaged `.partial` while the receiver is stopped
// ---------------------------------------------------------------------------------------------------------

/// Ships the first 6 segments, stops the receiver, then damages its `.partial` with `damage`, below the LSN
/// the receiver acknowledged. Recovery must not cut acknowledged bytes (issue #10): the receiver refuses to
/// start, names the file and the acknowledged LSN, and changes nothing. The operator then moves the damaged
/// file aside, as the message says; the receiver resumes from the segment's start (below the damage) and a
/// full ship ends byte-identical.
fn damaged_partial(name: &str, damage: impl Fn(&Path, u64)) {
    let td = TestDir::new(name);
    let src = td.join("pg_wal");
    let end = gen_wal(&src, "10MiB", 5, SYSID);
    let prefix = td.join("prefix");
    copy_segments(&src, &prefix, 1, 6);
    let dst = td.join("recv");
    let rlog = td.join("recv.log");
    let slog = td.join("send.log");
    let port = free_port();
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let (st, log) = run_send(&prefix, port, &slog, &[], Duration::from_secs(60));
    assert!(st.success(), "prefix ship failed:\n{log}");
    stop_recv(&mut recv);
    let partial = dst.join(format!("{}.partial", seg_file(1, 6)));
    let bytes = fs::read(&partial).expect("a .partial after the prefix ship");
    let held = bytes.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1);
    assert!(held > 8192, "the prefix should reach well into segment 6");
    damage(&partial, held);
    let damaged = fs::read(&partial).unwrap();
    let err = try_start_recv(&dst, port, &rlog, &[]).err().expect("the receiver must refuse to start on damaged acknowledged bytes");
    assert!(err.contains(&partial.display().to_string()) && err.contains("acknowledged"), "the refusal must name the file: {err}");
    assert_eq!(fs::read(&partial).unwrap(), damaged, "recovery changed the damaged file");
    fs::rename(&partial, td.join("damaged.partial")).unwrap();
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let durable = announced_durable(&fs::read_to_string(&rlog).unwrap()).expect("receiver announces its durable end");
    assert_eq!(durable, 6 * SEG, "with the damaged segment moved aside, the receiver resumes at its start");
    let (st, log) = run_send(&src, port, &slog, &[], Duration::from_secs(60));
    assert!(st.success(), "full ship after the damage failed:\n{log}");
    stop_recv(&mut recv);
    assert_identical(&src, &dst, SEG, end);
    eprintln!("{name}: held {held} bytes of segment 6; refused, then resumed from {} once it was moved aside; identical", fmt_lsn(durable));
}

/// `truncate -s` the `.partial` to a length in the middle of a 4 KiB block, below the end of WAL.
#[test]
fn truncated_acknowledged_partial_is_refused_then_resumes_once_moved_aside() {
    damaged_partial("trunc-partial", |p, held| {
        let cut = (held / 2) / 4096 * 4096 + 1234;
        let f = fs::OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(cut).unwrap();
        f.sync_all().unwrap();
    });
}

/// Zero the `.partial` from the middle of a block on (a torn tail: size kept, bytes lost).
#[test]
fn torn_acknowledged_partial_is_refused_then_resumes_once_moved_aside() {
    damaged_partial("torn-partial", |p, held| {
        let cut = (held / 2) / 4096 * 4096 + 1234;
        let mut bytes = fs::read(p).unwrap();
        bytes[cut as usize..].fill(0);
        fs::write(p, &bytes).unwrap();
    });
}

/// Garbage (not zeros) over the tail of the `.partial`, from the middle of a block on.
#[test]
fn garbage_acknowledged_partial_is_refused_then_resumes_once_moved_aside() {
    damaged_partial("garbage-partial", |p, held| {
        let cut = (held / 2) / 4096 * 4096 + 1234;
        let mut bytes = fs::read(p).unwrap();
        let noise = Rng(7).bytes(bytes.len() - cut as usize);
        bytes[cut as usize..].copy_from_slice(&noise);
        fs::write(p, &bytes).unwrap();
    });
}

// ---------------------------------------------------------------------------------------------------------
// 2. Disk full
// ---------------------------------------------------------------------------------------------------------

/// A loop-mounted ext4 image, unmounted (and its image removed) on drop in every path.
struct LoopMount {
    img: PathBuf,
    mnt: PathBuf,
    mounted: bool,
}

impl LoopMount {
    fn sh(args: &[&str]) -> Result<(), String> {
        run_ok(&mut cmd(args[0], &args[1..])).map(|_| ())
    }
    fn create(img: &Path, mnt: &Path, size: &str) -> Result<LoopMount, String> {
        fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
        Self::sh(&["truncate", "-s", size, &img.display().to_string()])?;
        Self::sh(&["mkfs.ext4", "-q", "-F", &img.display().to_string()])?;
        let mut m = LoopMount { img: img.to_path_buf(), mnt: mnt.to_path_buf(), mounted: false };
        m.mount()?;
        Ok(m)
    }
    fn mount(&mut self) -> Result<(), String> {
        Self::sh(&["mount", "-o", "loop", &self.img.display().to_string(), &self.mnt.display().to_string()])?;
        self.mounted = true;
        Ok(())
    }
    fn umount(&mut self) -> Result<(), String> {
        if self.mounted {
            Self::sh(&["umount", &self.mnt.display().to_string()])?;
            self.mounted = false;
        }
        Ok(())
    }
    /// Offline grow: umount, enlarge the image, fsck, resize2fs, mount.
    fn grow(&mut self, size: &str) -> Result<(), String> {
        self.umount()?;
        Self::sh(&["truncate", "-s", size, &self.img.display().to_string()])?;
        let _ = run(&mut cmd("e2fsck", ["-fy", &self.img.display().to_string()]));
        Self::sh(&["resize2fs", &self.img.display().to_string()])?;
        self.mount()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        if self.mounted && self.umount().is_err() {
            let _ = run(&mut cmd("umount", ["-l", &self.mnt.display().to_string()]));
        }
        let _ = fs::remove_file(&self.img);
    }
}

#[test]
fn disk_full_then_space_freed_resumes_without_gap() {
    let td = TestDir::new("diskfull");
    let src = td.join("pg_wal");
    let end = gen_wal(&src, "48MiB", 21, SYSID);
    let mnt_dir = td.join("mnt");
    let mut lm = match LoopMount::create(&td.join("fs.img"), &mnt_dir, "40M") {
        Ok(m) => m,
        Err(e) => {
            if std::env::var("WALSHIP_REQUIRE_LOOP").as_deref() == Ok("1") {
                panic!("WALSHIP_REQUIRE_LOOP=1 but a loop-mounted ext4 could not be set up: {e}");
            }
            eprintln!("SKIPPED disk_full_then_space_freed_resumes_without_gap: cannot loop-mount an ext4 image here ({e}); set WALSHIP_REQUIRE_LOOP=1 to make this a failure");
            return;
        }
    };
    let dst = mnt_dir.join("wal");
    let rlog = td.join("recv.log");
    let slog = td.join("send.log");
    let port = free_port();
    // Declared after the mount guard: dropped (killed) before it unmounts.
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let mut send = start_send(&src, port, &slog, &["--retry-for", "120s"]);
    let st = recv.guard.wait_timeout(Duration::from_secs(60)).unwrap().unwrap_or_else(|| {
        panic!("receiver still running with 48 MiB shipped into a 40 MiB filesystem:\n{}", tail_file(&rlog, 20))
    });
    let rtext = fs::read_to_string(&rlog).unwrap();
    assert!(!st.success(), "receiver must fail when the disk is full");
    assert!(
        rtext.contains("No space left on device") || rtext.contains("ENOSPC"),
        "the receiver's error must name ENOSPC:\n{}",
        tail_file(&rlog, 10)
    );
    let err_line = rtext.lines().rev().find(|l| l.contains("error")).unwrap_or("").to_string();
    // The sender must not have finished: the receiver cannot have acknowledged the end.
    std::thread::sleep(Duration::from_millis(300));
    if let Some(st) = send.try_wait().unwrap() {
        assert!(!st.success(), "sender exited 0 although the receiver ran out of space:\n{}", tail_file(&slog, 20));
        send.child = None;
    }
    let (complete, partial) = assert_prefix(&src, &dst);
    assert!(complete < 48, "a 40 MiB filesystem cannot hold the whole ship");
    // Restart on the still-full filesystem: it must recover what is durable, announce it, and fail again
    // (or keep waiting) — never acknowledge past what it holds.
    let before_grow = fs::read_to_string(&rlog).unwrap().len();
    drop(recv);
    lm.grow("200M").unwrap_or_else(|e| panic!("grow the filesystem: {e}"));
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let durable = announced_durable(&fs::read_to_string(&rlog).unwrap()[before_grow..]).unwrap_or(0);
    assert!(durable <= SEG * (complete as u64 + partial as u64 + 1), "durable end past what the disk holds");
    // The retrying sender (or a fresh one if it gave up) completes the ship.
    let sender_status = match send.wait_timeout(Duration::from_secs(90)).unwrap() {
        Some(st) => st,
        None => panic!("sender did not finish after space was freed:\n{}", tail_file(&slog, 30)),
    };
    let resumed_by = if sender_status.success() {
        "the retrying sender"
    } else {
        let (st, log) = run_send(&src, port, &slog, &[], Duration::from_secs(60));
        assert!(st.success(), "a fresh sender failed after space was freed:\n{log}");
        "a fresh sender"
    };
    assert_eq!(stop_recv(&mut recv).code(), Some(0));
    assert_identical(&src, &dst, SEG, end);
    assert_eq!(count(&slog, "lost acknowledged WAL"), 0, "acknowledgement regressed:\n{}", tail_file(&slog, 30));
    drop(recv);
    eprintln!(
        "disk full: receiver failed with {err_line:?}; held {complete} complete segments + {partial} partial (a correct prefix); \
         restarted at {}; {resumed_by} completed the ship, byte-identical",
        fmt_lsn(durable)
    );
    lm.umount().unwrap();
}

// ---------------------------------------------------------------------------------------------------------
// 3a. Bad pg_wal contents (the sender's side)
// ---------------------------------------------------------------------------------------------------------

struct ShipOutcome {
    status: ExitStatus,
    log: String,
    dst: PathBuf,
}

/// Ships `src` once (bounded retries) to a fresh receiver directory; the receiver is stopped afterwards and
/// must still have been alive.
fn ship_to_fresh(td: &TestDir, tag: &str, src: &Path) -> ShipOutcome {
    let dst = td.join(format!("recv-{tag}"));
    let rlog = td.join(format!("recv-{tag}.log"));
    let slog = td.join(format!("send-{tag}.log"));
    let port = free_port();
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let (status, log) = run_send(src, port, &slog, &["--retry-for", "2s"], Duration::from_secs(60));
    assert!(recv.guard.try_wait().unwrap().is_none(), "{tag}: receiver died:\n{}", tail_file(&rlog, 20));
    assert_eq!(stop_recv(&mut recv).code(), Some(0), "{tag}: receiver exit");
    ShipOutcome { status, log, dst }
}

fn error_line(log: &str) -> String {
    log.lines().rev().find(|l| l.contains("walship: error")).unwrap_or("(no error line)").to_string()
}

#[test]
fn bad_pg_wal_contents_are_refused_without_damage() {
    let td = TestDir::new("badwal");
    let base = td.join("base");
    let end = gen_wal(&base, "12MiB", 3, SYSID);
    let last = (end - 1) / SEG;
    let other = td.join("other");
    gen_wal(&other, "12MiB", 4, SYSID + 1);
    let mut report: Vec<String> = Vec::new();

    // Each case: a damaged copy of the base; the ship must fail with an error mentioning `expect`, and the
    // receiver must hold a correct prefix (never anything invented).
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &[&str])> = vec![
        (
            "truncated-segment",
            Box::new(|d: &Path| {
                let f = fs::OpenOptions::new().write(true).open(d.join(seg_file(1, 5))).unwrap();
                f.set_len(300_000).unwrap();
            }),
            &["300000 bytes", "expected 1048576"],
        ),
        (
            "garbage-segment",
            Box::new(|d: &Path| fs::write(d.join(seg_file(1, 5)), Rng(99).bytes(SEG as usize)).unwrap()),
            &["corrupt WAL", "000000010000000000000005"],
        ),
        (
            "garbage-first-segment",
            Box::new(|d: &Path| fs::write(d.join(seg_file(1, 1)), Rng(98).bytes(SEG as usize)).unwrap()),
            &["000000010000000000000001", "not a usable WAL segment"],
        ),
        (
            "wrong-magic",
            Box::new(|d: &Path| {
                let p = d.join(seg_file(1, 5));
                let mut b = fs::read(&p).unwrap();
                for page in (0..b.len()).step_by(8192) {
                    b[page..page + 2].copy_from_slice(&0xD0FFu16.to_le_bytes());
                }
                fs::write(&p, b).unwrap();
            }),
            &["xlp_magic", "0xD0FF"],
        ),
        (
            "other-system-segment-in-the-middle",
            Box::new({
                let other = other.clone();
                move |d: &Path| {
                    fs::copy(other.join(seg_file(1, 5)), d.join(seg_file(1, 5))).unwrap();
                }
            }),
            &["xlp_sysid", "7000000000000000002"],
        ),
    ];
    for (tag, damage, expect) in cases {
        let src = td.join(format!("src-{tag}"));
        copy_dir(&base, &src);
        damage(&src);
        let out = ship_to_fresh(&td, tag, &src);
        assert!(!out.status.success(), "{tag}: sender must fail:\n{}", out.log);
        let line = error_line(&out.log);
        for e in expect {
            assert!(line.contains(e), "{tag}: error should mention {e:?}: {line}");
        }
        let (complete, partial) = assert_prefix(&base, &out.dst);
        assert!(complete <= 4, "{tag}: nothing from segment 5 on may be complete at the receiver");
        report.push(format!("{tag}: refused ({line}); receiver holds {complete} complete + {partial} partial, a correct prefix"));
    }

    // Segments of another system after the end of ours: either ignored (ship ends at our end) or refused with
    // an error; never shipped.
    {
        let tag = "other-system-segments-after-the-end";
        let src = td.join(format!("src-{tag}"));
        copy_dir(&base, &src);
        for segno in last + 1..=last + 2 {
            if other.join(seg_file(1, segno)).exists() {
                fs::copy(other.join(seg_file(1, segno)), src.join(seg_file(1, segno))).unwrap();
            }
        }
        let out = ship_to_fresh(&td, tag, &src);
        if out.status.success() {
            assert_identical(&base, &out.dst, SEG, end);
            report.push(format!("{tag}: ignored; shipped our WAL, identical"));
        } else {
            let (complete, partial) = assert_prefix(&base, &out.dst);
            report.push(format!("{tag}: refused ({}); receiver holds {complete}+{partial}, a correct prefix", error_line(&out.log)));
        }
    }

    // Non-canonical names next to the real segments are ignored: the ship succeeds, identical, and the
    // receiver never creates such names.
    {
        let tag = "non-canonical-names";
        let src = td.join(format!("src-{tag}"));
        copy_dir(&base, &src);
        let seg3 = src.join(seg_file(1, 3));
        for junk in [
            seg_file(1, 0x0A).to_lowercase(),
            format!("{}.bak", seg_file(1, 3)),
            format!("{}.partial", seg_file(1, last + 1)),
            "00000001000000000000001G".to_string(),
            "000000010000000000001000".to_string(), // low part >= 0x1000: impossible with 1 MiB segments
            "0000000100000000000000".to_string(),
            "XLOGTEMP.123".to_string(),
            "00000001.history".to_string(),
            format!(" {}", seg_file(1, last + 1)),
        ] {
            fs::copy(&seg3, src.join(&junk)).unwrap();
        }
        fs::create_dir_all(src.join("archive_status")).unwrap();
        let out = ship_to_fresh(&td, tag, &src);
        assert!(out.status.success(), "{tag}: ship must ignore non-canonical names:\n{}", out.log);
        assert_identical(&base, &out.dst, SEG, end);
        report.push(format!("{tag}: ignored (9 junk names + archive_status/); identical"));
    }
    eprintln!("bad pg_wal inputs:\n  {}", report.join("\n  "));
}

/// A non-canonical 24-hex-digit name with a higher timeline (impossible low part for 1 MiB segments) must be
/// ignored like other non-canonical names, not chosen as "the newest timeline".
#[test]
fn non_canonical_higher_timeline_name_is_ignored() {
    let td = TestDir::new("noncanon-tli");
    let src = td.join("pg_wal");
    let end = gen_wal(&src, "4MiB", 3, SYSID);
    fs::copy(src.join(seg_file(1, 1)), src.join("00000002000000000000FFFF")).unwrap();
    let out = ship_to_fresh(&td, "noncanon-tli", &src);
    assert!(out.status.success(), "sender must ignore the non-canonical name: {}", error_line(&out.log));
    fs::remove_file(src.join("00000002000000000000FFFF")).unwrap();
    assert_identical(&src, &out.dst, SEG, end);
}

// ---------------------------------------------------------------------------------------------------------
// 3b. Bad peers: protocol v1 spoken by hand over raw TCP
// ---------------------------------------------------------------------------------------------------------

fn hello_for(system_id: u64, first: u64, horizon: u64) -> Hello {
    Hello {
        protocol_version: PROTOCOL_VERSION,
        page_magic: 0xD110,
        timeline: 1,
        system_id,
        seg_size: SEG as u32,
        block_size: 8192,
        first_lsn: first,
        horizon_lsn: horizon,
        sender_name: "raw-test-client".into(),
        history: String::new(),
    }
}

fn encode(m: &Message) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut v);
    v
}

/// A frame header with arbitrary fields and a correct header CRC.
fn raw_header(kind: u8, body_len: u32, body_crc: u32, lsn: u64) -> [u8; FRAME_HEADER_LEN] {
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[0..4].copy_from_slice(b"WSHP");
    h[4] = kind;
    h[8..12].copy_from_slice(&body_len.to_le_bytes());
    h[12..16].copy_from_slice(&body_crc.to_le_bytes());
    h[16..24].copy_from_slice(&lsn.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Connects, writes `steps` (pausing between them so the receiver sees each), then reads until the receiver
/// closes (or 10 s pass). Returns what the receiver sent.
fn raw_peer(port: u16, steps: &[Vec<u8>]) -> (Vec<Message>, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut dec = Decoder::new(Limits::default());
    let mut msgs = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut closed = false;
    let mut drain = |s: &mut TcpStream, msgs: &mut Vec<Message>, until: Instant| -> bool {
        while Instant::now() < until {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(n) => {
                    dec.feed(&buf[..n]);
                    while let Ok(Some(m)) = dec.next_message() {
                        msgs.push(m);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => return true,
            }
        }
        false
    };
    for step in steps {
        if s.write_all(step).is_err() {
            closed = true;
            break;
        }
        if drain(&mut s, &mut msgs, Instant::now() + Duration::from_millis(150)) {
            closed = true;
            break;
        }
    }
    if !closed {
        let _ = s.shutdown(std::net::Shutdown::Write);
        closed = drain(&mut s, &mut msgs, Instant::now() + Duration::from_secs(10));
    }
    (msgs, closed)
}

fn error_of(msgs: &[Message]) -> Option<(ErrorCode, String)> {
    msgs.iter().find_map(|m| match m {
        Message::Error(e) => Some((e.code, e.message.clone())),
        _ => None,
    })
}

#[test]
fn bad_peers_are_refused_and_leave_no_damage() {
    let td = TestDir::new("badpeer");
    let src = td.join("pg_wal");
    let end = gen_wal(&src, "8MiB", 8, SYSID);
    let prefix = td.join("prefix");
    copy_segments(&src, &prefix, 1, 4);
    let dst = td.join("recv");
    let rlog = td.join("recv.log");
    let slog = td.join("send.log");
    let port = free_port();
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let (st, log) = run_send(&prefix, port, &slog, &[], Duration::from_secs(60));
    assert!(st.success(), "prefix ship:\n{log}");
    let durable = {
        let line = log.lines().rev().find(|l| l.starts_with("shipped")).expect("shipped line");
        parse_lsn(line.split("..").nth(1).unwrap().split_whitespace().next().unwrap()).unwrap()
    };
    let parent_before = snapshot(td.path());
    let dir_before = snapshot(&dst);

    let hello = encode(&Message::Hello(hello_for(SYSID, SEG, end)));
    let mut corrupt_hello_body = hello.clone();
    *corrupt_hello_body.last_mut().unwrap() ^= 0x55;
    let mut bad_header_crc = hello.clone();
    bad_header_crc[28] ^= 1;
    let mut bad_magic = hello.clone();
    bad_magic[0..4].copy_from_slice(b"PGWL");
    let v2 = {
        let mut h = hello_for(SYSID, SEG, end);
        h.protocol_version = 2;
        encode(&Message::Hello(h))
    };
    let other_system = encode(&Message::Hello(hello_for(SYSID + 1, SEG, end)));
    let traversal_name = {
        let mut h = hello_for(SYSID, SEG, end);
        h.sender_name = "../../../../tmp/walship-escape".into();
        encode(&Message::Hello(h))
    };
    let other_seg_size = {
        let mut h = hello_for(SYSID, 0, 16 << 20);
        h.seg_size = 16 << 20;
        encode(&Message::Hello(h))
    };
    let mut noise = Rng(3).bytes(4096);
    noise[0..4].copy_from_slice(b"GET ");
    let payload = vec![0xA5u8; 8192];
    let data_at = |lsn: u64, p: &[u8]| encode(&Message::Data { lsn, payload: p.to_vec() });
    let mut data_bad_crc = data_at(durable, &payload);
    let l = data_bad_crc.len();
    data_bad_crc[l - 100] ^= 0xFF;
    let aligned = durable - durable % 8192;
    let _ = aligned;

    // (tag, bytes in steps, what the Error frame must say (lower-case substring), expected code)
    type Case<'a> = (&'a str, Vec<Vec<u8>>, &'a str, Option<ErrorCode>);
    let cases: Vec<Case> = vec![
        ("garbage instead of Hello", vec![noise.clone()], "magic", Some(ErrorCode::Protocol)),
        ("wrong frame magic", vec![bad_magic], "magic", Some(ErrorCode::Protocol)),
        ("bad header CRC", vec![bad_header_crc], "crc", Some(ErrorCode::Protocol)),
        ("bad Hello body CRC", vec![corrupt_hello_body], "crc", Some(ErrorCode::Protocol)),
        ("protocol version 2", vec![v2], "version", Some(ErrorCode::Protocol)),
        ("absurd Hello length", vec![raw_header(1, 0xFFFF_FFF0, 0, 0).to_vec()], "body_len", Some(ErrorCode::Protocol)),
        ("unknown frame kind", vec![raw_header(9, 0, crc32c::crc32c(&[]), 0).to_vec()], "kind", Some(ErrorCode::Protocol)),
        ("Data before Hello", vec![data_at(durable, &payload)], "hello", Some(ErrorCode::Protocol)),
        ("truncated Hello", vec![hello[..40].to_vec()], "", None),
        ("another system id", vec![other_system], "system", Some(ErrorCode::Identity)),
        ("another segment size", vec![other_seg_size], "segment", Some(ErrorCode::Identity)),
        ("path-like sender name, then close", vec![traversal_name], "", None),
        ("Hello, then Data with a bad CRC", vec![hello.clone(), data_bad_crc], "crc", Some(ErrorCode::Corrupt)),
        (
            "Hello, then Data with an absurd length",
            vec![hello.clone(), raw_header(3, 0x7FFF_0000, 0, durable).to_vec()],
            "body_len",
            Some(ErrorCode::Protocol),
        ),
        ("Hello, then Data past a gap", vec![hello.clone(), data_at(durable + SEG, &payload)], "", Some(ErrorCode::Gap)),
        ("Hello, then Data at u64::MAX", vec![hello.clone(), raw_header(3, 16, crc32c::crc32c(&[0; 16]), u64::MAX - 8).to_vec()], "", None),
        ("Hello, then a second Hello", vec![hello.clone(), hello.clone()], "hello", Some(ErrorCode::Protocol)),
        ("Hello, then half a Data frame, then close", vec![hello.clone(), data_at(durable, &payload)[..3000].to_vec()], "", None),
    ];
    let mut report = Vec::new();
    for (tag, steps, says, code) in &cases {
        let (msgs, closed) = raw_peer(port, steps);
        assert!(recv.guard.try_wait().unwrap().is_none(), "{tag}: receiver died:\n{}", tail_file(&rlog, 20));
        let err = error_of(&msgs);
        if let Some(code) = code {
            let (c, m) = err.clone().unwrap_or_else(|| panic!("{tag}: expected an Error frame, got {msgs:?}"));
            assert_eq!(c, *code, "{tag}: error code ({m})");
            assert!(m.to_lowercase().contains(says), "{tag}: error should mention {says:?}: {m}");
            assert!(closed, "{tag}: receiver must close the connection after the error");
        }
        // Nothing of a bad peer is ever acknowledged past what was durable before it.
        for m in &msgs {
            if let Message::Ack(a) = m {
                assert!(a.flushed_lsn <= durable, "{tag}: acknowledged {} past the durable {}", fmt_lsn(a.flushed_lsn), fmt_lsn(durable));
            }
        }
        // Wait for the receiver to finish with this peer, then the directory must be as before.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(snapshot(&dst), dir_before, "{tag}: receiver directory changed");
        report.push(format!("{tag}: {}", err.map_or("closed without an Error frame".into(), |(c, m)| format!("{c:?}: {m}"))));
    }
    // The receiver never wrote outside its directory.
    let mut parent_after = snapshot(td.path());
    parent_after.retain(|k, _| !k.starts_with("recv") && !k.ends_with(".log"));
    let mut pb = parent_before.clone();
    pb.retain(|k, _| !k.starts_with("recv") && !k.ends_with(".log"));
    assert_eq!(parent_after, pb, "something was written outside the receiver directory");
    assert!(!Path::new("/tmp/walship-escape").exists());

    // A good sender still gets through and completes the ship.
    let (st, log) = run_send(&src, port, &slog, &[], Duration::from_secs(60));
    assert!(st.success(), "good sender after bad peers:\n{log}");
    assert_eq!(stop_recv(&mut recv).code(), Some(0));
    assert_identical(&src, &dst, SEG, end);
    eprintln!("bad peers ({} cases), receiver alive, directory unchanged, good sender then completed:\n  {}", cases.len(), report.join("\n  "));
}

/// Data with correct frame CRCs but WAL pages that do not belong (garbage, wrong pageaddr) must not be written
/// or acknowledged: DESIGN safety rule 4, "check every page on both sides".
#[test]
fn receiver_checks_pages_of_data_frames() {
    let td = TestDir::new("pagecheck");
    let src = td.join("pg_wal");
    gen_wal(&src, "3MiB", 8, SYSID);
    let prefix = td.join("prefix");
    copy_segments(&src, &prefix, 1, 1);
    let dst = td.join("recv");
    let rlog = td.join("recv.log");
    let port = free_port();
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let (st, log) = run_send(&prefix, port, &td.join("send.log"), &[], Duration::from_secs(60));
    assert!(st.success(), "{log}");
    let before = snapshot(&dst);
    // The receiver holds segment 1 up to its last complete record; continue with a fresh segment 2 whose
    // first page is garbage (correct frame CRC).
    let durable = announced_durable(&fs::read_to_string(&rlog).unwrap()).unwrap_or(0);
    let durable = if durable == 0 {
        let line = log.lines().rev().find(|l| l.starts_with("shipped")).unwrap();
        parse_lsn(line.split("..").nth(1).unwrap().split_whitespace().next().unwrap()).unwrap()
    } else {
        durable
    };
    // The true tail of segment 1 (valid WAL), then segment 2 whose first page is garbage: both
    // with correct frame CRCs. Page checks happen per page header, so the garbage must start a page.
    let seg1 = fs::read(src.join(seg_name(1, 1, SEG))).unwrap();
    let tail = seg1[(durable - SEG) as usize..].to_vec();
    let garbage = Rng(5).bytes(64 << 10);
    let hello = encode(&Message::Hello(hello_for(SYSID, SEG, 3 * SEG)));
    let good = encode(&Message::Data { lsn: durable, payload: tail });
    let bad = encode(&Message::Data { lsn: 2 * SEG, payload: garbage });
    let (msgs, _) = raw_peer(port, &[hello, good, bad]);
    let acked_past = msgs.iter().any(|m| matches!(m, Message::Ack(a) if a.flushed_lsn > 2 * SEG));
    let refused = msgs.iter().any(|m| matches!(m, Message::Error(e) if e.message.contains("not valid WAL")));
    std::thread::sleep(Duration::from_millis(300));
    stop_recv(&mut recv);
    assert!(!acked_past, "garbage WAL was acknowledged as durable: {msgs:?}");
    assert!(refused, "no error frame naming the bad page: {msgs:?}");
    let after = snapshot(&dst);
    let seg2 = seg_name(1, 2, SEG);
    assert!(!after.contains_key(&seg2) && !after.contains_key(&format!("{seg2}.partial")) || {
        let got = fs::read(dst.join(format!("{seg2}.partial"))).unwrap_or_default();
        got.iter().all(|&b| b == 0)
    }, "garbage WAL was written: {after:?}");
    let _ = before;
}

/// A peer that connects and sends nothing must not block a good sender forever: the receiver drops it after
/// `--peer-timeout` and the good sender (retrying while the receiver is busy) gets through.
#[test]
fn silent_peer_does_not_block_a_good_sender() {
    let td = TestDir::new("silent");
    let src = td.join("pg_wal");
    let end = gen_wal(&src, "4MiB", 9, SYSID);
    let dst = td.join("recv");
    let rlog = td.join("recv.log");
    let slog = td.join("send.log");
    let port = free_port();
    let mut recv = start_recv(&dst, port, &rlog, &["--peer-timeout", "2s"]);
    let silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    let (st, log) = run_send(&src, port, &slog, &["--retry-for", "30s"], Duration::from_secs(40));
    let took = t0.elapsed();
    assert!(st.success(), "good sender behind a silent peer:\n{log}\n--- receiver ---\n{}", tail_file(&rlog, 20));
    assert!(fs::read_to_string(&rlog).unwrap().contains("silent"), "receiver should log that it dropped the silent peer");
    assert_eq!(stop_recv(&mut recv).code(), Some(0));
    assert_identical(&src, &dst, SEG, end);
    drop(silent);
    eprintln!("silent peer: dropped after --peer-timeout 2s; good sender completed after {:.1} s", took.as_secs_f64());
}

#[allow(dead_code)]
fn unused(_: FrameHeader, _: FrameKind) {}

/// A peer that closes in the middle of a Data frame body is a disconnect: nothing of that frame may be
/// written or counted as received. The receiver takes any positive MSG_WAITALL result as the whole piece, so
/// after a short receive it verifies (and, if the CRC matches, writes and acknowledges) stale bytes left in
/// the buffer slot by an earlier frame. Here peer A leaves the frame's bytes in the slot (bad body CRC, so
/// nothing is written), peer B sends the same header and only half the body, then closes.
#[test]
fn half_frame_then_close_writes_nothing() {
    let td = TestDir::new("halfframe");
    let src = td.join("pg_wal");
    gen_wal(&src, "4MiB", 8, SYSID);
    let prefix = td.join("prefix");
    copy_segments(&src, &prefix, 1, 2);
    let dst = td.join("recv");
    let rlog = td.join("recv.log");
    let port = free_port();
    let mut recv = start_recv(&dst, port, &rlog, &[]);
    let (st, log) = run_send(&prefix, port, &td.join("send.log"), &[], Duration::from_secs(60));
    assert!(st.success(), "{log}");
    let line = log.lines().rev().find(|l| l.starts_with("shipped")).unwrap();
    let durable = parse_lsn(line.split("..").nth(1).unwrap().split_whitespace().next().unwrap()).unwrap();
    let before = snapshot(&dst);
    // The true next bytes of WAL, so the written result would even look right.
    let seg = fs::read(src.join(seg_file(1, durable / SEG))).unwrap();
    let off = (durable % SEG) as usize;
    let body = seg[off..(off + 32 * 1024).min(seg.len())].to_vec();
    let hello = encode(&Message::Hello(hello_for(SYSID, SEG, 4 * SEG)));
    let good = encode(&Message::Data { lsn: durable, payload: body.clone() });
    // Peer A: the whole frame, but with a wrong body CRC in its header: refused, nothing written.
    let mut bad = good.clone();
    let crc = crc32c::crc32c(&body) ^ 1;
    bad[..FRAME_HEADER_LEN].copy_from_slice(&raw_header(3, body.len() as u32, crc, durable));
    let (ma, _) = raw_peer(port, &[hello.clone(), bad]);
    assert!(matches!(error_of(&ma), Some((ErrorCode::Corrupt, _))), "peer A: {ma:?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(snapshot(&dst), before);
    // Peer B: correct header, half the body, close.
    let half = good[..FRAME_HEADER_LEN + body.len() / 2].to_vec();
    let (mb, _) = raw_peer(port, &[hello, half]);
    std::thread::sleep(Duration::from_millis(300));
    stop_recv(&mut recv);
    let rtext = fs::read_to_string(&rlog).unwrap();
    let acked = mb.iter().any(|m| matches!(m, Message::Ack(a) if a.flushed_lsn > durable));
    assert!(!acked, "receiver acknowledged a frame whose body it received only half of: {mb:?}");
    assert_eq!(snapshot(&dst), before, "receiver wrote a frame whose body it received only half of");
    assert!(!error_of(&mb).is_some_and(|(_, m)| m.contains("CRC")), "a disconnect reported as a CRC failure:\n{}", tail_file(&rlog, 10));
    let _ = rtext;
}
