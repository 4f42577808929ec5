//! The object-store archive (`walship recv --archive-to s3://...`) against real S3 servers started
//! here on loopback ports: SeaweedFS (`weed mini`) and moto's server, each test once per server.
//! The real `walship` binary ships synthetic WAL (`gen-wal`) into a receiver that archives it; the
//! bucket is then read back and every object checked against the local file and its SHA-256.
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::s3::{self, Kind, S3Server, BUCKET, SECRET_ACCESS_KEY};
use common::*;
use sha2::Digest;
use walship::archive::BlockingStore;

const SEG: u64 = 1 << 20;
/// gen-wal's default system identifier.
const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;
const PREFIX: &str = "it/wal";


fn gen_wal(ctx: &Ctx, wal_bytes: &str, seg: u64) -> PathBuf {
    gen_wal_in(ctx, "src", wal_bytes, seg)
}

fn gen_wal_in(ctx: &Ctx, dir: &str, wal_bytes: &str, seg: u64) -> PathBuf {
    let d = ctx.path(dir);
    let seg = seg.to_string();
    run_ok(&mut walship(&["gen-wal", "--dir", p(&d), "--wal-bytes", wal_bytes, "--seg-size", &seg])).unwrap_or_else(|e| panic!("{e}"));
    d
}

struct Recv {
    guard: ChildGuard,
    log: PathBuf,
    metrics: u16,
}

fn start_recv(ctx: &Ctx, server: &S3Server, dst: &Path, port: u16, extra: &[&str]) -> Recv {
    start_recv_to(ctx, server, &format!("s3://{BUCKET}/{PREFIX}"), dst, port, extra)
}

fn start_recv_to(ctx: &Ctx, server: &S3Server, archive: &str, dst: &Path, port: u16, extra: &[&str]) -> Recv {
    let listen = format!("127.0.0.1:{port}");
    let metrics = free_port();
    let metrics_listen = format!("127.0.0.1:{metrics}");
    let mut args = vec!["recv", "--listen", &listen, "--dir", p(dst), "--archive-to", archive, "--archive-scan-interval", "200ms"];
    args.extend_from_slice(&["--metrics-listen", &metrics_listen]);
    // These tests look at the complete-file uploads: no `.partial` object unless a test asks.
    if !extra.contains(&"--archive-partial-after") {
        args.extend_from_slice(&["--archive-partial-after", "0"]);
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
    fn kill9(mut self) {
        self.guard.signal(libc::SIGKILL).unwrap();
        let _ = self.guard.wait_timeout(Duration::from_secs(10)).unwrap().expect("receiver killed");
    }
    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
    /// `walship status --json` of this receiver.
    fn status(&self) -> serde_json::Value {
        let url = format!("http://127.0.0.1:{}/metrics", self.metrics);
        let out = run_ok(&mut walship(&["status", "--url", &url, "--json", "--sample", "0"])).unwrap_or_else(|e| panic!("{e}"));
        serde_json::from_slice(&out.stdout).expect("status json")
    }
}

fn send_args(src: &Path, port: u16, extra: &[&str]) -> Command {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["send", "--pg-wal", p(src), "--to", &to, "--once", "--retry-for", "30s"];
    args.extend_from_slice(extra);
    walship(&args)
}

fn send(ctx: &Ctx, src: &Path, port: u16) {
    let log = ctx.log("send");
    let mut g = spawn_logged("send", send_args(src, port, &[]), &log);
    let st = g.wait_timeout(Duration::from_secs(120)).unwrap().expect("sender exits");
    assert_eq!(st.code(), Some(0), "sender failed:\n{}", tail_file(&log, 30));
}

/// Complete segment files of `dir`, by name.
fn complete_segments(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            is_seg_name(&n).then(|| (n.clone(), fs::read(e.path()).unwrap()))
        })
        .collect()
}

fn key_of(name: &str) -> String {
    format!("{PREFIX}/{SYSTEM_ID}/{}/{name}", &name[..8])
}

fn sha256_hex(b: &[u8]) -> String {
    format!("{:x}", sha2::Sha256::digest(b))
}

