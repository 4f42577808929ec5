//! The WAL hub against a real PostgreSQL (issue #14 part 1): a primary under pgbench ships with
//! `walship send` to `walship recv --serve-replication`, and a hot standby made from a base backup
//! (EMPTY pg_wal, no restore_command) streams only from the receiver, through PostgreSQL's own
//! walreceiver: SCRAM-SHA-256 from the password file, IDENTIFY_SYSTEM, START_REPLICATION, 'w'/'k'
//! and the standby's 'r' replies.
//!
//! It checks that the standby's `pg_last_wal_replay_lsn()` follows while pgbench runs, that after a
//! clean stop of the primary the standby replays to exactly the end of the shutdown checkpoint
//! (found independently with pg_waldump) with the primary's table checksums, that the primary
//! never had a walsender for it, that the hub reports the shipped cluster's system id, that the
//! standby's positions are in the receiver's metrics, and that a wrong password, an unknown user
//! and a non-replication connection are refused with PostgreSQL's errors.
//!
//! Needs PostgreSQL (see tests/common/pg.rs; `WALSHIP_REQUIRE_PG=1` turns a skip into a failure).
//! Run: `cargo test --release --test pg_hub -- --nocapture`.

mod common;

use common::pg::*;
use common::*;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One PostgreSQL test at a time (2 shared cores).
static SERIAL: Mutex<()> = Mutex::new(());

const USER: &str = "rep";
const PASSWORD: &str = "hub-secret-0123";

struct Hub {
    pg: Pg,
    ctx: Ctx,
    pgdir: PathBuf,
    primary: Server,
    recv_dir: PathBuf,
    walship_addr: String,
    hub_port: u16,
    metrics_addr: String,
    recv: Option<ChildGuard>,
    send: Option<ChildGuard>,
    send_log: PathBuf,
    recv_log: PathBuf,
    /// The receiver's certificate (self-signed for 127.0.0.1: also the standbys' sslrootcert) and key.
    tls: Option<(PathBuf, PathBuf)>,
    t0: Instant,
}

impl Hub {
    fn new(name: &str, port: u16) -> Option<Hub> {
        let ctx = Ctx::new(name);
        let pg = Pg::for_test(ctx.dir.path())?;
        let pgdir = ctx.path("pg");
        fs::create_dir_all(&pgdir).expect("mkdir pg");
        pg.chown(&pgdir).expect("chown pg");
        let primary = pg.server(&pgdir, "primary", port).expect("primary");
        ctx.watch("primary log", &primary.log);
        let send_log = ctx.log("walship send");
        let recv_log = ctx.log("walship recv");
        Some(Hub {
            recv_dir: ctx.path("recv"),
            walship_addr: format!("127.0.0.1:{}", free_port()),
            hub_port: free_port(),
            metrics_addr: format!("127.0.0.1:{}", free_port()),
            pg,
            ctx,
            pgdir,
            primary,
            recv: None,
            send: None,
            send_log,
            recv_log,
            tls: None,
            t0: Instant::now(),
        })
    }

    fn say(&self, msg: impl std::fmt::Display) {
        println!("[{:>6.2} s] {msg}", self.t0.elapsed().as_secs_f64());
    }

