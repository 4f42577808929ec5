//! Sender-side safety of `walship send --once` on a directory at rest (issue #10), with the real
//! binary on real files and sockets, no PostgreSQL needed:
//!
//! - a trailing `NAME.partial` (walship's own receiver directory, or a pg_wal copy whose last
//!   segment exists only as `.partial`) is shipped up to its valid end, never dropped with exit 0;
//!   when `NAME` and `NAME.partial` both exist the complete one wins;
//! - what the directory holds and is not shipped is said in one info line.
//!
//! Run: `cargo test --release --test send_safety`.

mod common;

use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

const MIB: u64 = 1 << 20;

struct Gen {
    dir: PathBuf,
    seg_size: u64,
    first_lsn: u64,
    end_lsn: u64,
}

impl Gen {
    fn last_name(&self, tli: u32) -> String {
        seg_name(tli, (self.end_lsn - 1) / self.seg_size, self.seg_size)
    }
}

fn gen_wal(dir: &Path, wal_bytes: &str, extra: &[&str]) -> Gen {
    let seg = MIB.to_string();
    let mut args = vec!["gen-wal", "--dir", p(dir), "--wal-bytes", wal_bytes, "--seg-size", &seg];
    args.extend_from_slice(extra);
    let out = run_ok(&mut walship(&args)).unwrap_or_else(|e| panic!("{e}"));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    let lsn = |k: &str| json_field(&json, k).and_then(|s| parse_lsn(&s)).unwrap_or_else(|| panic!("gen-wal output lacks {k}: {json}"));
    let g = Gen { dir: dir.to_path_buf(), seg_size: MIB, first_lsn: lsn("first_lsn"), end_lsn: lsn("end_lsn") };
    assert_ne!(g.end_lsn % MIB, 0, "the test needs WAL that ends inside a segment");
    g
}

/// A receiver on a free port, ready (it logged "listening").
fn start_recv(dir: &Path, log: &Path) -> (ChildGuard, u16) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut c = walship(&["recv", "--listen", &listen, "--dir", p(dir)]);
    let f = fs::File::create(log).unwrap();
    c.stdout(f.try_clone().unwrap()).stderr(f);
    let mut g = ChildGuard::spawn("recv", &mut c).expect("spawn recv");
    let ready = poll_until(Duration::from_secs(20), Duration::from_millis(10), || {
        fs::read_to_string(log).unwrap_or_default().contains("listening").then_some(())
    });
    assert!(ready.is_some() && g.try_wait().unwrap().is_none(), "receiver did not start:\n{}", tail_file(log, 30));
    (g, port)
}

fn stop_recv(mut g: ChildGuard, log: &Path) {
    g.signal(libc::SIGTERM).unwrap();
    let st = g.wait_timeout(Duration::from_secs(20)).unwrap().expect("receiver exits after SIGTERM");
    assert!(st.success(), "receiver exit {st}:\n{}", tail_file(log, 30));
}

struct Shipped {
    status: ExitStatus,
    output: String,
    report: String,
}

impl Shipped {
    fn lsn(&self, k: &str) -> u64 {
        json_field(&self.report, k).and_then(|s| parse_lsn(&s)).unwrap_or_else(|| panic!("report lacks {k}: {}\n{}", self.report, self.output))
    }
}

/// `walship send --once SRC` into a fresh receiver directory `dst`.
fn ship(tmp: &TestDir, tag: &str, src: &Path, dst: &Path) -> Shipped {
    fs::create_dir_all(dst).unwrap();
    let recv_log = tmp.join(format!("recv-{tag}.log"));
    let (recv, port) = start_recv(dst, &recv_log);
    let report = tmp.join(format!("report-{tag}.json"));
    let to = format!("127.0.0.1:{port}");
    let mut c = walship(&["send", "--pg-wal", p(src), "--to", &to, "--once", "--retry-for", "10s", "--report-json", p(&report)]);
    let out = run(&mut c).unwrap();
    stop_recv(recv, &recv_log);
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Shipped { status: out.status, output, report: fs::read_to_string(&report).unwrap_or_default() }
}

