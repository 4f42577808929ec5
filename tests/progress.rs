//! Progress of `send --once`: a bar with bytes, rate and ETA on a (pseudo-)terminal, plain
//! periodic log lines otherwise. The terminal is real: `script(1)` runs the sender on a pty.

mod common;

use common::*;
use std::process::Command;

fn setup(name: &str) -> (TestDir, String, ChildGuard) {
    let dir = TestDir::new(name);
    run_ok(&mut cmd(walship_bin(), ["gen-wal", "--dir", dir.join("src").to_str().unwrap(), "--wal-bytes", "96MiB"])).unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut r = cmd(walship_bin(), ["recv", "--listen", &listen, "--dir", dir.join("dst").to_str().unwrap()]);
    r.stderr(std::fs::File::create(dir.join("recv.log")).unwrap());
    let guard = ChildGuard::spawn("recv", &mut r).unwrap();
    (dir, listen, guard)
}

/// Throttled so the ship lasts long enough to draw and log.
fn send_args(dir: &TestDir, to: &str) -> Vec<String> {
    [
        "send", "--insecure-no-auth", "--once", "--retry-for", "20s", "--to", to, "--pg-wal",
        dir.join("src").to_str().unwrap(), "--in-flight-bytes-max", "1MiB", "--frame-bytes", "64KiB",
        "--send-batch-bytes-max", "64KiB", "--progress-interval", "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn terminal_gets_a_bar_with_bytes_rate_and_eta() {
    if Command::new("script").arg("--version").output().is_err() {
        panic!("script(1) (util-linux) is needed to give the sender a pseudo-terminal");
    }
    let (dir, to, _recv) = setup("progress-tty");
    let line = std::iter::once(walship_bin().to_str().unwrap().to_string())
        .chain(send_args(&dir, &to))
        .collect::<Vec<_>>()
        .join(" ");
    let out = run(Command::new("script").args(["-qec", &line, "/dev/null"]).env("WALSHIP_INSECURE_NO_AUTH", "true")).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "\n");
    assert!(out.status.success(), "send under a pty failed:\n{text}");
    let bars: Vec<&str> = text.lines().filter(|l| l.contains("durable,") && l.contains("ETA")).collect();
    assert!(!bars.is_empty(), "no progress bar drawn on the terminal:\n{text}");
    assert!(bars.iter().any(|l| l.contains("MiB/s") || l.contains("KiB/s")), "no rate in the bar: {bars:?}");
    assert!(text.contains("shipped"), "no summary:\n{text}");
}

#[test]
fn no_terminal_gets_plain_log_lines() {
    let (dir, to, _recv) = setup("progress-log");
    let out = run(&mut cmd(walship_bin(), send_args(&dir, &to))).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("progress") && l.contains("mb_per_s")).collect();
    assert!(!lines.is_empty(), "no progress log lines:\n{stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in a non-terminal log");
}
