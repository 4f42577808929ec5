//! Timelines against real PostgreSQL: walship follows a STANDBY, the standby is promoted (timeline 2), and
//! walship must follow it across the switch: ship timeline 1 up to the switch point, store
//! `00000002.history`, continue on timeline 2 from the segment holding the switch point.
//!
//! 1. Primary A; standby B from `pg_basebackup -R -X stream` (streaming from A). `walship recv` +
//!    `walship send --pg-wal B/pg_wal --conninfo <B> --slot walship` (a physical slot on the standby).
//!    A second base backup of A (`-X none`) for the final replay, taken while walship already follows B.
//! 2. pgbench on A; wait until B replayed it.
//! 3. Promote B, stop A, pgbench on B (timeline 2); the sender must log "reconnecting on the new timeline".
//! 4. Checksums on B; stop B cleanly; the sender ships through B's shutdown checkpoint; SIGTERM both (exit 0).
//! 5. The received directory: `00000002.history` identical to B's, timeline-1 and timeline-2 segments (the
//!    first timeline-2 segment is the one holding the switch point), complete segments byte-identical to B's.
//! 6. A standby from the second base backup (EMPTY pg_wal), `recovery_target_timeline = 'latest'`,
//!    `restore_command = 'walship restore %f %p --dir RECV'`, must replay to exactly B's end of WAL on
//!    timeline 2 and show B's checksums.
//!
//! Needs PostgreSQL (`/usr/lib/postgresql/<major>/bin`, newest wins; `WALSHIP_PG_BIN` overrides). Without it
//! the test prints "SKIP: PostgreSQL not installed" and passes, unless `WALSHIP_REQUIRE_PG=1`. As root,
//! PostgreSQL programs run as the `postgres` OS user via `runuser`.
//!
//! Env knobs: `WALSHIP_KEEP_TMP=1` keeps the temp dir (path printed).
//!
//! Run: `cargo test --release --test pg_timeline -- --nocapture`.
#![allow(dead_code)]

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const REPLAY_TIMEOUT: Duration = Duration::from_secs(120);
const SLOT: &str = "walship";
const A_PORT: u16 = 5561;
const B_PORT: u16 = 5562;
const REPLAY_PORT: u16 = 5563;


/// One PostgreSQL test at a time (2 shared cores; pgbench timings would be meaningless otherwise).
static SERIAL: Mutex<()> = Mutex::new(());

use common::pg::*;

// ---------------------------------------------------------------------------------------------------------
// Test context: primary A, standby B (promoted later), walship following B, phase timings

struct Ctx {
    pg: Pg,
    tmp: TestDir,
    a: Server,
    b: Server,
    pgdir: PathBuf,
    recv_dir: PathBuf,
    addr: String,
    recv: Option<ChildGuard>,
    /// A second destination of the same sender (issue #12: every timeline rule holds per destination).
    recv2_dir: PathBuf,
    addr2: String,
    recv2: Option<ChildGuard>,
    /// The second destination also archives to this S3 store (SeaweedFS), when it is installed:
    /// timeline 1's last segment must reach the store as `.partial` (issue #13).
    s3: Option<s3::S3Server>,
    send: Option<ChildGuard>,
    /// Did the sender run with `--slot` (false if creating a slot on the standby was refused)?
    slot: bool,
    notes: Vec<String>,
    t0: Instant,
    phase: Option<(String, Instant)>,
    timings: Vec<(String, f64)>,
}

/// A private socket directory (0700, owned by the postgres user).
fn sock_dir(pg: &Pg, p: PathBuf) -> PathBuf {
    fs::create_dir_all(&p).expect("mkdir sock");
    fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).expect("chmod sock");
    pg.chown(&p).expect("chown sock");
    p
}

/// `None` = skip (no PostgreSQL, and not required).
fn setup(name: &str) -> Option<Ctx> {
    let tmp = TestDir::new(name);
    let root = tmp.path().to_path_buf();
    let pg = Pg::for_test(&root)?;
    let pgdir = root.join("pg");
    fs::create_dir_all(&pgdir).expect("mkdir pg");
    pg.chown(&pgdir).expect("chown pgdir");
    println!("[{name}] PostgreSQL bin: {}  temp dir: {}", pg.bin.display(), root.display());
    let server = |name: &'static str, sock: &str, port: u16| Server {
        pg: pg.clone(),
        name,
        data: pgdir.join(name),
        log: pgdir.join(format!("{name}.log")),
        sock: sock_dir(&pg, pgdir.join(sock)),
        port,
        running: false,
    };
    let a = server("A", "sock-a", A_PORT);
    let b = server("B", "sock-b", B_PORT);
    Some(Ctx {
        pg,
        a,
        b,
        pgdir,
        recv_dir: root.join("recv"),
        recv2_dir: root.join("recv2"),
        addr2: format!("127.0.0.1:{}", free_port()),
        recv2: None,
        s3: s3::start_or_skip(s3::Kind::Seaweed, &root),
        addr: format!("127.0.0.1:{}", free_port()),
        recv: None,
        send: None,
        slot: true,
        notes: Vec::new(),
        tmp,
        t0: Instant::now(),
        phase: None,
        timings: Vec::new(),
    })
}

