//! `walship restore %f %p --from s3://BUCKET/PREFIX`: PostgreSQL's `restore_command` served from
//! the archive, with a verified on-disk prefetch cache.
//!
//! When recovery asks for segment S and the cache does not hold it, S is fetched (checksum verified
//! by [`Store::get_verified`]), its long page header checked against its name and written to `%p`;
//! then S+1..=S+N of the same timeline are fetched in parallel into the cache (temp file, fsync,
//! rename, directory fsync), each verified the same way, before the process exits. The next calls
//! find S+1.. in the cache and are served with a rename. Only complete, verified files ever get a
//! final name in the cache; a process killed mid-download leaves `.NAME.PID.tmp` files, which are
//! never served and are removed by a later call once PID is gone.
//!
//! Why synchronous and not a detached background prefetcher: restore_command runs as a fresh
//! process per file, so a background prefetcher would have to outlive it, i.e. a daemon nobody
//! supervises that keeps writing into the data directory after PostgreSQL stopped, promoted or
//! switched timeline, and that needs a lock protocol against the next call. Fetching the batch
//! before exiting costs one round trip per N+1 segments (the downloads run in parallel), keeps
//! every byte of work inside the call PostgreSQL waits for, and leaves nothing running. Memory is
//! bounded by N+1 segments, the cache by `--cache-bytes-max`; served files are moved out, and files
//! of segments before the one served are deleted (recovery never goes back).
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::keys::timeline_prefix;
use super::settings::ArchiveSettings;
use super::store::Store;
use super::ArchiveError;
use crate::wal::control::ControlData;
use crate::wal::{has_segment_name_shape, is_valid_seg_size, PageHeader, WalFileName, WalIdentity};

/// Most segments fetched ahead (`--prefetch`).
pub const PREFETCH_MAX: usize = 64;

/// `walship restore --from ...`, validated by [`FetchConfig::validate`].
#[derive(Debug, Clone)]
pub struct FetchConfig {
    pub settings: ArchiveSettings,
    /// The cluster (`--system-id`); None: from `DATA_DIR/global/pg_control`, else the only cluster
    /// in the archive.
    pub system_id: Option<u64>,
    /// Segments fetched ahead of the one asked for (0 = none, no cache used).
    pub prefetch_count: usize,
    /// The cache (`--cache-dir`); one sub-folder per system identifier.
    pub cache_dir: PathBuf,
    /// The most bytes the cache holds, temp files included (`--cache-bytes-max`).
    pub cache_bytes_max: u64,
    /// Where `global/pg_control` is looked for: restore_command runs in the data directory.
    pub data_dir: PathBuf,
}

impl FetchConfig {
    pub fn validate(&self) -> Result<(), FetchError> {
        self.settings.validate()?;
        if self.prefetch_count > PREFETCH_MAX {
            return Err(FetchError::Option(format!("--prefetch {} must be 0..={PREFETCH_MAX}", self.prefetch_count)));
        }
        if self.prefetch_count > 0 && self.cache_bytes_max < 1 << 20 {
            return Err(FetchError::Option("--cache-bytes-max must be at least 1MiB (one segment) with --prefetch".into()));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{name} is not in the archive ({object})")]
    NotFound { name: String, object: String },
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("which cluster to restore: {0}")]
    SystemId(String),
    #[error("{object} is not the segment its name says: {why}")]
    WrongContent { object: String, why: String },
    #[error("the restore cache {path}: {source}")]
    Cache { path: PathBuf, source: std::io::Error },
    #[error("writing {path}: {source}")]
    Target { path: PathBuf, source: std::io::Error },
    #[error("restore option: {0}")]
    Option(String),
}

impl FetchError {
    /// Only "the archive does not hold this file" may end recovery (exit 1).
    pub fn is_not_found(&self) -> bool {
        matches!(self, FetchError::NotFound { .. })
    }
}

/// How a request was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// From the cache, prefetched by an earlier call.
    Cache(PathBuf),
    /// From the archive; `prefetched` more segments are in the cache now.
    Archive { object: String, prefetched: usize },
}

