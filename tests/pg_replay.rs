//! Real PostgreSQL end-to-end replay test, run the way an operator would use walship:
//!
//! 1. initdb + start a primary (wal_level=replica, unix socket in a private temp dir).
//! 2. Generate some throw-away WAL (so later checkpoints recycle old segments into future names),
//!    create a physical slot (keeps the WAL from the backup on), `pg_basebackup -X none` (no WAL in it).
//! 3. pgbench -i -s 10, CHECKPOINT, pgbench runs with a CHECKPOINT in between (several 16 MiB segments).
//! 4. Checksums of every table on the primary.
//! 5. Stop the primary cleanly; pg_controldata (latest checkpoint, system id); the exact end of WAL from
//!    pg_waldump (end of the shutdown checkpoint record).
//! 6. `walship recv` + `walship send --once` of the stopped primary's pg_wal; compare received files with
//!    the primary's byte for byte (complete segments; the `.partial` up to end_lsn, zeros after).
//! 7. A standby from the base backup with an EMPTY pg_wal, `restore_command = 'walship restore ...'`
//!    (`tests/common/replay.rs`'s `replay_and_verify`, as every real-PostgreSQL test ends).
//! 8. Wait until it replayed to end_lsn exactly, compare checksums with the primary's.
//! 9. Stop everything (guards stop servers with `-m immediate` and kill walship on any failure).
//!
//! Needs PostgreSQL (`/usr/lib/postgresql/<major>/bin`, newest wins; `WALSHIP_PG_BIN` overrides). Without it
//! the test prints "SKIP: PostgreSQL not installed" and passes, unless `WALSHIP_REQUIRE_PG=1`.
//! As root, PostgreSQL programs run as the `postgres` OS user via `runuser`.
//!
//! Env knobs: `WALSHIP_KEEP_TMP=1` keeps the temp dir (path printed); `WALSHIP_PG_SHIP=copy` replaces
//! step 6 by a plain file copy + `cp` restore_command (self-check of the PostgreSQL steps only: it does
//! NOT test walship and says so loudly).
//!
//! Run: `cargo test --test pg_replay -- --nocapture`.

mod common;

use common::pg::*;
use common::replay::{replay_and_verify, Replay};
use common::*;
use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const PRIMARY_PORT: u16 = 5491;
const STANDBY_PORT: u16 = 5492;
const SHIP_TIMEOUT: Duration = Duration::from_secs(180);
/// Segments filled before the slot exists: later checkpoints recycle them into future segment names, so the
/// stopped primary's pg_wal ends with files that hold stale pages past the end of valid WAL.
const WARMUP_SWITCHES: usize = 24;

/// The tables whose checksums must be equal on the primary and the replayed standby.
const CHECKSUM_TABLES: [&str; 5] = ["pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history", "warmup"];

// ---------------------------------------------------------------------------------------------------------
// The test

struct Timings(Vec<(String, Duration)>);

impl Timings {
    fn step<T>(&mut self, name: &str, f: impl FnOnce() -> R<T>) -> R<T> {
        println!("== step {name}");
        let t0 = Instant::now();
        let r = f().map_err(|e| format!("step {name} FAILED: {e}"));
        let dt = t0.elapsed();
        println!("   ({name}: {:.2} s{})", dt.as_secs_f64(), if r.is_err() { ", failed" } else { "" });
        self.0.push((name.to_string(), dt));
        r
    }
    fn report(&self) -> String {
        let mut s = String::from("phase timings:\n");
        for (n, d) in &self.0 {
            let _ = writeln!(s, "  {:>8.2} s  {n}", d.as_secs_f64());
        }
        let total: Duration = self.0.iter().map(|x| x.1).sum();
        let _ = write!(s, "  {:>8.2} s  total", total.as_secs_f64());
        s
    }
}

/// What the ship step produced (from `--report-json`, or the copy self-check).
#[derive(Debug)]
struct ShipReport {
    start_lsn: u64,
    end_lsn: u64,
    json: String,
}

struct Env {
    pg: Pg,
    tmp: TestDir,
    walship: PathBuf,
    copy_mode: bool,
    recv_log: PathBuf,
    send_log: PathBuf,
}

