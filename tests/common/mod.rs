//! Shared helpers for integration tests that run the real `walship` binary on real files and sockets.
//!
//! - [`walship_bin`]: path of the binary Cargo built for this test run.
//! - [`TestDir`]: a temporary directory on a real filesystem (never tmpfs: the receiver uses O_DIRECT).
//! - [`free_port`]: a currently free TCP port on 127.0.0.1.
//! - [`ChildGuard`]: a spawned process that is killed (SIGKILL) and reaped when the guard drops, so a
//!   panicking test never leaves a receiver running.
//! - [`walship`]: `walship ARGS` for the shipping tests (no authentication, no colour).
//! - [`run`] / [`run_ok`]: run a command to completion with its output captured, errors that show the
//!   command line, exit status, stdout and stderr.
#![allow(dead_code)]

pub mod pg;
pub mod replay;
pub mod s3;

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The `walship` binary built by Cargo for this integration test.
pub fn walship_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walship"))
}

const TMPFS_MAGIC: i64 = 0x0102_1994;
const RAMFS_MAGIC: i64 = 0x8584_58f6u32 as i64;

/// True when `path` lives on tmpfs/ramfs (which refuse O_DIRECT), per statfs(2).
pub fn is_tmpfs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return false;
    }
    let t = st.f_type as i64;
    t == TMPFS_MAGIC || t == RAMFS_MAGIC
}

/// Base directory for test temp dirs: `std::env::temp_dir()` unless it is tmpfs, else `target/tmp`
/// (`CARGO_TARGET_TMPDIR`). `WALSHIP_TEST_TMPDIR` overrides both.
pub fn test_tmp_base() -> PathBuf {
    if let Some(p) = std::env::var_os("WALSHIP_TEST_TMPDIR") {
        return PathBuf::from(p);
    }
    let t = std::env::temp_dir();
    if !is_tmpfs(&t) {
        return t;
    }
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    fs::create_dir_all(&p).expect("create CARGO_TARGET_TMPDIR");
    p
}

/// A temporary directory (mode 0755) on a real filesystem, removed on drop unless `WALSHIP_KEEP_TMP=1`
/// (then its path is printed so a failure can be inspected).
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
}

impl TestDir {
    pub fn new(prefix: &str) -> TestDir {
        let base = test_tmp_base();
        let dir = tempfile::Builder::new()
            .prefix(&format!("walship-{prefix}-"))
            .tempdir_in(&base)
            .unwrap_or_else(|e| panic!("create temp dir in {}: {e}", base.display()));
        let path = dir.path().to_path_buf();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod temp dir");
        assert!(!is_tmpfs(&path), "{} is on tmpfs; set WALSHIP_TEST_TMPDIR", path.display());
        TestDir { dir: Some(dir), path }
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::env::var("WALSHIP_KEEP_TMP").as_deref() == Ok("1") {
            if let Some(d) = self.dir.take() {
                let p = d.keep();
                eprintln!("WALSHIP_KEEP_TMP=1: kept {}", p.display());
            }
        }
    }
}

/// A test's temp dir and the logs of every process it started, printed (their last lines) when
/// the test fails.
pub struct Ctx {
    pub dir: TestDir,
    logs: std::cell::RefCell<Vec<(String, PathBuf)>>,
    tail_lines: usize,
}

impl Ctx {
    pub fn new(name: &str) -> Ctx {
        Ctx { dir: TestDir::new(name), logs: Default::default(), tail_lines: 60 }
    }
    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }
    /// A fresh log file path, registered for printing on failure.
    pub fn log(&self, name: &str) -> PathBuf {
        let n = self.logs.borrow().len();
        let p = self.dir.join(format!("log-{n:02}-{name}.txt"));
        self.logs.borrow_mut().push((name.to_string(), p.clone()));
        p
    }
    /// Prints `p` too on failure (a log some other code chose).
    pub fn watch(&self, name: &str, p: &Path) {
        self.logs.borrow_mut().push((name.to_string(), p.to_path_buf()));
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== test failed; process logs (temp dir {}) =====", self.dir.path().display());
            for (name, p) in self.logs.borrow().iter() {
                eprintln!("----- {name}: {} -----\n{}", p.display(), tail_file(p, self.tail_lines));
            }
            eprintln!("===== end of process logs =====");
        }
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to :0, read, release).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Spawns `cmd` with stdout and stderr written to `log` (created anew).
pub fn spawn_logged(name: &str, mut cmd: Command, log: &Path) -> ChildGuard {
    let f = fs::File::create(log).expect("create log");
    cmd.stdout(f.try_clone().unwrap()).stderr(f);
    ChildGuard::spawn(name, &mut cmd).unwrap_or_else(|e| panic!("spawn {name} `{}`: {e}", cmdline(&cmd)))
}