/// Object names in the timeline-1 folder.
fn bucket_names(store: &BlockingStore) -> Vec<String> {
    let mut v: Vec<String> = store
        .list(&format!("{PREFIX}/{SYSTEM_ID}/00000001/"))
        .unwrap_or_default()
        .into_iter()
        .map(|o| o.key.rsplit('/').next().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Wait until every name of `want` is in the bucket.
fn wait_archived(store: &BlockingStore, want: &[String], timeout: Duration, recv: &Recv) {
    let done = poll_until(timeout, Duration::from_millis(200), || {
        let have = bucket_names(store);
        want.iter().all(|n| have.contains(n)).then_some(())
    });
    assert!(
        done.is_some(),
        "not archived within {timeout:?}: want {want:?}, bucket has {:?}\n{}",
        bucket_names(store),
        tail_file(&recv.log, 30)
    );
}

/// Every object of `local` is in the bucket with the same bytes and the SHA-256 of those bytes in its
/// metadata (read back by the verifying GET, and by a HEAD).
fn assert_objects_match(store: &BlockingStore, local: &BTreeMap<String, Vec<u8>>) {
    for (name, bytes) in local {
        let key = key_of(name);
        let got = store.get_verified(&key).unwrap_or_else(|e| panic!("{key}: {e}")).unwrap_or_else(|| panic!("{key} missing"));
        assert!(got.as_ref() == bytes.as_slice(), "{key}: content differs from the local {name}");
        assert_eq!(store.head_checksum(&key).unwrap(), Some(sha256_hex(bytes)), "{key}: checksum metadata");
    }
    // Nothing but complete segments (no .partial) in the timeline folder.
    for n in bucket_names(store) {
        assert!(is_seg_name(&n), "unexpected object {n} in the bucket");
    }
}

fn no_secret_in(log: &str) {
    assert!(!log.contains(SECRET_ACCESS_KEY), "the secret access key appears in the receiver's log");
}

// ---------------------------------------------------------------------------------------------------------

fn backlog_is_archived(kind: Kind) {
    let ctx = Ctx::new(&format!("archive-backlog-{}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let src = gen_wal(&ctx, "12MiB", SEG);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &server, &dst, port, &[]);
    send(&ctx, &src, port);
    let local = complete_segments(&dst);
    assert!(local.len() >= 11, "expected at least 11 complete segments, got {}", local.len());
    let names: Vec<String> = local.keys().cloned().collect();
    wait_archived(&store, &names, Duration::from_secs(60), &recv);
    assert_objects_match(&store, &local);
    // `archived` = the end of the last complete segment, in the status output and the log.
    let last = names.last().unwrap();
    let end = (u64::from_str_radix(&last[16..24], 16).unwrap() + 1) * SEG;
    let st = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        let st = recv.status();
        (st["positions_u64"]["archived"].as_u64() == Some(end)).then_some(st)
    })
    .unwrap_or_else(|| panic!("status never showed archived = {end:#x}: {}", recv.status()));
    assert_eq!(st["archive"]["pending_files"], 0, "{st}");
    assert_eq!(st["archive"]["lag_seconds"], 0.0, "{st}");
    assert_eq!(st["archive"]["stopped"], false, "{st}");
    let text = recv.log_text();
    let shown = walship::wal::Lsn(end).to_string();
    assert!(text.contains(&format!("every byte below {shown}")), "no archived log line for {shown}:\n{text}");
    no_secret_in(&text);
    recv.stop();
}

#[test]
fn backlog_is_archived_seaweedfs() {
    backlog_is_archived(Kind::Seaweed);
}

#[test]
fn backlog_is_archived_moto() {
    backlog_is_archived(Kind::Moto);
}

fn store_stopped_mid_way_and_restarted(kind: Kind) {
    let ctx = Ctx::new(&format!("archive-restart-{}", kind.name()));
    let Some(mut server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    // gen-wal is deterministic: the 24 MiB backlog continues the 8 MiB one byte for byte.
    let first = gen_wal_in(&ctx, "first", "8MiB", SEG);
    let second = gen_wal_in(&ctx, "second", "24MiB", SEG);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &server, &dst, port, &[]);
    send(&ctx, &first, port);
    let before: Vec<String> = complete_segments(&dst).into_keys().collect();
    wait_archived(&store, &before, Duration::from_secs(60), &recv);
    // The store goes away (SIGKILL); the rest of the WAL arrives meanwhile.
    // Failures counted so far (a chaos restart may have caused some): wait for new ones.
    let failures_before = recv.status()["archive"]["failures"].as_u64().unwrap_or(0);
    server.stop();
    send(&ctx, &second, port);
    let failing = poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
        (recv.status()["archive"]["failures"].as_u64() > Some(failures_before) && recv.status()["archive"]["pending_files"].as_u64() > Some(0)).then_some(())
    });
    assert!(failing.is_some(), "no failed upload while the store was down: {}", recv.status());
    let st = recv.status();
    assert!(st["archive"]["pending_files"].as_u64() > Some(0), "{st}");
    let archived_while_down = st["positions_u64"]["archived"].as_u64().unwrap();
    assert!(st["archive"]["lag_seconds"].as_f64() > Some(0.0), "{st}");
    server.restart();
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let local = complete_segments(&dst);
    assert!(local.len() >= before.len() + 10, "{} vs {}", local.len(), before.len());
    let names: Vec<String> = if kind.persistent() {
        local.keys().cloned().collect()
    } else {
        // moto keeps objects in memory: what was archived before it stopped is gone from it; the
        // files that completed while it was down must be there now.
        local.keys().filter(|n| !before.contains(n)).cloned().collect()
    };
    // Backoff is at most 30 s between tries.
    wait_archived(&store, &names, Duration::from_secs(90), &recv);
    let expected: BTreeMap<String, Vec<u8>> = local.iter().filter(|(n, _)| names.contains(n)).map(|(n, b)| (n.clone(), b.clone())).collect();
    assert_objects_match(&store, &expected);
    let last = local.keys().last().unwrap();
    let end = (u64::from_str_radix(&last[16..24], 16).unwrap() + 1) * SEG;
    let caught_up = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (recv.status()["positions_u64"]["archived"].as_u64() == Some(end)).then_some(())
    });
    assert!(caught_up.is_some(), "archived did not reach {end:#x} (was {archived_while_down:#x} while down): {}", recv.status());
    assert!(archived_while_down < end);
    let text = recv.log_text();
    assert!(text.contains("will retry"), "no retry logged");
    no_secret_in(&text);
    recv.stop();
}

