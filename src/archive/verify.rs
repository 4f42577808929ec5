//! `walship verify DIR | s3://BUCKET/PREFIX`: per timeline, no segment missing between the first and
//! the last, and every record of every complete segment valid, walked across segment boundaries with
//! the sender's record walk (`wal::RecordWalker`: page headers with `xlp_pageaddr` and timeline,
//! continuation records, `xl_prev`, CRC-32C, switch padding); one system identifier and segment
//! size; history files that parse and name only older timelines. The first problem is named by file,
//! offset and LSN. From the store every object is read through
//! [`Store::get_verified`](super::Store::get_verified), so a changed byte is a problem even where WAL
//! checks could not see it. History files are checked even where there is no segment. A `.partial`
//! right after a timeline's last complete segment (the receiver's newest, unfinished segment) is
//! walked on from that segment: the report says how far its valid WAL goes and why it ends there
//! (zeros: the usual end; a torn last record: bytes not yet received). A `.partial` with a gap
//! before it is a missing segment; one whose complete twin exists is a leftover and is not read.
//!
//! Incremental runs (`--state FILE`): after a run that found nothing wrong, the state file records
//! every file verified with a change token (in the store: its ETag and size from the listing, which
//! change whenever the object is written again; in a directory: size and modification time) and
//! the WAL identity read from the first segment. The next run reads only files whose token is new
//! or changed; the names are still all compared, so a deleted segment is still found missing. The
//! record walk of each timeline restarts at the last unchanged segment before the first new one:
//! that one segment is read again so that a record spanning into the new segment is checked whole
//! (CRC over both parts, `xl_prev`), which needs no walker state in the file and cannot go stale.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ArchiveError, ArchiveSettings, BlockingStore};
use crate::wal::history::parse_history;
use crate::wal::{EndReason, Lsn, RecordWalker, SegmentWalk, WalFileName, WalIdentity};

/// The first thing found wrong.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file (or object key) it is in, or the name of the file that is missing.
    pub file: String,
    /// Byte offset in the file, when it is about a place in it.
    pub offset: Option<u64>,
    /// The LSN of that place (a missing segment: its first LSN).
    pub lsn: Option<String>,
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(o) = self.offset {
            write!(f, " at offset {o}")?;
        }
        if let Some(l) = &self.lsn {
            write!(f, " (LSN {l})")?;
        }
        write!(f, ": {}", self.what)
    }
}

/// One timeline of one cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TimelineReport {
    pub system_id: u64,
    pub timeline: u32,
    pub first: Option<String>,
    pub last: Option<String>,
    pub segments: u64,
    pub history: bool,
    /// The `.partial` after the last segment, and how far its valid WAL goes.
    pub partial: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub target: String,
    pub ok: bool,
    pub timelines: Vec<TimelineReport>,
    pub files_checked: u64,
    pub bytes_checked: u64,
    /// `.partial` files seen (the one after a timeline's last segment is walked; see `partial`).
    pub partial_files: u64,
    /// Files not read again: verified by an earlier run (`--state`) and unchanged since.
    pub skipped_verified: u64,
    pub problem: Option<Problem>,
}

/// Where the files come from: a directory, or one cluster's timeline folders in the store.
trait Source {
    /// (display name, file name) of every file, grouped by nothing.
    fn names(&mut self) -> Result<Vec<(String, String)>, ArchiveError>;
    /// The bytes of a file by its display name; Err(Problem) when it cannot be read as it should.
    fn read(&mut self, shown: &str) -> Result<Vec<u8>, Problem>;
    /// What changes when the file's content is written again (after `names`); None: unknown.
    fn token(&self, shown: &str) -> Option<String>;
}

/// What an incremental run (`--state FILE`) remembers; see the module comment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyState {
    /// What was verified (a directory or s3://BUCKET/PREFIX): a state of another target is not used.
    pub target: String,
    /// Display name -> change token of every file verified.
    pub files: BTreeMap<String, String>,
    /// The WAL identity read from a verified first segment, by that segment's display name.
    pub identities: BTreeMap<String, StoredIdentity>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIdentity {
    pub system_id: u64,
    pub seg_size: u64,
    pub block_size: u64,
    pub magic: u16,
    pub tli: u32,
}