/// `dst` holds `src`'s WAL byte-identical from the first segment up to `end` (the segment holding
/// `end` as `NAME.partial`, identical below `end`, zeros after).
fn assert_identical_up_to(src: &Gen, src_file: impl Fn(&str) -> PathBuf, dst: &Path, end: u64) {
    let seg = src.seg_size;
    for segno in src.first_lsn / seg..=(end - 1) / seg {
        let name = seg_name(1, segno, seg);
        let orig = fs::read(src_file(&name)).unwrap_or_else(|e| panic!("source {name}: {e}"));
        let last = segno == end / seg && end % seg != 0;
        let got_path = if last { dst.join(format!("{name}.partial")) } else { dst.join(&name) };
        let got = fs::read(&got_path).unwrap_or_else(|e| panic!("receiver lacks {}: {e}", got_path.display()));
        let valid = if last { (end % seg) as usize } else { seg as usize };
        assert!(got[..valid] == orig[..valid], "{}: differs from the source below {}", got_path.display(), fmt_lsn(end));
        assert!(got[valid..].iter().all(|&b| b == 0), "{}: non-zero bytes past {}", got_path.display(), fmt_lsn(end));
    }
}

/// A pg_wal copy whose last segment exists only as `NAME.partial`, next to a receiver's
/// `.walship-flushed`: everything up to the valid end is shipped (it used to stop at the last
/// complete segment and exit 0).
#[test]
fn once_ships_the_valid_prefix_of_a_trailing_partial() {
    let tmp = TestDir::new("safety-partial");
    let g = gen_wal(&tmp.join("src"), "5500KiB", &["--seed", "31"]);
    let last = g.last_name(1);
    fs::rename(g.dir.join(&last), g.dir.join(format!("{last}.partial"))).unwrap();
    fs::write(g.dir.join(".walship-flushed"), format!("{}\n", fmt_lsn(g.end_lsn))).unwrap();
    let dst = tmp.join("dst");
    let r = ship(&tmp, "partial", &g.dir, &dst);
    assert!(r.status.success(), "send --once failed ({}):\n{}", r.status, r.output);
    assert_eq!(r.lsn("end_lsn"), g.end_lsn, "shipped up to {}, valid WAL ends at {}:\n{}", fmt_lsn(r.lsn("end_lsn")), fmt_lsn(g.end_lsn), r.output);
    let src_file = |n: &str| if n == last { g.dir.join(format!("{n}.partial")) } else { g.dir.join(n) };
    assert_identical_up_to(&g, src_file, &dst, g.end_lsn);
}

/// walship's own receiver directory (complete segments, a `.partial`, `.walship-flushed`) shipped
/// on to a second receiver: the second ends byte-identical up to the valid end.
#[test]
fn once_ships_a_receiver_directory_to_its_end() {
    let tmp = TestDir::new("safety-chain");
    let g = gen_wal(&tmp.join("src"), "4700KiB", &["--seed", "32"]);
    let first = tmp.join("recv1");
    let r1 = ship(&tmp, "first", &g.dir, &first);
    assert!(r1.status.success(), "first ship failed:\n{}", r1.output);
    assert!(first.join(format!("{}.partial", g.last_name(1))).exists(), "the first receiver should end with a .partial");
    assert!(first.join(".walship-flushed").exists());
    let second = tmp.join("recv2");
    let r2 = ship(&tmp, "second", &first, &second);
    assert!(r2.status.success(), "shipping the receiver directory failed ({}):\n{}", r2.status, r2.output);
    assert_eq!(r2.lsn("end_lsn"), g.end_lsn, "shipped the receiver directory up to {}, valid WAL ends at {}:\n{}", fmt_lsn(r2.lsn("end_lsn")), fmt_lsn(g.end_lsn), r2.output);
    assert_identical_up_to(&g, |n| g.dir.join(n), &second, g.end_lsn);
}