impl Ctx {
    fn say(&self, msg: impl std::fmt::Display) {
        println!("[{:>6.2} s] {msg}", self.t0.elapsed().as_secs_f64());
    }

    /// End the current phase (recording its duration) and start `name`.
    fn phase(&mut self, name: &str) {
        self.end_phase();
        println!("== {name}");
        self.phase = Some((name.to_string(), Instant::now()));
    }

    fn end_phase(&mut self) {
        if let Some((n, t)) = self.phase.take() {
            self.timings.push((n, t.elapsed().as_secs_f64()));
        }
    }

    fn print_timings(&mut self) {
        self.end_phase();
        println!("PHASE TIMINGS (total {:.1} s):", self.t0.elapsed().as_secs_f64());
        for (n, s) in &self.timings {
            println!("  {s:>7.2} s  {n}");
        }
    }

    fn send_out(&self) -> PathBuf {
        self.tmp.join("send.stdout")
    }
    fn send_err(&self) -> PathBuf {
        self.tmp.join("send.stderr")
    }
    fn recv_err(&self) -> PathBuf {
        self.tmp.join("recv.stderr")
    }
    fn report(&self) -> PathBuf {
        self.tmp.join("send-report.json")
    }

    /// Panic message with everything useful.
    fn fail(&mut self, e: String) -> ! {
        let phase = self.phase.as_ref().map(|p| p.0.clone()).unwrap_or_default();
        self.print_timings();
        panic!(
            "FAILED in phase `{phase}`: {e}\n--- walship send stdout ---\n{}\n--- walship send stderr tail ---\n{}\n\
             --- walship recv stderr tail ---\n{}\n--- received directory ---\n{}\n--- A log tail ---\n{}\n\
             --- B log tail ---\n{}\nnotes: {:?}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)",
            tail_file(&self.send_out(), 20),
            strip_ansi(&tail_file(&self.send_err(), 60)),
            strip_ansi(&tail_file(&self.recv_err(), 40)),
            listing(&self.recv_dir),
            tail_file(&self.a.log, 20),
            tail_file(&self.b.log, 30),
            self.notes,
            self.tmp.path().display()
        )
    }

    fn init_a(&mut self) -> R<()> {
        let mut c = self.pg.cmd("initdb");
        c.arg("-D").arg(&self.a.data);
        c.args(["-U", PG_USER, "--auth=trust", "--locale=C", "--encoding=UTF8", "--no-sync"]);
        run_ok(&mut c)?;
        append(
            &self.a.data.join("postgresql.conf"),
            &format!(
                "\n# walship pg_timeline test\nport = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
                 wal_level = replica\nmax_wal_senders = 5\nmax_replication_slots = 5\nhot_standby = on\n\
                 wal_keep_size = 0\nmax_wal_size = 256MB\nmin_wal_size = 64MB\nlog_checkpoints = on\n",
                self.a.port,
                self.a.sock.display()
            ),
        )?;
        self.a.pg_ctl_start(true)?;
        self.say(format!("A up: {}", self.a.sql("SELECT version()")?));
        Ok(())
    }

