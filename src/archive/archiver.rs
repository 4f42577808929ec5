//! The receiver's archiver: uploads every complete segment and every history file of the receiver's
//! directory to the store, in parallel (bounded), retrying with backoff, and publishes `archived`:
//! every byte below it, of the WAL the directory holds, is in the store.
//!
//! It reads the directory, never the receiver's state: a segment gets its final name only after all
//! its bytes are durable, and a history file only after it was fsynced, so what it sees named is
//! complete and durable. It runs on a thread of its own with a current-thread tokio runtime; file
//! reads go to tokio's blocking pool. After a restart it starts again from the directory alone:
//! every complete file is read, hashed and looked up (HEAD) once per process; an object with the same
//! SHA-256 counts as archived, a missing one is uploaded create-only, and an existing object with
//! another checksum stops archiving. (A listing by size cannot tell: every segment has the same
//! size.) One listing per timeline is logged, for the operator. Whole-object PUTs are atomic: a
//! receiver killed mid-upload leaves no half object.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{debug, error, info, warn};

use super::keys::{object_key, timeline_prefix};
use super::settings::ArchiveSettings;
use super::compress::Compression;
use super::store::{sha256_hex, PutOutcome, Store};
use super::ArchiveError;
use crate::metrics::LsnGauge;
use crate::wal::history::HistoryEntry;
use crate::wal::{has_segment_name_shape, read_segment_head, Lsn, WalFileName, WalIdentity};

/// Most uploads in flight at once (`--archive-parallel`).
pub const PARALLEL_MAX: usize = 64;
/// The longest wait between two tries of one upload.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// `walship recv --archive-to ...`, validated.
#[derive(Clone)]
pub struct ArchiveConfig {
    pub settings: ArchiveSettings,
    /// Uploads in flight at once (1..=[`PARALLEL_MAX`]); each holds one file in memory.
    pub parallel: usize,
    /// How often the directory is looked at for new complete files.
    pub scan_interval: Duration,
    /// How each object's body is compressed (`--archive-compress`); keys and checksums do not change.
    pub compression: Compression,
    pub metrics: Arc<ArchiveMetrics>,
    /// The names of the local files known to be in the store (read by local retention).
    pub archived_names: ArchivedNames,
    /// Upload the newest `.partial` once the durable position has rested this long (None: never).
    pub partial_after: Option<Duration>,
}

/// The names of local files the archiver found in the store or uploaded in this process (shared
/// with local retention, which deletes only names in it and then forgets them).
pub type ArchivedNames = Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>;

impl std::fmt::Debug for ArchiveConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArchiveConfig")
            .field("settings", &self.settings)
            .field("parallel", &self.parallel)
            .field("scan_interval", &self.scan_interval)
            .field("compression", &self.compression)
            .finish_non_exhaustive()
    }
}

impl ArchiveConfig {
    pub fn new(settings: ArchiveSettings) -> ArchiveConfig {
        ArchiveConfig {
            settings,
            parallel: 4,
            scan_interval: Duration::from_secs(1),
            compression: Compression::None,
            metrics: Arc::new(ArchiveMetrics::default()),
            archived_names: ArchivedNames::default(),
            partial_after: Some(Duration::from_secs(10)),
        }
    }

    pub fn validate(&self) -> Result<(), ArchiveError> {
        self.settings.validate()?;
        if !(1..=PARALLEL_MAX).contains(&self.parallel) {
            return Err(ArchiveError::Option(format!("--archive-parallel {} must be 1..={PARALLEL_MAX}", self.parallel)));
        }
        if self.scan_interval.is_zero() || self.scan_interval > Duration::from_secs(3600) {
            return Err(ArchiveError::Option("--archive-scan-interval must be above zero and at most 1h".into()));
        }
        Ok(())
    }
}

