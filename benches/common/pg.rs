//! Real WAL from a throw-away local PostgreSQL cluster, for the peer comparison (pg_receivewal,
//! pgBackRest, cp + sync and walship on the same segment files).
//!
//! The cluster runs as the `postgres` OS user (`runuser -u postgres --`: initdb and postgres refuse root),
//! listens only on a unix socket inside the scratch dir, on the first free port of 54400..54499.
//! Physical slots (one per pg_receivewal repetition) are created BEFORE the load, so every
//! pg_receivewal run can catch up from the same start. `wal_keep_size` keeps every segment.

use super::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

pub const PORTS: std::ops::Range<u16> = 54400..54500;

/// The PostgreSQL binaries for a bench that runs real servers, or why it cannot: not installed, or
/// not root (the servers run as the postgres OS user through runuser).
pub fn runnable_bin() -> Result<PathBuf, String> {
    let bin = find_bin()?;
    // SAFETY: geteuid has no side effects.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root: the bench runs PostgreSQL as the postgres OS user via runuser (run as root)".into());
    }
    Ok(bin)
}

/// Newest `/usr/lib/postgresql/<major>/bin` holding every tool we need.
pub fn find_bin() -> Result<PathBuf, String> {
    let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|_| {
            "PostgreSQL not installed (no /usr/lib/postgresql; Debian: apt-get install postgresql)".to_string()
        })?
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, b)| {
            ["initdb", "pg_ctl", "psql", "pgbench", "pg_receivewal"]
                .iter()
                .all(|t| b.join(t).exists())
        })
        .collect();
    dirs.sort();
    dirs.pop()
        .map(|(_, b)| b)
        .ok_or_else(|| "no /usr/lib/postgresql/*/bin with initdb, pg_ctl, psql, pgbench and pg_receivewal".into())
}

pub struct Cluster {
    pub bin: PathBuf,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub running: bool,
    log_dir: PathBuf,
}

fn port_free(port: u16, sock: &Path) -> bool {
    !tcp_listening(port)
        && !sock.join(format!(".s.PGSQL.{port}")).exists()
        && !Path::new(&format!("/tmp/.s.PGSQL.{port}")).exists()
        && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn chown_postgres(path: &Path) -> Result<(), String> {
    let out = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .output()
        .map_err(|e| format!("chown: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "chown -R postgres {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

impl Cluster {
    /// initdb + start. `wal_keep_mb` keeps that much WAL whatever the slots say.
    pub fn create(bin: &Path, root: &Path, wal_keep_mb: u64, timeout: Duration) -> Result<Cluster, String> {
        let base = root.join("pg");
        let data = base.join("data");
        let sock = base.join("sock");
        std::fs::create_dir_all(&sock).map_err(|e| e.to_string())?;
        chown_postgres(&base)?;
        let port = PORTS
            .clone()
            .find(|p| port_free(*p, &sock))
            .ok_or("no free port in 54400..54499 for the bench's PostgreSQL")?;
        let mut c = Cluster {
            bin: bin.to_path_buf(),
            data,
            sock,
            port,
            running: false,
            log_dir: base.clone(),
        };
        let mut initdb = Command::new("runuser");
        initdb
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&c.data);
        must(run(&mut initdb, &base, "initdb", timeout), "initdb")?;
        let conf = format!(
            "\n# walship bench\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
             wal_level = replica\nmax_wal_senders = 16\nmax_replication_slots = 16\n\
             wal_keep_size = {wal_keep_mb}\nmax_wal_size = {}MB\nmin_wal_size = 80MB\ncheckpoint_timeout = 1h\n\
             shared_buffers = 128MB\nautovacuum = off\nsynchronous_commit = off\nfsync = on\n",
            c.sock.display(),
            wal_keep_mb.max(1024) * 2
        );
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(c.data.join("postgresql.conf"))
            .map_err(|e| e.to_string())?;
        std::io::Write::write_all(&mut f, conf.as_bytes()).map_err(|e| e.to_string())?;
        c.start(timeout)?;
        Ok(c)
    }

    pub fn start(&mut self, timeout: Duration) -> Result<(), String> {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .arg("-l")
            .arg(self.data.join("server.log"))
            .args(["-w", "-t", "60", "start"]);
        must(run(&mut cmd, &self.log_dir, "pg_ctl-start", timeout), "pg_ctl start")?;
        self.running = true;
        Ok(())
    }

    pub fn stop(&mut self, timeout: Duration) -> Result<(), String> {
        if !self.running {
            return Ok(());
        }
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "fast", "-w", "-t", "60", "stop"]);
        must(run(&mut cmd, &self.log_dir, "pg_ctl-stop", timeout), "pg_ctl stop")?;
        self.running = false;
        Ok(())
    }

    /// Connection arguments for libpq tools (as root, connecting as role postgres over the socket).
    pub fn conn_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.sock.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            "postgres".into(),
        ]
    }

    /// One query, unaligned tuples-only output.
    pub fn sql(&self, query: &str) -> Result<String, String> {
        let out = Command::new(self.bin.join("psql"))
            .args(self.conn_args())
            .args(["-d", "postgres", "-Atq", "-X", "-v", "ON_ERROR_STOP=1", "-c", query])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "psql {query:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// PID of the postmaster (first line of postmaster.pid).
    pub fn postmaster_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            let _ = self.stop(Duration::from_secs(90));
        }
    }
}

