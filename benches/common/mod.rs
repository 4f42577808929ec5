//! Helpers for the benches (`benches/ship.rs`, `benches/latency.rs`): processes measured with wait4
//! rusage, O_DIRECT writes from an aligned buffer, filesystem type, machine facts.

#![allow(dead_code)]

pub mod pg;
pub mod svg;

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A JSON value: the reports the benches read (`walship gen-wal`, `walship send/recv --report-json`,
/// `fio --output-format=json`, criterion) and the results they write. serde_json's value; the
/// dev-dependency turns on `preserve_order`, so objects are written in the order they were built.
pub type Json = serde_json::Value;

/// How the benches build and read [`Json`].
pub trait JsonExt {
    /// An empty object.
    fn obj() -> Json;
    /// Parses `text` (one JSON value).
    fn parse(text: &str) -> Result<Json, String>;
    /// Builder: sets `key` of an object (panics on a non-object: a bench bug).
    fn set(&mut self, key: &str, value: impl ToJson) -> &mut Json;
    /// Follows a path of object keys and array indexes ("jobs", "0", "write", "bw_bytes").
    fn path(&self, keys: &[&str]) -> Option<&Json>;
    /// Pretty-printed with two-space indentation and a final newline.
    fn pretty(&self) -> String;
}

impl JsonExt for Json {
    fn obj() -> Json {
        Json::Object(serde_json::Map::new())
    }

    fn parse(text: &str) -> Result<Json, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    fn set(&mut self, key: &str, value: impl ToJson) -> &mut Json {
        match self {
            Json::Object(fields) => {
                fields.insert(key.to_string(), value.to_json());
            }
            other => panic!("Json::set on a non-object: {other:?}"),
        }
        self
    }

    fn path(&self, keys: &[&str]) -> Option<&Json> {
        let mut cur = self;
        for key in keys {
            cur = match cur {
                Json::Object(fields) => fields.get(*key)?,
                Json::Array(items) => items.get(key.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
        Some(cur)
    }

    fn pretty(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("a Value always serializes");
        text.push('\n');
        text
    }
}

/// fio prints notes before its JSON on some versions ("note: both iodepth >= 1 and synchronous I/O
/// engine..."): parse from the first '{' to the last '}'.
pub fn parse_json_lenient(text: &str) -> Result<Json, String> {
    let start = text.find('{').ok_or("no JSON object in output")?;
    let end = text.rfind('}').ok_or("no JSON object in output")?;
    Json::parse(&text[start..=end])
}

/// What [`JsonExt::set`] accepts. Measured floats are rounded to 6 decimals (enough for GB/s and
/// seconds; trims float noise) and written without a fraction when whole; non-finite ones are null.
pub trait ToJson {
    fn to_json(self) -> Json;
}

impl ToJson for f64 {
    fn to_json(self) -> Json {
        if !self.is_finite() {
            return Json::Null;
        }
        let v = (self * 1e6).round() / 1e6;
        if v.fract() == 0.0 && v.abs() < 9.0e15 {
            Json::from(v as i64)
        } else {
            Json::from(v)
        }
    }
}

impl<T: ToJson> ToJson for Option<T> {
    fn to_json(self) -> Json {
        self.map_or(Json::Null, ToJson::to_json)
    }
}

macro_rules! to_json_via_from {
    ($($t:ty),*) => {$(
        impl ToJson for $t {
            fn to_json(self) -> Json {
                Json::from(self)
            }
        }
    )*};
}
to_json_via_from!(Json, &str, String, bool, u64, u32, usize, i64, i32, Vec<Json>);

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
/// Decimal, like every GB/s number in DESIGN.md.
pub const GB: f64 = 1e9;

/// "2GiB", "256MiB", "512M", "1g", "1073741824" -> bytes (binary units for K/M/G with or without "iB").
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: u64 = num.parse().map_err(|_| format!("bad size {text:?}"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" | "kb" => KIB,
        "m" | "mib" | "mb" => MIB,
        "g" | "gib" | "gb" => GIB,
        _ => return Err(format!("bad size unit in {text:?} (use B, KiB, MiB, GiB)")),
    };
    num.checked_mul(mult).ok_or_else(|| format!("size {text:?} overflows"))
}

pub fn human_bytes(bytes: u64) -> String {
    if bytes >= GIB && bytes % GIB == 0 {
        format!("{} GiB", bytes / GIB)
    } else if bytes >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.0} MiB", bytes as f64 / MIB as f64)
    }
}

/// CPU time of a process or thread, seconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu {
    pub user_s: f64,
    pub sys_s: f64,
}

impl Cpu {
    pub fn total_s(&self) -> f64 {
        self.user_s + self.sys_s
    }
    fn from_rusage(ru: &libc::rusage) -> Cpu {
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        Cpu {
            user_s: tv(ru.ru_utime),
            sys_s: tv(ru.ru_stime),
        }
    }
    pub fn minus(&self, earlier: &Cpu) -> Cpu {
        Cpu {
            user_s: self.user_s - earlier.user_s,
            sys_s: self.sys_s - earlier.sys_s,
        }
    }
}

/// CPU time of the calling thread so far.
pub fn thread_cpu() -> Cpu {
    // SAFETY: getrusage writes one rusage into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    assert_eq!(rc, 0, "getrusage(RUSAGE_THREAD) failed");
    Cpu::from_rusage(&ru)
}

/// utime + stime of a live process from /proc/<pid>/stat (clock ticks).
pub fn proc_cpu(pid: u32) -> Option<Cpu> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 (1-based) of the whole line; `after` starts at field 3.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(Cpu {
        user_s: utime / hz,
        sys_s: stime / hz,
    })
}