#[test]
fn store_stopped_mid_way_and_restarted_seaweedfs() {
    store_stopped_mid_way_and_restarted(Kind::Seaweed);
}

#[test]
fn store_stopped_mid_way_and_restarted_moto() {
    store_stopped_mid_way_and_restarted(Kind::Moto);
}

fn conflicting_object_stops_archiving(kind: Kind) {
    let ctx = Ctx::new(&format!("archive-conflict-{}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let src = gen_wal(&ctx, "6MiB", SEG);
    let src_segs = complete_segments(&src);
    let names: Vec<String> = src_segs.keys().cloned().collect();
    // The first segment is there already with the same bytes (counts as done); the third with other
    // bytes, as another primary would have written it.
    let same = &names[0];
    store.put_create(&key_of(same), src_segs[same].clone(), "test").unwrap();
    let other = &names[2];
    let mut foreign = src_segs[other].clone();
    foreign[100] ^= 0xff;
    store.put_create(&key_of(other), foreign.clone(), "test").unwrap();
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &server, &dst, port, &[]);
    send(&ctx, &src, port);
    let local = complete_segments(&dst);
    let stopped = poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
        (recv.status()["archive"]["stopped"] == true).then_some(())
    });
    assert!(stopped.is_some(), "archiving did not stop on the conflict: {}\n{}", recv.status(), tail_file(&recv.log, 20));
    let text = recv.log_text();
    let object = format!("s3://{BUCKET}/{}", key_of(other));
    let line = text.lines().find(|l| l.contains("CONFLICT")).unwrap_or_else(|| panic!("no CONFLICT line:\n{text}"));
    assert!(line.contains(&object), "the conflict line does not name {object}: {line}");
    assert!(line.contains(&sha256_hex(&local[other])) && line.contains(&sha256_hex(&foreign)), "both checksums: {line}");
    assert!(text.contains("archiving STOPPED"), "{text}");
    // Never overwritten; the receiver still runs and holds every segment.
    let got = store.get_verified(&key_of(other)).unwrap().unwrap();
    assert!(got.as_ref() == foreign.as_slice(), "the conflicting object was overwritten");
    assert!(recv.status()["archive"]["pending_files"].as_u64() > Some(0));
    assert!(names[..names.len() - 1].iter().all(|n| local.contains_key(n)), "the receiver lacks a segment");
    recv.stop();
}

#[test]
fn conflicting_object_stops_archiving_seaweedfs() {
    conflicting_object_stops_archiving(Kind::Seaweed);
}

#[test]
fn conflicting_object_stops_archiving_moto() {
    conflicting_object_stops_archiving(Kind::Moto);
}