fn must(r: io::Result<Finished>, what: &str) -> Result<Finished, String> {
    match r {
        Ok(f) if f.ok() => Ok(f),
        Ok(f) => Err(format!("{what} failed: {}", f.describe_failure())),
        Err(e) => Err(format!("{what} could not start: {e}")),
    }
}

pub fn parse_pg_lsn(s: &str) -> Option<u64> {
    let (hi, lo) = s.trim().split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

pub fn fmt_lsn(lsn: u64) -> String {
    format!("{:X}/{:08X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

pub fn segment_name(tli: u32, segno: u64, seg_size: u64) -> String {
    let per = 0x1_0000_0000 / seg_size;
    format!("{tli:08X}{:08X}{:08X}", segno / per, segno % per)
}

/// The real WAL: segments `[first_segno, end_lsn / seg_size)` are complete and hold the load.
pub struct RealWal {
    pub cluster: Cluster,
    pub slots: Vec<String>,
    pub seg_size: u64,
    pub first_segno: u64,
    /// A segment boundary: `pg_switch_wal()` after the load, then the flush LSN.
    pub end_lsn: u64,
    pub segment_names: Vec<String>,
    pub report: Json,
}

impl RealWal {
    pub fn bytes(&self) -> u64 {
        self.end_lsn - self.first_segno * self.seg_size
    }
}

/// initdb, slots, `pgbench -i -s N` (+ `pgbench -T 5`), `pg_switch_wal()`. The server keeps running.
pub fn build_real_wal(root: &Path, target_bytes: u64, slots: usize, timeout: Duration) -> Result<RealWal, String> {
    let t0 = Instant::now();
    let bin = find_bin()?;
    let keep_mb = (target_bytes / MIB) * 2 + 1024;
    let cluster = Cluster::create(&bin, root, keep_mb, timeout)?;
    let seg_size: u64 = cluster
        .sql("SELECT setting::bigint * (CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 WHEN 'MB' THEN 1048576 ELSE 1 END) FROM pg_settings WHERE name = 'wal_segment_size'")?
        .parse()
        .map_err(|e| format!("wal_segment_size: {e}"))?;
    let tli: u32 = cluster
        .sql("SELECT timeline_id FROM pg_control_checkpoint()")?
        .parse()
        .map_err(|e| format!("timeline: {e}"))?;
    // A fresh segment, then the slots: every receiver starts at a segment boundary.
    cluster.sql("SELECT pg_switch_wal()")?;
    let names: Vec<String> = (0..slots.max(1)).map(|i| format!("walship_bench_{i}")).collect();
    for n in &names {
        cluster.sql(&format!("SELECT pg_create_physical_replication_slot('{n}', true)"))?;
    }
    let restart = cluster.sql(&format!(
        "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
        names[0]
    ))?;
    let start_lsn = parse_pg_lsn(&restart).ok_or_else(|| format!("slot restart_lsn {restart:?}"))?;
    let first_segno = start_lsn / seg_size;
    // ~13 MB of WAL per pgbench scale unit (PostgreSQL 15, wal_level replica, full_page_writes).
    let scale = (target_bytes / (13 * 1_000_000)).max(1);
    let mut init = Command::new(bin.join("pgbench"));
    init.args(cluster.conn_args())
        .args(["-i", "-q", "-s", &scale.to_string(), "postgres"]);
    let init_f = must(run(&mut init, &root.join("pg"), "pgbench-init", timeout), "pgbench -i")?;
    let mut load = Command::new(bin.join("pgbench"));
    load.args(cluster.conn_args())
        .args(["-n", "-c", "2", "-j", "2", "-T", "5", "postgres"]);
    let load_f = must(run(&mut load, &root.join("pg"), "pgbench-T", timeout), "pgbench -T")?;
    cluster.sql("SELECT pg_switch_wal()")?;
    let flush = cluster.sql("SELECT pg_current_wal_flush_lsn()")?;
    let end_lsn = parse_pg_lsn(&flush).ok_or_else(|| format!("flush lsn {flush:?}"))?;
    if end_lsn % seg_size != 0 {
        return Err(format!(
            "flush LSN {flush} after pg_switch_wal() is not at a segment boundary"
        ));
    }
    let segment_names: Vec<String> = (first_segno..end_lsn / seg_size)
        .map(|s| segment_name(tli, s, seg_size))
        .collect();
    let mut report = Json::obj();
    report
        .set("postgres_bin", bin.display().to_string())
        .set("server_version", cluster.sql("SHOW server_version").ok())
        .set("port", cluster.port as u64)
        .set("pgbench_scale", scale)
        .set("pgbench_init_s", init_f.wall.as_secs_f64())
        .set(
            "pgbench_T_tps_line",
            load_f.stdout.lines().find(|l| l.starts_with("tps")).map(String::from),
        )
        .set("start_lsn", fmt_lsn(first_segno * seg_size))
        .set("end_lsn", fmt_lsn(end_lsn))
        .set("segments", segment_names.len())
        .set("bytes", end_lsn - first_segno * seg_size)
        .set("build_s", t0.elapsed().as_secs_f64());
    Ok(RealWal {
        cluster,
        slots: names,
        seg_size,
        first_segno,
        end_lsn,
        segment_names,
        report,
    })
}

/// Polls /proc every 5 ms for matching processes and remembers each one's
/// last CPU reading: the CPU of processes we cannot wait4 for (a walsender, a daemonised archiver).
pub struct CpuPoller {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<HashMap<u32, Cpu>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn ppid_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    after.split_whitespace().nth(1)?.parse().ok()
}

impl CpuPoller {
    /// Track every child of `parent` whose command line contains `needle`. A forked backend shows its
    /// parent's command line until it sets its process title, so children of `parent` that do not match
    /// yet are looked at again on every poll; other processes are looked at once.
    pub fn start(parent: u32, needle: &'static str) -> CpuPoller {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(HashMap::new()));
        let (s2, seen2) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            // pid -> Some(true) matched, Some(false) never will (not our parent's child)
            let mut known: HashMap<u32, bool> = HashMap::new();
            while !s2.load(Ordering::Relaxed) {
                if let Ok(rd) = std::fs::read_dir("/proc") {
                    for e in rd.flatten() {
                        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                            continue;
                        };
                        let matched = match known.get(&pid) {
                            Some(m) => *m,
                            None => {
                                if ppid_of(pid) != Some(parent) {
                                    known.insert(pid, false);
                                    false
                                } else {
                                    let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                                        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                                        .unwrap_or_default();
                                    let m = cmd.contains(needle);
                                    if m {
                                        known.insert(pid, true);
                                    }
                                    m
                                }
                            }
                        };
                        if matched {
                            if let Some(c) = proc_cpu(pid) {
                                seen2.lock().unwrap().insert(pid, c);
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        CpuPoller {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stop polling; CPU summed over every matching process (last reading of each), and their pids.
    pub fn finish(mut self) -> (Cpu, Vec<u32>) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let seen = self.seen.lock().unwrap();
        let mut total = Cpu::default();
        for c in seen.values() {
            total.user_s += c.user_s;
            total.sys_s += c.sys_s;
        }
        (total, seen.keys().copied().collect())
    }
}

/// Make this process the reaper of orphaned descendants (pgBackRest's async archiver daemonises), so
/// `reap_orphans` can collect their exact CPU with wait4.
pub fn set_subreaper(on: bool) {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes an integer flag; no memory is passed.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, on as libc::c_ulong, 0, 0, 0) };
}

/// wait4 every remaining child (orphans re-parented to us) until none is left or `deadline` passes
/// (then SIGKILL them). Returns their summed CPU (each includes its own reaped children).
pub fn reap_orphans(deadline: Duration) -> Cpu {
    let t = Instant::now();
    let mut total = Cpu::default();
    loop {
        let mut status = 0;
        // SAFETY: zeroed rusage and status are ours.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::wait4(-1, &mut status, libc::WNOHANG, &mut ru) };
        if rc > 0 {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            total.user_s += tv(ru.ru_utime);
            total.sys_s += tv(ru.ru_stime);
            continue;
        }
        if rc < 0 {
            break; // ECHILD: none left
        }
        if t.elapsed() > deadline {
            // Kill whatever is still our child.
            if let Ok(rd) = std::fs::read_dir("/proc") {
                let me = std::process::id();
                for e in rd.flatten() {
                    if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) {
                        if ppid_of(pid) == Some(me) {
                            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                        }
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    total
}