#[test]
fn pg_replay_end_to_end() {
    let tmp = TestDir::new("pg-replay");
    let Some(pg) = Pg::for_test(tmp.path()) else { return };
    let copy_mode = std::env::var("WALSHIP_PG_SHIP").as_deref() == Ok("copy");
    if copy_mode {
        println!("!!! WALSHIP_PG_SHIP=copy: step 6 is a plain file copy; this run does NOT test walship !!!");
    }
    println!("PostgreSQL bin: {}  temp dir: {}  as_user: {:?}", pg.bin.display(), tmp.path().display(), pg.as_user);
    let env = Env {
        pg,
        recv_log: tmp.join("walship-recv.log"),
        send_log: tmp.join("walship-send.log"),
        tmp,
        walship: walship_bin(),
        copy_mode,
    };
    let mut t = Timings(Vec::new());
    let t0 = Instant::now();
    let res = run_test(&env, &mut t);
    println!("{}", t.report());
    println!("wall time: {:.2} s", t0.elapsed().as_secs_f64());
    if let Err(e) = res {
        panic!(
            "{e}\n--- walship recv stderr tail ({}) ---\n{}\n--- walship send output tail ({}) ---\n{}\n(temp dir {}; WALSHIP_KEEP_TMP=1 keeps it)",
            env.recv_log.display(),
            tail_file(&env.recv_log, 30),
            env.send_log.display(),
            tail_file(&env.send_log, 30),
            env.tmp.path().display()
        );
    }
}

