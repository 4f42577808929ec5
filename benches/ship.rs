//! End-to-end WAL shipping throughput, side by side with its baselines, in one run.
//!
//! Contenders (each measured `reps` times, interleaved, medians reported):
//! 1. `raw_tcp`: loopback TCP, a sender thread doing blocking 1 MiB writes from a pre-filled buffer,
//!    a receiver thread reading into 1 MiB and discarding. No disk.
//! 2. `raw_odirect_fio`: `fio` io_uring, O_DIRECT, 1 MiB, depth 16, 16 MiB files, end_fsync (if fio is
//!    installed); `raw_durable_fio`, the durable ceiling: the same into fresh 16 MiB files one
//!    at a time, each fsynced before the next (what a durable WAL receiver must at least do; the
//!    throughput target is against min(raw TCP, this)); and `raw_odirect_rust`: O_DIRECT pwrite loop from an aligned 1 MiB buffer, one
//!    fdatasync per 16 MiB file. No network. "raw O_DIRECT" in the ratios is fio when it ran, else Rust.
//! 3. `cp_sync`: `cp` of the segment files into a fresh directory, then `sync`.
//! 4. `walship`: `walship recv` and `walship send --once` as two processes; durable throughput =
//!    bytes / wall seconds of the send command (it exits only once the receiver acked flushed == end).
//!    The receiver's `--report-json` file (writes, fdatasyncs, batches, fdatasync p50/p99/max, stalls) is read.
//!    `walship_tls`: the same over TLS 1.3 (`--tls-cert/--tls-key` on recv, `--tls-ca` on send; a
//!    throw-away self-signed certificate): the cost of encryption, as a ratio to `walship`.
//! 5. `walship_sweep` (WALSHIP_BENCH_SWEEP=1): walship with one knob changed at a time: `--zero-copy
//!    on|off|auto`, `--frame-bytes 256KiB|1MiB|4MiB`, `--in-flight-bytes-max 32MiB|128MiB|512MiB`,
//!    recv `--fsync-batch-bytes 1MiB|16MiB|64MiB`, recv `--fsync-interval-us 200|1000|5000`,
//!    recv `--write-mode direct|buffered` (O_DIRECT vs the page cache, fdatasync either way).
//! 6. Real WAL (PostgreSQL installed, run as root; `common::pg`): initdb a throw-away cluster, one physical
//!    slot per rep BEFORE the load, `pgbench -i -s N` + `pgbench -T 5`, `pg_switch_wal()`: the complete
//!    segments [slot start, flush LSN) are the bytes every real contender moves.
//!    - `pg_receivewal`: `--slot -E <flush lsn> --no-loop` from the running server, then `sync`; CPU of
//!      pg_receivewal (wait4) and of its walsender backend (polled from /proc/<pid>/stat).
//!    - then the server stops; `real_cp_sync` and `real_walship` use a copy of its pg_wal;
//!    - `pgbackrest_sync`, `pgbackrest_async_none`, `pgbackrest_async_lz4` (`pgbackrest` installed):
//!      `archive-push` of each segment of the stopped cluster's pg_wal into a local posix repo (`.ready`
//!      files as PostgreSQL's archiver leaves them); async with process-max 2. The async daemon's CPU is
//!      collected exactly: the bench is its subreaper and wait4s it.
//!
//! Outputs: `results/ship-<date>.json`, `results/ship-<date>-throughput.svg`, `-fdatasync.svg`, and a
//! section appended to `results/REPORT.md` with the targets (met / not met) and the criterion micro
//! results found under `<target>/criterion`.
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
//! - `WALSHIP_BENCH_SWEEP=1` run the sweep (`WALSHIP_BENCH_SWEEP_REPS`, default 1)
//! - `WALSHIP_BENCH_PG=0` skip the real-WAL contenders; `WALSHIP_BENCH_PG_BYTES` real WAL size (default 1GiB)
//!
//! Arguments after `--` are contender-name filters (substring match), e.g.
//! `cargo bench --bench ship -- raw_tcp cp_sync`.