impl From<WalIdentity> for StoredIdentity {
    fn from(i: WalIdentity) -> Self {
        StoredIdentity { system_id: i.system_id, seg_size: i.seg_size, block_size: i.block_size, magic: i.magic, tli: i.tli }
    }
}

impl From<StoredIdentity> for WalIdentity {
    fn from(i: StoredIdentity) -> Self {
        WalIdentity { system_id: i.system_id, seg_size: i.seg_size, block_size: i.block_size, magic: i.magic, tli: i.tli }
    }
}

/// The state of the previous run and the one this run builds.
#[derive(Debug, Default)]
struct Incremental {
    old: VerifyState,
    new: VerifyState,
}

impl Incremental {
    fn unchanged(&self, shown: &str, token: &Option<String>) -> bool {
        token.as_ref().is_some_and(|t| self.old.files.get(shown) == Some(t))
    }
    fn done(&mut self, shown: &str, token: Option<String>) {
        if let Some(t) = token {
            self.new.files.insert(shown.to_string(), t);
        }
    }
}

/// The last segment number of the run of unchanged segments starting at `first`: the walk of a
/// timeline skips everything before it and restarts there (None: nothing to skip).
pub fn verified_prefix_end(first: u64, last: u64, unchanged: impl Fn(u64) -> bool) -> Option<u64> {
    let mut end = None;
    let mut s = first;
    while s <= last && unchanged(s) {
        end = Some(s);
        s += 1;
    }
    end
}

struct DirSource(PathBuf);

impl Source for DirSource {
    fn names(&mut self) -> Result<Vec<(String, String)>, ArchiveError> {
        let io = |source| ArchiveError::Local { path: self.0.clone(), source };
        let mut v = Vec::new();
        for e in std::fs::read_dir(&self.0).map_err(io)? {
            let e = e.map_err(|source| ArchiveError::Local { path: self.0.clone(), source })?;
            if let Ok(n) = e.file_name().into_string() {
                v.push((self.0.join(&n).display().to_string(), n));
            }
        }
        Ok(v)
    }
    fn token(&self, shown: &str) -> Option<String> {
        let m = std::fs::metadata(shown).ok()?;
        let mtime = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(format!("size={} mtime_ns={}", m.len(), mtime.as_nanos()))
    }
    fn read(&mut self, shown: &str) -> Result<Vec<u8>, Problem> {
        std::fs::read(shown).map_err(|e| Problem { file: shown.to_string(), offset: None, lsn: None, what: format!("cannot read: {e}") })
    }
}

struct StoreSource<'a> {
    store: &'a BlockingStore,
    /// Timeline folders (`PREFIX/SYSID/TTTTTTTT/`).
    folders: Vec<String>,
    /// Key -> change token, from the listing.
    tokens: HashMap<String, String>,
}

impl Source for StoreSource<'_> {
    fn names(&mut self) -> Result<Vec<(String, String)>, ArchiveError> {
        let mut v = Vec::new();
        for folder in &self.folders {
            for o in self.store.list(folder)? {
                let name = o.key.rsplit('/').next().unwrap_or("").to_string();
                if let Some(tag) = &o.e_tag {
                    self.tokens.insert(o.key.clone(), format!("etag={tag} size={}", o.size));
                }
                v.push((o.key, name));
            }
        }
        Ok(v)
    }
    fn token(&self, shown: &str) -> Option<String> {
        self.tokens.get(shown).cloned()
    }
    fn read(&mut self, shown: &str) -> Result<Vec<u8>, Problem> {
        let p = |what: String| Problem { file: self.store.store().describe(shown), offset: None, lsn: None, what };
        match self.store.get_verified(shown) {
            Ok(Some(b)) => Ok(b.to_vec()),
            Ok(None) => Err(p("listed, then not found".into())),
            Err(e) => Err(p(e.to_string())),
        }
    }
}

