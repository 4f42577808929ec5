//! Streaming replication through walship against PostgreSQL's own, in one run (issue #14):
//!
//! a. Replay lag of a hot standby streaming from the WAL hub (primary -> `walship send` ->
//!    `walship recv --serve-replication` -> standby "via_hub") against a hot standby streaming from
//!    the primary directly ("direct"); both from the same base backup, both running at once under the
//!    same pgbench load, measured the same way: a probe session commits one row on the primary
//!    (`synchronous_commit = on` in that session, so the commit is flushed when it returns), reads
//!    `pg_current_wal_flush_lsn()` (at or past its commit record), and one poller thread per standby
//!    reads `pg_last_wal_replay_lsn()` back to back until it passes that LSN. Target: the hub adds
//!    under 1 ms at p50.
//! b. Commit latency with a synchronous standby: `synchronous_commit = on` and
//!    `synchronous_standby_names` naming, in turn, `walship recv --from-postgres` ("walship"), the
//!    real standby ("direct") and `pg_receivewal --synchronous` ("pg_receivewal"); all three stream
//!    all the time (the two not named are asynchronous), so each run carries the same background;
//!    the same pgbench each time, after a CHECKPOINT; rounds interleave the three. Target: walship
//!    gives higher tps than both.
//!
//! PostgreSQL installed and run as root, else the bench says why and exits 0 (as benches/latency.rs).
//! Outputs `results/replication-<date>.json` and a section appended to `results/REPLICATION.md`.
//!
//! Environment: `WALSHIP_REPL_SECONDS` (part a load, default 20), `WALSHIP_REPL_SYNC_SECONDS` (each
//! part b run, default 10), `WALSHIP_REPL_ROUNDS` (part b rounds, default 2), `WALSHIP_REPL_CLIENTS`
//! (pgbench -c, default 4), `WALSHIP_REPL_SCALE` (pgbench -i -s, default 10),
//! `WALSHIP_REPL_PROBE_INTERVAL_MS` (default 20), `WALSHIP_REPL_SEND_ARGS` (extra `walship send`
//! arguments for part a, whitespace-split, e.g. `--horizon-poll-interval 250us`), `WALSHIP_BENCH_DIR`, `WALSHIP_BENCH_RESULTS`,
//! `WALSHIP_BIN`, `WALSHIP_BENCH_KEEP=1`.
//!
//! `cargo bench --bench replication` (about 2.5 minutes with the defaults).

mod common;

use common::*;
use hdrhistogram::Histogram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STEP_TIMEOUT: Duration = Duration::from_secs(120);
const HUB_USER: &str = "rep";
const HUB_PASSWORD: &str = "walship-bench-secret";
const SLOT_SEND: &str = "walship_hub";
const SLOT_FROM_PG: &str = "walship_sync";
const SLOT_RECEIVEWAL: &str = "pg_receivewal_sync";
const SYNC_FOLLOWERS: [&str; 3] = ["walship", "direct", "pg_receivewal"];

struct Config {
    seconds: u64,
    sync_seconds: u64,
    rounds: u32,
    clients: u32,
    scale: u32,
    probe_interval: Duration,
    send_extra: Vec<String>,
    scratch_parent: PathBuf,
    results_dir: PathBuf,
    walship_bin: PathBuf,
    keep: bool,
}

fn env_num<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().map_err(|_| format!("bad {name} {v:?}")),
        Err(_) => Ok(default),
    }
}

impl Config {
    fn from_env() -> Result<Config, String> {
        Ok(Config {
            seconds: env_num("WALSHIP_REPL_SECONDS", 20u64)?.max(3),
            sync_seconds: env_num("WALSHIP_REPL_SYNC_SECONDS", 10u64)?.max(2),
            rounds: env_num("WALSHIP_REPL_ROUNDS", 2u32)?.max(1),
            clients: env_num("WALSHIP_REPL_CLIENTS", 4u32)?.max(1),
            scale: env_num("WALSHIP_REPL_SCALE", 10u32)?.max(1),
            probe_interval: Duration::from_millis(env_num("WALSHIP_REPL_PROBE_INTERVAL_MS", 20u64)?),
            send_extra: std::env::var("WALSHIP_REPL_SEND_ARGS").map(|v| v.split_whitespace().map(String::from).collect()).unwrap_or_default(),
            scratch_parent: std::env::var_os("WALSHIP_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| target_dir().join("bench-scratch")),
            results_dir: std::env::var_os("WALSHIP_BENCH_RESULTS")
                .map(PathBuf::from)
                .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("results")),
            walship_bin: std::env::var_os("WALSHIP_BIN").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_walship"))),
            keep: env_flag("WALSHIP_BENCH_KEEP").unwrap_or(false),
        })
    }
}

