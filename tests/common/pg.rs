//! PostgreSQL plumbing shared by the real-server tests (pg_replay, pg_follow, pg_timeline,
//! pg_safety): find Debian's binaries (or skip), run them as the `postgres` OS user when we are
//! root, initdb and start/stop servers with a guard that stops them on drop, base backups without
//! WAL, read pg_control through pg_controldata, checksum the pgbench tables, find the end of WAL
//! after a clean shutdown with pg_waldump, and the walship binary as the postgres user can run it.
#![allow(dead_code)]

use super::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub const PG_USER: &str = "postgres";

pub type R<T> = Result<T, String>;


#[derive(Clone)]
pub struct Pg {
    pub bin: PathBuf,
    pub as_user: Option<(u32, u32)>,
    pub cwd: PathBuf,
}

impl Pg {
    /// PostgreSQL for a test whose commands run in `cwd`: `None` (after printing why) to skip when
    /// it is not installed, or we are root without a `postgres` user to run it as; with
    /// `WALSHIP_REQUIRE_PG=1` those panic instead.
    pub fn for_test(cwd: &Path) -> Option<Pg> {
        let require = std::env::var("WALSHIP_REQUIRE_PG").as_deref() == Ok("1");
        let Some(bin) = Pg::find_bin() else {
            if require {
                panic!("WALSHIP_REQUIRE_PG=1 but PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb)");
            }
            println!("SKIP: PostgreSQL not installed");
            return None;
        };
        let as_user = if is_root() {
            match user_ids(PG_USER) {
                Some(ids) => Some(ids),
                None if require => panic!("running as root but there is no `{PG_USER}` OS user to run PostgreSQL as"),
                None => {
                    println!("SKIP: running as root without a `{PG_USER}` user (initdb refuses root)");
                    return None;
                }
            }
        } else {
            None
        };
        Some(Pg { bin, as_user, cwd: cwd.to_path_buf() })
    }

    /// A server `name` under `pgdir` (data `pgdir/name`, log `pgdir/name.log`) with a private
    /// socket directory `pgdir/sock-name` (0700, owned by the postgres user). Not created yet.
    pub fn server(&self, pgdir: &Path, name: &'static str, port: u16) -> R<Server> {
        let sock = pgdir.join(format!("sock-{name}"));
        fs::create_dir_all(&sock).map_err(|e| format!("mkdir {}: {e}", sock.display()))?;
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o700)).map_err(|e| format!("chmod {}: {e}", sock.display()))?;
        self.chown(&sock)?;
        Ok(Server::new(self, name, pgdir.join(name), pgdir.join(format!("{name}.log")), sock, port))
    }

    /// The walship binary as the postgres user can execute it: in place when every parent
    /// directory is traversable (or we are not root), else a copy in `tmp/bin`.
    pub fn restore_exe(&self, tmp: &Path) -> R<PathBuf> {
        let w = walship_bin();
        if self.as_user.is_none() || others_can_reach(&w) {
            return Ok(w);
        }
        let dir = tmp.join("bin");
        fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let exe = dir.join("walship");
        fs::copy(&w, &exe).map_err(|e| format!("copy {}: {e}", w.display()))?;
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        Ok(exe)
    }

    pub fn find_bin() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os("WALSHIP_PG_BIN") {
            let p = PathBuf::from(p);
            return p.join("initdb").exists().then_some(p);
        }
        let mut best: Option<(u32, PathBuf)> = None;
        for e in fs::read_dir("/usr/lib/postgresql").ok()?.flatten() {
            let Ok(major) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            let bin = e.path().join("bin");
            if bin.join("initdb").exists() && bin.join("pg_ctl").exists() && best.as_ref().is_none_or(|b| major > b.0) {
                best = Some((major, bin));
            }
        }
        best.map(|b| b.1)
    }

    pub fn cmd(&self, prog: &str) -> Command {
        let path = self.bin.join(prog);
        let mut c = if self.as_user.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", PG_USER, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir(&self.cwd);
        for v in ["PGHOST", "PGPORT", "PGDATA", "PGUSER", "PGDATABASE", "PGSERVICE", "PGOPTIONS"] {
            c.env_remove(v);
        }
        c
    }

    pub fn chown(&self, path: &Path) -> R<()> {
        if let Some((uid, gid)) = self.as_user {
            chown_r(path, uid, gid).map_err(|e| format!("chown -R {PG_USER} {}: {e}", path.display()))?;
        }
        Ok(())
    }
}