    /// From now on the hub has a certificate and requires TLS from standbys.
    fn require_tls(&mut self) -> R<()> {
        let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).map_err(|e| e.to_string())?;
        let (cert, key) = (self.pgdir.join("hub.pem"), self.pgdir.join("hub.key"));
        fs::write(&cert, ck.cert.pem()).map_err(|e| e.to_string())?;
        fs::write(&key, ck.signing_key.serialize_pem()).map_err(|e| e.to_string())?;
        self.pg.chown(&cert)?;
        self.tls = Some((cert, key));
        Ok(())
    }

    /// Primary up; receiver with the hub; follow-mode sender with a slot.
    fn start(&mut self) -> R<()> {
        self.init_primary()?;
        let (pg_wal, conninfo) = (self.primary.data.join("pg_wal"), self.primary.conninfo());
        self.start_walship(&pg_wal, &conninfo)
    }

    fn init_primary(&mut self) -> R<()> {
        self.primary.init(
            "pg_hub",
            "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nmax_wal_size = 256MB\nmin_wal_size = 64MB\nhot_standby = on\n",
        )
    }

    /// The receiver with the hub, and a follow-mode sender (with a slot) of the server at `conninfo`.
    fn start_walship(&mut self, pg_wal: &Path, conninfo: &str) -> R<()> {
        let pwfile = self.ctx.path("standbys.pw");
        fs::write(&pwfile, format!("# standby users\n{USER}:{PASSWORD}\n")).map_err(|e| e.to_string())?;
        fs::set_permissions(&pwfile, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
        let hub = format!("127.0.0.1:{}", self.hub_port);
        let mut c = walship(&["recv", "--listen", &self.walship_addr, "--dir", p(&self.recv_dir), "--serve-replication", &hub]);
        c.args(["--replication-password-file", p(&pwfile), "--metrics-listen", &self.metrics_addr, "--replication-keepalive-interval", "2s"]);
        if let Some((cert, key)) = &self.tls {
            c.args(["--tls-cert", p(cert), "--tls-key", p(key), "--replication-require-tls"]);
        }
        self.say(format!("$ {}", cmdline(&c)));
        self.recv = Some(spawn_logged("walship recv", c, &self.recv_log));
        let mut c = walship(&["send", "--pg-wal", p(pg_wal), "--to", &self.walship_addr, "--conninfo", conninfo]);
        c.args(["--slot", "walship"]);
        if let Some((cert, _)) = &self.tls {
            // The receiver's certificate serves walship senders too.
            c.args(["--tls-ca", p(cert)]);
        }
        self.say(format!("$ {}", cmdline(&c)));
        self.send = Some(spawn_logged("walship send", c, &self.send_log));
        wait_log(&self.send_log, "following a live", Duration::from_secs(60))?;
        Ok(())
    }

    /// A hot standby from a fresh base backup (empty pg_wal, no restore_command) whose
    /// primary_conninfo is the hub.
    fn standby(&self, name: &'static str, port: u16) -> R<Server> {
        let base = self.pgdir.join(format!("base-{name}"));
        let start = self.primary.base_backup(&base)?;
        self.say(format!("base backup for {name}: START WAL LOCATION {}", fmt_lsn(start)));
        let standby = self.pg.server(&self.pgdir, name, port)?;
        self.ctx.watch(name, &standby.log);
        standby_data_from_base(&base, &standby.data)?;
        append(
            &standby.data.join("postgresql.auto.conf"),
            &format!(
                "\n# walship pg_hub standby\nport = {port}\nunix_socket_directories = '{}'\nhot_standby = on\n\
                 primary_conninfo = '{}'\nwal_retrieve_retry_interval = '1s'\nwal_receiver_status_interval = '1s'\n",
                standby.sock.display(),
                self.standby_conninfo(name, PASSWORD)
            ),
        )?;
        self.pg.chown(&standby.data)?;
        Ok(standby)
    }

    /// With TLS: `verify-full` (the certificate must name 127.0.0.1 and chain to sslrootcert) for
    /// `standby2`, `require` for the others.
    fn standby_conninfo(&self, app: &str, password: &str) -> String {
        let ssl = match &self.tls {
            None => "sslmode=disable".to_string(),
            Some((cert, _)) if app == "standby2" => format!("sslmode=verify-full sslrootcert={}", cert.display()),
            Some(_) => "sslmode=require".to_string(),
        };
        format!("host=127.0.0.1 port={} user={USER} password={password} application_name={app} {ssl}", self.hub_port)
    }

    fn sslmode(&self) -> &'static str {
        if self.tls.is_some() { "require" } else { "disable" }
    }

    /// `psql` against the hub (a replication connection unless `conninfo` says otherwise).
    fn psql_hub(&self, conninfo: &str, sql: &str) -> (bool, String, String) {
        let mut c = self.pg.cmd("psql");
        c.arg(conninfo).args(["-X", "-A", "-t", "-c", sql]);
        match run(&mut c) {
            Ok(out) => (out.status.success(), String::from_utf8_lossy(&out.stdout).trim().to_string(), String::from_utf8_lossy(&out.stderr).trim().to_string()),
            Err(e) => (false, String::new(), e),
        }
    }

    fn metrics(&self) -> R<String> {
        let mut s = std::net::TcpStream::connect(&self.metrics_addr).map_err(|e| format!("connect {}: {e}", self.metrics_addr))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        Ok(text)
    }

    fn recv_flushed(&self) -> u64 {
        fs::read_to_string(self.recv_dir.join(".walship-flushed")).ok().and_then(|s| s.split_whitespace().next().and_then(parse_lsn)).unwrap_or(0)
    }
}

