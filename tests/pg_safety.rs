//! Sender safety against a real PostgreSQL (issue #10):
//!
//! - a NEW `--slot` while pg_wal still holds older WAL: shipping starts at the slot's restart_lsn
//!   segment (said loudly), so a CHECKPOINT that recycles the older WAL while the receiver is
//!   stalled cannot leave the receiver behind the slot; the receiver's WAL replays to the end.
//!   A receiver behind an EXISTING slot is refused with both LSNs named;
//! - `--pg-wal` of one cluster with `--conninfo` of another is refused before any slot is created
//!   (both pairings);
//! - `--once` ships a freshly promoted cluster (its switch segment's first page has the old
//!   timeline) and a fresh standby replays it to the end of WAL;
//! - server errors are shown with SQLSTATE and message (wrong password, max_replication_slots=0),
//!   and wal_level=minimal is warned about.
//!
//! Replay checks follow pg_follow.rs: a standby from `pg_basebackup -X none` with an EMPTY pg_wal,
//! `restore_command = walship restore`, must reach exactly the end of the source's WAL (end of its
//! shutdown checkpoint, found with pg_waldump) and show the same table checksums.
//!
//! Needs PostgreSQL; without it each test prints "SKIP: PostgreSQL not installed" and passes, unless
//! `WALSHIP_REQUIRE_PG=1`. Serialized; ports 56101..56143 (used by no other test file).
//!
//! Run: `cargo test --release --test pg_safety -- --nocapture`.

mod common;

use common::pg::*;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::time::{Duration, Instant};


static SERIAL: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

struct Ctx {
    pg: Pg,
    tmp: TestDir,
    pgdir: PathBuf,
    recv_dir: PathBuf,
    addr: String,
    recv: Option<ChildGuard>,
    send: Option<ChildGuard>,
    t0: Instant,
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
    Some(Ctx {
        pg,
        pgdir,
        recv_dir: root.join("recv"),
        addr: format!("127.0.0.1:{}", free_port()),
        recv: None,
        send: None,
        tmp,
        t0: Instant::now(),
    })
}

impl Ctx {
    fn say(&self, msg: impl std::fmt::Display) {
        println!("[{:>6.2} s] {msg}", self.t0.elapsed().as_secs_f64());
    }

    fn server(&self, name: &'static str, port: u16) -> Server {
        self.pg.server(&self.pgdir, name, port).expect("server socket dir")
    }

    /// initdb + `conf` appended + start.
    fn init(&self, s: &mut Server, conf: &str) -> R<()> {
        s.init("pg_safety test", &format!("log_checkpoints = on\n{conf}"))
    }

    fn log_path(&self, what: &str) -> PathBuf {
        self.tmp.join(format!("{what}.log"))
    }

    fn start_recv(&mut self) -> R<()> {
        fs::create_dir_all(&self.recv_dir).map_err(|e| e.to_string())?;
        let log = fs::File::create(self.log_path("recv")).map_err(|e| e.to_string())?;
        let mut c = walship(&["recv", "--listen", &self.addr, "--dir", p(&self.recv_dir)]);
        c.stdout(log.try_clone().map_err(|e| e.to_string())?).stderr(log);
        self.recv = Some(ChildGuard::spawn("walship recv", &mut c).map_err(|e| format!("spawn recv: {e}"))?);
        self.wait_log("recv", "listening", Duration::from_secs(20))?;
        Ok(())
    }

    /// `walship send ARGS --to ADDR --report-json ...`, logging to `send.log`.
    fn start_send(&mut self, args: &[&str]) -> R<()> {
        let log = fs::File::create(self.log_path("send")).map_err(|e| e.to_string())?;
        let report = self.tmp.join("send-report.json");
        let mut c = walship(&["send", "--to", &self.addr, "--report-json", p(&report)]);
        c.args(args).stdout(log.try_clone().map_err(|e| e.to_string())?).stderr(log);
        self.say(format!("$ {}", cmdline(&c)));
        self.send = Some(ChildGuard::spawn("walship send", &mut c).map_err(|e| format!("spawn send: {e}"))?);
        Ok(())
    }

