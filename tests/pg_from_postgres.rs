//! `walship recv --from-postgres` against a real PostgreSQL (issue #14 part 2): walship as the
//! synchronous standby of a primary (`synchronous_standby_names = 'walship'`), so every commit
//! waits for walship's durable flush. pgbench commits; walship is killed with SIGKILL in the middle
//! of a pgbench run and restarted: the directory's recovered durable position is at least what
//! walship had reported as flushed (so at least every commit that returned), the blocked commits
//! complete once it is back, a clean stop of the primary reaches the shutdown checkpoint in the
//! directory, and a standby from a base backup replays the directory to exactly that point with
//! the primary's table checksums. Also: a directory of another cluster is refused, nothing written;
//! SCRAM-SHA-256 with the password from PGPASSWORD streams, a wrong password= is refused (28P01).
//! And walship following a standby that gets promoted follows it onto timeline 2. TLS towards a
//! server with `ssl = on` and a CA made here: verify-full (a URI conninfo), verify-ca, require,
//! prefer and allow stream over TLS; a wrong CA and a host name the certificate does not carry are refused with a
//! clear error; a `hostssl`-only pg_hba refuses sslmode=disable.
//!
//! Needs PostgreSQL (Debian's package); without it the test prints SKIP and passes, unless
//! `WALSHIP_REQUIRE_PG=1`. Run: `cargo test --release --test pg_from_postgres -- --nocapture`.

mod common;

use common::pg::*;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PRIMARY_PORT: u16 = 57421;
const STANDBY_PORT: u16 = 57422;
const OTHER_PORT: u16 = 57423;
const SCRAM_PORT: u16 = 57424;
const PROMOTE_A_PORT: u16 = 57425;
const PROMOTE_B_PORT: u16 = 57426;
const TLS_PORT: u16 = 57427;

struct T {
    pg: Pg,
    tmp: TestDir,
    pgdir: PathBuf,
    t0: Instant,
}

impl T {
    fn new(name: &str) -> Option<T> {
        let tmp = TestDir::new(name);
        let pg = Pg::for_test(tmp.path())?;
        let pgdir = tmp.join("pg");
        fs::create_dir_all(&pgdir).expect("mkdir pg");
        pg.chown(&pgdir).expect("chown pg");
        Some(T { pg, tmp, pgdir, t0: Instant::now() })
    }

    fn say(&self, m: impl std::fmt::Display) {
        println!("[{:>6.2} s] {m}", self.t0.elapsed().as_secs_f64());
    }

    fn server(&self, name: &'static str, port: u16) -> Server {
        self.pg.server(&self.pgdir, name, port).expect("server")
    }

    fn recv(&self, server: &Server, dir: &Path, log: &Path) -> ChildGuard {
        let conninfo = format!("host={} port={} user={PG_USER}", server.sock.display(), server.port);
        let c = walship(&["recv", "--from-postgres", &conninfo, "--slot", "walship", "--dir", p(dir), "--spare-segments", "0"]);
        spawn_logged("walship recv --from-postgres", c, log)
    }
}

/// The LSN in the first `WORD LSN` of `line`'s text after `marker`.
fn lsn_after(text: &str, marker: &str) -> Option<u64> {
    text.lines().rev().find_map(|l| l.split(marker).nth(1)).and_then(|rest| rest.split_whitespace().next()).and_then(|s| parse_lsn(s.trim_matches(|c: char| !c.is_ascii_hexdigit() && c != '/')))
}

fn recv_flushed(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(".walship-flushed")).ok().and_then(|s| s.split_whitespace().next().and_then(parse_lsn)).unwrap_or(0)
}

/// walship's row in pg_stat_replication: (sync_state, flush_lsn).
fn walship_replication(primary: &Server) -> Option<(String, u64)> {
    let row = primary.sql_quiet("SELECT sync_state || ' ' || coalesce(flush_lsn::text, '0/0') FROM pg_stat_replication WHERE application_name = 'walship'").ok()?;
    let (state, lsn) = row.split_once(' ')?;
    Some((state.to_string(), parse_lsn(lsn)?))
}