fn wait_log(path: &Path, needle: &str, timeout: Duration) -> R<String> {
    poll_until(timeout, Duration::from_millis(100), || {
        let s = strip_ansi(&fs::read_to_string(path).unwrap_or_default());
        s.lines().find(|l| l.contains(needle)).map(str::to_string)
    })
    .ok_or_else(|| format!("no line containing {needle:?} in {} within {timeout:?}", path.display()))
}

/// The standby's replay position (0 while it does not answer).
fn replay_lsn(s: &Server) -> u64 {
    s.sql_quiet("SELECT pg_last_wal_replay_lsn()").ok().and_then(|v| parse_lsn(&v)).unwrap_or(0)
}

#[test]
fn a_hot_standby_streams_from_the_hub_to_the_shutdown_checkpoint() {
    let _l = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut hub) = Hub::new("pg-hub", 5531) else { return };
    if let Err(e) = hot_standbys_stream(&mut hub, &[("standby1", 5532)], true).and_then(|_| another_clusters_standby_is_refused(&hub, 5535)) {
        panic!("{e}");
    }
}

#[test]
fn two_hot_standbys_stream_over_tls_one_verify_full_and_plaintext_is_refused() {
    let _l = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut hub) = Hub::new("pg-hub-tls", 5541) else { return };
    hub.require_tls().expect("certificate");
    if let Err(e) = hot_standbys_stream(&mut hub, &[("standby1", 5542), ("standby2", 5543)], false) {
        panic!("{e}");
    }
}