    fn log_text(&self, what: &str) -> String {
        strip_ansi(&fs::read_to_string(self.log_path(what)).unwrap_or_default())
    }

    fn wait_log(&self, what: &str, needle: &str, timeout: Duration) -> R<String> {
        poll_until(timeout, Duration::from_millis(50), || self.log_text(what).lines().find(|l| l.contains(needle)).map(str::to_string))
            .ok_or_else(|| format!("no line containing {needle:?} in the {what} log within {timeout:?}"))
    }

    fn wait_exit(&mut self, which: &str, timeout: Duration) -> R<ExitStatus> {
        let g = if which == "send" { self.send.as_mut() } else { self.recv.as_mut() };
        let g = g.ok_or_else(|| format!("walship {which} not running"))?;
        g.wait_timeout(timeout).map_err(|e| e.to_string())?.ok_or_else(|| format!("walship {which} still running after {timeout:?}"))
    }

    fn signal(&mut self, which: &str, sig: i32) -> R<()> {
        let g = if which == "send" { self.send.as_mut() } else { self.recv.as_mut() };
        g.ok_or_else(|| format!("walship {which} not running"))?.signal(sig).map_err(|e| format!("signal {sig} to {which}: {e}"))
    }

    fn sigterm(&mut self, which: &str) -> R<()> {
        self.signal(which, libc::SIGTERM)?;
        let st = self.wait_exit(which, Duration::from_secs(60))?;
        if !st.success() {
            return Err(format!("walship {which} exited with {st} after SIGTERM (want 0)"));
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

    fn base_backup(&self, s: &Server) -> R<(PathBuf, u64)> {
        let base = self.pgdir.join("base");
        let start = s.base_backup(&base)?;
        self.say(format!("base backup of {}: START WAL LOCATION {}", s.name, fmt_lsn(start)));
        Ok((base, start))
    }

    /// Stop `s` cleanly; (control data, end of WAL per pg_waldump).
    fn clean_stop(&self, s: &mut Server) -> R<(ControlData, u64)> {
        let (cd, end) = s.clean_stop()?;
        self.say(format!("{} stopped cleanly: timeline {}, shutdown checkpoint {}, end of WAL {}", s.name, cd.tli, fmt_lsn(cd.checkpoint), fmt_lsn(end)));
        Ok((cd, end))
    }

    /// A standby from `base` (EMPTY pg_wal) restoring only through `walship restore` from the
    /// receiver's directory must replay to exactly `target` and show `sums`; every segment from
    /// the backup's start to the target must have been restored.
    fn replay(&self, base: &Path, target: u64, cd: &ControlData, backup_start: u64, sums: &[(String, String)], port: u16) -> R<()> {
        let want_restored = (backup_start / cd.seg_size..=(target - 1) / cd.seg_size).map(|s| seg_name(cd.tli, s, cd.seg_size)).collect();
        let replay = common::replay::Replay {
            standby: self.server("replay", port),
            base,
            restore_exe: self.pg.restore_exe(self.tmp.path())?,
            recv_dir: &self.recv_dir,
            // A backup of a standby carries its primary_conninfo: this one restores only.
            extra_conf: "primary_conninfo = ''",
            target,
            sums,
            want_restored,
        };
        common::replay::replay_and_verify(replay, &|m| self.say(m))?;
        Ok(())
    }

    fn fail(&self, e: String) -> ! {
        panic!(
            "{e}\n--- walship send log tail ---\n{}\n--- walship recv log tail ---\n{}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)",
            tail_str(&self.log_text("send"), 40),
            tail_str(&self.log_text("recv"), 30),
            self.tmp.path().display()
        )
    }
}

/// An LSN as walship prints it (`%X/%08X`).
fn wlsn(lsn: u64) -> String {
    format!("{:X}/{:08X}", lsn >> 32, lsn & 0xffff_ffff)
}

fn segments_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| is_seg_name(n)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------------------
// Item 2: a new --slot while pg_wal holds older WAL; CHECKPOINT recycles it while the receiver is stalled

#[test]
fn new_slot_ships_only_protected_wal_and_replays_after_a_checkpoint() {
    let _l = lock();
    let Some(mut ctx) = setup("safety-slot") else { return };
    if let Err(e) = new_slot(&mut ctx) {
        ctx.fail(e);
    }
}

fn new_slot(ctx: &mut Ctx) -> R<()> {
    let mut primary = ctx.server("primary", 56101);
    // wal_keep_size holds WAL older than the redo, as in the report (pg_wal from 0/05000000,
    // the new slot at 0/0F77C5D0).
    ctx.init(&mut primary, "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nwal_keep_size = 1GB\nmax_wal_size = 256MB\nmin_wal_size = 64MB")?;
    primary.pgbench(&["-i", "-s", "4", "-q"])?;
    primary.sql("SELECT pg_switch_wal()")?;
    primary.sql("CHECKPOINT")?;
    let pg_wal = primary.data.join("pg_wal");
    let before = segments_in(&pg_wal);
    let oldest = before.first().cloned().ok_or("empty pg_wal")?;
    ctx.say(format!("pg_wal before walship: {} segments from {oldest}; redo {}", before.len(), primary.sql("SELECT redo_lsn FROM pg_control_checkpoint()")?));

    // The receiver is stalled (SIGSTOP) before the sender connects: its handshake waits.
    ctx.start_recv()?;
    ctx.signal("recv", libc::SIGSTOP)?;
    let conninfo = primary.conninfo();
    let pg_wal_s = pg_wal.to_str().ok_or("path")?.to_string();
    ctx.start_send(&["--pg-wal", &pg_wal_s, "--conninfo", &conninfo, "--slot", "fill", "--insecure-no-auth"])?;
    let following = ctx.wait_log("send", "following a live", Duration::from_secs(30))?;
    ctx.say(format!("sender: {}", following.trim()));
    let restart = primary.lsn("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'fill'")?;
    let seg = 16u64 << 20;
    let oldest_segno = u64::from_str_radix(&oldest[16..24], 16).map_err(|e| e.to_string())?;
    if restart / seg <= oldest_segno {
        return Err(format!("test premise: the new slot ({}) should be past pg_wal's oldest segment {oldest}", fmt_lsn(restart)));
    }
    // While the receiver is stalled: WAL before the slot is no longer kept, and a CHECKPOINT recycles it.
    primary.sql("ALTER SYSTEM SET wal_keep_size = 0")?;
    primary.sql("SELECT pg_reload_conf()")?;
    std::thread::sleep(Duration::from_millis(300));
    primary.sql("CREATE TABLE filler AS SELECT generate_series(1, 10000) g")?;
    primary.sql("SELECT pg_switch_wal()")?;
    primary.sql("CHECKPOINT")?;
    if pg_wal.join(&oldest).exists() {
        return Err(format!("test premise: the CHECKPOINT should have recycled {oldest} (pg_wal: {:?})", segments_in(&pg_wal)));
    }
    ctx.say(format!("CHECKPOINT recycled the WAL before the slot; pg_wal now starts at {:?}", segments_in(&pg_wal).first()));
    ctx.signal("recv", libc::SIGCONT)?;
    ctx.wait_log("send", "streaming from", Duration::from_secs(30))?;

    let (base, backup_start) = ctx.base_backup(&primary)?;
    primary.pgbench(&["-c", "2", "-j", "2", "-T", "3", "-n"])?;
    ctx.check_alive()?;
    let sums = checksums(&primary)?;
    let (cd, end) = ctx.clean_stop(&mut primary)?;
    let line = ctx.wait_log("send", "holds the server's WAL durably through its shutdown checkpoint", Duration::from_secs(60))?;
    ctx.say(format!("sender: {}", line.trim()));
    let flushed = ctx.recv_flushed()?;
    if flushed != end {
        return Err(format!("receiver's .walship-flushed {} != end of WAL {}", fmt_lsn(flushed), fmt_lsn(end)));
    }
    ctx.sigterm("send")?;
    ctx.sigterm("recv")?;
    let held = segments_in(&ctx.recv_dir);
    ctx.say(format!("receiver holds {} .. {:?}", held.first().map_or("-", |s| s.as_str()), held.last()));
    if held.first() != Some(&seg_name(1, restart / seg, seg)) {
        return Err(format!("the receiver's first segment is {:?}, want the slot's {}", held.first(), seg_name(1, restart / seg, seg)));
    }
    ctx.replay(&base, end, &cd, backup_start, &sums, 56102)?;
    // Said loudly, up front: what pg_wal holds and the new slot does not protect is not shipped.
    let warn = ctx.wait_log("send", "reserves WAL only from", Duration::from_secs(5))?;
    ctx.say(format!("sender: {}", warn.trim()));
    if !warn.contains("WARN") || !warn.contains(&wlsn(restart)) || !warn.contains(&wlsn(oldest_segno * seg)) {
        return Err(format!("the sender's warning should be a WARN naming pg_wal's oldest WAL {} and the slot's {}: {warn}", wlsn(oldest_segno * seg), wlsn(restart)));
    }
    let first = following.split("first=").nth(1).and_then(|s| s.split_whitespace().next()).and_then(parse_lsn);
    if first != Some(restart / seg * seg) {
        return Err(format!("the sender follows from {first:?}, want the slot's segment {}", fmt_lsn(restart / seg * seg)));
    }


    // An EXISTING slot ahead of what the receiver holds: refused, both LSNs named.
    primary.pg_ctl_start(true)?;
    primary.sql("CREATE TABLE more AS SELECT generate_series(1, 10000) g")?;
    primary.sql("SELECT pg_switch_wal()")?;
    primary.sql("SELECT pg_replication_slot_advance('fill', pg_current_wal_lsn())")?;
    let ahead = primary.lsn("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = 'fill'")?;
    ctx.start_recv()?;
    ctx.start_send(&["--pg-wal", &pg_wal_s, "--conninfo", &conninfo, "--slot", "fill", "--insecure-no-auth"])?;
    let st = ctx.wait_exit("send", Duration::from_secs(60))?;
    let log = ctx.log_text("send");
    let err = log.lines().find(|l| l.contains("error")).unwrap_or("").to_string();
    ctx.say(format!("sender with the slot ahead of the receiver: {st}: {err}"));
    if st.success() || !err.contains(&wlsn(end)) || !err.contains(&wlsn(ahead / seg * seg)) || !err.contains("replication slot fill keeps WAL only from") {
        return Err(format!("a receiver at {} behind slot fill ({}) must be refused naming both: {st}\n{log}", fmt_lsn(end), fmt_lsn(ahead)));
    }
    ctx.sigterm("recv")?;
    primary.stop("fast")
}

// ---------------------------------------------------------------------------------------------------------
// Item 3: --pg-wal of one cluster, --conninfo of another

#[test]
fn pg_wal_and_conninfo_of_different_clusters_are_refused_before_any_slot() {
    let _l = lock();
    let Some(mut ctx) = setup("safety-cluster") else { return };
    if let Err(e) = wrong_cluster(&mut ctx) {
        ctx.fail(e);
    }
}

fn wrong_cluster(ctx: &mut Ctx) -> R<()> {
    let conf = "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4";
    let mut a = ctx.server("a", 56111);
    let mut b = ctx.server("b", 56112);
    ctx.init(&mut a, conf)?;
    ctx.init(&mut b, conf)?;
    let sysid = |s: &Server| s.sql("SELECT system_identifier FROM pg_control_system()");
    let (id_a, id_b) = (sysid(&a)?, sysid(&b)?);
    ctx.say(format!("cluster a: system {id_a}; cluster b: system {id_b}"));
    for (wal_of, conn_to) in [(&a, &b), (&b, &a)] {
        let pg_wal = wal_of.data.join("pg_wal");
        ctx.start_send(&["--pg-wal", p(&pg_wal), "--conninfo", &conn_to.conninfo(), "--slot", "wrong", "--insecure-no-auth"])?;
        let st = ctx.wait_exit("send", Duration::from_secs(30))?;
        let log = ctx.log_text("send");
        let err = log.lines().find(|l| l.contains("different clusters")).unwrap_or("").to_string();
        ctx.say(format!("--pg-wal of {} with --conninfo of {}: {st}: {err}", wal_of.name, conn_to.name));
        let (wal_id, server_id) = if wal_of.name == "a" { (&id_a, &id_b) } else { (&id_b, &id_a) };
        if st.success() || !err.contains(&format!("is system {server_id}")) || !err.contains(&format!("holds WAL of system {wal_id}")) {
            return Err(format!("want a refusal naming the server's system {server_id} and the WAL's {wal_id}: {st}\n{log}"));
        }
        let slots = conn_to.sql("SELECT count(*) FROM pg_replication_slots")?;
        if slots != "0" {
            return Err(format!("the refused sender created a slot on {} ({slots} slots)", conn_to.name));
        }
    }
    a.stop("fast")?;
    b.stop("fast")
}

// ---------------------------------------------------------------------------------------------------------
// Server errors: wrong password, max_replication_slots=0 (+ wal_level=minimal warning)

#[test]
fn server_errors_show_sqlstate_and_message() {
    let _l = lock();
    let Some(mut ctx) = setup("safety-errors") else { return };
    if let Err(e) = server_errors(&mut ctx) {
        ctx.fail(e);
    }
}

fn server_errors(ctx: &mut Ctx) -> R<()> {
    // a: password authentication over TCP; b: wal_level=minimal and no replication slots.
    let mut a = ctx.server("a", 56121);
    let mut b = ctx.server("b", 56122);
    ctx.init(&mut a, "listen_addresses = '127.0.0.1'\npassword_encryption = 'scram-sha-256'")?;
    a.sql("ALTER USER postgres PASSWORD 'right-password'")?;
    fs::write(a.data.join("pg_hba.conf"), "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n").map_err(|e| e.to_string())?;
    a.sql("SELECT pg_reload_conf()")?;
    ctx.init(&mut b, "wal_level = minimal\nmax_wal_senders = 0\nmax_replication_slots = 0")?;

    let wrong = format!("host=127.0.0.1 port={} user={PG_USER} password=wrong-password dbname=postgres", a.port);
    ctx.start_send(&["--pg-wal", p(&a.data.join("pg_wal")), "--conninfo", &wrong, "--insecure-no-auth"])?;
    let st = ctx.wait_exit("send", Duration::from_secs(30))?;
    let log = ctx.log_text("send");
    let err = log.lines().find(|l| l.contains("error")).unwrap_or("").to_string();
    ctx.say(format!("wrong password: {st}: {err}"));
    if st.success() || !err.contains("28P01") || !err.contains("password authentication failed") || !err.contains("password=***") {
        return Err(format!("want SQLSTATE 28P01 and PostgreSQL's message, password masked: {st}\n{log}"));
    }
    if log.contains("wrong-password") {
        return Err(format!("the password shows in the log:\n{log}"));
    }

    ctx.start_send(&["--pg-wal", p(&b.data.join("pg_wal")), "--conninfo", &b.conninfo(), "--slot", "s", "--insecure-no-auth"])?;
    let st = ctx.wait_exit("send", Duration::from_secs(30))?;
    let log = ctx.log_text("send");
    let err = log.lines().find(|l| l.contains("error")).unwrap_or("").to_string();
    ctx.say(format!("max_replication_slots=0: {st}: {err}"));
    if st.success() || !err.contains("55000") || !err.contains("max_replication_slots") {
        return Err(format!("want SQLSTATE 55000 and PostgreSQL's message about max_replication_slots: {st}\n{log}"));
    }
    let warn = log.lines().find(|l| l.contains("wal_level=minimal")).unwrap_or("");
    if !warn.contains("WARN") {
        return Err(format!("want a WARN about wal_level=minimal:\n{log}"));
    }
    a.stop("fast")?;
    b.stop("fast")
}

// ---------------------------------------------------------------------------------------------------------
// Item 4: --once on a freshly promoted cluster

#[test]
fn once_ships_a_promoted_cluster_that_replays_to_its_end() {
    let _l = lock();
    let Some(mut ctx) = setup("safety-promoted") else { return };
    if let Err(e) = promoted(&mut ctx) {
        ctx.fail(e);
    }
}

/// Primary a (port `a_port`), streaming standby b (`a_port + 1`) with load from a, b promoted, a
/// stopped; returns b, running on timeline 2.
fn promoted_standby(ctx: &mut Ctx, a_port: u16) -> R<Server> {
    let mut a = ctx.server("a", a_port);
    let mut b = ctx.server("b", a_port + 1);
    // wal_keep_size: b keeps its switch segment (the copy of timeline 1's last segment) through the
    // base backup's checkpoint, as a cluster promoted and stopped soon after does.
    ctx.init(&mut a, "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nhot_standby = on\nwal_keep_size = 1GB")?;
    a.pgbench(&["-i", "-s", "2", "-q"])?;
    let mut c = ctx.pg.cmd("pg_basebackup");
    c.arg("-h").arg(&a.sock).args(["-p", &a.port.to_string(), "-U", PG_USER]);
    c.arg("-D").arg(&b.data).args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
    run_ok(&mut c).map_err(|e| a.err(e))?;
    append(&b.data.join("postgresql.conf"), &format!("\n# standby b\nport = {}\nunix_socket_directories = '{}'\n", b.port, b.sock.display()))?;
    b.pg_ctl_start(true)?;
    a.pgbench(&["-c", "2", "-j", "2", "-t", "300", "-n"])?;
    let a_lsn = a.lsn("SELECT pg_current_wal_lsn()")?;
    poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        b.sql_quiet("SELECT pg_last_wal_replay_lsn()").ok().and_then(|s| parse_lsn(&s)).filter(|&l| l >= a_lsn)
    })
    .ok_or_else(|| b.err(format!("b did not replay a's WAL up to {}", fmt_lsn(a_lsn))))?;
    let mut c = ctx.pg.cmd("pg_ctl");
    c.arg("-D").arg(&b.data).args(["promote", "-w", "-t", "60"]);
    run_ok(&mut c).map_err(|e| b.err(e))?;
    a.stop("fast")?;
    ctx.say(format!("b promoted at {}", b.sql("SELECT pg_current_wal_lsn()")?));
    Ok(b)
}