/// Verify a receiver directory.
pub fn verify_dir(dir: &Path) -> Result<VerifyReport, ArchiveError> {
    verify_dir_incremental(dir, None)
}

/// Verify a receiver directory; with `state`, only what changed since the last good run (see the module comment).
pub fn verify_dir_incremental(dir: &Path, state: Option<&Path>) -> Result<VerifyReport, ArchiveError> {
    let target = dir.display().to_string();
    let mut inc = state.map(|p| load_state(p, &target)).transpose()?;
    let mut report = empty(target);
    run(&mut DirSource(dir.to_path_buf()), None, &mut report, inc.as_mut())?;
    finish(report, state, inc)
}

/// Verify every cluster and timeline under `s3://BUCKET/PREFIX`.
pub fn verify_store(settings: &ArchiveSettings) -> Result<VerifyReport, ArchiveError> {
    verify_store_incremental(settings, None)
}

/// [`verify_store`], reading only what changed since the last good run recorded in `state`.
pub fn verify_store_incremental(settings: &ArchiveSettings, state: Option<&Path>) -> Result<VerifyReport, ArchiveError> {
    let store = BlockingStore::new(settings)?;
    let prefix = &settings.url.prefix;
    let root = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
    let target = settings.url.to_string();
    let mut inc = state.map(|p| load_state(p, &target)).transpose()?;
    let mut report = empty(target);
    for sysid_folder in store.list_folders(&root)? {
        let Some(sysid) = sysid_folder.trim_end_matches('/').rsplit('/').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
        let folders = store.list_folders(&format!("{root}{sysid}/"))?;
        run(&mut StoreSource { store: &store, folders, tokens: HashMap::new() }, Some(sysid), &mut report, inc.as_mut())?;
        if report.problem.is_some() {
            break;
        }
    }
    finish(report, state, inc)
}

/// The state in `path` (none yet: an empty one); a state of another target is not used.
fn load_state(path: &Path, target: &str) -> Result<Incremental, ArchiveError> {
    let local = |source| ArchiveError::Local { path: path.to_path_buf(), source };
    let old = match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice::<VerifyState>(&bytes)
            .map_err(|e| local(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a walship verify state: {e}"))))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => VerifyState::default(),
        Err(e) => return Err(local(e)),
    };
    let old = if old.target == target { old } else { VerifyState::default() };
    Ok(Incremental { old, new: VerifyState { target: target.to_string(), ..VerifyState::default() } })
}

/// Sets `ok`; after a good run, writes the new state (temp file, fsync, rename).
fn finish(mut report: VerifyReport, state: Option<&Path>, inc: Option<Incremental>) -> Result<VerifyReport, ArchiveError> {
    report.ok = report.problem.is_none();
    if let (true, Some(path), Some(inc)) = (report.ok, state, inc) {
        let local = |source| ArchiveError::Local { path: path.to_path_buf(), source };
        let json = serde_json::to_vec_pretty(&inc.new).map_err(|e| local(std::io::Error::other(e)))?;
        let temp = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            use std::io::Write;
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            std::fs::rename(&temp, path)
        };
        write().map_err(local)?;
    }
    Ok(report)
}

fn empty(target: String) -> VerifyReport {
    VerifyReport { target, ok: false, timelines: Vec::new(), files_checked: 0, bytes_checked: 0, partial_files: 0, skipped_verified: 0, problem: None }
}

fn problem(file: &str, offset: Option<u64>, lsn: Option<Lsn>, what: impl Into<String>) -> Problem {
    Problem { file: file.to_string(), offset, lsn: lsn.map(|l| l.to_string()), what: what.into() }
}