fn hot_standbys_stream(h: &mut Hub, names: &[(&'static str, u16)], restart_mid_way: bool) -> R<()> {
    h.start()?;
    let sysid = h.primary.controldata()?.sysid;
    // Refusals first, in PostgreSQL's words (the standby's libpq shows them as they are).
    let sslmode = h.sslmode();
    let hub_repl = |user: &str, password: &str| format!("host=127.0.0.1 port={} user={user} password={password} replication=true sslmode={sslmode}", h.hub_port);
    let (ok, out, err) = h.psql_hub(&hub_repl(USER, PASSWORD), "IDENTIFY_SYSTEM");
    h.say(format!("IDENTIFY_SYSTEM via the hub: {out}"));
    if !ok || !out.starts_with(&format!("{sysid}|1|")) {
        return Err(format!("IDENTIFY_SYSTEM through the hub: want the primary's system id {sysid} on timeline 1, got ok={ok} {out:?} {err}"));
    }
    for (user, password) in [(USER, "wrong-password"), ("nobody", PASSWORD)] {
        let (ok, _, err) = h.psql_hub(&hub_repl(user, password), "IDENTIFY_SYSTEM");
        let want = format!("password authentication failed for user \"{user}\"");
        if ok || !err.contains(&want) {
            return Err(format!("user {user} with a wrong password: want {want:?}, got ok={ok} {err:?}"));
        }
    }
    let (ok, _, err) = h.psql_hub(&format!("host=127.0.0.1 port={} user={USER} password={PASSWORD} dbname=postgres sslmode={sslmode}", h.hub_port), "SELECT 1");
    if ok || !err.contains("accepts only physical replication connections") {
        return Err(format!("a non-replication connection must be refused, got ok={ok} {err:?}"));
    }
    let (ok, _, err) = h.psql_hub(&hub_repl(USER, PASSWORD), "BASE_BACKUP");
    if ok || !err.contains("does not support the command") {
        return Err(format!("BASE_BACKUP must be refused with a clear error, got ok={ok} {err:?}"));
    }
    if h.tls.is_some() {
        let plain = hub_repl(USER, PASSWORD).replace("sslmode=require", "sslmode=disable");
        let (ok, _, err) = h.psql_hub(&plain, "IDENTIFY_SYSTEM");
        if ok || !err.contains("no pg_hba.conf entry for replication connection") || !err.contains("no encryption") {
            return Err(format!("a standby without TLS must be refused when TLS is required, got ok={ok} {err:?}"));
        }
    }
    h.say("refusals: wrong password, unknown user, non-replication connection, unsupported command (and no TLS when required)");

    let mut standbys = Vec::new();
    for &(name, port) in names {
        standbys.push(h.standby(name, port)?);
    }
    h.primary.pgbench(&["-i", "-s", "5", "-q"])?;
    for s in standbys.iter_mut() {
        s.pg_ctl_start(false)?;
    }
    // Consistent and replaying what the hub streams.
    let t0 = Instant::now();
    for s in &standbys {
        let first = poll_until(Duration::from_secs(90), Duration::from_millis(250), || Some(replay_lsn(s)).filter(|&l| l > 0))
            .ok_or_else(|| s.err(format!("{} never reported a replay position (is it streaming from the hub?)", s.name)))?;
        h.say(format!("{} replaying at {} after {:.1} s", s.name, fmt_lsn(first), t0.elapsed().as_secs_f64()));
        let rcv = s.sql("SELECT status || ' ' || sender_port FROM pg_stat_wal_receiver")?;
        if rcv != format!("streaming {}", h.hub_port) {
            return Err(s.err(format!("pg_stat_wal_receiver says {rcv:?}, want streaming from the hub's port {}", h.hub_port)));
        }
        if h.tls.is_some() {
            let log = strip_ansi(&fs::read_to_string(&h.recv_log).unwrap_or_default());
            let line = log.lines().find(|l| l.contains(&format!("standby {}@", s.name)) && l.contains("authenticated"));
            if !line.is_some_and(|l| l.contains("tls=true")) {
                return Err(format!("the receiver's log does not show {} authenticated over TLS: {line:?}", s.name));
            }
        }
    }
    // Under pgbench, the replay positions follow.
    let bench_out = h.ctx.path("pgbench.out");
    let mut c = h.pg.cmd("pgbench");
    c.arg("-h").arg(&h.primary.sock).args(["-p", &h.primary.port.to_string(), "-U", PG_USER, "-c", "2", "-j", "2", "-T", "8", "-n", "postgres"]);
    c.stdout(fs::File::create(&bench_out).map_err(|e| e.to_string())?).stderr(Stdio::null()).stdin(Stdio::null());
    let mut bench = ChildGuard::spawn("pgbench", &mut c).map_err(|e| e.to_string())?;
    let mut seen: Vec<Vec<u64>> = vec![standbys.iter().map(replay_lsn).collect()];
    for _ in 0..6 {
        std::thread::sleep(Duration::from_secs(1));
        seen.push(standbys.iter().map(replay_lsn).collect());
    }
    if restart_mid_way {
        // The first standby is stopped while pgbench runs and comes back: it resumes streaming
        // from the hub where it stopped (the hub has no slot; the WAL is still in the directory).
        let s = &mut standbys[0];
        let before = replay_lsn(s);
        s.stop("fast")?;
        std::thread::sleep(Duration::from_secs(1));
        s.pg_ctl_start(false)?;
        let after = poll_until(Duration::from_secs(60), Duration::from_millis(200), || Some(replay_lsn(s)).filter(|&l| l > before))
            .ok_or_else(|| s.err(format!("{} restarted mid-way did not replay past {}", s.name, fmt_lsn(before))))?;
        h.say(format!("{} stopped at {} under pgbench, restarted, replaying again at {}", s.name, fmt_lsn(before), fmt_lsn(after)));
        let connected = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            h.metrics().ok()?.lines().find(|l| l.starts_with("walship_recv_standbys_connected ")).filter(|l| l.ends_with(&format!(" {}", names.len()))).map(str::to_string)
        });
        if connected.is_none() {
            return Err("after the restart the hub does not list exactly the running standbys".into());
        }
    }
    bench.wait_timeout(Duration::from_secs(60)).map_err(|e| e.to_string())?;
    for (i, s) in standbys.iter().enumerate() {
        let row: Vec<u64> = seen.iter().map(|v| v[i]).collect();
        let moves = row.windows(2).filter(|w| w[1] > w[0]).count();
        h.say(format!("{} replay positions during pgbench: {}", s.name, row.iter().map(|&l| fmt_lsn(l)).collect::<Vec<_>>().join(" ")));
        if moves < 3 {
            return Err(s.err(format!("{}'s replay position moved in only {moves} of 6 seconds under pgbench", s.name)));
        }
    }
    let walsenders = h.primary.sql("SELECT count(*) FROM pg_stat_replication")?;
    if walsenders != "0" {
        return Err(format!("the primary has {walsenders} walsender(s); the standbys must stream from the hub only"));
    }
    // The standbys' positions reach the receiver's metrics (like pg_stat_replication).
    for s in &standbys {
        let label = format!("standby=\"{}@127.0.0.1:", s.name);
        let metric = poll_until(Duration::from_secs(10), Duration::from_millis(200), || {
            let text = h.metrics().ok()?;
            text.lines().find(|l| l.starts_with("walship_recv_standby_replay_lsn{") && l.contains(&label)).map(str::to_string)
        })
        .ok_or_else(|| format!("no walship_recv_standby_replay_lsn for {} in the metrics:\n{}", s.name, h.metrics().unwrap_or_default()))?;
        let reported: u64 = metric.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0);
        if reported == 0 || reported > h.recv_flushed() {
            return Err(format!("metric {metric:?}: replay must be reported, and never beyond the receiver's durable {}", fmt_lsn(h.recv_flushed())));
        }
        h.say(format!("metrics: {metric}"));
    }
    let connected = h.metrics()?.lines().find(|l| l.starts_with("walship_recv_standbys_connected ")).map(str::to_string);
    if connected != Some(format!("walship_recv_standbys_connected {}", standbys.len())) {
        return Err(format!("walship_recv_standbys_connected: {connected:?}"));
    }

    // Clean stop: the shutdown checkpoint is shipped, made durable, then streamed and replayed.
    let sums = checksums(&h.primary)?;
    let (cd, end) = h.primary.clean_stop()?;
    h.say(format!("primary stopped: shutdown checkpoint {}, WAL ends at {}", fmt_lsn(cd.checkpoint), fmt_lsn(end)));
    poll_until(Duration::from_secs(60), Duration::from_millis(100), || (h.recv_flushed() >= end).then_some(()))
        .ok_or_else(|| format!("the receiver's durable position {} never reached the end of WAL {}", fmt_lsn(h.recv_flushed()), fmt_lsn(end)))?;
    for s in standbys.iter_mut() {
        let replayed = poll_until(Duration::from_secs(60), Duration::from_millis(100), || Some(replay_lsn(s)).filter(|&l| l >= end))
            .ok_or_else(|| s.err(format!("{} replayed only to {}, not to the end of WAL {}", s.name, fmt_lsn(replay_lsn(s)), fmt_lsn(end))))?;
        if replayed != end {
            return Err(s.err(format!("{} replayed to {}, past the primary's end of WAL {}", s.name, fmt_lsn(replayed), fmt_lsn(end))));
        }
        let standby_sums = checksums(s)?;
        if standby_sums != sums {
            return Err(format!("checksums differ:\nprimary {sums:?}\n{} {standby_sums:?}", s.name));
        }
        h.say(format!("{} replayed to exactly {} with the primary's checksums", s.name, fmt_lsn(end)));
        let log = fs::read_to_string(&s.log).unwrap_or_default();
        if !log.contains("started streaming WAL from primary") {
            return Err(s.err("the standby's log never says it streamed"));
        }
        s.stop("fast")?;
    }
    Ok(())
}