impl std::fmt::Display for Served {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Served::Cache(p) => write!(f, "restored from the prefetch cache {}", p.display()),
            Served::Archive { object, prefetched } => write!(f, "restored {object} ({prefetched} following segments prefetched)"),
        }
    }
}

/// The segments to fetch ahead of `segno`: `segno+1..=segno+prefetch_count`, minus those cached,
/// as long as the cache (now `cache_bytes_used`) stays within `cache_bytes_max`.
pub fn plan_prefetch(
    segno: u64,
    prefetch_count: usize,
    seg_size: u64,
    cache_bytes_used: u64,
    cache_bytes_max: u64,
    cached: &BTreeSet<u64>,
) -> Vec<u64> {
    let room_segments = cache_bytes_max.saturating_sub(cache_bytes_used) / seg_size.max(1);
    let last_segno = u64::MAX / seg_size.max(1);
    (1..=prefetch_count as u64)
        .filter_map(|k| segno.checked_add(k))
        .filter(|s| *s < last_segno && !cached.contains(s))
        .take(usize::try_from(room_segments).unwrap_or(usize::MAX))
        .collect()
}

/// One file of the cache folder, as [`cache_entries`] found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheFile {
    /// A complete, verified segment.
    Segment { name: String, segno: u64, bytes: u64 },
    /// A download in progress, or left by a process that was killed: `.NAME.PID.tmp`.
    Temp { name: String, pid: u32, bytes: u64 },
    Other { name: String },
}

/// What a cache folder's file `name` of `bytes` is (segments of `seg_size`, timeline `tli`).
pub fn classify(name: &str, bytes: u64, tli: u32, seg_size: u64) -> CacheFile {
    if let Some(rest) = name.strip_prefix('.').and_then(|r| r.strip_suffix(".tmp")) {
        if let Some(pid) = rest.rsplit_once('.').and_then(|(_, p)| p.parse::<u32>().ok()) {
            return CacheFile::Temp { name: name.to_string(), pid, bytes };
        }
    }
    match WalFileName::parse(name, seg_size) {
        Some(WalFileName::Segment { tli: t, segno }) if t == tli => CacheFile::Segment { name: name.to_string(), segno, bytes },
        _ => CacheFile::Other { name: name.to_string() },
    }
}

/// The files to delete once `served_segno` was served: every cached segment before it (recovery
/// moves forward), and temp files of processes that are gone (`alive(pid)` false).
pub fn evict(files: &[CacheFile], served_segno: u64, alive: impl Fn(u32) -> bool) -> Vec<String> {
    files
        .iter()
        .filter_map(|f| match f {
            CacheFile::Segment { name, segno, .. } if *segno < served_segno => Some(name.clone()),
            CacheFile::Temp { name, pid, .. } if !alive(*pid) => Some(name.clone()),
            _ => None,
        })
        .collect()
}

/// Serve `name` into `target`: from the cache when it is there, else from the archive (then
/// prefetching the next segments).
pub fn restore_from_archive(cfg: &FetchConfig, name: &str, target: &Path) -> Result<Served, FetchError> {
    cfg.validate()?;
    let (tli, is_segment) = match WalFileName::parse(name, 16 << 20) {
        Some(WalFileName::History { tli }) => (tli, false),
        _ if has_segment_name_shape(name) => (u32::from_str_radix(&name[..8], 16).unwrap_or(0), true),
        _ => return Err(FetchError::NotFound { name: name.to_string(), object: "(not a WAL segment or history file name)".into() }),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| FetchError::Archive(ArchiveError::Runtime(e)))?;
    let store = Store::new(&cfg.settings)?;
    let system_id = match cfg.system_id.or_else(|| system_id_from_control(&cfg.data_dir)) {
        Some(id) => id,
        None => rt.block_on(only_system_id(&store))?,
    };
    let cache = cfg.cache_dir.join(system_id.to_string());
    if is_segment && cfg.prefetch_count > 0 {
        if let Some(served) = serve_cached(&cache, name, tli, target)? {
            return Ok(served);
        }
    }
    let key = timeline_prefix(&cfg.settings.url.prefix, system_id, tli) + name;
    let mut object = store.describe(&key);
    let mut bytes = rt.block_on(store.get_verified(&key))?;
    if bytes.is_none() && is_segment {
        // The newest, unfinished segment: its `.partial` object (durable bytes, zeros after).
        let partial = format!("{key}.partial");
        bytes = rt.block_on(store.get_verified(&partial))?;
        if bytes.is_some() {
            object = store.describe(&partial);
        }
    }
    let Some(bytes) = bytes else {
        return Err(FetchError::NotFound { name: name.to_string(), object });
    };
    if !is_segment {
        std::fs::write(target, &bytes).map_err(|source| FetchError::Target { path: target.to_path_buf(), source })?;
        return Ok(Served::Archive { object, prefetched: 0 });
    }
    let (segno, seg_size) = check_segment(&bytes, name, system_id, &object)?;
    std::fs::write(target, &bytes).map_err(|source| FetchError::Target { path: target.to_path_buf(), source })?;
    drop(bytes);
    if cfg.prefetch_count == 0 {
        return Ok(Served::Archive { object, prefetched: 0 });
    }
    let ahead = Ahead { store: &store, cache: &cache, prefix: &cfg.settings.url.prefix, system_id, tli, seg_size };
    let prefetched = rt.block_on(ahead.prefetch(segno, cfg.prefetch_count, cfg.cache_bytes_max))?;
    Ok(Served::Archive { object, prefetched })
}