/// pgbench in the background, with a bound: a commit that never returns (walship never reported
/// its flush) is a failure, not a hang.
fn pgbench_bg(primary: &Server, log: &Path, args: &[&str]) -> ChildGuard {
    let mut c = primary.pg.cmd("pgbench");
    c.arg("-h").arg(&primary.sock).args(["-p", &primary.port.to_string(), "-U", PG_USER]).args(args).arg("postgres");
    spawn_logged("pgbench", c, log)
}

fn wait_child(child: &mut ChildGuard, what: &str, timeout: Duration, log: &Path) -> R<()> {
    match child.wait_timeout(timeout).map_err(|e| e.to_string())? {
        Some(st) if st.success() => Ok(()),
        Some(st) => Err(format!("{what} exited with {st}:\n{}", tail_file(log, 30))),
        None => Err(format!("{what} did not finish within {timeout:?} (commits waiting for walship's flush?):\n{}", tail_file(log, 30))),
    }
}

#[test]
fn a_synchronous_archive_loses_no_acknowledged_commit_across_a_kill_and_replays_to_the_end() {
    let Some(t) = T::new("pg-from-postgres") else { return };
    if let Err(e) = synchronous_archive(&t) {
        panic!("{e}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)", t.tmp.path().display());
    }
}

fn synchronous_archive(t: &T) -> R<()> {
    let mut primary = t.server("primary", PRIMARY_PORT);
    primary.init(
        "pg_from_postgres",
        "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nsynchronous_commit = on\nwal_sender_timeout = 60s\n",
    )?;
    let dir = t.tmp.join("recv");
    let log1 = t.tmp.join("recv-1.log");
    let mut recv = t.recv(&primary, &dir, &log1);
    let sync = poll_until(Duration::from_secs(30), Duration::from_millis(100), || walship_replication(&primary));
    if sync.is_none() {
        return Err(format!("walship never appeared in pg_stat_replication; its log:\n{}", tail_file(&log1, 40)));
    }
    // pg_stat_replication lists a walsender from its start-up on (before walship's
    // CREATE_REPLICATION_SLOT and START_REPLICATION ran): wait for the slot to be in use.
    let mut slot = String::new();
    let active = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        slot = primary.sql_quiet("SELECT slot_type || ' ' || active FROM pg_replication_slots WHERE slot_name = 'walship'").ok()?;
        (slot == "physical true").then_some(())
    });
    if active.is_none() {
        return Err(format!("slot walship: {slot:?}, want an active physical slot walship created; its log:\n{}", tail_file(&log1, 40)));
    }
    // From here on every commit waits for walship's durable flush.
    primary.sql("ALTER SYSTEM SET synchronous_standby_names = 'walship'")?;
    primary.sql("SELECT pg_reload_conf()")?;
    let state = poll_until(Duration::from_secs(20), Duration::from_millis(100), || walship_replication(&primary).filter(|(s, _)| s == "sync"));
    if state.is_none() {
        return Err(format!("walship is not the synchronous standby: {:?}", walship_replication(&primary)));
    }
    t.say("walship streams from the primary as its synchronous standby");
    let base = t.pgdir.join("base");
    let backup_start = primary.base_backup(&base)?;
    let bench_log = t.tmp.join("pgbench-1.log");
    let mut bench = pgbench_bg(&primary, &bench_log, &["-i", "-s", "4", "-q"]);
    wait_child(&mut bench, "pgbench -i", Duration::from_secs(120), &bench_log)?;
    let mut bench = pgbench_bg(&primary, &bench_log, &["-T", "4", "-c", "4", "-j", "2"]);
    wait_child(&mut bench, "pgbench -T 4", Duration::from_secs(90), &bench_log)?;
    // Every commit of that run returned: each waited for walship's flush to pass it.
    let committed = primary.lsn("SELECT pg_current_wal_flush_lsn()")?;
    let reported = walship_replication(&primary).map_or(0, |(_, f)| f);
    t.say(format!("pgbench committed; primary flushed {}, walship reported flush {}", fmt_lsn(committed), fmt_lsn(reported)));

    // Kill walship in the middle of a second run.
    let bench2_log = t.tmp.join("pgbench-2.log");
    let mut bench2 = pgbench_bg(&primary, &bench2_log, &["-T", "8", "-c", "4", "-j", "2"]);
    std::thread::sleep(Duration::from_secs(2));
    let before_kill = walship_replication(&primary).map_or(0, |(_, f)| f);
    recv.signal(libc::SIGKILL).map_err(|e| e.to_string())?;
    recv.wait_timeout(Duration::from_secs(10)).map_err(|e| e.to_string())?;
    // What PostgreSQL saw last as walship's flush (a commit returned only below it).
    let acked = walship_replication(&primary).map_or(before_kill, |(_, f)| f.max(before_kill));
    t.say(format!("kill -9 walship; PostgreSQL had walship's flush at {}", fmt_lsn(acked)));
    let log2 = t.tmp.join("recv-2.log");
    let mut recv = t.recv(&primary, &dir, &log2);
    let recovered = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        lsn_after(&fs::read_to_string(&log2).unwrap_or_default(), "directory holds WAL durably up to ")
    })
    .ok_or_else(|| format!("restarted walship did not say what it holds:\n{}", tail_file(&log2, 30)))?;
    t.say(format!("restarted: the directory holds WAL durably up to {}", fmt_lsn(recovered)));
    if recovered < acked || recovered < committed {
        return Err(format!(
            "after kill -9 the directory holds only up to {} but walship had acknowledged {} (and commits returned up to {})",
            fmt_lsn(recovered),
            fmt_lsn(acked),
            fmt_lsn(committed)
        ));
    }
    wait_child(&mut bench2, "pgbench -T 8 (across the kill)", Duration::from_secs(120), &bench2_log)?;
    let sums = checksums(&primary)?;
    let (cd, end) = primary.clean_stop()?;
    t.say(format!("primary stopped cleanly; WAL ends at {} (shutdown checkpoint {})", fmt_lsn(end), fmt_lsn(cd.checkpoint)));
    let flushed = poll_until(Duration::from_secs(30), Duration::from_millis(100), || Some(recv_flushed(&dir)).filter(|&f| f >= end));
    if flushed != Some(end) {
        return Err(format!("walship's durable position {} != the end of WAL {} after the clean stop:\n{}", fmt_lsn(recv_flushed(&dir)), fmt_lsn(end), tail_file(&log2, 30)));
    }
    recv.signal(libc::SIGTERM).map_err(|e| e.to_string())?;
    match recv.wait_timeout(Duration::from_secs(20)).map_err(|e| e.to_string())? {
        Some(st) if st.success() => {}
        other => return Err(format!("walship recv after SIGTERM: {other:?} (want exit 0):\n{}", tail_file(&log2, 30))),
    }
    let log = fs::read_to_string(&log2).unwrap_or_default();
    if !log.contains("reconnecting") && !log.contains("retrying") {
        return Err(format!("walship did not notice the primary's stop:\n{}", tail_str(&log, 20)));
    }
    let want_restored = (backup_start / cd.seg_size..=(end - 1) / cd.seg_size).map(|s| seg_name(cd.tli, s, cd.seg_size)).collect();
    let replay = common::replay::Replay {
        standby: t.server("standby", STANDBY_PORT),
        base: &base,
        restore_exe: t.pg.restore_exe(t.tmp.path())?,
        recv_dir: &dir,
        extra_conf: "",
        target: end,
        sums: &sums,
        want_restored,
    };
    common::replay::replay_and_verify(replay, &|m| t.say(m))?;

    // Another cluster at the same directory: refused before anything is written.
    let mut other = t.server("other", OTHER_PORT);
    other.init("pg_from_postgres other", "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\n")?;
    let listing = |d: &Path| {
        let mut v: Vec<(String, u64)> = fs::read_dir(d).unwrap().flatten().map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len())).collect();
        v.sort();
        v
    };
    let before = listing(&dir);
    let log3 = t.tmp.join("recv-3.log");
    let mut wrong = t.recv(&other, &dir, &log3);
    let st = wrong.wait_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let text = fs::read_to_string(&log3).unwrap_or_default();
    match st {
        Some(st) if !st.success() && text.contains("another cluster") => {}
        other => return Err(format!("walship against another cluster: {other:?} (want a non-zero exit saying \"another cluster\"):\n{}", tail_str(&text, 20))),
    }
    if listing(&dir) != before {
        return Err(format!("the directory changed after the refusal: {:?} -> {:?}", before, listing(&dir)));
    }
    t.say("another cluster is refused, the directory untouched");
    other.stop("fast")?;
    Ok(())
}

