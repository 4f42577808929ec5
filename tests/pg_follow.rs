//! Follow mode against a real, LIVE PostgreSQL: `walship send --conninfo ... --slot ...` ships while the
//! server runs (pgbench load), survives a clean stop and a crash + restart, never lets the slot pass what the
//! receiver made durable, and measures flush-to-durable-ack latency.
//!
//! Every test ends the same way when it replays: a standby from a base backup (`pg_basebackup -X none`,
//! EMPTY pg_wal) whose `restore_command` is `walship restore %f %p --dir D` must reach exactly the end of the
//! primary's WAL (end of its shutdown checkpoint record, found independently with pg_waldump) and show the
//! same table checksums as the primary.
//!
//! Needs PostgreSQL (`/usr/lib/postgresql/<major>/bin`, newest wins; `WALSHIP_PG_BIN` overrides). Without it
//! each test prints "SKIP: PostgreSQL not installed" and passes, unless `WALSHIP_REQUIRE_PG=1`. As root,
//! PostgreSQL programs run as the `postgres` OS user via `runuser`. Tests are serialized (one PostgreSQL at a
//! time: they share a small machine) and each uses its own fixed ports.
//!
//! Env knobs: `WALSHIP_KEEP_TMP=1` keeps temp dirs (path printed).
//!
//! Run: `cargo test --release --test pg_follow -- --nocapture`.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SLOT: &str = "walship";


/// One PostgreSQL test at a time (2 shared cores; pgbench timings would be meaningless otherwise).
static SERIAL: Mutex<()> = Mutex::new(());

use common::pg::*;

// ---------------------------------------------------------------------------------------------------------
// Test context: a primary, its walship receiver + follow-mode sender

struct Ctx {
    pg: Pg,
    tmp: TestDir,
    primary: Server,
    sock: PathBuf,
    pgdir: PathBuf,
    recv_dir: PathBuf,
    addr: String,
    recv: Option<ChildGuard>,
    send: Option<ChildGuard>,
    t0: Instant,
    /// As deployed: a shared key and TLS (else `--insecure-no-auth`, plain TCP).
    secure: Option<Secure>,
    /// More receivers the sender also ships to (issue #12), and the quorum over all of them.
    more: Vec<MoreRecv>,
    quorum: Option<usize>,
    /// More arguments for `walship send`.
    send_extra: Vec<String>,
}

/// A further receiver: its address, directory, log and process.
struct MoreRecv {
    addr: String,
    dir: PathBuf,
    log: PathBuf,
    guard: Option<ChildGuard>,
}

/// Key file, receiver certificate and key (self-signed: it is also the sender's CA).
struct Secure {
    key: PathBuf,
    cert: PathBuf,
    cert_key: PathBuf,
}

/// `None` = skip (no PostgreSQL, and not required).
fn setup(name: &str, port: u16) -> Option<Ctx> {
    let tmp = TestDir::new(name);
    let root = tmp.path().to_path_buf();
    let pg = Pg::for_test(&root)?;
    let pgdir = root.join("pg");
    let sock = pgdir.join("sock");
    fs::create_dir_all(&sock).expect("mkdir sock");
    fs::set_permissions(&sock, fs::Permissions::from_mode(0o700)).expect("chmod sock");
    pg.chown(&pgdir).expect("chown pgdir");
    println!("[{name}] PostgreSQL bin: {}  temp dir: {}", pg.bin.display(), root.display());
    let primary = Server {
        pg: pg.clone(),
        name: "primary",
        data: pgdir.join("primary"),
        log: pgdir.join("primary.log"),
        sock: sock.clone(),
        port,
        running: false,
    };
    Some(Ctx {
        pg,
        primary,
        sock,
        pgdir,
        recv_dir: root.join("recv"),
        addr: format!("127.0.0.1:{}", free_port()),
        recv: None,
        send: None,
        tmp,
        t0: Instant::now(),
        secure: None,
        more: Vec::new(),
        quorum: None,
        send_extra: Vec::new(),
    })
}

impl Ctx {
    fn say(&self, msg: impl std::fmt::Display) {
        println!("[{:>6.2} s] {msg}", self.t0.elapsed().as_secs_f64());
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
    fn fail(&self, e: String) -> ! {
        panic!(
            "{e}\n--- walship send stdout ---\n{}\n--- walship send stderr tail ---\n{}\n--- walship recv stderr tail ---\n{}\n\
             --- primary log tail ---\n{}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)",
            tail_file(&self.send_out(), 20),
            strip_ansi(&tail_file(&self.send_err(), 40)),
            strip_ansi(&tail_file(&self.recv_err(), 30)),
            tail_file(&self.primary.log, 30),
            self.tmp.path().display()
        )
    }

    fn init_primary(&mut self) -> R<()> {
        let mut c = self.pg.cmd("initdb");
        c.arg("-D").arg(&self.primary.data);
        c.args(["-U", PG_USER, "--auth=trust", "--locale=C", "--encoding=UTF8", "--no-sync"]);
        run_ok(&mut c)?;
        append(
            &self.primary.data.join("postgresql.conf"),
            &format!(
                "\n# walship pg_follow test\nport = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n\
                 wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nwal_keep_size = 0\n\
                 max_wal_size = 256MB\nmin_wal_size = 64MB\nlog_checkpoints = on\n",
                self.primary.port,
                self.sock.display()
            ),
        )?;
        self.primary.pg_ctl_start(true)?;
        self.say(format!("primary up: {}", self.primary.sql("SELECT version()")?));
        Ok(())
    }

    fn conninfo(&self) -> String {
        format!("host={} port={} user={PG_USER} dbname=postgres", self.sock.display(), self.primary.port)
    }

    /// From now on, walship runs authenticated and over TLS.
    fn go_secure(&mut self) -> R<()> {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).map_err(|e| e.to_string())?;
        let s = Secure { key: self.tmp.join("auth.key"), cert: self.tmp.join("recv.pem"), cert_key: self.tmp.join("recv.key") };
        let write = |p: &Path, text: String| fs::write(p, text).map_err(|e| format!("write {}: {e}", p.display()));
        write(&s.key, "follow-test-shared-key-0123456789\n".into())?;
        write(&s.cert, ck.cert.pem())?;
        write(&s.cert_key, ck.signing_key.serialize_pem())?;
        self.secure = Some(s);
        Ok(())
    }