fn receiver_killed_mid_upload_resumes(kind: Kind) {
    let ctx = Ctx::new(&format!("archive-kill-{}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let seg = 4 << 20;
    let src = gen_wal(&ctx, "64MiB", seg);
    let dst = ctx.path("dst");
    let port = free_port();
    // Ship it all first without an archive, so the receiver restarted with one finds a backlog.
    let plain_log = ctx.log("recv-plain");
    let listen = format!("127.0.0.1:{port}");
    let mut plain = spawn_logged("recv-plain", walship(&["recv", "--listen", &listen, "--dir", p(&dst)]), &plain_log);
    poll_until(Duration::from_secs(20), Duration::from_millis(10), || fs::read_to_string(&plain_log).unwrap_or_default().contains("listening").then_some(()))
        .expect("plain receiver listening");
    send(&ctx, &src, port);
    plain.signal(libc::SIGTERM).unwrap();
    plain.wait_timeout(Duration::from_secs(20)).unwrap().expect("plain receiver exits");
    let local = complete_segments(&dst);
    let names: Vec<String> = local.keys().cloned().collect();
    assert!(names.len() >= 15, "{names:?}");
    // One upload at a time, back to back: kill -9 while they run.
    let recv = start_recv(&ctx, &server, &dst, port, &["--archive-parallel", "1"]);
    let mid = poll_until(Duration::from_secs(60), Duration::from_millis(5), || (bucket_names(&store).len() >= 3).then_some(()));
    assert!(mid.is_some(), "uploads did not start:\n{}", tail_file(&recv.log, 20));
    recv.kill9();
    let after_kill = bucket_names(&store);
    assert!(after_kill.len() < names.len(), "everything was archived before the kill; the test proves nothing");
    // No half object: every object there verifies and equals the local file.
    let there: BTreeMap<String, Vec<u8>> = local.iter().filter(|(n, _)| after_kill.contains(n)).map(|(n, b)| (n.clone(), b.clone())).collect();
    assert_objects_match(&store, &there);
    let recv = start_recv(&ctx, &server, &dst, port, &["--archive-parallel", "1"]);
    wait_archived(&store, &names, Duration::from_secs(120), &recv);
    assert_objects_match(&store, &local);
    let text = recv.log_text();
    let listed = text.lines().find(|l| l.contains("listed the archive")).unwrap_or_else(|| panic!("no listing line:\n{text}"));
    assert!(listed.contains(&format!("{} local files are there already", after_kill.len())), "{listed}");
    // Those were confirmed by checksum, not uploaded again.
    let want = (names.len() - after_kill.len()) as u64;
    let counted = poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        (recv.status()["archive"]["uploaded_objects"].as_u64() == Some(want)).then_some(())
    });
    assert!(counted.is_some(), "uploaded_objects after the restart should be {want}: {}", recv.status());
    recv.stop();
}

#[test]
fn receiver_killed_mid_upload_resumes_seaweedfs() {
    receiver_killed_mid_upload_resumes(Kind::Seaweed);
}

#[test]
fn receiver_killed_mid_upload_resumes_moto() {
    receiver_killed_mid_upload_resumes(Kind::Moto);
}

/// The store client itself: create-only, same bytes = done, other bytes = conflict naming the object
/// and both checksums, and every read verified against the checksum in the metadata.
fn store_client_rules(kind: Kind) {
    let ctx = Ctx::new(&format!("archive-client-{}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let key = "client/x";
    let a = b"first content".to_vec();
    let b = b"other content".to_vec();
    assert_eq!(store.put_create(key, a.clone(), "a").unwrap(), walship::archive::PutOutcome::Uploaded);
    assert_eq!(store.put_create(key, a.clone(), "a").unwrap(), walship::archive::PutOutcome::AlreadyThere);
    let e = store.put_create(key, b.clone(), "/local/b").unwrap_err().to_string();
    for want in [format!("s3://{BUCKET}/{key}"), sha256_hex(&a), sha256_hex(&b), "/local/b".to_string()] {
        assert!(e.contains(&want), "conflict message lacks {want}: {e}");
    }
    assert_eq!(store.get_verified(key).unwrap().unwrap().as_ref(), a.as_slice());
    assert_eq!(store.get_verified("client/none").unwrap(), None);
    // Objects written behind walship's back: damaged content, and no checksum at all.
    use object_store::ObjectStore;
    let (raw, rt) = raw_client(&server);
    let mut attrs = object_store::Attributes::new();
    attrs.insert(object_store::Attribute::Metadata("walship-sha256".into()), sha256_hex(&a).into());
    let opts = object_store::PutOptions { attributes: attrs, ..Default::default() };
    rt.block_on(raw.put_opts(&"client/damaged".into(), b.clone().into(), opts)).unwrap();
    let e = store.get_verified("client/damaged").unwrap_err().to_string();
    assert!(e.contains("damaged") && e.contains(&sha256_hex(&b)) && e.contains(&sha256_hex(&a)), "{e}");
    rt.block_on(raw.put(&"client/bare".into(), b.clone().into())).unwrap();
    let e = store.get_verified("client/bare").unwrap_err().to_string();
    assert!(e.contains("no walship-sha256"), "{e}");
    // Wrong credentials: refused with the store's reason (moto accepts any key, SeaweedFS does not).
    if kind == Kind::Seaweed {
        let mut bad = server.settings("");
        bad.secret_access_key = Some(walship::archive::Secret::new("wrong-secret"));
        let e = BlockingStore::new(&bad).unwrap().put_create("client/y", a.clone(), "a").unwrap_err().to_string();
        assert!(!e.contains("wrong-secret"), "{e}");
        assert!(e.contains("client/y"), "{e}");
    }
}

#[test]
fn store_client_rules_seaweedfs() {
    store_client_rules(Kind::Seaweed);
}

#[test]
fn store_client_rules_moto() {
    store_client_rules(Kind::Moto);
}

/// A plain object_store client and runtime, to change the bucket behind walship's back.
fn raw_client(server: &S3Server) -> (object_store::aws::AmazonS3, tokio::runtime::Runtime) {
    let raw = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_access_key_id(s3::ACCESS_KEY_ID)
        .with_secret_access_key(SECRET_ACCESS_KEY)
        .build()
        .unwrap();
    (raw, tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap())
}

/// `walship verify TARGET --json`: (exit code, report, stderr).
fn verify(server: &S3Server, target: &str) -> (i32, serde_json::Value, String) {
    let mut cmd = walship(&["verify", target, "--json"]);
    server.env(&mut cmd);
    let out = run(&mut cmd).unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), report, String::from_utf8_lossy(&out.stderr).to_string())
}

