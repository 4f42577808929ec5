//! Retention against a real S3 server (SeaweedFS, `weed mini`): `walship recv --keep-local`
//! deletes only archived segments beyond the policy and below the floors, a receiver restarted
//! after deletes resumes, nothing is deleted while the store is down or refuses writes, and
//! `walship prune s3://...` keeps the same rules. Plus a real PostgreSQL base backup whose `.backup`
//! file the sender ships while it follows the server.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::s3::{self, Kind, S3Server, BUCKET};
use common::*;
use walship::archive::BlockingStore;

const SEG: u64 = 1 << 20;
/// gen-wal's default system identifier.
const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;
const PREFIX: &str = "ret/wal";

fn gen_wal_in(ctx: &Ctx, dir: &str, wal_bytes: &str) -> PathBuf {
    let d = ctx.path(dir);
    run_ok(&mut walship(&["gen-wal", "--dir", p(&d), "--wal-bytes", wal_bytes, "--seg-size", &SEG.to_string()])).unwrap_or_else(|e| panic!("{e}"));
    d
}

struct Recv {
    guard: ChildGuard,
    log: PathBuf,
    metrics: u16,
}

/// A receiver archiving to `archive` (None: no archive) with `extra` flags.
fn start_recv(ctx: &Ctx, server: &S3Server, archive: Option<&str>, dst: &Path, port: u16, extra: &[&str]) -> Recv {
    let listen = format!("127.0.0.1:{port}");
    let metrics = free_port();
    let metrics_listen = format!("127.0.0.1:{metrics}");
    let mut args = vec!["recv", "--listen", &listen, "--dir", p(dst), "--metrics-listen", &metrics_listen, "--retention-interval", "200ms"];
    if let Some(a) = archive {
        args.extend_from_slice(&["--archive-to", a, "--archive-scan-interval", "200ms"]);
    }
    args.extend_from_slice(extra);
    let (guard, log) = common::s3::spawn_recv(ctx, server, &args);
    Recv { guard, log, metrics }
}

impl Recv {
    fn stop(mut self) {
        self.guard.signal(libc::SIGTERM).unwrap();
        let st = self.guard.wait_timeout(Duration::from_secs(30)).unwrap().expect("receiver exits after SIGTERM");
        assert_eq!(st.code(), Some(0), "receiver exit: {st}\n{}", tail_file(&self.log, 30));
    }
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// One sample of `walship_NAME` from /metrics (counters carry `_total`).
    fn metric(&self, name: &str) -> Option<f64> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics)).ok()?;
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let want = format!("walship_{name} ");
        text.lines().find_map(|l| l.strip_prefix(&want)).and_then(|v| v.trim().parse().ok())
    }
}

fn send(ctx: &Ctx, src: &Path, port: u16) {
    let to = format!("127.0.0.1:{port}");
    let log = ctx.log("send");
    let mut g = spawn_logged("send", walship(&["send", "--pg-wal", p(src), "--to", &to, "--once", "--retry-for", "30s"]), &log);
    let st = g.wait_timeout(Duration::from_secs(120)).unwrap().expect("sender exits");
    assert_eq!(st.code(), Some(0), "sender failed:\n{}", tail_file(&log, 30));
}

fn segment_names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir).unwrap().flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| is_seg_name(n)).collect()
}

/// The segments of a gen-wal source the receiver completes: all but the last (where the WAL ends,
/// a `.partial` at the receiver).
fn complete_source_segments(src: &Path) -> BTreeSet<String> {
    let mut all = segment_names(src);
    all.pop_last();
    all
}

fn bucket_names(store: &BlockingStore) -> BTreeSet<String> {
    store
        .list(&format!("{PREFIX}/{SYSTEM_ID}/00000001/"))
        .unwrap_or_default()
        .into_iter()
        .map(|o| o.key.rsplit('/').next().unwrap().to_string())
        .collect()
}

fn key_of(name: &str) -> String {
    format!("{PREFIX}/{SYSTEM_ID}/{}/{name}", &name[..8])
}