fn main() {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("replication bench: {e}");
            std::process::exit(2);
        }
    };
    // No PostgreSQL or not root: say why, measure nothing.
    let bin = match pg::runnable_bin() {
        Ok(b) => b,
        Err(why) => {
            eprintln!("replication bench skipped: {why}");
            return;
        }
    };
    let stamp = utc_stamp();
    let root = cfg.scratch_parent.join(format!("replication-{stamp}"));
    let result = std::fs::create_dir_all(&root).map_err(|e| format!("mkdir {}: {e}", root.display())).and_then(|_| run_bench(&cfg, &bin, &root));
    match result {
        Ok(m) => {
            if let Err(e) = write_results(&cfg, &stamp, &m) {
                eprintln!("replication bench: {e}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("replication bench: {e} (scratch {})", root.display());
            std::process::exit(1);
        }
    }
    if !cfg.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
}

fn utc_stamp() -> String {
    command_output("date", &["-u", "+%Y%m%dT%H%M%SZ"]).map(|s| s.trim().to_string()).unwrap_or_else(|| "unknown".into())
}

/// A child killed (SIGKILL) and reaped if the bench leaves early.
struct Guard(Option<Running>, &'static str);

impl Guard {
    fn check(&self, root: &Path) -> Result<(), String> {
        match &self.0 {
            Some(r) if r.exited() => Err(format!("{} exited: {}", self.1, tail(&read_log(root, self.1, "stderr"), 800))),
            _ => Ok(()),
        }
    }
    fn stop(&mut self) {
        if let Some(r) = self.0.take() {
            r.signal(libc::SIGTERM);
            let _ = r.wait(Duration::from_secs(30));
        }
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

fn read_log(root: &Path, label: &str, stream: &str) -> String {
    std::fs::read_to_string(root.join(format!("{label}.{stream}"))).unwrap_or_default()
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
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_cmd(cmd: &mut Command, log_dir: &Path, label: &str, timeout: Duration) -> Result<Finished, String> {
    match common::run(cmd, log_dir, label, timeout) {
        Ok(f) if f.ok() => Ok(f),
        Ok(f) => Err(format!("{label} failed: {}", f.describe_failure())),
        Err(e) => Err(format!("{label} could not start: {e}")),
    }
}

fn as_postgres(bin: &Path, tool: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(tool));
    c
}

/// A hot standby from a copy of the base backup, on its own port and socket.
struct Standby {
    bin: PathBuf,
    data: PathBuf,
    sock: PathBuf,
    port: u16,
    running: bool,
}

impl Standby {
    fn create(bin: &Path, backup: &Path, root: &Path, name: &str, primary_conninfo: &str) -> Result<Standby, String> {
        let base = root.join(name);
        let data = base.join("data");
        let sock = base.join("sock");
        std::fs::create_dir_all(&sock).map_err(|e| e.to_string())?;
        run_cmd(Command::new("cp").arg("-a").arg(backup).arg(&data), root, &format!("cp-{name}"), STEP_TIMEOUT)?;
        let port = free_port().map_err(|e| format!("no free port: {e}"))?;
        let conf = format!(
            "\n# walship replication bench: standby {name}\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
             hot_standby = on\nprimary_conninfo = '{}'\n",
            sock.display(),
            primary_conninfo.replace('\'', "\\'")
        );
        let mut f = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.auto.conf")).map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut f, conf.as_bytes()).map_err(|e| e.to_string())?;
        std::fs::write(data.join("standby.signal"), "").map_err(|e| e.to_string())?;
        run_cmd(Command::new("chown").args(["-R", "postgres:postgres"]).arg(&base), root, &format!("chown-{name}"), STEP_TIMEOUT)?;
        run_cmd(Command::new("chmod").arg("700").arg(&data), root, &format!("chmod-{name}"), STEP_TIMEOUT)?;
        let mut s = Standby { bin: bin.to_path_buf(), data, sock, port, running: false };
        let mut start = as_postgres(bin, "pg_ctl");
        start.arg("-D").arg(&s.data).arg("-l").arg(s.data.join("server.log")).args(["-w", "-t", "60", "start"]);
        run_cmd(&mut start, &base, "pg_ctl-start", STEP_TIMEOUT)?;
        s.running = true;
        Ok(s)
    }

    fn conninfo(&self) -> String {
        format!("host={} port={} user=postgres dbname=postgres", self.sock.display(), self.port)
    }

    fn stop(&mut self) {
        if self.running {
            let mut c = as_postgres(&self.bin, "pg_ctl");
            c.arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "-t", "60", "stop"]);
            let _ = common::run(&mut c, self.data.parent().unwrap_or(Path::new("/tmp")), "pg_ctl-stop", STEP_TIMEOUT);
            self.running = false;
        }
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        self.stop();
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds")
}

fn hist_json(h: &Histogram<u64>) -> Json {
    serde_json::json!({
        "count": h.len(),
        "p50_us": h.value_at_quantile(0.5),
        "p90_us": h.value_at_quantile(0.9),
        "p99_us": h.value_at_quantile(0.99),
        "max_us": h.max(),
        "mean_us": h.mean(),
    })
}

fn client(conninfo: &str) -> Result<postgres::Client, String> {
    postgres::Client::connect(conninfo, postgres::NoTls).map_err(|e| format!("connect {conninfo}: {e}"))
}

struct ReplayProbe {
    /// Per standby: commit returned -> replay position past the commit's flush LSN, microseconds.
    latency: Vec<Histogram<u64>>,
    /// Per standby: one read of pg_last_wal_replay_lsn() (the resolution).
    read_us: Vec<Histogram<u64>>,
    timeouts: Vec<u64>,
    probes: u64,
}

/// One probe every `interval` until `stop`: commit on the primary, then every standby's poller
/// (one thread each, started at the same instant) polls its replay position past the LSN.
fn replay_probe(primary: &str, standbys: &[String], stop: &AtomicBool, interval: Duration) -> Result<ReplayProbe, String> {
    let mut c = client(primary)?;
    c.batch_execute("SET synchronous_commit = on; CREATE TABLE IF NOT EXISTS walship_replay_probe (id bigserial PRIMARY KEY, t timestamptz)")
        .map_err(|e| format!("probe: {e}"))?;
    let insert = c.prepare("INSERT INTO walship_replay_probe (t) VALUES (clock_timestamp())").map_err(|e| format!("probe: {e}"))?;
    let flush = c.prepare("SELECT (pg_current_wal_flush_lsn() - '0/0')::float8").map_err(|e| format!("probe: {e}"))?;
    let mut pollers = Vec::new();
    for ci in standbys {
        let (job_tx, job_rx) = mpsc::channel::<(u64, Instant)>();
        let (res_tx, res_rx) = mpsc::channel::<Result<(Option<u64>, Vec<u64>), String>>();
        let mut s = client(ci)?;
        let q = s.prepare("SELECT coalesce((pg_last_wal_replay_lsn() - '0/0')::float8, 0)").map_err(|e| format!("standby probe: {e}"))?;
        std::thread::spawn(move || {
            for (target, t0) in job_rx {
                let mut reads = Vec::new();
                let r = loop {
                    let t = Instant::now();
                    let pos = match s.query_one(&q, &[]) {
                        Ok(row) => row.get::<_, f64>(0) as u64,
                        Err(e) => break Err(format!("standby probe: {e}")),
                    };
                    reads.push((t.elapsed().as_micros() as u64).max(1));
                    if pos >= target {
                        break Ok((Some((t0.elapsed().as_micros() as u64).max(1)), std::mem::take(&mut reads)));
                    }
                    if t0.elapsed() > Duration::from_secs(10) {
                        break Ok((None, std::mem::take(&mut reads)));
                    }
                };
                if res_tx.send(r).is_err() {
                    return;
                }
            }
        });
        pollers.push((job_tx, res_rx));
    }
    let n = standbys.len();
    let mut out = ReplayProbe { latency: (0..n).map(|_| new_hist()).collect(), read_us: (0..n).map(|_| new_hist()).collect(), timeouts: vec![0; n], probes: 0 };
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(d) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        next = Instant::now() + interval;
        c.execute(&insert, &[]).map_err(|e| format!("probe insert: {e}"))?;
        let t0 = Instant::now();
        let target = c.query_one(&flush, &[]).map_err(|e| format!("probe flush lsn: {e}"))?.get::<_, f64>(0) as u64;
        for (tx, _) in &pollers {
            tx.send((target, t0)).map_err(|_| "a standby poller died".to_string())?;
        }
        for (i, (_, rx)) in pollers.iter().enumerate() {
            let (lat, reads) = rx.recv().map_err(|_| "a standby poller died".to_string())??;
            match lat {
                Some(us) => {
                    let _ = out.latency[i].record(us);
                }
                None => out.timeouts[i] += 1,
            }
            for r in reads {
                let _ = out.read_us[i].record(r);
            }
        }
        out.probes += 1;
    }
    Ok(out)
}

/// The hub receiver's fdatasync count and total seconds, from its /metrics.
fn fsync_totals(port: u16) -> Result<(u64, f64), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("metrics: {e}"))?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| format!("metrics: {e}"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| format!("metrics: {e}"))?;
    let value = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse::<f64>().ok());
    let count = value("walship_recv_fsync_duration_seconds_count ").ok_or("metrics: no fdatasync count")?;
    let sum = value("walship_recv_fsync_duration_seconds_sum ").ok_or("metrics: no fdatasync sum")?;
    Ok((count as u64, sum))
}