#[test]
fn scram_authentication_connects_with_pgpassword_and_a_wrong_password_is_refused() {
    let Some(t) = T::new("pg-from-postgres-scram") else { return };
    if let Err(e) = scram(&t) {
        panic!("{e}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)", t.tmp.path().display());
    }
}

fn scram(t: &T) -> R<()> {
    let mut primary = t.server("scram", SCRAM_PORT);
    primary.init("pg_from_postgres scram", "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\npassword_encryption = 'scram-sha-256'\n")?;
    primary.sql("CREATE ROLE scram_rep LOGIN REPLICATION PASSWORD 'walship secret'")?;
    // The replication role must prove its password with SCRAM; everything else stays trusted.
    fs::write(primary.data.join("pg_hba.conf"), "local replication scram_rep scram-sha-256\nlocal all all trust\nlocal replication all trust\n")
        .map_err(|e| e.to_string())?;
    primary.sql("SELECT pg_reload_conf()")?;
    let conninfo = |extra: &str| format!("host={} port={} user=scram_rep {extra}", primary.sock.display(), primary.port);
    let dir = t.tmp.join("recv");
    let log = t.tmp.join("recv-scram.log");
    let mut c = walship(&["recv", "--from-postgres", &conninfo(""), "--slot", "scram", "--dir", p(&dir), "--spare-segments", "0"]);
    c.env("PGPASSWORD", "walship secret");
    let mut recv = spawn_logged("walship recv (SCRAM)", c, &log);
    let seen = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        primary.sql_quiet("SELECT usename FROM pg_stat_replication WHERE application_name = 'walship'").ok().filter(|u| u == "scram_rep")
    });
    if seen.is_none() {
        return Err(format!("walship with PGPASSWORD never streamed as scram_rep:\n{}", tail_file(&log, 30)));
    }
    recv.signal(libc::SIGTERM).map_err(|e| e.to_string())?;
    match recv.wait_timeout(Duration::from_secs(20)).map_err(|e| e.to_string())? {
        Some(st) if st.success() => {}
        other => return Err(format!("walship after SIGTERM: {other:?}:\n{}", tail_file(&log, 20))),
    }
    t.say("SCRAM-SHA-256 with the password from PGPASSWORD: streaming as scram_rep");
    let log = t.tmp.join("recv-wrong.log");
    let mut c = walship(&["recv", "--from-postgres", &conninfo("password=wrong"), "--slot", "scram", "--dir", p(&dir), "--spare-segments", "0"]);
    c.env("PGPASSWORD", "walship secret");
    let mut wrong = spawn_logged("walship recv (wrong password)", c, &log);
    let st = wrong.wait_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let text = fs::read_to_string(&log).unwrap_or_default();
    match st {
        Some(st) if !st.success() && text.contains("authentication with PostgreSQL") && text.contains("28P01") => {}
        other => return Err(format!("a wrong password (password= wins over PGPASSWORD): {other:?}, want a non-zero exit naming the authentication failure:\n{}", tail_str(&text, 20))),
    }
    t.say("a wrong password is refused with PostgreSQL's message");
    primary.stop("fast")?;
    Ok(())
}