/// `walship verify` passes on a directory and on its archive, and names the first problem after one
/// object is deleted, after one byte of another is changed, and after a page header is damaged.
fn verify_finds_the_first_problem(kind: Kind) {
    use object_store::ObjectStore;
    let ctx = Ctx::new(&format!("archive-verify-{}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let src = gen_wal(&ctx, "10MiB", SEG);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &server, &dst, port, &[]);
    send(&ctx, &src, port);
    let local = complete_segments(&dst);
    let names: Vec<String> = local.keys().cloned().collect();
    wait_archived(&store, &names, Duration::from_secs(60), &recv);
    recv.stop();
    let url = format!("s3://{BUCKET}/{PREFIX}");
    let (code, r, err) = verify(&server, p(&dst));
    assert_eq!(code, 0, "verify DIR: {r} {err}");
    assert_eq!(r["timelines"][0]["segments"], names.len(), "{r}");
    assert_eq!(r["partial_files"], 1, "{r}");
    let (code, r, err) = verify(&server, &url);
    assert_eq!(code, 0, "verify s3: {r} {err}");
    assert_eq!(r["files_checked"], names.len(), "{r}");
    assert_eq!(r["timelines"][0]["last"], names.last().unwrap().as_str(), "{r}");
    // One object deleted: named as missing, with its LSN.
    let gone = &names[5];
    let path = object_store::path::Path::from(key_of(gone));
    rt_block(&raw_client(&server), |raw| Box::pin(async move { raw.delete(&path).await })).unwrap();
    let (code, r, err) = verify(&server, &url);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["problem"]["file"], gone.as_str(), "{r}");
    assert!(r["problem"]["what"].as_str().unwrap().contains("missing"), "{r}");
    let lsn = walship::wal::Lsn(u64::from_str_radix(&gone[16..24], 16).unwrap() * SEG).to_string();
    assert_eq!(r["problem"]["lsn"], lsn.as_str(), "{r}");
    assert!(err.contains(gone.as_str()), "{err}");
    store.put_create(&key_of(gone), local[gone].clone(), "back").unwrap();
    // One byte of another object changed (its checksum metadata kept): named as damaged.
    let changed = &names[3];
    let mut bytes = local[changed].clone();
    bytes[5000] ^= 1;
    let mut attrs = object_store::Attributes::new();
    attrs.insert(object_store::Attribute::Metadata("walship-sha256".into()), sha256_hex(&local[changed]).into());
    let opts = object_store::PutOptions { attributes: attrs, ..Default::default() };
    let path = object_store::path::Path::from(key_of(changed));
    rt_block(&raw_client(&server), |raw| Box::pin(async move { raw.put_opts(&path, bytes.into(), opts).await.map(|_| ()) })).unwrap();
    let (code, r, _) = verify(&server, &url);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["problem"]["file"], format!("s3://{BUCKET}/{}", key_of(changed)), "{r}");
    assert!(r["problem"]["what"].as_str().unwrap().contains("damaged"), "{r}");
    // A page header damaged in a copy of the directory: file, offset and LSN named.
    let copy = ctx.path("copy");
    fs::create_dir_all(&copy).unwrap();
    for (n, b) in &local {
        fs::write(copy.join(n), b).unwrap();
    }
    let bad = &names[4];
    let mut b = local[bad].clone();
    let page = 2 * 8192;
    b[page + 8] ^= 0x40; // xlp_pageaddr
    fs::write(copy.join(bad), &b).unwrap();
    let (code, r, _) = verify(&server, p(&copy));
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["problem"]["file"], p(&copy.join(bad)), "{r}");
    assert_eq!(r["problem"]["offset"], page, "{r}");
    let lsn = walship::wal::Lsn(u64::from_str_radix(&bad[16..24], 16).unwrap() * SEG + page as u64).to_string();
    assert_eq!(r["problem"]["lsn"], lsn.as_str(), "{r}");
    // One byte inside a record of an earlier segment (page headers intact): its CRC names it first.
    let crc = &names[2];
    let mut b = local[crc].clone();
    b[3 * 8192 + 1000] ^= 0x01;
    fs::write(copy.join(crc), &b).unwrap();
    let (code, r, _) = verify(&server, p(&copy));
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["problem"]["file"], p(&copy.join(crc)), "{r}");
    assert!(r["problem"]["what"].as_str().unwrap().contains("BadCrc"), "{r}");
    assert!(r["problem"]["offset"].as_u64().unwrap() <= 3 * 8192 + 1000, "{r}");
}

