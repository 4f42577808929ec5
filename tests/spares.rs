//! `walship recv --spare-segments`: new segments are pre-zeroed spare files renamed to
//! `NAME.partial`. A ship with spares is byte-identical to its source; spare files never carry a WAL
//! name; leftovers of a crash (a half-zeroed `.tmp`, a "ready" spare that is not all zeros or not a
//! segment long) are removed at restart and never become WAL.

mod common;

use common::*;
use std::fs::{self, File};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

const SEG: u64 = 16 << 20;


struct Gen {
    dir: PathBuf,
    first_lsn: u64,
    end_lsn: u64,
}

fn gen_wal(dir: &Path, bytes: &str) -> Gen {
    let out = run_ok(&mut walship(&["gen-wal", "--dir", p(dir), "--wal-bytes", bytes, "--seg-size", &SEG.to_string()]))
        .unwrap_or_else(|e| panic!("{e}"));
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    let lsn = |k: &str| parse_lsn(&json_field(&json, k).unwrap_or_else(|| panic!("gen-wal lacks {k}: {json}"))).unwrap();
    Gen { dir: dir.to_path_buf(), first_lsn: lsn("first_lsn"), end_lsn: lsn("end_lsn") }
}

struct Recv {
    guard: ChildGuard,
    log: PathBuf,
}

fn start_recv(dir: &Path, port: u16, log: &Path, extra: &[&str]) -> Recv {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["recv", "--listen", &listen, "--dir", p(dir)];
    args.extend_from_slice(extra);
    let f = File::create(log).unwrap();
    let mut cmd = walship(&args);
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    let mut guard = ChildGuard::spawn("recv", &mut cmd).unwrap();
    let ready = poll_until(Duration::from_secs(20), Duration::from_millis(5), || {
        if fs::read_to_string(log).unwrap_or_default().contains("listening") {
            return Some(true);
        }
        matches!(guard.try_wait(), Ok(Some(_))).then_some(false)
    });
    assert_eq!(ready, Some(true), "receiver did not start:\n{}", tail_file(log, 30));
    Recv { guard, log: log.to_path_buf() }
}

impl Recv {
    fn stop(mut self) -> String {
        self.guard.signal(libc::SIGTERM).unwrap();
        let st = self.guard.wait_timeout(Duration::from_secs(30)).unwrap().expect("receiver exits after SIGTERM");
        let log = fs::read_to_string(&self.log).unwrap();
        assert_eq!(st.code(), Some(0), "receiver exit: {st}\n{}", tail_str(&log, 30));
        log
    }
    fn kill9(mut self) {
        self.guard.signal(libc::SIGKILL).unwrap();
        let st: ExitStatus = self.guard.wait_timeout(Duration::from_secs(10)).unwrap().expect("receiver dies");
        assert_eq!(st.signal(), Some(libc::SIGKILL));
    }
}