fn run_test(env: &Env, t: &mut Timings) -> R<()> {
    let pg = &env.pg;
    let root = env.tmp.path();
    let pgdir = root.join("pg"); // everything the servers touch, owned by postgres
    let recv_dir = root.join("recv");
    fs::create_dir_all(&pgdir).map_err(|e| e.to_string())?;
    pg.chown(&pgdir)?;

    let mut primary = pg.server(&pgdir, "primary", PRIMARY_PORT)?;

    // 1. initdb + start the primary -----------------------------------------------------------------------
    t.step("1 initdb + start primary", || {
        primary.init(
            "pg_replay test",
            "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nwal_keep_size = 0\n\
             max_wal_size = 1GB\nmin_wal_size = 80MB\nsynchronous_commit = off\nlog_checkpoints = on",
        )?;
        println!("   {}", primary.sql("SELECT version()")?);
        Ok(())
    })?;

    // 2. throw-away WAL, slot, base backup without WAL -------------------------------------------------------
    let base = pgdir.join("base");
    let backup_start = t.step("2 warm-up WAL + slot + pg_basebackup -X none", || {
        // WAL before the slot: later checkpoints may remove/recycle these segments (recycled files get future
        // names and keep stale pages: walship must find the end of valid WAL, not the end of the files).
        // Keep every segment from here on (WAL retention a real shipper relies on: safety rule 2). Created
        // before the warm-up so that the backup's checkpoint cannot recycle the warm-up segments yet.
        primary.sql("SELECT pg_create_physical_replication_slot('walship_pg_replay', true)")?;
        primary.sql("CREATE TABLE warmup AS SELECT g, repeat(md5(g::text), 16) AS pad FROM generate_series(1, 20000) g")?;
        primary.sql("UPDATE warmup SET pad = reverse(pad)")?;
        for _ in 0..WARMUP_SWITCHES {
            primary.sql("INSERT INTO warmup SELECT -1, 'x'; DELETE FROM warmup WHERE g = -1; SELECT pg_switch_wal()")?;
        }
        let start = primary.base_backup(&base)?;
        // Release the warm-up WAL (only the backup's start onwards is needed): the next checkpoint recycles
        // those segments into future names, which then sit past the end of valid WAL.
        primary.sql(&format!("SELECT pg_replication_slot_advance('walship_pg_replay', '{}')", fmt_lsn(start)))?;
        println!("   backup START WAL LOCATION {}", fmt_lsn(start));
        Ok(start)
    })?;

    // 3. pgbench ------------------------------------------------------------------------------------------
    let pgbench = |args: &[&str]| primary.pgbench(args);
    t.step("3 pgbench -i -s 10 + runs with CHECKPOINTs", || {
        pgbench(&["-i", "-s", "10", "-q"])?;
        primary.sql("CHECKPOINT")?;
        for (i, secs) in ["3", "3"].iter().enumerate() {
            let out = pgbench(&["-c", "2", "-j", "2", "-T", secs, "-n"])?;
            let tps = out.lines().find(|l| l.starts_with("tps")).unwrap_or("").to_string();
            println!("   pgbench run {}: {tps}", i + 1);
            if i == 0 {
                primary.sql("CHECKPOINT")?;
            }
        }
        let lsn = parse_lsn(&primary.sql("SELECT pg_current_wal_lsn()")?).ok_or("bad pg_current_wal_lsn")?;
        let mb = (lsn - backup_start) as f64 / 1048576.0;
        println!("   WAL since backup start: {mb:.1} MiB (now at {})", fmt_lsn(lsn));
        if lsn - backup_start < 4 * 16 * 1048576 {
            return Err(format!("only {mb:.1} MiB of WAL since the backup: want > 4 segments"));
        }
        Ok(())
    })?;

    // 4. checksums on the primary -----------------------------------------------------------------------------
    let sums = t.step("4 checksums on primary", || {
        let s = checksums_of(&primary, CHECKSUM_TABLES)?;
        for (tbl, v) in &s {
            println!("   {tbl}: {v}");
        }
        Ok(s)
    })?;

    // 5. clean stop + control data + exact end of WAL ------------------------------------------------------------
    let (cd, expected_end) = t.step("5 stop primary + pg_controldata + pg_waldump end of WAL", || {
        let (cd, end) = primary.clean_stop()?;
        println!(
            "   system id {}  latest checkpoint {}  end of WAL {}  seg {} B  block {} B  tli {}",
            cd.sysid,
            fmt_lsn(cd.checkpoint),
            fmt_lsn(end),
            cd.seg_size,
            cd.block_size,
            cd.tli
        );
        Ok((cd, end))
    })?;
    let primary_wal = primary.data.join("pg_wal");

    // 6. ship -----------------------------------------------------------------------------------------------
    let report = t.step("6 walship recv + send --once + compare bytes", || {
        fs::create_dir_all(&recv_dir).map_err(|e| e.to_string())?;
        let report = if env.copy_mode {
            copy_ship(&primary_wal, &recv_dir, &cd, expected_end)?
        } else {
            walship_ship(env, &primary_wal, &recv_dir)?
        };
        println!("   report: {}", report.json.trim());
        check_received(&primary_wal, &recv_dir, &cd, &report, expected_end, backup_start)?;
        Ok(report)
    })?;

    // 7. a standby from the base backup, WAL only through restore_command, replays to end_lsn ---------------------
    let standby = t.step("7 standby from base backup with restore_command, replays to end_lsn + checksums match", || {
        if report.end_lsn <= cd.checkpoint {
            return Err(format!(
                "end_lsn {} not past the primary's latest checkpoint {}",
                fmt_lsn(report.end_lsn),
                fmt_lsn(cd.checkpoint)
            ));
        }
        // Every segment from the backup's start to the end, never a `.partial` name.
        let want_restored = (backup_start / cd.seg_size..=(report.end_lsn - 1) / cd.seg_size).map(|s| seg_name(cd.tli, s, cd.seg_size)).collect();
        let replay = Replay {
            standby: pg.server(&pgdir, "standby", STANDBY_PORT)?,
            base: &base,
            restore_exe: restore_exe(env)?,
            recv_dir: &recv_dir,
            extra_conf: "log_min_messages = info",
            target: report.end_lsn,
            sums: &sums,
            want_restored,
        };
        replay_and_verify(replay, &|m| println!("   {m}"))
    })?;

    // 8. the standby (stopped by the step above) is a copy of the same cluster ------------------------------------------
    t.step("8 standby system id", || {
        let scd = standby.controldata()?;
        if scd.sysid != cd.sysid {
            return Err(format!("standby system id {} != primary {}", scd.sysid, cd.sysid));
        }
        Ok(())
    })?;
    Ok(())
}

