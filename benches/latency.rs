//! Flush-to-durable-ack latency under pgbench load, beside the same disk's fdatasync latency, in one run
//! (issue #6: "ack latency p99 under pgbench load within 2x of a single fdatasync's p99 on the same disk").
//!
//! Steps (PostgreSQL installed and run as root, else the bench says why and exits 0 — the same policy as
//! the real-WAL phase of `benches/ship.rs`; the cluster comes from `common::pg`):
//! 1. a throw-away cluster (`wal_level = replica`, 16 walsenders / slots), `synchronous_commit = on` (the
//!    PostgreSQL default: every commit flushes WAL), `pgbench -i -s SCALE`, `CHECKPOINT` (again before
//!    every load phase, so each carries the same full-page images);
//! 2. `walship recv` (authenticated with a key file, like ship.rs) and `walship send --conninfo ... --slot`
//!    (follow mode, `--report-json`);
//! 3. quiet probe: 8 KiB buffered write at offset 0 of a pre-written 16 MiB file + fdatasync, the pair
//!    timed (pg_test_fsync's "fdatasync" test), one every 10 ms, on the receiver's filesystem, no load;
//! 4. `pgbench -T SECS -c CLIENTS` with the same probe beside it (same disk contention as the receiver);
//! 5. SIGTERM the sender (it drains and writes its report: `ack_latency_us`), then the receiver (its
//!    final log line: fdatasync count, p50, p99, max);
//! 6. peer (WALSHIP_LAT_PEER=0 leaves it out): `pg_receivewal --synchronous` with its own slot as the only
//!    follower, the same pgbench run again with its own probe, and `pg_stat_replication.flush_lag` of its
//!    walsender sampled every 20 ms (PostgreSQL: time from flushing WAL locally to the standby's report
//!    that it flushed it). Sequential, not concurrent, so neither follower loads the other's disk and CPU.
//!
//! Headline, the same for both followers and from the instant the user feels it start (issue #15): a
//! commit probe beside each load commits one row (`synchronous_commit = on`: it returns once the
//! primary flushed it), reads `pg_current_wal_flush_lsn()`, and reads the follower's durable position
//! until it passes that LSN, 50 us apart, timed to the middle of the read that saw it (walship: the
//! receiver's `.walship-flushed`; pg_receivewal: `pg_stat_replication.flush_lsn`); one read's own time
//! is reported as the resolution. This is the "ack latency" of the report and of issue #15's targets
//! (p50 <= pg_receivewal's, p99 <= 2x the fdatasync probe's); the sender's own histogram and the
//! receiver's share are its decomposition. The report also gives the flush poller's cost on the
//! primary (its backend's CPU idle and under load, its query count from the sender's log).
//!
//! Outputs: `results/latency-<date>.json` and a section appended to `results/LATENCY.md` with the table,
//! the target's verdict (against the probe during the load; also shown against the receiver's own
//! fdatasync p99 and the quiet probe) and what bounds it.
//!
//! Environment:
//! - `WALSHIP_LAT_SECONDS` pgbench -T (default 20); `WALSHIP_LAT_CLIENTS` pgbench -c (default 4);
//!   `WALSHIP_LAT_SCALE` pgbench -i -s (default 10); `WALSHIP_LAT_QUIET_SECONDS` quiet probe (default 10)
//! - `WALSHIP_LAT_PROBE_INTERVAL_MS` probe pacing, start to start (default 10; 0 = back to back)
//! - `WALSHIP_LAT_PEER=0` no pg_receivewal; `WALSHIP_LAT_SAMPLE_MS` flush_lag sampling period (default 20)
//! - `WALSHIP_LAT_COMMIT_PROBE_INTERVAL_MS` commit probe pacing (default 20)
//! - `WALSHIP_BENCH_DIR` scratch parent (default `<target dir>/bench-scratch`; never tmpfs)
//! - `WALSHIP_BENCH_RESULTS` where `latency-<date>.json` and `LATENCY.md` go (default `<crate>/results`)
//! - `WALSHIP_BIN` walship binary (default: the one cargo built); `WALSHIP_BENCH_KEEP=1` keep the scratch
//! - `WALSHIP_BENCH_SEND_ARGS` / `WALSHIP_BENCH_RECV_ARGS` extra args (whitespace-split) for send/recv
//!
//! `cargo bench --bench latency` (about 75 s with the defaults).

mod common;

use common::*;
use hdrhistogram::Histogram;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SLOT_WALSHIP: &str = "walship_lat";
const SLOT_PEER: &str = "pg_receivewal_lat";
const PROBE_BLOCK: usize = 8192;
const PROBE_FILE_BYTES: usize = 16 << 20;
const STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two reads of a follower's durable position by the commit probe.
const READ_PAUSE: Duration = Duration::from_micros(50);

struct Config {
    seconds: u64,
    clients: u32,
    scale: u32,
    quiet_seconds: u64,
    probe_interval: Duration,
    peer: bool,
    sample_ms: u64,
    commit_probe_interval_ms: u64,
    scratch_parent: PathBuf,
    results_dir: PathBuf,
    walship_bin: PathBuf,
    keep: bool,
    send_extra: Vec<String>,
    recv_extra: Vec<String>,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("bad {name} {v:?}")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let split = |name: &str| -> Vec<String> {
            std::env::var(name)
                .map(|v| v.split_whitespace().map(String::from).collect())
                .unwrap_or_default()
        };
        Ok(Config {
            seconds: env_num("WALSHIP_LAT_SECONDS", 20u64)?.max(3),
            clients: env_num("WALSHIP_LAT_CLIENTS", 4u32)?.max(1),
            scale: env_num("WALSHIP_LAT_SCALE", 10u32)?.max(1),
            quiet_seconds: env_num("WALSHIP_LAT_QUIET_SECONDS", 10u64)?.max(1),
            probe_interval: Duration::from_millis(env_num("WALSHIP_LAT_PROBE_INTERVAL_MS", 10u64)?),
            peer: env_flag("WALSHIP_LAT_PEER").unwrap_or(true),
            sample_ms: env_num("WALSHIP_LAT_SAMPLE_MS", 20u64)?.max(1),
            commit_probe_interval_ms: env_num("WALSHIP_LAT_COMMIT_PROBE_INTERVAL_MS", 20u64)?.max(1),
            scratch_parent: std::env::var_os("WALSHIP_BENCH_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| target_dir().join("bench-scratch")),
            results_dir: std::env::var_os("WALSHIP_BENCH_RESULTS")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results")),
            walship_bin: std::env::var_os("WALSHIP_BIN")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_walship"))),
            keep: env_flag("WALSHIP_BENCH_KEEP").unwrap_or(false),
            send_extra: split("WALSHIP_BENCH_SEND_ARGS"),
            recv_extra: split("WALSHIP_BENCH_RECV_ARGS"),
        })
    }
}

fn main() {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("latency bench: {e}");
            std::process::exit(2);
        }
    };
    // No PostgreSQL or not root: say why, measure nothing.
    let bin = match pg::runnable_bin() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("latency bench skipped: {why}");
            return;
        }
    };
    if let Err(e) = bench(&cfg, &bin) {
        eprintln!("latency bench: {e}");
        std::process::exit(1);
    }
}

/// A child that is killed (SIGKILL) and reaped if the bench leaves early.
struct Guard(Option<Running>);