    /// `--insecure-no-auth`, or the key and (for `side`) the TLS files.
    fn security_args(&self, c: &mut Command, side: &str) {
        match &self.secure {
            None => {
                c.arg("--insecure-no-auth");
            }
            Some(s) => {
                c.env_remove("WALSHIP_INSECURE_NO_AUTH").arg("--auth-key-file").arg(&s.key);
                if side == "recv" {
                    c.arg("--tls-cert").arg(&s.cert).arg("--tls-key").arg(&s.cert_key);
                } else {
                    c.arg("--tls-ca").arg(&s.cert);
                }
            }
        }
    }

    fn start_recv(&mut self) -> R<()> {
        let file = |p: PathBuf| fs::File::create(&p).map_err(|e| format!("create {}: {e}", p.display()));
        let mut c = cmd(walship_bin(), ["recv", "--listen", &self.addr, "--dir"]);
        c.arg(&self.recv_dir);
        self.security_args(&mut c, "recv");
        c.env("NO_COLOR", "1");
        c.stdin(Stdio::null()).stdout(file(self.tmp.join("recv.stdout"))?).stderr(file(self.recv_err())?);
        self.say(format!("$ {}", cmdline(&c)));
        self.recv = Some(ChildGuard::spawn("walship recv", &mut c).map_err(|e| format!("spawn recv: {e}"))?);
        Ok(())
    }

    fn start_send(&mut self, slot: Option<&str>) -> R<()> {
        let file = |p: PathBuf| fs::File::create(&p).map_err(|e| format!("create {}: {e}", p.display()));
        let mut c = cmd(walship_bin(), ["send", "--pg-wal"]);
        c.arg(self.primary.data.join("pg_wal")).args(["--to", &self.addr, "--conninfo", &self.conninfo()]);
        if let Some(s) = slot {
            c.args(["--slot", s]);
        }
        for m in &self.more {
            c.args(["--to", &m.addr]);
        }
        if let Some(k) = self.quorum {
            c.args(["--quorum", &k.to_string()]);
        }
        c.arg("--report-json").arg(self.report());
        c.args(&self.send_extra);
        self.security_args(&mut c, "send");
        c.env("NO_COLOR", "1");
        c.stdin(Stdio::null()).stdout(file(self.send_out())?).stderr(file(self.send_err())?);
        self.say(format!("$ {}", cmdline(&c)));
        let g = ChildGuard::spawn("walship send", &mut c).map_err(|e| format!("spawn send: {e}"))?;
        // Debug knob: WALSHIP_TEST_STRACE_SEND=1 records which process signals the sender (si_pid/si_uid).
        if std::env::var("WALSHIP_TEST_STRACE_SEND").as_deref() == Ok("1") {
            let mut st = Command::new("strace");
            st.args(["-qq", "-e", "trace=none", "-o"]).arg(self.tmp.join("send.strace")).arg("-p").arg(g.pid().to_string());
            st.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
            let _ = st.spawn();
            std::thread::sleep(Duration::from_millis(200));
        }
        self.send = Some(g);
        Ok(())
    }