fn f64_after(text: &str, pat: &str) -> Option<f64> {
    let i = text.find(pat)? + pat.len();
    text[i..].split_whitespace().next()?.parse().ok()
}

fn pgbench(bin: &Path, cluster: &pg::Cluster, cfg: &Config, seconds: u64, root: &Path, label: &str) -> Result<Json, String> {
    let mut load = Command::new(bin.join("pgbench"));
    load.args(cluster.conn_args()).args(["-T", &seconds.to_string(), "-c", &cfg.clients.to_string(), "-j", "2", "postgres"]);
    let command = cmd_line(&load);
    let f = run_cmd(&mut load, root, label, Duration::from_secs(seconds + 120))?;
    let out = &f.stdout;
    Ok(serde_json::json!({
        "command": command,
        "tps": f64_after(out, "tps = "),
        "latency_avg_ms": f64_after(out, "latency average = "),
        "transactions": num_after(out, "number of transactions actually processed: "),
    }))
}

fn lsn_of(cluster: &pg::Cluster, sql: &str) -> Result<u64, String> {
    let s = cluster.sql(sql)?;
    pg::parse_pg_lsn(&s).ok_or_else(|| format!("{sql}: {s:?}"))
}

fn run_bench(cfg: &Config, bin: &Path, root: &Path) -> Result<Json, String> {
    let mut m = Json::obj();
    let t_all = Instant::now();
    // ---- primary
    let mut cluster = pg::Cluster::create(bin, root, 1024, STEP_TIMEOUT)?;
    m.set("server_version", cluster.sql("SHOW server_version").ok());
    let primary_ci = format!("host={} port={} user=postgres dbname=postgres", cluster.sock.display(), cluster.port);
    let mut init = Command::new(bin.join("pgbench"));
    init.args(cluster.conn_args()).args(["-i", "-q", "-s", &cfg.scale.to_string(), "postgres"]);
    run_cmd(&mut init, root, "pgbench-init", STEP_TIMEOUT)?;
    // walship send makes its own slot (SLOT_SEND); walship --from-postgres would too.
    for slot in [SLOT_FROM_PG, SLOT_RECEIVEWAL] {
        cluster.sql(&format!("SELECT pg_create_physical_replication_slot('{slot}', true)"))?;
    }

    // ---- walship send -> walship recv --serve-replication (the hub)
    let recv_dir = root.join("hub-recv");
    std::fs::create_dir_all(&recv_dir).map_err(|e| e.to_string())?;
    let key = root.join("walship-bench.key");
    std::fs::write(&key, "walship-bench-shared-key-0123456789\n").map_err(|e| e.to_string())?;
    let pw = root.join("standbys.pw");
    std::fs::write(&pw, format!("{HUB_USER}:{HUB_PASSWORD}\n")).map_err(|e| e.to_string())?;
    let port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let hub_port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let metrics_port = free_port().map_err(|e| format!("no free port: {e}"))?;
    let addr = format!("127.0.0.1:{port}");
    let mut recv_cmd = Command::new(&cfg.walship_bin);
    recv_cmd
        .args(["recv", "--listen", &addr, "--dir"])
        .arg(&recv_dir)
        .arg("--auth-key-file")
        .arg(&key)
        .args(["--serve-replication", &format!("127.0.0.1:{hub_port}"), "--replication-password-file"])
        .arg(&pw)
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .env("NO_COLOR", "1");
    let mut send_cmd = Command::new(&cfg.walship_bin);
    send_cmd
        .args(["send", "--pg-wal"])
        .arg(cluster.data.join("pg_wal"))
        .args(["--to", &addr, "--conninfo", &primary_ci, "--slot", SLOT_SEND, "--auth-key-file"])
        .arg(&key)
        .args(&cfg.send_extra)
        .env("NO_COLOR", "1");
    m.set("hub_recv_command", cmd_line(&recv_cmd)).set("hub_send_command", cmd_line(&send_cmd));
    let recv = Guard(Some(spawn(&mut recv_cmd, root, "hub-recv").map_err(|e| format!("walship recv: {e}"))?), "hub-recv");
    wait_for("walship recv to listen", Duration::from_secs(15), || {
        recv.check(root)?;
        Ok(tcp_listening(port) && tcp_listening(hub_port))
    })?;
    let send = Guard(Some(spawn(&mut send_cmd, root, "hub-send").map_err(|e| format!("walship send: {e}"))?), "hub-send");
    wait_for("walship send to follow the server", Duration::from_secs(30), || {
        send.check(root)?;
        Ok(read_log(root, "hub-send", "stderr").contains("following a live"))
    })?;

    // ---- one base backup, two hot standbys: direct, and via the hub
    let backup = root.join("backup");
    std::fs::create_dir_all(&backup).map_err(|e| e.to_string())?;
    run_cmd(Command::new("chown").args(["postgres:postgres"]).arg(&backup), root, "chown-backup", STEP_TIMEOUT)?;
    let mut bb = as_postgres(bin, "pg_basebackup");
    bb.args(cluster.conn_args()).args(["-X", "stream", "-c", "fast", "--no-sync", "-D"]).arg(&backup);
    run_cmd(&mut bb, root, "pg_basebackup", STEP_TIMEOUT)?;
    let direct = Standby::create(bin, &backup, root, "direct", &format!("host={} port={} user=postgres application_name=direct", cluster.sock.display(), cluster.port))?;
    let via_hub = Standby::create(
        bin,
        &backup,
        root,
        "via_hub",
        &format!("host=127.0.0.1 port={hub_port} user={HUB_USER} password={HUB_PASSWORD} application_name=via_hub sslmode=disable"),
    )?;
    let end = lsn_of(&cluster, "SELECT pg_current_wal_flush_lsn()")?;
    for s in [&direct, &via_hub] {
        wait_for("the standbys to catch up", Duration::from_secs(60), || {
            recv.check(root)?;
            let out = Command::new(bin.join("psql"))
                .args(["-h", &s.sock.display().to_string(), "-p", &s.port.to_string(), "-U", "postgres", "-Atqc", "SELECT pg_last_wal_replay_lsn()", "postgres"])
                .output()
                .map_err(|e| e.to_string())?;
            Ok(pg::parse_pg_lsn(String::from_utf8_lossy(&out.stdout).trim()).is_some_and(|l| l >= end))
        })?;
    }
    let direct_sender = cluster.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name = 'via_hub'")?;
    if direct_sender != "0" {
        return Err("the primary has a walsender for via_hub: it is not streaming from the hub".into());
    }
    eprintln!("replication bench: primary on {}, standbys direct and via_hub replaying ({:.1} s)", cluster.port, t_all.elapsed().as_secs_f64());

    // ---- a. replay lag under load, both standbys at once
    cluster.sql("CHECKPOINT")?;
    let fsync_before = fsync_totals(metrics_port)?;
    let stop = Arc::new(AtomicBool::new(false));
    let probe = {
        let (stop, p, s, iv) = (stop.clone(), primary_ci.clone(), vec![direct.conninfo(), via_hub.conninfo()], cfg.probe_interval);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(500));
            replay_probe(&p, &s, &stop, iv)
        })
    };
    let load = pgbench(bin, &cluster, cfg, cfg.seconds, root, "pgbench-replay");
    stop.store(true, Ordering::Relaxed);
    let probe = probe.join().map_err(|_| "the probe thread panicked".to_string())??;
    let load = load?;
    let fsync_after = fsync_totals(metrics_port)?;
    recv.check(root)?;
    send.check(root)?;
    let mut a = Json::obj();
    a.set("pgbench", load.clone()).set("probes", probe.probes).set("probe_interval_ms", cfg.probe_interval.as_millis() as u64);
    for (i, name) in ["direct", "via_hub"].iter().enumerate() {
        let mut h = hist_json(&probe.latency[i]);
        h.set("timeouts", probe.timeouts[i]).set("read_p50_us", probe.read_us[i].value_at_quantile(0.5));
        a.set(name, h);
    }
    let d50 = probe.latency[1].value_at_quantile(0.5) as i64 - probe.latency[0].value_at_quantile(0.5) as i64;
    let d99 = probe.latency[1].value_at_quantile(0.99) as i64 - probe.latency[0].value_at_quantile(0.99) as i64;
    let (n, sum_s) = (fsync_after.0 - fsync_before.0, fsync_after.1 - fsync_before.1);
    a.set("hub_recv_fdatasyncs", n).set("hub_recv_fdatasync_mean_us", if n > 0 { Some(sum_s / n as f64 * 1e6) } else { None });
    a.set("hub_adds_p50_us", d50).set("hub_adds_p99_us", d99).set("target_met", d50 < 1000 && probe.timeouts.iter().all(|t| *t == 0));
    eprintln!(
        "replication bench: [a] {} probes; replay lag p50/p99: direct {}/{} us, via hub {}/{} us; the hub adds {d50} us at p50",
        probe.probes,
        probe.latency[0].value_at_quantile(0.5),
        probe.latency[0].value_at_quantile(0.99),
        probe.latency[1].value_at_quantile(0.5),
        probe.latency[1].value_at_quantile(0.99)
    );
    m.set("replay_lag", a);
    let mut via_hub = via_hub;
    via_hub.stop();
    let (mut recv, mut send) = (recv, send);
    send.stop();
    recv.stop();

    // ---- b. synchronous standby: walship --from-postgres, the real standby, pg_receivewal
    let from_pg_dir = root.join("from-pg");
    std::fs::create_dir_all(&from_pg_dir).map_err(|e| e.to_string())?;
    let mut from_pg_cmd = Command::new(&cfg.walship_bin);
    from_pg_cmd
        .args(["recv", "--from-postgres", &format!("host={} port={} user=postgres", cluster.sock.display(), cluster.port)])
        .args(["--slot", SLOT_FROM_PG, "--application-name", "walship", "--dir"])
        .arg(&from_pg_dir)
        .env("NO_COLOR", "1");
    let receivewal_dir = root.join("pg_receivewal");
    std::fs::create_dir_all(&receivewal_dir).map_err(|e| e.to_string())?;
    let mut receivewal_cmd = Command::new(bin.join("pg_receivewal"));
    receivewal_cmd
        .args(["-d", &format!("host={} port={} user=postgres application_name=pg_receivewal", cluster.sock.display(), cluster.port)])
        .args(["--slot", SLOT_RECEIVEWAL, "--synchronous", "--no-loop", "-D"])
        .arg(&receivewal_dir);
    m.set("from_postgres_command", cmd_line(&from_pg_cmd)).set("pg_receivewal_command", cmd_line(&receivewal_cmd));
    let from_pg = Guard(Some(spawn(&mut from_pg_cmd, root, "from-pg").map_err(|e| format!("walship recv --from-postgres: {e}"))?), "from-pg");
    let receivewal = Guard(Some(spawn(&mut receivewal_cmd, root, "pg_receivewal").map_err(|e| format!("pg_receivewal: {e}"))?), "pg_receivewal");
    cluster.sql("ALTER SYSTEM SET synchronous_commit = on")?;
    cluster.sql("SELECT pg_reload_conf()")?;
    wait_for("all three followers streaming", Duration::from_secs(30), || {
        from_pg.check(root)?;
        receivewal.check(root)?;
        Ok(cluster.sql("SELECT count(*) FROM pg_stat_replication WHERE application_name IN ('walship', 'direct', 'pg_receivewal') AND state = 'streaming'")? == "3")
    })?;
    let mut runs: Vec<Json> = Vec::new();
    let mut tps: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    let mut lat: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
    for round in 0..cfg.rounds {
        for name in SYNC_FOLLOWERS {
            cluster.sql(&format!("ALTER SYSTEM SET synchronous_standby_names = '{name}'"))?;
            cluster.sql("SELECT pg_reload_conf()")?;
            wait_for(&format!("{name} to be the synchronous standby"), Duration::from_secs(30), || {
                from_pg.check(root)?;
                receivewal.check(root)?;
                Ok(cluster.sql(&format!("SELECT sync_state FROM pg_stat_replication WHERE application_name = '{name}'"))? == "sync")
            })?;
            cluster.sql("CHECKPOINT")?;
            let mut r = pgbench(bin, &cluster, cfg, cfg.sync_seconds, root, &format!("pgbench-sync-{name}-{round}"))?;
            from_pg.check(root)?;
            receivewal.check(root)?;
            let t = r["tps"].as_f64().unwrap_or(0.0);
            let l = r["latency_avg_ms"].as_f64().unwrap_or(f64::NAN);
            eprintln!("replication bench: [b] round {round} synchronous standby {name}: {t:.0} tps, latency {l:.3} ms");
            tps.entry(name).or_default().push(t);
            lat.entry(name).or_default().push(l);
            r.set("round", round as u64).set("synchronous_standby", name);
            runs.push(r);
        }
    }
    let mut b = Json::obj();
    b.set("seconds_per_run", cfg.sync_seconds).set("rounds", cfg.rounds as u64).set("clients", cfg.clients as u64).set("runs", Json::Array(runs));
    let mut med = Json::obj();
    for name in SYNC_FOLLOWERS {
        let mut t = tps.get(name).cloned().unwrap_or_default();
        let mut l = lat.get(name).cloned().unwrap_or_default();
        med.set(name, serde_json::json!({ "tps_median": median(&mut t), "latency_avg_ms_median": median(&mut l) }));
    }
    let tps_of = |n: &str| med[n]["tps_median"].as_f64().unwrap_or(0.0);
    b.set("median", med.clone())
        .set("walship_vs_direct", tps_of("walship") / tps_of("direct"))
        .set("walship_vs_pg_receivewal", tps_of("walship") / tps_of("pg_receivewal"))
        .set("target_met", tps_of("walship") > tps_of("direct") && tps_of("walship") > tps_of("pg_receivewal"));
    m.set("sync_standby", b);
    cluster.sql("ALTER SYSTEM SET synchronous_standby_names = ''")?;
    cluster.sql("SELECT pg_reload_conf()")?;
    let (mut from_pg, mut receivewal) = (from_pg, receivewal);
    from_pg.stop();
    receivewal.stop();
    drop(direct);
    cluster.stop(STEP_TIMEOUT)?;
    m.set("total_seconds", t_all.elapsed().as_secs_f64());
    Ok(m)
}