/// What the standby's restore_command runs, called as `EXE restore %f %p --dir DIR`: walship, or
/// with `WALSHIP_PG_SHIP=copy` a script that copies the file (or its `.partial`) instead.
fn restore_exe(env: &Env) -> R<PathBuf> {
    if !env.copy_mode {
        return env.pg.restore_exe(env.tmp.path());
    }
    let dir = env.tmp.join("bin");
    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    let exe = dir.join("copy-restore");
    fs::write(&exe, "#!/bin/sh\n# restore %f %p --dir DIR\ncp \"$5/$2\" \"$3\" 2>/dev/null || cp \"$5/$2.partial\" \"$3\"\n")
        .map_err(|e| format!("write {}: {e}", exe.display()))?;
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
    Ok(exe)
}

/// Step 6 for real: `walship recv` until SIGTERM, `walship send --once`.
fn walship_ship(env: &Env, pg_wal: &Path, recv_dir: &Path) -> R<ShipReport> {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let report_path = env.tmp.join("report.json");
    let file = |p: &Path| fs::File::create(p).map_err(|e| format!("create {}: {e}", p.display()));
    // Authenticated, as an operator would run it.
    let key = env.tmp.join("walship.key");
    fs::write(&key, "pg-replay-test-shared-key-0123456789\n").map_err(|e| format!("write {}: {e}", key.display()))?;

    let mut rc = Command::new(&env.walship);
    rc.args(["recv", "--listen", &addr, "--dir"]).arg(recv_dir).arg("--auth-key-file").arg(&key);
    // recv logs on stderr: that goes to recv_log (the file a failure message tails).
    rc.stdin(Stdio::null());
    rc.stdout(file(&env.tmp.join("walship-recv.stdout"))?).stderr(file(&env.recv_log)?);
    println!("   $ {}", cmdline(&rc));
    let mut recv = ChildGuard::spawn("walship recv", &mut rc).map_err(|e| format!("spawn `{}`: {e}", cmdline(&rc)))?;

    let mut sc = Command::new(&env.walship);
    sc.arg("send").arg("--pg-wal").arg(pg_wal).args(["--to", &addr, "--once", "--retry-for", "30s", "--report-json"]);
    sc.arg(&report_path).arg("--auth-key-file").arg(&key);
    sc.stdin(Stdio::null()).stdout(file(&env.send_log)?).stderr(
        fs::OpenOptions::new().append(true).open(&env.send_log).map_err(|e| e.to_string())?,
    );
    println!("   $ {}", cmdline(&sc));
    let t0 = Instant::now();
    let mut send = ChildGuard::spawn("walship send", &mut sc).map_err(|e| format!("spawn `{}`: {e}", cmdline(&sc)))?;
    let st = send.wait_timeout(SHIP_TIMEOUT).map_err(|e| e.to_string())?;
    let send_secs = t0.elapsed().as_secs_f64();
    let send_out = fs::read_to_string(&env.send_log).unwrap_or_default();
    match st {
        None => return Err(format!("walship send still running after {SHIP_TIMEOUT:?} (killed)")),
        Some(st) if !st.success() => {
            return Err(format!("`{}` exited with {st}; output:\n{}", cmdline(&sc), tail_str(&send_out, 40)))
        }
        Some(_) => {}
    }
    println!("   send exited 0 after {send_secs:.2} s; stdout/stderr:\n{}", indent(&tail_str(&send_out, 15)));
    if let Ok(Some(st)) = recv.try_wait() {
        return Err(format!("walship recv exited early with {st}"));
    }
    recv.signal(libc::SIGTERM).map_err(|e| format!("SIGTERM walship recv: {e}"))?;
    match recv.wait_timeout(Duration::from_secs(30)).map_err(|e| e.to_string())? {
        None => return Err("walship recv did not exit within 30 s of SIGTERM".into()),
        Some(st) if !st.success() => return Err(format!("walship recv exited with {st} after SIGTERM (want 0)")),
        Some(_) => {}
    }
    println!("   recv exited 0 after SIGTERM; stderr tail:\n{}", indent(&tail_file(&env.recv_log, 8)));

    let json = fs::read_to_string(&report_path).map_err(|e| format!("read --report-json {}: {e}", report_path.display()))?;
    let lsn = |k: &str| -> R<u64> {
        json_field(&json, k).and_then(|s| parse_lsn(&s)).ok_or_else(|| format!("report JSON has no valid `{k}`: {json}"))
    };
    let r = ShipReport { start_lsn: lsn("start_lsn")?, end_lsn: lsn("end_lsn")?, json: json.clone() };
    for k in ["bytes", "segments", "seconds", "mb_per_s"] {
        if json_field(&json, k).is_none() {
            return Err(format!("report JSON lacks `{k}`: {json}"));
        }
    }
    if let Some(b) = json_field(&json, "bytes").and_then(|s| s.parse::<u64>().ok()) {
        if b != r.end_lsn - r.start_lsn {
            println!("   note: report bytes {b} != end_lsn - start_lsn {}", r.end_lsn - r.start_lsn);
        }
    }
    Ok(r)
}