pub struct Server {
    pub pg: Pg,
    pub name: &'static str,
    pub data: PathBuf,
    pub log: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub running: bool,
}

impl Server {
    pub fn new(pg: &Pg, name: &'static str, data: PathBuf, log: PathBuf, sock: PathBuf, port: u16) -> Server {
        Server { pg: pg.clone(), name, data, log, sock, port, running: false }
    }

    /// initdb (trust, C locale, UTF8), the server's port and socket plus `conf` appended to
    /// postgresql.conf under a `# walship {test}` line, then start and wait.
    pub fn init(&mut self, test: &str, conf: &str) -> R<()> {
        let mut c = self.pg.cmd("initdb");
        c.arg("-D").arg(&self.data);
        c.args(["-U", PG_USER, "--auth=trust", "--locale=C", "--encoding=UTF8", "--no-sync"]);
        run_ok(&mut c)?;
        append(
            &self.data.join("postgresql.conf"),
            &format!(
                "\n# walship {test}\nport = {}\nlisten_addresses = ''\nunix_socket_directories = '{}'\n{conf}\n",
                self.port,
                self.sock.display()
            ),
        )?;
        self.pg_ctl_start(true)
    }

    /// A libpq connection string for this server over its unix socket.
    pub fn conninfo(&self) -> String {
        format!("host={} port={} user={PG_USER} dbname=postgres", self.sock.display(), self.port)
    }

    /// `pgbench ARGS postgres` against this server; its stdout.
    pub fn pgbench(&self, args: &[&str]) -> R<String> {
        let mut c = self.pg.cmd("pgbench");
        c.arg("-h").arg(&self.sock).args(["-p", &self.port.to_string(), "-U", PG_USER]);
        c.args(args).arg("postgres");
        let out = run_ok(&mut c).map_err(|e| self.err(e))?;
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// `pg_basebackup -X none` (no WAL in it) into `dest`; the backup's START WAL LOCATION.
    pub fn base_backup(&self, dest: &Path) -> R<u64> {
        let mut c = self.pg.cmd("pg_basebackup");
        c.arg("-h").arg(&self.sock).args(["-p", &self.port.to_string(), "-U", PG_USER]);
        c.arg("-D").arg(dest).args(["-c", "fast", "-X", "none", "--no-sync"]);
        run_ok(&mut c).map_err(|e| self.err(e))?;
        let label = fs::read_to_string(dest.join("backup_label")).map_err(|e| format!("read backup_label: {e}"))?;
        label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|s| s.split_whitespace().next())
            .and_then(parse_lsn)
            .ok_or_else(|| format!("no START WAL LOCATION in backup_label:\n{label}"))
    }

    /// Stops the server cleanly (`-m fast`); its control data (a shutdown checkpoint, REDO at
    /// it) and the end of WAL after it (pg_waldump).
    pub fn clean_stop(&mut self) -> R<(ControlData, u64)> {
        self.stop("fast")?;
        let cd = self.controldata()?;
        if cd.state != "shut down" || cd.redo != cd.checkpoint {
            return Err(format!(
                "{} after a clean stop: state `{}` (want `shut down`), redo {} checkpoint {}",
                self.name,
                cd.state,
                fmt_lsn(cd.redo),
                fmt_lsn(cd.checkpoint)
            ));
        }
        let end = wal_end_after_checkpoint(&self.pg, &self.data.join("pg_wal"), cd.tli, cd.checkpoint, cd.block_size)?;
        Ok((cd, end))
    }

    pub fn err(&self, msg: impl std::fmt::Display) -> String {
        format!("{msg}\n--- {} server log tail ({}) ---\n{}", self.name, self.log.display(), tail_file(&self.log, 40))
    }

    pub fn pg_ctl_start(&mut self, wait: bool) -> R<()> {
        let mut c = self.pg.cmd("pg_ctl");
        c.arg("-D").arg(&self.data).arg("-l").arg(&self.log);
        if wait {
            c.args(["-w", "-t", "120"]);
        } else {
            c.arg("-W");
        }
        c.arg("start");
        c.stdout(Stdio::null()).stderr(Stdio::piped());
        self.running = true;
        let out = run(&mut c)?;
        if !out.status.success() {
            return Err(self.err(describe_failure(&c, &out)));
        }
        Ok(())
    }

    pub fn stop(&mut self, mode: &str) -> R<()> {
        let mut c = self.pg.cmd("pg_ctl");
        c.arg("-D").arg(&self.data).args(["-m", mode, "-w", "-t", "120", "stop"]);
        let out = run(&mut c)?;
        if !out.status.success() {
            return Err(self.err(describe_failure(&c, &out)));
        }
        self.running = false;
        Ok(())
    }

