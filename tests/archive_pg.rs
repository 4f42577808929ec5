//! The archive against a real PostgreSQL: a primary under pgbench is followed by `walship send`
//! into `walship recv --archive-to s3://...` (SeaweedFS, zstd); after a clean stop, a fresh standby
//! whose ONLY source is `walship restore %f %p --from s3://... --prefetch 8` (no --dir, empty
//! pg_wal) replays to the end of the shutdown checkpoint with the primary's table checksums. Then
//! `walship verify s3://...` passes, and fails naming the spot after one object is deleted and
//! after one byte of another object is changed.
//!
//! The receiver keeps only the newest 32 MiB of segments locally (`--keep-local 32MiB`): older ones
//! are deleted once archived (checked). The segment holding the shutdown checkpoint is not complete:
//! it reaches the store as its `.partial` object once the durable position rests
//! (`--archive-partial-after`), and the standby restores it from there, so it replays to exactly the
//! end of the shutdown checkpoint with nothing after it.
//!
//! Needs PostgreSQL and SeaweedFS (skipped without them unless WALSHIP_REQUIRE_PG=1 / WALSHIP_REQUIRE_S3=1).
mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pg::*;
use common::s3::{self, Kind, S3Server, ACCESS_KEY_ID, BUCKET, SECRET_ACCESS_KEY};
use common::*;

const PRIMARY_PORT: u16 = 57311;
const STANDBY_PORT: u16 = 57312;
const PREFIX: &str = "pgarch";
const SEG: u64 = 16 << 20;
const SLOT: &str = "walship";

fn url() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

fn spawn_walship(ctx: &Ctx, server: &S3Server, name: &str, args: &[&str]) -> (ChildGuard, PathBuf) {
    let mut c = walship(args);
    server.env(&mut c);
    let log = ctx.log(name);
    (spawn_logged(name, c, &log), log)
}

fn wait_line(path: &Path, needle: &str, timeout: Duration) -> R<String> {
    poll_until(timeout, Duration::from_millis(100), || {
        fs::read_to_string(path).unwrap_or_default().lines().find(|l| l.contains(needle)).map(str::to_string)
    })
    .ok_or_else(|| format!("no {needle:?} in {} within {timeout:?}:\n{}", path.display(), tail_file(path, 30)))
}

/// The raw S3 client (object_store) for what walship never does: delete and overwrite objects.
struct Raw {
    s3: object_store::aws::AmazonS3,
    rt: tokio::runtime::Runtime,
}

impl Raw {
    fn new(server: &S3Server) -> Raw {
        let s3 = object_store::aws::AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_endpoint(server.endpoint())
            .with_allow_http(true)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .build()
            .unwrap();
        Raw { s3, rt: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap() }
    }
    fn delete(&self, key: &str) {
        use object_store::ObjectStore;
        self.rt.block_on(self.s3.delete(&key.into())).unwrap();
    }
    /// Overwrite `key` with its own body with one byte changed, keeping its metadata (checksum, compression).
    fn change_one_byte(&self, key: &str) {
        use object_store::ObjectStore;
        self.rt.block_on(async {
            let r = self.s3.get(&key.into()).await.unwrap();
            let attributes = r.attributes.clone();
            let mut body = r.bytes().await.unwrap().to_vec();
            let at = body.len() / 2;
            body[at] ^= 0x01;
            let opts = object_store::PutOptions { attributes, ..Default::default() };
            self.s3.put_opts(&key.into(), body.into(), opts).await.unwrap();
        });
    }
}