/// The archiver's metrics (atomics; registered beside the receiver's).
#[derive(Default, Debug)]
pub struct ArchiveMetrics {
    /// Every byte of the directory's WAL below this LSN is in the store (0: nothing yet).
    pub archived_lsn: LsnGauge,
    pub uploaded_objects: Counter,
    pub uploaded_bytes: Counter,
    /// Bytes of the files uploaded, before compression (the same as `uploaded_bytes` without it).
    pub uncompressed_bytes: Counter,
    /// Bytes of the object bodies uploaded, after compression.
    pub compressed_bytes: Counter,
    /// uncompressed_bytes / compressed_bytes so far (1 without compression, 0 before any upload).
    pub compression_ratio: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Objects found in the store already with the same checksum.
    pub present_objects: Counter,
    /// Complete local files not in the store yet.
    pub pending: Gauge,
    /// Failed tries (each is retried).
    pub failures: Counter,
    /// 1 once archiving stopped on a hard error (a conflicting object).
    pub stopped: Gauge,
    /// Age of the oldest complete local file not in the store yet (from its modification time); 0
    /// when nothing waits.
    pub lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl ArchiveMetrics {
    /// Register as `walship_recv_archived_lsn`, `walship_recv_archive_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("recv_archived_lsn", "LSN below which every byte of the directory's WAL is in the object store", self.archived_lsn.clone());
        registry.register("recv_archive_uploaded_objects", "Objects (segments, history files) uploaded", self.uploaded_objects.clone());
        registry.register("recv_archive_uploaded_bytes", "Bytes uploaded to the object store", self.uploaded_bytes.clone());
        registry.register("recv_archive_uncompressed_bytes", "Bytes of the uploaded files before compression", self.uncompressed_bytes.clone());
        registry.register("recv_archive_compressed_bytes", "Bytes of the uploaded object bodies after compression", self.compressed_bytes.clone());
        registry.register("recv_archive_compression_ratio", "Uncompressed over compressed bytes uploaded so far", self.compression_ratio.clone());
        registry.register("recv_archive_present_objects", "Objects found already in the store with the same content", self.present_objects.clone());
        registry.register("recv_archive_pending_files", "Complete local files not in the object store yet", self.pending.clone());
        registry.register("recv_archive_failures", "Failed upload tries (each is retried with backoff)", self.failures.clone());
        registry.register("recv_archive_stopped", "1 when archiving stopped on a hard error (see the log)", self.stopped.clone());
        registry.register("recv_archive_lag_seconds", "Age of the oldest complete local file not in the object store yet", self.lag_seconds.clone());
    }
}

/// The running archiver; dropping it stops it (uploads in flight are abandoned: a PUT is atomic,
/// they are made again at the next start).
pub struct Archiver {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Archiver {
    /// Start archiving `dir` per `cfg` on a thread of its own.
    pub fn start(cfg: &ArchiveConfig, dir: &Path) -> Result<Archiver, ArchiveError> {
        cfg.validate()?;
        let store = Store::new(&cfg.settings)?;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ArchiveError::Runtime)?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = &cfg.settings;
        info!(
            archive = %s.url,
            endpoint = s.endpoint.as_deref().unwrap_or("(AWS)"),
            region = %s.region,
            access_key_id = s.access_key_id.as_deref().unwrap_or("(none)"),
            parallel = cfg.parallel,
            compression = %cfg.compression,
            "archiving complete segments and history files to {}", s.url
        );
        let mut state = State {
            dir: dir.to_path_buf(),
            store,
            prefix: s.url.prefix.clone(),
            parallel: cfg.parallel,
            compression: cfg.compression,
            scan_interval: cfg.scan_interval,
            metrics: Arc::clone(&cfg.metrics),
            archived_names: Arc::clone(&cfg.archived_names),
            partial_after: cfg.partial_after,
            partial: Default::default(),
            partial_deletes: Vec::new(),
            identity: None,
            files: BTreeMap::new(),
            listed: HashMap::new(),
            archived: Lsn(0),
            last_log: None,
            last_list_warn: None,
            last_fail_warn: None,
            failures_unlogged: 0,
        };
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("walship-archive".into())
            .spawn(move || rt.block_on(state.run(&stop2)))
            .map_err(ArchiveError::Runtime)?;
        Ok(Archiver { stop, thread: Some(thread) })
    }
}