/// Check everything `src` holds; the first problem goes into `report.problem`.
fn run(src: &mut dyn Source, expect_sysid: Option<u64>, report: &mut VerifyReport, mut inc: Option<&mut Incremental>) -> Result<(), ArchiveError> {
    let mut sorted = src.names()?;
    sorted.sort_by(|a, b| a.1.cmp(&b.1));
    report.partial_files += sorted.iter().filter(|(_, n)| n.ends_with(".partial")).count() as u64;
    // History files first: they are checked even where there is no segment.
    let histories: BTreeMap<u32, String> = sorted
        .iter()
        .filter_map(|(shown, name)| match WalFileName::parse(name, 16 << 20) {
            Some(WalFileName::History { tli }) => Some((tli, shown.clone())),
            _ => None,
        })
        .collect();
    if let Err(p) = check_histories(src, &histories, report, inc.as_deref_mut()) {
        report.problem = Some(p);
        return Ok(());
    }
    let (id, mut first_read) = match identity(src, &sorted, inc.as_deref_mut()) {
        Ok(Some(found)) => found,
        Ok(None) => return Ok(()), // no segment: the history files were all there was to check
        Err(p) => {
            report.problem = Some(p);
            return Ok(());
        }
    };
    if let Some(want) = expect_sysid {
        if id.system_id != want {
            report.problem = Some(problem(&sorted[0].0, Some(0), None, format!("system identifier {} in a folder of {want}", id.system_id)));
            return Ok(());
        }
    }
    let mut segs: BTreeMap<u32, BTreeMap<u64, String>> = BTreeMap::new();
    let mut partials: BTreeMap<u32, (u64, String)> = BTreeMap::new();
    for (shown, name) in &sorted {
        match WalFileName::parse(name, id.seg_size) {
            Some(WalFileName::Segment { tli, segno }) => {
                segs.entry(tli).or_default().insert(segno, shown.clone());
            }
            Some(WalFileName::Partial { tli, segno }) => {
                // The newest per timeline (sorted by name: the last one wins).
                partials.insert(tli, (segno, shown.clone()));
            }
            _ => {}
        }
    }
    for (&tli, by_segno) in &segs {
        let (first, last) = (*by_segno.keys().next().expect("non-empty"), *by_segno.keys().last().expect("non-empty"));
        report.timelines.push(TimelineReport {
            system_id: id.system_id,
            timeline: tli,
            first: by_segno.get(&first).map(|s| name_of(s)),
            last: by_segno.get(&last).map(|s| name_of(s)),
            segments: by_segno.len() as u64,
            history: histories.contains_key(&tli),
            partial: None,
        });
        if tli > 1 && !histories.contains_key(&tli) {
            let shown = &by_segno[&first];
            report.problem = Some(problem(shown, None, None, format!("timeline {tli} has segments but no history file {}", crate::wal::history_file_name(tli))));
            return Ok(());
        }
        let partial = match partials.get(&tli) {
            Some((segno, shown)) if *segno == last + 1 => Some(shown.clone()),
            Some((segno, shown)) if *segno > last + 1 => {
                let missing = crate::wal::segment_file_name(tli, last + 1, id.seg_size);
                report.problem = Some(problem(&missing, None, Some(Lsn((last + 1) * id.seg_size)), format!("segment missing (before {})", name_of(shown))));
                return Ok(());
            }
            _ => None, // a leftover: its complete twin (or a later segment) exists
        };
        let tl = Timeline { id: WalIdentity { tli, ..id }, by_segno, first, last, partial };
        if let Err(p) = tl.walk(src, &mut first_read, report, inc.as_deref_mut()) {
            report.problem = Some(p);
            return Ok(());
        }
    }
    Ok(())
}

/// History files parse and name only older timelines.
fn check_histories(
    src: &mut dyn Source,
    histories: &BTreeMap<u32, String>,
    report: &mut VerifyReport,
    mut inc: Option<&mut Incremental>,
) -> Result<(), Problem> {
    for (&tli, shown) in histories {
        let token = src.token(shown);
        if let Some(i) = inc.as_deref_mut().filter(|i| i.unchanged(shown, &token)) {
            report.skipped_verified += 1;
            i.done(shown, token);
            continue;
        }
        let bytes = read_checked(src, shown, None, report)?;
        let text = String::from_utf8_lossy(&bytes);
        let entries = parse_history(&text).map_err(|e| problem(shown, None, None, e.to_string()))?;
        if let Some(bad) = entries.iter().find(|e| e.tli >= tli) {
            return Err(problem(shown, None, Some(bad.switch_lsn), format!("names timeline {} which is not older than {tli}", bad.tli)));
        }
        if let Some(i) = inc.as_deref_mut() {
            i.done(shown, token);
        }
    }
    Ok(())
}