mod common;

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
    sweep: bool,
    sweep_reps: usize,
    pg: bool,
    pg_bytes: u64,
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
            sweep: env_flag("WALSHIP_BENCH_SWEEP").unwrap_or(false),
            sweep_reps: match std::env::var("WALSHIP_BENCH_SWEEP_REPS") {
                Ok(v) => v
                    .parse::<usize>()
                    .map_err(|_| format!("bad WALSHIP_BENCH_SWEEP_REPS {v:?}"))?
                    .max(1),
                Err(_) => 1,
            },
            pg: env_flag("WALSHIP_BENCH_PG").unwrap_or(true),
            pg_bytes: match std::env::var("WALSHIP_BENCH_PG_BYTES") {
                Ok(v) => parse_size(&v)?,
                Err(_) => GIB,
            },
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
    /// Sweep point ("" for the default configuration).
    variant: String,
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
            variant: String::new(),
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
            .set("variant", self.variant.clone())
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
        Json::Number(_) => v.as_u64(),
        Json::String(s) => match s.split_once('/') {
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
        Ok(f) if f.ok() => match parse_json_lenient(&f.stdout) {
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
                    if let Json::Object(_) = gen_report {
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

/// `durable`: the durable ceiling (`raw_durable_fio`): what a durable WAL receiver must at least do.
/// O_DIRECT 1 MiB writes at QD16 into fresh 16 MiB files (new, never written; fio's layout
/// fallocates them, which makes the writes inline overwrites of unwritten extents), one file at a time (`--openfiles=1`), each file synced
/// before the next is written (`--fsync_on_close=1`: fio closes a file only once all its writes
/// completed, then fsyncs it synchronously; fio has no fdatasync-on-close, and for freshly
/// written extents the metadata makes both write the same). `--fdatasync=16` is not used: with
/// QD16, fio 3.33 issues that sync while the file's other writes are still in flight (seen in an
/// io_uring tracepoint trace), so it syncs nothing in particular. With sparse files
/// (`--fallocate=none`, as the receiver creates them) every write is punted to an io-wq thread.
/// Otherwise (`raw_odirect_fio`): today's row, all files open, one fsync at the end.
fn bench_odirect_fio(cfg: &Config, root: &Path, dst: &Path, bytes: u64, rep: usize, durable: bool) -> Measurement {
    let m = Measurement::new(if durable { "raw_durable_fio" } else { "raw_odirect_fio" }, rep, bytes);
    let files = bytes / SEGMENT_BYTES;
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=walship-odirect",
        "--ioengine=io_uring",
        "--direct=1",
        "--bs=1m",
        "--iodepth=16",
    ])
    .args(["--rw=write", "--filesize=16m", "--file_service_type=sequential"]);
    if durable {
        cmd.args(["--openfiles=1", "--fsync_on_close=1"]);
    } else {
        cmd.arg("--end_fsync=1");
    }
    cmd
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
    let report = match parse_json_lenient(&f.stdout) {
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

fn bench_cp_sync(cfg: &Config, root: &Path, src: &Source, dst: &Path, rep: usize, name: &'static str) -> Measurement {
    let bytes: u64 = src
        .files
        .iter()
        .map(|p| p.metadata().map(|m| m.len()).unwrap_or(0))
        .sum();
    let mut m = Measurement::new(name, rep, bytes);
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

#[allow(clippy::too_many_arguments)]
fn bench_walship(
    cfg: &Config,
    root: &Path,
    src: &Source,
    dst: &Path,
    rep: usize,
    name: &'static str,
    variant: &str,
    send_extra: &[String],
    recv_extra: &[String],
) -> Measurement {
    let mut m = Measurement::new(name, rep, src.wal_bytes);
    m.variant = variant.to_string();
    let tag = format!(
        "{name}{}{}-{rep}",
        if variant.is_empty() { "" } else { "-" },
        variant.replace([' ', '='], "_")
    );
    if let Some(why) = &src.walship_unavailable {
        return m.failed(format!("skipped: {why}"));
    }
    let port = match free_port() {
        Ok(p) => p,
        Err(e) => return m.failed(format!("no free port: {e}")),
    };
    let addr = format!("127.0.0.1:{port}");
    let report_path = root.join(format!("send-report-{tag}.json"));
    // Authenticated, as deployed (the handshake's HMAC costs nothing measurable).
    let key = root.join("walship-bench.key");
    if let Err(e) = std::fs::write(&key, "walship-bench-shared-key-0123456789\n") {
        return m.failed(format!("cannot write the auth key {}: {e}", key.display()));
    }
    let recv_report_path = root.join(format!("recv-report-{tag}.json"));
    let _ = std::fs::remove_file(&recv_report_path);
    let mut recv_cmd = Command::new(&cfg.walship_bin);
    recv_cmd
        .args(["recv", "--listen", &addr, "--dir"])
        .arg(dst)
        .arg("--report-json")
        .arg(&recv_report_path)
        .arg("--auth-key-file")
        .arg(&key)
        .args(recv_extra);
    let mut send_cmd = Command::new(&cfg.walship_bin);
    send_cmd
        .args(["send", "--pg-wal"])
        .arg(&src.dir)
        .args(["--to", &addr, "--once", "--report-json"])
        .arg(&report_path)
        .arg("--auth-key-file")
        .arg(&key)
        .args(send_extra);
    m.command = format!("{} & {}", cmd_line(&recv_cmd), cmd_line(&send_cmd));

    let recv = match spawn(&mut recv_cmd, root, &format!("recv-{tag}")) {
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

    let send = spawn(&mut send_cmd, root, &format!("send-{tag}")).and_then(|s| s.wait(cfg.timeout));
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
            m.extra.set("recv_summary", read_recv_report(&recv_report_path));
        }
        Err(e) => {
            m.extra.set("recv_wait_error", e.to_string());
        }
    }
    match std::fs::read_to_string(&report_path) {
        Ok(text) => {
            let report = Json::parse(text.trim()).unwrap_or(Json::String(text));
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
        "raw_durable_fio" => "durable ceiling: fio io_uring QD16 1 MiB, fresh 16 MiB files, fsync each before the next",
        "raw_odirect_rust" => "raw O_DIRECT write: Rust pwrite 1 MiB + fdatasync/file",
        "cp_sync" => "cp + sync (source hot in page cache)",
        "walship" => "walship send -> recv, durable (ack flushed == end)",
        "walship_tls" => "walship send -> recv over TLS 1.3 (AES-128-GCM), durable",
        "real_walship" => "walship send -> recv on the real WAL, durable",
        "real_cp_sync" => "cp + sync of the real WAL segments",
        "pg_receivewal" => "pg_receivewal --slot -E end (+ sync), from the running server",
        "pgbackrest_sync" => "pgBackRest archive-push, synchronous, compress none",
        "pgbackrest_async_none" => "pgBackRest archive-push async, process-max 2, compress none",
        "pgbackrest_async_lz4" => "pgBackRest archive-push async, process-max 2, lz4",
        "walship_sweep" => "walship sweep point",
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
    let (measurements, source, real_info) = match result {
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
    let names = [
        "raw_tcp",
        "raw_odirect_fio",
        "raw_durable_fio",
        "raw_odirect_rust",
        "cp_sync",
        "walship",
        "walship_tls",
        "real_walship",
        "real_cp_sync",
        "pg_receivewal",
        "pgbackrest_sync",
        "pgbackrest_async_none",
        "pgbackrest_async_lz4",
    ];
    let summaries: Vec<Summary> = names.iter().filter_map(|n| summarize(n, &measurements)).collect();
    let find = |n: &str| summaries.iter().find(|s| s.name == n);
    let med = |n: &str| find(n).map_or(f64::NAN, |s| s.gbps_median);
    let cpu_total = |n: &str| find(n).map_or(f64::NAN, |s| s.cpu_per_gib.iter().map(|(_, v)| v).sum::<f64>());
    let odirect_name = if med("raw_odirect_fio").is_finite() {
        "raw_odirect_fio"
    } else {
        "raw_odirect_rust"
    };
    let (tcp, odirect, cp, ws) = (med("raw_tcp"), med(odirect_name), med("cp_sync"), med("walship"));
    let raw_floor = tcp.min(odirect);
    // The durable ceiling: what a durable WAL receiver must at least do (fio, one fresh file at a
    // time, each synced before the next); without fio, the Rust pwrite + fdatasync-per-file row.
    let durable_name = if med("raw_durable_fio").is_finite() {
        "raw_durable_fio"
    } else {
        "raw_odirect_rust"
    };
    let durable = med(durable_name);
    let durable_floor = tcp.min(durable);
    let ws_real = med("real_walship");
    let pgbr_best = ["pgbackrest_sync", "pgbackrest_async_none", "pgbackrest_async_lz4"]
        .iter()
        .map(|n| (*n, med(n)))
        .filter(|(_, v)| v.is_finite())
        .fold(
            ("none", f64::NAN),
            |a, b| if a.1.is_finite() && a.1 >= b.1 { a } else { b },
        );
    let ws_real_cpu = find("real_walship").map_or(f64::NAN, |s| {
        s.cpu_per_gib
            .iter()
            .filter(|(w, _)| w.starts_with("walship"))
            .map(|(_, v)| v)
            .sum()
    });
    let pgrw_cpu = find("pg_receivewal").map_or(f64::NAN, |s| {
        s.cpu_per_gib.iter().filter(|(w, _)| *w != "sync").map(|(_, v)| v).sum()
    });
    // (target, threshold, measured, lower_is_better, what it compares)
    let targets: Vec<(&str, f64, f64, bool, String)> = vec![
        (
            "durable ship >= 0.9 x min(raw TCP, durable ceiling)",
            0.9,
            ws / durable_floor,
            false,
            format!(
                "walship {} / min(raw TCP {}, {durable_name} {}) on synthetic WAL (real WAL: {} = {:.2}x; {odirect_name}, no per-file sync: {})",
                fmt_gbps(ws),
                fmt_gbps(tcp),
                fmt_gbps(durable),
                fmt_gbps(ws_real),
                ws_real / durable_floor,
                fmt_gbps(odirect)
            ),
        ),
        (
            ">= 6 x pg_receivewal",
            6.0,
            ws_real / med("pg_receivewal"),
            false,
            format!("real WAL: walship {} / pg_receivewal {}", fmt_gbps(ws_real), fmt_gbps(med("pg_receivewal"))),
        ),
        (
            ">= 4 x cp + sync",
            4.0,
            ws_real / med("real_cp_sync"),
            false,
            format!(
                "real WAL: walship {} / cp+sync {} (synthetic: {} / {} = {:.2})",
                fmt_gbps(ws_real),
                fmt_gbps(med("real_cp_sync")),
                fmt_gbps(ws),
                fmt_gbps(cp),
                ws / cp
            ),
        ),
        (
            ">= 3 x best pgBackRest",
            3.0,
            ws_real / pgbr_best.1,
            false,
            format!("real WAL: walship {} / {} {}", fmt_gbps(ws_real), pgbr_best.0, fmt_gbps(pgbr_best.1)),
        ),
        (
            "CPU s/GiB (send+recv) < pg_receivewal + walsender",
            1.0,
            ws_real_cpu / pgrw_cpu,
            true,
            format!("real WAL: walship send+recv {ws_real_cpu:.3} s/GiB vs pg_receivewal+walsender {pgrw_cpu:.3} s/GiB (ratio shown)"),
        ),
    ];
    let verdict = |t: &(&str, f64, f64, bool, String)| -> &'static str {
        if !t.2.is_finite() {
            "not measured"
        } else if (t.3 && t.2 < t.1) || (!t.3 && t.2 >= t.1) {
            "MET"
        } else {
            "NOT MET"
        }
    };

    // fdatasync statistics of every walship run (receiver's last log line), median per (name, variant)
    let mut fsync_rows: Vec<(String, Json, u64)> = Vec::new();
    {
        let mut keys: Vec<(&str, String)> = Vec::new();
        for m in measurements
            .iter()
            .filter(|m| m.name.contains("walship") && m.error.is_none())
        {
            if !keys.iter().any(|(n, v)| *n == m.name && *v == m.variant) {
                keys.push((m.name, m.variant.clone()));
            }
        }
        for (n, v) in keys {
            let runs: Vec<&Measurement> = measurements
                .iter()
                .filter(|m| m.name == n && m.variant == v && m.error.is_none())
                .collect();
            let mut o = Json::obj();
            for field in [
                "writes",
                "write_bytes",
                "fdatasyncs",
                "batches",
                "bytes_per_batch",
                "p50_us",
                "p99_us",
                "max_us",
                "frame_stalls",
            ] {
                let mut vals: Vec<f64> = runs
                    .iter()
                    .filter_map(|m| m.extra.path(&["recv_summary", field]).and_then(Json::as_f64))
                    .collect();
                o.set(field, median(&mut vals));
            }
            for field in ["zero_copy_sends", "zero_copy_copied"] {
                let mut vals: Vec<f64> = runs
                    .iter()
                    .filter_map(|m| m.extra.path(&["send_report", field]).and_then(Json::as_f64))
                    .collect();
                o.set(field, median(&mut vals));
            }
            let mut g: Vec<f64> = runs.iter().map(|m| m.gbps()).collect();
            o.set("gb_per_s_median", median(&mut g));
            let mut c: Vec<f64> = runs
                .iter()
                .map(|m| m.cpu.iter().map(|(_, c)| m.cpu_s_per_gib(c)).sum::<f64>())
                .collect();
            o.set("cpu_s_per_gib_send_recv", median(&mut c));
            let label = if v.is_empty() {
                n.to_string()
            } else {
                format!("{n}: {v}")
            };
            fsync_rows.push((label, o, runs.len() as u64));
        }
    }
    let micro = read_criterion(&target_dir().join("criterion"));

    // ---- charts
    let chart_base = format!("ship-{date_compact}");
    let mut bars: Vec<(String, f64, bool)> = summaries
        .iter()
        .map(|s| {
            (
                short_label(s.name).to_string(),
                s.gbps_median,
                s.name.contains("walship"),
            )
        })
        .collect();
    for (label, o, _) in fsync_rows.iter().filter(|(l, _, _)| l.starts_with("walship_sweep")) {
        bars.push((
            label.replace("walship_sweep: ", "sweep: "),
            o.get("gb_per_s_median").and_then(Json::as_f64).unwrap_or(f64::NAN),
            true,
        ));
    }
    let tput_svg = svg::bars("Durable/ship throughput per contender (GB/s, median)", "GB/s", &bars);
    let lat_rows: Vec<(String, Vec<f64>)> = fsync_rows
        .iter()
        .map(|(l, o, _)| {
            let g = |k: &str| o.get(k).and_then(Json::as_f64).unwrap_or(f64::NAN);
            (l.clone(), vec![g("p50_us"), g("p99_us"), g("max_us")])
        })
        .collect();
    let lat_svg = svg::grouped_log(
        "walship recv fdatasync latency (us, log scale)",
        "us",
        &["p50", "p99", "max"],
        &lat_rows,
    );
    std::fs::create_dir_all(&cfg.results_dir).map_err(|e| format!("create {}: {e}", cfg.results_dir.display()))?;
    let tput_path = cfg.results_dir.join(format!("{chart_base}-throughput.svg"));
    let lat_path = cfg.results_dir.join(format!("{chart_base}-fdatasync.svg"));
    std::fs::write(&tput_path, tput_svg).map_err(|e| e.to_string())?;
    std::fs::write(&lat_path, lat_svg).map_err(|e| e.to_string())?;

    // ---- JSON
    let kernel = command_output("uname", &["-r"]);
    let mut env = Json::obj();
    env.set("date", date.clone())
        .set("git_commit", commit.clone())
        .set("git_dirty", dirty)
        .set("kernel", kernel.clone())
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
        .set("pgbackrest_version", command_output("pgbackrest", &["version"]))
        .set("walship_bin", cfg.walship_bin.display().to_string());
    let mut config = Json::obj();
    config
        .set("bytes", cfg.bytes)
        .set("reps", cfg.reps)
        .set("sweep", cfg.sweep)
        .set("sweep_reps", cfg.sweep_reps)
        .set("pg_bytes_target", cfg.pg_bytes)
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
        .set("gen_wal_report", source.gen_report.clone())
        .set("real_wal", real_info.clone());
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
            .set("cpu_s_per_gib_total_median", cpu_total(s.name))
            .set("error", s.error.clone());
        let mut cpu = Json::obj();
        for (who, v) in &s.cpu_per_gib {
            cpu.set(who, *v);
        }
        o.set("cpu_s_per_gib_median", cpu);
        summary_json.set(s.name, o);
    }
    let mut fsync_json = Json::obj();
    for (l, o, _) in &fsync_rows {
        fsync_json.set(l, o.clone());
    }
    let mut targets_json = Json::obj();
    for t in &targets {
        let mut o = Json::obj();
        o.set("threshold", t.1)
            .set("min_raw_gb_per_s", raw_floor)
            .set("min_raw_tcp_durable_ceiling_gb_per_s", durable_floor)
            .set("measured", t.2)
            .set("lower_is_better", t.3)
            .set("verdict", verdict(t))
            .set("detail", t.4.clone());
        targets_json.set(t.0, o);
    }
    let mut ratios = Json::obj();
    ratios
        .set("raw_odirect_used", odirect_name)
        .set("walship_over_min_raw_tcp_raw_odirect", ws / raw_floor)
        .set("durable_ceiling_used", durable_name)
        .set("walship_over_min_raw_tcp_durable_ceiling", ws / durable_floor)
        .set("real_walship_over_min_raw_tcp_durable_ceiling", ws_real / durable_floor)
        .set("walship_over_cp_sync", ws / cp)
        .set("real_walship_over_pg_receivewal", ws_real / med("pg_receivewal"))
        .set("real_walship_over_real_cp_sync", ws_real / med("real_cp_sync"))
        .set("real_walship_over_best_pgbackrest", ws_real / pgbr_best.1)
        .set("best_pgbackrest", pgbr_best.0);
    let mut out = Json::obj();
    out.set("bench", "ship")
        .set("environment", env)
        .set("config", config)
        .set("source", src_json)
        .set("summary", summary_json)
        .set("fdatasync", fsync_json)
        .set("ratios", ratios)
        .set("targets", targets_json)
        .set("micro_criterion", micro.clone())
        .set(
            "measurements",
            measurements.iter().map(Measurement::to_json).collect::<Vec<_>>(),
        );
    let json_path = cfg.results_dir.join(format!("ship-{date_compact}.json"));
    std::fs::write(&json_path, out.pretty()).map_err(|e| format!("write {}: {e}", json_path.display()))?;

    // ---- Markdown
    let fname = |p: &Path| p.file_name().unwrap().to_string_lossy().into_owned();
    let mut md = String::new();
    md.push_str(&format!(
        "\n## ship — {date} — {commit}{} — {} synthetic × {} rep(s){}\n\n",
        if dirty == Some(true) { "-dirty" } else { "" },
        human_bytes(cfg.bytes),
        cfg.reps,
        if cfg.sweep { ", with sweep" } else { "" }
    ));
    md.push_str(&format!(
        "Command `{}` (args: `{}`). Kernel {}, {} ({} cores), scratch on {fs}; load avg {load_start} → {load_end}. \
         GB/s = 10^9 B/s, median of the reps (min–max); CPU in seconds per GiB moved. Sources are hot in the page cache \
         for every contender; no caches dropped. Raw JSON: `{}`.\n\n",
        if cfg.sweep { "tools/bench.sh --sweep" } else { "tools/bench.sh" },
        std::env::args().skip(1).filter(|a| a != "--bench").collect::<Vec<_>>().join(" "),
        kernel.clone().unwrap_or_default(),
        cpu_model(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        fname(&json_path),
    ));
    md.push_str(&format!(
        "Synthetic source: {} ({} files, {} WAL bytes). Real source: {}.\n\n",
        source.origin,
        source.files.len(),
        source.wal_bytes,
        match real_info.get("bytes").and_then(Json::as_u64) {
            Some(b) => format!(
                "PostgreSQL {} pgbench -i -s {} + pgbench -T 5, {} .. {} = **{b} bytes ({} segments)**, the same bytes for every \
                 real-WAL contender (pg_receivewal from a slot created before the load, -E at the end; cp, pgBackRest and \
                 walship from the stopped cluster's pg_wal or a copy of it)",
                real_info.get("server_version").and_then(Json::as_str).unwrap_or("?"),
                real_info.get("pgbench_scale").and_then(Json::as_u64).unwrap_or(0),
                real_info.get("start_lsn").and_then(Json::as_str).unwrap_or("?"),
                real_info.get("end_lsn").and_then(Json::as_str).unwrap_or("?"),
                real_info.get("segments").and_then(Json::as_u64).unwrap_or(0),
            ),
            None => "none (see the skipped rows)".into(),
        }
    ));
    md.push_str(
        "### Throughput\n\n| contender | GB/s | min–max | wall s | CPU s/GiB | ok |\n|---|---:|---:|---:|---|---:|\n",
    );
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
            if cpu.is_empty() {
                "—".into()
            } else {
                format!("{cpu} (Σ {:.2})", cpu_total(s.name))
            },
            s.ok_runs,
            s.runs
        ));
    }
    md.push_str(&format!("\n![throughput]({})\n\n", fname(&tput_path)));
    // The best ratio any shipper could reach here: it cannot beat the slower of the wire and the disk.
    let ceiling = |peer: f64| durable_floor / peer;
    let ceilings = [
        f64::NAN,
        ceiling(med("pg_receivewal")),
        ceiling(med("real_cp_sync")),
        ceiling(pgbr_best.1),
        f64::NAN,
    ];
    md.push_str(
        "### Targets\n\nceiling = min(raw TCP, durable ceiling) / peer: the ratio a shipper running at the machine's \
         durable limit (raw_durable_fio: fresh 16 MiB files, QD16, each synced before the next) would reach in this run.\n\n| target | measured | ceiling | verdict | detail |\n|---|---:|---:|---|---|\n",
    );
    for (t, c) in targets.iter().zip(ceilings) {
        md.push_str(&format!(
            "| {} | {} | {} | **{}** | {} |\n",
            t.0,
            if t.2.is_finite() {
                format!("{:.2}", t.2)
            } else {
                "n/a".into()
            },
            if c.is_finite() { format!("{c:.2}") } else { "—".into() },
            verdict(t),
            t.4
        ));
    }
    if let Some(t) = find("walship_tls") {
        let cpu_tls = cpu_total("walship_tls");
        let cpu_plain = cpu_total("walship");
        md.push_str(&format!(
            "\n**TLS cost** (synthetic WAL, same run): walship over TLS {} vs plain {} = **{:.2}x** the throughput; \
             CPU {:.2} vs {:.2} s/GiB (send+recv, the TLS pump threads included).\n",
            fmt_gbps(t.gbps_median),
            fmt_gbps(ws),
            t.gbps_median / ws,
            cpu_tls,
            cpu_plain
        ));
    }
    md.push_str("\n### walship receiver: group commit and fdatasync latency\n\nFrom the receiver's --report-json file; medians over the reps.\n\n");
    md.push_str("| run | GB/s | CPU s/GiB send+recv | writes | fdatasyncs | batches | bytes/batch | p50 us | p99 us | max us | frame stalls | zero-copy sends / copied |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for (l, o, _) in &fsync_rows {
        let g = |k: &str| o.get(k).and_then(Json::as_f64).unwrap_or(f64::NAN);
        let i = |k: &str| {
            let v = g(k);
            if v.is_finite() {
                format!("{v:.0}")
            } else {
                "—".into()
            }
        };
        md.push_str(&format!(
            "| {l} | {} | {:.3} | {} | {} | {} | {} | {} | {} | {} | {} | {} / {} |\n",
            fmt_gbps(g("gb_per_s_median")),
            g("cpu_s_per_gib_send_recv"),
            i("writes"),
            i("fdatasyncs"),
            i("batches"),
            i("bytes_per_batch"),
            i("p50_us"),
            i("p99_us"),
            i("max_us"),
            i("frame_stalls"),
            i("zero_copy_sends"),
            i("zero_copy_copied")
        ));
    }
    md.push_str(&format!("\n![fdatasync latency]({})\n", fname(&lat_path)));
    if let Json::Array(items) = &micro {
        if !items.is_empty() {
            md.push_str("\n### Micro benches (criterion, last `cargo bench --bench micro` in this target dir)\n\n| bench | GB/s (mean) |\n|---|---:|\n");
            for it in items {
                md.push_str(&format!(
                    "| {} | {:.2} |\n",
                    it.get("id").and_then(Json::as_str).unwrap_or("?"),
                    it.get("gb_per_s").and_then(Json::as_f64).unwrap_or(f64::NAN)
                ));
            }
        }
    }
    let report_path = cfg.results_dir.join("REPORT.md");
    let mut report = std::fs::read_to_string(&report_path).unwrap_or_default();
    if report.is_empty() {
        report.push_str("# walship measured reports\n\nEach section: one run of `cargo bench --bench ship` (see `tools/bench.sh`).\n");
    }
    report.push_str(&md);
    std::fs::write(&report_path, report).map_err(|e| format!("write {}: {e}", report_path.display()))?;
    println!("{md}");
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

fn run_all(cfg: &Config, root: &Path, fio: bool) -> Result<(Vec<Measurement>, Source, Json), String> {
    let disk_needed = cfg.wants("cp_sync")
        || cfg.wants("walship")
        || (cfg.sweep && cfg.wants("walship_sweep"))
        || REAL_NAMES.iter().any(|n| cfg.wants(n));
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
            report(bench_odirect_fio(cfg, root, &dst, cfg.bytes, rep, false));
            drop_dir(&dst);
        }
        if fio && cfg.wants("raw_durable_fio") {
            let dst = fresh_dir(root, "dst-fio-durable")?;
            report(bench_odirect_fio(cfg, root, &dst, cfg.bytes, rep, true));
            drop_dir(&dst);
        }
        if cfg.wants("raw_odirect_rust") {
            let dst = fresh_dir(root, "dst-odirect")?;
            report(bench_odirect_rust(&dst, cfg.bytes, rep, &buf));
            drop_dir(&dst);
        }
        if cfg.wants("cp_sync") {
            let dst = fresh_dir(root, "dst-cp")?;
            report(bench_cp_sync(cfg, root, &source, &dst, rep, "cp_sync"));
            drop_dir(&dst);
        }
        if cfg.wants("walship") {
            let dst = fresh_dir(root, "dst-walship")?;
            report(bench_walship(
                cfg,
                root,
                &source,
                &dst,
                rep,
                "walship",
                "",
                &cfg.send_extra,
                &cfg.recv_extra,
            ));
            drop_dir(&dst);
        }
        if cfg.wants("walship_tls") {
            let dst = fresh_dir(root, "dst-walship-tls")?;
            let m = match tls_files(root) {
                Ok((cert, key)) => {
                    let send: Vec<String> = cfg.send_extra.iter().cloned().chain(["--tls-ca".to_string(), cert.clone()]).collect();
                    let recv: Vec<String> =
                        cfg.recv_extra.iter().cloned().chain(["--tls-cert".to_string(), cert, "--tls-key".to_string(), key]).collect();
                    bench_walship(cfg, root, &source, &dst, rep, "walship_tls", "", &send, &recv)
                }
                Err(e) => Measurement::new("walship_tls", rep, source.wal_bytes).failed(e),
            };
            report(m);
            drop_dir(&dst);
        }
    }
    // ---- optional sweep of walship's knobs, one at a time from the defaults, on the synthetic source
    if cfg.sweep && cfg.wants("walship_sweep") {
        for rep in 0..cfg.sweep_reps {
            for (variant, send, recv) in sweep_points() {
                let dst = fresh_dir(root, "dst-sweep")?;
                let send: Vec<String> = cfg.send_extra.iter().cloned().chain(send).collect();
                let recv: Vec<String> = cfg.recv_extra.iter().cloned().chain(recv).collect();
                report(bench_walship(
                    cfg,
                    root,
                    &source,
                    &dst,
                    rep,
                    "walship_sweep",
                    &variant,
                    &send,
                    &recv,
                ));
                drop_dir(&dst);
            }
        }
    }

    // ---- real WAL from a local PostgreSQL: pg_receivewal, pgBackRest, cp + sync, walship on the same segments
    let mut real_info = Json::obj();
    let real_wanted = REAL_NAMES.iter().any(|n| cfg.wants(n));
    if real_wanted {
        let skip = |why: String, report: &mut dyn FnMut(Measurement)| {
            eprintln!("  real WAL contenders skipped: {why}");
            for n in REAL_NAMES {
                if cfg.wants(n) {
                    report(Measurement::new(n, 0, 0).failed(format!("skipped: {why}")));
                }
            }
        };
        if !cfg.pg {
            skip("WALSHIP_BENCH_PG=0".into(), &mut report);
        } else if source.walship_unavailable.is_some() && source.files.is_empty() {
            skip("no walship binary".into(), &mut report);
        } else {
            // SAFETY: geteuid has no side effects.
            let root_user = unsafe { libc::geteuid() } == 0;
            let built = if root_user {
                let t = Instant::now();
                eprintln!(
                    "ship bench: building real WAL (~{}) in a local PostgreSQL...",
                    human_bytes(cfg.pg_bytes)
                );
                let r = pg::build_real_wal(root, cfg.pg_bytes, cfg.reps, cfg.timeout);
                if let Ok(r) = &r {
                    eprintln!(
                        "ship bench: real WAL {} .. {} = {} bytes ({} segments) in {:.1} s",
                        pg::fmt_lsn(r.first_segno * r.seg_size),
                        pg::fmt_lsn(r.end_lsn),
                        r.bytes(),
                        r.segment_names.len(),
                        t.elapsed().as_secs_f64()
                    );
                }
                r
            } else {
                Err("not root: the bench runs PostgreSQL as the postgres OS user via runuser (run as root)".into())
            };
            match built {
                Err(why) => skip(format!("real WAL unavailable: {why}"), &mut report),
                Ok(mut real) => {
                    real_info = real.report.clone();
                    real_phase(cfg, root, &mut real, &mut report)?;
                }
            }
        }
    }
    Ok((all, source, real_info))
}

const REAL_NAMES: [&str; 6] = [
    "pg_receivewal",
    "real_cp_sync",
    "real_walship",
    "pgbackrest_sync",
    "pgbackrest_async_none",
    "pgbackrest_async_lz4",
];

/// A throw-away self-signed certificate for 127.0.0.1 (its own CA): (cert.pem, key.pem) paths.
fn tls_files(root: &Path) -> Result<(String, String), String> {
    let (cert, key) = (root.join("bench-tls-cert.pem"), root.join("bench-tls-key.pem"));
    if !cert.exists() {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).map_err(|e| format!("rcgen: {e}"))?;
        std::fs::write(&cert, ck.cert.pem()).map_err(|e| format!("write {}: {e}", cert.display()))?;
        std::fs::write(&key, ck.signing_key.serialize_pem()).map_err(|e| format!("write {}: {e}", key.display()))?;
    }
    Ok((cert.display().to_string(), key.display().to_string()))
}

