//! The archive's read side with the real `walship` binary against real S3 servers (SeaweedFS and
//! moto): compressed objects written by the receiver and read back (restore, verify), restore with
//! prefetch served from the on-disk cache, a killed prefetch leaving no half file served, and an
//! incremental verify of the store.
mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::s3::{self, Kind, S3Server, BUCKET};
use common::*;
use walship::archive::{BlockingStore, Compression, PutOutcome};

const SEG: u64 = 1 << 20;
/// gen-wal's default system identifier.
const SYSTEM_ID: u64 = 7_000_000_000_000_000_001;
const PREFIX: &str = "rt/wal";

fn gen_wal(ctx: &Ctx, wal_bytes: &str, seg: u64) -> PathBuf {
    let d = ctx.path("src");
    run_ok(&mut walship(&["gen-wal", "--dir", p(&d), "--wal-bytes", wal_bytes, "--seg-size", &seg.to_string()])).unwrap_or_else(|e| panic!("{e}"));
    d
}

/// Complete segment files of `dir` (the last, incomplete one left out), by name.
fn complete_segments(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut m: BTreeMap<String, Vec<u8>> = fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().into_string().ok()?;
            is_seg_name(&n).then(|| (n.clone(), fs::read(e.path()).unwrap()))
        })
        .collect();
    m.pop_last();
    m
}

fn key_of(name: &str) -> String {
    format!("{PREFIX}/{SYSTEM_ID}/{}/{name}", &name[..8])
}

fn url() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