#[test]
fn a_promotion_of_the_followed_standby_is_followed_onto_the_new_timeline() {
    let Some(t) = T::new("pg-from-postgres-promote") else { return };
    if let Err(e) = promotion(&t) {
        panic!("{e}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)", t.tmp.path().display());
    }
}

fn promotion(t: &T) -> R<()> {
    let conf = "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nhot_standby = on\n";
    let mut a = t.server("A", PROMOTE_A_PORT);
    a.init("pg_from_postgres promotion", conf)?;
    let mut b = t.server("B", PROMOTE_B_PORT);
    let mut c = t.pg.cmd("pg_basebackup");
    c.arg("-h").arg(&a.sock).args(["-p", &a.port.to_string(), "-U", PG_USER, "-R", "-X", "stream", "-c", "fast", "--no-sync"]).arg("-D").arg(&b.data);
    run_ok(&mut c)?;
    append(&b.data.join("postgresql.auto.conf"), &format!("\nport = {}\nunix_socket_directories = '{}'\n", b.port, b.sock.display()))?;
    b.pg_ctl_start(true)?;
    a.sql("CREATE TABLE t (id int)")?;
    a.sql("INSERT INTO t SELECT generate_series(1, 1000)")?;
    let dir = t.tmp.join("recv");
    let log = t.tmp.join("recv-promote.log");
    let mut recv = t.recv(&b, &dir, &log);
    let a_end = a.lsn("SELECT pg_current_wal_flush_lsn()")?;
    if poll_until(Duration::from_secs(30), Duration::from_millis(100), || Some(()).filter(|_| recv_flushed(&dir) >= a_end)).is_none() {
        return Err(format!("walship (following standby B) never reached A's {}: at {}:\n{}", fmt_lsn(a_end), fmt_lsn(recv_flushed(&dir)), tail_file(&log, 30)));
    }
    t.say(format!("walship follows standby B on timeline 1 up to {}", fmt_lsn(recv_flushed(&dir))));
    a.stop("fast")?;
    b.sql("SELECT pg_promote()")?;
    poll_until(Duration::from_secs(30), Duration::from_millis(100), || b.sql_quiet("SELECT pg_is_in_recovery()").ok().filter(|s| s == "f"))
        .ok_or_else(|| b.err("B did not leave recovery"))?;
    b.sql("INSERT INTO t SELECT generate_series(1001, 2000)")?;
    let b_end = b.lsn("SELECT pg_current_wal_flush_lsn()")?;
    let followed = poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
        Some(()).filter(|_| dir.join("00000002.history").exists() && recv_flushed(&dir) >= b_end)
    });
    if followed.is_none() {
        return Err(format!(
            "after the promotion walship holds {} (want >= {} on timeline 2, and 00000002.history):\n{}",
            fmt_lsn(recv_flushed(&dir)),
            fmt_lsn(b_end),
            tail_file(&log, 30)
        ));
    }
    let text = fs::read_to_string(&log).unwrap_or_default();
    if !text.contains("following timeline 2") {
        return Err(format!("walship's log does not show the timeline switch:\n{}", tail_str(&text, 20)));
    }
    let tli2 = fs::read_dir(&dir).map_err(|e| e.to_string())?.flatten().any(|e| e.file_name().to_string_lossy().starts_with("00000002000000"));
    if !tli2 {
        return Err("no timeline 2 segment in the directory".into());
    }
    t.say(format!("B promoted; walship followed onto timeline 2 up to {}", fmt_lsn(recv_flushed(&dir))));
    recv.signal(libc::SIGTERM).map_err(|e| e.to_string())?;
    recv.wait_timeout(Duration::from_secs(20)).map_err(|e| e.to_string())?;
    b.stop("fast")?;
    Ok(())
}