fn sweep_points() -> Vec<(String, Vec<String>, Vec<String>)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let mut pts = Vec::new();
    for z in ["on", "off", "auto"] {
        pts.push((format!("zero-copy {z}"), s(&["--zero-copy", z]), vec![]));
    }
    for f in ["256KiB", "1MiB", "4MiB"] {
        pts.push((format!("frame-bytes {f}"), s(&["--frame-bytes", f]), vec![]));
    }
    for i in ["32MiB", "128MiB", "512MiB"] {
        pts.push((
            format!("send in-flight-bytes-max {i}"),
            s(&["--in-flight-bytes-max", i]),
            vec![],
        ));
    }
    for b in ["1MiB", "16MiB", "64MiB"] {
        pts.push((
            format!("recv fsync-batch-bytes {b}"),
            vec![],
            s(&["--fsync-batch-bytes", b]),
        ));
    }
    for mode in ["direct", "buffered"] {
        pts.push((format!("recv write-mode {mode}"), vec![], s(&["--write-mode", mode])));
    }
    for us in ["200", "1000", "5000"] {
        pts.push((format!("recv fsync-interval-us {us}"), vec![], s(&["--fsync-interval-us", us])));
    }
    pts
}

fn real_phase(
    cfg: &Config,
    root: &Path,
    real: &mut pg::RealWal,
    report: &mut dyn FnMut(Measurement),
) -> Result<(), String> {
    let bytes = real.bytes();
    // The load left the table files dirty: checkpoint and sync (untimed) so no contender pays for that
    // writeback, and read the segments once so every contender finds them in the page cache.
    real.cluster.sql("CHECKPOINT")?;
    sync_all_fs();
    let pg_wal = real.cluster.data.join("pg_wal");
    let pg_files: Vec<PathBuf> = real.segment_names.iter().map(|n| pg_wal.join(n)).collect();
    warm(&pg_files).map_err(|e| e.to_string())?;
    // 1. pg_receivewal streams from the running server, one slot per repetition.
    for rep in 0..cfg.reps {
        if cfg.wants("pg_receivewal") {
            let dst = fresh_dir(root, "dst-pg_receivewal")?;
            report(bench_pg_receivewal(cfg, root, real, &dst, rep));
            drop_dir(&dst);
        }
    }
    // pgBackRest's stanza-create needs the running server.
    let pgbr_wanted = ["pgbackrest_sync", "pgbackrest_async_none", "pgbackrest_async_lz4"]
        .iter()
        .any(|n| cfg.wants(n));
    let pgbr = if !pgbr_wanted {
        Err("not selected".to_string())
    } else if command_output("pgbackrest", &["version"]).is_none() {
        Err("pgbackrest not installed (Debian: apt-get install pgbackrest)".to_string())
    } else {
        pgbr_setup(cfg, root, real)
    };
    // 2. Stop the server: the other contenders read the stopped cluster's pg_wal (or a copy of it).
    real.cluster.stop(cfg.timeout)?;
    let src_dir = root.join("src-real");
    std::fs::create_dir_all(&src_dir).map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    for n in &real.segment_names {
        let from = pg_wal.join(n);
        let len = from
            .metadata()
            .map_err(|e| format!("{}: {e} (recycled before the copy?)", from.display()))?
            .len();
        if len != real.seg_size {
            return Err(format!("{}: {len} bytes, expected {}", from.display(), real.seg_size));
        }
        std::fs::copy(&from, src_dir.join(n)).map_err(|e| format!("copy {}: {e}", from.display()))?;
        files.push(src_dir.join(n));
    }
    sync_all_fs();
    warm(&files).map_err(|e| e.to_string())?;
    warm(&pg_files).map_err(|e| e.to_string())?;
    let src = Source {
        dir: src_dir,
        files,
        wal_bytes: bytes,
        first_lsn: Some(real.first_segno * real.seg_size),
        end_lsn: Some(real.end_lsn),
        origin: "real WAL (PostgreSQL pgbench), copy of the stopped cluster's pg_wal".into(),
        gen_report: Json::Null,
        walship_unavailable: None,
    };
    for rep in 0..cfg.reps {
        if cfg.wants("real_cp_sync") {
            let dst = fresh_dir(root, "dst-real-cp")?;
            report(bench_cp_sync(cfg, root, &src, &dst, rep, "real_cp_sync"));
            drop_dir(&dst);
        }
        if cfg.wants("real_walship") {
            let dst = fresh_dir(root, "dst-real-walship")?;
            report(bench_walship(
                cfg,
                root,
                &src,
                &dst,
                rep,
                "real_walship",
                "",
                &cfg.send_extra,
                &cfg.recv_extra,
            ));
            drop_dir(&dst);
        }
        for (name, opts) in [
            ("pgbackrest_sync", &["--compress-type=none"][..]),
            (
                "pgbackrest_async_none",
                &["--archive-async", "--process-max=2", "--compress-type=none"][..],
            ),
            (
                "pgbackrest_async_lz4",
                &["--archive-async", "--process-max=2", "--compress-type=lz4"][..],
            ),
        ] {
            if !cfg.wants(name) {
                continue;
            }
            match &pgbr {
                Err(why) => report(Measurement::new(name, rep, bytes).failed(format!("skipped: {why}"))),
                Ok(conf) => report(bench_pgbackrest(cfg, root, real, conf, name, opts, rep)),
            }
        }
    }
    Ok(())
}