/// A child process killed (SIGKILL) and reaped on drop unless it already exited.
pub struct ChildGuard {
    pub child: Option<Child>,
    pub name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> std::io::Result<ChildGuard> {
        let child = cmd.spawn()?;
        Ok(ChildGuard { child: Some(child), name: name.to_string() })
    }
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }
    /// Send `sig` (e.g. `libc::SIGTERM`) to the child, unless it already exited: once reaped its
    /// pid may belong to another process (a signal there once failed an unrelated test).
    pub fn signal(&mut self, sig: i32) -> std::io::Result<()> {
        let Some(c) = self.child.as_mut() else { return Ok(()) };
        if let Ok(Some(_)) = c.try_wait() {
            return Ok(());
        }
        // SAFETY: plain kill(2) on our own child's pid (not reaped yet, so the pid is still ours).
        let rc = unsafe { libc::kill(c.id() as libc::pid_t, sig) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
    /// Has the child exited? (non-blocking)
    pub fn try_wait(&mut self) -> std::io::Result<Option<ExitStatus>> {
        match self.child.as_mut() {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }
    /// Wait up to `timeout` for the child to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> std::io::Result<Option<ExitStatus>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait()? {
                self.child = None;
                return Ok(Some(st));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// "prog arg1 arg2 ..." for error messages.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run to completion capturing stdout/stderr; Err only if it could not be started.
pub fn run(cmd: &mut Command) -> Result<Output, String> {
    cmd.stdin(Stdio::null());
    cmd.output().map_err(|e| format!("could not run `{}`: {e}", cmdline(cmd)))
}

/// Run to completion; Err (with command line, status, stdout, stderr) unless it exits 0.
pub fn run_ok(cmd: &mut Command) -> Result<Output, String> {
    let out = run(cmd)?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(describe_failure(cmd, &out))
    }
}

pub fn describe_failure(cmd: &Command, out: &Output) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "`{}` exited with {}", cmdline(cmd), out.status);
    let _ = writeln!(s, "--- stdout ---\n{}", tail_str(&String::from_utf8_lossy(&out.stdout), 40));
    let _ = write!(s, "--- stderr ---\n{}", tail_str(&String::from_utf8_lossy(&out.stderr), 40));
    s
}

/// Last `n` lines of `s`.
pub fn tail_str(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Last `n` lines of a (possibly large, possibly missing) file.
pub fn tail_file(path: &Path, n: usize) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return format!("(no file {})", path.display());
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    let _ = f.seek(SeekFrom::Start(start));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    tail_str(&String::from_utf8_lossy(&buf), n)
}

/// chmod -R a+rX (directories and files readable, directories traversable) — so another OS user
/// (e.g. `postgres` running a restore_command) can read what a test wrote as root.
pub fn chmod_a_rx(path: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    let mode = meta.permissions().mode();
    if meta.is_dir() {
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o555))?;
        for e in fs::read_dir(path)? {
            chmod_a_rx(&e?.path())?;
        }
    } else if meta.is_file() {
        let x = if mode & 0o100 != 0 { 0o111 } else { 0 };
        fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o444 | x))?;
    }
    Ok(())
}

/// chown -R to uid/gid (no-op error mapping: returns the first failure).
pub fn chown_r(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
    if fs::symlink_metadata(path)?.is_dir() {
        for e in fs::read_dir(path)? {
            chown_r(&e?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// uid/gid of a local user via `id` (avoids getpwnam's static buffer).
pub fn user_ids(user: &str) -> Option<(u32, u32)> {
    let u = Command::new("id").arg("-u").arg(user).output().ok()?;
    let g = Command::new("id").arg("-g").arg(user).output().ok()?;
    if !u.status.success() || !g.status.success() {
        return None;
    }
    let uid = String::from_utf8_lossy(&u.stdout).trim().parse().ok()?;
    let gid = String::from_utf8_lossy(&g.stdout).trim().parse().ok()?;
    Some((uid, gid))
}

/// Can every ancestor directory of `path` be traversed by others (o+x)? Used to decide whether another
/// user can execute a binary under `target/`.
pub fn others_can_reach(path: &Path) -> bool {
    let mut p = path.parent();
    while let Some(d) = p {
        match fs::metadata(d) {
            Ok(m) if m.permissions().mode() & 0o001 != 0 => {}
            _ => return false,
        }
        p = d.parent();
    }
    fs::metadata(path).map(|m| m.permissions().mode() & 0o005 == 0o005).unwrap_or(false)
}

/// Poll `f` every `every` until it returns Some or `timeout` passes.
pub fn poll_until<T>(timeout: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// A `Command` for `prog` with `args`.
pub fn cmd<I, S>(prog: impl AsRef<OsStr>, args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let is_walship = Path::new(prog.as_ref()).file_name().is_some_and(|n| n == "walship");
    let mut c = Command::new(prog);
    c.args(args);
    if is_walship {
        // Tests about shipping run without authentication; tests/auth.rs covers it.
        c.env("WALSHIP_INSECURE_NO_AUTH", "true");
    }
    c
}

/// `walship ARGS` as the shipping tests run it: no authentication (tests/auth.rs covers it), no
/// colour, the default log level, stdin closed.
pub fn walship(args: &[&str]) -> Command {
    let mut c = cmd(walship_bin(), args);
    c.env("NO_COLOR", "1").env_remove("WALSHIP_LOG");
    c.stdin(Stdio::null());
    c
}

/// A path as a command-line argument (test paths are UTF-8).
pub fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Parse a PostgreSQL LSN `X/Y` (hex; PG 18 zero-pads the low part, both parse).
pub fn parse_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
        return None;
    }
    Some((hi << 32) | lo)
}

/// Format an LSN the way PostgreSQL 15 does (`%X/%X`).
pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// WAL segment file name for (timeline, segno) with `seg_size`-byte segments.
pub fn seg_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per_id = 0x1_0000_0000u64 / seg_size;
    format!("{:08X}{:08X}{:08X}", tli, segno / per_id, segno % per_id)
}

/// Is `name` a WAL segment file name (24 upper-case hex digits)?
pub fn is_seg_name(name: &str) -> bool {
    name.len() == 24 && name.bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

/// Extract a top-level field from a flat JSON object without a JSON dependency: strings are returned
/// without quotes, numbers as written.
pub fn json_field(json: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\"");
    let i = json.find(&pat)? + pat.len();
    let rest = json[i..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(r) = rest.strip_prefix('"') {
        let end = r.find('"')?;
        Some(r[..end].to_string())
    } else {
        let end = rest.find([',', '}', '\n']).unwrap_or(rest.len());
        Some(rest[..end].trim().to_string())
    }
}