impl Drop for Archiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting { not_before: Instant, attempts: u32 },
    InFlight { attempts: u32 },
    Done,
}

#[derive(Debug)]
struct Entry {
    file: WalFileName,
    key: String,
    phase: Phase,
    seen: bool,
    /// When the file got its final name (its modification time), for the lag in seconds.
    since: SystemTime,
}

struct State {
    dir: PathBuf,
    store: Store,
    prefix: String,
    parallel: usize,
    compression: Compression,
    scan_interval: Duration,
    metrics: Arc<ArchiveMetrics>,
    archived_names: ArchivedNames,
    partial_after: Option<Duration>,
    partial: super::partial::PartialState,
    /// `.partial` objects whose complete segment is in the store now.
    partial_deletes: Vec<String>,
    /// (system identifier, segment size), from the first segment's long page header.
    identity: Option<(u64, u64)>,
    /// By file name.
    files: BTreeMap<String, Entry>,
    /// Per timeline: the objects the store held when first listed (key -> size); for the log only.
    listed: HashMap<u32, HashMap<String, u64>>,
    archived: Lsn,
    last_log: Option<Instant>,
    last_list_warn: Option<Instant>,
    last_fail_warn: Option<Instant>,
    /// Failed tries since the last warning.
    failures_unlogged: u64,
}

type Finished = (String, Result<(PutOutcome, Sizes), ArchiveError>);

/// (file bytes, object body bytes) of one upload.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    raw: u64,
    body: u64,
}