fn bench_pg_receivewal(cfg: &Config, root: &Path, real: &pg::RealWal, dst: &Path, rep: usize) -> Measurement {
    let bytes = real.bytes();
    let mut m = Measurement::new("pg_receivewal", rep, bytes);
    let bin = real.cluster.bin.join("pg_receivewal");
    let slot = &real.slots[rep % real.slots.len()];
    let mut cmd = Command::new(&bin);
    cmd.args(real.cluster.conn_args())
        .arg("-D")
        .arg(dst)
        .arg(format!("--slot={slot}"))
        .args(["--no-loop", "-E", &pg::fmt_lsn(real.end_lsn)]);
    m.command = format!("{} && sync", cmd_line(&cmd));
    let Some(postmaster) = real.cluster.postmaster_pid() else {
        return m.failed("no postmaster.pid".into());
    };
    let poller = pg::CpuPoller::start(postmaster, "walsender");
    let start = Instant::now();
    let f = match run(&mut cmd, root, &format!("pg_receivewal-{rep}"), cfg.timeout) {
        Ok(f) => f,
        Err(e) => return m.failed(format!("pg_receivewal could not start: {e}")),
    };
    let s = run(
        &mut Command::new("sync"),
        root,
        &format!("sync-pgrw-{rep}"),
        cfg.timeout,
    );
    m.wall_s = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(20));
    let (walsender, pids) = poller.finish();
    if !f.ok() {
        return m.failed(format!("pg_receivewal failed: {}", f.describe_failure()));
    }
    m.cpu = vec![("pg_receivewal", f.cpu), ("walsender", walsender)];
    if let Ok(s) = &s {
        m.cpu.push(("sync", s.cpu));
        m.extra.set("sync_wall_s", s.wall.as_secs_f64());
    }
    m.extra
        .set("pg_receivewal_wall_s", f.wall.as_secs_f64())
        .set(
            "walsender_pids",
            pids.iter().map(|p| Json::from(*p as u64)).collect::<Vec<_>>(),
        )
        .set("slot", slot.as_str())
        .set("endpos", pg::fmt_lsn(real.end_lsn));
    // Same bytes as the others: every complete segment must be there, identical to the server's.
    let pg_wal = real.cluster.data.join("pg_wal");
    match compare_segments(&pg_wal, dst, &real.segment_names) {
        Ok(n) if n == bytes => {}
        Ok(n) => {
            return m.failed(format!(
                "pg_receivewal wrote {n} bytes of complete segments, expected {bytes}"
            ))
        }
        Err(e) => return m.failed(format!("pg_receivewal output differs: {e}")),
    }
    let partials: Vec<String> = list_files(dst)
        .unwrap_or_default()
        .iter()
        .filter_map(|p| {
            p.file_name()?
                .to_str()
                .filter(|n| n.ends_with(".partial"))
                .map(String::from)
        })
        .collect();
    m.extra.set(
        "note",
        "also wrote the next segment as .partial (zero-padded to the segment size), not counted in bytes",
    );
    m.extra.set(
        "partial_files",
        partials.into_iter().map(Json::from).collect::<Vec<_>>(),
    );
    m
}