    /// Start recv + follow-mode send with the slot; wait until the slot exists and the sender follows.
    fn start_walship(&mut self) -> R<()> {
        fs::create_dir_all(&self.recv_dir).map_err(|e| e.to_string())?;
        self.start_recv()?;
        self.start_send(Some(SLOT))?;
        self.wait_log(&self.send_err(), "following a live", Duration::from_secs(30))?;
        let n = self.primary.sql(&format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{SLOT}'"))?;
        if n != "1" {
            return Err(format!("sender follows but slot {SLOT} does not exist (count {n})"));
        }
        self.say(format!("sender follows; slot {SLOT}: restart_lsn {}", fmt_lsn(self.slot_restart()?)));
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

    fn slot_restart(&self) -> R<u64> {
        self.primary.lsn(&format!("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = '{SLOT}'"))
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
                    // A read racing the fixed-size rewrite: try again.
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        Err(format!("{} never held a parsable LSN", p.display()))
    }

    fn pgbench(&self, args: &[&str]) -> R<String> {
        let mut c = self.pgbench_cmd(args);
        let out = run_ok(&mut c).map_err(|e| self.primary.err(e))?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    fn pgbench_cmd(&self, args: &[&str]) -> Command {
        let mut c = self.pg.cmd("pgbench");
        c.arg("-h").arg(&self.sock).args(["-p", &self.primary.port.to_string(), "-U", PG_USER]);
        c.args(args).arg("postgres");
        c
    }

    fn pgbench_run(&self, secs: u32) -> R<()> {
        let out = self.pgbench(&["-c", "2", "-j", "2", "-T", &secs.to_string(), "-n"])?;
        let tps = out.lines().find(|l| l.starts_with("tps")).unwrap_or("").to_string();
        self.say(format!("pgbench -T {secs}: {tps}"));
        Ok(())
    }

    fn base_backup(&self) -> R<(PathBuf, u64)> {
        let base = self.pgdir.join("base");
        let mut c = self.pg.cmd("pg_basebackup");
        c.arg("-h").arg(&self.sock).args(["-p", &self.primary.port.to_string(), "-U", PG_USER]);
        c.arg("-D").arg(&base).args(["-c", "fast", "-X", "none", "--no-sync"]);
        run_ok(&mut c).map_err(|e| self.primary.err(e))?;
        let label = fs::read_to_string(base.join("backup_label")).map_err(|e| format!("read backup_label: {e}"))?;
        let start = label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|s| s.split_whitespace().next())
            .and_then(parse_lsn)
            .ok_or_else(|| format!("no START WAL LOCATION in backup_label:\n{label}"))?;
        self.say(format!("base backup taken: START WAL LOCATION {}", fmt_lsn(start)));
        Ok((base, start))
    }

    /// Stop the primary cleanly; return (control data, end of WAL per pg_waldump).
    fn clean_stop(&mut self) -> R<(ControlData, u64)> {
        self.primary.stop("fast")?;
        let cd = self.primary.controldata()?;
        if cd.state != "shut down" || cd.redo != cd.checkpoint {
            return Err(format!("after a clean stop: state `{}`, redo {} checkpoint {}", cd.state, fmt_lsn(cd.redo), fmt_lsn(cd.checkpoint)));
        }
        let end = wal_end_after_checkpoint(&self.pg, &self.primary.data.join("pg_wal"), 1, cd.checkpoint, cd.block_size)?;
        self.say(format!("primary stopped cleanly: shutdown checkpoint {}, end of WAL {}", fmt_lsn(cd.checkpoint), fmt_lsn(end)));
        Ok((cd, end))
    }

    /// Wait for the sender's "... through its shutdown checkpoint (up to X)" line; return X.
    fn wait_shutdown_shipped(&self) -> R<u64> {
        let line = self.wait_log(&self.send_err(), "holds the server's WAL durably through its shutdown checkpoint", Duration::from_secs(60))?;
        self.say(format!("sender: {}", line.trim()));
        line.split("(up to ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(parse_lsn)
            .ok_or_else(|| format!("cannot parse the LSN in {line:?}"))
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

    /// SIGTERM the sender then the receiver; both must exit 0. Returns the sender's stdout.
    fn stop_walship(&mut self) -> R<String> {
        let st = self.sigterm("send", Duration::from_secs(60))?;
        let out = fs::read_to_string(self.send_out()).unwrap_or_default();
        if !st.success() {
            return Err(format!("walship send exited with {st} after SIGTERM (want 0)"));
        }
        println!("   walship send stdout:\n{}", indent(&out));
        if !out.contains("shipped") {
            return Err(format!("walship send stdout lacks `shipped`: {out:?}"));
        }
        let st = self.sigterm("recv", Duration::from_secs(30))?;
        if !st.success() {
            return Err(format!("walship recv exited with {st} after SIGTERM (want 0)"));
        }
        Ok(out)
    }

    fn report_json(&self) -> R<String> {
        fs::read_to_string(self.report()).map_err(|e| format!("read {}: {e}", self.report().display()))
    }

    /// A standby from `base` (empty pg_wal) restoring only through `walship restore`; it must replay to exactly
    /// `target` and show `sums`.
    fn replay(&self, base: &Path, target: u64, cd: &ControlData, backup_start: u64, sums: &[(String, String)], port: u16) -> R<()> {
        self.replay_from(&self.recv_dir, "standby", base, target, cd, backup_start, sums, port)
    }

    #[allow(clippy::too_many_arguments)]
    fn replay_from(&self, dir: &Path, name: &'static str, base: &Path, target: u64, cd: &ControlData, backup_start: u64, sums: &[(String, String)], port: u16) -> R<()> {
        let standby = Server {
            pg: self.pg.clone(),
            name,
            data: self.pgdir.join(name),
            log: self.pgdir.join(format!("{name}.log")),
            sock: self.sock.clone(),
            port,
            running: false,
        };
        let want_restored = (backup_start / cd.seg_size..=(target - 1) / cd.seg_size).map(|s| seg_name(cd.tli, s, cd.seg_size)).collect();
        let replay = common::replay::Replay {
            standby,
            base,
            restore_exe: self.restore_exe()?,
            recv_dir: dir,
            extra_conf: "",
            target,
            sums,
            want_restored,
        };
        common::replay::replay_and_verify(replay, &|m| self.say(m))?;
        Ok(())
    }

    fn restore_exe(&self) -> R<PathBuf> {
        self.pg.restore_exe(self.tmp.path())
    }

    fn print_sums(&self, sums: &[(String, String)]) {
        for (t, v) in sums {
            println!("     {t}: {v}");
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------------------
// 1. live follow, clean stop, replay

#[test]
fn live_follow_then_clean_stop_replays_over_tls_with_a_key() {
    let _l = lock();
    let Some(mut ctx) = setup("follow-clean", 5511) else { return };
    if let Err(e) = live_follow_then_clean_stop(&mut ctx) {
        ctx.fail(e);
    }
}

/// As deployed: authenticated, over TLS.
fn live_follow_then_clean_stop(ctx: &mut Ctx) -> R<()> {
    ctx.init_primary()?;
    ctx.go_secure()?;
    ctx.start_walship()?;
    ctx.wait_log(&ctx.recv_err(), "sender authenticated", Duration::from_secs(30))?;
    ctx.wait_log(&ctx.recv_err(), "TLS established", Duration::from_secs(5))?;
    let (base, backup_start) = ctx.base_backup()?;
    ctx.pgbench(&["-i", "-s", "5", "-q"])?;
    ctx.pgbench_run(8)?;
    ctx.check_alive()?;
    let sums = checksums(&ctx.primary)?;
    ctx.print_sums(&sums);
    let (cd, end) = ctx.clean_stop()?;
    let logged = ctx.wait_shutdown_shipped()?;
    if logged != end {
        return Err(format!("sender says it shipped through the shutdown checkpoint up to {}, pg_waldump says WAL ends at {}", fmt_lsn(logged), fmt_lsn(end)));
    }
    let flushed = ctx.recv_flushed()?;
    if flushed != end {
        return Err(format!("receiver's .walship-flushed {} != end of WAL {}", fmt_lsn(flushed), fmt_lsn(end)));
    }
    ctx.stop_walship()?;
    let json = ctx.report_json()?;
    println!("   report: {}", json.trim());
    let rep_end = json_field(&json, "end_lsn").and_then(|s| parse_lsn(&s));
    if rep_end != Some(end) {
        return Err(format!("report end_lsn {rep_end:?} != end of WAL {} ({end})", fmt_lsn(end)));
    }
    ctx.replay(&base, end, &cd, backup_start, &sums, 5512)
}

// ---------------------------------------------------------------------------------------------------------
// 2. kill -9 the postmaster mid-pgbench, restart (crash recovery), keep following

#[test]
fn crash_and_restart_keeps_going() {
    let _l = lock();
    let Some(mut ctx) = setup("follow-crash", 5521) else { return };
    if let Err(e) = crash_and_restart(&mut ctx) {
        ctx.fail(e);
    }
}

fn crash_and_restart(ctx: &mut Ctx) -> R<()> {
    ctx.init_primary()?;
    ctx.start_walship()?;
    let (base, backup_start) = ctx.base_backup()?;
    ctx.pgbench(&["-i", "-s", "5", "-q"])?;
    // pgbench in the background; kill -9 the postmaster while it runs.
    let bout = ctx.tmp.join("pgbench-crash.out");
    let mut c = ctx.pgbench_cmd(&["-c", "2", "-j", "2", "-T", "8", "-n"]);
    c.stdin(Stdio::null())
        .stdout(fs::File::create(&bout).map_err(|e| e.to_string())?)
        .stderr(fs::File::create(ctx.tmp.join("pgbench-crash.err")).map_err(|e| e.to_string())?);
    let mut bench = ChildGuard::spawn("pgbench", &mut c).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(4));
    let flush_before = ctx.primary.lsn("SELECT pg_current_wal_flush_lsn()")?;
    let pid = ctx.primary.postmaster_pid()?;
    // SAFETY: kill(2) on the postmaster pid read from its own postmaster.pid.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(format!("kill -9 {pid}: {}", std::io::Error::last_os_error()));
    }
    ctx.say(format!("kill -9 postmaster {pid} (flush LSN shortly before: {})", fmt_lsn(flush_before)));
    let st = bench.wait_timeout(Duration::from_secs(60)).map_err(|e| e.to_string())?;
    ctx.say(format!("pgbench ended with {st:?} (expected to fail)"));
    ctx.check_alive()?;
    // Let the sender notice the server is gone and that it did not shut down cleanly.
    std::thread::sleep(Duration::from_secs(2));
    let cd_crash = ctx.primary.controldata()?;
    ctx.say(format!("pg_control after kill -9: state `{}`", cd_crash.state));
    // Restart: orphaned backends may hold the shared memory a moment longer; retry.
    let t0 = Instant::now();
    loop {
        match ctx.primary.pg_ctl_start(true) {
            Ok(()) => break,
            Err(e) if t0.elapsed() < Duration::from_secs(30) => {
                ctx.say(format!("restart failed, retrying: {}", e.lines().next().unwrap_or("")));
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(format!("could not restart the primary after kill -9: {e}")),
        }
    }
    ctx.say("primary restarted (crash recovery done)");
    let log = fs::read_to_string(&ctx.primary.log).unwrap_or_default();
    if !log.contains("not properly shut down") && !log.contains("automatic recovery") {
        return Err(ctx.primary.err("restart did not go through crash recovery?"));
    }
    ctx.wait_log(&ctx.send_err(), "server is back", Duration::from_secs(30))?;
    ctx.say("sender: server is back");
    ctx.pgbench_run(5)?;
    ctx.check_alive()?;
    let sums = checksums(&ctx.primary)?;
    ctx.print_sums(&sums);
    let (cd, end) = ctx.clean_stop()?;
    let logged = ctx.wait_shutdown_shipped()?;
    if logged != end {
        return Err(format!("sender logged shutdown end {} != pg_waldump end {}", fmt_lsn(logged), fmt_lsn(end)));
    }
    ctx.stop_walship()?;
    let json = ctx.report_json()?;
    println!("   report: {}", json.trim());
    ctx.replay(&base, end, &cd, backup_start, &sums, 5522)
}

// ---------------------------------------------------------------------------------------------------------
// 3. the slot never passes what the receiver holds durably; with the sender stopped the WAL stays

#[test]
fn slot_never_passes_flushed() {
    let _l = lock();
    let Some(mut ctx) = setup("follow-slot", 5531) else { return };
    if let Err(e) = slot_never_passes(&mut ctx) {
        ctx.fail(e);
    }
}

fn slot_never_passes(ctx: &mut Ctx) -> R<()> {
    ctx.init_primary()?;
    ctx.start_walship()?;
    let initial = ctx.slot_restart()?;
    ctx.pgbench(&["-i", "-s", "5", "-q"])?;
    let mut c = ctx.pgbench_cmd(&["-c", "2", "-j", "2", "-T", "8", "-n"]);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut bench = ChildGuard::spawn("pgbench", &mut c).map_err(|e| e.to_string())?;
    let mut samples = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        // Slot first, then the file: the receiver's flushed LSN only grows, and the sender advances the slot
        // only to LSNs the receiver acknowledged (published in the file before the ack). So whatever the slot
        // said a moment ago must be <= what the file says now.
        let slot = ctx.slot_restart()?;
        let flushed = ctx.recv_flushed()?;
        let cur = ctx.primary.lsn("SELECT pg_current_wal_lsn()")?;
        samples.push((slot, flushed, cur));
        if slot > initial && slot > flushed {
            return Err(format!(
                "slot restart_lsn {} is past the receiver's durable LSN {} (read after it); samples so far: {}",
                fmt_lsn(slot),
                fmt_lsn(flushed),
                fmt_samples(&samples)
            ));
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = bench.wait_timeout(Duration::from_secs(30));
    ctx.check_alive()?;
    ctx.say(format!("{} samples (slot restart_lsn <= receiver flushed, current insert LSN):\n{}", samples.len(), fmt_samples(&samples)));
    let advanced = samples.iter().filter(|s| s.0 > initial).count();
    if advanced == 0 {
        return Err(format!("the slot never advanced past its initial restart_lsn {} while following", fmt_lsn(initial)));
    }
    let lag_max = samples.iter().map(|s| s.2.saturating_sub(s.0)).max().unwrap_or(0);
    ctx.say(format!("slot advanced in {advanced}/{} samples; max (insert - restart_lsn) = {:.1} MiB", samples.len(), lag_max as f64 / 1048576.0));

    // Stop the sender: the slot must stay put, and the server must keep every segment from restart_lsn on.
    let st = ctx.sigterm("send", Duration::from_secs(60))?;
    if !st.success() {
        return Err(format!("walship send exited with {st} after SIGTERM (want 0)"));
    }
    let slot = ctx.slot_restart()?;
    let flushed = ctx.recv_flushed()?;
    if slot > flushed {
        return Err(format!("after SIGTERM: slot restart_lsn {} > receiver flushed {}", fmt_lsn(slot), fmt_lsn(flushed)));
    }
    ctx.say(format!("sender stopped: slot restart_lsn {}, receiver flushed {}", fmt_lsn(slot), fmt_lsn(flushed)));
    let cd0 = ctx.primary.controldata()?;
    ctx.pgbench_run(3)?;
    for _ in 0..6 {
        ctx.primary.sql("SELECT pg_switch_wal(); CHECKPOINT")?;
        ctx.primary.sql("CREATE TABLE IF NOT EXISTS filler(x int); INSERT INTO filler SELECT generate_series(1,1000)")?;
    }
    ctx.primary.sql("CHECKPOINT")?;
    let slot_after = ctx.slot_restart()?;
    if slot_after != slot {
        return Err(format!("slot moved from {} to {} with the sender stopped", fmt_lsn(slot), fmt_lsn(slot_after)));
    }
    let redo = ctx.primary.lsn("SELECT redo_lsn FROM pg_control_checkpoint()")?;
    let cur = ctx.primary.lsn("SELECT pg_current_wal_lsn()")?;
    let seg = cd0.seg_size;
    let pg_wal = ctx.primary.data.join("pg_wal");
    let missing: Vec<String> =
        (slot / seg..=cur / seg).map(|s| seg_name(cd0.tli, s, seg)).filter(|n| !pg_wal.join(n).exists()).collect();
    ctx.say(format!(
        "after more WAL + CHECKPOINTs: redo {} (segments before it would be removable without the slot), current {}; \
         segments {}..{} must remain",
        fmt_lsn(redo),
        fmt_lsn(cur),
        seg_name(cd0.tli, slot / seg, seg),
        seg_name(cd0.tli, cur / seg, seg)
    ));
    if redo / seg <= slot / seg {
        return Err(format!("the test did not move the redo pointer ({}) past the slot's segment ({}): nothing proven", fmt_lsn(redo), fmt_lsn(slot)));
    }
    if !missing.is_empty() {
        return Err(format!("segments past the slot's restart_lsn {} are gone from pg_wal: {missing:?}", fmt_lsn(slot)));
    }
    let st = ctx.sigterm("recv", Duration::from_secs(30))?;
    if !st.success() {
        return Err(format!("walship recv exited with {st} after SIGTERM (want 0)"));
    }
    ctx.primary.stop("fast")
}

// ---------------------------------------------------------------------------------------------------------
// 4. three destinations, quorum 2 (issue #12): one killed and restarted mid-way; the slot never passes the
//    lowest destination; a standby replays from each of the three directories

#[test]
fn three_destinations_one_killed_all_replay() {
    let _l = lock();
    let Some(mut ctx) = setup("follow-fanout", 5581) else { return };
    if let Err(e) = three_destinations(&mut ctx) {
        ctx.fail(e);
    }
}

impl Ctx {
    fn start_more(&mut self, i: usize) -> R<()> {
        let m = &mut self.more[i];
        let f = fs::OpenOptions::new().create(true).append(true).open(&m.log).map_err(|e| e.to_string())?;
        let mut c = cmd(walship_bin(), ["recv", "--listen", &m.addr, "--insecure-no-auth", "--dir"]);
        c.arg(&m.dir).env("NO_COLOR", "1").stdin(Stdio::null()).stdout(f.try_clone().map_err(|e| e.to_string())?).stderr(f);
        m.guard = Some(ChildGuard::spawn("walship recv (more)", &mut c).map_err(|e| format!("spawn recv: {e}"))?);
        Ok(())
    }

    fn more_flushed(&self, i: usize) -> u64 {
        walship::recv::published::read(&self.more[i].dir).ok().flatten().map_or(0, |p| p.lsn.0)
    }
}

fn three_destinations(ctx: &mut Ctx) -> R<()> {
    ctx.init_primary()?;
    for i in 0..2 {
        let dir = ctx.tmp.join(format!("recv-more-{i}"));
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let log = ctx.tmp.join(format!("recv-more-{i}.stderr"));
        ctx.more.push(MoreRecv { addr: format!("127.0.0.1:{}", free_port()), dir, log, guard: None });
        ctx.start_more(i)?;
    }
    ctx.quorum = Some(2);
    ctx.start_walship()?;
    let (base, backup_start) = ctx.base_backup()?;
    ctx.pgbench(&["-i", "-s", "5", "-q"])?;
    let mut c = ctx.pgbench_cmd(&["-c", "2", "-j", "2", "-T", "8", "-n"]);
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut bench = ChildGuard::spawn("pgbench", &mut c).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let (mut killed, mut restarted, mut samples) = (false, false, 0);
    while t0.elapsed() < Duration::from_secs(10) {
        if !killed && t0.elapsed() > Duration::from_secs(2) {
            let g = ctx.more[0].guard.as_mut().expect("running");
            g.signal(libc::SIGKILL).map_err(|e| e.to_string())?;
            let _ = g.wait_timeout(Duration::from_secs(10));
            ctx.more[0].guard = None;
            ctx.say(format!("kill -9 the receiver at {} (held {})", ctx.more[0].addr, fmt_lsn(ctx.more_flushed(0))));
            killed = true;
        }
        if killed && !restarted && t0.elapsed() > Duration::from_secs(5) {
            ctx.start_more(0)?;
            ctx.say(format!("restarted the receiver at {}", ctx.more[0].addr));
            restarted = true;
        }
        // Slot first, then every destination's published durable position (they only grow): the slot
        // may never be past the lowest, the killed one included (a destination that is down loses nothing).
        let slot = ctx.slot_restart()?;
        let lowest = [ctx.recv_flushed()?, ctx.more_flushed(0), ctx.more_flushed(1)].into_iter().min().unwrap_or(0);
        if lowest > 0 && slot > lowest {
            return Err(format!("slot restart_lsn {} is past the lowest destination's durable LSN {}", fmt_lsn(slot), fmt_lsn(lowest)));
        }
        samples += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = bench.wait_timeout(Duration::from_secs(30));
    ctx.say(format!("{samples} samples: the slot never passed the lowest destination"));
    ctx.check_alive()?;
    let sums = checksums(&ctx.primary)?;
    let (cd, end) = ctx.clean_stop()?;
    ctx.wait_shutdown_shipped()?;
    let all = poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
        (ctx.recv_flushed().ok() == Some(end) && ctx.more_flushed(0) == end && ctx.more_flushed(1) == end).then_some(())
    });
    if all.is_none() {
        return Err(format!("not every destination reached the end of WAL {}: {} {} {}", fmt_lsn(end), fmt_lsn(ctx.recv_flushed()?), fmt_lsn(ctx.more_flushed(0)), fmt_lsn(ctx.more_flushed(1))));
    }
    let log = fs::read_to_string(ctx.send_err()).unwrap_or_default();
    if !log.contains(&format!("destination={}", ctx.more[0].addr)) {
        return Err("the sender's log does not name the destination it lost".into());
    }
    ctx.stop_walship()?;
    ctx.replay_from(&ctx.recv_dir.clone(), "standby", &base, end, &cd, backup_start, &sums, 5582)?;
    for (i, (name, port)) in [("standby-more-0", 5583), ("standby-more-1", 5584)].into_iter().enumerate() {
        let dir = ctx.more[i].dir.clone();
        ctx.replay_from(&dir, name, &base, end, &cd, backup_start, &sums, port)?;
    }
    Ok(())
}

fn fmt_samples(s: &[(u64, u64, u64)]) -> String {
    s.iter()
        .map(|(a, b, c)| format!("     slot {:>11}  flushed {:>11}  insert {:>11}", fmt_lsn(*a), fmt_lsn(*b), fmt_lsn(*c)))
        .collect::<Vec<_>>()
        .join("\n")
}

// ---------------------------------------------------------------------------------------------------------
// 4. flush-to-durable-ack latency is measured and reported

#[test]
fn ack_latency_is_measured() {
    let _l = lock();
    let Some(mut ctx) = setup("follow-latency", 5541) else { return };
    if let Err(e) = ack_latency(&mut ctx) {
        ctx.fail(e);
    }
}

fn ack_latency(ctx: &mut Ctx) -> R<()> {
    ctx.init_primary()?;
    ctx.start_walship()?;
    ctx.pgbench(&["-i", "-s", "5", "-q"])?;
    ctx.pgbench_run(8)?;
    ctx.check_alive()?;
    let out = ctx.stop_walship()?;
    let json = ctx.report_json()?;
    println!("   report: {}", json.trim());
    let lat = json
        .split("\"ack_latency_us\"")
        .nth(1)
        .and_then(|s| s.split('}').next())
        .map(|s| s.trim_start().trim_start_matches(':').trim_start().to_string() + "}")
        .ok_or_else(|| format!("report JSON has no ack_latency_us: {json}"))?;
    let num = |k: &str| -> R<f64> {
        json_field(&lat, k).and_then(|s| s.parse().ok()).ok_or_else(|| format!("ack_latency_us lacks a number `{k}`: {lat}"))
    };
    let (p50, p99, p999, max) = (num("p50")?, num("p99")?, num("p999")?, num("max")?);
    if !(p50 > 0.0 && p99 >= p50 && p999 >= p99 && max >= p999) {
        return Err(format!("implausible ack latency percentiles: p50 {p50} p99 {p99} p99.9 {p999} max {max}"));
    }
    let line = out
        .lines()
        .find(|l| l.contains("flush-to-durable-ack latency"))
        .ok_or_else(|| format!("sender stdout lacks the latency line: {out:?}"))?;
    ctx.say(format!("walship: {}", line.trim()));
    ctx.primary.stop("fast")?;

    // The disk's own fdatasync cost, on the receiver's filesystem (pg_test_fsync's fdatasync, one 8kB write).
    let f = ctx.recv_dir.join("pg_test_fsync.tmp");
    let mut c = Command::new(ctx.pg.bin.join("pg_test_fsync"));
    c.args(["-s", "2", "-f"]).arg(&f).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null());
    let mut child = ChildGuard::spawn("pg_test_fsync", &mut c).map_err(|e| format!("spawn pg_test_fsync: {e}"))?;
    let stdout = child.child.as_mut().and_then(|c| c.stdout.take()).ok_or("no pg_test_fsync stdout")?;
    // Only its first section matters: stop reading (and kill it) once the fdatasync line is in.
    let mut fdatasync = None;
    let mut seen = String::new();
    use std::io::BufRead;
    for l in std::io::BufReader::new(stdout).lines() {
        let l = l.map_err(|e| e.to_string())?;
        seen.push_str(&l);
        seen.push('\n');
        if l.trim_start().starts_with("fdatasync") {
            fdatasync = Some(l);
            break;
        }
    }
    drop(child); // SIGKILL + reap
    let _ = fs::remove_file(&f);
    let l = fdatasync.ok_or_else(|| format!("no fdatasync line from pg_test_fsync:\n{seen}"))?;
    // "        fdatasync                          1234.567 ops/sec     810 usecs/op"
    let ops: f64 = l
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == "ops/sec")
        .and_then(|w| w[0].parse().ok())
        .ok_or_else(|| format!("cannot parse pg_test_fsync line {l:?}"))?;
    let us = 1e6 / ops;
    ctx.say(format!("pg_test_fsync -s 2 on the receiver's filesystem: {}", l.trim()));
    println!(
        "LATENCY SUMMARY: walship flush-to-durable-ack p50 {p50} us, p99 {p99} us, p99.9 {p999} us, max {max} us; \
         disk fdatasync (pg_test_fsync, 8kB write) {ops:.1} ops/sec = {us:.0} us/op"
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------
// 5. without --slot the sender warns at start-up

#[test]
fn no_slot_warns() {
    let _l = lock();
    let Some(mut ctx) = setup("follow-noslot", 5551) else { return };
    if let Err(e) = no_slot(&mut ctx) {
        ctx.fail(e);
    }
}

fn no_slot(ctx: &mut Ctx) -> R<()> {
    ctx.init_primary()?;
    fs::create_dir_all(&ctx.recv_dir).map_err(|e| e.to_string())?;
    ctx.start_recv()?;
    ctx.start_send(None)?;
    let l = ctx.wait_log(&ctx.send_err(), "no --slot", Duration::from_secs(30))?;
    ctx.say(format!("sender: {}", l.trim()));
    if !l.contains("WARN") && !l.to_lowercase().contains("warn") {
        return Err(format!("the no --slot message is not a warning: {l}"));
    }
    ctx.wait_log(&ctx.send_err(), "following a live", Duration::from_secs(30))?;
    let n = ctx.primary.sql("SELECT count(*) FROM pg_replication_slots")?;
    if n != "0" {
        return Err(format!("without --slot the sender created {n} slot(s)"));
    }
    ctx.primary.sql("CREATE TABLE t AS SELECT generate_series(1, 10000) g")?;
    ctx.stop_walship()?;
    ctx.primary.stop("fast")
}

// ---------------------------------------------------------------------------------------------------------
// Issue #15: a new flush is found by the server's write to pg_wal (inotify), not by the slow poll.

/// Commits `n` rows one by one; after each, waits up to `within` for the receiver's durable position
/// to pass the primary's flush LSN. Returns how many made it.
fn commits_made_durable(ctx: &Ctx, n: usize, within: Duration) -> R<usize> {
    let mut made = 0;
    for i in 0..n {
        ctx.primary.sql(&format!("INSERT INTO wake_probe VALUES ({i})"))?;
        let flush = ctx.primary.lsn("SELECT pg_current_wal_flush_lsn()")?;
        let t = Instant::now();
        while t.elapsed() < within {
            if ctx.recv_flushed()? >= flush {
                made += 1;
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(made)
}

#[test]
fn a_commit_is_shipped_on_the_write_event_not_the_poll_interval() {
    let _l = lock();
    let Some(mut ctx) = setup("follow-wake", 5561) else { return };
    if let Err(e) = wake_on_write(&mut ctx) {
        ctx.fail(e);
    }
}

/// With `--horizon-poll-interval 30s` (no slow poll in the test's time), every commit must still be
/// shipped and acknowledged well within the interval: only the write event can have found it. The
/// same with the event path switched off must ship none of them in that time (the test can fail).
fn wake_on_write(ctx: &mut Ctx) -> R<()> {
    const COMMITS: usize = 20;
    let within = Duration::from_secs(2);
    ctx.init_primary()?;
    ctx.primary.sql("CREATE TABLE wake_probe (i int)")?;
    ctx.primary.sql("CHECKPOINT")?;
    ctx.send_extra = ["--horizon-poll-interval", "30s"].map(String::from).to_vec();
    ctx.start_walship()?;
    // The first question is asked at start-up; give it time to be answered and shipped.
    std::thread::sleep(Duration::from_millis(500));
    let t = Instant::now();
    let made = commits_made_durable(ctx, COMMITS, within)?;
    let took = t.elapsed();
    ctx.say(format!("event path: {made} of {COMMITS} commits durable at the receiver, each within {within:?} ({took:?} in all)"));
    if took >= Duration::from_secs(25) {
        return Err(format!("the commits took {took:?}: the 30 s poll may have fired, the test proves nothing"));
    }
    if made != COMMITS {
        return Err(format!("with the write event: {made} of {COMMITS} commits shipped within {within:?} (want all)"));
    }
    ctx.stop_walship()?;
    let log = strip_ansi(&fs::read_to_string(ctx.send_err()).unwrap_or_default());
    let line = log.lines().find(|l| l.contains("flush poller:")).ok_or("no `flush poller:` line in the sender's log")?.to_string();
    ctx.say(format!("sender: {line}"));
    let wakes: u64 = line
        .split("queries, ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|w| w.parse().ok())
        .ok_or_else(|| format!("no wake-up count in {line:?}"))?;
    if wakes < COMMITS as u64 {
        return Err(format!("{wakes} wake-ups by a write to pg_wal for {COMMITS} commits: {line}"));
    }

    // Control: the same with the event path off ships nothing within the same wait.
    ctx.send_extra = ["--horizon-poll-interval", "30s", "--horizon-wake-on-write", "false"].map(String::from).to_vec();
    ctx.start_recv()?;
    ctx.start_send(Some(SLOT))?;
    std::thread::sleep(Duration::from_millis(1500));
    let made_off = commits_made_durable(ctx, 2, within)?;
    ctx.say(format!("poll only (30 s): {made_off} of 2 commits durable within {within:?}"));
    if made_off != 0 {
        return Err(format!("with the event path off, {made_off} commits were shipped within {within:?}: the poll interval is not what the test thinks"));
    }
    Ok(())
}