#[test]
fn tls_towards_postgres_as_libpq_sslmode_says() {
    let Some(t) = T::new("pg-from-postgres-tls") else { return };
    if let Err(e) = tls(&t) {
        panic!("{e}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)", t.tmp.path().display());
    }
}

/// A CA, and a server certificate it signs for `localhost` only; another CA that signs nothing.
fn make_certs(dir: &Path) -> R<(PathBuf, PathBuf, PathBuf, PathBuf)> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let e = |e: rcgen::Error| e.to_string();
    let ca = |name: &str| -> R<(String, Issuer<'static, KeyPair>)> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(e)?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().map_err(e)?;
        let cert = params.self_signed(&key).map_err(e)?;
        Ok((cert.pem(), Issuer::new(params, key)))
    };
    let (ca_pem, issuer) = ca("walship test CA")?;
    let (other_pem, _) = ca("some other CA")?;
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).map_err(e)?;
    params.distinguished_name.push(rcgen::DnType::CommonName, "localhost");
    let key = KeyPair::generate().map_err(e)?;
    let cert = params.signed_by(&key, &issuer).map_err(e)?;
    let paths = (dir.join("ca.pem"), dir.join("other-ca.pem"), dir.join("server.crt"), dir.join("server.key"));
    fs::write(&paths.0, ca_pem).map_err(|e| e.to_string())?;
    fs::write(&paths.1, other_pem).map_err(|e| e.to_string())?;
    fs::write(&paths.2, cert.pem()).map_err(|e| e.to_string())?;
    fs::write(&paths.3, key.serialize_pem()).map_err(|e| e.to_string())?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&paths.3, fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
    Ok(paths)
}

