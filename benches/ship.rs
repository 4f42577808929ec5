//! End-to-end WAL shipping throughput, side by side with its baselines, in one run.
//!
//! Contenders (each measured `reps` times, interleaved, medians reported):
//! 1. `raw_tcp`: loopback TCP, a sender thread doing blocking 1 MiB writes from a pre-filled buffer,
//!    a receiver thread reading into 1 MiB and discarding. No disk.
//! 2. `raw_odirect_fio`: `fio` io_uring, O_DIRECT, 1 MiB, depth 16, 16 MiB files, end_fsync (if fio is
//!    installed), and `raw_odirect_rust`: O_DIRECT pwrite loop from an aligned 1 MiB buffer, one
//!    fdatasync per 16 MiB file. No network. "raw O_DIRECT" in the ratios is fio when it ran, else Rust.
//! 3. `cp_sync`: `cp` of the segment files into a fresh directory, then `sync`.
//! 4. `walship`: `walship recv` and `walship send --once` as two processes; durable throughput =
//!    bytes / wall seconds of the send command (it exits only once the receiver acked flushed == end).
//! 5. `pg_receivewal`: TODO, prints "skipped: ...".
//!
//! The source segments are hot in the page cache for every contender alike (read once before the
//! first measurement); no caches are dropped. Every disk contender writes into a fresh directory on
//! the scratch filesystem (never tmpfs), which is deleted and synced (untimed) before the next one.
//!
//! Environment:
//! - `WALSHIP_BENCH_BYTES` total WAL bytes (default 2GiB; rounded down to whole 16 MiB segments)
//! - `WALSHIP_BENCH_REPS` repetitions of every contender (default 3)
//! - `WALSHIP_BENCH_DIR` scratch parent dir (default `<target dir>/bench-scratch`)
//! - `WALSHIP_BENCH_RESULTS` where `ship-<date>.json` and `REPORT.md` go (default `<crate>/results`)
//! - `WALSHIP_BIN` walship binary (default: the one cargo built for this bench)
//! - `WALSHIP_BENCH_FIO=0` skip fio; `WALSHIP_BENCH_KEEP=1` keep the scratch dir;
//!   `WALSHIP_BENCH_TIMEOUT_S` per-command limit (default 120 + 1 s per 50 MB)
//! - `WALSHIP_BENCH_SEND_ARGS` / `WALSHIP_BENCH_RECV_ARGS` extra args (whitespace-split) for send/recv
//!
//! Arguments after `--` are contender-name filters (substring match), e.g.
//! `cargo bench --bench ship -- raw_tcp cp_sync`.

mod common;

use common::json::{self, Json};
use common::*;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const SEGMENT_BYTES: u64 = 16 * MIB;
const IO_BYTES: usize = MIB as usize;
const ODIRECT_ALIGN: usize = 4096;
const LISTEN_WAIT: Duration = Duration::from_secs(15);
const RECV_STOP_WAIT: Duration = Duration::from_secs(15);

struct Config {
    bytes: u64,
    reps: usize,
    scratch_parent: PathBuf,
    results_dir: PathBuf,
    walship_bin: PathBuf,
    use_fio: bool,
    keep: bool,
    timeout: Duration,
    filters: Vec<String>,
    send_extra: Vec<String>,
    recv_extra: Vec<String>,
}

fn env_flag(name: &str) -> Option<bool> {
    std::env::var(name)
        .ok()
        .map(|v| !matches!(v.as_str(), "" | "0" | "false" | "no"))
}

fn target_dir() -> PathBuf {
    // The bench binary lives in <target>/release/deps/ship-HASH.
    if let Ok(dir) = std::env::var("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent()?.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let bytes = match std::env::var("WALSHIP_BENCH_BYTES") {
            Ok(v) => parse_size(&v)?,
            Err(_) => 2 * GIB,
        };
        let bytes = (bytes / SEGMENT_BYTES).max(1) * SEGMENT_BYTES;
        let reps = match std::env::var("WALSHIP_BENCH_REPS") {
            Ok(v) => v
                .parse::<usize>()
                .map_err(|_| format!("bad WALSHIP_BENCH_REPS {v:?}"))?
                .max(1),
            Err(_) => 3,
        };
        let timeout_s = match std::env::var("WALSHIP_BENCH_TIMEOUT_S") {
            Ok(v) => v
                .parse::<u64>()
                .map_err(|_| format!("bad WALSHIP_BENCH_TIMEOUT_S {v:?}"))?,
            Err(_) => 120 + bytes / 50_000_000,
        };
        let split = |name: &str| -> Vec<String> {
            std::env::var(name)
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        let filters = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        Ok(Config {
            bytes,
            reps,
            scratch_parent: std::env::var_os("WALSHIP_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| target_dir().join("bench-scratch")),
            results_dir: std::env::var_os("WALSHIP_BENCH_RESULTS")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results")),
            walship_bin: std::env::var_os("WALSHIP_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_walship"))),
            use_fio: env_flag("WALSHIP_BENCH_FIO").unwrap_or(true),
            keep: env_flag("WALSHIP_BENCH_KEEP").unwrap_or(false),
            timeout: Duration::from_secs(timeout_s),
            filters,
            send_extra: split("WALSHIP_BENCH_SEND_ARGS"),
            recv_extra: split("WALSHIP_BENCH_RECV_ARGS"),
        })
    }

    fn wants(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }
}