fn segno(name: &str) -> u64 {
    u64::from_str_radix(&name[8..16], 16).unwrap() * (0x1_0000_0000 / SEG) + u64::from_str_radix(&name[16..24], 16).unwrap()
}

/// A backup history file as `pg_backup_stop()` writes it, for a backup that started in segment `segno`.
fn backup_file(dir: &Path, segno: u64) -> String {
    let name = format!("{}.00000028.backup", seg_name(1, segno, SEG));
    let start = fmt_lsn(segno * SEG + 0x28);
    let content = format!(
        "START WAL LOCATION: {start} (file {seg})\nSTOP WAL LOCATION: {start} (file {seg})\nCHECKPOINT LOCATION: {start}\n\
         BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-12-01 00:00:00 UTC\nLABEL: t\nSTART TIMELINE: 1\n\
         STOP TIME: 2026-12-01 00:00:01 UTC\nSTOP TIMELINE: 1\n",
        seg = seg_name(1, segno, SEG)
    );
    fs::write(dir.join(&name), content).unwrap();
    name
}

/// Every name in `deleted` is in the store with the bytes of `src`'s file of that name.
fn all_in_store(store: &BlockingStore, src: &Path, deleted: &BTreeSet<String>) {
    for n in deleted {
        let got = store.get_verified(&key_of(n)).unwrap_or_else(|e| panic!("{n}: {e}")).unwrap_or_else(|| panic!("{n} deleted locally but not in the store"));
        assert!(got.as_ref() == fs::read(src.join(n)).unwrap().as_slice(), "{n}: the store's copy differs");
    }
}

/// `--keep-local 3MiB` with a `.backup` floor at segment 8: the archived segments below the floor go,
/// the rest stays; a receiver restarted after the deletes resumes where it was, and the archive
/// verifies whole. Then `walship prune` (dry run, then for real) under the same floor.
#[test]
fn keep_local_deletes_archived_segments_below_the_floor_and_restart_resumes() {
    let ctx = Ctx::new("retention-local");
    let Some(server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    ctx.watch("seaweedfs", &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    // gen-wal is deterministic: the 24 MiB backlog continues the 16 MiB one byte for byte.
    let first = gen_wal_in(&ctx, "first", "16MiB");
    let second = gen_wal_in(&ctx, "second", "24MiB");
    let dst = ctx.path("dst");
    fs::create_dir_all(&dst).unwrap();
    let first_segs = complete_source_segments(&first);
    let lowest = first_segs.iter().map(|n| segno(n)).min().unwrap();
    let backup = backup_file(&dst, lowest + 8);
    let port = free_port();
    let archive = format!("s3://{BUCKET}/{PREFIX}");
    let recv = start_recv(&ctx, &server, Some(&archive), &dst, port, &["--keep-local", "3MiB"]);
    send(&ctx, &first, port);
    let want_deleted: BTreeSet<String> = first_segs.iter().filter(|n| segno(n) < lowest + 8).cloned().collect();
    let done = poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
        let local = segment_names(&dst);
        want_deleted.iter().all(|n| !local.contains(n)).then_some(local)
    });
    let local = done.unwrap_or_else(|| panic!("retention did not delete {want_deleted:?}:\n{}", tail_file(&recv.log, 30)));
    // Only those: the floor keeps segment 8 and everything after it, though beyond 3 MiB.
    let kept: BTreeSet<String> = first_segs.difference(&want_deleted).cloned().collect();
    assert!(kept.iter().all(|n| local.contains(n)), "a segment at/after the floor was deleted: {local:?}");
    assert!(dst.join(&backup).exists(), "the .backup file was deleted");
    all_in_store(&store, &first, &want_deleted);
    let text = recv.log_text();
    let line = text.lines().find(|l| l.contains("retention deleted")).unwrap_or_else(|| panic!("no delete logged:\n{text}"));
    assert!(line.contains("archived") && line.contains("floor"), "the delete line gives no reason: {line}");
    assert_eq!(recv.metric("recv_retention_deleted_segments_total"), Some(want_deleted.len() as f64));
    assert_eq!(recv.metric("recv_retention_floor_lsn"), Some(((lowest + 8) * SEG + 0x28) as f64));
    recv.stop();
    // Restarted over the thinned directory: it resumes after its newest segment.
    let recv = start_recv(&ctx, &server, Some(&archive), &dst, port, &["--keep-local", "3MiB"]);
    send(&ctx, &second, port);
    let all: BTreeSet<String> = complete_source_segments(&second);
    let archived = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let have = bucket_names(&store);
        all.iter().all(|n| have.contains(n)).then_some(())
    });
    assert!(archived.is_some(), "not all of the WAL reached the archive:\n{}", tail_file(&recv.log, 30));
    assert!(bucket_names(&store).contains(&backup), "the .backup file was not archived");
    let local = segment_names(&dst);
    assert!(all.iter().filter(|n| segno(n) >= lowest + 8).all(|n| local.contains(n) || bucket_names(&store).contains(n)));
    recv.stop();
    for n in segment_names(&dst) {
        assert!(fs::read(dst.join(&n)).unwrap() == fs::read(second.join(&n)).unwrap(), "{n} differs from the source");
    }
    prune_keeps_the_floor(&ctx, &server, &store, &all, lowest);
}