impl Guard {
    fn get(&self) -> &Running {
        self.0.as_ref().expect("guarded child already taken")
    }
    /// Signal, then wait for it to exit (SIGKILL at the deadline).
    fn stop(&mut self, sig: i32, timeout: Duration) -> Result<Finished, String> {
        let r = self.0.take().ok_or("child already stopped")?;
        r.signal(sig);
        r.wait(timeout).map_err(|e| format!("wait: {e}"))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.signal(libc::SIGKILL);
            let _ = r.wait(Duration::from_secs(10));
        }
    }
}

/// Latency percentiles of one histogram (microseconds).
fn hist_json(h: &Histogram<u64>) -> Json {
    let mut o = Json::obj();
    if h.is_empty() {
        o.set("count", 0u64);
        return o;
    }
    o.set("count", h.len())
        .set("mean", (h.mean() * 10.0).round() / 10.0)
        .set("p50", h.value_at_quantile(0.5))
        .set("p90", h.value_at_quantile(0.9))
        .set("p99", h.value_at_quantile(0.99))
        .set("p999", h.value_at_quantile(0.999))
        .set("max", h.max());
    o
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

/// pg_test_fsync's "fdatasync" test: an 8 KiB buffered write at offset 0 of a pre-written file, then
/// fdatasync; each pair timed, one started every `interval` (0: back to back). Runs until `stop` or `max`.
fn fsync_probe(
    dir: &Path,
    name: &str,
    stop: &AtomicBool,
    delay: Duration,
    max: Duration,
    interval: Duration,
) -> Result<(Histogram<u64>, f64), String> {
    let path = dir.join(name);
    let io = |e: std::io::Error| format!("fdatasync probe {}: {e}", path.display());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io)?;
    let mut block = vec![0u8; PROBE_BLOCK];
    fill_pattern(&mut block, 0x006c_6174_656e_6379);
    for off in (0..PROBE_FILE_BYTES).step_by(PROBE_BLOCK) {
        f.write_all_at(&block, off as u64).map_err(io)?;
    }
    f.sync_all().map_err(io)?;
    fsync_dir(dir).map_err(io)?;
    let t_wait = Instant::now();
    while t_wait.elapsed() < delay && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut h = new_hist();
    let t0 = Instant::now();
    let mut next = t0;
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < max {
        // Paced (start to start): a slow op is followed at once by the next, never by a burst.
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        next = Instant::now() + interval;
        block[0] = block[0].wrapping_add(1);
        let t = Instant::now();
        f.write_all_at(&block, 0).map_err(io)?;
        f.sync_data().map_err(io)?;
        let _ = h.record((t.elapsed().as_micros() as u64).max(1));
    }
    let secs = t0.elapsed().as_secs_f64();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok((h, secs))
}

/// Where a follower's durable position is read, the same way and as often for every follower.
#[derive(Clone)]
enum Durable {
    /// walship: the receiver's published durable position, `DIR/.walship-flushed` (written after
    /// every advance of its flushed LSN, when the ack covering it is sent).
    File { dir: PathBuf },
    /// A PostgreSQL follower: `pg_stat_replication.flush_lsn` of the walsender named `app`.
    Replication { conninfo: String, app: String },
}

/// Reads a [`Durable`] position.
enum DurableReader {
    File(PathBuf),
    Replication(Box<(postgres::Client, postgres::Statement, String)>),
}

impl DurableReader {
    fn open(d: &Durable) -> Result<DurableReader, String> {
        match d {
            Durable::File { dir } => Ok(DurableReader::File(dir.join(".walship-flushed"))),
            Durable::Replication { conninfo, app } => {
                let mut c = postgres::Client::connect(conninfo, postgres::NoTls).map_err(|e| format!("durable reader connect: {e}"))?;
                let q = c
                    .prepare("SELECT (flush_lsn - '0/0')::float8 FROM pg_stat_replication WHERE application_name = $1")
                    .map_err(|e| format!("durable reader prepare: {e}"))?;
                Ok(DurableReader::Replication(Box::new((c, q, app.clone()))))
            }
        }
    }

    fn read(&mut self) -> Result<u64, String> {
        match self {
            DurableReader::File(path) => match std::fs::read_to_string(&*path) {
                Ok(text) => Ok(text.split_whitespace().next().and_then(pg::parse_pg_lsn).unwrap_or(0)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(format!("{}: {e}", path.display())),
            },
            DurableReader::Replication(r) => {
                let (c, q, app) = &mut **r;
                let rows = c.query(&*q, &[&*app]).map_err(|e| format!("durable reader query: {e}"))?;
                Ok(rows.first().and_then(|r| r.get::<_, Option<f64>>(0)).map_or(0, |v| v as u64))
            }
        }
    }
}

/// What the commit probe measured.
struct CommitProbe {
    /// From the probe's commit returning (the primary flushed it) to the follower's durable
    /// position passing the flush LSN read right after, microseconds.
    latency: Histogram<u64>,
    /// How long one read of the durable position took (the measurement's resolution).
    read_us: Histogram<u64>,
    /// Probes whose LSN the follower did not make durable within 10 s.
    timeouts: u64,
}

/// The latency the user of a synchronous follower feels, the same way for every follower: a probe
/// session commits one row (`synchronous_commit = on`: the commit returns once the primary flushed
/// it), notes the instant, reads `pg_current_wal_flush_lsn()` (at or past its commit record), and
/// reads the follower's durable position back to back until it passes that LSN. One probe every
/// `interval`, beside the load.
fn commit_probe(conninfo: &str, durable: &Durable, stop: &AtomicBool, delay: Duration, interval: Duration) -> Result<CommitProbe, String> {
    let mut c = postgres::Client::connect(conninfo, postgres::NoTls).map_err(|e| format!("commit probe connect: {e}"))?;
    let insert = c.prepare("INSERT INTO walship_commit_probe (t) VALUES (clock_timestamp())").map_err(|e| format!("commit probe: {e}"))?;
    let flush = c.prepare("SELECT (pg_current_wal_flush_lsn() - '0/0')::float8").map_err(|e| format!("commit probe: {e}"))?;
    let mut reader = DurableReader::open(durable)?;
    let t_wait = Instant::now();
    while t_wait.elapsed() < delay && !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut out = CommitProbe { latency: new_hist(), read_us: new_hist(), timeouts: 0 };
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        next = Instant::now() + interval;
        c.execute(&insert, &[]).map_err(|e| format!("commit probe insert: {e}"))?;
        let t0 = Instant::now();
        let target = c.query_one(&flush, &[]).map_err(|e| format!("commit probe flush lsn: {e}"))?.get::<_, f64>(0) as u64;
        loop {
            let t = Instant::now();
            let pos = reader.read()?;
            let read = t.elapsed();
            let _ = out.read_us.record((read.as_micros() as u64).max(1));
            if pos >= target {
                // Timed to the middle of the read that saw it: the same rule for both followers,
                // whatever one read costs (see the resolution rows).
                let seen = (t + read / 2).saturating_duration_since(t0);
                let _ = out.latency.record((seen.as_micros() as u64).max(1));
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                out.timeouts += 1;
                break;
            }
            // Paced alike for both followers: a file read back to back would take a whole CPU
            // from the follower it measures.
            std::thread::sleep(READ_PAUSE);
        }
    }
    Ok(out)
}

fn commit_probe_json(p: &Result<CommitProbe, String>) -> Json {
    match p {
        Ok(p) => {
            let mut o = hist_json(&p.latency);
            o.set("timeouts", p.timeouts).set("read_us", hist_json(&p.read_us));
            o
        }
        Err(e) => {
            let mut o = Json::obj();
            o.set("error", e.clone());
            o
        }
    }
}