/// One measurement of one contender.
struct Measurement {
    name: &'static str,
    rep: usize,
    /// None: the contender ran and failed (error says why).
    error: Option<String>,
    bytes: u64,
    wall_s: f64,
    /// (process or thread label, cpu)
    cpu: Vec<(&'static str, Cpu)>,
    command: String,
    extra: Json,
}

impl Measurement {
    fn new(name: &'static str, rep: usize, bytes: u64) -> Measurement {
        Measurement {
            name,
            rep,
            error: None,
            bytes,
            wall_s: f64::NAN,
            cpu: Vec::new(),
            command: String::new(),
            extra: Json::obj(),
        }
    }
    fn failed(mut self, error: String) -> Measurement {
        self.error = Some(error);
        self
    }
    fn gbps(&self) -> f64 {
        if self.error.is_some() {
            f64::NAN
        } else {
            self.bytes as f64 / self.wall_s / GB
        }
    }
    fn cpu_s_per_gib(&self, cpu: &Cpu) -> f64 {
        cpu.total_s() / (self.bytes as f64 / GIB as f64)
    }
    fn to_json(&self) -> Json {
        let mut j = Json::obj();
        j.set("name", self.name)
            .set("rep", self.rep)
            .set("ok", self.error.is_none());
        j.set("error", self.error.clone());
        j.set("bytes", self.bytes)
            .set("wall_s", self.wall_s)
            .set("gb_per_s", self.gbps());
        let cpu: Vec<Json> = self
            .cpu
            .iter()
            .map(|(label, c)| {
                let mut o = Json::obj();
                o.set("who", *label)
                    .set("user_s", c.user_s)
                    .set("sys_s", c.sys_s)
                    .set("cpu_s_per_gib", self.cpu_s_per_gib(c));
                o
            })
            .collect();
        j.set("cpu", cpu)
            .set("command", self.command.clone())
            .set("extra", self.extra.clone());
        j
    }
}

/// The WAL source every disk contender copies.
struct Source {
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// Bytes of WAL to ship (end_lsn - start of first_lsn's segment when gen-wal said so, else the files' total).
    wal_bytes: u64,
    first_lsn: Option<u64>,
    end_lsn: Option<u64>,
    /// Either "walship gen-wal" or why we made our own files.
    origin: String,
    gen_report: Json,
    /// Why walship cannot be measured, when it cannot.
    walship_unavailable: Option<String>,
}

fn parse_lsn(v: &Json) -> Option<u64> {
    match v {
        Json::Num(_) => v.as_u64(),
        Json::Str(s) => match s.split_once('/') {
            Some((hi, lo)) => Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?),
            None => s
                .parse()
                .ok()
                .or_else(|| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok()),
        },
        _ => None,
    }
}

fn make_source(cfg: &Config, root: &Path) -> Result<Source, String> {
    let dir = root.join("src");
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let mut cmd = Command::new(&cfg.walship_bin);
    cmd.arg("gen-wal")
        .arg("--dir")
        .arg(&dir)
        .arg("--wal-bytes")
        .arg(cfg.bytes.to_string())
        .args(["--seed", "1"]);
    let command = cmd_line(&cmd);
    let gen = run(&mut cmd, root, "gen-wal", cfg.timeout);
    let failure = match &gen {
        Ok(f) if f.ok() => match json::parse_lenient(&f.stdout) {
            Ok(report) => {
                let files = list_files(&dir).map_err(|e| e.to_string())?;
                // gen-wal's first_lsn is its first record, just past the long page header; the sender
                // ships whole segments from the segment start, so count (and verify) from there.
                let seg_size = files
                    .first()
                    .and_then(|p| p.metadata().ok())
                    .map_or(SEGMENT_BYTES, |m| m.len());
                let first_lsn = report.get("first_lsn").and_then(parse_lsn).map(|lsn| {
                    if seg_size.is_power_of_two() {
                        lsn - lsn % seg_size
                    } else {
                        lsn
                    }
                });
                let end_lsn = report.get("end_lsn").and_then(parse_lsn);
                let wal_bytes = match (first_lsn, end_lsn) {
                    (Some(a), Some(b)) if b > a => b - a,
                    _ => report.get("bytes").and_then(Json::as_u64).unwrap_or(0),
                };
                if files.is_empty() || wal_bytes == 0 {
                    Some(format!("gen-wal made no WAL (report: {})", tail(&f.stdout, 300)))
                } else {
                    let mut gen_report = report.clone();
                    if let Json::Obj(_) = gen_report {
                        gen_report
                            .set("command", command.clone())
                            .set("wall_s", f.wall.as_secs_f64());
                    }
                    return Ok(Source {
                        dir,
                        files,
                        wal_bytes,
                        first_lsn,
                        end_lsn,
                        origin: "walship gen-wal".into(),
                        gen_report,
                        walship_unavailable: None,
                    });
                }
            }
            Err(e) => Some(format!(
                "gen-wal printed no JSON report ({e}): {}",
                tail(&f.stdout, 300)
            )),
        },
        Ok(f) => Some(format!("`{command}` failed: {}", f.describe_failure())),
        Err(e) => Some(format!("`{command}` could not start: {e}")),
    };
    let why = failure.expect("set on every non-returning path");
    eprintln!("ship bench: walship unavailable ({why}); using synthetic 16 MiB files for the baselines");
    // Our own segment-sized files so baselines 1-3 still run; walship is reported as skipped.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; SEGMENT_BYTES as usize];
    let segments = cfg.bytes / SEGMENT_BYTES;
    for i in 0..segments {
        fill_pattern(&mut buf, 0x9E37_79B9_7F4A_7C15 ^ i);
        let name = format!("{:08X}{:08X}{:08X}", 1, (i + 1) >> 8, (i + 1) & 0xFF);
        std::fs::write(dir.join(name), &buf).map_err(|e| e.to_string())?;
    }
    let files = list_files(&dir).map_err(|e| e.to_string())?;
    Ok(Source {
        dir,
        files,
        wal_bytes: cfg.bytes,
        first_lsn: None,
        end_lsn: None,
        origin: format!("synthetic (not WAL): {why}"),
        gen_report: Json::Null,
        walship_unavailable: Some(why),
    })
}

