//! `walship verify DIR | s3://BUCKET/PREFIX`: per timeline, no segment missing between the first and
//! the last, and every record of every complete segment valid, walked across segment boundaries with
//! the sender's record walk (`wal::RecordWalker`: page headers with `xlp_pageaddr` and timeline,
//! continuation records, `xl_prev`, CRC-32C, switch padding); one system identifier and segment
//! size; history files that parse and name only older timelines. The first problem is named by file,
//! offset and LSN. From the store every object is read through
//! [`Store::get_verified`](super::Store::get_verified), so a changed byte is a problem even where WAL
//! checks could not see it. Not checked yet: `.partial` files (counted, not read), incremental runs.
use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub target: String,
    pub ok: bool,
    pub timelines: Vec<TimelineReport>,
    pub files_checked: u64,
    pub bytes_checked: u64,
    /// `.partial` files seen and not checked.
    pub partial_files: u64,
    pub problem: Option<Problem>,
}

/// Where the files come from: a directory, or one cluster's timeline folders in the store.
trait Source {
    /// (display name, file name) of every file, grouped by nothing.
    fn names(&mut self) -> Result<Vec<(String, String)>, ArchiveError>;
    /// The bytes of a file by its display name; Err(Problem) when it cannot be read as it should.
    fn read(&mut self, shown: &str) -> Result<Vec<u8>, Problem>;
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
    fn read(&mut self, shown: &str) -> Result<Vec<u8>, Problem> {
        std::fs::read(shown).map_err(|e| Problem { file: shown.to_string(), offset: None, lsn: None, what: format!("cannot read: {e}") })
    }
}

struct StoreSource<'a> {
    store: &'a BlockingStore,
    /// Timeline folders (`PREFIX/SYSID/TTTTTTTT/`).
    folders: Vec<String>,
}