#[test]
fn standby_restores_only_from_the_archive_and_verify_names_damage() {
    let ctx = Ctx::new("archive-pg");
    let Some(pg) = Pg::for_test(ctx.dir.path()) else { return };
    let Some(server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    ctx.watch("seaweedfs", &server.log);
    if let Err(e) = run_test(&ctx, &pg, &server) {
        panic!("{e}");
    }
}

fn run_test(ctx: &Ctx, pg: &Pg, server: &S3Server) -> R<()> {
    let pgdir = ctx.path("pg");
    fs::create_dir_all(&pgdir).map_err(|e| e.to_string())?;
    pg.chown(&pgdir)?;
    let mut primary = pg.server(&pgdir, "primary", PRIMARY_PORT)?;
    ctx.watch("primary", &primary.log);
    primary.init(
        "archive_pg",
        "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\nwal_keep_size = 0\n\
         max_wal_size = 256MB\nmin_wal_size = 64MB\nsynchronous_commit = off\nlog_checkpoints = on",
    )?;
    // follow the primary: recv archives to the store (zstd), send follows with a slot
    let recv_dir = ctx.path("recv");
    let addr = format!("127.0.0.1:{}", free_port());
    let u = url();
    let (mut recv, recv_log) = spawn_walship(ctx, server, "recv", &[
        "recv", "--listen", &addr, "--dir", p(&recv_dir), "--insecure-no-auth", "--archive-to", &u,
        "--archive-compress", "zstd", "--archive-scan-interval", "200ms", "--archive-partial-after", "500ms",
        "--keep-local", "32MiB", "--retention-interval", "500ms",
    ]);
    let pg_wal = primary.data.join("pg_wal");
    let conninfo = primary.conninfo();
    let (mut send, send_log) = spawn_walship(ctx, server, "send", &[
        "send", "--pg-wal", p(&pg_wal), "--to", &addr, "--conninfo", &conninfo, "--slot", SLOT, "--insecure-no-auth",
    ]);
    wait_line(&send_log, "following a live", Duration::from_secs(30))?;
    let base = pgdir.join("base");
    let backup_start = primary.base_backup(&base)?;
    primary.pgbench(&["-i", "-s", "5", "-q"])?;
    primary.pgbench(&["-c", "2", "-j", "2", "-T", "5", "-n"])?;
    let sums = checksums(&primary)?;
    let (cd, end) = primary.clean_stop()?;
    wait_line(&send_log, "through its shutdown checkpoint", Duration::from_secs(60))?;
    let store = walship::archive::BlockingStore::new(&server.settings("")).map_err(|e| e.to_string())?;
    let sysid = cd.sysid;
    let folder = format!("{PREFIX}/{sysid}/00000001/");
    // Complete segments up to the one holding the end of WAL; that one as its `.partial` object.
    let (first_seg, end_seg) = (backup_start / SEG, end / SEG);
    let want: Vec<String> = (first_seg..end_seg).map(|s| format!("{folder}{}", seg_name(1, s, SEG))).collect();
    let mut want_all = want.clone();
    if end % SEG != 0 {
        want_all.push(format!("{folder}{}.partial", seg_name(1, end_seg, SEG)));
    }
    let archived = poll_until(Duration::from_secs(90), Duration::from_millis(250), || {
        let have: Vec<String> = store.list(&folder).ok()?.into_iter().map(|o| o.key).collect();
        want_all.iter().all(|k| have.contains(k)).then_some(have)
    })
    .ok_or_else(|| format!("{want_all:?} not archived within 90 s"))?;
    // The `.partial` object holds the WAL up to the end (uploaded again once the position rested there).
    let up_to = format!("archived the unfinished segment up to {}", walship::wal::Lsn(end));
    if end % SEG != 0 {
        wait_line(&recv_log, &up_to, Duration::from_secs(30))?;
    }
    let local = fs::read_dir(&recv_dir).map_err(|e| e.to_string())?.flatten().filter(|e| is_seg_name(&e.file_name().to_string_lossy())).count();
    println!("archived {} objects (the last one a .partial); {local} complete segments kept locally; replay target {}", archived.len(), fmt_lsn(end));
    if local >= want.len() {
        return Err(format!("--keep-local 32MiB deleted nothing: {local} local segments, {} archived", want.len()));
    }
    for g in [&mut send, &mut recv] {
        g.signal(libc::SIGTERM).map_err(|e| e.to_string())?;
        g.wait_timeout(Duration::from_secs(60)).map_err(|e| e.to_string())?;
    }
    fs::remove_dir_all(&recv_dir).map_err(|e| e.to_string())?; // nothing local to fall back on
    replay_from_the_archive(ctx, pg, server, &pgdir, &base, end, &sums)?;
    verify_and_damage(ctx, server, &folder, &want)
}

fn replay_from_the_archive(ctx: &Ctx, pg: &Pg, server: &S3Server, pgdir: &Path, base: &Path, end: u64, sums: &[(String, String)]) -> R<()> {
    let mut standby = pg.server(pgdir, "standby", STANDBY_PORT)?;
    ctx.watch("standby", &standby.log);
    standby_data_from_base(base, &standby.data)?;
    let exe: PathBuf = pg.restore_exe(ctx.dir.path())?;
    let restore = format!(
        "env AWS_ENDPOINT_URL={} AWS_ACCESS_KEY_ID={ACCESS_KEY_ID} AWS_SECRET_ACCESS_KEY={SECRET_ACCESS_KEY} AWS_REGION=us-east-1 \
         {} restore %f %p --from {} --prefetch 8",
        server.endpoint(),
        exe.display(),
        url()
    );
    append(
        &standby.data.join("postgresql.auto.conf"),
        &format!(
            "\nport = {STANDBY_PORT}\nunix_socket_directories = '{}'\nrestore_command = '{restore}'\nhot_standby = on\n\
             recovery_target_lsn = '{}'\nrecovery_target_inclusive = off\nrecovery_target_action = 'pause'\n",
            standby.sock.display(),
            fmt_lsn(end)
        ),
    )?;
    pg.chown(&standby.data)?;
    standby.pg_ctl_start(false)?;
    let reached = poll_until(Duration::from_secs(120), Duration::from_millis(250), || {
        standby.sql_quiet("SELECT pg_last_wal_replay_lsn()").ok().and_then(|s| parse_lsn(&s)).filter(|&l| l >= end)
    })
    .ok_or_else(|| standby.err(format!("the standby did not replay to {} within 120 s", fmt_lsn(end))))?;
    if reached != end {
        return Err(standby.err(format!("replayed to {}, the shutdown checkpoint ends at {}", fmt_lsn(reached), fmt_lsn(end))));
    }
    let got = checksums_of(&standby, sums.iter().map(|(t, _)| t.as_str()))?;
    if got != sums {
        return Err(standby.err(format!("checksums differ: primary {sums:?}, standby {got:?}")));
    }
    let log = fs::read_to_string(&standby.log).unwrap_or_default();
    let from_cache = log.lines().filter(|l| l.contains("restored from the prefetch cache")).count();
    let fetched = log.lines().filter(|l| l.contains("following segments prefetched")).count();
    println!("standby replayed to {} with equal checksums; {fetched} fetches, {from_cache} served from the prefetch cache", fmt_lsn(end));
    if from_cache == 0 || fetched == 0 {
        return Err(standby.err("recovery was not served from the prefetch cache"));
    }
    if log.contains(".tmp") {
        return Err(standby.err("a temp file name appears in the standby's log"));
    }
    standby.stop("fast")
}

fn verify(server: &S3Server) -> (bool, String) {
    let mut c: Command = walship(&["verify", &url()]);
    server.env(&mut c);
    c.stdout(Stdio::piped());
    let o = run(&mut c).unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn verify_and_damage(ctx: &Ctx, server: &S3Server, folder: &str, keys: &[String]) -> R<()> {
    let _ = ctx;
    let (ok, out) = verify(server);
    if !ok {
        return Err(format!("verify of the intact archive failed:\n{out}"));
    }
    let raw = Raw::new(server);
    // One object deleted: the gap is named.
    let gone = &keys[keys.len() / 2];
    let gone_name = gone.strip_prefix(folder).unwrap();
    let store = walship::archive::BlockingStore::new(&server.settings("")).map_err(|e| e.to_string())?;
    let kept = store.get_verified(gone).map_err(|e| e.to_string())?.ok_or("object vanished")?;
    raw.delete(gone);
    let (ok, out) = verify(server);
    if ok || !out.lines().any(|l| l.contains(gone_name) && l.contains("missing")) {
        return Err(format!("verify after deleting {gone}: ok={ok}, does not name {gone_name} as missing:\n{out}"));
    }
    println!("after a delete: {}", out.lines().last().unwrap_or(""));
    store.put_create(gone, kept.to_vec(), "test").map_err(|e| e.to_string())?;
    // One byte of another object changed: that object is named.
    let changed = &keys[keys.len() / 2 + 1];
    raw.change_one_byte(changed);
    let (ok, out) = verify(server);
    if ok || !out.lines().any(|l| l.contains(changed.as_str()) && l.contains("damaged")) {
        return Err(format!("verify after changing one byte of {changed}: ok={ok}, does not name it as damaged:\n{out}"));
    }
    println!("after a changed byte: {}", out.lines().last().unwrap_or(""));
    Ok(())
}