fn prune(server: &S3Server, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["prune"];
    all.extend_from_slice(args);
    let mut c: Command = walship(&all);
    server.env(&mut c);
    let out = c.output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

/// The archive holds every segment of `all` and a `.backup` at segment `lowest + 8`.
fn prune_keeps_the_floor(_ctx: &Ctx, server: &S3Server, store: &BlockingStore, all: &BTreeSet<String>, lowest: u64) {
    let target = format!("s3://{BUCKET}/{PREFIX}");
    let before = bucket_names(store);
    // --before the 4th segment's end, dry run: says what it would delete, deletes nothing.
    let cut = fmt_lsn((lowest + 4) * SEG);
    let (code, out, err) = prune(server, &[&target, "--before", &cut, "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out.lines().filter(|l| l.starts_with("would delete")).count(), 4, "{out}");
    assert!(out.contains("keeps") && out.contains("history files"), "{out}");
    assert_eq!(bucket_names(store), before, "a dry run deleted something");
    // --older-than 1s with --keep-from at segment 12: the lower floor, the backup's (segment 8), binds.
    std::thread::sleep(Duration::from_millis(1100));
    let keep_from = fmt_lsn((lowest + 12) * SEG);
    let (code, out, err) = prune(server, &[&target, "--older-than", "1s", "--keep-from", &keep_from]);
    assert_eq!(code, 0, "{out}{err}");
    let after = bucket_names(store);
    let gone: BTreeSet<String> = before.difference(&after).cloned().collect();
    let want: BTreeSet<String> = all.iter().filter(|n| segno(n) < lowest + 8).cloned().collect();
    assert_eq!(gone, want, "prune deleted other objects than those below the backup's start:\n{out}");
    assert!(after.iter().any(|n| n.ends_with(".backup")), "prune deleted the .backup file");
    assert!(out.contains("floor") && out.contains(".backup"), "{out}");
    // --before alone, beyond everything: the newest segment stays, and the floor.
    let (code, out, _) = prune(server, &[&target, "--before", "FF/0"]);
    assert_eq!(code, 0);
    assert_eq!(bucket_names(store), after, "{out}");
    // Neither policy: refused.
    let (code, _, err) = prune(server, &[&target]);
    assert_ne!(code, 0);
    assert!(err.contains("--older-than") || err.contains("--before"), "{err}");
}

/// The store is down: the receiver keeps everything (the directory only grows) however small
/// `--keep-local` is; once the store is back, archiving resumes by itself and retention deletes
/// only what reached the store.
#[test]
fn retention_while_the_store_is_down_deletes_nothing() {
    let ctx = Ctx::new("retention-down");
    let Some(mut server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    ctx.watch("seaweedfs", &server.log);
    let src = gen_wal_in(&ctx, "src", "16MiB");
    let dst = ctx.path("dst");
    let port = free_port();
    let archive = format!("s3://{BUCKET}/{PREFIX}");
    let recv = start_recv(&ctx, &server, Some(&archive), &dst, port, &["--keep-local", "1MiB"]);
    server.stop();
    send(&ctx, &src, port);
    let mut seen = segment_names(&dst);
    assert!(seen.len() >= 15, "{seen:?}");
    // Retention passes every 200 ms; watch it while uploads fail (each one only after the store
    // client's own retries, up to 20 s), and for 3 s more after the first failure.
    let t0 = std::time::Instant::now();
    let mut failed_at = None;
    while failed_at.is_none_or(|t: std::time::Instant| t.elapsed() < Duration::from_secs(3)) {
        assert!(t0.elapsed() < Duration::from_secs(60), "no upload failed within 60 s while the store was down\n{}", tail_file(&recv.log, 30));
        std::thread::sleep(Duration::from_millis(200));
        let now = segment_names(&dst);
        assert!(now.is_superset(&seen), "a segment disappeared while the store was down: {:?}", seen.difference(&now));
        seen = now;
        if failed_at.is_none() && recv.metric("recv_archive_failures_total") > Some(0.0) {
            failed_at = Some(std::time::Instant::now());
        }
    }
    assert_eq!(recv.metric("recv_retention_deleted_segments_total"), Some(0.0));
    server.restart();
    ctx.watch("seaweedfs", &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    // Backoff is at most 30 s; then the segments are uploaded and deleted down to the newest.
    let thinned = poll_until(Duration::from_secs(60), Duration::from_millis(200), || (segment_names(&dst).len() <= 1).then_some(()));
    assert!(thinned.is_some(), "retention did not delete after the store came back: {:?}\n{}", segment_names(&dst), tail_file(&recv.log, 30));
    let deleted: BTreeSet<String> = seen.difference(&segment_names(&dst)).cloned().collect();
    all_in_store(&store, &src, &deleted);
    recv.stop();
}

/// A store that refuses writes (wrong credentials; a bucket that does not exist): the reason is
/// logged, and nothing is deleted.
#[test]
fn store_refusing_writes_deletes_nothing() {
    let ctx = Ctx::new("retention-refused");
    if s3::find_tool(Kind::Seaweed).is_none() {
        s3::start_or_skip(Kind::Seaweed, ctx.dir.path());
        return;
    }
    // SeaweedFS would create a missing bucket on the first upload of its admin identity.
    let server = S3Server::start_with(Kind::Seaweed, ctx.dir.path(), &["-s3.autoCreateBucket=false"]);
    ctx.watch("seaweedfs", &server.log);
    let src = gen_wal_in(&ctx, "src", "8MiB");
    type Case<'a> = (&'a str, String, &'a [(&'a str, &'a str)]);
    let cases: [Case; 2] = [
        ("no-bucket", "s3://no-such-bucket/x".to_string(), &[]),
        ("bad-secret", format!("s3://{BUCKET}/{PREFIX}"), &[("AWS_SECRET_ACCESS_KEY", "wrong-secret")]),
    ];
    for (name, archive, env) in cases {
        let dst = ctx.path(name);
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = walship(&["recv", "--listen", &listen, "--dir", p(&dst), "--archive-to", &archive, "--archive-scan-interval", "200ms", "--keep-local", "1MiB", "--retention-interval", "200ms"]);
        server.env(&mut cmd);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let log = ctx.log(&format!("recv-{name}"));
        let mut g = spawn_logged("recv", cmd, &log);
        poll_until(Duration::from_secs(20), Duration::from_millis(10), || fs::read_to_string(&log).unwrap_or_default().contains("listening").then_some(()))
            .unwrap_or_else(|| panic!("{name}: receiver did not start:\n{}", tail_file(&log, 20)));
        send(&ctx, &src, port);
        let sent = segment_names(&dst);
        let logged = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
            fs::read_to_string(&log).unwrap_or_default().lines().any(|l| l.contains("upload failed, will retry")).then_some(())
        });
        assert!(logged.is_some(), "{name}: no upload failure logged:\n{}", tail_file(&log, 20));
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(segment_names(&dst), sent, "{name}: a segment was deleted although the store refused it");
        let text = fs::read_to_string(&log).unwrap();
        let line = text.lines().find(|l| l.contains("upload failed")).unwrap();
        match name {
            "no-bucket" => assert!(line.contains("no-such-bucket"), "{line}"),
            _ => assert!(!text.contains("wrong-secret"), "the secret was logged"),
        }
        assert!(!text.contains("retention deleted"), "{name}: {text}");
        g.signal(libc::SIGTERM).unwrap();
        g.wait_timeout(Duration::from_secs(20)).unwrap().expect("receiver exits");
    }
}

/// Without an archive, retention still works, says loudly that nothing else holds the segments, and
/// keeps the floors (`--keep-from`).
#[test]
fn keep_local_without_an_archive_warns_and_keeps_the_floor() {
    let ctx = Ctx::new("retention-no-archive");
    let Some(server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    let src = gen_wal_in(&ctx, "src", "12MiB");
    let lowest = segment_names(&src).iter().map(|n| segno(n)).min().unwrap();
    let dst = ctx.path("dst");
    let port = free_port();
    let keep_from = fmt_lsn((lowest + 5) * SEG + 100);
    let recv = start_recv(&ctx, &server, None, &dst, port, &["--keep-local", "1MiB", "--keep-from", &keep_from]);
    send(&ctx, &src, port);
    let want: BTreeMap<String, bool> = complete_source_segments(&src).into_iter().map(|n| { let s = segno(&n); (n, s >= lowest + 5) }).collect();
    let done = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let local = segment_names(&dst);
        want.iter().all(|(n, keep)| local.contains(n) == *keep).then_some(())
    });
    assert!(done.is_some(), "want {want:?}, have {:?}\n{}", segment_names(&dst), tail_file(&recv.log, 20));
    let text = recv.log_text();
    assert!(text.contains("WITHOUT an archive"), "no warning at start-up:\n{text}");
    assert!(text.contains("--keep-from"), "{text}");
    recv.stop();
}

/// A real primary: `pg_backup_start()` / `pg_backup_stop()` while `walship send` follows it; the
/// `.backup` file appears in the receiver's directory, durably named, and in the archive.
#[test]
fn real_postgres_backup_history_file_is_shipped_and_archived() {
    use common::pg::Pg;
    let ctx = Ctx::new("retention-pg-backup");
    let Some(pg) = Pg::for_test(ctx.dir.path()) else { return };
    let Some(server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    ctx.watch("seaweedfs", &server.log);
    let pgdir = ctx.path("pg");
    fs::create_dir_all(&pgdir).unwrap();
    chmod_a_rx(ctx.dir.path()).unwrap();
    pg.chown(&pgdir).unwrap();
    let mut primary = pg.server(&pgdir, "primary", free_port()).unwrap();
    // With archive_mode off, pg_backup_stop() deletes the .backup file it just wrote (it counts as
    // archived): archive_mode on with a no-op command keeps it until the next backup.
    let conf = "wal_level = replica\nmax_wal_senders = 4\nmax_replication_slots = 4\narchive_mode = on\narchive_command = 'true'";
    primary.init("backup-file", conf).unwrap();
    ctx.watch("postgres", &primary.log);
    let dst = ctx.path("dst");
    let port = free_port();
    let archive = format!("s3://{BUCKET}/{PREFIX}");
    let recv = start_recv(&ctx, &server, Some(&archive), &dst, port, &[]);
    let to = format!("127.0.0.1:{port}");
    let send_log = ctx.log("send");
    let mut sender = spawn_logged(
        "send",
        walship(&["send", "--pg-wal", p(&primary.data.join("pg_wal")), "--to", &to, "--conninfo", &primary.conninfo()]),
        &send_log,
    );
    poll_until(Duration::from_secs(30), Duration::from_millis(100), || fs::read_to_string(&send_log).unwrap_or_default().contains("streaming from").then_some(()));
    let out = primary
        .sql("SELECT pg_backup_start('walship-test', true); CREATE TABLE b AS SELECT g FROM generate_series(1, 1000) g; SELECT labelfile FROM pg_backup_stop(false)")
        .unwrap();
    let start = out.lines().find_map(|l| l.strip_prefix("START WAL LOCATION: ")).and_then(|s| s.split_whitespace().next()).map(str::to_string);
    let start = start.unwrap_or_else(|| panic!("no START WAL LOCATION in {out}"));
    let found = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        fs::read_dir(&dst).ok()?.flatten().filter_map(|e| e.file_name().into_string().ok()).find(|n| n.ends_with(".backup"))
    });
    let name = found.unwrap_or_else(|| panic!("no .backup file in the receiver's directory:\n{}\n{}", tail_file(&send_log, 20), tail_file(&recv.log, 20)));
    let content = fs::read_to_string(dst.join(&name)).unwrap();
    assert!(content.contains(&format!("START WAL LOCATION: {start}")), "{content}");
    assert_eq!(content, fs::read_to_string(primary.data.join("pg_wal").join(&name)).unwrap(), "differs from the primary's");
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let in_store = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let folders = store.list_folders(&format!("{PREFIX}/")).ok()?;
        let sys = folders.first()?.clone();
        let objects = store.list(&format!("{sys}00000001/")).ok()?;
        objects.iter().find(|o| o.key.ends_with(&name)).map(|o| o.key.clone())
    });
    let key = in_store.unwrap_or_else(|| panic!("{name} not archived:\n{}", tail_file(&recv.log, 20)));
    assert_eq!(store.get_verified(&key).unwrap().unwrap().as_ref(), content.as_bytes());
    sender.signal(libc::SIGTERM).unwrap();
    sender.wait_timeout(Duration::from_secs(60)).unwrap();
    recv.stop();
}