/// Step 6 self-check (`WALSHIP_PG_SHIP=copy`): what the receiver should produce, made by copying.
fn copy_ship(pg_wal: &Path, recv_dir: &Path, cd: &ControlData, end: u64) -> R<ShipReport> {
    let segs = primary_segments(pg_wal)?;
    let first = segs.first().ok_or("no segments in primary pg_wal")?;
    let first_no = segno_of(first, cd.seg_size);
    let end_seg = end / cd.seg_size;
    for s in first_no..=end_seg {
        let name = seg_name(cd.tli, s, cd.seg_size);
        let mut data = fs::read(pg_wal.join(&name)).map_err(|e| format!("read {name}: {e}"))?;
        if s == end_seg {
            let off = (end % cd.seg_size) as usize;
            if off == 0 {
                break;
            }
            data[off..].fill(0);
            fs::write(recv_dir.join(format!("{name}.partial")), &data).map_err(|e| e.to_string())?;
        } else {
            fs::write(recv_dir.join(&name), &data).map_err(|e| e.to_string())?;
        }
    }
    let start = first_no * cd.seg_size;
    Ok(ShipReport {
        start_lsn: start,
        end_lsn: end,
        json: format!("{{\"copy\":true,\"start_lsn\":\"{}\",\"end_lsn\":\"{}\"}}", fmt_lsn(start), fmt_lsn(end)),
    })
}