fn promoted(ctx: &mut Ctx) -> R<()> {
    let mut b = promoted_standby(ctx, 56131)?;
    let (base, backup_start) = ctx.base_backup(&b)?;
    b.pgbench(&["-c", "2", "-j", "2", "-t", "300", "-n"])?;
    let sums = checksums(&b)?;
    let (cd, end) = ctx.clean_stop(&mut b)?;
    if cd.tli != 2 {
        return Err(format!("b should be on timeline 2 after promotion, pg_control says {}", cd.tli));
    }
    let b_wal = b.data.join("pg_wal");
    let switch_seg = segments_in(&b_wal).into_iter().find(|n| n.starts_with("00000002")).ok_or("no timeline-2 segment")?;
    let head = fs::read(b_wal.join(&switch_seg)).map_err(|e| e.to_string())?;
    let page_tli = u32::from_le_bytes(head[4..8].try_into().unwrap());
    ctx.say(format!("b's first timeline-2 segment {switch_seg}: first page xlp_tli {page_tli}"));
    if page_tli != 1 {
        return Err(format!("test premise: the switch segment's first page should carry timeline 1, has {page_tli}"));
    }

    ctx.start_recv()?;
    ctx.start_send(&["--pg-wal", p(&b_wal), "--once", "--retry-for", "10s", "--insecure-no-auth"])?;
    let st = ctx.wait_exit("send", Duration::from_secs(120))?;
    if !st.success() {
        return Err(format!("send --once of the promoted cluster exited with {st}"));
    }
    let shipped = ctx.log_text("send").lines().find(|l| l.contains("shipped")).unwrap_or("").to_string();
    ctx.say(format!("sender: {}", shipped.trim()));
    let flushed = ctx.recv_flushed()?;
    if flushed != end {
        return Err(format!("receiver's .walship-flushed {} != b's end of WAL {}", fmt_lsn(flushed), fmt_lsn(end)));
    }
    ctx.sigterm("recv")?;
    ctx.replay(&base, end, &cd, backup_start, &sums, 56133)
}