/// The system identifier in `DATA_DIR/global/pg_control`, if there is a readable one.
fn system_id_from_control(data_dir: &Path) -> Option<u64> {
    let bytes = std::fs::read(data_dir.join("global").join("pg_control")).ok()?;
    ControlData::parse(&bytes).ok().map(|c| c.system_id)
}

/// The archive's only cluster; an empty archive holds no file (not found), several need `--system-id`.
async fn only_system_id(store: &Store) -> Result<u64, FetchError> {
    let prefix = &store.settings().url.prefix;
    let root = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
    let ids: Vec<u64> = store
        .list_folders(&root)
        .await?
        .iter()
        .filter_map(|f| f.trim_end_matches('/').rsplit('/').next()?.parse().ok())
        .collect();
    match ids.as_slice() {
        [one] => Ok(*one),
        [] => Err(FetchError::NotFound { name: "(any file)".into(), object: store.describe(&root) }),
        many => Err(FetchError::SystemId(format!(
            "{} holds the WAL of {} clusters ({many:?}) and there is no global/pg_control here to tell which: pass --system-id",
            store.settings().url,
            many.len()
        ))),
    }
}

/// The downloaded `bytes` must be the segment `name` says, of cluster `system_id`. Returns (segno, seg_size).
fn check_segment(bytes: &[u8], name: &str, system_id: u64, object: &str) -> Result<(u64, u64), FetchError> {
    let wrong = |why: String| FetchError::WrongContent { object: object.to_string(), why };
    let id = WalIdentity::from_first_page(bytes).map_err(|e| wrong(format!("first page: {e}")))?;
    if !is_valid_seg_size(id.seg_size) || bytes.len() as u64 != id.seg_size {
        return Err(wrong(format!("{} bytes, its header says {}-byte segments", bytes.len(), id.seg_size)));
    }
    if id.system_id != system_id {
        return Err(wrong(format!("system identifier {}, expected {system_id}", id.system_id)));
    }
    let Some(WalFileName::Segment { segno, .. }) = WalFileName::parse(name, id.seg_size) else {
        return Err(wrong(format!("{name} is not a segment name for {}-byte segments", id.seg_size)));
    };
    let hdr = PageHeader::parse(bytes).map_err(|e| wrong(e.to_string()))?;
    if hdr.pageaddr.0 != segno * id.seg_size {
        return Err(wrong(format!("its first page is the WAL at {}, not of {name}", hdr.pageaddr)));
    }
    Ok((segno, id.seg_size))
}