    /// B = `pg_basebackup -R -X stream` of A, on its own port and socket dir, streaming from A.
    fn init_b(&mut self) -> R<()> {
        let mut c = self.pg.cmd("pg_basebackup");
        c.arg("-h").arg(&self.a.sock).args(["-p", &self.a.port.to_string(), "-U", PG_USER]);
        c.arg("-D").arg(&self.b.data).args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run_ok(&mut c).map_err(|e| self.a.err(e))?;
        if !self.b.data.join("standby.signal").exists() {
            return Err("pg_basebackup -R wrote no standby.signal".into());
        }
        append(
            &self.b.data.join("postgresql.conf"),
            &format!(
                "\n# standby B\nport = {}\nunix_socket_directories = '{}'\n",
                self.b.port,
                self.b.sock.display()
            ),
        )?;
        self.b.pg_ctl_start(true)?;
        if self.b.sql("SELECT pg_is_in_recovery()")? != "t" {
            return Err(self.b.err("B is not in recovery"));
        }
        let st = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
            self.b.sql_quiet("SELECT status FROM pg_stat_wal_receiver").ok().filter(|s| s == "streaming")
        });
        if st.is_none() {
            return Err(self.b.err("B's WAL receiver is not streaming from A within 30 s"));
        }
        self.say(format!("B up, streaming from A; B's pg_wal: {:?}", wal_names(&self.b.data.join("pg_wal"))));
        Ok(())
    }

    fn conninfo_b(&self) -> String {
        format!("host={} port={} user={PG_USER} dbname=postgres", self.b.sock.display(), self.b.port)
    }

    fn start_recv(&mut self) -> R<()> {
        let file = |p: PathBuf| fs::File::create(&p).map_err(|e| format!("create {}: {e}", p.display()));
        let mut c = cmd(walship_bin(), ["recv", "--listen", &self.addr, "--dir"]);
        c.arg(&self.recv_dir).arg("--insecure-no-auth");
        c.env("NO_COLOR", "1");
        c.stdin(Stdio::null()).stdout(file(self.tmp.join("recv.stdout"))?).stderr(file(self.recv_err())?);
        self.say(format!("$ {}", cmdline(&c)));
        self.recv = Some(ChildGuard::spawn("walship recv", &mut c).map_err(|e| format!("spawn recv: {e}"))?);
        fs::create_dir_all(&self.recv2_dir).map_err(|e| e.to_string())?;
        let mut c = cmd(walship_bin(), ["recv", "--listen", &self.addr2, "--insecure-no-auth", "--dir"]);
        c.arg(&self.recv2_dir).env("NO_COLOR", "1");
        if let Some(server) = &self.s3 {
            c.args(["--archive-to", &format!("s3://{}/{ARCHIVE_PREFIX}", s3::BUCKET), "--archive-partial-after", "1s"]);
            server.env(&mut c);
        }
        c.stdin(Stdio::null()).stdout(file(self.tmp.join("recv2.stdout"))?).stderr(file(self.tmp.join("recv2.stderr"))?);
        self.recv2 = Some(ChildGuard::spawn("walship recv (2nd)", &mut c).map_err(|e| format!("spawn recv: {e}"))?);
        Ok(())
    }

    fn start_send(&mut self, slot: bool) -> R<()> {
        let file = |p: PathBuf| fs::File::create(&p).map_err(|e| format!("create {}: {e}", p.display()));
        let mut c = cmd(walship_bin(), ["send", "--pg-wal"]);
        c.arg(self.b.data.join("pg_wal")).args(["--to", &self.addr, "--to", &self.addr2, "--conninfo", &self.conninfo_b()]);
        if slot {
            c.args(["--slot", SLOT]);
        }
        c.arg("--report-json").arg(self.report()).arg("--insecure-no-auth");
        c.env("NO_COLOR", "1");
        c.stdin(Stdio::null()).stdout(file(self.send_out())?).stderr(file(self.send_err())?);
        self.say(format!("$ {}", cmdline(&c)));
        self.send = Some(ChildGuard::spawn("walship send", &mut c).map_err(|e| format!("spawn send: {e}"))?);
        self.slot = slot;
        Ok(())
    }

    /// Start recv + follow-mode send on B with `--slot`; if the sender cannot use a slot on the standby,
    /// fall back to no slot (noted for the report).
    fn start_walship(&mut self) -> R<()> {
        fs::create_dir_all(&self.recv_dir).map_err(|e| e.to_string())?;
        self.start_recv()?;
        self.start_send(true)?;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let log = strip_ansi(&fs::read_to_string(self.send_err()).unwrap_or_default());
            if let Some(l) = log.lines().find(|l| l.contains("following a live")) {
                self.say(format!("sender: {}", l.trim()));
                if !l.contains("standby") {
                    return Err(format!("the sender follows B (a standby) but says: {l}"));
                }
                break;
            }
            if let Ok(Some(st)) = self.send.as_mut().unwrap().try_wait() {
                let note = format!(
                    "walship send --slot {SLOT} on the standby exited with {st}; retrying WITHOUT --slot. Its log:\n{}",
                    tail_str(&log, 20)
                );
                println!("!!! {note}");
                self.notes.push(note);
                self.start_send(false)?;
                self.wait_log(&self.send_err(), "following a live", Duration::from_secs(30))?;
                break;
            }
            if Instant::now() > end {
                return Err("the sender did not log `following a live` within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.slot {
            let n = self.b.sql(&format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}'"))?;
            if n != "1" {
                return Err(format!("sender follows but slot {SLOT} does not exist on B (count {n})"));
            }
            let r = self.b.sql(&format!("SELECT coalesce(restart_lsn::text, 'NULL') FROM pg_replication_slots WHERE slot_name = '{SLOT}'"))?;
            self.say(format!("slot {SLOT} on standby B: restart_lsn {r}"));
        }
        Ok(())
    }

    fn check_alive(&mut self) -> R<()> {
        for (name, g) in [("walship send", self.send.as_mut()), ("walship recv", self.recv.as_mut())] {
            if let Some(g) = g {
                if let Ok(Some(st)) = g.try_wait() {
                    return Err(format!("{name} exited early with {st}"));
                }
            }
        }
        Ok(())
    }

    /// Wait until `path` contains `needle`; returns the first line containing it.
    fn wait_log(&self, path: &Path, needle: &str, timeout: Duration) -> R<String> {
        poll_until(timeout, Duration::from_millis(100), || {
            let s = strip_ansi(&fs::read_to_string(path).unwrap_or_default());
            s.lines().find(|l| l.contains(needle)).map(str::to_string)
        })
        .ok_or_else(|| format!("no line containing {needle:?} in {} within {timeout:?}", path.display()))
    }

    /// The receiver's `.walship-flushed` LSN (0 if not written yet).
    fn recv_flushed(&self) -> R<u64> {
        let p = self.recv_dir.join(".walship-flushed");
        for _ in 0..20 {
            match fs::read_to_string(&p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(format!("read {}: {e}", p.display())),
                Ok(s) => {
                    if let Some(l) = s.split_whitespace().next().and_then(parse_lsn) {
                        return Ok(l);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        Err(format!("{} never held a parsable LSN", p.display()))
    }

    fn pgbench(&self, s: &Server, args: &[&str]) -> R<String> {
        let mut c = self.pg.cmd("pgbench");
        c.arg("-h").arg(&s.sock).args(["-p", &s.port.to_string(), "-U", PG_USER]);
        c.args(args).arg("postgres");
        let out = run_ok(&mut c).map_err(|e| s.err(e))?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    fn pgbench_run(&self, s: &Server, secs: u32) -> R<()> {
        let out = self.pgbench(s, &["-c", "2", "-j", "2", "-T", &secs.to_string(), "-n"])?;
        let tps = out.lines().find(|l| l.starts_with("tps")).unwrap_or("").to_string();
        self.say(format!("pgbench -T {secs} on {}: {tps}", s.name));
        Ok(())
    }

    /// `pg_basebackup -X none` of A (for the final replay); returns (dir, START WAL LOCATION).
    fn base_backup_a(&self) -> R<(PathBuf, u64)> {
        let base = self.pgdir.join("base");
        let mut c = self.pg.cmd("pg_basebackup");
        c.arg("-h").arg(&self.a.sock).args(["-p", &self.a.port.to_string(), "-U", PG_USER]);
        c.arg("-D").arg(&base).args(["-c", "fast", "-X", "none", "--no-sync"]);
        run_ok(&mut c).map_err(|e| self.a.err(e))?;
        let label = fs::read_to_string(base.join("backup_label")).map_err(|e| format!("read backup_label: {e}"))?;
        let start = label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|s| s.split_whitespace().next())
            .and_then(parse_lsn)
            .ok_or_else(|| format!("no START WAL LOCATION in backup_label:\n{label}"))?;
        self.say(format!("base backup of A taken: START WAL LOCATION {}", fmt_lsn(start)));
        Ok((base, start))
    }

    fn sigterm(&mut self, which: &str, timeout: Duration) -> R<ExitStatus> {
        let g = if which == "send" { self.send.as_mut() } else { self.recv.as_mut() };
        let g = g.ok_or_else(|| format!("walship {which} not running"))?;
        if let Ok(Some(st)) = g.try_wait() {
            return Err(format!("walship {which} had already exited with {st}"));
        }
        let t0 = Instant::now();
        g.signal(libc::SIGTERM).map_err(|e| format!("SIGTERM walship {which}: {e}"))?;
        let st = g.wait_timeout(timeout).map_err(|e| e.to_string())?;
        let st = st.ok_or_else(|| format!("walship {which} still running {timeout:?} after SIGTERM"))?;
        self.say(format!("walship {which} exited with {st} {:.2} s after SIGTERM", t0.elapsed().as_secs_f64()));
        Ok(st)
    }

    fn restore_exe(&self) -> R<PathBuf> {
        self.pg.restore_exe(self.tmp.path())
    }
}

/// Sorted names of the WAL-ish files (segments, `.partial`, `.history`) in a directory.
fn wal_names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.retain(|n| is_seg_name(n) || n.ends_with(".partial") || n.ends_with(".history"));
    v.sort();
    v
}

/// `ls -l`-ish listing of a directory (names and sizes), for failure reports.
fn listing(dir: &Path) -> String {
    let Ok(rd) = fs::read_dir(dir) else { return format!("(cannot read {})", dir.display()) };
    let mut v: Vec<(String, u64)> =
        rd.flatten().map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0))).collect();
    v.sort();
    v.iter().map(|(n, s)| format!("  {s:>10}  {n}")).collect::<Vec<_>>().join("\n")
}