fn primary_segments(pg_wal: &Path) -> R<Vec<String>> {
    let mut v: Vec<String> = fs::read_dir(pg_wal)
        .map_err(|e| format!("read_dir {}: {e}", pg_wal.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| is_seg_name(n))
        .collect();
    v.sort();
    Ok(v)
}

fn segno_of(name: &str, seg_size: u64) -> u64 {
    let hi = u64::from_str_radix(&name[8..16], 16).unwrap();
    let lo = u64::from_str_radix(&name[16..24], 16).unwrap();
    hi * (0x1_0000_0000 / seg_size) + lo
}

/// Received directory vs the primary's pg_wal: names, bytes, zero padding, long page headers.
fn check_received(pg_wal: &Path, recv: &Path, cd: &ControlData, r: &ShipReport, expected_end: u64, backup_start: u64) -> R<()> {
    if r.end_lsn != expected_end {
        return Err(format!(
            "report end_lsn {} != end of the shutdown checkpoint record {} (pg_waldump)",
            fmt_lsn(r.end_lsn),
            fmt_lsn(expected_end)
        ));
    }
    if r.start_lsn > backup_start {
        return Err(format!("report start_lsn {} is after the base backup's start {}", fmt_lsn(r.start_lsn), fmt_lsn(backup_start)));
    }
    let segs = primary_segments(pg_wal)?;
    println!(
        "   primary pg_wal: {} segment files {} .. {} (files after the end are recycled/preallocated)",
        segs.len(),
        segs.first().map(String::as_str).unwrap_or("-"),
        segs.last().map(String::as_str).unwrap_or("-")
    );
    let end_name = seg_name(cd.tli, r.end_lsn / cd.seg_size, cd.seg_size);
    let beyond: Vec<&String> = segs.iter().filter(|n| **n > end_name).collect();
    println!("   {} segment files past the end segment {end_name} (recycled/preallocated; must not be shipped)", beyond.len());
    if let Some(f) = segs.first() {
        let oldest = segno_of(f, cd.seg_size) * cd.seg_size;
        if r.start_lsn != oldest {
            println!("   note: start_lsn {} != start of the oldest segment file {f} ({})", fmt_lsn(r.start_lsn), fmt_lsn(oldest));
        }
    }
    let mut names: Vec<String> = fs::read_dir(recv)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let first_seg = r.start_lsn / cd.seg_size;
    let end_seg = r.end_lsn / cd.seg_size;
    let end_off = r.end_lsn % cd.seg_size;
    let mut want: Vec<String> = (first_seg..end_seg).map(|s| seg_name(cd.tli, s, cd.seg_size)).collect();
    let partial = (end_off != 0).then(|| format!("{}.partial", seg_name(cd.tli, end_seg, cd.seg_size)));
    want.extend(partial.clone());
    // WAL-looking names outside the shipped range are errors; other files (e.g. the receiver's own state
    // file) are listed but allowed: PostgreSQL only ever asks for WAL names.
    let looks_wal = |n: &str| is_seg_name(n.trim_end_matches(".partial")) || n.ends_with(".history");
    let others: Vec<&String> = names.iter().filter(|n| !looks_wal(n)).collect();
    if !others.is_empty() {
        println!("   note: non-WAL files in the receiver dir: {others:?}");
    }
    let unexpected: Vec<&String> = names.iter().filter(|n| looks_wal(n) && !want.contains(n)).collect();
    let missing: Vec<&String> = want.iter().filter(|n| !names.contains(n)).collect();
    if !missing.is_empty() || !unexpected.is_empty() {
        return Err(format!("receiver dir {}: missing {missing:?}, unexpected {unexpected:?} (have {names:?})", recv.display()));
    }
    if want.len() < 4 {
        return Err(format!("only {} files shipped ({want:?}); the test wants several complete segments + a .partial", want.len()));
    }
    let mut bytes = 0u64;
    for (i, name) in want.iter().enumerate() {
        let got = fs::read(recv.join(name)).map_err(|e| format!("read received {name}: {e}"))?;
        let base = name.trim_end_matches(".partial");
        let src = fs::read(pg_wal.join(base)).map_err(|e| format!("read primary {base}: {e}"))?;
        if got.len() as u64 != cd.seg_size {
            return Err(format!("received {name} is {} bytes, want {} (full segment size)", got.len(), cd.seg_size));
        }
        let upto = if name.ends_with(".partial") { end_off as usize } else { got.len() };
        if let Some(at) = got[..upto].iter().zip(&src[..upto]).position(|(a, b)| a != b) {
            return Err(format!("received {name} differs from the primary's {base} at byte {at} (of {upto} compared)"));
        }
        if let Some(at) = got[upto..].iter().position(|&b| b != 0) {
            return Err(format!("received {name} has non-zero byte at {} after end_lsn offset {upto}", upto + at));
        }
        // Long page header: xlp_sysid at 24, xlp_seg_size at 32, xlp_xlog_blcksz at 36.
        let sysid = u64::from_le_bytes(got[24..32].try_into().unwrap());
        let segsz = u32::from_le_bytes(got[32..36].try_into().unwrap()) as u64;
        if sysid != cd.sysid || segsz != cd.seg_size {
            return Err(format!("received {name}: long header sysid {sysid} seg_size {segsz}, want {} {}", cd.sysid, cd.seg_size));
        }
        bytes += upto as u64;
        let _ = i;
    }
    println!(
        "   received {} files ({} complete + {}), {:.1} MiB of WAL, byte-identical to the primary; zero padding after end_lsn",
        want.len(),
        want.len() - partial.iter().count(),
        partial.as_deref().unwrap_or("no .partial"),
        bytes as f64 / 1048576.0
    );
    Ok(())
}