/// The cached `name`, moved to `target`; None when the cache does not hold it.
fn serve_cached(cache: &Path, name: &str, tli: u32, target: &Path) -> Result<Option<Served>, FetchError> {
    let path = cache.join(name);
    let cache_err = |source| FetchError::Cache { path: path.clone(), source };
    let seg_size = match std::fs::metadata(&path) {
        Ok(m) if m.is_file() && is_valid_seg_size(m.len()) => m.len(),
        Ok(_) => return Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(cache_err(source)),
    };
    let Some(WalFileName::Segment { segno, .. }) = WalFileName::parse(name, seg_size) else { return Ok(None) };
    if std::fs::rename(&path, target).is_err() {
        // Another file system: copy, then delete the cached file.
        std::fs::copy(&path, target).map_err(|source| FetchError::Target { path: target.to_path_buf(), source })?;
        std::fs::remove_file(&path).map_err(cache_err)?;
    }
    remove_evicted(cache, tli, seg_size, segno);
    Ok(Some(Served::Cache(path)))
}

/// Every file of the cache folder (none if it does not exist).
fn cache_entries(cache: &Path, tli: u32, seg_size: u64) -> Vec<CacheFile> {
    let Ok(dir) = std::fs::read_dir(cache) else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let bytes = e.metadata().ok()?.len();
            Some(classify(&name, bytes, tli, seg_size))
        })
        .collect()
}

/// Delete what [`evict`] says (best effort: a file that cannot be deleted is deleted next time).
fn remove_evicted(cache: &Path, tli: u32, seg_size: u64, served_segno: u64) {
    let alive = |pid: u32| Path::new("/proc").join(pid.to_string()).exists();
    for name in evict(&cache_entries(cache, tli, seg_size), served_segno, alive) {
        let _ = std::fs::remove_file(cache.join(name));
    }
}

/// What the prefetch of one timeline needs.
struct Ahead<'a> {
    store: &'a Store,
    cache: &'a Path,
    prefix: &'a str,
    system_id: u64,
    tli: u32,
    seg_size: u64,
}

impl Ahead<'_> {
    /// Fetch the planned segments after `segno` into the cache, in parallel; returns how many are
    /// there now. A segment the archive does not hold (yet) ends the batch quietly; any other
    /// failure is logged and left to the call that asks for that segment (where it is fatal).
    async fn prefetch(&self, segno: u64, prefetch_count: usize, cache_bytes_max: u64) -> Result<usize, FetchError> {
        std::fs::create_dir_all(self.cache).map_err(|source| FetchError::Cache { path: self.cache.to_path_buf(), source })?;
        remove_evicted(self.cache, self.tli, self.seg_size, segno + 1);
        let files = cache_entries(self.cache, self.tli, self.seg_size);
        let used: u64 = files.iter().map(|f| match f {
            CacheFile::Segment { bytes, .. } | CacheFile::Temp { bytes, .. } => *bytes,
            CacheFile::Other { .. } => 0,
        }).sum();
        let cached: BTreeSet<u64> = files.iter().filter_map(|f| match f {
            CacheFile::Segment { segno, .. } => Some(*segno),
            _ => None,
        }).collect();
        let plan = plan_prefetch(segno, prefetch_count, self.seg_size, used, cache_bytes_max, &cached);
        let fetches = plan.iter().map(|&s| self.fetch_one(s));
        let results = futures_join_all(fetches).await;
        let mut done = 0;
        for (s, r) in plan.iter().zip(results) {
            match r {
                Ok(true) => done += 1,
                Ok(false) => {}
                Err(e) => tracing::warn!("prefetching segment {s:X} failed (it is fetched again when asked for): {e}"),
            }
        }
        if done > 0 {
            std::fs::File::open(self.cache).and_then(|d| d.sync_all()).map_err(|source| FetchError::Cache { path: self.cache.to_path_buf(), source })?;
        }
        Ok(done + cached.iter().filter(|&&s| s > segno && s <= segno + prefetch_count as u64).count())
    }

    /// One segment into the cache: verified, written to a temp file, fsynced, renamed. false: not in the archive.
    async fn fetch_one(&self, segno: u64) -> Result<bool, FetchError> {
        let name = crate::wal::segment_file_name(self.tli, segno, self.seg_size);
        let key = timeline_prefix(self.prefix, self.system_id, self.tli) + &name;
        let object = self.store.describe(&key);
        let Some(bytes) = self.store.get_verified(&key).await? else { return Ok(false) };
        check_segment(&bytes, &name, self.system_id, &object)?;
        let temp = self.cache.join(format!(".{name}.{}.tmp", std::process::id()));
        let final_path = self.cache.join(&name);
        tokio::task::spawn_blocking(move || write_durably(&temp, &final_path, &bytes))
            .await
            .map_err(|e| FetchError::Option(format!("cache writer task failed: {e}")))??;
        Ok(true)
    }
}