impl Source for StoreSource<'_> {
    fn names(&mut self) -> Result<Vec<(String, String)>, ArchiveError> {
        let mut v = Vec::new();
        for folder in &self.folders {
            for o in self.store.list(folder)? {
                let name = o.key.rsplit('/').next().unwrap_or("").to_string();
                v.push((o.key, name));
            }
        }
        Ok(v)
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
pub fn verify_dir(dir: &std::path::Path) -> Result<VerifyReport, ArchiveError> {
    let mut report = empty(dir.display().to_string());
    run(&mut DirSource(dir.to_path_buf()), None, &mut report)?;
    report.ok = report.problem.is_none();
    Ok(report)
}

/// Verify every cluster and timeline under `s3://BUCKET/PREFIX`.
pub fn verify_store(settings: &ArchiveSettings) -> Result<VerifyReport, ArchiveError> {
    let store = BlockingStore::new(settings)?;
    let prefix = &settings.url.prefix;
    let root = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
    let mut report = empty(settings.url.to_string());
    for sysid_folder in store.list_folders(&root)? {
        let Some(sysid) = sysid_folder.trim_end_matches('/').rsplit('/').next().and_then(|s| s.parse::<u64>().ok()) else { continue };
        let folders = store.list_folders(&format!("{root}{sysid}/"))?;
        run(&mut StoreSource { store: &store, folders }, Some(sysid), &mut report)?;
        if report.problem.is_some() {
            break;
        }
    }
    report.ok = report.problem.is_none();
    Ok(report)
}

fn empty(target: String) -> VerifyReport {
    VerifyReport { target, ok: false, timelines: Vec::new(), files_checked: 0, bytes_checked: 0, partial_files: 0, problem: None }
}

fn problem(file: &str, offset: Option<u64>, lsn: Option<Lsn>, what: impl Into<String>) -> Problem {
    Problem { file: file.to_string(), offset, lsn: lsn.map(|l| l.to_string()), what: what.into() }
}

/// Check everything `src` holds; the first problem goes into `report.problem`.
fn run(src: &mut dyn Source, expect_sysid: Option<u64>, report: &mut VerifyReport) -> Result<(), ArchiveError> {
    let names = src.names()?;
    // The segment size from the first segment's long header (segment names need it to parse).
    let mut id: Option<WalIdentity> = None;
    let mut segs: BTreeMap<u32, BTreeMap<u64, String>> = BTreeMap::new();
    let mut histories: BTreeMap<u32, String> = BTreeMap::new();
    // The segment read for the identity, kept so it is not read (downloaded) twice.
    let mut first_read: Option<(String, Vec<u8>)> = None;
    let mut sorted = names.clone();
    sorted.sort_by(|a, b| a.1.cmp(&b.1));
    for (shown, name) in &sorted {
        if name.ends_with(".partial") {
            report.partial_files += 1;
            continue;
        }
        if id.is_none() && crate::wal::has_segment_name_shape(name) {
            let bytes = match src.read(shown) {
                Ok(b) => b,
                Err(p) => {
                    report.problem = Some(p);
                    return Ok(());
                }
            };
            match WalIdentity::from_first_page(&bytes) {
                Ok(i) => {
                    id = Some(i);
                    first_read = Some((shown.clone(), bytes));
                }
                Err(e) => {
                    report.problem = Some(problem(shown, Some(0), None, format!("first page: {e}")));
                    return Ok(());
                }
            }
        }
    }
    let Some(id) = id else {
        return Ok(()); // no segment at all: nothing checked (history files are checked only beside segments)
    };
    if let Some(want) = expect_sysid {
        if id.system_id != want {
            report.problem = Some(problem(&sorted[0].0, Some(0), None, format!("system identifier {} in a folder of {want}", id.system_id)));
            return Ok(());
        }
    }
    for (shown, name) in &sorted {
        match WalFileName::parse(name, id.seg_size) {
            Some(WalFileName::Segment { tli, segno }) => {
                segs.entry(tli).or_default().insert(segno, shown.clone());
            }
            Some(WalFileName::History { tli }) => {
                histories.insert(tli, shown.clone());
            }
            _ => {}
        }
    }
    // History files: they parse, and name only older timelines.
    for (&tli, shown) in &histories {
        let bytes = match read_checked(src, shown, None, report) {
            Ok(b) => b,
            Err(p) => {
                report.problem = Some(p);
                return Ok(());
            }
        };
        let text = String::from_utf8_lossy(&bytes);
        match parse_history(&text) {
            Ok(entries) => {
                if let Some(bad) = entries.iter().find(|e| e.tli >= tli) {
                    report.problem = Some(problem(shown, None, Some(bad.switch_lsn), format!("names timeline {} which is not older than {tli}", bad.tli)));
                    return Ok(());
                }
            }
            Err(e) => {
                report.problem = Some(problem(shown, None, None, e.to_string()));
                return Ok(());
            }
        }
    }
    let mut walker: Option<RecordWalker> = None;
    for (&tli, by_segno) in &segs {
        let (first, last) = (*by_segno.keys().next().expect("non-empty"), *by_segno.keys().last().expect("non-empty"));
        report.timelines.push(TimelineReport {
            system_id: id.system_id,
            timeline: tli,
            first: by_segno.get(&first).map(|s| name_of(s)),
            last: by_segno.get(&last).map(|s| name_of(s)),
            segments: by_segno.len() as u64,
            history: histories.contains_key(&tli),
        });
        if tli > 1 && !histories.contains_key(&tli) {
            let shown = &by_segno[&first];
            report.problem = Some(problem(shown, None, None, format!("timeline {tli} has segments but no history file {}", crate::wal::history_file_name(tli))));
            return Ok(());
        }
        for segno in first..=last {
            let Some(shown) = by_segno.get(&segno) else {
                let missing = crate::wal::segment_file_name(tli, segno, id.seg_size);
                let lsn = Lsn(segno * id.seg_size);
                let before = crate::wal::segment_file_name(tli, segno - 1, id.seg_size);
                report.problem = Some(problem(&missing, None, Some(lsn), format!("segment missing (timeline {tli} has {before} and later segments)")));
                return Ok(());
            };
            let bytes = match read_checked(src, shown, first_read.take(), report) {
                Ok(b) => b,
                Err(p) => {
                    report.problem = Some(p);
                    return Ok(());
                }
            };
            if bytes.len() as u64 != id.seg_size {
                report.problem = Some(problem(shown, None, None, format!("{} bytes, a segment has {}", bytes.len(), id.seg_size)));
                return Ok(());
            }
            let start = Lsn(segno * id.seg_size);
            let walker = walker.get_or_insert_with(|| RecordWalker::new(WalIdentity { tli, ..id }, start));
            // Every record of a complete segment must be valid (page headers, xl_prev, CRC, across
            // segment boundaries): a receiver completes a segment only when WAL went on past it.
            match walker.walk_segment(start, &bytes) {
                Ok(SegmentWalk::Continues { .. }) => {}
                Ok(SegmentWalk::Ended { stop_lsn, reason, .. }) => {
                    let in_file = crate::wal::segment_file_name(tli, stop_lsn.segno(id.seg_size), id.seg_size);
                    let file = if in_file == name_of(shown) { shown.clone() } else { in_file };
                    let what = match reason {
                        EndReason::BadPage(e) => format!("page header: {e}"),
                        other => format!("WAL ends inside a complete segment: {other:?}"),
                    };
                    report.problem = Some(problem(&file, Some(stop_lsn.segment_offset(id.seg_size)), Some(stop_lsn), what));
                    return Ok(());
                }
                Err(e) => {
                    report.problem = Some(problem(shown, None, Some(start), e.to_string()));
                    return Ok(());
                }
            }
        }
        walker = None;
    }
    Ok(())
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