/// The WAL identity from the first segment's long header (from the state when that segment is
/// unchanged), with the bytes read for it (kept so they are not read twice). None: no segment.
fn identity(
    src: &mut dyn Source,
    sorted: &[(String, String)],
    inc: Option<&mut Incremental>,
) -> Result<Option<(WalIdentity, FirstRead)>, Problem> {
    let Some((shown, _)) = sorted.iter().find(|(_, n)| crate::wal::has_segment_name_shape(n)) else { return Ok(None) };
    let token = src.token(shown);
    if let Some(i) = inc {
        if i.unchanged(shown, &token) {
            if let Some(stored) = i.old.identities.get(shown) {
                i.new.identities.insert(shown.clone(), *stored);
                return Ok(Some(((*stored).into(), None)));
            }
        }
        let bytes = src.read(shown)?;
        let id = WalIdentity::from_first_page(&bytes).map_err(|e| problem(shown, Some(0), None, format!("first page: {e}")))?;
        i.new.identities.insert(shown.clone(), id.into());
        return Ok(Some((id, Some((shown.clone(), bytes)))));
    }
    let bytes = src.read(shown)?;
    let id = WalIdentity::from_first_page(&bytes).map_err(|e| problem(shown, Some(0), None, format!("first page: {e}")))?;
    Ok(Some((id, Some((shown.clone(), bytes)))))
}

/// A segment read already (display name, bytes), kept so it is not read twice.
type FirstRead = Option<(String, Vec<u8>)>;

/// One timeline's segments, by segment number.
struct Timeline<'a> {
    id: WalIdentity,
    by_segno: &'a BTreeMap<u64, String>,
    first: u64,
    last: u64,
    /// The `.partial` right after `last`, if any.
    partial: Option<String>,
}