/// The receiver killed -9 while it uploads and deletes: nothing deleted locally is missing from the
/// store, every object there verifies (no half object), and the restarted receiver finishes both.
#[test]
fn receiver_killed_mid_upload_with_retention_resumes() {
    let ctx = Ctx::new("retention-kill");
    let Some(server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    ctx.watch("seaweedfs", &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let src = gen_wal_in(&ctx, "src", "24MiB");
    let dst = ctx.path("dst");
    let port = free_port();
    // The backlog first, without an archive, so the archiving receiver starts with all of it.
    let plain = start_recv(&ctx, &server, None, &dst, port, &[]);
    send(&ctx, &src, port);
    plain.stop();
    let all = complete_source_segments(&src);
    assert_eq!(segment_names(&dst), all);
    let archive = format!("s3://{BUCKET}/{PREFIX}");
    let extra = ["--keep-local", "1MiB", "--archive-parallel", "1"];
    let mut recv = start_recv(&ctx, &server, Some(&archive), &dst, port, &extra);
    let mid = poll_until(Duration::from_secs(60), Duration::from_millis(5), || (bucket_names(&store).len() >= 4).then_some(()));
    assert!(mid.is_some(), "uploads did not start:\n{}", tail_file(&recv.log, 20));
    recv.guard.signal(libc::SIGKILL).unwrap();
    recv.guard.wait_timeout(Duration::from_secs(10)).unwrap().expect("receiver killed");
    let in_store = bucket_names(&store);
    assert!(in_store.len() < all.len(), "everything was archived before the kill; the test proves nothing");
    let deleted: BTreeSet<String> = all.difference(&segment_names(&dst)).cloned().collect();
    assert!(deleted.is_subset(&in_store), "deleted but not in the store: {:?}", deleted.difference(&in_store));
    all_in_store(&store, &src, &in_store);
    let recv = start_recv(&ctx, &server, Some(&archive), &dst, port, &extra);
    let done = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        (bucket_names(&store) == all && segment_names(&dst).len() <= 1).then_some(())
    });
    assert!(done.is_some(), "bucket {:?}, local {:?}\n{}", bucket_names(&store), segment_names(&dst), tail_file(&recv.log, 20));
    all_in_store(&store, &src, &all);
    recv.stop();
    let mut c = walship(&["verify", &archive]);
    server.env(&mut c);
    let out = c.output().unwrap();
    assert!(out.status.success(), "verify of the archive: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}