    pub fn alive(&self) -> bool {
        let mut c = self.pg.cmd("pg_ctl");
        c.arg("-D").arg(&self.data).arg("status");
        run(&mut c).map(|o| o.status.success()).unwrap_or(false)
    }

    pub fn psql_cmd(&self) -> Command {
        let mut c = self.pg.cmd("psql");
        c.arg("-h").arg(&self.sock).args(["-p", &self.port.to_string(), "-U", PG_USER, "-d", "postgres"]);
        c.args(["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]);
        c
    }

    pub fn sql(&self, sql: &str) -> R<String> {
        self.sql_quiet(sql).map_err(|e| self.err(format!("psql -c {sql:?}: {e}")))
    }

    pub fn sql_quiet(&self, sql: &str) -> R<String> {
        let mut c = self.psql_cmd();
        c.arg("-c").arg(sql);
        let out = run(&mut c)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    pub fn lsn(&self, sql: &str) -> R<u64> {
        let s = self.sql(sql)?;
        parse_lsn(&s).ok_or_else(|| format!("{sql}: not an LSN: {s:?}"))
    }

    pub fn controldata(&self) -> R<ControlData> {
        let mut c = self.pg.cmd("pg_controldata");
        c.arg("-D").arg(&self.data);
        let out = run_ok(&mut c)?;
        ControlData::parse(&String::from_utf8_lossy(&out.stdout))
    }

    pub fn postmaster_pid(&self) -> R<i32> {
        let p = self.data.join("postmaster.pid");
        let s = fs::read_to_string(&p).map_err(|e| format!("read {}: {e}", p.display()))?;
        s.lines().next().and_then(|l| l.trim().parse().ok()).ok_or_else(|| format!("bad {}: {s:?}", p.display()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.running {
            eprintln!("guard: stopping {} server (pg_ctl -m immediate stop)", self.name);
            let mut c = self.pg.cmd("pg_ctl");
            c.arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "-t", "60", "stop"]);
            let _ = run(&mut c);
        }
    }
}

#[derive(Debug)]
pub struct ControlData {
    pub state: String,
    pub checkpoint: u64,
    pub redo: u64,
    pub sysid: u64,
    pub seg_size: u64,
    pub block_size: u64,
    pub tli: u32,
}

impl ControlData {
    pub fn parse(text: &str) -> R<ControlData> {
        let field = |k: &str| -> R<String> {
            text.lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim_start_matches(':').trim().to_string()))
                .ok_or_else(|| format!("pg_controldata: no `{k}` in:\n{text}"))
        };
        let num = |k: &str| -> R<u64> { field(k)?.parse().map_err(|e| format!("pg_controldata `{k}`: {e}")) };
        let lsn = |k: &str| -> R<u64> { parse_lsn(&field(k)?).ok_or_else(|| format!("pg_controldata `{k}`: bad LSN")) };
        Ok(ControlData {
            state: field("Database cluster state")?,
            checkpoint: lsn("Latest checkpoint location")?,
            redo: lsn("Latest checkpoint's REDO location")?,
            sysid: num("Database system identifier")?,
            seg_size: num("Bytes per WAL segment")?,
            block_size: num("WAL block size")?,
            tli: num("Latest checkpoint's TimeLineID")? as u32,
        })
    }
}

pub const CHECKSUM_QUERIES: &[(&str, &str)] = &[
    (
        "pgbench_accounts",
        "SELECT count(*) || ' sum=' || coalesce(sum(abalance),0) || ' md5=' || \
         coalesce(md5(string_agg(md5(t::text), '' ORDER BY aid)),'-') FROM pgbench_accounts t",
    ),
    (
        "pgbench_branches",
        "SELECT count(*) || ' sum=' || coalesce(sum(bbalance),0) || ' md5=' || \
         coalesce(md5(string_agg(t::text, ',' ORDER BY bid)),'-') FROM pgbench_branches t",
    ),
    (
        "pgbench_tellers",
        "SELECT count(*) || ' sum=' || coalesce(sum(tbalance),0) || ' md5=' || \
         coalesce(md5(string_agg(t::text, ',' ORDER BY tid)),'-') FROM pgbench_tellers t",
    ),
    (
        "pgbench_history",
        "SELECT count(*) || ' sum=' || coalesce(sum(delta),0) || ' md5=' || \
         coalesce(md5(string_agg(t::text, ',' ORDER BY tid, bid, aid, delta, mtime, t::text)),'-') \
         FROM pgbench_history t",
    ),
];

/// Checksums of tables other tests create (pg_replay's `warmup`), looked up by
/// [`checksums_of`] when a test's sums name them.
pub const EXTRA_CHECKSUM_QUERIES: &[(&str, &str)] =
    &[("warmup", "SELECT count(*) || ' md5=' || coalesce(md5(string_agg(md5(t::text), '' ORDER BY g)),'-') FROM warmup t")];

pub fn checksums(s: &Server) -> R<Vec<(String, String)>> {
    CHECKSUM_QUERIES.iter().map(|(t, q)| Ok((t.to_string(), s.sql(q)?))).collect()
}

/// Checksums of `tables` (names from [`CHECKSUM_QUERIES`] or [`EXTRA_CHECKSUM_QUERIES`]).
pub fn checksums_of<'a>(s: &Server, tables: impl IntoIterator<Item = &'a str>) -> R<Vec<(String, String)>> {
    tables
        .into_iter()
        .map(|t| {
            let (_, q) = CHECKSUM_QUERIES
                .iter()
                .chain(EXTRA_CHECKSUM_QUERIES)
                .find(|(name, _)| *name == t)
                .ok_or_else(|| format!("no checksum query for table {t}"))?;
            Ok((t.to_string(), s.sql(q)?))
        })
        .collect()
}