// ---------------------------------------------------------------------------------------------
// 1. raw loopback TCP

fn bench_raw_tcp(bytes: u64, rep: usize) -> Measurement {
    let m = Measurement::new("raw_tcp", rep, bytes);
    match raw_tcp(bytes) {
        Ok((wall, send_cpu, recv_cpu)) => {
            let mut m = m;
            m.wall_s = wall.as_secs_f64();
            m.cpu = vec![("sender_thread", send_cpu), ("receiver_thread", recv_cpu)];
            m.command = "in-bench std::net: 1 MiB blocking write -> 127.0.0.1 -> 1 MiB read, discard".into();
            m
        }
        Err(e) => m.failed(format!("raw tcp: {e}")),
    }
}

fn raw_tcp(bytes: u64) -> std::io::Result<(Duration, Cpu, Cpu)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<(u64, Cpu, Instant)> {
        let (mut sock, _) = listener.accept()?;
        let cpu0 = thread_cpu();
        let mut buf = vec![0u8; IO_BYTES];
        let mut total = 0u64;
        loop {
            let n = sock.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        Ok((total, thread_cpu().minus(&cpu0), Instant::now()))
    });
    let mut sock = TcpStream::connect(addr)?;
    let mut buf = vec![0u8; IO_BYTES];
    fill_pattern(&mut buf, 7);
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(IO_BYTES as u64) as usize;
        sock.write_all(&buf[..n])?;
        left -= n as u64;
    }
    sock.shutdown(Shutdown::Write)?;
    let send_cpu = thread_cpu().minus(&cpu0);
    let (got, recv_cpu, end) = receiver
        .join()
        .map_err(|_| std::io::Error::other("receiver thread panicked"))??;
    if got != bytes {
        return Err(std::io::Error::other(format!("receiver got {got} of {bytes} bytes")));
    }
    Ok((end - start, send_cpu, recv_cpu))
}

// ---------------------------------------------------------------------------------------------
// 2. raw O_DIRECT sequential write

fn bench_odirect_fio(cfg: &Config, root: &Path, dst: &Path, bytes: u64, rep: usize) -> Measurement {
    let m = Measurement::new("raw_odirect_fio", rep, bytes);
    let files = bytes / SEGMENT_BYTES;
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=walship-odirect",
        "--ioengine=io_uring",
        "--direct=1",
        "--bs=1m",
        "--iodepth=16",
    ])
    .args([
        "--rw=write",
        "--filesize=16m",
        "--file_service_type=sequential",
        "--end_fsync=1",
    ])
    .arg(format!("--directory={}", dst.display()))
    .arg(format!("--size={bytes}"))
    .arg(format!("--nrfiles={files}"))
    .arg("--output-format=json");
    let mut m = m;
    m.command = cmd_line(&cmd);
    let f = match run(&mut cmd, root, &format!("fio-{rep}"), cfg.timeout) {
        Ok(f) => f,
        Err(e) => return m.failed(format!("fio could not start: {e}")),
    };
    if !f.ok() {
        return m.failed(format!("fio failed: {}", f.describe_failure()));
    }
    let written = dir_bytes(dst).unwrap_or(0);
    if written != bytes {
        return m.failed(format!(
            "fio left {written} bytes in {}, expected {bytes}",
            dst.display()
        ));
    }
    m.cpu = vec![("fio", f.cpu)];
    m.extra.set("process_wall_s", f.wall.as_secs_f64());
    m.extra
        .set("process_wall_gb_per_s", bytes as f64 / f.wall.as_secs_f64() / GB);
    let report = match json::parse_lenient(&f.stdout) {
        Ok(r) => r,
        Err(e) => return m.failed(format!("fio printed no JSON report ({e})")),
    };
    // fio's own job runtime: its process wall time carries ~0.25 s of fixed start-up (fork, file
    // layout, status thread) that is no part of writing to the disk and would swamp small runs.
    let runtime_ms = report
        .path(&["jobs", "0", "write", "runtime"])
        .and_then(Json::as_u64)
        .unwrap_or(0);
    if runtime_ms == 0 {
        return m.failed("fio JSON has no jobs[0].write.runtime".into());
    }
    m.wall_s = runtime_ms as f64 / 1e3;
    let bw = report.path(&["jobs", "0", "write", "bw_bytes"]).and_then(Json::as_f64);
    m.extra.set("fio_reported_gb_per_s", bw.map(|b| b / GB));
    m.extra.set("fio_job_runtime_ms", runtime_ms);
    m.extra
        .set("fio_version", report.get("fio version").cloned().unwrap_or(Json::Null));
    m.extra.set(
        "note",
        "wall_s = fio's job runtime (1 ms resolution); process_wall_s includes fio start-up",
    );
    m
}