/// Byte-compare `names` in `a` and `b`; total bytes compared.
fn compare_segments(a: &Path, b: &Path, names: &[String]) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let mut total = 0u64;
    let (mut x, mut y) = (vec![0u8; IO_BYTES], vec![0u8; IO_BYTES]);
    for n in names {
        let fa = std::fs::File::open(a.join(n)).map_err(|e| format!("{n}: {e}"))?;
        let fb = std::fs::File::open(b.join(n)).map_err(|e| format!("{n} in {}: {e}", b.display()))?;
        let len = fa.metadata().map_err(|e| e.to_string())?.len();
        if fb.metadata().map_err(|e| e.to_string())?.len() != len {
            return Err(format!("{n}: size differs"));
        }
        let mut off = 0;
        while off < len {
            let k = ((len - off) as usize).min(IO_BYTES);
            fa.read_exact_at(&mut x[..k], off).map_err(|e| e.to_string())?;
            fb.read_exact_at(&mut y[..k], off).map_err(|e| e.to_string())?;
            if x[..k] != y[..k] {
                return Err(format!("{n}: differs near offset {off}"));
            }
            off += k as u64;
        }
        total += len;
    }
    Ok(total)
}

struct PgbrConf {
    conf: PathBuf,
    repo: PathBuf,
    spool: PathBuf,
}

