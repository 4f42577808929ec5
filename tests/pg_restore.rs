//! A real standby whose `walship restore` cannot read the receiver's files (issue #10): a receiver
//! run as root wrote root:root 0640 files, the standby runs as `postgres`. `restore` used to exit 1
//! on "Permission denied", which recovery reads as "no more WAL": it printed `redo done`, promoted,
//! and had only part of the rows. Now it exits above 125, recovery stops with FATAL instead of
//! promoting, and after the receiver gives its files to the `postgres` group (`--group postgres`)
//! the same standby replays to the end with the primary's rows.
//!
//! Needs PostgreSQL (Debian's package) and root (to write files the postgres user cannot read).
//! Without them the test prints SKIP and passes, unless `WALSHIP_REQUIRE_PG=1`.
//!
//! Run: `cargo test --release --test pg_restore -- --nocapture`.

mod common;

use common::pg::*;
use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

const PRIMARY_PORT: u16 = 57301;
const STANDBY_PORT: u16 = 57302;

fn pg_or_skip() -> Option<Pg> {
    let require = std::env::var("WALSHIP_REQUIRE_PG").as_deref() == Ok("1");
    let bin = Pg::find_bin();
    let ids = user_ids(PG_USER);
    match (bin, is_root(), ids) {
        (Some(bin), true, Some(ids)) => Some(Pg { bin, as_user: Some(ids), cwd: std::env::temp_dir() }),
        _ if require && Pg::find_bin().is_none() => panic!("WALSHIP_REQUIRE_PG=1 but PostgreSQL is not installed"),
        _ => {
            println!("SKIP: needs PostgreSQL, root and the `{PG_USER}` user");
            None
        }
    }
}

fn server(pg: &Pg, root: &Path, name: &'static str, port: u16) -> Server {
    Server {
        pg: pg.clone(),
        name,
        data: root.join(name),
        log: root.join(format!("{name}.log")),
        sock: root.join("sock"),
        port,
        running: false,
    }
}