type RawFut<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = object_store::Result<()>> + 'a>>;

fn rt_block(client: &(object_store::aws::AmazonS3, tokio::runtime::Runtime), f: impl for<'a> FnOnce(&'a object_store::aws::AmazonS3) -> RawFut<'a>) -> object_store::Result<()> {
    client.1.block_on(f(&client.0))
}

#[test]
fn verify_finds_the_first_problem_seaweedfs() {
    verify_finds_the_first_problem(Kind::Seaweed);
}

#[test]
fn verify_finds_the_first_problem_moto() {
    verify_finds_the_first_problem(Kind::Moto);
}

/// A store refusing writes (the bucket does not exist yet): nothing is lost, failures are counted and
/// retried, and once the bucket exists archiving completes by itself.
fn missing_bucket_then_created(kind: Kind) {
    let ctx = Ctx::new(&format!("archive-nobucket-{}", kind.name()));
    if s3::find_tool(kind).is_none() {
        s3::start_or_skip(kind, ctx.dir.path());
        return;
    }
    // SeaweedFS would create a missing bucket on the first upload of its admin identity.
    let server = S3Server::start_with(kind, ctx.dir.path(), &["-s3.autoCreateBucket=false"]);
    ctx.watch(kind.name(), &server.log);
    let late = "walship-late";
    let src = gen_wal(&ctx, "6MiB", SEG);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv_to(&ctx, &server, &format!("s3://{late}/{PREFIX}"), &dst, port, &[]);
    send(&ctx, &src, port);
    let failing = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        (recv.status()["archive"]["failures"].as_u64() >= Some(2)).then_some(())
    });
    assert!(failing.is_some(), "no failures with the bucket missing: {}", recv.status());
    assert_eq!(recv.status()["positions_u64"]["archived"], 1 << 20, "nothing can be archived yet: {}", recv.status());
    server.create_bucket(late);
    let mut settings = server.settings("");
    settings.url.bucket = late.to_string();
    let store = BlockingStore::new(&settings).unwrap();
    let local = complete_segments(&dst);
    let names: Vec<String> = local.keys().cloned().collect();
    wait_archived(&store, &names, Duration::from_secs(90), &recv);
    assert_objects_match(&store, &local);
    recv.stop();
}

#[test]
fn missing_bucket_then_created_seaweedfs() {
    missing_bucket_then_created(Kind::Seaweed);
}

#[test]
fn missing_bucket_then_created_moto() {
    missing_bucket_then_created(Kind::Moto);
}

// ---------------------------------------------------------------------------------------------------------
// Real PostgreSQL WAL: a stopped primary's pg_wal (with forced segment switches) shipped into an
// archiving receiver; every segment in the store, and `walship verify` passes on both.

fn pg_or_skip() -> Option<common::pg::Pg> {
    use common::pg::{Pg, PG_USER};
    let require = std::env::var("WALSHIP_REQUIRE_PG").as_deref() == Ok("1");
    match (Pg::find_bin(), is_root(), user_ids(PG_USER)) {
        (Some(bin), true, Some(ids)) => Some(Pg { bin, as_user: Some(ids), cwd: std::env::temp_dir() }),
        _ if require && Pg::find_bin().is_none() => panic!("WALSHIP_REQUIRE_PG=1 but PostgreSQL is not installed"),
        _ => {
            println!("SKIP: needs PostgreSQL, root and the `{PG_USER}` user");
            None
        }
    }
}