/// `walship restore NAME TARGET --from URL ARGS` in `cwd`.
fn restore(server: &S3Server, cwd: &Path, name: &str, target: &Path, extra: &[&str]) -> Output {
    let u = url();
    let mut args = vec!["restore", name, p(target), "--from", &u];
    args.extend_from_slice(extra);
    let mut c = walship(&args);
    server.env(&mut c);
    c.current_dir(cwd);
    run(&mut c).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

fn verify(server: &S3Server, extra: &[&str]) -> Output {
    let u = url();
    let mut args = vec!["verify", &u];
    args.extend_from_slice(extra);
    let mut c = walship(&args);
    server.env(&mut c);
    run(&mut c).unwrap()
}

/// The object's `walship-compression` metadata, read with object_store directly.
fn compression_meta(server: &S3Server, key: &str) -> Option<String> {
    use object_store::ObjectStore;
    let s3 = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(BUCKET)
        .with_region("us-east-1")
        .with_endpoint(server.endpoint())
        .with_allow_http(true)
        .with_access_key_id(s3::ACCESS_KEY_ID)
        .with_secret_access_key(s3::SECRET_ACCESS_KEY)
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let opts = object_store::GetOptions { head: true, ..Default::default() };
    let r = rt.block_on(s3.get_opts(&key.into(), opts)).unwrap();
    r.attributes.get(&object_store::Attribute::Metadata("walship-compression".into())).map(|v| v.as_ref().to_string())
}

// ---------------------------------------------------------------------------------------------------------

/// The receiver archives with `--archive-compress`; objects are smaller than the files (generated
/// WAL has runs of zeros), keep their keys, and read back (restore, verify) byte for byte.
fn compressed_archive_round_trip(kind: Kind, compression: &str) {
    let ctx = Ctx::new(&format!("archive-compress-{}-{compression}", kind.name()));
    let Some(server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let src = gen_wal(&ctx, "6MiB", SEG);
    let dst = ctx.path("dst");
    let (port, metrics) = (free_port(), free_port());
    let (listen, metrics_listen) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{metrics}"));
    let u = url();
    let mut c = walship(&[
        "recv", "--listen", &listen, "--dir", p(&dst), "--archive-to", &u, "--archive-scan-interval", "200ms",
        "--archive-compress", compression, "--metrics-listen", &metrics_listen,
    ]);
    server.env(&mut c);
    let log = ctx.log("recv");
    let mut recv = spawn_logged("recv", c, &log);
    let up = poll_until(Duration::from_secs(20), Duration::from_millis(20), || fs::read_to_string(&log).unwrap_or_default().contains("listening").then_some(()));
    assert!(up.is_some(), "receiver did not start:\n{}", tail_file(&log, 30));
    let slog = ctx.log("send");
    let to = format!("127.0.0.1:{port}");
    let mut send = spawn_logged("send", walship(&["send", "--pg-wal", p(&src), "--to", &to, "--once", "--retry-for", "30s"]), &slog);
    assert_eq!(send.wait_timeout(Duration::from_secs(60)).unwrap().and_then(|s| s.code()), Some(0), "{}", tail_file(&slog, 20));
    let local = complete_segments(&dst);
    assert!(local.len() >= 4, "{}", local.len());
    let folder = format!("{PREFIX}/{SYSTEM_ID}/00000001/");
    let listed = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let objs = store.list(&folder).ok()?;
        (local.keys().all(|n| objs.iter().any(|o| o.key == key_of(n)))).then_some(objs)
    })
    .unwrap_or_else(|| panic!("not archived:\n{}", tail_file(&log, 30)));
    for (name, bytes) in &local {
        let obj = listed.iter().find(|o| o.key == key_of(name)).unwrap();
        // (generated WAL is random bytes: the body may be larger than the file; it is never the file)
        assert_ne!(obj.size, SEG, "{name}: the object is the file as is ({compression})");
        assert_eq!(compression_meta(&server, &key_of(name)).as_deref(), Some(compression), "{name}: walship-compression");
        let got = store.get_verified(&key_of(name)).unwrap().unwrap();
        assert!(got.as_ref() == bytes.as_slice(), "{name}: decompressed content differs");
        assert_eq!(store.head_checksum(&key_of(name)).unwrap().as_deref(), Some(walship::archive::store::sha256_hex(bytes).as_str()));
    }
    let text = ureq::get(&format!("http://127.0.0.1:{metrics}/metrics")).call().unwrap().into_body().read_to_string().unwrap();
    let value = |m: &str| -> f64 {
        text.lines().find(|l| l.starts_with(m) && !l.starts_with('#')).and_then(|l| l.split_whitespace().last()?.parse().ok()).unwrap_or_else(|| panic!("no {m} in\n{text}"))
    };
    let (raw, body) = (value("walship_recv_archive_uncompressed_bytes"), value("walship_recv_archive_compressed_bytes"));
    assert!(raw >= (local.len() as u64 * SEG) as f64 && body > 0.0 && body != raw, "uncompressed {raw}, compressed {body}");
    assert!((value("walship_recv_archive_compression_ratio") - raw / body).abs() < 0.01);
    recv.signal(libc::SIGTERM).unwrap();
    assert_eq!(recv.wait_timeout(Duration::from_secs(30)).unwrap().and_then(|s| s.code()), Some(0));
    // The binary's read paths decompress and verify.
    let (first, bytes) = local.iter().next().unwrap();
    let target = ctx.path("restored");
    let o = restore(&server, ctx.dir.path(), first, &target, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&target).unwrap() == *bytes, "restored {first} differs");
    let o = verify(&server, &[]);
    assert!(o.status.success(), "verify: {}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
    // The same file with another compression is "already there" (the checksum is of the file).
    let other = if compression == "zstd" { Compression::Lz4 } else { Compression::Zstd };
    assert_eq!(store.put_create_compressed(&key_of(first), bytes, other, "again").unwrap(), PutOutcome::AlreadyThere);
}

#[test]
fn compressed_archive_round_trip_zstd_seaweedfs() {
    compressed_archive_round_trip(Kind::Seaweed, "zstd");
}

#[test]
fn compressed_archive_round_trip_lz4_seaweedfs() {
    compressed_archive_round_trip(Kind::Seaweed, "lz4");
}

#[test]
fn compressed_archive_round_trip_zstd_moto() {
    compressed_archive_round_trip(Kind::Moto, "zstd");
}

#[test]
fn compressed_archive_round_trip_lz4_moto() {
    compressed_archive_round_trip(Kind::Moto, "lz4");
}

/// Put every complete segment of a fresh backlog into the store (zstd), return them by name.
fn archived_backlog(ctx: &Ctx, store: &BlockingStore, wal_bytes: &str, seg: u64) -> BTreeMap<String, Vec<u8>> {
    let src = gen_wal(ctx, wal_bytes, seg);
    let segs = complete_segments(&src);
    for (n, b) in &segs {
        store.put_create_compressed(&key_of(n), b, Compression::Zstd, n).unwrap();
    }
    segs
}