fn pgbr_setup(cfg: &Config, root: &Path, real: &pg::RealWal) -> Result<PgbrConf, String> {
    let base = root.join("pgbr");
    let (repo, spool) = (base.join("repo"), base.join("spool"));
    for d in [&repo, &spool, &base.join("lock"), &base.join("log")] {
        std::fs::create_dir_all(d).map_err(|e| e.to_string())?;
    }
    let conf = base.join("pgbackrest.conf");
    let text = format!(
        "[global]\nrepo1-path={}\nlock-path={}\nlog-path={}\nspool-path={}\nlog-level-console=warn\n\
         log-level-file=off\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\npg1-user=postgres\n",
        repo.display(),
        base.join("lock").display(),
        base.join("log").display(),
        spool.display(),
        real.cluster.data.display(),
        real.cluster.port,
        real.cluster.sock.display()
    );
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("pgbackrest");
    cmd.arg(format!("--config={}", conf.display()))
        .args(["--stanza=bench", "stanza-create"]);
    match run(&mut cmd, &base, "stanza-create", cfg.timeout) {
        Ok(f) if f.ok() => Ok(PgbrConf { conf, repo, spool }),
        Ok(f) => Err(format!("pgbackrest stanza-create failed: {}", f.describe_failure())),
        Err(e) => Err(format!("pgbackrest could not start: {e}")),
    }
}