impl Timeline<'_> {
    /// No segment missing between first and last; every record valid across the boundaries. With
    /// `inc`, the unchanged segments from the first on are skipped, and the walk restarts at the
    /// last of them (read again) when newer segments follow.
    fn walk(
        &self,
        src: &mut dyn Source,
        first_read: &mut FirstRead,
        report: &mut VerifyReport,
        mut inc: Option<&mut Incremental>,
    ) -> Result<(), Problem> {
        let (tli, seg_size) = (self.id.tli, self.id.seg_size);
        let verified_end = inc.as_deref().and_then(|i| {
            verified_prefix_end(self.first, self.last, |s| self.by_segno.get(&s).is_some_and(|shown| i.unchanged(shown, &src.token(shown))))
        });
        let mut walker: Option<RecordWalker> = None;
        for segno in self.first..=self.last {
            let Some(shown) = self.by_segno.get(&segno) else {
                let missing = crate::wal::segment_file_name(tli, segno, seg_size);
                let before = crate::wal::segment_file_name(tli, segno - 1, seg_size);
                let what = format!("segment missing (timeline {tli} has {before} and later segments)");
                return Err(problem(&missing, None, Some(Lsn(segno * seg_size)), what));
            };
            let token = src.token(shown);
            // With a `.partial` after it, the last segment is read again: the walk goes on into it.
            if verified_end.is_some_and(|end| segno < end || (end == self.last && self.partial.is_none())) {
                report.skipped_verified += 1;
                if let Some(i) = inc.as_deref_mut() {
                    i.done(shown, token);
                }
                continue;
            }
            let bytes = read_checked(src, shown, first_read.take(), report)?;
            if bytes.len() as u64 != seg_size {
                return Err(problem(shown, None, None, format!("{} bytes, a segment has {seg_size}", bytes.len())));
            }
            let start = Lsn(segno * seg_size);
            let walker = walker.get_or_insert_with(|| RecordWalker::new(self.id, start));
            // Every record of a complete segment must be valid (page headers, xl_prev, CRC, across
            // segment boundaries): a receiver completes a segment only when WAL went on past it.
            match walker.walk_segment(start, &bytes) {
                Ok(SegmentWalk::Continues { .. }) => {}
                Ok(SegmentWalk::Ended { stop_lsn, reason, .. }) => {
                    let in_file = crate::wal::segment_file_name(tli, stop_lsn.segno(seg_size), seg_size);
                    let file = if in_file == name_of(shown) { shown.clone() } else { in_file };
                    let what = match reason {
                        EndReason::BadPage(e) => format!("page header: {e}"),
                        other => format!("WAL ends inside a complete segment: {other:?}"),
                    };
                    return Err(problem(&file, Some(stop_lsn.segment_offset(seg_size)), Some(stop_lsn), what));
                }
                Err(e) => return Err(problem(shown, None, Some(start), e.to_string())),
            }
            if let Some(i) = inc.as_deref_mut() {
                i.done(shown, token);
            }
        }
        if let (Some(shown), Some(walker)) = (&self.partial, walker.as_mut()) {
            let explained = self.walk_partial(src, shown, walker, report)?;
            if let Some(t) = report.timelines.iter_mut().rev().find(|t| t.timeline == tli) {
                t.partial = Some(explained);
            }
        }
        Ok(())
    }

    /// Walks the `.partial` after the last segment on from it (never remembered by `--state`: it
    /// changes as it grows); says how far its valid WAL goes.
    fn walk_partial(&self, src: &mut dyn Source, shown: &str, walker: &mut RecordWalker, report: &mut VerifyReport) -> Result<String, Problem> {
        let seg_size = self.id.seg_size;
        let bytes = read_checked(src, shown, None, report)?;
        if bytes.len() as u64 != seg_size {
            return Err(problem(shown, None, None, format!("{} bytes, a segment has {seg_size}", bytes.len())));
        }
        let start = Lsn((self.last + 1) * seg_size);
        match walker.walk_segment(start, &bytes) {
            Ok(SegmentWalk::Continues { .. }) => Ok(format!("{}: valid to its end (complete, not renamed yet)", name_of(shown))),
            Ok(SegmentWalk::Ended { valid_end, reason: EndReason::ZeroLength, .. }) => {
                Ok(format!("{}: valid WAL up to {valid_end}, zeros after (the newest, unfinished segment)", name_of(shown)))
            }
            Ok(SegmentWalk::Ended { valid_end, reason, .. }) => Ok(format!(
                "{}: valid WAL up to {valid_end}, then {reason:?} (a last record not received whole, or the end of what was shipped)",
                name_of(shown)
            )),
            Err(e) => Err(problem(shown, None, Some(start), e.to_string())),
        }
    }
}

/// Reads `shown` (or takes it from `cached` when that is the same file) and counts it as checked.
fn read_checked(src: &mut dyn Source, shown: &str, cached: Option<(String, Vec<u8>)>, report: &mut VerifyReport) -> Result<Vec<u8>, Problem> {
    let bytes = match cached {
        Some((file, bytes)) if file == shown => bytes,
        _ => src.read(shown)?,
    };
    report.files_checked += 1;
    report.bytes_checked += bytes.len() as u64;
    Ok(bytes)
}