impl State {
    async fn run(&mut self, stop: &AtomicBool) {
        let mut tasks: tokio::task::JoinSet<Finished> = tokio::task::JoinSet::new();
        let mut last_scan: Option<Instant> = None;
        while !stop.load(Ordering::Relaxed) {
            if last_scan.is_none_or(|t| t.elapsed() >= self.scan_interval) {
                last_scan = Some(Instant::now());
                self.scan();
                self.list_new_timelines().await;
                self.upload_partial().await;
            }
            for key in std::mem::take(&mut self.partial_deletes) {
                if let Err(e) = self.store.delete(&key).await {
                    warn!("cannot delete {}, whose complete segment is archived: {e}", self.store.describe(&key));
                }
            }
            self.start_uploads(&mut tasks);
            let finished = if tasks.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                None
            } else {
                tokio::time::timeout(Duration::from_millis(100), tasks.join_next()).await.ok().flatten()
            };
            if let Some(Ok((name, result))) = finished {
                if let Err(e) = self.finish(&name, result) {
                    error!("{e}");
                    error!(
                        "archiving STOPPED: nothing more is uploaded until the conflict is resolved and the receiver restarted; \
                         the receiver keeps receiving WAL into its directory"
                    );
                    self.metrics.stopped.set(1);
                    tasks.abort_all();
                    // Stay until the receiver stops, so the stop is visible in the metrics.
                    while !stop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    return;
                }
                self.update_position();
            }
        }
        tasks.abort_all();
        // The receiver stops: the newest `.partial` as it is now, without waiting for it to rest.
        if self.partial_after.is_some() {
            self.partial_after = Some(Duration::ZERO);
            self.upload_partial().await;
        }
        info!(archived = %self.archived, "archiver stopped; every byte of the directory's WAL below {} is in the store", self.archived);
    }

    /// Find the directory's identity and every complete segment and history file in it.
    fn scan(&mut self) {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) => {
                warn!(dir = %self.dir.display(), "archiver cannot read the directory: {e}");
                return;
            }
        };
        let mut names: Vec<(String, u64, SystemTime)> = Vec::new();
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_file() {
                names.push((name, meta.len(), meta.modified().unwrap_or_else(|_| SystemTime::now())));
            }
        }
        if self.identity.is_none() {
            self.identity = names.iter().filter(|(n, _, _)| has_segment_name_shape(n)).find_map(|(n, _, _)| {
                let head = read_segment_head(&self.dir.join(n)).ok()?;
                let id = WalIdentity::from_first_page(&head).ok()?;
                Some((id.system_id, id.seg_size))
            });
            if let Some((sysid, seg_size)) = self.identity {
                info!(system_id = sysid, seg_size, "archive keys: {}TIMELINE/FILE", timeline_prefix(&self.prefix, sysid, 0).trim_end_matches("00000000/"));
            }
        }
        let Some((sysid, seg_size)) = self.identity else { return };
        for e in self.files.values_mut() {
            e.seen = false;
        }
        for (name, size, since) in names {
            let Some(file) = WalFileName::parse(&name, seg_size) else { continue };
            if let WalFileName::Segment { .. } = file {
                if size != seg_size {
                    continue; // not a finished segment file (never written so by the receiver)
                }
            }
            let Some(key) = object_key(&self.prefix, sysid, file, seg_size) else { continue };
            let entry = self.files.entry(name).or_insert(Entry {
                file,
                key,
                phase: Phase::Waiting { not_before: Instant::now(), attempts: 0 },
                seen: true,
                since,
            });
            entry.seen = true;
        }
        // A file that went away (removed by an operator) is not waited for.
        self.files.retain(|_, e| e.seen || matches!(e.phase, Phase::InFlight { .. }));
        self.update_position();
    }

    /// List each timeline's folder once, to tell the operator what is there already.
    async fn list_new_timelines(&mut self) {
        let Some((sysid, _)) = self.identity else { return };
        let mut tlis: Vec<u32> = self.files.values().map(|e| tli_of(e.file)).filter(|t| !self.listed.contains_key(t)).collect();
        tlis.sort_unstable();
        tlis.dedup();
        for tli in tlis {
            let folder = timeline_prefix(&self.prefix, sysid, tli);
            match self.store.list(&folder).await {
                Ok(objects) => {
                    let map: HashMap<String, u64> = objects.into_iter().map(|o| (o.key, o.size)).collect();
                    let present = self.files.values().filter(|e| tli_of(e.file) == tli && map.contains_key(&e.key)).count();
                    info!(
                        folder = %self.store.describe(&folder),
                        objects = map.len(),
                        "listed the archive: {present} local files are there already (each counts once its SHA-256 matches)"
                    );
                    self.listed.insert(tli, map);
                }
                Err(e) => {
                    // Listing is only for the log (a policy may allow PUT and GET but not LIST);
                    // uploads check each key by itself.
                    if self.last_list_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        warn!("cannot list the archive (will try again; uploads go on regardless): {e}");
                        self.last_list_warn = Some(Instant::now());
                    }
                }
            }
        }
    }

    fn start_uploads(&mut self, tasks: &mut tokio::task::JoinSet<Finished>) {
        let now = Instant::now();
        // Oldest first: segments in LSN order, so `archived` moves as soon as possible.
        let mut ready: Vec<(&String, &Entry)> = self
            .files
            .iter()
            .filter(|(_, e)| matches!(e.phase, Phase::Waiting { not_before, .. } if not_before <= now))
            .collect();
        ready.sort_by_key(|(_, e)| order_of(e.file));
        let room = self.parallel.saturating_sub(tasks.len());
        let chosen: Vec<String> = ready.into_iter().take(room).map(|(n, _)| n.clone()).collect();
        for name in chosen {
            let e = self.files.get_mut(&name).expect("chosen from files");
            let Phase::Waiting { attempts, .. } = e.phase else { continue };
            e.phase = Phase::InFlight { attempts };
            let store = self.store.clone();
            let key = e.key.clone();
            let path = self.dir.join(&name);
            let compression = self.compression;
            tasks.spawn(async move {
                let result = upload(&store, &key, path, compression).await;
                (name, result)
            });
        }
    }

    /// Record one upload's result; Err only for a hard error (archiving must stop).
    fn finish(&mut self, name: &str, result: Result<(PutOutcome, Sizes), ArchiveError>) -> Result<(), ArchiveError> {
        let Some(e) = self.files.get_mut(name) else { return Ok(()) };
        let attempts = match e.phase {
            Phase::InFlight { attempts } => attempts,
            _ => 0,
        };
        match result {
            Ok((outcome, sizes)) => {
                e.phase = Phase::Done;
                if let (WalFileName::Segment { tli, segno }, Some((sysid, seg_size))) = (e.file, self.identity) {
                    self.partial_deletes.push(super::keys::partial_key(&self.prefix, sysid, tli, segno, seg_size));
                }
                self.archived_names.lock().unwrap_or_else(|p| p.into_inner()).insert(name.to_string());
                match outcome {
                    PutOutcome::Uploaded => {
                        let m = &self.metrics;
                        m.uploaded_objects.inc();
                        m.uploaded_bytes.inc_by(sizes.raw);
                        m.uncompressed_bytes.inc_by(sizes.raw);
                        m.compressed_bytes.inc_by(sizes.body);
                        m.compression_ratio.set(compression_ratio(m.uncompressed_bytes.get(), m.compressed_bytes.get()));
                        debug!(key = %e.key, bytes = sizes.raw, body_bytes = sizes.body, "uploaded {name}");
                    }
                    PutOutcome::AlreadyThere => {
                        self.metrics.present_objects.inc();
                        debug!(key = %e.key, "{name} was in the store already, same checksum");
                    }
                }
                Ok(())
            }
            // An object of another content, or one walship did not write (no checksum to compare):
            // overwriting is never an option, and retrying cannot help.
            Err(err @ (ArchiveError::Conflict { .. } | ArchiveError::NoChecksum { .. })) => Err(err),
            Err(err) => {
                self.metrics.failures.inc();
                let attempts = attempts + 1;
                let wait = backoff(attempts);
                e.phase = Phase::Waiting { not_before: Instant::now() + wait, attempts };
                // One line per 10 s at most: a store that is down fails every file.
                self.failures_unlogged += 1;
                if self.last_fail_warn.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    let others = self.failures_unlogged - 1;
                    warn!(file = name, attempts, retry_in = ?wait, failed_tries_not_shown = others, "upload failed, will retry: {err}");
                    self.last_fail_warn = Some(Instant::now());
                    self.failures_unlogged = 0;
                }
                Ok(())
            }
        }
    }

    /// The newest `.partial`, once the durable position rests, and those of timelines the WAL has
    /// left (see `archive::partial`).
    async fn upload_partial(&mut self) {
        let (Some(idle), Some((sysid, seg_size))) = (self.partial_after, self.identity) else { return };
        let durable = crate::recv::published::read(&self.dir).ok().flatten().map(|p| p.lsn);
        let names: Vec<String> =
            std::fs::read_dir(&self.dir).map(|rd| rd.flatten().filter_map(|e| e.file_name().into_string().ok()).collect()).unwrap_or_default();
        let partials: Vec<String> = names.iter().filter(|n| n.ends_with(".partial")).cloned().collect();
        if !partials.is_empty() {
            let history = newest_history(&self.dir, &names, seg_size);
            self.upload_abandoned_partials(durable, &partials, history.as_deref().unwrap_or_default(), sysid, seg_size).await;
        }
        let Some(up) = self.partial.due(durable, &partials, seg_size, idle, Instant::now()) else { return };
        let Some(WalFileName::Partial { tli, segno }) = WalFileName::parse(&up.name, seg_size) else { return };
        let key = super::keys::partial_key(&self.prefix, sysid, tli, segno, seg_size);
        let bytes = match super::partial::durable_bytes(&self.dir, &up, seg_size) {
            Ok(b) => b,
            Err(e) => return warn!(file = %up.name, "cannot read the .partial to archive it: {e}"),
        };
        match self.store.put_replace(&key, bytes.into()).await {
            Ok(()) => {
                info!(object = %self.store.describe(&key), durable = %up.durable, "archived the unfinished segment up to {}", up.durable);
                self.partial.uploaded(up);
            }
            Err(e) => warn!("cannot archive the unfinished segment {}: {e}; will retry", up.name),
        }
    }

    /// The `.partial` of each timeline the newest history file says ended, whole up to its switch
    /// point, once (replacing an upload made while it was the newest).
    async fn upload_abandoned_partials(&mut self, durable: Option<Lsn>, partials: &[String], history: &[HistoryEntry], sysid: u64, seg_size: u64) {
        for up in self.partial.abandoned_due(durable, partials, history, seg_size) {
            let Some(WalFileName::Partial { tli, segno }) = WalFileName::parse(&up.name, seg_size) else { continue };
            let key = super::keys::partial_key(&self.prefix, sysid, tli, segno, seg_size);
            let bytes = match super::partial::durable_bytes(&self.dir, &up, seg_size) {
                Ok(b) => b,
                Err(e) => {
                    warn!(file = %up.name, "cannot read the abandoned timeline's .partial to archive it: {e}");
                    continue;
                }
            };
            match self.store.put_replace(&key, bytes.into()).await {
                Ok(()) => {
                    info!(object = %self.store.describe(&key), end = %up.durable, "archived timeline {tli}'s last segment, which it left at {}", up.durable);
                    self.partial.abandoned_uploaded(&up.name);
                }
                Err(e) => warn!("cannot archive timeline {tli}'s last segment {}: {e}; will retry", up.name),
            }
        }
    }

    fn update_position(&mut self) {
        let Some((_, seg_size)) = self.identity else { return };
        let pending = self.files.values().filter(|e| e.phase != Phase::Done).count();
        self.metrics.pending.set(pending as i64);
        let oldest = self.files.values().filter(|e| e.phase != Phase::Done).map(|e| e.since).min();
        let lag = oldest.map_or(0.0, |t| SystemTime::now().duration_since(t).map_or(0.0, |d| d.as_secs_f64()));
        self.metrics.lag_seconds.set(lag);
        let segs = self.files.values().filter_map(|e| match e.file {
            WalFileName::Segment { segno, tli } => Some(((segno, tli), e.phase == Phase::Done)),
            _ => None,
        });
        let Some(lsn) = archived_lsn(segs, seg_size) else { return };
        if lsn > self.archived {
            self.archived = lsn;
            self.metrics.archived_lsn.set(lsn.0);
            let caught_up = pending == 0;
            if caught_up || self.last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                self.last_log = Some(Instant::now());
                info!(archived = %lsn, pending_files = pending, "archived: every byte below {lsn} is in the store");
            }
        }
    }
}