fn write_results(cfg: &Config, stamp: &str, m: &Json) -> Result<(), String> {
    let mut m = m.clone();
    let commit = command_output("git", &["-C", env!("CARGO_MANIFEST_DIR"), "rev-parse", "--short", "HEAD"]).unwrap_or_default().trim().to_string();
    let dirty = command_output("git", &["-C", env!("CARGO_MANIFEST_DIR"), "status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.trim().is_empty());
    let kernel = command_output("uname", &["-r"]).unwrap_or_default().trim().to_string();
    let command = format!(
        "WALSHIP_REPL_SECONDS={} WALSHIP_REPL_SYNC_SECONDS={} WALSHIP_REPL_ROUNDS={} WALSHIP_REPL_CLIENTS={} WALSHIP_REPL_SCALE={} cargo bench --bench replication",
        cfg.seconds, cfg.sync_seconds, cfg.rounds, cfg.clients, cfg.scale
    );
    m.set("command", command.clone())
        .set("commit", format!("{commit}{}", if dirty { " (with uncommitted changes)" } else { "" }))
        .set("kernel", kernel.clone())
        .set("cpu", cpu_model())
        .set("cpus", std::thread::available_parallelism().map_or(0, |n| n.get() as u64))
        .set("loadavg_end", loadavg())
        .set("scratch_fs", fs_type(&cfg.scratch_parent));
    std::fs::create_dir_all(&cfg.results_dir).map_err(|e| e.to_string())?;
    let json_path = cfg.results_dir.join(format!("replication-{stamp}.json"));
    std::fs::write(&json_path, m.pretty()).map_err(|e| format!("write {}: {e}", json_path.display()))?;
    let a = &m["replay_lag"];
    let b = &m["sync_standby"];
    let us = |v: &Json| v.as_u64().map_or("?".into(), |x| format!("{x}"));
    let mut md = format!(
        "\n## Run {stamp}\n\n- command: `{command}`\n- commit: {}\n- kernel: {kernel}; machine: {} ({} CPUs), scratch on {}\n- /proc/loadavg at the end: {}\n- PostgreSQL {}; pgbench -c {} -j 2, scale {}; JSON: `results/replication-{stamp}.json`\n\n",
        m["commit"].as_str().unwrap_or(""),
        m["cpu"].as_str().unwrap_or(""),
        m["cpus"],
        m["scratch_fs"].as_str().unwrap_or(""),
        m["loadavg_end"].as_str().unwrap_or(""),
        m["server_version"].as_str().unwrap_or("?"),
        cfg.clients,
        cfg.scale
    );
    md += &format!(
        "### a. Replay lag under pgbench ({} s, {} tps), {} probes, both standbys at once\n\n| standby | p50 µs | p90 µs | p99 µs | max µs | timeouts | one replay-LSN read p50 µs |\n|---|---|---|---|---|---|---|\n",
        cfg.seconds,
        a["pgbench"]["tps"].as_f64().map_or("?".into(), |t| format!("{t:.0}")),
        a["probes"]
    );
    for (name, label) in [("direct", "from the primary (walsender)"), ("via_hub", "from the hub (walship send -> recv --serve-replication)")] {
        let h = &a[name];
        md += &format!("| {label} | {} | {} | {} | {} | {} | {} |\n", us(&h["p50_us"]), us(&h["p90_us"]), us(&h["p99_us"]), us(&h["max_us"]), h["timeouts"], us(&h["read_p50_us"]));
    }
    md += &format!(
        "\nThe hub adds **{} µs at p50** ({} µs at p99). Target (under 1 ms at p50): **{}**. On the hub's path, beside the \
         walsender's: walship send's poll of the primary's flush LSN (`--horizon-poll-interval`, 1ms by default; extra send arguments: `{}`), and the \
         receiver's fdatasync before the hub may send anything ({} fdatasyncs during the load, mean {} µs).\n\n",
        a["hub_adds_p50_us"],
        a["hub_adds_p99_us"],
        if a["target_met"].as_bool() == Some(true) { "met" } else { "NOT met" },
        if cfg.send_extra.is_empty() { "none".to_string() } else { cfg.send_extra.join(" ") },
        a["hub_recv_fdatasyncs"],
        a["hub_recv_fdatasync_mean_us"].as_f64().map_or("?".into(), |v| format!("{v:.0}"))
    );
    md += &format!(
        "### b. Commit latency with a synchronous standby (synchronous_commit = on), {} s per run, {} rounds\n\n| synchronous standby | tps (median) | latency avg ms (median) | tps per round |\n|---|---|---|---|\n",
        cfg.sync_seconds, cfg.rounds
    );
    for (name, label) in [("walship", "walship recv --from-postgres"), ("direct", "PostgreSQL standby"), ("pg_receivewal", "pg_receivewal --synchronous")] {
        let per: Vec<String> = b["runs"]
            .as_array()
            .map(|r| r.iter().filter(|x| x["synchronous_standby"] == name).map(|x| x["tps"].as_f64().map_or("?".into(), |t| format!("{t:.0}"))).collect())
            .unwrap_or_default();
        md += &format!(
            "| {label} | {:.0} | {:.3} | {} |\n",
            b["median"][name]["tps_median"].as_f64().unwrap_or(f64::NAN),
            b["median"][name]["latency_avg_ms_median"].as_f64().unwrap_or(f64::NAN),
            per.join(", ")
        );
    }
    md += &format!(
        "\nwalship / PostgreSQL standby: {:.2}x tps; walship / pg_receivewal: {:.2}x. Target (walship higher than both): **{}**.\n",
        b["walship_vs_direct"].as_f64().unwrap_or(f64::NAN),
        b["walship_vs_pg_receivewal"].as_f64().unwrap_or(f64::NAN),
        if b["target_met"].as_bool() == Some(true) { "met" } else { "NOT met" }
    );
    let md_path = cfg.results_dir.join("REPLICATION.md");
    let mut text = std::fs::read_to_string(&md_path).unwrap_or_else(|_| {
        "# Replication benchmark (`cargo bench --bench replication`)\n\nHow it measures: see the header of `benches/replication.rs`. Runs are appended, newest last.\n".to_string()
    });
    text += &md;
    std::fs::write(&md_path, text).map_err(|e| format!("write {}: {e}", md_path.display()))?;
    eprintln!("replication bench: wrote {} and {}", json_path.display(), md_path.display());
    print!("{md}");
    Ok(())
}