fn cache_names(cache: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(cache.join(SYSTEM_ID.to_string()))
        .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

fn prefetch_serves_from_the_cache(kind: Kind) {
    let ctx = Ctx::new(&format!("restore-prefetch-{}", kind.name()));
    let Some(mut server) = s3::start_or_skip(kind, ctx.dir.path()) else { return };
    ctx.watch(kind.name(), &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let segs = archived_backlog(&ctx, &store, "8MiB", SEG);
    let names: Vec<&String> = segs.keys().collect();
    let cache = ctx.path("cache");
    let target = ctx.path("RECOVERYXLOG");
    // --system-id: with the store down the cluster cannot be looked up in it (a standby's
    // restore_command finds it in its own global/pg_control).
    let sysid = SYSTEM_ID.to_string();
    let args = ["--prefetch", "4", "--cache-dir", p(&cache), "--system-id", &sysid];
    let o = restore(&server, ctx.dir.path(), names[0], &target, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&target).unwrap() == segs[names[0]]);
    let want: Vec<String> = names[1..5].iter().map(|n| n.to_string()).collect();
    assert_eq!(cache_names(&cache), want, "the cache holds the next 4 segments, whole");
    // The store goes away: the next requests are served from the cache alone.
    server.stop();
    for n in &names[1..5] {
        let o = restore(&server, ctx.dir.path(), n, &target, &args);
        assert!(o.status.success(), "{n}: {}", stderr(&o));
        assert!(stderr(&o).contains("prefetch cache"), "{}", stderr(&o));
        assert!(fs::read(&target).unwrap() == segs[*n], "{n} served from the cache differs");
    }
    assert!(cache_names(&cache).is_empty(), "served files are not kept: {:?}", cache_names(&cache));
    // Not cached and the store down: recovery must stop (above 125), not end.
    let o = restore(&server, ctx.dir.path(), names[5], &target, &args);
    assert!(o.status.code().unwrap_or(0) > 125, "{:?} {}", o.status, stderr(&o));
    server.restart();
    if !kind.persistent() {
        let store = BlockingStore::new(&server.settings("")).unwrap();
        for (n, b) in &segs {
            store.put_create_compressed(&key_of(n), b, Compression::Zstd, n).unwrap();
        }
    }
    let o = restore(&server, ctx.dir.path(), names[5], &target, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    // Past the end: exit 1, one plain line.
    let beyond = seg_name(1, 0x40, SEG);
    let o = restore(&server, ctx.dir.path(), &beyond, &target, &args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
    // A history file the archive does not hold: exit 1 too.
    let o = restore(&server, ctx.dir.path(), "00000002.history", &target, &args);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
}

#[test]
fn prefetch_serves_from_the_cache_seaweedfs() {
    prefetch_serves_from_the_cache(Kind::Seaweed);
}

#[test]
fn prefetch_serves_from_the_cache_moto() {
    prefetch_serves_from_the_cache(Kind::Moto);
}

/// A restore killed (-9) while prefetching leaves only temp files or whole verified segments; a
/// left-over temp file is never served and is removed by the next call.
#[test]
fn a_killed_prefetch_leaves_no_half_file_served() {
    let ctx = Ctx::new("restore-prefetch-killed");
    let Some(server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    ctx.watch("seaweedfs", &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let seg = 4u64 << 20;
    let segs = archived_backlog(&ctx, &store, "80MiB", seg);
    let names: Vec<&String> = segs.keys().collect();
    let cache = ctx.path("cache");
    let target = ctx.path("RECOVERYXLOG");
    let args = ["--prefetch", "16", "--cache-dir", p(&cache)];
    for delay_ms in [150u64, 400] {
        let _ = fs::remove_dir_all(&cache);
        let u = url();
        let mut c = walship(&["restore", names[0], p(&target), "--from", &u, "--prefetch", "16", "--cache-dir", p(&cache)]);
        server.env(&mut c);
        c.current_dir(ctx.dir.path());
        let mut g = spawn_logged("restore", c, &ctx.log("restore-killed"));
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = g.signal(libc::SIGKILL);
        let _ = g.wait_timeout(Duration::from_secs(10));
        for n in cache_names(&cache) {
            if is_seg_name(&n) {
                let got = fs::read(cache.join(SYSTEM_ID.to_string()).join(&n)).unwrap();
                assert!(got == segs[&n], "{n}: a final name in the cache holds a half or wrong file");
            } else {
                assert!(n.starts_with('.') && n.ends_with(".tmp"), "unexpected cache file {n}");
            }
        }
    }
    // A half file left under a temp name by a dead process: never served, removed.
    let folder = cache.join(SYSTEM_ID.to_string());
    fs::create_dir_all(&folder).unwrap();
    let half = folder.join(format!(".{}.999999999.tmp", names[3]));
    fs::write(&half, &segs[names[3]][..1000]).unwrap();
    let _ = fs::remove_file(folder.join(names[3]));
    let o = restore(&server, ctx.dir.path(), names[3], &target, &args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&target).unwrap() == segs[names[3]]);
    assert!(!half.exists(), "the dead process's temp file is still there");
}

/// `verify --state`: a second run reads nothing, a new object is read with the one before it.
#[test]
fn incremental_verify_of_the_store_seaweedfs() {
    let ctx = Ctx::new("verify-incremental");
    let Some(server) = s3::start_or_skip(Kind::Seaweed, ctx.dir.path()) else { return };
    ctx.watch("seaweedfs", &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let src = gen_wal(&ctx, "8MiB", SEG);
    let segs = complete_segments(&src);
    let names: Vec<&String> = segs.keys().collect();
    for n in &names[..4] {
        store.put_create_compressed(&key_of(n), &segs[*n], Compression::Lz4, n).unwrap();
    }
    let state = ctx.path("verify-state.json");
    let json = |o: &Output| -> serde_json::Value { serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", stderr(o))) };
    let args = ["--json", "--state", p(&state)];
    let r = json(&verify(&server, &args));
    assert_eq!((r["ok"].as_bool(), r["files_checked"].as_u64(), r["skipped_verified"].as_u64()), (Some(true), Some(4), Some(0)), "{r}");
    let r = json(&verify(&server, &args));
    assert_eq!((r["ok"].as_bool(), r["files_checked"].as_u64(), r["skipped_verified"].as_u64()), (Some(true), Some(0), Some(4)), "{r}");
    for n in &names[4..6] {
        store.put_create_compressed(&key_of(n), &segs[*n], Compression::Zstd, n).unwrap();
    }
    let r = json(&verify(&server, &args));
    assert_eq!((r["ok"].as_bool(), r["files_checked"].as_u64(), r["skipped_verified"].as_u64()), (Some(true), Some(3), Some(3)), "{r}");
}

/// `--dir` and `--from`: the directory is asked first, the archive for what it lacks; a directory
/// that cannot be used still stops recovery (126) instead of falling through.
#[test]
fn dir_first_then_the_archive_moto() {
    let ctx = Ctx::new("restore-dir-then-archive");
    let Some(server) = s3::start_or_skip(Kind::Moto, ctx.dir.path()) else { return };
    ctx.watch("moto", &server.log);
    let store = BlockingStore::new(&server.settings("")).unwrap();
    let segs = archived_backlog(&ctx, &store, "4MiB", SEG);
    let names: Vec<&String> = segs.keys().collect();
    let dir = ctx.path("recv");
    fs::create_dir_all(&dir).unwrap();
    let mut local = segs[names[0]].clone();
    local[SEG as usize - 1] ^= 0xff; // the last byte differs: proves which source served it
    fs::write(dir.join(names[0]), &local).unwrap();
    let target = ctx.path("RECOVERYXLOG");
    let o = restore(&server, ctx.dir.path(), names[0], &target, &["--dir", p(&dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&target).unwrap() == local, "{} not served from --dir", names[0]);
    let o = restore(&server, ctx.dir.path(), names[1], &target, &["--dir", p(&dir)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(fs::read(&target).unwrap() == segs[names[1]], "{} not served from the archive", names[1]);
    let o = restore(&server, ctx.dir.path(), names[1], &target, &["--dir", "/nonexistent/walship"]);
    assert_eq!(o.status.code(), Some(126), "{}", stderr(&o));
    let o = restore(&server, ctx.dir.path(), &seg_name(1, 0x40, SEG), &target, &["--dir", p(&dir)]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(stderr(&o).lines().count(), 1, "{}", stderr(&o));
}