/// `NAME` and `NAME.partial` both present: the complete segment wins (the `.partial` here is
/// garbage past its first page, so shipping it would end the WAL early).
#[test]
fn a_complete_segment_wins_over_its_partial() {
    let tmp = TestDir::new("safety-both");
    let g = gen_wal(&tmp.join("src"), "3500KiB", &["--seed", "33"]);
    let mid = seg_name(1, g.first_lsn / MIB + 1, MIB);
    let mut bytes = fs::read(g.dir.join(&mid)).unwrap();
    bytes[8192..].fill(0);
    fs::write(g.dir.join(format!("{mid}.partial")), bytes).unwrap();
    let dst = tmp.join("dst");
    let r = ship(&tmp, "both", &g.dir, &dst);
    assert!(r.status.success(), "send --once failed:\n{}", r.output);
    assert_eq!(r.lsn("end_lsn"), g.end_lsn, "{}", r.output);
    assert_identical_up_to(&g, |n| g.dir.join(n), &dst, g.end_lsn);
}

/// One info line names what the directory holds and `--once` does not ship.
#[test]
fn once_says_in_one_line_what_it_skipped() {
    let tmp = TestDir::new("safety-skipped");
    let g = gen_wal(&tmp.join("src"), "2500KiB", &["--seed", "34", "--timeline", "2"]);
    for stray in ["a", "b"] {
        fs::write(g.dir.join(stray), b"x").unwrap();
    }
    fs::write(g.dir.join(format!("{}.00000028.backup", seg_name(2, g.first_lsn / MIB, MIB))), b"START WAL LOCATION").unwrap();
    fs::create_dir(g.dir.join("archive_status")).unwrap();
    fs::write(g.dir.join(seg_name(1, g.first_lsn / MIB, MIB)), vec![0u8; MIB as usize]).unwrap();
    let dst = tmp.join("dst");
    let r = ship(&tmp, "skipped", &g.dir, &dst);
    assert!(r.status.success(), "send --once failed:\n{}", r.output);
    let lines: Vec<&str> = r.output.lines().filter(|l| l.contains("skipped in")).collect();
    assert_eq!(lines.len(), 1, "want exactly one `skipped in` line:\n{}", r.output);
    let l = lines[0];
    assert!(l.contains("INFO"), "not an info line: {l}");
    for want in ["2 stray files (a, b)", "1 .backup", "1 segment of timeline 1", "archive_status/"] {
        assert!(l.contains(want), "the skipped line lacks {want:?}: {l}");
    }
    assert_eq!(r.lsn("end_lsn"), g.end_lsn, "{}", r.output);
}

/// A trailing `.partial` shorter than a segment (a truncated copy) is not silently dropped: the
/// ship fails naming the file, rather than exiting 0 short of the end of valid WAL.
#[test]
fn a_short_trailing_partial_fails_loudly() {
    let tmp = TestDir::new("safety-short");
    let g = gen_wal(&tmp.join("src"), "3500KiB", &["--seed", "35"]);
    let last = g.last_name(1);
    let partial = g.dir.join(format!("{last}.partial"));
    fs::rename(g.dir.join(&last), &partial).unwrap();
    fs::OpenOptions::new().write(true).open(&partial).unwrap().set_len(MIB / 2).unwrap();
    let r = ship(&tmp, "short", &g.dir, &tmp.join("dst"));
    assert!(!r.status.success(), "a short .partial must not end in exit 0:\n{}", r.output);
    let err = r.output.lines().find(|l| l.starts_with("walship: error:")).unwrap_or_else(|| panic!("no error line:\n{}", r.output));
    assert!(err.contains(&format!("{last}.partial")) && err.contains("expected"), "the error should name the short file: {err}");
}
