//! Local retention of a receiver's directory (`walship recv --keep-local SIZE|DURATION`): a thread
//! of its own (never the io_uring data path) that looks at the directory every interval, asks the
//! pure planner ([`crate::archive::retention::plan`]) what may go, deletes it, fsyncs the
//! directory, logs each delete with its reason and keeps the `walship_recv_retention_*` metrics.
//!
//! With an archive, a segment counts as archived only when this process's archiver found it in
//! the store or uploaded it ([`ArchivedNames`]): after a restart nothing is deleted before the
//! archiver has looked again, and while the store is down nothing is deleted at all. Floors:
//! `--keep-from LSN` and the START WAL LOCATION of the newest `.backup` file in the directory.
use std::collections::BTreeSet;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::archive::archiver::ArchivedNames;
use crate::archive::retention::{self, FileInfo, Floor, Plan, Policy};
use crate::metrics::LsnGauge;
use crate::wal::{has_segment_name_shape, read_segment_head, Lsn, WalFileName, WalIdentity};

/// Largest backup history file read for its START WAL LOCATION (PostgreSQL's are below 2 KiB).
const BACKUP_FILE_BYTES_MAX: u64 = 64 << 10;

/// `--keep-local`, `--keep-from`, `--retention-interval`, validated.
#[derive(Debug, Clone)]
pub struct RetentionConfig {
    pub policy: Policy,
    /// `--keep-from LSN`: nothing holding WAL at or after it is deleted.
    pub keep_from: Option<Lsn>,
    /// How often the directory is looked at.
    pub interval: Duration,
    pub metrics: Arc<RetentionMetrics>,
}

impl RetentionConfig {
    pub fn new(policy: Policy) -> RetentionConfig {
        RetentionConfig { policy, keep_from: None, interval: Duration::from_secs(10), metrics: Arc::default() }
    }
}

/// `walship_recv_retention_*`.
#[derive(Debug, Default)]
pub struct RetentionMetrics {
    pub deleted_segments: Counter,
    pub deleted_bytes: Counter,
    /// Bytes of WAL files left in the directory after the last pass.
    pub kept_bytes: Gauge,
    /// The binding floor of the last pass (0: none).
    pub floor_lsn: LsnGauge,
    /// Deletes that failed (each is tried again at the next pass).
    pub failures: Counter,
}

impl RetentionMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("recv_retention_deleted_segments", "Segments deleted by local retention (--keep-local)", self.deleted_segments.clone());
        registry.register("recv_retention_deleted_bytes", "Bytes of segments deleted by local retention", self.deleted_bytes.clone());
        registry.register("recv_retention_kept_bytes", "Bytes of WAL files kept in the directory after the last retention pass", self.kept_bytes.clone());
        registry.register("recv_retention_floor_lsn", "The binding retention floor (--keep-from or the newest base backup's start; 0: none)", self.floor_lsn.clone());
        registry.register("recv_retention_failures", "Deletes that failed (tried again at the next pass)", self.failures.clone());
    }
}

/// The running retention thread; dropping it stops it.
pub struct Retention {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Retention {
    /// Start retention over `dir`; `archived` is the archiver's list (None: no archive, every
    /// complete segment counts as archived, which start-up warns about).
    pub fn start(cfg: &RetentionConfig, dir: &Path, archived: Option<ArchivedNames>) -> std::io::Result<Retention> {
        match &archived {
            Some(_) => info!(policy = %cfg.policy, keep_from = ?cfg.keep_from, "local retention: deleting archived segments beyond the policy"),
            None => warn!(
                policy = %cfg.policy,
                "local retention WITHOUT an archive (--archive-to): segments beyond the policy are DELETED and exist nowhere else \
                 (unless something else copies them); floors still hold"
            ),
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut pass = Pass { dir: dir.to_path_buf(), cfg: cfg.clone(), archived, seg_size: None };
        let stop2 = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("walship-retention".into()).spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                pass.run();
                let mut waited = Duration::ZERO;
                while waited < pass.cfg.interval && !stop2.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                    waited += Duration::from_millis(100);
                }
            }
        })?;
        Ok(Retention { stop, thread: Some(thread) })
    }
}

