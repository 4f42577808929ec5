//! One sender, three receivers, a quorum of two (issue #12), with the real binary on loopback:
//! - receivers killed (-9) and restarted, and one stopped (SIGSTOP) for a while, during a ship:
//!   every receiver ends byte-identical to the source; the quorum position and each destination's
//!   acknowledged position never move backwards; and the sender never reports durable a position
//!   that fewer than two receivers have published as durable (sampled all through the ship);
//! - a stopped receiver does not hold the others back, `--once` then exits 3 naming it, and it
//!   catches up on the next run;
//! - a destination that never answers: exit 3 with K=2, exit 1 with K=3 (fewer than K).
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const SEG: u64 = 1 << 20;

fn gen_wal(dir: &Path, wal_bytes: &str) -> u64 {
    let out = run_ok(&mut walship(&["gen-wal", "--dir", p(dir), "--wal-bytes", wal_bytes, "--seg-size", "1MiB", "--seed", "12"]))
        .unwrap_or_else(|e| panic!("{e}"));
    parse_lsn(&json_field(&String::from_utf8_lossy(&out.stdout), "end_lsn").expect("end_lsn")).expect("lsn")
}

struct Receiver {
    dir: PathBuf,
    port: u16,
    log: PathBuf,
    guard: Option<ChildGuard>,
}

impl Receiver {
    fn new(ctx: &Ctx, name: &str) -> Receiver {
        let r = Receiver { dir: ctx.path(name), port: free_port(), log: ctx.log(name), guard: None };
        fs::create_dir_all(&r.dir).unwrap();
        r
    }

    fn to(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let before = fs::read_to_string(&self.log).map(|s| s.matches("listening").count()).unwrap_or(0);
        let mut c = Command::new(walship_bin());
        c.args(["recv", "--listen", &self.to(), "--dir", p(&self.dir), "--chunk-bytes", "256KiB"]);
        c.env("WALSHIP_INSECURE_NO_AUTH", "true").env("NO_COLOR", "1").stdin(Stdio::null());
        let f = fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        c.stdout(f.try_clone().unwrap()).stderr(f);
        self.guard = Some(ChildGuard::spawn("recv", &mut c).expect("spawn recv"));
        let up = poll_until(Duration::from_secs(20), Duration::from_millis(20), || {
            (fs::read_to_string(&self.log).unwrap_or_default().matches("listening").count() > before).then_some(())
        });
        assert!(up.is_some(), "receiver {} did not start:\n{}", self.to(), tail_file(&self.log, 20));
    }

    fn signal(&mut self, sig: i32) {
        self.guard.as_mut().expect("running").signal(sig).expect("signal");
    }

    fn kill9(&mut self) {
        let mut g = self.guard.take().expect("running");
        g.signal(libc::SIGKILL).unwrap();
        g.wait_timeout(Duration::from_secs(10)).unwrap();
    }

    /// What the receiver published as durable (it publishes before it acknowledges).
    fn durable(&self) -> u64 {
        walship::recv::published::read(&self.dir).ok().flatten().map_or(0, |p| p.lsn.0)
    }
}

fn sender(src: &Path, dests: &[&Receiver], extra: &[&str], log: &Path) -> ChildGuard {
    let mut c = Command::new(walship_bin());
    c.args(["send", "--once", "--pg-wal", p(src)]);
    for d in dests {
        c.args(["--to", &d.to()]);
    }
    c.args(extra).env("WALSHIP_INSECURE_NO_AUTH", "true").env("NO_COLOR", "1");
    spawn_logged("send", c, log)
}

fn scrape(url: &str) -> Option<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(2))).build().into();
    agent.get(url).call().ok()?.body_mut().read_to_string().ok()
}

/// `name value` or `name{label="want"} value` from an exposition.
fn gauge(text: &str, name: &str, label: Option<&str>) -> Option<u64> {
    let prefix = match label {
        None => format!("{name} "),
        Some(l) => format!("{name}{{destination=\"{l}\"}} "),
    };
    text.lines().find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
}

/// Checks one sample of the sender against the receivers: the quorum position never moves
/// backwards, nor does any destination's acknowledged position, and at least `k` receivers have
/// published as durable what the sender counts durable (read after the sender, so a receiver
/// can only be further along than when the sender counted it).
struct Watch {
    quorum: u64,
    acked: BTreeMap<String, u64>,
    samples: u32,
}