fn bench_odirect_rust(dst: &Path, bytes: u64, rep: usize, buf: &AlignedBuf) -> Measurement {
    let mut m = Measurement::new("raw_odirect_rust", rep, bytes);
    m.command = "in-bench: O_DIRECT pwrite 1 MiB (4 KiB-aligned buffer), fdatasync per 16 MiB file, fsync dir".into();
    let cpu0 = thread_cpu();
    let start = Instant::now();
    if let Err(e) = odirect_write_files(dst, bytes / SEGMENT_BYTES, SEGMENT_BYTES, buf) {
        return m.failed(format!("O_DIRECT write into {}: {e}", dst.display()));
    }
    m.wall_s = start.elapsed().as_secs_f64();
    m.cpu = vec![("bench_thread", thread_cpu().minus(&cpu0))];
    m
}

// ---------------------------------------------------------------------------------------------
// 3. cp + sync

fn bench_cp_sync(cfg: &Config, root: &Path, src: &Source, dst: &Path, rep: usize) -> Measurement {
    let bytes: u64 = src
        .files
        .iter()
        .map(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut m = Measurement::new("cp_sync", rep, bytes);
    let mut cp = Command::new("cp");
    cp.arg("--").args(&src.files).arg(dst);
    m.command = format!("cp -- {}/* {} && sync", src.dir.display(), dst.display());
    let start = Instant::now();
    let f = match run(&mut cp, root, &format!("cp-{rep}"), cfg.timeout) {
        Ok(f) if f.ok() => f,
        Ok(f) => return m.failed(format!("cp failed: {}", f.describe_failure())),
        Err(e) => return m.failed(format!("cp could not start: {e}")),
    };
    let s = match run(&mut Command::new("sync"), root, &format!("sync-{rep}"), cfg.timeout) {
        Ok(s) if s.ok() => s,
        Ok(s) => return m.failed(format!("sync failed: {}", s.describe_failure())),
        Err(e) => return m.failed(format!("sync could not start: {e}")),
    };
    m.wall_s = start.elapsed().as_secs_f64();
    m.cpu = vec![("cp", f.cpu), ("sync", s.cpu)];
    m.extra
        .set("cp_wall_s", f.wall.as_secs_f64())
        .set("sync_wall_s", s.wall.as_secs_f64());
    let copied = dir_bytes(dst).unwrap_or(0);
    if copied != bytes {
        return m.failed(format!("cp left {copied} bytes, expected {bytes}"));
    }
    m
}

// ---------------------------------------------------------------------------------------------
// 4. walship end to end

fn bench_walship(cfg: &Config, root: &Path, src: &Source, dst: &Path, rep: usize) -> Measurement {
    let mut m = Measurement::new("walship", rep, src.wal_bytes);
    if let Some(why) = &src.walship_unavailable {
        return m.failed(format!("skipped: {why}"));
    }
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => return m.failed(format!("no free port: {e}")),
    };
    let addr = format!("127.0.0.1:{port}");
    let report_path = root.join(format!("send-report-{rep}.json"));
    let mut recv_cmd = Command::new(&cfg.walship_bin);
    recv_cmd
        .args(["recv", "--listen", &addr, "--dir"])
        .arg(dst)
        .args(&cfg.recv_extra);
    let mut send_cmd = Command::new(&cfg.walship_bin);
    send_cmd
        .args(["send", "--pg-wal"])
        .arg(&src.dir)
        .args(["--to", &addr, "--once", "--report-json"])
        .arg(&report_path)
        .args(&cfg.send_extra);
    m.command = format!("{} & {}", cmd_line(&recv_cmd), cmd_line(&send_cmd));

    let recv = match spawn(&mut recv_cmd, root, &format!("recv-{rep}")) {
        Ok(r) => r,
        Err(e) => return m.failed(format!("walship recv could not start: {e}")),
    };
    let listen_deadline = Instant::now() + LISTEN_WAIT;
    while !tcp_listening(port) {
        if recv.exited() || Instant::now() > listen_deadline {
            recv.signal(libc::SIGKILL);
            let f = recv.wait(RECV_STOP_WAIT);
            let detail = f.map(|f| f.describe_failure()).unwrap_or_else(|e| e.to_string());
            return m.failed(format!("walship recv never listened on {addr}: {detail}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    let send = spawn(&mut send_cmd, root, &format!("send-{rep}")).and_then(|s| s.wait(cfg.timeout));
    let recv_cpu_at_send_exit = proc_cpu(recv.pid);
    recv.signal(libc::SIGTERM);
    let recv_done = recv.wait(RECV_STOP_WAIT);

    let send = match send {
        Ok(s) if s.ok() => s,
        Ok(s) => {
            let recv_err = recv_done.map(|r| tail(&r.stderr, 400)).unwrap_or_default();
            return m.failed(format!(
                "walship send failed: {}; recv stderr tail: {recv_err}",
                s.describe_failure()
            ));
        }
        Err(e) => return m.failed(format!("walship send could not run: {e}")),
    };
    m.wall_s = send.wall.as_secs_f64();
    m.cpu.push(("walship_send", send.cpu));
    match &recv_done {
        Ok(r) => {
            // Prefer the /proc snapshot taken the moment send exited; rusage covers the drain too.
            m.cpu.push(("walship_recv", recv_cpu_at_send_exit.unwrap_or(r.cpu)));
            m.extra.set("recv_exit", r.exit_code.map(|c| c as u64));
            m.extra.set("recv_signal", r.signal.map(|c| c as u64));
            m.extra.set("recv_cpu_total_s", r.cpu.total_s());
        }
        Err(e) => {
            m.extra.set("recv_wait_error", e.to_string());
        }
    }
    match std::fs::read_to_string(&report_path) {
        Ok(text) => {
            let report = Json::parse(text.trim()).unwrap_or(Json::Str(text));
            if let Some(b) = report.get("bytes").and_then(Json::as_u64) {
                if b != src.wal_bytes {
                    m.extra.set("send_report_bytes_differs", b);
                }
            }
            m.extra.set("send_report", report);
        }
        Err(e) => {
            m.extra
                .set("send_report_error", format!("{}: {e}", report_path.display()));
        }
    }
    // Durability is walship's claim; here we check that what it acked is what the source held.
    match verify_shipped(src, dst) {
        Ok(n) => {
            m.extra.set("verified_bytes", n);
        }
        Err(e) => return m.failed(format!("shipped data differs from the source: {e}")),
    }
    m
}

/// Compare the WAL range [first_lsn, end_lsn) of every source segment with the receiver's copy
/// (NAME, else NAME.partial). Without LSNs from gen-wal, compare whole files.
fn verify_shipped(src: &Source, dst: &Path) -> Result<u64, String> {
    let mut compared = 0u64;
    let mut a = vec![0u8; IO_BYTES];
    let mut b = vec![0u8; IO_BYTES];
    for path in &src.files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.len() != 24 || !name.bytes().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        let seg_size = path.metadata().map_err(|e| e.to_string())?.len();
        if !seg_size.is_power_of_two() {
            return Err(format!("{name}: size {seg_size} is not a power of two"));
        }
        let log = u64::from_str_radix(&name[8..16], 16).map_err(|e| e.to_string())?;
        let seg = u64::from_str_radix(&name[16..24], 16).map_err(|e| e.to_string())?;
        let seg_start = (log * (0x1_0000_0000 / seg_size) + seg) * seg_size;
        let lo = src.first_lsn.map_or(seg_start, |f| f.max(seg_start));
        let hi = src
            .end_lsn
            .map_or(seg_start + seg_size, |e| e.min(seg_start + seg_size));
        if lo >= hi {
            continue;
        }
        let theirs = [dst.join(name), dst.join(format!("{name}.partial"))]
            .into_iter()
            .find(|p| p.exists())
            .ok_or_else(|| format!("{name}: missing in {}", dst.display()))?;
        let fa = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let fb = std::fs::File::open(&theirs).map_err(|e| e.to_string())?;
        let mut off = lo - seg_start;
        let end = hi - seg_start;
        while off < end {
            let n = ((end - off) as usize).min(IO_BYTES);
            use std::os::unix::fs::FileExt;
            fa.read_exact_at(&mut a[..n], off)
                .map_err(|e| format!("{name} source @{off}: {e}"))?;
            fb.read_exact_at(&mut b[..n], off)
                .map_err(|e| format!("{} @{off}: {e}", theirs.display()))?;
            if a[..n] != b[..n] {
                let i = a[..n].iter().zip(&b[..n]).position(|(x, y)| x != y).unwrap_or(0);
                return Err(format!(
                    "{}: first difference at offset {}",
                    theirs.display(),
                    off + i as u64
                ));
            }
            off += n as u64;
            compared += n as u64;
        }
    }
    if compared != src.wal_bytes {
        return Err(format!(
            "compared {compared} bytes, source range holds {}",
            src.wal_bytes
        ));
    }
    Ok(compared)
}

// ---------------------------------------------------------------------------------------------
// Report

struct Summary {
    name: &'static str,
    label: &'static str,
    ok_runs: usize,
    runs: usize,
    gbps_median: f64,
    gbps_min: f64,
    gbps_max: f64,
    wall_median_s: f64,
    cpu_per_gib: Vec<(&'static str, f64)>,
    error: Option<String>,
}

fn label_of(name: &str) -> &'static str {
    match name {
        "raw_tcp" => "raw loopback TCP (1 MiB blocking writes, no disk)",
        "raw_odirect_fio" => "raw O_DIRECT write: fio io_uring QD16 1 MiB, 16 MiB files",
        "raw_odirect_rust" => "raw O_DIRECT write: Rust pwrite 1 MiB + fdatasync/file",
        "cp_sync" => "cp + sync (source hot in page cache)",
        "walship" => "walship send -> recv, durable (ack flushed == end)",
        "pg_receivewal" => "pg_receivewal",
        _ => "?",
    }
}

fn summarize(name: &'static str, all: &[Measurement]) -> Option<Summary> {
    let runs: Vec<&Measurement> = all.iter().filter(|m| m.name == name).collect();
    if runs.is_empty() {
        return None;
    }
    let ok: Vec<&&Measurement> = runs.iter().filter(|m| m.error.is_none()).collect();
    let mut gbps: Vec<f64> = ok.iter().map(|m| m.gbps()).collect();
    let mut walls: Vec<f64> = ok.iter().map(|m| m.wall_s).collect();
    let mut cpu_per_gib = Vec::new();
    if let Some(first) = ok.first() {
        for (i, (who, _)) in first.cpu.iter().enumerate() {
            let mut v: Vec<f64> = ok
                .iter()
                .filter_map(|m| m.cpu.get(i).map(|(_, c)| m.cpu_s_per_gib(c)))
                .collect();
            cpu_per_gib.push((*who, median(&mut v)));
        }
    }
    Some(Summary {
        name,
        label: label_of(name),
        ok_runs: ok.len(),
        runs: runs.len(),
        gbps_min: gbps.iter().cloned().fold(f64::INFINITY, f64::min),
        gbps_max: gbps.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        gbps_median: median(&mut gbps),
        wall_median_s: median(&mut walls),
        cpu_per_gib,
        error: runs.iter().find_map(|m| m.error.clone()),
    })
}

fn fmt_gbps(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}")
    } else {
        "—".into()
    }
}

fn main() {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ship bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = bench(&cfg) {
        eprintln!("ship bench: {e}");
        std::process::exit(1);
    }
}

fn bench(cfg: &Config) -> Result<(), String> {
    let date = command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into());
    let date_compact: String = date.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let manifest = env!("CARGO_MANIFEST_DIR");
    let commit =
        command_output("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let dirty = command_output(
        "git",
        &["-C", manifest, "status", "--porcelain", "--untracked-files=no"],
    )
    .map(|s| !s.is_empty());
    let fio_version = if cfg.use_fio {
        command_output("fio", &["--version"])
    } else {
        None
    };

    std::fs::create_dir_all(&cfg.scratch_parent)
        .map_err(|e| format!("create {}: {e}", cfg.scratch_parent.display()))?;
    let fs = fs_type(&cfg.scratch_parent);
    if fs == "tmpfs" {
        return Err(format!(
            "{} is on tmpfs, which refuses O_DIRECT and measures no disk: set WALSHIP_BENCH_DIR to a real filesystem",
            cfg.scratch_parent.display()
        ));
    }
    // Scratch dirs of earlier runs that died (their pid is gone) would eat the disk: remove them.
    if let Ok(entries) = std::fs::read_dir(&cfg.scratch_parent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix("ship-").and_then(|p| p.parse::<u32>().ok()) {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    eprintln!("ship bench: removing stale scratch dir {}", entry.path().display());
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
    }
    let root = cfg.scratch_parent.join(format!("ship-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let root = root.canonicalize().map_err(|e| e.to_string())?;
    let load_start = loadavg();
    eprintln!(
        "ship bench: {} x {} reps, scratch {} ({fs}), walship {}, fio {}",
        human_bytes(cfg.bytes),
        cfg.reps,
        root.display(),
        cfg.walship_bin.display(),
        fio_version.as_deref().unwrap_or("not used"),
    );

    let result = run_all(cfg, &root, fio_version.is_some());
    let (measurements, source) = match result {
        Ok(v) => v,
        Err(e) => {
            if !cfg.keep {
                let _ = std::fs::remove_dir_all(&root);
            }
            return Err(e);
        }
    };
    let load_end = loadavg();

    // ---- summaries and ratios
    let names = ["raw_tcp", "raw_odirect_fio", "raw_odirect_rust", "cp_sync", "walship"];
    let summaries: Vec<Summary> = names.iter().filter_map(|n| summarize(n, &measurements)).collect();
    let med = |n: &str| {
        summaries
            .iter()
            .find(|s| s.name == n)
            .map_or(f64::NAN, |s| s.gbps_median)
    };
    let odirect_name = if med("raw_odirect_fio").is_finite() {
        "raw_odirect_fio"
    } else {
        "raw_odirect_rust"
    };
    let (tcp, odirect, cp, ws) = (med("raw_tcp"), med(odirect_name), med("cp_sync"), med("walship"));
    let raw_floor = tcp.min(odirect);
    let ratio_raw = ws / raw_floor;
    let ratio_cp = ws / cp;

    // ---- JSON
    let mut env = Json::obj();
    env.set("date", date.clone())
        .set("git_commit", commit.clone())
        .set("git_dirty", dirty)
        .set("kernel", command_output("uname", &["-r"]))
        .set("cpu_model", cpu_model())
        .set(
            "nproc",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        )
        .set("scratch_dir", root.display().to_string())
        .set("scratch_fs", fs.clone())
        .set("loadavg_start", load_start.clone())
        .set("loadavg_end", load_end.clone())
        .set("fio_version", fio_version.clone())
        .set("walship_bin", cfg.walship_bin.display().to_string());
    let mut config = Json::obj();
    config
        .set("bytes", cfg.bytes)
        .set("reps", cfg.reps)
        .set("segment_bytes", SEGMENT_BYTES)
        .set("io_bytes", IO_BYTES)
        .set("units", "GB/s = 1e9 bytes/s; CPU s per GiB (2^30 bytes)")
        .set(
            "filters",
            cfg.filters.iter().map(|f| Json::from(f.as_str())).collect::<Vec<_>>(),
        )
        .set("command", std::env::args().collect::<Vec<_>>().join(" "));
    let mut src_json = Json::obj();
    src_json
        .set("origin", source.origin.clone())
        .set("files", source.files.len())
        .set("wal_bytes", source.wal_bytes)
        .set("gen_wal_report", source.gen_report.clone());
    let mut summary_json = Json::obj();
    for s in &summaries {
        let mut o = Json::obj();
        o.set("label", s.label)
            .set("ok_runs", s.ok_runs)
            .set("runs", s.runs)
            .set("gb_per_s_median", s.gbps_median)
            .set("gb_per_s_min", if s.ok_runs > 0 { s.gbps_min } else { f64::NAN })
            .set("gb_per_s_max", if s.ok_runs > 0 { s.gbps_max } else { f64::NAN })
            .set("wall_s_median", s.wall_median_s)
            .set("error", s.error.clone());
        let mut cpu = Json::obj();
        for (who, v) in &s.cpu_per_gib {
            cpu.set(who, *v);
        }
        o.set("cpu_s_per_gib_median", cpu);
        summary_json.set(s.name, o);
    }
    let pg_skip = "skipped: pg_receivewal comparison not implemented yet (TODO: start a PostgreSQL server, \
                   stream the same WAL with pg_receivewal --synchronous into a fresh dir)";
    let mut pg = Json::obj();
    pg.set("label", "pg_receivewal").set("skipped", pg_skip);
    summary_json.set("pg_receivewal", pg);
    let mut ratios = Json::obj();
    ratios
        .set("raw_odirect_used", odirect_name)
        .set("walship_over_min_raw_tcp_raw_odirect", ratio_raw)
        .set("walship_over_cp_sync", ratio_cp);
    let mut out = Json::obj();
    out.set("bench", "ship")
        .set("environment", env)
        .set("config", config)
        .set("source", src_json)
        .set("summary", summary_json)
        .set("ratios", ratios)
        .set(
            "measurements",
            measurements.iter().map(Measurement::to_json).collect::<Vec<_>>(),
        );

    std::fs::create_dir_all(&cfg.results_dir).map_err(|e| format!("create {}: {e}", cfg.results_dir.display()))?;
    let json_path = cfg.results_dir.join(format!("ship-{date_compact}.json"));
    std::fs::write(&json_path, out.pretty()).map_err(|e| format!("write {}: {e}", json_path.display()))?;

    // ---- Markdown
    let mut md = String::new();
    md.push_str(&format!(
        "\n## ship — {date} — {commit}{} — {} × {} rep(s)\n\n",
        if dirty == Some(true) { "-dirty" } else { "" },
        human_bytes(cfg.bytes),
        cfg.reps
    ));
    md.push_str(&format!(
        "Kernel {}, {} ({} cores), scratch on {fs}; load avg {load_start} → {load_end}. Source: {} ({} files). \
         GB/s = 10^9 B/s, median of the reps (min–max). The source is hot in the page cache for every contender; \
         no caches dropped. Raw JSON: `{}`.\n\n",
        command_output("uname", &["-r"]).unwrap_or_default(),
        cpu_model(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        source.origin,
        source.files.len(),
        json_path.file_name().unwrap().to_string_lossy(),
    ));
    md.push_str("| contender | GB/s | min–max | wall s | CPU s/GiB | ok |\n|---|---:|---:|---:|---|---:|\n");
    for s in &summaries {
        let cpu = s
            .cpu_per_gib
            .iter()
            .map(|(w, v)| format!("{w} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ");
        let range = if s.ok_runs > 0 {
            format!("{}–{}", fmt_gbps(s.gbps_min), fmt_gbps(s.gbps_max))
        } else {
            "—".into()
        };
        let note = match (&s.error, s.ok_runs) {
            (Some(e), 0) => format!(" ({})", tail(e, 160).replace('|', "/")),
            _ => String::new(),
        };
        md.push_str(&format!(
            "| {}{} | {} | {} | {} | {} | {}/{} |\n",
            s.label,
            note,
            fmt_gbps(s.gbps_median),
            range,
            if s.wall_median_s.is_finite() {
                format!("{:.2}", s.wall_median_s)
            } else {
                "—".into()
            },
            if cpu.is_empty() { "—".into() } else { cpu },
            s.ok_runs,
            s.runs
        ));
    }
    md.push_str("| pg_receivewal (skipped: TODO, not implemented yet) | — | — | — | — | 0/0 |\n\n");
    md.push_str(&format!(
        "Ratios: walship / min(raw TCP, raw O_DIRECT [{odirect_name}]) = **{}**; walship / (cp + sync) = **{}**.\n",
        if ratio_raw.is_finite() {
            format!("{ratio_raw:.2}")
        } else {
            "n/a".into()
        },
        if ratio_cp.is_finite() {
            format!("{ratio_cp:.2}")
        } else {
            "n/a".into()
        },
    ));
    let report_path = cfg.results_dir.join("REPORT.md");
    let mut report = std::fs::read_to_string(&report_path).unwrap_or_default();
    if report.is_empty() {
        report.push_str("# walship measured reports\n\nEach section: one run of `cargo bench --bench ship` (see `tools/bench.sh`).\n");
    }
    report.push_str(&md);
    std::fs::write(&report_path, report).map_err(|e| format!("write {}: {e}", report_path.display()))?;
    println!("{md}");
    println!("{pg_skip}");
    println!("results: {} and {}", json_path.display(), report_path.display());

    if cfg.keep {
        eprintln!("ship bench: kept scratch dir {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
        sync_all_fs();
    }
    Ok(())
}

fn fresh_dir(root: &Path, name: &str) -> Result<PathBuf, String> {
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    sync_all_fs();
    Ok(dir)
}

fn drop_dir(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
    sync_all_fs();
}

fn run_all(cfg: &Config, root: &Path, fio: bool) -> Result<(Vec<Measurement>, Source), String> {
    let disk_needed = cfg.wants("cp_sync") || cfg.wants("walship");
    let source = if disk_needed {
        let t = Instant::now();
        let s = make_source(cfg, root)?;
        sync_all_fs();
        let warmed = warm(&s.files).map_err(|e| format!("read source: {e}"))?;
        eprintln!(
            "ship bench: source {} files, {} WAL bytes ({}) ready in {:.1} s, {warmed} bytes warmed",
            s.files.len(),
            s.wal_bytes,
            s.origin,
            t.elapsed().as_secs_f64()
        );
        s
    } else {
        Source {
            dir: root.join("src"),
            files: Vec::new(),
            wal_bytes: cfg.bytes,
            first_lsn: None,
            end_lsn: None,
            origin: "none (no disk contender selected)".into(),
            gen_report: Json::Null,
            walship_unavailable: Some("not selected".into()),
        }
    };
    let mut buf = AlignedBuf::new(IO_BYTES, ODIRECT_ALIGN);
    fill_pattern(buf.as_mut_slice(), 11);

    let mut all = Vec::new();
    let mut report = |m: Measurement| {
        match &m.error {
            None => eprintln!(
                "  rep {} {:<17} {:>6.2} GB/s  {:>6.2} s  cpu {}",
                m.rep,
                m.name,
                m.gbps(),
                m.wall_s,
                m.cpu
                    .iter()
                    .map(|(w, c)| format!("{w} {:.2}s", c.total_s()))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            Some(e) if e.starts_with("skipped") => eprintln!("  rep {} {:<17} {}", m.rep, m.name, tail(e, 400)),
            Some(e) => eprintln!("  rep {} {:<17} FAILED: {}", m.rep, m.name, tail(e, 400)),
        }
        all.push(m);
    };
    for rep in 0..cfg.reps {
        if cfg.wants("raw_tcp") {
            report(bench_raw_tcp(cfg.bytes, rep));
        }
        if fio && cfg.wants("raw_odirect_fio") {
            let dst = fresh_dir(root, "dst-fio")?;
            report(bench_odirect_fio(cfg, root, &dst, cfg.bytes, rep));
            drop_dir(&dst);
        }
        if cfg.wants("raw_odirect_rust") {
            let dst = fresh_dir(root, "dst-odirect")?;
            report(bench_odirect_rust(&dst, cfg.bytes, rep, &buf));
            drop_dir(&dst);
        }
        if cfg.wants("cp_sync") {
            let dst = fresh_dir(root, "dst-cp")?;
            report(bench_cp_sync(cfg, root, &source, &dst, rep));
            drop_dir(&dst);
        }
        if cfg.wants("walship") {
            let dst = fresh_dir(root, "dst-walship")?;
            report(bench_walship(cfg, root, &source, &dst, rep));
            drop_dir(&dst);
        }
    }
    if cfg.wants("pg_receivewal") {
        eprintln!("  pg_receivewal: skipped: not implemented yet (TODO)");
    }
    Ok((all, source))
}