impl Drop for Retention {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Pass {
    dir: PathBuf,
    cfg: RetentionConfig,
    archived: Option<ArchivedNames>,
    seg_size: Option<u64>,
}

impl Pass {
    fn run(&mut self) {
        let listed = match list(&self.dir) {
            Ok(l) => l,
            Err(e) => {
                warn!(dir = %self.dir.display(), "retention cannot read the directory: {e}");
                return;
            }
        };
        let Some(seg_size) = self.seg_size.or_else(|| segment_size(&self.dir, &listed)) else { return };
        self.seg_size = Some(seg_size);
        let archived: Option<BTreeSet<String>> = self.archived.as_ref().map(|a| a.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let files: Vec<FileInfo> = listed
            .into_iter()
            .map(|(name, bytes, age)| {
                let is_archived = archived.as_ref().is_none_or(|set| set.contains(&name));
                FileInfo { name, bytes, age, archived: is_archived }
            })
            .collect();
        let floors = self.floors(&files, seg_size);
        let plan = retention::plan(&files, self.cfg.policy, &floors, seg_size);
        self.carry_out(&plan);
    }

    /// `--keep-from` and the newest backup history file's start.
    fn floors(&self, files: &[FileInfo], seg_size: u64) -> Vec<Floor> {
        let mut floors: Vec<Floor> = self.cfg.keep_from.map(|lsn| Floor { lsn, source: "--keep-from".into() }).into_iter().collect();
        let backups: Vec<(&str, Option<String>)> = files
            .iter()
            .filter(|f| matches!(WalFileName::parse(&f.name, seg_size), Some(WalFileName::Backup { .. })))
            .map(|f| (f.name.as_str(), read_small(&self.dir.join(&f.name))))
            .collect();
        floors.extend(retention::newest_backup_floor(backups.iter().map(|(n, c)| (*n, c.as_deref())), seg_size));
        floors
    }

    fn carry_out(&self, plan: &Plan) {
        let m = &self.cfg.metrics;
        let mut deleted_bytes = 0;
        let mut deleted: Vec<&str> = Vec::new();
        for d in &plan.delete {
            let path = self.dir.join(&d.name);
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    info!(file = %d.name, bytes = d.bytes, "retention deleted {}: {}", d.name, d.why);
                    m.deleted_segments.inc();
                    m.deleted_bytes.inc_by(d.bytes);
                    deleted_bytes += d.bytes;
                    deleted.push(&d.name);
                }
                Err(e) => {
                    m.failures.inc();
                    warn!(file = %path.display(), "retention could not delete {}: {e}", d.name);
                }
            }
        }
        if !deleted.is_empty() {
            if let Err(e) = File::open(&self.dir).and_then(|d| d.sync_all()) {
                warn!(dir = %self.dir.display(), "retention could not fsync the directory after deleting: {e}");
            }
            if let Some(a) = &self.archived {
                let mut set = a.lock().unwrap_or_else(|p| p.into_inner());
                for n in &deleted {
                    set.remove(*n);
                }
            }
            let kept_segments = plan.keep.iter().filter(|k| has_segment_name_shape(&k.name)).count();
            info!(deleted = deleted.len(), deleted_bytes, kept_segments, floor = ?plan.floor.as_ref().map(|f| f.lsn), "retention pass done");
        }
        m.kept_bytes.set(i64::try_from(plan.kept_bytes()).unwrap_or(i64::MAX));
        m.floor_lsn.set(plan.floor.as_ref().map_or(0, |f| f.lsn.0));
    }
}

/// (name, size, age) of every regular file in `dir`.
fn list(dir: &Path) -> std::io::Result<Vec<(String, u64, Duration)>> {
    let now = SystemTime::now();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else { continue };
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_file() {
            let age = meta.modified().ok().and_then(|t| now.duration_since(t).ok()).unwrap_or_default();
            out.push((name, meta.len(), age));
        }
    }
    Ok(out)
}

/// The segment size, from the long page header of the first complete segment.
fn segment_size(dir: &Path, listed: &[(String, u64, Duration)]) -> Option<u64> {
    listed.iter().filter(|(n, _, _)| has_segment_name_shape(n)).find_map(|(n, _, _)| {
        let head = read_segment_head(&dir.join(n)).ok()?;
        WalIdentity::from_first_page(&head).ok().map(|id| id.seg_size)
    })
}

/// The text of a small file (None when it cannot be read or is too large to be a backup file).
fn read_small(path: &Path) -> Option<String> {
    let mut s = String::new();
    File::open(path).ok()?.take(BACKUP_FILE_BYTES_MAX).read_to_string(&mut s).ok()?;
    Some(s)
}