/// A child that ran to completion (or was killed at its deadline).
#[derive(Debug)]
pub struct Finished {
    pub pid: u32,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub cpu: Cpu,
    pub wall: Duration,
    pub end: Instant,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
    pub fn describe_failure(&self) -> String {
        let how = if self.timed_out {
            "timed out (killed)".to_string()
        } else if let Some(sig) = self.signal {
            format!("killed by signal {sig}")
        } else {
            format!("exit code {:?}", self.exit_code)
        };
        format!("{how}; stderr tail: {}", tail(&self.stderr, 600))
    }
}

pub fn tail(text: &str, max_chars: usize) -> String {
    let t = text.trim();
    let start = t.char_indices().rev().nth(max_chars).map_or(0, |(i, _)| i);
    t[start..].replace('\n', " | ")
}

/// A spawned child whose stdout/stderr go to files (no pipe can fill and stall it).
pub struct Running {
    pub pid: u32,
    pub started: Instant,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    _child: std::process::Child,
}

pub fn spawn(cmd: &mut Command, log_dir: &Path, label: &str) -> io::Result<Running> {
    let stdout_path = log_dir.join(format!("{label}.stdout"));
    let stderr_path = log_dir.join(format!("{label}.stderr"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&stdout_path)?)
        .stderr(File::create(&stderr_path)?);
    let started = Instant::now();
    let child = cmd.spawn()?;
    Ok(Running {
        pid: child.id(),
        started,
        stdout_path,
        stderr_path,
        _child: child,
    })
}

impl Running {
    /// Has it exited already? (Does not reap it.)
    pub fn exited(&self) -> bool {
        // SAFETY: waitid with WNOWAIT only inspects our own child; siginfo is ours.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        rc == 0 && unsafe { info.si_pid() } != 0
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill on our own, not yet reaped, child.
        unsafe { libc::kill(self.pid as libc::pid_t, sig) };
    }

    /// Block in wait4 (so the end time is exact); a watchdog thread SIGKILLs it at the deadline.
    pub fn wait(self, timeout: Duration) -> io::Result<Finished> {
        let (cancel_tx, cancel_rx) = mpsc::channel::<()>();
        let pid = self.pid;
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = cancel_rx.recv_timeout(timeout) {
                // SAFETY: the child is not reaped until wait4 below returns, so the pid is still ours.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                return true;
            }
            false
        });
        let mut status: libc::c_int = 0;
        // SAFETY: zeroed rusage and status are ours; pid is our child.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = loop {
            let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, 0, &mut ru) };
            if rc < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break rc;
        };
        let end = Instant::now();
        let _ = cancel_tx.send(());
        let timed_out = watchdog.join().unwrap_or(false);
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let (exit_code, signal) = if libc::WIFEXITED(status) {
            (Some(libc::WEXITSTATUS(status)), None)
        } else if libc::WIFSIGNALED(status) {
            (None, Some(libc::WTERMSIG(status)))
        } else {
            (None, None)
        };
        Ok(Finished {
            pid,
            exit_code,
            signal,
            timed_out,
            cpu: Cpu::from_rusage(&ru),
            wall: end - self.started,
            end,
            stdout: std::fs::read_to_string(&self.stdout_path).unwrap_or_default(),
            stderr: std::fs::read_to_string(&self.stderr_path).unwrap_or_default(),
        })
    }
}

/// Run to completion, measured.
pub fn run(cmd: &mut Command, log_dir: &Path, label: &str, timeout: Duration) -> io::Result<Finished> {
    spawn(cmd, log_dir, label)?.wait(timeout)
}

/// Render a command for the report (not for a shell: no quoting beyond spaces).
pub fn cmd_line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Is 127.0.0.1:port (or 0.0.0.0:port) in LISTEN state? Reads /proc/net/tcp; no connection is made,
/// so the receiver never sees a probe as a client.
pub fn tcp_listening(port: u16) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let want = [format!("0100007F:{port:04X}"), format!("00000000:{port:04X}")];
    table.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 3 && want.iter().any(|w| w == f[1]) && f[3] == "0A"
    })
}

/// A port that was free a moment ago.
pub fn free_port() -> io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let layout = std::alloc::Layout::from_size_align(len, align).expect("layout");
        // SAFETY: non-zero size layout; checked for null below.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "allocation of {len} bytes failed");
        AlignedBuf { ptr, layout }
    }
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr is valid for layout.size() initialized (zeroed) bytes for our lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in new() with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

/// Fill with a cheap non-repeating pattern (xorshift), so no layer can shortcut zeros.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
}

pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Write `files` files of `file_bytes` each into `dir` with O_DIRECT pwrites of `buf`
/// (one fdatasync per file, like a receiver finishing a segment), then fsync the directory.
pub fn odirect_write_files(dir: &Path, files: u64, file_bytes: u64, buf: &AlignedBuf) -> io::Result<()> {
    let chunk = buf.as_slice().len() as u64;
    assert!(
        file_bytes % chunk == 0,
        "file size must be a multiple of the write size"
    );
    for i in 0..files {
        let path = dir.join(format!("{:024X}", i + 1));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_DIRECT | libc::O_CLOEXEC)
            .mode(0o600)
            .open(&path)?;
        let mut off = 0u64;
        while off < file_bytes {
            // SAFETY: buf is valid for `chunk` bytes and aligned; fd is open for writing.
            let n = unsafe {
                libc::pwrite(
                    file.as_raw_fd(),
                    buf.as_slice().as_ptr().cast(),
                    chunk as usize,
                    off as libc::off_t,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            // A short O_DIRECT write would leave the offset unaligned: treat as an error.
            if n as u64 != chunk {
                return Err(io::Error::other(format!("short O_DIRECT write: {n} of {chunk}")));
            }
            off += chunk;
        }
        file.sync_data()?;
    }
    fsync_dir(dir)
}

/// Filesystem type of `path` (statfs magic), e.g. "ext4", "tmpfs".
pub fn fs_type(path: &Path) -> String {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return "unknown".into();
    };
    // SAFETY: statfs fills the zeroed struct we own; c is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return format!("unknown ({})", io::Error::last_os_error());
    }
    match st.f_type as u64 {
        0xEF53 => "ext4".into(), // ext2/3/4 share the magic
        0x5846_5342 => "xfs".into(),
        0x9123_683E => "btrfs".into(),
        0x0102_1994 => "tmpfs".into(),
        0x794C_7630 => "overlayfs".into(),
        0x6573_5546 => "fuse".into(),
        0x2FC1_2FC1 => "zfs".into(),
        0xF2F5_2010 => "f2fs".into(),
        other => format!("0x{other:X}"),
    }
}

/// Total bytes of regular files directly in `dir`.
pub fn dir_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Regular files directly in `dir`, sorted by name.
pub fn list_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    Ok(files)
}

/// Read every file once so the page cache is hot for every contender alike.
pub fn warm(files: &[PathBuf]) -> io::Result<u64> {
    let mut buf = vec![0u8; MIB as usize];
    let mut total = 0;
    for path in files {
        let mut f = File::open(path)?;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
    }
    Ok(total)
}

pub fn sync_all_fs() {
    // SAFETY: sync(2) has no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// First line of a command's stdout, or None when it cannot run.
pub fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

/// Text without ANSI escape sequences (colored log lines).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The integer right after the first `pat` in `text`.
pub fn num_after(text: &str, pat: &str) -> Option<u64> {
    let i = text.find(pat)? + pat.len();
    let digits: String = text[i..].chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// The integer right before the first `pat` in `text`.
pub fn num_before(text: &str, pat: &str) -> Option<u64> {
    let i = text.find(pat)?;
    let rev: String = text[..i].chars().rev().take_while(|c| c.is_ascii_digit()).collect();
    rev.chars().rev().collect::<String>().parse().ok()
}

/// `walship recv --report-json FILE` (written when the receiver exits) as the flat object the
/// reports use (`p50_us` etc. are fdatasync's); `Null` when the file is missing or unreadable.
pub fn read_recv_report(path: &Path) -> Json {
    let Ok(text) = std::fs::read_to_string(path) else { return Json::Null };
    let Ok(r) = Json::parse(text.trim()) else { return Json::Null };
    let mut o = Json::obj();
    let mut copy = |to: &str, from: &[&str]| {
        o.set(to, r.path(from).and_then(Json::as_u64).map(Json::from).unwrap_or(Json::Null));
    };
    copy("writes", &["writes"]);
    copy("write_bytes", &["write_bytes"]);
    copy("fdatasyncs", &["fdatasyncs"]);
    copy("batches", &["fsync_batches"]);
    copy("bytes_per_batch", &["bytes_per_batch"]);
    copy("p50_us", &["fdatasync_us", "p50"]);
    copy("p99_us", &["fdatasync_us", "p99"]);
    copy("max_us", &["fdatasync_us", "max"]);
    copy("frame_stalls", &["frame_stalls"]);
    copy("write_p50_us", &["write_us", "p50"]);
    copy("write_p99_us", &["write_us", "p99"]);
    copy("frame_to_durable_p50_us", &["frame_to_durable_us", "p50"]);
    copy("frame_to_durable_p99_us", &["frame_to_durable_us", "p99"]);
    o.set("report", r);
    o
}

/// An on/off environment variable: unset is `None`; "", "0", "false" and "no" are off.
pub fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name)
        .ok()
        .map(|v| !matches!(v.as_str(), "" | "0" | "false" | "no"))
}

/// Cargo's target directory (the bench binary lives in `<target>/release/deps/NAME-HASH`).
pub fn target_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}