/// Read `path`, compress it (on tokio's blocking pool: never on the receiver's io_uring loop, nor
/// on the archiver's runtime thread) and upload it create-only as `key`. Memory: the file and its
/// compressed body, per upload in flight (`--archive-parallel` bounds them).
async fn upload(store: &Store, key: &str, path: PathBuf, compression: Compression) -> Result<(PutOutcome, Sizes), ArchiveError> {
    let shown = path.display().to_string();
    let (sha, body, raw) = tokio::task::spawn_blocking(move || {
        let data = std::fs::read(&path).map_err(|source| ArchiveError::Local { path: path.clone(), source })?;
        let body = compression.compress(&data).map_err(|source| ArchiveError::Local { path, source })?;
        Ok::<_, ArchiveError>((sha256_hex(&data), body, data.len() as u64))
    })
    .await
    .map_err(|e| ArchiveError::Client(format!("file reader task failed: {e}")))??;
    let sizes = Sizes { raw, body: body.len() as u64 };
    let outcome = store.put_create_body(key, body.into(), &sha, compression, &shown).await?;
    Ok((outcome, sizes))
}

/// Uncompressed over compressed bytes; 0 before anything was uploaded.
fn compression_ratio(uncompressed_bytes: u64, compressed_bytes: u64) -> f64 {
    if compressed_bytes == 0 {
        0.0
    } else {
        uncompressed_bytes as f64 / compressed_bytes as f64
    }
}