/// A standby of another cluster pointed at the hub: its walreceiver compares the system id the hub
/// reports (the shipped cluster's) with its own and stops; it never replays anything from the hub.
fn another_clusters_standby_is_refused(h: &Hub, port: u16) -> R<()> {
    let mut other = h.pg.server(&h.pgdir, "other", port)?;
    other.init("pg_hub other cluster", "wal_level = replica\n")?;
    let base = h.pgdir.join("base-other");
    other.base_backup(&base)?;
    other.stop("fast")?;
    let mut foreign = h.pg.server(&h.pgdir, "foreign", port + 1)?;
    h.ctx.watch("foreign standby", &foreign.log);
    run_ok(cmd("cp", ["-a"]).arg(&base).arg(&foreign.data))?;
    fs::write(foreign.data.join("standby.signal"), b"").map_err(|e| e.to_string())?;
    append(
        &foreign.data.join("postgresql.auto.conf"),
        &format!(
            "\nport = {}\nunix_socket_directories = '{}'\nprimary_conninfo = '{}'\nwal_retrieve_retry_interval = '1s'\n",
            foreign.port,
            foreign.sock.display(),
            h.standby_conninfo("foreign", PASSWORD)
        ),
    )?;
    h.pg.chown(&foreign.data)?;
    foreign.pg_ctl_start(false)?;
    let want = "database system identifier differs between the primary and standby";
    wait_log(&foreign.log, want, Duration::from_secs(60)).map_err(|e| foreign.err(e))?;
    h.say(format!("a standby of another cluster stops at IDENTIFY_SYSTEM: \"{want}\""));
    foreign.stop("immediate")?;
    Ok(())
}