/// `archive-push` every segment in order, as PostgreSQL's archiver would (`.ready` -> `.done` after each
/// success), into an emptied repository. Async: the foreground command returns once its segment is in
/// the repo; a daemonised process (plus process-max workers) pushes ahead from the `.ready` files.
fn bench_pgbackrest(
    cfg: &Config,
    root: &Path,
    real: &pg::RealWal,
    conf: &PgbrConf,
    name: &'static str,
    opts: &[&str],
    rep: usize,
) -> Measurement {
    let bytes = real.bytes();
    let mut m = Measurement::new(name, rep, bytes);
    let pg_wal = real.cluster.data.join("pg_wal");
    let status = pg_wal.join("archive_status");
    // Fresh repository archive (keep archive.info), spool and .ready files.
    let arch = conf.repo.join("archive").join("bench");
    if let Ok(rd) = std::fs::read_dir(&arch) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&conf.spool);
    let _ = std::fs::create_dir_all(&conf.spool);
    let _ = std::fs::remove_dir_all(&status);
    if let Err(e) = std::fs::create_dir_all(&status) {
        return m.failed(format!("create {}: {e}", status.display()));
    }
    for n in &real.segment_names {
        let _ = std::fs::write(status.join(format!("{n}.ready")), b"");
    }
    sync_all_fs();
    m.command = format!(
        "for each segment: pgbackrest --config={} --stanza=bench {} archive-push {}/SEGMENT",
        conf.conf.display(),
        opts.join(" "),
        pg_wal.display()
    );
    pg::set_subreaper(true);
    let mut fg = Cpu::default();
    let start = Instant::now();
    let mut failure = None;
    for n in &real.segment_names {
        let mut cmd = Command::new("pgbackrest");
        cmd.arg(format!("--config={}", conf.conf.display()))
            .arg("--stanza=bench")
            .args(opts)
            .arg("archive-push")
            .arg(pg_wal.join(n));
        match run(&mut cmd, root, &format!("{name}-{rep}"), cfg.timeout) {
            Ok(f) if f.ok() => {
                fg.user_s += f.cpu.user_s;
                fg.sys_s += f.cpu.sys_s;
                let _ = std::fs::rename(status.join(format!("{n}.ready")), status.join(format!("{n}.done")));
            }
            Ok(f) => {
                failure = Some(format!("archive-push {n} failed: {}", f.describe_failure()));
                break;
            }
            Err(e) => {
                failure = Some(format!("pgbackrest could not start: {e}"));
                break;
            }
        }
    }
    m.wall_s = start.elapsed().as_secs_f64();
    let bg = pg::reap_orphans(Duration::from_secs(30));
    pg::set_subreaper(false);
    if let Some(f) = failure {
        return m.failed(f);
    }
    m.cpu = vec![("pgbackrest", fg), ("pgbackrest_async", bg)];
    // Every segment must be in the repository (uncompressed: with its exact size).
    let mut count = 0u64;
    let mut stored = 0u64;
    let mut stack = vec![arch.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.len() > 24 && n.as_bytes()[24] == b'-')
            {
                count += 1;
                stored += p.metadata().map(|x| x.len()).unwrap_or(0);
            }
        }
    }
    m.extra.set("repo_files", count).set("repo_bytes", stored);
    if count != real.segment_names.len() as u64 {
        return m.failed(format!(
            "repository holds {count} segments, expected {}",
            real.segment_names.len()
        ));
    }
    m
}