/// End of WAL after a clean shutdown: end (MAXALIGN'd) of the shutdown checkpoint record, via pg_waldump
/// (on timeline `tli`: pg_waldump reads timeline 1 unless told otherwise).
pub fn wal_end_after_checkpoint(pg: &Pg, pg_wal: &Path, tli: u32, ckpt: u64, block_size: u64) -> R<u64> {
    let mut c = pg.cmd("pg_waldump");
    c.arg("-p").arg(pg_wal).arg("-t").arg(tli.to_string()).arg("-s").arg(fmt_lsn(ckpt));
    let out = run(&mut c)?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let recs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("rmgr:")).collect();
    let ctx = || format!("`{}`\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}", cmdline(&c));
    if recs.len() != 1 || !recs[0].contains("CHECKPOINT_SHUTDOWN") {
        return Err(format!("expected exactly one record (CHECKPOINT_SHUTDOWN) at the latest checkpoint: {}", ctx()));
    }
    let tot: u64 = recs[0]
        .split("len (rec/tot):")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.split('/').nth(1))
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| format!("cannot parse record length: {}", ctx()))?;
    let from_len = if (ckpt % block_size) + tot <= block_size { Some((ckpt + tot + 7) & !7) } else { None };
    let from_err = stderr.split("invalid record length at ").nth(1).and_then(|s| s.split(':').next()).and_then(parse_lsn);
    match (from_len, from_err) {
        (Some(a), Some(b)) if a != b => Err(format!("end of WAL: record length says {}, error says {}: {}", fmt_lsn(a), fmt_lsn(b), ctx())),
        (Some(a), _) => Ok(a),
        (None, Some(b)) => Ok(b),
        (None, None) => Err(format!("cannot determine the end of WAL: {}", ctx())),
    }
}

/// A standby's data directory from base backup `base`: copied (`cp -a`, ownership kept), its
/// `pg_wal` emptied (every WAL byte must come from the tool under test) and `standby.signal` written.
pub fn standby_data_from_base(base: &Path, data: &Path) -> R<()> {
    run_ok(cmd("cp", ["-a"]).arg(base).arg(data))?;
    let wal = data.join("pg_wal");
    for e in fs::read_dir(&wal).map_err(|e| e.to_string())?.flatten() {
        let p = e.path();
        let res = if p.is_dir() { fs::remove_dir_all(&p) } else { fs::remove_file(&p) };
        res.map_err(|e| format!("empty {}: {e}", wal.display()))?;
    }
    fs::write(data.join("standby.signal"), b"").map_err(|e| e.to_string())
}

pub fn append(path: &Path, text: &str) -> R<()> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new().append(true).open(path).map_err(|e| format!("open {}: {e}", path.display()))?;
    f.write_all(text.as_bytes()).map_err(|e| format!("append to {}: {e}", path.display()))
}

/// Remove ANSI escape sequences (colored log output).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' {
            if it.peek() == Some(&'[') {
                it.next();
                for d in it.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn indent(s: &str) -> String {
    s.lines().map(|l| format!("     | {l}")).collect::<Vec<_>>().join("\n")
}

