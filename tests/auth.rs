//! Who may connect: the real binary with and without keys on 127.0.0.1. A sender with a wrong
//! or missing key is refused before the receiver writes a byte, with a clear error on both sides;
//! a sender with a key refuses a receiver that does not authenticate.

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::Duration;

fn walship(args: &[&str]) -> Command {
    let mut c = Command::new(walship_bin());
    c.args(args).env("NO_COLOR", "1").env_remove("WALSHIP_LOG").env_remove("WALSHIP_INSECURE_NO_AUTH");
    c.stdin(Stdio::null());
    c
}


struct Setup {
    dir: TestDir,
    port: u16,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = TestDir::new(name);
        run_ok(&mut walship(&["gen-wal", "--dir", p(&dir.join("src")), "--wal-bytes", "3MiB", "--seg-size", "1MiB"])).unwrap();
        std::fs::write(dir.join("good.key"), "correct horse battery staple 1234\n").unwrap();
        std::fs::write(dir.join("bad.key"), "incorrect horse battery staple 99\n").unwrap();
        Setup { dir, port: free_port() }
    }

    fn recv(&self, auth: &[&str]) -> ChildGuard {
        let dst = self.dir.join("dst");
        let listen = format!("127.0.0.1:{}", self.port);
        let mut args = vec!["recv", "--listen", &listen, "--dir", p(&dst)];
        args.extend_from_slice(auth);
        let log = std::fs::File::create(self.dir.join("recv.log")).unwrap();
        let mut c = walship(&args);
        c.stderr(log);
        ChildGuard::spawn("recv", &mut c).unwrap()
    }

    fn send(&self, auth: &[&str]) -> std::process::Output {
        let to = format!("127.0.0.1:{}", self.port);
        let src = self.dir.join("src");
        let mut args = vec!["send", "--once", "--retry-for", "10s", "--pg-wal", p(&src), "--to", &to];
        args.extend_from_slice(auth);
        run(&mut walship(&args)).unwrap()
    }

    fn key(&self, name: &str) -> String {
        p(&self.dir.join(name)).to_string()
    }

    fn received_files(&self) -> usize {
        std::fs::read_dir(self.dir.join("dst")).map(|d| d.filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.')).count()).unwrap_or(0)
    }

    fn recv_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("recv.log")).unwrap_or_default()
    }
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn same_key_ships() {
    let s = Setup::new("auth-ok");
    let good = s.key("good.key");
    let _r = s.recv(&["--auth-key-file", &good]);
    let out = s.send(&["--auth-key-file", &good]);
    assert!(out.status.success(), "send failed: {}", stderr(&out));
    assert!(s.received_files() >= 3);
    assert!(s.recv_log().contains("sender authenticated"), "{}", s.recv_log());
}

#[test]
fn wrong_key_is_refused_before_anything_is_written() {
    let s = Setup::new("auth-wrong");
    let (good, bad) = (s.key("good.key"), s.key("bad.key"));
    let mut r = s.recv(&["--auth-key-file", &good]);
    let out = s.send(&["--auth-key-file", &bad]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("failed authentication"), "sender stderr: {}", stderr(&out));
    assert_eq!(s.received_files(), 0, "a refused sender got WAL written");
    assert!(s.recv_log().contains("failed authentication"), "receiver log: {}", s.recv_log());
    // The receiver survives and still serves the right key.
    assert!(r.try_wait().unwrap().is_none(), "receiver died");
    let out = s.send(&["--auth-key-file", &good]);
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn missing_key_is_refused_with_advice() {
    let s = Setup::new("auth-missing");
    let good = s.key("good.key");
    let _r = s.recv(&["--auth-key-file", &good]);
    let out = s.send(&["--insecure-no-auth"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("requires authentication"), "{}", stderr(&out));
    assert_eq!(s.received_files(), 0);
}

#[test]
fn keyed_sender_refuses_an_unauthenticated_receiver() {
    let s = Setup::new("auth-mitm");
    let good = s.key("good.key");
    let _r = s.recv(&["--insecure-no-auth"]);
    let out = s.send(&["--auth-key-file", &good]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("did not authenticate itself"), "{}", stderr(&out));
    assert_eq!(s.received_files(), 0);
}

#[test]
fn no_auth_choice_is_an_error_and_insecure_warns() {
    let s = Setup::new("auth-none");
    let listen = format!("127.0.0.1:{}", s.port);
    let out = run(&mut walship(&["recv", "--listen", &listen, "--dir", p(&s.dir.join("dst"))])).unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--auth-key-file") && stderr(&out).contains("--insecure-no-auth"), "{}", stderr(&out));
    let _r = s.recv(&["--insecure-no-auth"]);
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.recv_log().contains("WITHOUT authentication"), "{}", s.recv_log());
    let short = s.dir.join("short.key");
    std::fs::write(&short, "tiny").unwrap();
    let out = s.send(&["--auth-key-file", p(&short)]);
    assert!(!out.status.success() && stderr(&out).contains("at least 16"), "{}", stderr(&out));
}