#[test]
fn a_hub_standby_follows_a_promotion_upstream_onto_the_new_timeline() {
    let _l = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some(mut hub) = Hub::new("pg-hub-promote", 5551) else { return };
    if let Err(e) = follows_promotion(&mut hub) {
        panic!("{e}");
    }
}

/// Primary A; B streams from A and is what walship follows; the hub's standby H streams from the
/// receiver. B is promoted (timeline 2): the hub ends timeline 1 for H at the switch point from
/// 00000002.history, H moves to timeline 2 through the hub and replays B's WAL to B's shutdown
/// checkpoint.
fn follows_promotion(h: &mut Hub) -> R<()> {
    h.init_primary()?;
    let mut b = h.pg.server(&h.pgdir, "b", 5552)?;
    h.ctx.watch("B log", &b.log);
    let mut c = h.pg.cmd("pg_basebackup");
    c.arg("-h").arg(&h.primary.sock).args(["-p", &h.primary.port.to_string(), "-U", PG_USER]);
    c.arg("-D").arg(&b.data).args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
    run_ok(&mut c).map_err(|e| h.primary.err(e))?;
    append(&b.data.join("postgresql.conf"), &format!("\n# standby B\nport = {}\nunix_socket_directories = '{}'\n", b.port, b.sock.display()))?;
    b.pg_ctl_start(true)?;
    poll_until(Duration::from_secs(30), Duration::from_millis(200), || b.sql_quiet("SELECT status FROM pg_stat_wal_receiver").ok().filter(|s| s == "streaming"))
        .ok_or_else(|| b.err("B is not streaming from A"))?;
    let (pg_wal, conninfo) = (b.data.join("pg_wal"), b.conninfo());
    h.start_walship(&pg_wal, &conninfo)?;
    h.say("walship follows standby B; the hub serves H");
    let mut standby = h.standby("standby1", 5553)?;
    h.primary.pgbench(&["-i", "-s", "3", "-q"])?;
    standby.pg_ctl_start(false)?;
    h.primary.pgbench(&["-c", "2", "-j", "2", "-T", "3", "-n"])?;
    let a_lsn = h.primary.lsn("SELECT pg_current_wal_lsn()")?;
    poll_until(Duration::from_secs(90), Duration::from_millis(200), || (replay_lsn(&standby) >= a_lsn).then_some(()))
        .ok_or_else(|| standby.err(format!("H did not replay A's WAL to {} through B, walship and the hub (at {})", fmt_lsn(a_lsn), fmt_lsn(replay_lsn(&standby)))))?;
    h.say(format!("H replayed timeline 1 to {}", fmt_lsn(a_lsn)));

    let mut c = h.pg.cmd("pg_ctl");
    c.arg("-D").arg(&b.data).args(["promote", "-w", "-t", "60"]);
    run_ok(&mut c).map_err(|e| b.err(e))?;
    h.primary.stop("fast")?;
    h.say("B promoted (timeline 2), A stopped");
    b.pgbench(&["-c", "2", "-j", "2", "-T", "3", "-n"])?;
    let sums = checksums(&b)?;
    b.stop("fast")?;
    let cd = b.controldata()?;
    if cd.tli != 2 || cd.state != "shut down" {
        return Err(b.err(format!("B after promotion and a clean stop: timeline {}, state {}", cd.tli, cd.state)));
    }
    let end = wal_end_after_checkpoint(&h.pg, &b.data.join("pg_wal"), 2, cd.checkpoint, cd.block_size)?;
    h.say(format!("B stopped: shutdown checkpoint {} on timeline 2, WAL ends at {}", fmt_lsn(cd.checkpoint), fmt_lsn(end)));
    let replayed = poll_until(Duration::from_secs(90), Duration::from_millis(200), || Some(replay_lsn(&standby)).filter(|&l| l >= end))
        .ok_or_else(|| standby.err(format!("H replayed only to {}, not to B's end of WAL {} on timeline 2", fmt_lsn(replay_lsn(&standby)), fmt_lsn(end))))?;
    if replayed != end {
        return Err(standby.err(format!("H replayed to {}, past B's end of WAL {}", fmt_lsn(replayed), fmt_lsn(end))));
    }
    let tli = standby.sql("SELECT received_tli FROM pg_stat_wal_receiver")?;
    if tli != "2" {
        return Err(standby.err(format!("H's walreceiver is on timeline {tli:?}, want 2")));
    }
    let standby_sums = checksums(&standby)?;
    if standby_sums != sums {
        return Err(format!("checksums differ:\nB {sums:?}\nH {standby_sums:?}"));
    }
    let hub_log = strip_ansi(&fs::read_to_string(&h.recv_log).unwrap_or_default());
    if !hub_log.contains("timeline 1 ended upstream") && !hub_log.contains("streams timeline 1 from") {
        return Err("the receiver's log does not show H on timeline 1".into());
    }
    if !hub_log.lines().any(|l| l.contains("standby standby1@") && l.contains("streams timeline 2 from")) {
        return Err(format!("the receiver's log does not show H streaming timeline 2 from the hub:\n{}", tail_str(&hub_log, 20)));
    }
    // PostgreSQL's walreceiver logs this only for the end of a historic timeline (CopyDone, then
    // the next timeline and its start), as the hub sent it.
    let h_log = fs::read_to_string(&standby.log).unwrap_or_default();
    if !h_log.contains("End of WAL reached on timeline 1 at") {
        return Err(standby.err("H's log does not show the end of timeline 1 reached through the hub"));
    }
    h.say(format!("H followed the promotion through the hub: timeline 2, replayed to exactly {} with B's checksums", fmt_lsn(end)));
    standby.stop("fast")?;
    Ok(())
}