/// 1 s, 2 s, 4 s, ... up to [`BACKOFF_MAX`].
fn backoff(attempts: u32) -> Duration {
    Duration::from_secs(1u64 << attempts.saturating_sub(1).min(5)).min(BACKOFF_MAX)
}

fn tli_of(f: WalFileName) -> u32 {
    f.tli()
}

/// History files first (timelines', then backups'), then segments by (segno, timeline).
fn order_of(f: WalFileName) -> (u8, u64, u32) {
    match f {
        WalFileName::History { tli } => (0, 0, tli),
        WalFileName::Backup { tli, segno, .. } => (0, segno, tli),
        WalFileName::Segment { tli, segno } | WalFileName::Partial { tli, segno } => (1, segno, tli),
    }
}

/// The archived position of complete segments `((segno, tli), in the store)`: the start of the
/// first one not in the store, else the end of the last; None without segments.
pub fn archived_lsn(segments: impl Iterator<Item = ((u64, u32), bool)>, seg_size: u64) -> Option<Lsn> {
    let mut segs: Vec<((u64, u32), bool)> = segments.collect();
    segs.sort_unstable();
    let first_missing = segs.iter().find(|(_, done)| !done);
    match (first_missing, segs.last()) {
        (Some(((segno, _), _)), _) => Some(Lsn(segno * seg_size)),
        (None, Some(((segno, _), _))) => Some(Lsn((segno + 1) * seg_size)),
        (None, None) => None,
    }
}