fn send_once(src: &Path, port: u16, log: &Path, extra: &[&str]) -> ExitStatus {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["send", "--pg-wal", p(src), "--to", &to, "--once", "--retry-for", "30s"];
    args.extend_from_slice(extra);
    let f = File::create(log).unwrap();
    let mut cmd = walship(&args);
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    let mut g = ChildGuard::spawn("send", &mut cmd).unwrap();
    g.wait_timeout(Duration::from_secs(90)).unwrap().expect("sender finishes")
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

fn spare_names(dir: &Path) -> Vec<String> {
    names(dir).into_iter().filter(|n| n.starts_with(".walship-spare-")).collect()
}

/// Waits until `n` ready spares (and no `.tmp`) are in `dir`.
fn wait_spares(dir: &Path, n: usize) {
    let ok = poll_until(Duration::from_secs(30), Duration::from_millis(10), || {
        let s = spare_names(dir);
        (s.len() == n && s.iter().all(|x| !x.ends_with(".tmp"))).then_some(())
    });
    assert!(ok.is_some(), "{n} spares never became ready: {:?}", names(dir));
}

/// Every WAL-named file in `dst` matches the source: complete segments identical, the `.partial` identical
/// up to `end` and zero after; the only other names are the state file and spares (never WAL-shaped).
fn assert_identical(g: &Gen, dst: &Path) {
    let end = g.end_lsn;
    let mut want: Vec<String> = (g.first_lsn / SEG..end / SEG).map(|s| seg_name(1, s, SEG)).collect();
    if end % SEG != 0 {
        want.push(format!("{}.partial", seg_name(1, end / SEG, SEG)));
    }
    let mut wal: Vec<String> = Vec::new();
    for n in names(dst) {
        if n == ".walship-flushed" || n == ".walship.lock" || n.starts_with(".walship-spare-") {
            assert!(!is_seg_name(n.trim_end_matches(".partial")), "{n}");
            continue;
        }
        wal.push(n);
    }
    assert_eq!(wal, want, "receiver directory WAL names");
    for n in &want {
        let got = fs::read(dst.join(n)).unwrap();
        let src = fs::read(g.dir.join(n.trim_end_matches(".partial"))).unwrap();
        assert_eq!(got.len(), src.len(), "{n} size");
        if n.ends_with(".partial") {
            let valid = (end % SEG) as usize;
            assert!(got[..valid] == src[..valid], "{n} differs below the end");
            assert!(got[valid..].iter().all(|&b| b == 0), "{n} has non-zero bytes past the end");
        } else {
            assert!(got == src, "{n} differs from the source");
        }
    }
}

/// (created, used, missed) from the receiver's final log line.
fn spare_counts(log: &str) -> (u64, u64, u64) {
    let line = log.lines().rev().find(|l| l.contains("spare segments")).unwrap_or_else(|| panic!("no spare counters in:\n{log}"));
    let after = &line[line.find("spare segments").unwrap() + "spare segments".len()..];
    let nums: Vec<u64> = after.split_whitespace().filter_map(|w| w.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok()).take(3).collect();
    (nums[0], nums[1], nums[2])
}

#[test]
fn ship_into_spares_is_byte_identical() {
    let td = TestDir::new("spares-ship");
    let g = gen_wal(&td.join("src"), "72MiB");
    let dst = td.join("dst");
    fs::create_dir_all(&dst).unwrap();
    let port = free_port();
    let recv = start_recv(&dst, port, &td.join("recv.log"), &["--spare-segments", "3"]);
    wait_spares(&dst, 3);
    let st = send_once(&g.dir, port, &td.join("send.log"), &[]);
    assert!(st.success(), "sender: {st}\n{}", tail_file(&td.join("send.log"), 30));
    let log = recv.stop();
    let (created, used, missed) = spare_counts(&log);
    assert!(used >= 3, "the three ready spares were used (created {created} used {used} missed {missed})");
    assert_eq!(used + missed, g.end_lsn.div_ceil(SEG) - g.first_lsn / SEG, "every new segment counted once");
    assert_identical(&g, &dst);

    // Off: no spare is ever created, and any left are removed.
    let dst0 = td.join("dst0");
    fs::create_dir_all(&dst0).unwrap();
    fs::write(dst0.join(".walship-spare-0"), vec![0u8; SEG as usize]).unwrap();
    let recv = start_recv(&dst0, port, &td.join("recv0.log"), &["--spare-segments", "0"]);
    assert!(spare_names(&dst0).is_empty(), "spares removed when disabled: {:?}", names(&dst0));
    let st = send_once(&g.dir, port, &td.join("send0.log"), &[]);
    assert!(st.success());
    let log = recv.stop();
    assert_eq!(spare_counts(&log), (0, 0, 0));
    assert!(spare_names(&dst0).is_empty());
    assert_identical(&g, &dst0);
}

#[test]
fn leftover_spares_after_kill9_are_cleaned_and_never_wal() {
    let td = TestDir::new("spares-kill");
    let g = gen_wal(&td.join("src"), "56MiB");
    let dst = td.join("dst");
    fs::create_dir_all(&dst).unwrap();
    let port = free_port();
    // 1. kill -9 while the preparer is zeroing (right after start-up), repeatedly: whatever it leaves
    //    is cleaned at the next start.
    for i in 0..3 {
        let recv = start_recv(&dst, port, &td.join(format!("recv-k{i}.log")), &["--spare-segments", "4"]);
        std::thread::sleep(Duration::from_millis(15 * i as u64));
        recv.kill9();
        assert!(names(&dst).iter().all(|n| !is_seg_name(n.trim_end_matches(".partial"))), "{:?}", names(&dst));
    }
    // 2. Ship part of the WAL, kill -9 the receiver mid-ship.
    let recv = start_recv(&dst, port, &td.join("recv-1.log"), &["--spare-segments", "2"]);
    let to = format!("127.0.0.1:{port}");
    let f = File::create(td.join("send-1.log")).unwrap();
    let mut cmd = walship(&["send", "--pg-wal", p(&g.dir), "--to", &to, "--once", "--retry-for", "60s", "--frame-bytes", "64KiB", "--in-flight-bytes-max", "64KiB"]);
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    let mut sender = ChildGuard::spawn("send", &mut cmd).unwrap();
    let partial = poll_until(Duration::from_secs(30), Duration::from_millis(5), || {
        names(&dst).iter().any(|n| n.ends_with(".partial") && !n.starts_with("000000010000000000000001")).then_some(())
    });
    assert!(partial.is_some(), "no progress: {:?}", names(&dst));
    recv.kill9();
    // 3. Plant what a crash could leave, and worse: a half-zeroed `.tmp` full of WAL-like garbage, a "ready"
    //    spare that is not all zeros, one of the wrong size.
    let mut junk = fs::read(g.dir.join(seg_name(1, g.end_lsn / SEG, SEG))).unwrap();
    junk.truncate(SEG as usize);
    fs::write(dst.join(".walship-spare-90.tmp"), &junk[..(SEG / 2) as usize]).unwrap();
    fs::write(dst.join(".walship-spare-91"), &junk).unwrap();
    fs::write(dst.join(".walship-spare-92"), vec![0u8; 4096]).unwrap();
    // 4. Restart: the leftovers are gone before it listens; the sender resumes and finishes.
    let recv = start_recv(&dst, port, &td.join("recv-2.log"), &["--spare-segments", "2"]);
    for n in [".walship-spare-90.tmp", ".walship-spare-91", ".walship-spare-92"] {
        assert!(!dst.join(n).exists(), "{n} survived the restart: {:?}", names(&dst));
    }
    let st = sender.wait_timeout(Duration::from_secs(90)).unwrap().expect("sender finishes");
    assert!(st.success(), "sender: {st}\n{}", tail_file(&td.join("send-1.log"), 30));
    recv.stop();
    assert_identical(&g, &dst);
    for n in spare_names(&dst) {
        let b = fs::read(dst.join(&n)).unwrap();
        assert!(!n.ends_with(".tmp") && b.len() as u64 == SEG && b.iter().all(|&x| x == 0), "{n} is not a clean spare");
    }
}