/// (parent timeline, switch point) entries of a timeline history file.
fn parse_history(text: &str) -> R<Vec<(u32, u64)>> {
    let mut v = Vec::new();
    for l in text.lines() {
        let l = l.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut f = l.split_whitespace();
        let tli = f.next().and_then(|s| s.parse().ok());
        let lsn = f.next().and_then(parse_lsn);
        match (tli, lsn) {
            (Some(t), Some(p)) => v.push((t, p)),
            _ => return Err(format!("bad history line {l:?} in:\n{text}")),
        }
    }
    Ok(v)
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------------------
// The test

#[test]
fn promotion_is_followed_across_the_timeline_switch() {
    let _l = lock();
    let Some(mut ctx) = setup("timeline") else { return };
    match promotion(&mut ctx) {
        Ok(()) => {
            ctx.print_timings();
            for n in &ctx.notes {
                println!("NOTE: {n}");
            }
        }
        Err(e) => ctx.fail(e),
    }
}

fn promotion(ctx: &mut Ctx) -> R<()> {
    // 1. A, B, walship following B, the base backup for the replay.
    ctx.phase("1a primary A + standby B");
    ctx.init_a()?;
    ctx.init_b()?;
    ctx.phase("1b walship recv + send following standby B");
    ctx.start_walship()?;
    ctx.phase("1c base backup of A (-X none)");
    let (base, backup_start) = ctx.base_backup_a()?;

    // 2. Load on A, replayed by B.
    ctx.phase("2 pgbench on A, B replays it");
    ctx.pgbench(&ctx.a, &["-i", "-s", "5", "-q"])?;
    ctx.pgbench_run(&ctx.a, 3)?;
    let a_lsn = ctx.a.lsn("SELECT pg_current_wal_lsn()")?;
    let mut last = String::new();
    poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        last = ctx.b.sql_quiet("SELECT pg_last_wal_replay_lsn()").unwrap_or_else(|e| e);
        parse_lsn(&last).filter(|&l| l >= a_lsn)
    })
    .ok_or_else(|| ctx.b.err(format!("B did not replay to A's {} within 60 s (last {last})", fmt_lsn(a_lsn))))?;
    ctx.say(format!("B replayed A's WAL up to {}", fmt_lsn(a_lsn)));
    ctx.check_alive()?;

    // 3. Promote B, stop A, load on B (timeline 2).
    ctx.phase("3a promote B, stop A");
    let mut c = ctx.pg.cmd("pg_ctl");
    c.arg("-D").arg(&ctx.b.data).args(["promote", "-w", "-t", "60"]);
    run_ok(&mut c).map_err(|e| ctx.b.err(e))?;
    if ctx.b.sql("SELECT pg_is_in_recovery()")? != "f" {
        return Err(ctx.b.err("B still in recovery after pg_ctl promote -w"));
    }
    let tl = ctx.b.sql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")?;
    if tl != "00000002" {
        return Err(ctx.b.err(format!("B promoted onto timeline {tl}, expected 00000002")));
    }
    ctx.say("B promoted: timeline 2");
    ctx.a.stop("fast")?;
    ctx.say("A stopped (fast)");
    ctx.phase("3b pgbench on B (timeline 2), sender reconnects on the new timeline");
    ctx.pgbench_run(&ctx.b, 5)?;
    let l = ctx.wait_log(&ctx.send_err(), "the server switched to timeline", Duration::from_secs(60))?;
    ctx.say(format!("sender: {}", l.trim()));
    let l = ctx.wait_log(&ctx.send_err(), "reconnecting on the new timeline", Duration::from_secs(60))?;
    ctx.say(format!("sender: {}", l.trim()));
    ctx.check_alive()?;

    // 4. Checksums, clean stop of B, shipped through its shutdown checkpoint, stop walship.
    ctx.phase("4 checksums, stop B, sender ships through the shutdown checkpoint, SIGTERM walship");
    let sums = checksums(&ctx.b)?;
    for (t, v) in &sums {
        println!("     {t}: {v}");
    }
    ctx.b.stop("fast")?;
    let cd = ctx.b.controldata()?;
    if cd.state != "shut down" || cd.redo != cd.checkpoint || cd.tli != 2 {
        return Err(format!(
            "B after a clean stop: state `{}`, redo {} checkpoint {}, timeline {}",
            cd.state,
            fmt_lsn(cd.redo),
            fmt_lsn(cd.checkpoint),
            cd.tli
        ));
    }
    let b_wal = ctx.b.data.join("pg_wal");
    let end = wal_end_after_checkpoint(&ctx.pg, &b_wal, 2, cd.checkpoint, cd.block_size)?;
    ctx.say(format!("B stopped cleanly: shutdown checkpoint {} on timeline 2, end of WAL {}", fmt_lsn(cd.checkpoint), fmt_lsn(end)));
    let line = ctx.wait_log(&ctx.send_err(), "holds the server's WAL durably through its shutdown checkpoint", Duration::from_secs(60))?;
    ctx.say(format!("sender: {}", line.trim()));
    let logged = line
        .split("(up to ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(parse_lsn)
        .ok_or_else(|| format!("cannot parse the LSN in {line:?}"))?;
    if logged != end {
        return Err(format!("sender says it shipped through B's shutdown checkpoint up to {}, pg_waldump says WAL ends at {}", fmt_lsn(logged), fmt_lsn(end)));
    }
    let flushed = ctx.recv_flushed()?;
    if flushed != end {
        return Err(format!("receiver's .walship-flushed {} != B's end of WAL {}", fmt_lsn(flushed), fmt_lsn(end)));
    }
    let st = ctx.sigterm("send", Duration::from_secs(60))?;
    if !st.success() {
        return Err(format!("walship send exited with {st} after SIGTERM (want 0)"));
    }
    let out = fs::read_to_string(ctx.send_out()).unwrap_or_default();
    println!("   walship send stdout:\n{}", indent(&out));
    let st = ctx.sigterm("recv", Duration::from_secs(30))?;
    if !st.success() {
        return Err(format!("walship recv exited with {st} after SIGTERM (want 0)"));
    }
    let json = fs::read_to_string(ctx.report()).map_err(|e| format!("read {}: {e}", ctx.report().display()))?;
    println!("   report: {}", json.trim());
    let rep_end = json_field(&json, "end_lsn").and_then(|s| parse_lsn(&s));
    if rep_end != Some(end) {
        return Err(format!("report end_lsn {rep_end:?} != B's end of WAL {} ({end})", fmt_lsn(end)));
    }
    let conns: u64 = json_field(&json, "connections").and_then(|s| s.parse().ok()).unwrap_or(0);
    if conns < 2 {
        return Err(format!("report says {conns} connection(s); the timeline switch needs a reconnection: {json}"));
    }
    for (who, p) in [("send", ctx.send_err()), ("recv", ctx.recv_err())] {
        let log = strip_ansi(&fs::read_to_string(&p).unwrap_or_default());
        for l in log.lines().filter(|l| (l.contains(" WARN ") || l.contains(" ERROR ")) && !l.contains("WITHOUT authentication")) {
            println!("   walship {who} logged: {l}");
        }
    }

    // 5. The received directories (both destinations).
    ctx.phase("5 received directories: history, timeline 1 + 2 segments, bytes");
    let (switch_seg, end_seg) = check_received(ctx, &ctx.recv_dir, &b_wal, &cd, backup_start, end)?;
    let flushed2 = walship::recv::published::read(&ctx.recv2_dir).ok().flatten().map_or(0, |p| p.lsn.0);
    if flushed2 != end {
        return Err(format!("the second destination holds {} durably, not B's end of WAL {}", fmt_lsn(flushed2), fmt_lsn(end)));
    }
    if check_received(ctx, &ctx.recv2_dir, &b_wal, &cd, backup_start, end)? != (switch_seg, end_seg) {
        return Err("the two destinations hold different timeline layouts".into());
    }

    // 6. Replay from the base backup through walship restore, across the timeline switch.
    ctx.phase("6 replay base backup via walship restore, recovery_target_timeline=latest");
    replay(ctx, &base, end, &cd, backup_start, switch_seg, end_seg, &sums)?;

    // 7. The second destination's archive: timeline 1's last segment as `.partial`, cut at the
    // switch point; the whole archive verifies.
    if ctx.s3.is_some() {
        ctx.phase("7 archive: timeline 1's last segment in the store as .partial; verify");
        check_archive(ctx, &cd, switch_seg)?;
    }
    ctx.end_phase();
    Ok(())
}