impl Watch {
    /// `first`: where shipping starts (a position at or below it claims nothing).
    fn sample(&mut self, metrics: &str, receivers: &[&Receiver], k: usize, first: u64) {
        let Some(text) = scrape(metrics) else { return };
        let Some(q) = gauge(&text, "walship_send_quorum_flushed_lsn", None) else { return };
        let durable: Vec<u64> = receivers.iter().map(|r| r.durable()).collect();
        assert!(q >= self.quorum, "the quorum position moved backwards: {} -> {q}", self.quorum);
        self.quorum = q;
        let holding = if q <= first { k } else { durable.iter().filter(|&&d| d >= q).count() };
        assert!(holding >= k, "the sender counts {} durable, but only {holding} receivers published it: {durable:?}", fmt_lsn(q));
        for r in receivers {
            if let Some(a) = gauge(&text, "walship_send_destination_flushed_lsn", Some(&r.to())) {
                let before = self.acked.insert(r.to(), a).unwrap_or(0);
                assert!(a >= before, "{}'s acknowledged position moved backwards: {} -> {}", r.to(), fmt_lsn(before), fmt_lsn(a));
            }
        }
        self.samples += 1;
    }
}

/// The receiver's directory holds the source's WAL up to `end`: complete segments identical, the
/// last one a `.partial` identical up to `end`.
fn assert_identical(src: &Path, dst: &Path, first: u64, end: u64) {
    for segno in first / SEG..=(end - 1) / SEG {
        let name = seg_name(1, segno, SEG);
        let want = fs::read(src.join(&name)).unwrap();
        if end >= (segno + 1) * SEG {
            let got = fs::read(dst.join(&name)).unwrap_or_else(|e| panic!("{} lacks {name}: {e}", dst.display()));
            assert!(got == want, "{}/{name} differs from the source", dst.display());
        } else {
            let got = fs::read(dst.join(format!("{name}.partial"))).unwrap_or_else(|e| panic!("{} lacks {name}.partial: {e}", dst.display()));
            let cut = (end - segno * SEG) as usize;
            assert!(got[..cut] == want[..cut], "{}/{name}.partial differs from the source", dst.display());
        }
    }
}

fn first_lsn(src: &Path) -> u64 {
    let mut names: Vec<String> = fs::read_dir(src).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| is_seg_name(n)).collect();
    names.sort();
    u64::from_str_radix(&names[0][16..24], 16).unwrap() * SEG
}