/// Follow mode started on a freshly promoted server (after its first checkpoint): the identity's
/// timeline is the file names' (2), though the oldest segment starts with timeline-1 pages; the
/// receiver's WAL replays to the end.
#[test]
fn follow_starts_on_a_freshly_promoted_server() {
    let _l = lock();
    let Some(mut ctx) = setup("safety-promoted-follow") else { return };
    if let Err(e) = promoted_follow(&mut ctx) {
        ctx.fail(e);
    }
}

fn promoted_follow(ctx: &mut Ctx) -> R<()> {
    let mut b = promoted_standby(ctx, 56141)?;
    // Right after promotion pg_control still names timeline 1 (the sender then starts there and
    // switches, as pg_timeline.rs covers); after a checkpoint it names 2, and pg_wal's oldest
    // timeline-2 segment is the switch segment, whose first page says timeline 1.
    b.sql("CHECKPOINT")?;
    ctx.start_recv()?;
    let b_wal = b.data.join("pg_wal");
    ctx.start_send(&["--pg-wal", p(&b_wal), "--conninfo", &b.conninfo(), "--slot", "s", "--insecure-no-auth"])?;
    let l = ctx.wait_log("send", "following a live", Duration::from_secs(30))?;
    ctx.say(format!("sender: {}", l.trim()));
    if !l.contains("timeline=2") {
        return Err(format!("the sender should follow timeline 2: {l}"));
    }
    // The WAL identity (what the Hello carries, which files are read) is timeline 2 from the start,
    // not the switch segment's page timeline 1 (which used to send it through timeline 1's files).
    let opened = ctx.wait_log("send", "source opened", Duration::from_secs(5))?;
    if !opened.contains("timeline=2") {
        return Err(format!("the source's identity should be timeline 2: {opened}"));
    }
    let (base, backup_start) = ctx.base_backup(&b)?;
    b.pgbench(&["-c", "2", "-j", "2", "-t", "300", "-n"])?;
    ctx.check_alive()?;
    let sums = checksums(&b)?;
    let (cd, end) = ctx.clean_stop(&mut b)?;
    let line = ctx.wait_log("send", "holds the server's WAL durably through its shutdown checkpoint", Duration::from_secs(60))?;
    ctx.say(format!("sender: {}", line.trim()));
    let flushed = ctx.recv_flushed()?;
    if flushed != end {
        return Err(format!("receiver's .walship-flushed {} != b's end of WAL {}", fmt_lsn(flushed), fmt_lsn(end)));
    }
    ctx.sigterm("send")?;
    ctx.sigterm("recv")?;
    ctx.replay(&base, end, &cd, backup_start, &sums, 56143)
}