fn tls(t: &T) -> R<()> {
    let certs = t.pgdir.join("certs");
    fs::create_dir_all(&certs).map_err(|e| e.to_string())?;
    let (ca, other_ca, cert, key) = make_certs(&certs)?;
    t.pg.chown(&certs)?;
    let mut primary = t.server("tls", TLS_PORT);
    primary.init(
        "pg_from_postgres tls",
        &format!(
            "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nlisten_addresses = '127.0.0.1'\nssl = on\n\
             ssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            cert.display(),
            key.display()
        ),
    )?;
    // Replication over TCP only with TLS: there is no `host` (or `hostnossl`) line for it.
    fs::write(primary.data.join("pg_hba.conf"), "local all all trust\nlocal replication all trust\nhostssl replication all 127.0.0.1/32 trust\n")
        .map_err(|e| e.to_string())?;
    primary.sql("SELECT pg_reload_conf()")?;
    let home = t.tmp.join("home"); // no ~/.postgresql/root.crt: sslmode=require checks nothing
    fs::create_dir_all(&home).map_err(|e| e.to_string())?;
    let dir = t.tmp.join("recv");
    let metrics_port = free_port();
    let metrics_listen = format!("127.0.0.1:{metrics_port}");
    let run = |name: &str, conninfo: &str| {
        let log = t.tmp.join(format!("recv-{name}.log"));
        let args = ["recv", "--from-postgres", conninfo, "--slot", "walship", "--dir", p(&dir), "--spare-segments", "0", "--metrics-listen", &metrics_listen];
        let mut c = walship(&args);
        c.env("HOME", &home).env_remove("PGSSLMODE").env_remove("PGSSLROOTCERT");
        (spawn_logged(&format!("walship recv ({name})"), c, &log), log)
    };
    // Streams, and the walsender's connection is TLS (pg_stat_ssl), then a clean stop.
    let streams = |name: &str, conninfo: &str| -> R<()> {
        let (mut recv, log) = run(name, conninfo);
        let sql = "SELECT s.ssl::text || ' ' || s.version FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid) WHERE r.application_name = 'walship'";
        let seen = poll_until(Duration::from_secs(30), Duration::from_millis(100), || primary.sql_quiet(sql).ok().filter(|s| !s.is_empty()));
        match seen.as_deref() {
            Some(s) if s.starts_with("true TLSv1.3") => {}
            other => return Err(format!("{name}: walship's walsender connection: {other:?}, want TLS 1.3:\n{}", tail_file(&log, 30))),
        }
        primary.sql("CREATE TABLE IF NOT EXISTS tls_rows (x int); INSERT INTO tls_rows SELECT generate_series(1, 10000)")?;
        primary.sql("SELECT pg_switch_wal()")?;
        let end = primary.lsn("SELECT pg_current_wal_flush_lsn()")?;
        if poll_until(Duration::from_secs(30), Duration::from_millis(100), || Some(()).filter(|_| recv_flushed(&dir) >= end)).is_none() {
            return Err(format!("{name}: walship never made {} durable:\n{}", fmt_lsn(end), tail_file(&log, 30)));
        }
        // `walship status` shows the upstream: streaming over TLS, the server's position and the
        // last status update sent (flush = what is durable here) at or past `end`.
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let up = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
            let out = run_ok(&mut walship(&["status", "--url", &url, "--json", "--sample", "0"])).ok()?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let u = v.get("upstream")?.clone();
            let flush = u["reported_flush"].as_str().and_then(parse_lsn)?;
            let server = u["server"].as_str().and_then(parse_lsn)?;
            (u["connected"] == true && u["tls"] == true && flush >= end && server >= end).then_some(u)
        });
        let Some(up) = up else {
            let out = run_ok(&mut walship(&["status", "--url", &url, "--json", "--sample", "0"]));
            return Err(format!("{name}: walship status never showed the upstream connected over TLS with flush >= {}: {out:?}", fmt_lsn(end)));
        };
        t.say(format!("{name}: walship status upstream: {up}"));
        recv.signal(libc::SIGTERM).map_err(|e| e.to_string())?;
        match recv.wait_timeout(Duration::from_secs(20)).map_err(|e| e.to_string())? {
            Some(st) if st.success() => {}
            other => return Err(format!("{name}: walship after SIGTERM: {other:?}:\n{}", tail_file(&log, 20))),
        }
        t.say(format!("{name}: streams over TLS 1.3 up to {}", fmt_lsn(recv_flushed(&dir))));
        Ok(())
    };
    // Exits non-zero, its log holding every one of `want`.
    let refused = |name: &str, conninfo: &str, want: &[&str]| -> R<()> {
        let (mut recv, log) = run(name, conninfo);
        let st = recv.wait_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())?;
        let text = strip_ansi(&fs::read_to_string(&log).unwrap_or_default());
        match st {
            Some(st) if !st.success() && want.iter().all(|w| text.contains(w)) => {}
            other => return Err(format!("{name}: {other:?}, want a non-zero exit saying {want:?}:\n{}", tail_str(&text, 20))),
        }
        let line = text.lines().rev().find(|l| l.contains(want[0])).unwrap_or_default();
        t.say(format!("{name}: refused: {}", line.trim()));
        Ok(())
    };
    let port = primary.port;
    streams("verify-full (URI)", &format!("postgresql://{PG_USER}@localhost:{port}/?sslmode=verify-full&sslrootcert={}", ca.display()))?;
    streams("verify-ca", &format!("host=127.0.0.1 port={port} user={PG_USER} sslmode=verify-ca sslrootcert={}", ca.display()))?;
    streams("require", &format!("host=127.0.0.1 port={port} user={PG_USER} sslmode=require"))?;
    streams("prefer", &format!("host=127.0.0.1 port={port} user={PG_USER}"))?;
    // allow: plaintext first; the hostssl-only server refuses it, so TLS next.
    streams("allow", &format!("host=127.0.0.1 port={port} user={PG_USER} sslmode=allow"))?;
    // A walsender terminated under it: walship reconnects (over TLS again) and counts it.
    {
        let (mut recv, log) = run("reconnect", &format!("host=localhost port={port} user={PG_USER} sslmode=verify-full sslrootcert={}", ca.display()));
        let url = format!("http://127.0.0.1:{metrics_port}/metrics");
        let status = || -> Option<serde_json::Value> {
            let out = run_ok(&mut walship(&["status", "--url", &url, "--json", "--sample", "0"])).ok()?;
            serde_json::from_slice::<serde_json::Value>(&out.stdout).ok()?.get("upstream").cloned()
        };
        poll_until(Duration::from_secs(30), Duration::from_millis(100), || status().filter(|u| u["connected"] == true))
            .ok_or_else(|| format!("reconnect: never streaming:\n{}", tail_file(&log, 20)))?;
        primary.sql("SELECT pg_terminate_backend(pid) FROM pg_stat_replication WHERE application_name = 'walship'")?;
        // Nothing new to stream: the server's position and the flush walship reports on starting
        // a stream are still its durable end.
        let held = recv_flushed(&dir);
        let at = |u: &serde_json::Value, k: &str| u[k].as_str().and_then(parse_lsn).unwrap_or(0);
        let up = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
            status().filter(|u| u["connected"] == true && u["reconnects"] == 1 && u["tls"] == true && at(u, "reported_flush") == held && at(u, "server") >= held)
        })
            .ok_or_else(|| format!("reconnect: walship status never showed 1 reconnect, streaming over TLS again: {:?}\n{}", status(), tail_file(&log, 20)))?;
        t.say(format!("walsender terminated; walship reconnected: {up}"));
        recv.signal(libc::SIGTERM).map_err(|e| e.to_string())?;
        recv.wait_timeout(Duration::from_secs(20)).map_err(|e| e.to_string())?;
    }
    refused(
        "verify-full, a host name the certificate lacks",
        &format!("host=127.0.0.1 port={port} user={PG_USER} sslmode=verify-full sslrootcert={}", ca.display()),
        &["TLS with PostgreSQL at 127.0.0.1", "not valid for name", "host name \"127.0.0.1\""],
    )?;
    refused(
        "verify-full, another CA",
        &format!("host=localhost port={port} user={PG_USER} sslmode=verify-full sslrootcert={}", other_ca.display()),
        &["TLS with PostgreSQL at localhost", "UnknownIssuer", "other-ca.pem"],
    )?;
    refused("disable, hostssl only", &format!("host=127.0.0.1 port={port} user={PG_USER} sslmode=disable"), &["28000", "no encryption"])?;
    refused(
        "verify-full without a root certificate",
        &format!("host=localhost port={port} user={PG_USER} sslmode=verify-full"),
        &["verify-full needs a root certificate", "root.crt"],
    )?;
    primary.stop("fast")?;
    Ok(())
}