#[test]
fn three_receivers_two_of_three_survive_kill9_and_sigstop() {
    let ctx = Ctx::new("fanout-faults");
    let src = ctx.path("src");
    let end = gen_wal(&src, "160MiB");
    let first = first_lsn(&src);
    let mut rs: Vec<Receiver> = ["r0", "r1", "r2"].iter().map(|n| Receiver::new(&ctx, n)).collect();
    rs.iter_mut().for_each(Receiver::start);
    let mport = free_port();
    let metrics = format!("http://127.0.0.1:{mport}/metrics");
    let throttle = ["--in-flight-bytes-max", "1MiB", "--frame-bytes", "64KiB", "--send-batch-bytes-max", "64KiB"];
    let mut extra = vec!["--quorum", "2", "--retry-for", "120s", "--metrics-listen"];
    let mlisten = format!("127.0.0.1:{mport}");
    extra.push(&mlisten);
    extra.extend(throttle);
    let slog = ctx.log("send");
    let mut send = sender(&src, &rs.iter().collect::<Vec<_>>(), &extra, &slog);
    let mut watch = Watch { quorum: 0, acked: BTreeMap::new(), samples: 0 };
    // By the quorum's progress: kill r0 at 15%, 35%, 55% (restarted 300 ms later); stop r1 from
    // 25% to 65%.
    let (mut kills, mut stopped, mut resumed) = (0, false, false);
    let started = Instant::now();
    let exit = loop {
        if let Some(st) = send.try_wait().unwrap() {
            break st;
        }
        assert!(started.elapsed() < Duration::from_secs(240), "the ship did not end:\n{}", tail_file(&slog, 30));
        watch.sample(&metrics, &rs.iter().collect::<Vec<_>>(), 2, first);
        let done_pct = (watch.quorum.saturating_sub(first)) * 100 / (end - first);
        if kills < 3 && done_pct >= [15, 35, 55][kills] {
            rs[0].kill9();
            std::thread::sleep(Duration::from_millis(300));
            rs[0].start();
            kills += 1;
        }
        if !stopped && done_pct >= 25 {
            rs[1].signal(libc::SIGSTOP);
            stopped = true;
        }
        if stopped && !resumed && done_pct >= 65 {
            rs[1].signal(libc::SIGCONT);
            resumed = true;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    if stopped && !resumed {
        rs[1].signal(libc::SIGCONT);
    }
    assert!(exit.success(), "sender failed: {exit}\n{}", tail_file(&slog, 40));
    assert_eq!(kills, 3, "the ship ended before the faults were placed (too fast?)");
    assert!(resumed, "the ship ended before the stopped receiver was resumed");
    assert!(watch.samples > 20, "too few samples ({}) of the sender's positions", watch.samples);
    for r in &rs {
        assert_identical(&src, &r.dir, first, end);
        assert_eq!(r.durable(), end, "{} durable position", r.to());
    }
    let log = fs::read_to_string(&slog).unwrap();
    assert!(log.contains(&format!("destination={}", rs[0].to())), "the sender's log names the destination that was lost");
}

#[test]
fn a_stopped_receiver_does_not_hold_the_others_back_and_catches_up_later() {
    let ctx = Ctx::new("fanout-stopped");
    let src = ctx.path("src");
    let end = gen_wal(&src, "24MiB");
    let first = first_lsn(&src);
    let mut rs: Vec<Receiver> = ["r0", "r1", "r2"].iter().map(|n| Receiver::new(&ctx, n)).collect();
    rs.iter_mut().for_each(Receiver::start);
    rs[2].signal(libc::SIGSTOP);
    let slog = ctx.log("send");
    let mut send = sender(&src, &rs.iter().collect::<Vec<_>>(), &["--quorum", "2", "--retry-for", "6s", "--peer-timeout", "2s"], &slog);
    // The two running receivers get everything while the third is still stopped.
    let both = poll_until(Duration::from_secs(60), Duration::from_millis(50), || (rs[0].durable() == end && rs[1].durable() == end).then_some(()));
    assert!(both.is_some(), "the running receivers did not get the WAL while one was stopped:\n{}", tail_file(&slog, 30));
    assert_eq!(rs[2].durable(), 0);
    let st = send.wait_timeout(Duration::from_secs(60)).unwrap().expect("sender ends after --retry-for");
    assert_eq!(st.code(), Some(3), "quorum only: exit 3\n{}", tail_file(&slog, 20));
    let log = fs::read_to_string(&slog).unwrap();
    assert!(log.contains(&format!("these do not: {}", rs[2].to())), "names the lagging destination:\n{}", tail_str(&log, 2000));
    rs[2].signal(libc::SIGCONT);
    let slog2 = ctx.log("send-again");
    let mut again = sender(&src, &rs.iter().collect::<Vec<_>>(), &["--quorum", "2"], &slog2);
    let st = again.wait_timeout(Duration::from_secs(60)).unwrap().expect("second run ends");
    assert!(st.success(), "{}", tail_file(&slog2, 20));
    for r in &rs {
        assert_identical(&src, &r.dir, first, end);
    }
}

#[test]
fn a_destination_that_never_answers_gives_exit_3_with_a_quorum_and_1_without() {
    let ctx = Ctx::new("fanout-dead");
    let src = ctx.path("src");
    let end = gen_wal(&src, "4MiB");
    let mut rs: Vec<Receiver> = ["r0", "r1", "dead"].iter().map(|n| Receiver::new(&ctx, n)).collect();
    rs[0].start();
    rs[1].start();
    let all = rs.iter().collect::<Vec<_>>();
    let out = run(walship(&["send", "--once", "--pg-wal", p(&src), "--to", &all[0].to(), "--to", &all[1].to(), "--to", &all[2].to(), "--quorum", "2", "--retry-for", "1s"])
        .env("WALSHIP_INSECURE_NO_AUTH", "true"))
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains(&format!("{} (never connected)", all[2].to())), "{err}");
    assert!(!err.contains("exit code 3"), "the exit code is not part of the message: {err}");
    assert_eq!((rs[0].durable(), rs[1].durable()), (end, end));
    let out = run(walship(&["send", "--once", "--pg-wal", p(&src), "--to", &all[0].to(), "--to", &all[2].to(), "--retry-for", "1s"]).env("WALSHIP_INSECURE_NO_AUTH", "true")).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gave up after 1s without a receiver"), "{err}");
}