/// The entries of the newest timeline history file among `names` (the files of `dir`); None: none,
/// or unreadable.
fn newest_history(dir: &Path, names: &[String], seg_size: u64) -> Option<Vec<HistoryEntry>> {
    let (_, newest) = names
        .iter()
        .filter_map(|n| match WalFileName::parse(n, seg_size)? {
            WalFileName::History { tli } => Some((tli, n)),
            _ => None,
        })
        .max()?;
    let text = std::fs::read_to_string(dir.join(newest)).ok()?;
    crate::wal::history::parse_history(&text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_is_the_first_gap() {
        let mib = 1 << 20;
        assert_eq!(archived_lsn(std::iter::empty(), mib), None);
        let s = |v: &[(u64, bool)]| archived_lsn(v.iter().map(|&(n, d)| ((n, 1), d)), mib);
        assert_eq!(s(&[(3, true), (4, true)]), Some(Lsn(5 * mib)));
        assert_eq!(s(&[(4, true), (3, false), (5, true)]), Some(Lsn(3 * mib)));
        assert_eq!(s(&[(3, true), (4, false)]), Some(Lsn(4 * mib)));
        // a timeline switch in segment 5: both files count
        let v = [((4, 1), true), ((5, 2), false), ((5, 1), true)];
        assert_eq!(archived_lsn(v.into_iter(), mib), Some(Lsn(5 * mib)));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(4));
        assert_eq!(backoff(100), BACKOFF_MAX);
    }

    #[test]
    fn config_limits() {
        let mut c = ArchiveConfig::new(ArchiveSettings::new("s3://bkt/p").unwrap());
        assert!(c.validate().is_ok());
        c.parallel = 0;
        assert!(c.validate().is_err());
        c.parallel = 4;
        c.scan_interval = Duration::ZERO;
        assert!(c.validate().is_err());
        assert!(!format!("{c:?}").contains("metrics"));
    }
}