fn walship_ok(args: &[&str]) -> R<String> {
    let mut c = walship(args);
    c.env("WALSHIP_INSECURE_NO_AUTH", "true");
    let out = run_ok(&mut c)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

const TABLE_SUM: &str = "SELECT count(*) || ':' || sum(hashtext(t::text)) FROM t";

#[test]
fn a_standby_that_cannot_read_the_files_stops_instead_of_promoting() {
    let Some(mut pg) = pg_or_skip() else { return };
    let tmp = TestDir::new("pg-restore");
    let root = tmp.path().to_path_buf();
    pg.cwd = root.clone();
    let pgdir = root.join("pg");
    fs::create_dir_all(pgdir.join("sock")).unwrap();
    pg.chown(&pgdir).unwrap();
    if let Err(e) = run_test(&pg, &root, &pgdir) {
        panic!("{e}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)", root.display());
    }
}

fn run_test(pg: &Pg, root: &Path, pgdir: &Path) -> R<()> {
    let t0 = Instant::now();
    let say = |m: String| println!("[{:>6.2} s] {m}", t0.elapsed().as_secs_f64());
    let mut primary = server(pg, pgdir, "primary", PRIMARY_PORT);
    let mut c = pg.cmd("initdb");
    c.arg("-D").arg(&primary.data).args(["-U", PG_USER, "--auth=trust", "--locale=C", "--no-sync"]);
    run_ok(&mut c)?;
    append(
        &primary.data.join("postgresql.conf"),
        &format!(
            "\nport = {PRIMARY_PORT}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nwal_level = replica\n\
             max_wal_senders = 4\nmax_replication_slots = 4\n",
            primary.sock.display()
        ),
    )?;
    primary.pg_ctl_start(true)?;
    primary.sql("SELECT pg_create_physical_replication_slot('keep', true)")?;
    primary.sql("CREATE TABLE t (id int, pad text)")?;
    let standby_data = pgdir.join("standby");
    let mut c = pg.cmd("pg_basebackup");
    c.arg("-D").arg(&standby_data).arg("-h").arg(&primary.sock).args(["-p", &PRIMARY_PORT.to_string(), "-U", PG_USER, "-X", "none"]);
    run_ok(&mut c)?;
    let label = fs::read_to_string(standby_data.join("backup_label")).map_err(|e| e.to_string())?;
    let start_seg = label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION: ").and_then(|r| r.split("(file ").nth(1)).map(|f| f.trim_end_matches(')').to_string()))
        .ok_or_else(|| format!("no START WAL LOCATION in backup_label:\n{label}"))?;
    say(format!("base backup taken; WAL from {start_seg}"));
    // Several segments of rows after the backup, so a standby that stops early has visibly fewer.
    for batch in 0..5 {
        primary.sql(&format!(
            "INSERT INTO t SELECT g, repeat(md5(g::text), 40) FROM generate_series({}, {}) g",
            batch * 4000,
            batch * 4000 + 3999
        ))?;
        primary.sql("SELECT pg_switch_wal()")?;
    }
    let want = primary.sql(TABLE_SUM)?;
    primary.stop("fast")?;
    say(format!("primary stopped; table {want}"));

    // Ship the stopped primary's pg_wal into a receiver running as root: files root:root 0640.
    let recv_dir = root.join("recv");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let to = listen.clone();
    let pg_wal = primary.data.join("pg_wal");
    let mut recv = ChildGuard::spawn("recv", walship(&["recv", "--listen", &listen, "--dir", p(&recv_dir), "--insecure-no-auth"]).stderr(fs::File::create(root.join("recv-1.log")).unwrap()))
        .map_err(|e| e.to_string())?;
    walship_ok(&["send", "--once", "--pg-wal", p(&pg_wal), "--to", &to, "--retry-for", "20s", "--insecure-no-auth"])?;
    recv.signal(libc::SIGTERM).map_err(|e| e.to_string())?;
    recv.wait_timeout(Duration::from_secs(20)).map_err(|e| e.to_string())?;
    fs::set_permissions(&recv_dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    // The backup's first segments are readable (recovery gets going), the later ones are not.
    let mut names: Vec<String> = fs::read_dir(&recv_dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).filter(|n| is_seg_name(n.trim_end_matches(".partial"))).collect();
    names.sort();
    for n in names.iter().filter(|n| n.as_str() <= start_seg.as_str()) {
        fs::set_permissions(recv_dir.join(n), fs::Permissions::from_mode(0o644)).unwrap();
    }
    let unreadable = names.iter().filter(|n| n.as_str() > start_seg.as_str()).count();
    if unreadable < 3 {
        return Err(format!("expected several segments after the backup's {start_seg}, got {names:?}"));
    }
    say(format!("receiver holds {names:?}; {unreadable} of them unreadable by {PG_USER}"));

    // A standby (archive recovery, promotes at the end of the archive) restoring from there.
    fs::remove_dir_all(standby_data.join("pg_wal")).ok();
    fs::create_dir_all(standby_data.join("pg_wal")).unwrap();
    let mut standby = server(pg, pgdir, "standby", STANDBY_PORT);
    append(
        &standby_data.join("postgresql.conf"),
        &format!(
            "\nport = {STANDBY_PORT}\nrestore_command = '{} restore %f %p --dir {}'\n",
            walship_bin().display(),
            recv_dir.display()
        ),
    )?;
    fs::write(standby_data.join("recovery.signal"), "").unwrap();
    pg.chown(&standby_data)?;
    let started = standby.pg_ctl_start(true);
    let log = fs::read_to_string(&standby.log).unwrap_or_default();
    if started.is_ok() || standby.alive() {
        let got = standby.sql(TABLE_SUM).unwrap_or_default();
        standby.stop("immediate").ok();
        return Err(format!("the standby came up (table {got}, primary {want}) although restore could not read the WAL:\n{}", tail_str(&log, 30)));
    }
    standby.running = false;
    if !log.contains("Permission denied") || log.contains("redo done") {
        return Err(format!("expected recovery to stop on restore's permission error, not to finish redo:\n{}", tail_str(&log, 30)));
    }
    say("standby stopped with FATAL on the unreadable segment, without promoting".into());

    // The fix an operator applies: the receiver gives the directory and its files to postgres's group.
    let mut recv = ChildGuard::spawn(
        "recv",
        walship(&["recv", "--listen", &listen, "--dir", p(&recv_dir), "--insecure-no-auth", "--group", PG_USER])
            .stderr(fs::File::create(root.join("recv-2.log")).unwrap()),
    )
    .map_err(|e| e.to_string())?;
    let ready = poll_until(Duration::from_secs(20), Duration::from_millis(20), || {
        fs::read_to_string(root.join("recv-2.log")).unwrap_or_default().contains("listening").then_some(())
    });
    ready.ok_or_else(|| format!("receiver with --group did not start:\n{}", tail_file(&root.join("recv-2.log"), 20)))?;
    standby.pg_ctl_start(true)?;
    let done = poll_until(Duration::from_secs(120), Duration::from_millis(200), || {
        (standby.sql_quiet("SELECT pg_is_in_recovery()").ok().as_deref() == Some("f")).then_some(())
    });
    done.ok_or_else(|| standby.err("the standby did not finish recovery"))?;
    let got = standby.sql(TABLE_SUM)?;
    standby.stop("fast")?;
    recv.signal(libc::SIGTERM).ok();
    if got != want {
        return Err(format!("standby table {got}, primary {want}"));
    }
    say(format!("after --group {PG_USER}: the standby replayed everything ({got})"));
    Ok(())
}