fn real_postgres_wal_is_archived_and_verifies(kind: Kind) {
    use common::pg::{append, Server, PG_USER};
    let Some(mut pg) = pg_or_skip() else { return };
    let ctx = Ctx::new(&format!("archive-pg-{}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let root = ctx.dir.path().to_path_buf();
    pg.cwd = root.clone();
    let pgdir = root.join("pg");
    fs::create_dir_all(pgdir.join("sock")).unwrap();
    pg.chown(&pgdir).unwrap();
    let port = free_port();
    let mut primary = Server { pg: pg.clone(), name: "primary", data: pgdir.join("primary"), log: pgdir.join("primary.log"), sock: pgdir.join("sock"), port, running: false };
    ctx.watch("postgres", &primary.log);
    let mut c = pg.cmd("initdb");
    c.arg("-D").arg(&primary.data).args(["-U", PG_USER, "--auth=trust", "--locale=C", "--no-sync"]);
    run_ok(&mut c).unwrap();
    let conf = format!("\nport = {port}\nlisten_addresses = ''\nunix_socket_directories = '{}'\nwal_level = replica\nmax_replication_slots = 4\nmax_wal_senders = 4\n", primary.sock.display());
    append(&primary.data.join("postgresql.conf"), &conf).unwrap();
    primary.pg_ctl_start(true).unwrap();
    // A slot keeps every segment from here on in pg_wal (a checkpoint would recycle them).
    primary.sql("SELECT pg_create_physical_replication_slot('keep', true)").unwrap();
    primary.sql("CREATE TABLE t (id int, pad text)").unwrap();
    for batch in 0..4 {
        let sql = format!("INSERT INTO t SELECT g, repeat(md5(g::text), 40) FROM generate_series({}, {}) g", batch * 4000, batch * 4000 + 3999);
        primary.sql(&sql).unwrap();
        primary.sql("SELECT pg_switch_wal()").unwrap();
    }
    primary.stop("fast").unwrap();
    let dst = ctx.path("dst");
    let rport = free_port();
    let recv = start_recv(&ctx, &server, &dst, rport, &[]);
    send(&ctx, &primary.data.join("pg_wal"), rport);
    let local = complete_segments(&dst);
    assert!(local.len() >= 4, "expected at least 4 complete segments from the primary, got {:?}", local.keys());
    let first = local.values().next().unwrap();
    let id = walship::wal::WalIdentity::from_first_page(first).unwrap();
    assert_eq!(id.seg_size, 16 << 20);
    let folder = format!("{PREFIX}/{}/00000001/", id.system_id);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let done = poll_until(Duration::from_secs(120), Duration::from_millis(200), || {
        let have: Vec<String> = store.list(&folder).ok()?.into_iter().map(|o| o.key.rsplit('/').next().unwrap().to_string()).collect();
        local.keys().all(|n| have.contains(n)).then_some(())
    });
    assert!(done.is_some(), "real WAL not archived within 120 s:\n{}", tail_file(&recv.log, 20));
    for (name, bytes) in &local {
        let key = format!("{folder}{name}");
        let got = store.get_verified(&key).unwrap().unwrap_or_else(|| panic!("{key} missing"));
        assert!(got.as_ref() == bytes.as_slice(), "{key} differs from the local file");
    }
    recv.stop();
    let (code, r, err) = verify(&server, p(&dst));
    assert_eq!(code, 0, "verify of the receiver directory: {r} {err}");
    let (code, r, err) = verify(&server, &format!("s3://{BUCKET}/{PREFIX}"));
    assert_eq!(code, 0, "verify of the archive: {r} {err}");
    assert_eq!(r["files_checked"], local.len(), "{r}");
    assert_eq!(r["timelines"][0]["system_id"], id.system_id, "{r}");
}

#[test]
fn real_postgres_wal_is_archived_and_verifies_seaweedfs() {
    real_postgres_wal_is_archived_and_verifies(Kind::Seaweed);
}

#[test]
fn real_postgres_wal_is_archived_and_verifies_moto() {
    real_postgres_wal_is_archived_and_verifies(Kind::Moto);
}

/// Bad archive settings are refused at start-up with the reason, before the directory is touched;
/// the TOML file's `[recv]` table sets the archive like the flags (secret included, never logged).
#[test]
fn archive_settings_are_checked_and_toml_sets_them() {
    let ctx = Ctx::new("archive-settings");
    let dst = ctx.path("dst");
    let listen = format!("127.0.0.1:{}", free_port());
    let base = ["recv", "--listen", listen.as_str(), "--dir", p(&dst)];
    let refused = |extra: &[&str], env: &[(&str, &str)], want: &str| {
        let mut args = base.to_vec();
        args.extend_from_slice(extra);
        let mut c = walship(&args);
        for (k, v) in env {
            c.env(k, v);
        }
        let out = run(&mut c).unwrap();
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "accepted {extra:?} {env:?}");
        assert!(err.contains(want), "{extra:?} {env:?}: no {want:?} in: {err}");
        assert!(!dst.exists(), "the directory was created although the settings were refused");
    };
    // `.invalid` never resolves: no request could leave this machine even if the check were missing.
    refused(&["--archive-to", "s3://walship-test/p", "--archive-endpoint", "http://store.invalid:9000"], &[], "AWS_ALLOW_HTTP");
    refused(&["--archive-to", "http://walship-test/p"], &[], "must start with s3://");
    refused(&["--archive-to", "s3://Bad_Bucket/p"], &[], "bucket name");
    refused(&["--archive-to", "s3://walship-test/p"], &[("AWS_ACCESS_KEY_ID", "x")], "AWS_SECRET_ACCESS_KEY");
    refused(&["--archive-to", "s3://walship-test/p", "--archive-parallel", "0"], &[], "--archive-parallel");

    let Some(server) = s3::start_or_skip(Kind::Moto, ctx.dir.path()) else { return };
    let toml = ctx.path("walship.toml");
    fs::write(
        &toml,
        format!(
            "[recv]\narchive_to = \"s3://{BUCKET}/toml\"\narchive_endpoint = \"{}\"\narchive_access_key_id = \"{}\"\n\
             archive_secret_access_key = \"{SECRET_ACCESS_KEY}\"\narchive_scan_interval = \"200ms\"\n",
            server.endpoint(),
            s3::ACCESS_KEY_ID
        ),
    )
    .unwrap();
    let src = gen_wal(&ctx, "3MiB", SEG);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let log = ctx.log("recv");
    let mut c = walship(&["recv", "--config", p(&toml), "--listen", &listen, "--dir", p(&dst)]);
    c.env_remove("AWS_SECRET_ACCESS_KEY").env_remove("AWS_ACCESS_KEY_ID").env_remove("AWS_ENDPOINT_URL");
    let mut g = spawn_logged("recv", c, &log);
    poll_until(Duration::from_secs(20), Duration::from_millis(10), || fs::read_to_string(&log).unwrap_or_default().contains("listening").then_some(()))
        .expect("receiver listening");
    send(&ctx, &src, port);
    let local = complete_segments(&dst);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let folder = format!("toml/{SYSTEM_ID}/00000001/");
    let done = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let have: Vec<String> = store.list(&folder).ok()?.into_iter().map(|o| o.key.rsplit('/').next().unwrap().to_string()).collect();
        (!local.is_empty() && local.keys().all(|n| have.contains(n))).then_some(())
    });
    assert!(done.is_some(), "nothing archived with the TOML settings:\n{}", tail_file(&log, 20));
    g.signal(libc::SIGTERM).unwrap();
    g.wait_timeout(Duration::from_secs(20)).unwrap().expect("receiver exits");
    no_secret_in(&fs::read_to_string(&log).unwrap());
}