fn name_of(shown: &str) -> String {
    shown.rsplit('/').next().unwrap_or(shown).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::gen::{generate, GenOptions};

    #[test]
    fn the_skipped_prefix_is_the_unchanged_run_from_the_first() {
        assert_eq!(verified_prefix_end(3, 9, |_| false), None);
        assert_eq!(verified_prefix_end(3, 9, |s| s < 6), Some(5));
        assert_eq!(verified_prefix_end(3, 9, |s| s != 4), Some(3));
        assert_eq!(verified_prefix_end(3, 9, |_| true), Some(9));
    }

    /// At least five complete 1 MiB segments of real-format WAL, as (dir, sorted segment names).
    fn five_segments() -> (tempfile::TempDir, Vec<String>) {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1u64 << 20;
        generate(&GenOptions { dir: dir.path().to_path_buf(), seg_size: seg, wal_bytes: 6 * seg - 4096, ..GenOptions::default() }).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.retain(|n| crate::wal::has_segment_name_shape(n));
        names.sort();
        std::fs::remove_file(dir.path().join(names.pop().unwrap())).unwrap(); // the incomplete last one
        (dir, names)
    }

    #[test]
    fn a_partial_after_the_last_segment_is_walked_and_explained() {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1u64 << 20;
        generate(&GenOptions { dir: dir.path().to_path_buf(), seg_size: seg, wal_bytes: 3 * seg + 5000, ..GenOptions::default() }).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.retain(|n| crate::wal::has_segment_name_shape(n));
        names.sort();
        let last = names.last().unwrap().clone();
        std::fs::rename(dir.path().join(&last), dir.path().join(format!("{last}.partial"))).unwrap();
        let report = verify_dir(dir.path()).unwrap();
        assert!(report.problem.is_none(), "{:?}", report.problem);
        let explained = report.timelines[0].partial.clone().expect("the .partial is explained");
        assert!(explained.starts_with(&format!("{last}.partial: valid WAL up to")), "{explained}");
        // A gap before a .partial is a missing segment.
        let second = &names[names.len() - 2];
        std::fs::remove_file(dir.path().join(second)).unwrap();
        let report = verify_dir(dir.path()).unwrap();
        let p = report.problem.expect("a gap before the .partial");
        assert_eq!(p.file, *second, "{p}");
    }

    #[test]
    fn incremental_runs_read_only_what_is_new_and_walk_across_the_boundary() {
        let (src, names) = five_segments();
        assert!(names.len() >= 5, "{names:?}");
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state.json");
        let wal = dir.path().join("wal");
        std::fs::create_dir(&wal).unwrap();
        for n in &names[..3] {
            std::fs::copy(src.path().join(n), wal.join(n)).unwrap();
        }
        let r = verify_dir_incremental(&wal, Some(&state)).unwrap();
        assert!(r.ok, "{:?}", r.problem);
        assert_eq!((r.files_checked, r.skipped_verified), (3, 0));
        let r = verify_dir_incremental(&wal, Some(&state)).unwrap();
        assert!(r.ok, "{:?}", r.problem);
        assert_eq!((r.files_checked, r.skipped_verified), (0, 3));
        for n in &names[3..] {
            std::fs::copy(src.path().join(n), wal.join(n)).unwrap();
        }
        // segments 1 and 2 skipped; 3 read again to continue the walk into 4 and 5
        let r = verify_dir_incremental(&wal, Some(&state)).unwrap();
        assert!(r.ok, "{:?}", r.problem);
        assert_eq!((r.files_checked, r.skipped_verified), (1 + names.len() as u64 - 3, 2));
        // a changed byte in a verified segment is read again and found
        let path = wal.join(&names[1]);
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[40_000] ^= 0x55;
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, &bytes).unwrap();
        let r = verify_dir_incremental(&wal, Some(&state)).unwrap();
        let p = r.problem.expect("the changed byte is found");
        assert!(p.file.ends_with(&names[1]) || p.file.ends_with(&names[2]), "{p}");
        // and a deleted verified segment is missing, without reading anything
        std::fs::copy(src.path().join(&names[1]), &path).unwrap();
        std::fs::remove_file(wal.join(&names[2])).unwrap();
        let r = verify_dir_incremental(&wal, Some(&state)).unwrap();
        let p = r.problem.expect("the gap is found");
        assert!(p.file.ends_with(&names[2]) && p.what.contains("missing"), "{p}");
    }

    #[test]
    fn history_files_are_checked_without_segments() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("00000002.history"), "1\t0/3000000\tno recovery target specified\n").unwrap();
        let r = verify_dir(dir.path()).unwrap();
        assert!(r.ok, "{:?}", r.problem);
        assert_eq!(r.files_checked, 1);
        std::fs::write(dir.path().join("00000003.history"), "3\t0/3000000\tloops\n").unwrap();
        let r = verify_dir(dir.path()).unwrap();
        let p = r.problem.expect("a history file naming its own timeline");
        assert!(p.file.ends_with("00000003.history"), "{p}");
    }
}