fn short_label(name: &str) -> &str {
    match name {
        "raw_tcp" => "raw loopback TCP",
        "raw_odirect_fio" => "raw O_DIRECT (fio)",
        "raw_durable_fio" => "durable ceiling (fio)",
        "raw_odirect_rust" => "raw O_DIRECT (Rust pwrite)",
        "cp_sync" => "cp + sync (synthetic)",
        "walship" => "walship (synthetic)",
        "walship_tls" => "walship over TLS (synthetic)",
        "real_walship" => "walship (real WAL)",
        "real_cp_sync" => "cp + sync (real WAL)",
        "pg_receivewal" => "pg_receivewal (real WAL)",
        "pgbackrest_sync" => "pgBackRest sync (real WAL)",
        "pgbackrest_async_none" => "pgBackRest async p2 none",
        "pgbackrest_async_lz4" => "pgBackRest async p2 lz4",
        other => other,
    }
}

/// Criterion results under `<target>/criterion/**/new/`: id and mean throughput in GB/s (10^9 B/s).
fn read_criterion(dir: &Path) -> Json {
    let mut items = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "new") {
                let bench = std::fs::read_to_string(p.join("benchmark.json"))
                    .ok()
                    .and_then(|t| Json::parse(t.trim()).ok());
                let est = std::fs::read_to_string(p.join("estimates.json"))
                    .ok()
                    .and_then(|t| Json::parse(t.trim()).ok());
                if let (Some(b), Some(e)) = (bench, est) {
                    let bytes = b
                        .path(&["throughput", "Bytes"])
                        .or_else(|| b.path(&["throughput", "BytesDecimal"]))
                        .and_then(Json::as_f64);
                    let ns = e.path(&["mean", "point_estimate"]).and_then(Json::as_f64);
                    if let (Some(bytes), Some(ns), Some(id)) = (bytes, ns, b.get("full_id").and_then(Json::as_str)) {
                        let mut o = Json::obj();
                        o.set("id", id)
                            .set("bytes", bytes)
                            .set("mean_ns", ns)
                            .set("gb_per_s", bytes / ns);
                        items.push(o);
                    }
                }
            } else if p.file_name().is_some_and(|n| n != "report" && n != "base") {
                stack.push(p);
            }
        }
    }
    items.sort_by(|a, b| format!("{:?}", a.get("id")).cmp(&format!("{:?}", b.get("id"))));
    Json::Array(items)
}