const ARCHIVE_PREFIX: &str = "timelines";

fn check_archive(ctx: &Ctx, cd: &ControlData, switch_seg: u64) -> R<()> {
    let server = ctx.s3.as_ref().expect("store");
    let seg = cd.seg_size;
    let history = fs::read_to_string(ctx.recv2_dir.join("00000002.history")).map_err(|e| format!("read 00000002.history: {e}"))?;
    let switch = parse_history(&history)?.iter().find(|(t, _)| *t == 1).map(|(_, l)| *l).ok_or("00000002.history names no timeline 1")?;
    if switch / seg != switch_seg || switch % seg == 0 {
        return Err(format!("switch point {} is not inside segment {switch_seg:X}: nothing to check", fmt_lsn(switch)));
    }
    let name = format!("{}.partial", seg_name(1, switch_seg, seg));
    let local = fs::read(ctx.recv2_dir.join(&name)).map_err(|e| format!("read {name} of the second destination: {e}"))?;
    let key = walship::archive::keys::partial_key(ARCHIVE_PREFIX, cd.sysid, 1, switch_seg, seg);
    let store = walship::archive::BlockingStore::new(&server.settings("")).map_err(|e| e.to_string())?;
    let mut last = String::new();
    let got = poll_until(Duration::from_secs(60), Duration::from_millis(250), || match store.get_verified(&key) {
        Ok(Some(b)) => Some(b),
        Ok(None) => {
            last = "no such object".into();
            None
        }
        Err(e) => {
            last = e.to_string();
            None
        }
    })
    .ok_or_else(|| format!("{key} not in the store within 60 s ({last}); recv2's log:\n{}", tail_file(&ctx.tmp.join("recv2.stderr"), 30)))?;
    let cut = (switch % seg) as usize;
    if got.len() as u64 != seg || got[..cut] != local[..cut] || got[cut..].iter().any(|&b| b != 0) {
        return Err(format!("{key}: {} bytes; want timeline 1's {cut} bytes up to the switch point {} then zeros", got.len(), fmt_lsn(switch)));
    }
    ctx.say(format!("store holds {key}: timeline 1 up to the switch point {}, zeros after", fmt_lsn(switch)));
    // Uploaded as the abandoned timeline's segment (not only as the newest `.partial` while
    // timeline 1 was live, which a resting durable position at the switch point would also do).
    let said = poll_until(Duration::from_secs(30), Duration::from_millis(250), || {
        strip_ansi(&fs::read_to_string(ctx.tmp.join("recv2.stderr")).unwrap_or_default()).lines().find(|l| l.contains("archived timeline 1's last segment")).map(str::to_string)
    })
    .ok_or("recv2 never logged `archived timeline 1's last segment`")?;
    ctx.say(format!("recv2: {}", said.trim()));
    let mut c = cmd(walship_bin(), ["verify"]);
    c.arg(format!("s3://{}/{ARCHIVE_PREFIX}", s3::BUCKET));
    server.env(&mut c);
    let out = run_ok(&mut c).map_err(|e| format!("walship verify of the archive: {e}"))?;
    ctx.say(format!("verify: {}", String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").trim()));
    Ok(())
}

/// Step 5; returns (segment number holding the switch point, segment number holding the end of WAL).
fn check_received(ctx: &Ctx, recv: &Path, b_wal: &Path, cd: &ControlData, backup_start: u64, end: u64) -> R<(u64, u64)> {
    let seg = cd.seg_size;
    let names = wal_names(recv);
    println!("   received directory {}:\n{}", recv.display(), listing(recv));
    println!("   B's pg_wal: {:?}", wal_names(b_wal));

    let hist_b = fs::read(b_wal.join("00000002.history")).map_err(|e| format!("read B's 00000002.history: {e}"))?;
    let hist_r = fs::read(recv.join("00000002.history")).map_err(|e| format!("received dir lacks 00000002.history: {e}"))?;
    if hist_b != hist_r {
        return Err(format!(
            "received 00000002.history differs from B's:\n--- B ---\n{}\n--- received ---\n{}",
            String::from_utf8_lossy(&hist_b),
            String::from_utf8_lossy(&hist_r)
        ));
    }
    let hist = parse_history(&String::from_utf8_lossy(&hist_b))?;
    let &[(1, switch)] = hist.as_slice() else {
        return Err(format!("expected one history entry (timeline 1, switch point), got {hist:?}"));
    };
    let switch_seg = switch / seg;
    let end_seg = (end - 1) / seg;
    ctx.say(format!(
        "00000002.history identical to B's: timeline 1 ends at {} (segment {}); end of WAL {} (segment {})",
        fmt_lsn(switch),
        seg_name(2, switch_seg, seg),
        fmt_lsn(end),
        seg_name(2, end_seg, seg)
    ));

    let present = |n: &str| names.iter().any(|x| x == n || *x == format!("{n}.partial"));
    let segno = |n: &str| -> u64 {
        let n = &n[..24];
        let hi = u64::from_str_radix(&n[8..16], 16).unwrap();
        let lo = u64::from_str_radix(&n[16..24], 16).unwrap();
        hi * (0x1_0000_0000 / seg) + lo
    };
    let tl1: Vec<&String> = names.iter().filter(|n| n.starts_with("00000001") && !n.ends_with(".history")).collect();
    let tl2: Vec<&String> = names.iter().filter(|n| n.starts_with("00000002") && !n.ends_with(".history")).collect();
    if tl1.is_empty() || tl2.is_empty() {
        return Err(format!("want segments of both timelines; timeline 1: {tl1:?}, timeline 2: {tl2:?}"));
    }
    // Timeline 1: every segment the replay needs, from the base backup's start up to the switch point.
    let missing1: Vec<String> =
        (backup_start / seg..switch_seg).map(|s| seg_name(1, s, seg)).filter(|n| !names.contains(n)).collect();
    if !missing1.is_empty() {
        return Err(format!("complete timeline-1 segments missing from the received directory: {missing1:?}"));
    }
    let sw1 = seg_name(1, switch_seg, seg);
    ctx.say(format!(
        "timeline 1: {} files ({} .. {}); its switch segment {sw1}: {}",
        tl1.len(),
        tl1[0],
        tl1[tl1.len() - 1],
        if names.contains(&sw1) {
            "complete"
        } else if present(&sw1) {
            ".partial"
        } else {
            "absent"
        }
    ));
    let beyond1: Vec<&&String> = tl1.iter().filter(|n| segno(n) > switch_seg).collect();
    if !beyond1.is_empty() {
        return Err(format!("timeline-1 segments past the switch point's segment {sw1}: {beyond1:?}"));
    }
    // Timeline 2: from the switch point's segment to the end of WAL's.
    let first2 = seg_name(2, switch_seg, seg);
    if segno(tl2[0]) != switch_seg {
        return Err(format!("first timeline-2 file is {}, want the switch point's segment {first2}", tl2[0]));
    }
    let missing2: Vec<String> = (switch_seg..=end_seg).map(|s| seg_name(2, s, seg)).filter(|n| !present(n)).collect();
    if !missing2.is_empty() {
        return Err(format!("timeline-2 segments missing from the received directory: {missing2:?}"));
    }
    let partials: Vec<&String> = names.iter().filter(|n| n.ends_with(".partial") && n.starts_with("00000002")).collect();
    ctx.say(format!("timeline 2: {} files ({} .. {}); .partial: {partials:?}", tl2.len(), tl2[0], tl2[tl2.len() - 1]));
    let beyond2: Vec<&&String> = tl2.iter().filter(|n| segno(n) > end_seg).collect();
    if !beyond2.is_empty() {
        return Err(format!("timeline-2 files past the end of WAL's segment: {beyond2:?}"));
    }

    // The first timeline-2 segment starts with timeline 1's WAL up to the switch point.
    let sw1p = format!("{sw1}.partial");
    let sw1_file = if names.contains(&sw1) { Some(sw1.clone()) } else if names.contains(&sw1p) { Some(sw1p) } else { None };
    if let Some(f1) = sw1_file {
        let a = fs::read(recv.join(&f1)).map_err(|e| format!("read received {f1}: {e}"))?;
        let f2 = if names.contains(&first2) { first2.clone() } else { format!("{first2}.partial") };
        let b = fs::read(recv.join(&f2)).map_err(|e| format!("read received {f2}: {e}"))?;
        // Compare the records, not each page header's timeline field (bytes 4..8 of every page).
        let k = (switch % seg) as usize;
        let blk = cd.block_size as usize;
        let diff = (0..k.min(a.len()).min(b.len())).find(|&i| a[i] != b[i] && !(4..8).contains(&(i % blk)));
        if a.len() < k || b.len() < k || diff.is_some() {
            return Err(format!("{f1} and {f2} differ before the switch point {} (first difference at {diff:?})", fmt_lsn(switch)));
        }
        ctx.say(format!("{f1} and {f2} hold the same WAL up to the switch point ({k} bytes, page-header timelines aside)"));
    }

    // Bytes: every received complete segment that B still has must be identical to B's; the end segment
    // (complete or .partial) must match B's up to the end of WAL.
    let mut compared = 0;
    let mut bad = Vec::new();
    for n in names.iter().filter(|n| is_seg_name(n)) {
        let Ok(theirs) = fs::read(b_wal.join(n)) else { continue };
        let ours = fs::read(recv.join(n)).map_err(|e| format!("read received {n}: {e}"))?;
        if n.starts_with("00000002") && segno(n) == end_seg {
            let k = (end % seg) as usize;
            if ours.len() != theirs.len() || ours[..k] != theirs[..k] {
                bad.push(format!("{n} (end segment, first {k} bytes)"));
            }
        } else if ours != theirs {
            let at = ours.iter().zip(&theirs).position(|(a, b)| a != b);
            bad.push(format!("{n} (len {} vs B {}, first difference at {at:?})", ours.len(), theirs.len()));
        }
        compared += 1;
    }
    let endp = format!("{}.partial", seg_name(2, end_seg, seg));
    if names.contains(&endp) {
        let ours = fs::read(recv.join(&endp)).map_err(|e| e.to_string())?;
        let theirs = fs::read(b_wal.join(seg_name(2, end_seg, seg))).map_err(|e| format!("read B's end segment: {e}"))?;
        let k = (end % seg) as usize;
        if ours.len() < k || ours[..k] != theirs[..k] {
            bad.push(format!("{endp} (first {k} bytes vs B's segment)"));
        }
        compared += 1;
    }
    if !bad.is_empty() {
        return Err(format!("received files differ from B's pg_wal: {bad:?}"));
    }
    ctx.say(format!("{compared} received segments byte-identical to B's pg_wal"));
    Ok((switch_seg, end_seg))
}

#[allow(clippy::too_many_arguments)]
fn replay(ctx: &Ctx, base: &Path, target: u64, cd: &ControlData, backup_start: u64, switch_seg: u64, end_seg: u64, sums: &[(String, String)]) -> R<()> {
    let standby = Server {
        pg: ctx.pg.clone(),
        name: "replay",
        data: ctx.pgdir.join("replay"),
        log: ctx.pgdir.join("replay.log"),
        sock: sock_dir(&ctx.pg, ctx.pgdir.join("sock-r")),
        port: REPLAY_PORT,
        running: false,
    };
    // What recovery must fetch: the history file, timeline 1 up to the switch, timeline 2 from it.
    let seg = cd.seg_size;
    let mut want_restored: Vec<String> = vec!["00000002.history".into()];
    want_restored.extend((backup_start / seg..switch_seg).map(|s| seg_name(1, s, seg)));
    want_restored.extend((switch_seg..=end_seg).map(|s| seg_name(2, s, seg)));
    let replay = common::replay::Replay {
        standby,
        base,
        restore_exe: ctx.restore_exe()?,
        recv_dir: &ctx.recv_dir,
        extra_conf: "recovery_target_timeline = 'latest'",
        target,
        sums,
        want_restored,
    };
    let standby = common::replay::replay_and_verify(replay, &|m| ctx.say(m))?;
    let scd = standby.controldata()?;
    ctx.say(format!(
        "replay standby stopped: pg_control `{}`, latest checkpoint {} on timeline {} (B's shutdown checkpoint {})",
        scd.state,
        fmt_lsn(scd.checkpoint),
        scd.tli,
        fmt_lsn(cd.checkpoint)
    ));
    if scd.tli != 2 || scd.checkpoint != cd.checkpoint {
        return Err(standby.err(format!(
            "replay standby's latest (restart)point is {} on timeline {}, want B's shutdown checkpoint {} on timeline 2",
            fmt_lsn(scd.checkpoint),
            scd.tli,
            fmt_lsn(cd.checkpoint)
        )));
    }
    Ok(())
}