/// The newest, unfinished segment reaches the store as `NAME.partial` (durable bytes, zeros after)
/// once the durable position rests; `walship restore --from` serves it under the plain name, and
/// `walship verify` walks it and says how far its WAL goes.
fn unfinished_segment_is_archived(kind: Kind) {
    let ctx = Ctx::new(&format!("archive-partial-{}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let src = gen_wal(&ctx, "3500KiB", SEG);
    let dst = ctx.path("dst");
    let port = free_port();
    let recv = start_recv(&ctx, &server, &dst, port, &["--archive-partial-after", "300ms"]);
    send(&ctx, &src, port);
    let partial = fs::read_dir(&dst).unwrap().flatten().filter_map(|e| e.file_name().into_string().ok()).find(|n| n.ends_with(".partial")).expect("a .partial at the receiver");
    let name = partial.trim_end_matches(".partial").to_string();
    let durable = walship::recv::published::read(&dst).unwrap().unwrap().lsn.0;
    let mut want = fs::read(dst.join(&partial)).unwrap();
    want[(durable % SEG) as usize..].fill(0);
    let complete: Vec<String> = complete_segments(&dst).keys().cloned().collect();
    wait_archived(&store, &complete, Duration::from_secs(60), &recv);
    wait_archived(&store, std::slice::from_ref(&partial), Duration::from_secs(30), &recv);
    let got = store.get_verified(&format!("{}.partial", key_of(&name))).unwrap().expect("the .partial object");
    assert!(got.as_ref() == want.as_slice(), "the .partial object is not the receiver's durable bytes with zeros after");
    recv.stop();
    let target = ctx.path("restored");
    let url = format!("s3://{BUCKET}/{PREFIX}");
    let mut cmd = walship(&["restore", &name, p(&target), "--from", &url, "--system-id", &SYSTEM_ID.to_string()]);
    server.env(&mut cmd);
    let out = run(&mut cmd).unwrap();
    assert_eq!(out.status.code(), Some(0), "restore: {}", String::from_utf8_lossy(&out.stderr));
    assert!(fs::read(&target).unwrap() == want, "restore served other bytes than the .partial object's");
    let (code, report, err) = verify(&server, &url);
    assert_eq!(code, 0, "verify: {err} {report}");
    let explained = report["timelines"][0]["partial"].as_str().unwrap_or_default().to_string();
    assert!(explained.starts_with(&format!("{partial}: valid WAL up to")), "{report}");
}

#[test]
fn unfinished_segment_is_archived_seaweedfs() {
    unfinished_segment_is_archived(Kind::Seaweed);
}

#[test]
fn unfinished_segment_is_archived_moto() {
    unfinished_segment_is_archived(Kind::Moto);
}