/// Sample `flush_lag` / `write_lag` of the walsender(s) whose application_name is `app` every `period`.
fn lag_sampler(conninfo: &str, app: &str, stop: &AtomicBool, period: Duration) -> Result<(Histogram<u64>, Histogram<u64>, u64, u64), String> {
    let mut c = postgres::Client::connect(conninfo, postgres::NoTls).map_err(|e| format!("sampler connect: {e}"))?;
    let q = c
        .prepare(
            "SELECT (EXTRACT(EPOCH FROM flush_lag) * 1000000)::float8, (EXTRACT(EPOCH FROM write_lag) * 1000000)::float8 \
             FROM pg_stat_replication WHERE application_name = $1",
        )
        .map_err(|e| format!("sampler prepare: {e}"))?;
    let (mut flush, mut write) = (new_hist(), new_hist());
    let (mut samples, mut nulls) = (0u64, 0u64);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let rows = c.query(&q, &[&app]).map_err(|e| format!("sampler query: {e}"))?;
        samples += 1;
        match rows.first().map(|r| (r.get::<_, Option<f64>>(0), r.get::<_, Option<f64>>(1))) {
            Some((Some(f), w)) => {
                let _ = flush.record((f as u64).max(1));
                if let Some(w) = w {
                    let _ = write.record((w as u64).max(1));
                }
            }
            _ => nulls += 1,
        }
        next += period;
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        } else {
            next = Instant::now();
        }
    }
    Ok((flush, write, samples, nulls))
}

fn f64_after(text: &str, pat: &str) -> Option<f64> {
    let i = text.find(pat)? + pat.len();
    let s: String = text[i..]
        .chars()
        .skip_while(|c| *c == ' ')
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    s.parse().ok()
}

fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<bool, String>) -> Result<(), String> {
    let t = Instant::now();
    loop {
        if check()? {
            return Ok(());
        }
        if t.elapsed() > timeout {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn read_log(root: &Path, label: &str, stream: &str) -> String {
    strip_ansi(&std::fs::read_to_string(root.join(format!("{label}.{stream}"))).unwrap_or_default())
}

fn bench(cfg: &Config, bin: &Path) -> Result<(), String> {
    let t_start = Instant::now();
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

    std::fs::create_dir_all(&cfg.scratch_parent)
        .map_err(|e| format!("create {}: {e}", cfg.scratch_parent.display()))?;
    let fs = fs_type(&cfg.scratch_parent);
    if fs == "tmpfs" {
        return Err(format!(
            "{} is on tmpfs, which measures no disk: set WALSHIP_BENCH_DIR to a real filesystem",
            cfg.scratch_parent.display()
        ));
    }
    let root = cfg.scratch_parent.join(format!("latency-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| format!("create {}: {e}", root.display()))?;
    let root = root.canonicalize().map_err(|e| e.to_string())?;
    let load_start = loadavg();
    eprintln!(
        "latency bench: pgbench -s {} -T {} -c {}, scratch {} ({fs}), walship {}, PostgreSQL {}",
        cfg.scale,
        cfg.seconds,
        cfg.clients,
        root.display(),
        cfg.walship_bin.display(),
        bin.display()
    );
    let result = run_bench(cfg, bin, &root);
    let load_end = loadavg();
    if cfg.keep {
        eprintln!("latency bench: kept scratch dir {}", root.display());
    } else {
        let _ = std::fs::remove_dir_all(&root);
    }
    let mut m = result?;

    // ---- verdicts
    let g = |o: &Json, k: &str| o.get(k).and_then(Json::as_f64).unwrap_or(f64::NAN);
    let ack = m.get("walship_ack_latency_us").cloned().unwrap_or(Json::Null);
    let recv = m.get("recv_fdatasync_us").cloned().unwrap_or(Json::Null);
    let probe_load = m.get("probe_during_load_us").cloned().unwrap_or(Json::Null);
    let probe_quiet = m.get("probe_quiet_us").cloned().unwrap_or(Json::Null);
    let ack_p99 = g(&ack, "p99");
    let bound = 2.0 * g(&probe_load, "p99");
    let met = ack_p99 <= bound;
    let mut verdict = Json::obj();
    verdict
        .set("target", "walship flush-to-durable-ack p99 <= 2 x p99 of one 8 KiB write + fdatasync on the same disk, under the same load")
        .set("ack_p99_us", ack_p99)
        .set("bound_us", bound)
        .set("ratio_to_probe_during_load_p99", ack_p99 / g(&probe_load, "p99"))
        .set("ratio_to_recv_fdatasync_p99", ack_p99 / g(&recv, "p99"))
        .set("ratio_to_probe_quiet_p99", ack_p99 / g(&probe_quiet, "p99"))
        .set("met", met);
    m.set("verdict", verdict);
    // Issue #15's targets: the ack latency from the primary's commit, both followers measured the same way.
    let c2d = m.get("commit_to_durable_us").cloned().unwrap_or(Json::Null);
    let peer_c2d = m.path(&["pg_receivewal", "commit_to_durable_us"]).cloned().unwrap_or(Json::Null);
    let (w50, w99, p50) = (g(&c2d, "p50"), g(&c2d, "p99"), g(&peer_c2d, "p50"));
    let mut targets = Json::obj();
    targets
        .set("p50_target", "walship commit-to-durable p50 <= pg_receivewal --synchronous's, same run, same method")
        .set("walship_p50_us", w50)
        .set("pg_receivewal_p50_us", p50)
        .set("p50_ratio", w50 / p50)
        .set("p50_met", if p50.is_finite() && w50.is_finite() { Some(w50 <= p50) } else { None })
        .set("p99_target", "walship commit-to-durable p99 <= 2 x the fdatasync probe's p99 during its load")
        .set("walship_p99_us", w99)
        .set("p99_bound_us", bound)
        .set("p99_met", if w99.is_finite() && bound.is_finite() { Some(w99 <= bound) } else { None });
    m.set("targets", targets);

    let kernel = command_output("uname", &["-r"]);
    let nproc = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut env = Json::obj();
    env.set("date", date.clone())
        .set("git_commit", commit.clone())
        .set("git_dirty", dirty)
        .set("kernel", kernel.clone())
        .set("cpu_model", cpu_model())
        .set("nproc", nproc)
        .set("scratch_dir", root.display().to_string())
        .set("scratch_fs", fs.clone())
        .set("loadavg_start", load_start.clone())
        .set("loadavg_end", load_end.clone())
        .set("walship_bin", cfg.walship_bin.display().to_string())
        .set("bench_seconds", t_start.elapsed().as_secs_f64());
    let mut config = Json::obj();
    config
        .set("pgbench_scale", cfg.scale as u64)
        .set("pgbench_seconds", cfg.seconds)
        .set("pgbench_clients", cfg.clients as u64)
        .set("quiet_probe_seconds", cfg.quiet_seconds)
        .set("peer_pg_receivewal", cfg.peer)
        .set("flush_lag_sample_ms", cfg.sample_ms)
        .set("probe_interval_ms", cfg.probe_interval.as_millis() as u64)
        .set("probe", "8 KiB buffered pwrite at offset 0 of a pre-written 16 MiB file + fdatasync, the pair timed (pg_test_fsync's fdatasync test)")
        .set("command", std::env::args().collect::<Vec<_>>().join(" "));
    let mut out = Json::obj();
    out.set("bench", "latency")
        .set("environment", env)
        .set("config", config)
        .set("results", m.clone());
    std::fs::create_dir_all(&cfg.results_dir).map_err(|e| format!("create {}: {e}", cfg.results_dir.display()))?;
    let json_name = format!("latency-{date_compact}.json");
    let json_path = cfg.results_dir.join(&json_name);
    std::fs::write(&json_path, out.pretty()).map_err(|e| format!("write {}: {e}", json_path.display()))?;

    // ---- Markdown
    let md = markdown(cfg, &m, &Facts {
        date: &date,
        commit: &format!("{commit}{}", if dirty == Some(true) { "-dirty" } else { "" }),
        kernel: kernel.as_deref().unwrap_or(""),
        nproc,
        fs: &fs,
        load_start: &load_start,
        load_end: &load_end,
        json_name: &json_name,
    }, met, bound);
    let report_path = cfg.results_dir.join("LATENCY.md");
    let mut report = std::fs::read_to_string(&report_path).unwrap_or_default();
    if report.is_empty() {
        report.push_str("# Flush-to-durable-ack latency under pgbench load\n\nEach section below: one run of `cargo bench --bench latency`.\n");
    }
    if !report.ends_with('\n') {
        report.push('\n');
    }
    report.push_str(&md);
    std::fs::write(&report_path, report).map_err(|e| format!("write {}: {e}", report_path.display()))?;
    println!("{md}");
    println!("results: {} and {}", json_path.display(), report_path.display());
    Ok(())
}

struct Facts<'a> {
    date: &'a str,
    commit: &'a str,
    kernel: &'a str,
    nproc: usize,
    fs: &'a str,
    load_start: &'a str,
    load_end: &'a str,
    json_name: &'a str,
}

fn num(o: &Json, k: &str) -> f64 {
    o.get(k).and_then(Json::as_f64).unwrap_or(f64::NAN)
}

/// "1234" or "—".
fn us(o: &Json, k: &str) -> String {
    match o.get(k).and_then(Json::as_f64) {
        Some(v) => format!("{v:.0}"),
        None => "—".into(),
    }
}

fn within2(ratio: Option<&Json>) -> &'static str {
    match ratio.and_then(Json::as_f64) {
        Some(r) if r <= 2.0 => "within 2x",
        Some(r) if r.is_finite() => "not within 2x",
        _ => "not measured",
    }
}

fn pgbench_text(p: &Json) -> String {
    format!(
        "{} tps, latency average {} ms (stddev {} ms)",
        p.get("tps").and_then(Json::as_f64).map_or("?".into(), |v| format!("{v:.0}")),
        p.get("latency_avg_ms").and_then(Json::as_f64).map_or("?".into(), |v| format!("{v:.2}")),
        p.get("latency_stddev_ms").and_then(Json::as_f64).map_or("?".into(), |v| format!("{v:.2}")),
    )
}

fn markdown(cfg: &Config, m: &Json, f: &Facts, met: bool, bound: f64) -> String {
    let null = Json::Null;
    let at = |k: &str| m.get(k).unwrap_or(&null);
    let (ack, recv, probe_load, probe_quiet, peer) = (
        at("walship_ack_latency_us"),
        at("recv_fdatasync_us"),
        at("probe_during_load_us"),
        at("probe_quiet_us"),
        at("pg_receivewal"),
    );
    let row = |label: &str, o: &Json| {
        format!(
            "| {label} | {} | {} | {} | {} | {} | {} |\n",
            us(o, "count"),
            us(o, "p50"),
            us(o, "p90"),
            us(o, "p99"),
            us(o, "p999"),
            us(o, "max")
        )
    };
    let mut md = String::new();
    md.push_str(&format!(
        "\n## {}, commit {}, `cargo bench --bench latency` (load average {} → {})\n\n",
        f.date,
        f.commit,
        f.load_start.split_whitespace().next().unwrap_or("?"),
        f.load_end.split_whitespace().next().unwrap_or("?"),
    ));
    md.push_str(&format!(
        "Command: `cargo bench --bench latency` (WALSHIP_LAT_SECONDS={}, WALSHIP_LAT_CLIENTS={}, WALSHIP_LAT_SCALE={}, \
         WALSHIP_LAT_PROBE_INTERVAL_MS={}). Kernel {}, {} ({} cores, shared), scratch on {}, PostgreSQL {} \
         (`synchronous_commit = on`, `wal_level = replica`), everything on loopback; /proc/loadavg `{}` → `{}`. \
         Raw JSON: `{}`.\n\n",
        cfg.seconds,
        cfg.clients,
        cfg.scale,
        cfg.probe_interval.as_millis(),
        f.kernel,
        cpu_model(),
        f.nproc,
        f.fs,
        m.get("server_version").and_then(Json::as_str).unwrap_or("?"),
        f.load_start,
        f.load_end,
        f.json_name,
    ));
    md.push_str(&format!(
        "Load: `pgbench -T {} -c {}` on scale {} with walship following: **{}**, {:.0} MB of WAL. \
         Shipping: `walship recv --auth-key-file KEY{}` and `walship send --conninfo ... --slot {SLOT_WALSHIP}{}` \
         (horizon poll {}).{}\n\n",
        cfg.seconds,
        cfg.clients,
        cfg.scale,
        pgbench_text(at("pgbench")),
        num(m, "wal_bytes_during_load") / 1e6,
        cfg.recv_extra.iter().map(|a| format!(" {a}")).collect::<String>(),
        cfg.send_extra.iter().map(|a| format!(" {a}")).collect::<String>(),
        m.get("horizon_poll_interval").and_then(Json::as_str).unwrap_or("?"),
        if peer.get("pgbench").is_some() {
            format!(
                " Then the same load again with `pg_receivewal --synchronous --slot {SLOT_PEER}` as the only follower: {}, \
                 {:.0} MB of WAL.",
                pgbench_text(peer.get("pgbench").unwrap_or(&null)),
                num(peer, "wal_bytes_during_load") / 1e6
            )
        } else {
            String::new()
        }
    ));
    md.push_str("| latency, us | n | p50 | p90 | p99 | p99.9 | max |\n|---|---:|---:|---:|---:|---:|---:|\n");
    md.push_str(&row(
        "**ack latency, walship: primary's commit flushed -> durable at the receiver** (commit probe; the receiver's `.walship-flushed` read back to back)",
        at("commit_to_durable_us"),
    ));
    if let Some(c) = peer.get("commit_to_durable_us") {
        md.push_str(&row(
            "**ack latency, pg_receivewal --synchronous: primary's commit flushed -> durable** (commit probe; pg_stat_replication.flush_lsn read back to back), its own load run",
            c,
        ));
    }
    md.push_str(&row("commit probe resolution: one read of walship's durable position", at("commit_to_durable_us").get("read_us").unwrap_or(&null)));
    if let Some(c) = peer.get("commit_to_durable_us") {
        md.push_str(&row("commit probe resolution: one read of pg_receivewal's durable position", c.get("read_us").unwrap_or(&null)));
    }
    md.push_str("| *decomposition (walship)* | | | | | | |\n");
    md.push_str(&row("walship flush-to-durable-ack as the sender sees it (from its poller seeing a new flush LSN; one value per LSN seen; the commit row minus this is discovery)", ack));
    md.push_str(&row(
        "walship recv: data frame arrival to the ack covering it (the receiver's share of the ack latency)",
        at("recv_frame_to_durable_us"),
    ));
    md.push_str(&row("walship recv O_DIRECT write, same seconds", at("recv_write_us")));
    md.push_str(&row("walship recv fdatasync, same seconds (its final log line)", recv));
    md.push_str(&row("probe: 8 KiB write + fdatasync, **during walship's load**, same filesystem", probe_load));
    md.push_str(&row("probe: 8 KiB write + fdatasync, quiet (before the load, walship following, idle)", probe_quiet));
    if let Some(fl) = peer.get("flush_lag_us") {
        md.push_str(&row(
            &format!(
                "pg_receivewal --synchronous `flush_lag` (pg_stat_replication, sampled every {} ms; n = samples), its own load run",
                cfg.sample_ms
            ),
            fl,
        ));
        md.push_str(&row(
            "probe: 8 KiB write + fdatasync, during pg_receivewal's load",
            peer.get("probe_during_load_us").unwrap_or(&null),
        ));
    }
    let r = |k: &str| {
        m.path(&["verdict", k])
            .and_then(Json::as_f64)
            .map_or("?".into(), |v| format!("{v:.2}"))
    };
    let t = |k: &str| m.path(&["targets", k]).and_then(Json::as_bool).map_or("no verdict (a number is missing)", |b| if b { "**met**" } else { "**NOT MET**" });
    let tn = |k: &str| m.path(&["targets", k]).and_then(Json::as_f64).map_or("?".into(), |v| format!("{v:.0}"));
    md.push_str(&format!(
        "\nTargets (issue #15, ack latency = the commit probe rows): p50 <= pg_receivewal's in the same run: {} \
         (walship {} us vs {} us, {}x); p99 <= 2 x the fdatasync probe's p99 during walship's load: {} ({} us vs {} us).\n",
        t("p50_met"),
        tn("walship_p50_us"),
        tn("pg_receivewal_p50_us"),
        m.path(&["targets", "p50_ratio"]).and_then(Json::as_f64).map_or("?".into(), |v| format!("{v:.2}")),
        t("p99_met"),
        tn("walship_p99_us"),
        tn("p99_bound_us"),
    ));
    if let Some(pc) = m.get("poller_cost") {
        let v = |k: &str, prec: usize| pc.get(k).and_then(Json::as_f64).map_or("?".into(), |x| format!("{x:.prec$}"));
        md.push_str(&format!(
            "\nCost on the primary of finding new WAL (the sender's flush poller, `walship-horizon` backend): {} queries over \
             {} s of following ({}/s on average), {} of them woken by a write to pg_wal; its backend's CPU {} s in {} s idle \
             (server-wide {} transactions/s then) and {} s in {} s of load.\n",
            v("queries", 0),
            v("sender_seconds", 0),
            v("queries_per_s", 0),
            v("write_wakes", 0),
            v("quiet_backend_cpu_s", 2),
            v("quiet_seconds", 1),
            v("quiet_server_xacts_per_s", 0),
            v("load_backend_cpu_s", 2),
            v("load_seconds", 1),
        ));
    }
    md.push_str(&format!(
        "\nOlder target (issue #6, the sender's own clock: ack p99 within 2x a single fdatasync's p99 on the same disk, under the same load): \
         **{}** — ack p99 {} us vs 2 x {} us = {} us (ack p99 = {}x the probe's p99 during the load). Against the \
         receiver's own fdatasync p99 in the same seconds: {}x ({}); against the quiet probe's p99: {}x ({}).\n\n",
        if met { "met" } else { "NOT MET" },
        us(ack, "p99"),
        us(probe_load, "p99"),
        if bound.is_finite() { format!("{bound:.0}") } else { "?".into() },
        r("ratio_to_probe_during_load_p99"),
        r("ratio_to_recv_fdatasync_p99"),
        within2(m.path(&["verdict", "ratio_to_recv_fdatasync_p99"])),
        r("ratio_to_probe_quiet_p99"),
        within2(m.path(&["verdict", "ratio_to_probe_quiet_p99"])),
    ));
    // What bounds it: facts from this run only.
    md.push_str(&format!(
        "What bounds it: the median ack ({} us) is {:.1}x the median probe under the load ({} us) and {:.1}x the \
         receiver's median fdatasync ({} us). The sender's clock starts when its poller returns a new flush LSN; \
         an ack then needs the send, the receiver's O_DIRECT write, a group-commit fdatasync (under load a batch may \
         wait for the one in flight and up to `--fsync-interval-us` to grow) and the ack. ",
        us(ack, "p50"),
        num(ack, "p50") / num(probe_load, "p50"),
        us(probe_load, "p50"),
        num(ack, "p50") / num(recv, "p50"),
        us(recv, "p50"),
    ));
    let (ack_p99, recv_p99) = (num(ack, "p99"), num(recv, "p99"));
    if ack_p99 > 2.0 * recv_p99 {
        md.push_str(&format!(
            "At p99 the ack ({ack_p99:.0} us) is more than twice the receiver's own fdatasync p99 ({recv_p99:.0} us), so \
             most of the tail is not one fdatasync but waiting around it: for an earlier group commit, for a CPU \
             ({} cores shared by pgbench, PostgreSQL, sender, receiver and whatever else ran; load average above), \
             or for the poller. CPU seconds during the run: sender {:.2}, receiver {:.2}, pgbench {:.2}. ",
            f.nproc,
            m.path(&["send_cpu", "total_s"]).and_then(Json::as_f64).unwrap_or(f64::NAN),
            m.path(&["recv_cpu", "total_s"]).and_then(Json::as_f64).unwrap_or(f64::NAN),
            m.path(&["pgbench", "cpu_s"]).and_then(Json::as_f64).unwrap_or(f64::NAN),
        ));
    } else {
        md.push_str(&format!(
            "At p99 the ack ({ack_p99:.0} us) stays within twice the receiver's own fdatasync p99 ({recv_p99:.0} us): \
             the tail is the receiver's fdatasync. "
        ));
    }
    md.push_str(&format!(
        "The disk moved between quiet and loaded: probe p99 {} us quiet, {} us under the load.",
        us(probe_quiet, "p99"),
        us(probe_load, "p99"),
    ));
    if let Some(fl) = peer.get("flush_lag_us") {
        md.push_str(&format!(
            " Peer: pg_receivewal's flush_lag p50 {} us, p99 {} us against its own probe's p99 {} us ({:.2}x; sampled, \
             see the note).",
            us(fl, "p50"),
            us(fl, "p99"),
            us(peer.get("probe_during_load_us").unwrap_or(&null), "p99"),
            num(fl, "p99") / peer.get("probe_during_load_us").map_or(f64::NAN, |p| num(p, "p99")),
        ));
    }
    md.push_str("\n\n");
    if let Some(Json::Array(notes)) = m.get("notes") {
        for n in notes {
            if let Some(t) = n.as_str() {
                md.push_str(&format!("- {t}\n"));
            }
        }
    }
    md
}

fn run_bench(cfg: &Config, bin: &Path, root: &Path) -> Result<Json, String> {
    let mut m = Json::obj();
    let mut notes: Vec<Json> = Vec::new();
    // ---- cluster + data
    let t = Instant::now();
    let mut cluster = pg::Cluster::create(bin, root, 0, STEP_TIMEOUT)?;
    // ship.rs' cluster turns synchronous_commit off; a primary under test commits durably (the default).
    cluster.sql("ALTER SYSTEM SET synchronous_commit = on")?;
    cluster.sql("SELECT pg_reload_conf()")?;
    wait_for("synchronous_commit = on", Duration::from_secs(10), || {
        Ok(cluster.sql("SHOW synchronous_commit")? == "on")
    })?;
    m.set("server_version", cluster.sql("SHOW server_version").ok());
    cluster.sql("CREATE TABLE walship_commit_probe (id bigserial PRIMARY KEY, t timestamptz)")?;
    let pg_log = root.join("pg");
    let mut init = Command::new(bin.join("pgbench"));
    init.args(cluster.conn_args())
        .args(["-i", "-q", "-s", &cfg.scale.to_string(), "postgres"]);
    let init_f = run_cmd(&mut init, &pg_log, "pgbench-init", STEP_TIMEOUT)?;
    cluster.sql("CHECKPOINT")?;
    eprintln!(
        "latency bench: cluster on port {} and pgbench -i -s {} in {:.1} s (init {:.1} s)",
        cluster.port,
        cfg.scale,
        t.elapsed().as_secs_f64(),
        init_f.wall.as_secs_f64()
    );
    let conninfo = format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.sock.display(),
        cluster.port
    );

    // ---- walship recv + send (follow mode, slot)
    let recv_dir = root.join("recv");
    std::fs::create_dir_all(&recv_dir).map_err(|e| e.to_string())?;
    let key = root.join("walship-bench.key");
    std::fs::write(&key, "walship-bench-shared-key-0123456789\n").map_err(|e| format!("write {}: {e}", key.display()))?;
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let addr = format!("127.0.0.1:{port}");
    let metrics_port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let report_path = root.join("send-report.json");
    let recv_report_path = root.join("recv-report.json");
    let mut recv_cmd = Command::new(&cfg.walship_bin);
    recv_cmd
        .args(["recv", "--listen", &addr, "--dir"])
        .arg(&recv_dir)
        .arg("--report-json")
        .arg(&recv_report_path)
        .arg("--auth-key-file")
        .arg(&key)
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(&cfg.recv_extra)
        .env("NO_COLOR", "1");
    let mut send_cmd = Command::new(&cfg.walship_bin);
    send_cmd
        .args(["send", "--pg-wal"])
        .arg(cluster.data.join("pg_wal"))
        .args(["--to", &addr, "--conninfo", &conninfo, "--slot", SLOT_WALSHIP, "--report-json"])
        .arg(&report_path)
        .arg("--auth-key-file")
        .arg(&key)
        .args(&cfg.send_extra)
        .env("NO_COLOR", "1");
    m.set("recv_command", cmd_line(&recv_cmd)).set("send_command", cmd_line(&send_cmd));
    let poll = cfg
        .send_extra
        .iter()
        .position(|a| a == "--horizon-poll-interval")
        .and_then(|i| cfg.send_extra.get(i + 1).cloned())
        .unwrap_or_else(|| "100ms (default)".into());
    m.set("horizon_poll_interval", poll);

    let mut recv = Guard(Some(spawn(&mut recv_cmd, root, "recv").map_err(|e| format!("walship recv: {e}"))?));
    wait_for("walship recv to listen", Duration::from_secs(15), || {
        if recv.get().exited() {
            return Err(format!("walship recv exited: {}", tail(&read_log(root, "recv", "stderr"), 600)));
        }
        Ok(tcp_listening(port))
    })?;
    let mut send = Guard(Some(spawn(&mut send_cmd, root, "send").map_err(|e| format!("walship send: {e}"))?));
    wait_for("walship send to follow the server", Duration::from_secs(30), || {
        if send.get().exited() {
            return Err(format!("walship send exited: {}", tail(&read_log(root, "send", "stderr"), 600)));
        }
        Ok(read_log(root, "send", "stderr").contains("following a live"))
    })?;
    eprintln!("latency bench: walship follows (slot {SLOT_WALSHIP}), receiver on {addr}");
    let send_started = Instant::now();
    // The cost on the primary of finding new WAL: the sender's flush poller's backend.
    let poller_pid: Option<u32> = cluster
        .sql("SELECT pid FROM pg_stat_activity WHERE application_name = 'walship-horizon' LIMIT 1")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let xacts = |c: &pg::Cluster| -> f64 {
        c.sql("SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres'").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(f64::NAN)
    };
    let (cpu_q0, xact_q0, t_q0) = (poller_pid.map(backend_cpu_s), xacts(&cluster), Instant::now());

    // ---- quiet probe (walship idle, following)
    let probe_dir = root.join("probe");
    std::fs::create_dir_all(&probe_dir).map_err(|e| e.to_string())?;
    let no_stop = AtomicBool::new(false);
    let (quiet, quiet_s) = fsync_probe(
        &probe_dir,
        "quiet.dat",
        &no_stop,
        Duration::ZERO,
        Duration::from_secs(cfg.quiet_seconds),
        cfg.probe_interval,
    )?;
    eprintln!(
        "latency bench: quiet probe {} ops in {quiet_s:.1} s: p50 {} us p99 {} us max {} us",
        quiet.len(),
        quiet.value_at_quantile(0.5),
        quiet.value_at_quantile(0.99),
        quiet.max()
    );
    m.set("probe_quiet_us", hist_json(&quiet));
    m.set("probe_quiet_seconds", quiet_s);
    // Stats reach pg_stat_database within a second of a transaction's end.
    std::thread::sleep(Duration::from_millis(1200));
    let (cpu_q1, xact_q1, quiet_wall) = (poller_pid.map(backend_cpu_s), xacts(&cluster), t_q0.elapsed().as_secs_f64());

    // ---- phase 1: the load with walship following, and the probe beside it
    let p1 = load_phase(cfg, &cluster, &probe_dir, "walship", &pg_log, None, (&conninfo, Durable::File { dir: recv_dir.clone() }))?;
    m.set("pgbench", p1.pgbench.clone())
        .set("pgbench_command", p1.command.clone())
        .set("probe_during_load_us", hist_json(&p1.probe))
        .set("commit_to_durable_us", commit_probe_json(&p1.commit))
        .set("probe_during_load_seconds", p1.probe_s)
        .set("wal_bytes_during_load", p1.wal_bytes)
        .set("flush_lsn_after_load", pg::fmt_lsn(p1.lsn_after));
    let cpu_l1 = poller_pid.map(backend_cpu_s);
    let mut poller_cost = Json::obj();
    let d = |a: Option<Option<f64>>, b: Option<Option<f64>>| match (a.flatten(), b.flatten()) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    poller_cost
        .set("backend_pid", poller_pid.map(u64::from))
        .set("quiet_seconds", quiet_wall)
        .set("quiet_backend_cpu_s", d(cpu_q0, cpu_q1))
        .set("quiet_server_xacts_per_s", (xact_q1 - xact_q0) / quiet_wall)
        .set("load_seconds", p1.wall_s)
        .set("load_backend_cpu_s", d(cpu_q1, cpu_l1));

    // ---- stop: sender (drains, writes its report), then receiver
    for (g, what, label) in [(&send, "walship send", "send"), (&recv, "walship recv", "recv")] {
        if g.get().exited() {
            return Err(format!("{what} died during the load: {}", tail(&read_log(root, label, "stderr"), 800)));
        }
    }
    let send_f = send.stop(libc::SIGTERM, Duration::from_secs(60))?;
    if !send_f.ok() {
        return Err(format!("walship send after SIGTERM: {}", send_f.describe_failure()));
    }
    let send_wall = send_started.elapsed().as_secs_f64();
    let send_log = strip_ansi(&send_f.stderr);
    if let Some(line) = send_log.lines().find(|l| l.contains("flush poller:")) {
        let after = |pat: &str| line.split(pat).nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()?.parse::<u64>().ok());
        poller_cost
            .set("queries", after("flush poller: "))
            .set("write_wakes", after("queries, "))
            .set("sender_seconds", send_wall)
            .set("queries_per_s", after("flush poller: ").map(|q| q as f64 / send_wall));
    }
    m.set("poller_cost", poller_cost);
    let recv_f = recv.stop(libc::SIGTERM, Duration::from_secs(30))?;
    if !recv_f.ok() {
        return Err(format!("walship recv after SIGTERM: {}", recv_f.describe_failure()));
    }
    let report_text =
        std::fs::read_to_string(&report_path).map_err(|e| format!("sender report {}: {e}", report_path.display()))?;
    let report = Json::parse(report_text.trim()).map_err(|e| format!("sender report: {e}: {report_text}"))?;
    let lat = report
        .get("ack_latency_us")
        .cloned()
        .ok_or_else(|| format!("sender report has no ack_latency_us: {report_text}"))?;
    if lat.get("p99").and_then(Json::as_u64).unwrap_or(0) == 0 {
        return Err(format!("sender recorded no ack latency: {report_text}"));
    }
    let recv_summary = read_recv_report(&recv_report_path);
    if recv_summary == Json::Null {
        return Err(format!(
            "no report {} from walship recv: {}",
            recv_report_path.display(),
            tail(&strip_ansi(&recv_f.stderr), 600)
        ));
    }
    let mut recv_json = Json::obj();
    recv_json.set("count", recv_summary.get("fdatasyncs").cloned());
    for k in ["p50", "p99", "max"] {
        recv_json.set(k, recv_summary.get(format!("{k}_us")).cloned());
    }
    // The receiver's own share of the ack latency, and its O_DIRECT writes.
    for (key, prefix, count) in [("recv_frame_to_durable_us", "frame_to_durable", None), ("recv_write_us", "write", Some("writes"))] {
        let mut o = Json::obj();
        o.set("count", count.and_then(|c| recv_summary.get(c).cloned()).unwrap_or(Json::Null));
        o.set("p50", recv_summary.get(format!("{prefix}_p50_us")).cloned());
        o.set("p99", recv_summary.get(format!("{prefix}_p99_us")).cloned());
        m.set(key, o);
    }
    m.set("walship_ack_latency_us", lat.clone());
    m.set("recv_fdatasync_us", recv_json);
    m.set("recv_summary", recv_summary);
    m.set("send_report", report.clone());
    m.set("send_cpu", cpu_json(&send_f.cpu)).set("recv_cpu", cpu_json(&recv_f.cpu));
    // The sender must have shipped at least through the end of the load.
    match report.get("end_lsn").and_then(Json::as_str).and_then(pg::parse_pg_lsn) {
        Some(end) if end >= p1.lsn_after => {}
        other => {
            return Err(format!(
                "sender report end_lsn {other:?} is not past the flush LSN after the load {}",
                pg::fmt_lsn(p1.lsn_after)
            ))
        }
    }
    eprintln!(
        "latency bench: walship ack p50 {} us p99 {} us p99.9 {} us max {} us",
        lat.get("p50").and_then(Json::as_u64).unwrap_or(0),
        lat.get("p99").and_then(Json::as_u64).unwrap_or(0),
        lat.get("p999").and_then(Json::as_u64).unwrap_or(0),
        lat.get("max").and_then(Json::as_u64).unwrap_or(0),
    );
    notes.push(Json::from(format!(
        "Commit probe (the headline rows): one session commits a row every {} ms beside the load; the clock starts when \
         its commit returns (with synchronous_commit = on the primary has flushed it; starting there rather than at the \
         flush itself leaves out one loopback round trip, the same for both followers), it reads \
         pg_current_wal_flush_lsn() (at or past its commit record; under load often past it, again the same for both) \
         and then reads the follower's durable position back to back until it passes that LSN, pausing 50 us \
         between reads (the same for both), and times it to the middle of the read that saw it. walship's position is read from the receiver's `.walship-flushed` (a file \
         read, microseconds; written when its flushed LSN advances, i.e. when the ack is sent), pg_receivewal's from \
         pg_stat_replication.flush_lsn (what the walsender got in its flush report; one SQL round trip); the \
         'resolution' rows give one read's own time: a read is at most that late, timing to its middle halves the \
         difference between the two methods.",
        cfg.commit_probe_interval_ms
    )));
    notes.push(Json::from(format!(
        "Probe: pg_test_fsync's fdatasync test (8 KiB buffered write at offset 0 of a written 16 MiB file, then \
         fdatasync; the pair timed), one every {} ms, in a thread of the bench, on the receiver's filesystem. It is \
         paced so that it samples the disk's latency under the load without adding much to it.",
        cfg.probe_interval.as_millis()
    )));

    // ---- phase 2 (peer): the same load again with pg_receivewal --synchronous following instead
    notes.push(Json::from(format!(
        "One run, {} s of load: each p99 rests on the worst 1% of its values ({} probe ops; the receiver's {} \
         fdatasyncs), and on this shared host single disk stalls of tens to hundreds of ms (the probe's max, quiet \
         or loaded) move p99 by several x between runs. The verdict compares numbers taken in the same seconds; \
         read it together with the earlier sections.",
        cfg.seconds,
        p1.probe.len(),
        m.path(&["recv_fdatasync_us", "count"]).and_then(Json::as_u64).unwrap_or(0),
    )));

    if cfg.peer {
        let prw_dir = root.join("pg_receivewal");
        std::fs::create_dir_all(&prw_dir).map_err(|e| e.to_string())?;
        // Created now, so it starts at the current WAL position (no catch-up of phase 1's WAL).
        cluster.sql(&format!("SELECT pg_create_physical_replication_slot('{SLOT_PEER}', true)"))?;
        let mut c = Command::new(bin.join("pg_receivewal"));
        c.args(cluster.conn_args())
            .arg("-D")
            .arg(&prw_dir)
            .arg(format!("--slot={SLOT_PEER}"))
            .args(["--synchronous", "--no-loop", "--no-password"]);
        m.set("pg_receivewal_command", cmd_line(&c));
        let mut g = Guard(Some(spawn(&mut c, root, "pg_receivewal").map_err(|e| format!("pg_receivewal: {e}"))?));
        wait_for("pg_receivewal to stream", Duration::from_secs(30), || {
            if g.get().exited() {
                return Err(format!("pg_receivewal exited: {}", tail(&read_log(root, "pg_receivewal", "stderr"), 600)));
            }
            Ok(cluster.sql("SELECT state FROM pg_stat_replication WHERE application_name = 'pg_receivewal'")? == "streaming")
        })?;
        eprintln!("latency bench: pg_receivewal --synchronous streams (slot {SLOT_PEER})");
        let durable = Durable::Replication { conninfo: conninfo.clone(), app: "pg_receivewal".into() };
        let p2 = load_phase(cfg, &cluster, &probe_dir, "pg_receivewal", &pg_log, Some(&conninfo), (&conninfo, durable))?;
        if g.get().exited() {
            return Err(format!(
                "pg_receivewal died during the load: {}",
                tail(&read_log(root, "pg_receivewal", "stderr"), 800)
            ));
        }
        let f = g.stop(libc::SIGINT, Duration::from_secs(15))?;
        let mut peer = Json::obj();
        peer.set("pgbench", p2.pgbench)
            .set("probe_during_load_us", hist_json(&p2.probe))
            .set("commit_to_durable_us", commit_probe_json(&p2.commit))
            .set("probe_during_load_seconds", p2.probe_s)
            .set("wal_bytes_during_load", p2.wal_bytes)
            .set("exit_code", f.exit_code.map(|c| c as u64))
            .set("cpu", cpu_json(&f.cpu));
        match p2.sampled {
            Some(Ok((flush, write, samples, nulls))) => {
                let mut fl = hist_json(&flush);
                fl.set("samples", samples).set("null_samples", nulls);
                peer.set("flush_lag_us", fl).set("write_lag_us", hist_json(&write));
            }
            Some(Err(e)) => notes.push(Json::from(format!("flush_lag sampler failed: {e}"))),
            None => {}
        }
        m.set("pg_receivewal", peer);
        notes.push(Json::from(format!(
            "Peer (pg_receivewal --synchronous, its own slot created just before its phase): a second pgbench run of \
             the same length right after walship's, with pg_receivewal as the only follower and its own probe. \
             `flush_lag` is PostgreSQL's lag tracker (time from the walsender sending a flushed LSN to the standby's \
             flush report covering it), read every {} ms: the latest value, time-weighted (a value counts for as long \
             as it stays current, so one stall fills many samples), not one value per flush report. It is not the same clock as walship's (which starts when \
             the sender's poll first sees the flush LSN), and not the same seconds: compare each to its own probe.",
            cfg.sample_ms
        )));
    }
    m.set("notes", Json::Array(notes));
    cluster.stop(STEP_TIMEOUT)?;
    Ok(m)
}

/// CPU seconds (user + system) a process has used so far, from /proc/PID/stat.
fn backend_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(") ")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3; utime and stime are fields 14 and 15.
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

fn cpu_json(c: &Cpu) -> Json {
    let mut o = Json::obj();
    o.set("user_s", c.user_s).set("sys_s", c.sys_s).set("total_s", c.total_s());
    o
}

type Sampled = Result<(Histogram<u64>, Histogram<u64>, u64, u64), String>;

struct Phase {
    command: String,
    /// Wall time of the pgbench run.
    wall_s: f64,
    pgbench: Json,
    probe: Histogram<u64>,
    probe_s: f64,
    wal_bytes: u64,
    lsn_after: u64,
    sampled: Option<Sampled>,
    commit: Result<CommitProbe, String>,
}

/// `pgbench -T`, with the paced fdatasync probe (and, given a conninfo, the flush_lag sampler) beside it.
fn load_phase(
    cfg: &Config,
    cluster: &pg::Cluster,
    probe_dir: &Path,
    name: &str,
    log_dir: &Path,
    sampler: Option<&str>,
    (probe_conninfo, durable): (&str, Durable),
) -> Result<Phase, String> {
    let lsn = |c: &pg::Cluster| -> Result<u64, String> {
        let s = c.sql("SELECT pg_current_wal_flush_lsn()")?;
        pg::parse_pg_lsn(&s).ok_or_else(|| format!("flush lsn {s:?}"))
    };
    // Every phase starts right after a checkpoint, so each carries the same full-page-image burst.
    cluster.sql("CHECKPOINT")?;
    let lsn_before = lsn(cluster)?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe_thread = {
        let (stop, dir, file) = (stop.clone(), probe_dir.to_path_buf(), format!("load-{name}.dat"));
        let max = Duration::from_secs(cfg.seconds.saturating_sub(1).max(1));
        let interval = cfg.probe_interval;
        std::thread::spawn(move || fsync_probe(&dir, &file, &stop, Duration::from_millis(500), max, interval))
    };
    let commit_thread = {
        let (stop, ci) = (stop.clone(), probe_conninfo.to_string());
        let interval = Duration::from_millis(cfg.commit_probe_interval_ms);
        std::thread::spawn(move || commit_probe(&ci, &durable, &stop, Duration::from_millis(500), interval))
    };
    let sampler_thread = sampler.map(|ci| {
        let (stop, ci) = (stop.clone(), ci.to_string());
        let period = Duration::from_millis(cfg.sample_ms);
        std::thread::spawn(move || lag_sampler(&ci, "pg_receivewal", &stop, period))
    });
    let mut load = Command::new(cluster.bin.join("pgbench"));
    load.args(cluster.conn_args()).args([
        "-T",
        &cfg.seconds.to_string(),
        "-c",
        &cfg.clients.to_string(),
        "-P",
        "5",
        "postgres",
    ]);
    let command = cmd_line(&load);
    eprintln!("latency bench: [{name}] {command}");
    let load_f = run_cmd(&mut load, log_dir, &format!("pgbench-T-{name}"), Duration::from_secs(cfg.seconds + 120));
    stop.store(true, Ordering::Relaxed);
    let probe = probe_thread.join().map_err(|_| "probe thread panicked".to_string())?;
    let sampled = sampler_thread.map(|t| t.join().unwrap_or_else(|_| Err("sampler thread panicked".into())));
    let commit = commit_thread.join().unwrap_or_else(|_| Err("commit probe thread panicked".into()));
    if let Ok(c) = &commit {
        eprintln!(
            "latency bench: [{name}] commit to durable: {} probes, p50 {} us p99 {} us max {} us ({} timeouts; one read of the durable position p50 {} us)",
            c.latency.len(),
            c.latency.value_at_quantile(0.5),
            c.latency.value_at_quantile(0.99),
            c.latency.max(),
            c.timeouts,
            c.read_us.value_at_quantile(0.5)
        );
    }
    let load_f = load_f?;
    let lsn_after = lsn(cluster)?;
    let (probe, probe_s) = probe?;
    eprintln!(
        "latency bench: [{name}] probe {} ops in {probe_s:.1} s: p50 {} us p99 {} us max {} us",
        probe.len(),
        probe.value_at_quantile(0.5),
        probe.value_at_quantile(0.99),
        probe.max()
    );
    let out = &load_f.stdout;
    let mut pgb = Json::obj();
    pgb.set("tps", f64_after(out, "tps = "))
        .set("latency_avg_ms", f64_after(out, "latency average = "))
        .set("latency_stddev_ms", f64_after(out, "latency stddev = "))
        .set("transactions", num_after(out, "number of transactions actually processed: "))
        .set("cpu_s", load_f.cpu.total_s())
        .set("tps_line", out.lines().find(|l| l.starts_with("tps")).map(String::from));
    Ok(Phase {
        command,
        wall_s: load_f.wall.as_secs_f64(),
        pgbench: pgb,
        probe,
        probe_s,
        wal_bytes: lsn_after.saturating_sub(lsn_before),
        lsn_after,
        sampled,
        commit,
    })
}

fn run_cmd(cmd: &mut Command, log_dir: &Path, label: &str, timeout: Duration) -> Result<Finished, String> {
    match common::run(cmd, log_dir, label, timeout) {
        Ok(f) if f.ok() => Ok(f),
        Ok(f) => Err(format!("{label} failed: {}", f.describe_failure())),
        Err(e) => Err(format!("{label} could not start: {e}")),
    }
}