/// `bytes` to `temp`, fsync, rename to `final_path`: a final name only ever holds a whole file.
fn write_durably(temp: &Path, final_path: &Path, bytes: &[u8]) -> Result<(), FetchError> {
    let err = |source| FetchError::Cache { path: temp.to_path_buf(), source };
    let mut f = std::fs::File::create(temp).map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(temp, final_path).map_err(err)
}

/// Run every future to completion concurrently (tokio has no join_all; a JoinSet needs 'static).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futs.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    out.into_iter().map(|v| v.expect("every future finished")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB16: u64 = 16 << 20;

    #[test]
    fn prefetch_plan_skips_cached_and_respects_the_cache_bound() {
        let none = BTreeSet::new();
        assert_eq!(plan_prefetch(10, 3, MIB16, 0, 1 << 30, &none), vec![11, 12, 13]);
        assert_eq!(plan_prefetch(10, 0, MIB16, 0, 1 << 30, &none), Vec::<u64>::new());
        let cached: BTreeSet<u64> = [12].into();
        assert_eq!(plan_prefetch(10, 3, MIB16, MIB16, 1 << 30, &cached), vec![11, 13]);
        // room for two more segments only
        assert_eq!(plan_prefetch(10, 8, MIB16, MIB16, 3 * MIB16, &none), vec![11, 12]);
        assert_eq!(plan_prefetch(u64::MAX / MIB16 - 1, 4, MIB16, 0, 1 << 30, &none), Vec::<u64>::new());
    }

    #[test]
    fn cache_files_are_told_apart() {
        let seg = crate::wal::segment_file_name(1, 5, MIB16);
        assert_eq!(classify(&seg, MIB16, 1, MIB16), CacheFile::Segment { name: seg.clone(), segno: 5, bytes: MIB16 });
        assert!(matches!(classify(&seg, MIB16, 2, MIB16), CacheFile::Other { .. }));
        let tmp = format!(".{seg}.4242.tmp");
        assert_eq!(classify(&tmp, 7, 1, MIB16), CacheFile::Temp { name: tmp.clone(), pid: 4242, bytes: 7 });
        assert!(matches!(classify("notes.txt", 1, 1, MIB16), CacheFile::Other { .. }));
    }

    #[test]
    fn eviction_deletes_what_recovery_passed_and_dead_temp_files() {
        let files = vec![
            CacheFile::Segment { name: "a".into(), segno: 4, bytes: 1 },
            CacheFile::Segment { name: "b".into(), segno: 5, bytes: 1 },
            CacheFile::Segment { name: "c".into(), segno: 6, bytes: 1 },
            CacheFile::Temp { name: "t1".into(), pid: 1, bytes: 1 },
            CacheFile::Temp { name: "t2".into(), pid: 2, bytes: 1 },
            CacheFile::Other { name: "o".into() },
        ];
        assert_eq!(evict(&files, 5, |pid| pid == 1), vec!["a".to_string(), "t2".to_string()]);
    }

    proptest! {
        #[test]
        fn plan_is_bounded_ahead_and_never_refetches(
            segno in 0u64..1_000_000, n in 0usize..64, used_segs in 0u64..80, max_segs in 0u64..80,
            cached in proptest::collection::btree_set(0u64..1_000_100, 0..40),
        ) {
            let plan = plan_prefetch(segno, n, MIB16, used_segs * MIB16, max_segs * MIB16, &cached);
            prop_assert!(plan.len() <= n);
            prop_assert!(used_segs * MIB16 + plan.len() as u64 * MIB16 <= (max_segs * MIB16).max(used_segs * MIB16));
            for s in &plan {
                prop_assert!(*s > segno && *s <= segno + n as u64 && !cached.contains(s));
            }
            prop_assert!(plan.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
