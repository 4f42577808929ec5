//! The directory at rest (`--once`): a `pg_wal` directory (or an archive). Maps segments in
//! LSN order, walks their records to find the horizon (the exact end of valid WAL), and tells
//! the end of WAL apart from corruption.
//!
//! Nothing at or past the horizon is ever handed out: a recycled segment (stale `xlp_pageaddr`)
//! or a zero-filled tail ends the walk; a page *after* the end that does belong to its position
//! means the WAL went on, so the end is a corruption and is reported with file, offset and LSN.
//!
//! The shipped timeline is the newest one present; a segment's timeline is its file name's (the
//! switch segment PostgreSQL copies at promotion starts with pages of the ancestor timeline). Its
//! segments are shipped from the oldest on, followed by the `NAME.partial` right after the last
//! complete one (a receiver's directory, a pg_receivewal directory): the walk finds its valid end
//! like any segment's, so `--once` never stops short of the end of valid WAL. Everything else in
//! the directory is named in one "skipped in DIR" info line.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::{io_err, read_history, SegmentMaps, SourceError, WalSource};
use crate::uring::SegmentMap;
use crate::wal::{
    first_page_claiming_more, page_belongs_here, EndReason, Lsn, RecordWalker, SegmentWalk, WalFileName, WalIdentity,
};

/// How the walk of the directory ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalEnd {
    /// Valid WAL ends at `end` (zeros, a recycled page, or simply no more files).
    Clean { end: Lsn, why: String },
    /// Valid WAL ends at `valid_end` because of damage; shipping stops there with an error.
    Corrupt { valid_end: Lsn },
}

/// Segments read ahead (asynchronously, into the page cache) of the one being mapped.
const PREFETCH_SEGMENTS: u64 = 2;

#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    identity: WalIdentity,
    first_lsn: Lsn,
    /// Segment files of the chosen timeline.
    files: BTreeMap<u64, PathBuf>,
    maps: SegmentMaps,
    walker: RecordWalker,
    end: Option<WalEnd>,
    corruption: Option<SourceError>,
    segments_walked: u64,
}

impl DirSource {
    /// Scans `dir` for segment files; the newest timeline present is the one shipped, from its
    /// first segment, plus its trailing `.partial` (see [`DirListing::partial_tail`]). What is
    /// not shipped is said in one info line.
    pub fn open(dir: &Path) -> Result<DirSource, SourceError> {
        let listing = DirListing::scan(dir)?;
        let (tli, files) = listing.chosen_timeline().ok_or_else(|| SourceError::Empty { dir: dir.to_path_buf() })?;
        let (&first_segno, first_path) = files.iter().next().ok_or_else(|| SourceError::Empty { dir: dir.to_path_buf() })?;
        let identity = read_identity_named(first_path, tli, first_segno, dir)?;
        let skipped = listing.skipped(tli, &files);
        if !skipped.is_empty() {
            info!("skipped in {}: {}", dir.display(), skipped.join(", "));
        }
        let first_lsn = Lsn(first_segno * identity.seg_size);
        Ok(DirSource {
            dir: dir.to_path_buf(),
            identity,
            first_lsn,
            files,
            maps: SegmentMaps::new(identity.seg_size),
            walker: RecordWalker::new(identity, first_lsn),
            end: None,
            corruption: None,
            segments_walked: 0,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The walk is over: the horizon is final.
    pub fn end(&self) -> Option<&WalEnd> {
        self.end.as_ref()
    }

    pub fn segments_walked(&self) -> u64 {
        self.segments_walked
    }

    /// Walks segments until the horizon reaches `want` or the walk ends.
    pub fn walk_until(&mut self, want: Lsn) -> Result<(), SourceError> {
        while self.end.is_none() && self.horizon() < want {
            self.walk_next_segment()?;
        }
        Ok(())
    }

    fn walk_next_segment(&mut self) -> Result<(), SourceError> {
        let seg_size = self.identity.seg_size;
        let seg_start = self.walker.next_segment_start();
        let segno = seg_start.0 / seg_size;
        let Some(path) = self.files.get(&segno).cloned() else {
            if let Some((&later, _)) = self.files.range(segno..).next() {
                return Err(SourceError::MissingSegment {
                    dir: self.dir.clone(),
                    name: WalFileName::Segment { tli: self.identity.tli, segno }.file_name(seg_size),
                    from: seg_start,
                    to: Lsn(later * seg_size),
                });
            }
            self.end = Some(WalEnd::Clean { end: self.horizon(), why: "no more segment files".into() });
            return Ok(());
        };
        let map = self.map_segment(segno)?;
        let walk = self.walker.walk_segment(seg_start, map.bytes()).map_err(|e| SourceError::BadFirstSegment {
            path: path.clone(),
            why: e.to_string(),
        })?;
        self.segments_walked += 1;
        if let SegmentWalk::Ended { valid_end, stop_lsn, reason } = walk {
            self.on_walk_ended(segno, &path, &map, valid_end, stop_lsn, reason)?;
        }
        Ok(())
    }

    fn on_walk_ended(
        &mut self,
        segno: u64,
        path: &Path,
        map: &Arc<SegmentMap>,
        valid_end: Lsn,
        stop_lsn: Lsn,
        reason: EndReason,
    ) -> Result<(), SourceError> {
        let seg_size = self.identity.seg_size;
        let seg_start = Lsn(segno * seg_size);
        let mut claimed = first_page_claiming_more(seg_start, map.bytes(), stop_lsn, &self.identity);
        if claimed.is_none() {
            let next = segno + 1;
            if let Some(next_path) = self.files.get(&next).cloned() {
                let next_map = self.map_segment(next)?;
                let first_page = &next_map.bytes()[..self.identity.block_size as usize];
                if page_belongs_here(first_page, Lsn(next * seg_size), &self.identity) {
                    claimed = Some(Lsn(next * seg_size));
                }
                let _ = next_path;
            }
        }
        match claimed {
            None => {
                self.end = Some(WalEnd::Clean { end: valid_end.max(self.first_lsn), why: format!("{reason:?} at {stop_lsn}") });
            }
            Some(claimed) => {
                let (lsn, file, offset) = if stop_lsn >= seg_start {
                    (stop_lsn, path.to_path_buf(), stop_lsn - seg_start)
                } else {
                    // The failing record began in an earlier segment.
                    let s = stop_lsn.0 / seg_size;
                    let file = self.files.get(&s).cloned().unwrap_or_else(|| path.to_path_buf());
                    (stop_lsn, file, stop_lsn.0 % seg_size)
                };
                self.end = Some(WalEnd::Corrupt { valid_end });
                self.corruption = Some(SourceError::Corrupt {
                    path: file,
                    offset,
                    lsn,
                    reason: describe(&reason),
                    valid_end,
                    claimed,
                });
            }
        }
        Ok(())
    }

    fn map_segment(&mut self, segno: u64) -> Result<Arc<SegmentMap>, SourceError> {
        if let Some(m) = self.maps.get(segno) {
            return Ok(m);
        }
        let path = self.files.get(&segno).cloned().expect("mapping a known segment");
        let map = self.maps.map(segno, &path, io_err(&path))?;
        // The next segments will be walked and sent soon: have the kernel read them meanwhile.
        for ahead in segno + 1..=segno + PREFETCH_SEGMENTS {
            if let Some(next) = self.files.get(&ahead) {
                if let Ok(f) = File::open(next) {
                    crate::uring::prefetch(&f);
                }
            }
        }
        Ok(map)
    }
}

impl WalSource for DirSource {
    fn identity(&self) -> WalIdentity {
        self.identity
    }

    /// The start of the oldest segment.
    fn first_lsn(&self) -> Lsn {
        self.first_lsn
    }

    /// Everything below this is valid WAL and may be shipped.
    fn horizon(&self) -> Lsn {
        self.walker.valid_end().max(self.first_lsn)
    }

    fn is_final(&self) -> bool {
        self.end.is_some()
    }

    fn refresh(&mut self, want: Lsn) -> Result<(), SourceError> {
        self.walk_until(want)
    }

    fn wait_hint(&self) -> Duration {
        Duration::from_millis(100)
    }

    fn map_for(&mut self, lsn: Lsn) -> Result<Arc<SegmentMap>, SourceError> {
        assert!(lsn < self.horizon(), "asked for {lsn}, at or past the horizon {}", self.horizon());
        self.map_segment(lsn.0 / self.identity.seg_size)
    }

    fn release_below(&mut self, lsn: Lsn) {
        self.maps.release_below(lsn);
    }

    /// The file that holds `lsn` (a trailing `.partial` included), or its canonical name.
    fn segment_path(&self, lsn: Lsn) -> PathBuf {
        let segno = lsn.0 / self.identity.seg_size;
        self.files.get(&segno).cloned().unwrap_or_else(|| {
            self.dir.join(WalFileName::Segment { tli: self.identity.tli, segno }.file_name(self.identity.seg_size))
        })
    }

    fn corrupt_end(&self) -> Option<Lsn> {
        match self.end {
            Some(WalEnd::Corrupt { valid_end }) => Some(valid_end),
            _ => None,
        }
    }

    fn take_corruption(&mut self) -> Option<SourceError> {
        self.corruption.take()
    }

    fn history(&self) -> String {
        read_history(&self.dir, self.identity.tli).unwrap_or_default()
    }
}

/// Where the WAL in `dir` probably ends (for progress display): the end of its highest canonical
/// segment of the newest timeline. Recycled files make this an overestimate.
pub fn estimate_end(dir: &Path, seg_size: u64) -> Option<Lsn> {
    let names = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()?.file_name().into_string().ok());
    let segs: Vec<(u32, u64)> = names
        .filter_map(|n| match WalFileName::parse(&n, seg_size) {
            Some(WalFileName::Segment { tli, segno }) => Some((tli, segno)),
            _ => None,
        })
        .collect();
    let tli = segs.iter().map(|s| s.0).max()?;
    segs.iter().filter(|s| s.0 == tli).map(|s| Lsn((s.1 + 1) * seg_size)).max()
}

fn describe(reason: &EndReason) -> String {
    match reason {
        EndReason::ZeroLength => "record length is zero".into(),
        EndReason::BadRecordLength { tot_len } => format!("record length {tot_len} is out of range"),
        EndReason::BadPrev { found, expected } => format!("xl_prev is {found}, expected {expected}"),
        EndReason::BadCrc { found, computed } => format!("record CRC is {found:#010x}, computed {computed:#010x}"),
        EndReason::BadPage(e) => format!("bad page header: {e}"),
        EndReason::MissingContrecord { page_lsn, record_lsn } => {
            format!("page {page_lsn} lacks XLP_FIRST_IS_CONTRECORD for the record at {record_lsn}")
        }
        EndReason::BadContrecordLength { page_lsn, rem_len, expected } => {
            format!("page {page_lsn} has xlp_rem_len {rem_len}, expected {expected}")
        }
        EndReason::UnexpectedContrecord { page_lsn, rem_len } => {
            format!("page {page_lsn} claims a continuation of {rem_len} bytes where a record must start")
        }
    }
}

/// What a directory holds, sorted by kind, once the segment size is known.
struct DirListing {
    dir: PathBuf,
    seg_size: u64,
    /// Complete segments: (timeline, segno) -> path.
    segments: BTreeMap<(u32, u64), PathBuf>,
    /// `NAME.partial` files: (timeline, segno) -> path.
    partials: BTreeMap<(u32, u64), PathBuf>,
    /// Timelines with a `.history` file.
    histories: Vec<u32>,
    backups: usize,
    /// walship's own receiver state (`.walship-flushed`, spare segment files).
    walship_state: Vec<String>,
    stray: Vec<String>,
    subdirs: Vec<String>,
}

/// Names listed per kind in the "skipped" line before it says "...".
const SKIPPED_NAMES_SHOWN: usize = 5;

fn listed(names: &[String]) -> String {
    let mut shown: Vec<&str> = names.iter().take(SKIPPED_NAMES_SHOWN).map(String::as_str).collect();
    if names.len() > SKIPPED_NAMES_SHOWN {
        shown.push("...");
    }
    shown.join(", ")
}

impl DirListing {
    fn scan(dir: &Path) -> Result<DirListing, SourceError> {
        let mut files: Vec<String> = Vec::new();
        let mut subdirs: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if entry.file_type().map_err(io_err(dir))?.is_dir() {
                subdirs.push(format!("{name}/"));
            } else {
                files.push(name);
            }
        }
        files.sort();
        subdirs.sort();
        let seg_size = Self::seg_size(dir, &files)?;
        let mut l = DirListing {
            dir: dir.to_path_buf(),
            seg_size,
            segments: BTreeMap::new(),
            partials: BTreeMap::new(),
            histories: Vec::new(),
            backups: 0,
            walship_state: Vec::new(),
            stray: Vec::new(),
            subdirs,
        };
        for name in files {
            l.classify(name);
        }
        Ok(l)
    }

    /// The segment size, from the first file (complete, then `.partial`) with a valid long page
    /// header; only names canonical for that size count afterwards (a stray name must not pick
    /// the timeline).
    fn seg_size(dir: &Path, files: &[String]) -> Result<u64, SourceError> {
        let shaped = |n: &&String| crate::wal::has_segment_name_shape(n.strip_suffix(".partial").unwrap_or(n));
        let mut candidates: Vec<&String> = files.iter().filter(shaped).collect();
        if candidates.is_empty() {
            return Err(SourceError::Empty { dir: dir.to_path_buf() });
        }
        candidates.sort_by_key(|n| (n.ends_with(".partial"), n.as_str()));
        candidates
            .iter()
            .find_map(|n| read_identity(&dir.join(n)).ok())
            .map(|id| id.seg_size)
            .ok_or_else(|| SourceError::BadFirstSegment {
                path: dir.join(candidates[0]),
                why: "no segment file in the directory starts with a valid long page header".into(),
            })
    }

    fn classify(&mut self, name: String) {
        let path = self.dir.join(&name);
        match WalFileName::parse(&name, self.seg_size) {
            Some(WalFileName::Segment { tli, segno }) => {
                self.segments.insert((tli, segno), path);
            }
            Some(WalFileName::Partial { tli, segno }) => {
                self.partials.insert((tli, segno), path);
            }
            Some(WalFileName::History { tli }) => self.histories.push(tli),
            Some(WalFileName::Backup { .. }) => self.backups += 1,
            None if name.ends_with(".backup") && crate::wal::has_segment_name_shape(name.get(..24).unwrap_or("")) => {
                self.backups += 1
            }
            None if name.starts_with(".walship-") => self.walship_state.push(name),
            None => self.stray.push(name),
        }
    }

    /// The newest timeline among complete and `.partial` segments, and the files shipped of it.
    fn chosen_timeline(&self) -> Option<(u32, BTreeMap<u64, PathBuf>)> {
        let tli = self.segments.keys().chain(self.partials.keys()).map(|k| k.0).max()?;
        let mut files: BTreeMap<u64, PathBuf> =
            self.segments.iter().filter(|(k, _)| k.0 == tli).map(|(k, p)| (k.1, p.clone())).collect();
        if let Some((segno, path)) = self.partial_tail(tli, &files) {
            files.insert(segno, path);
        }
        Some((tli, files))
    }

    /// The `.partial` that continues the timeline: the segment right after its last complete
    /// one (or, with no complete segment, its only `.partial`). A complete `NAME` wins over
    /// `NAME.partial`; other `.partial` files are not shipped.
    fn partial_tail(&self, tli: u32, complete: &BTreeMap<u64, PathBuf>) -> Option<(u64, PathBuf)> {
        let mut ours = self.partials.iter().filter(|(k, _)| k.0 == tli);
        let want = match complete.keys().next_back() {
            Some(&last) => last + 1,
            None => {
                let (first, rest) = (ours.next()?, ours.next());
                return rest.is_none().then(|| (first.0 .1, first.1.clone()));
            }
        };
        self.partials.get(&(tli, want)).map(|p| (want, p.clone()))
    }

    /// What is not shipped, for the one "skipped in DIR" line.
    fn skipped(&self, tli: u32, shipped: &BTreeMap<u64, PathBuf>) -> Vec<String> {
        let mut out = Vec::new();
        if !self.stray.is_empty() {
            out.push(format!("{} stray file{} ({})", self.stray.len(), plural(self.stray.len()), listed(&self.stray)));
        }
        if self.backups > 0 {
            out.push(format!("{} .backup", self.backups));
        }
        let unused_partials: Vec<String> = self
            .partials
            .iter()
            .filter(|(k, p)| k.0 != tli || shipped.get(&k.1) != Some(*p))
            .map(|(_, p)| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
            .collect();
        if !unused_partials.is_empty() {
            out.push(format!("{} other .partial ({})", unused_partials.len(), listed(&unused_partials)));
        }
        let mut others: BTreeMap<u32, usize> = BTreeMap::new();
        for &(t, _) in self.segments.keys().filter(|k| k.0 != tli) {
            *others.entry(t).or_default() += 1;
        }
        for (t, n) in others {
            out.push(format!("{n} segment{} of timeline {t}", plural(n)));
        }
        let histories = self.histories.iter().filter(|&&t| t > tli).count();
        if histories > 0 {
            out.push(format!("{histories} .history of newer timelines"));
        }
        if !self.walship_state.is_empty() {
            out.push(format!("walship receiver state ({})", listed(&self.walship_state)));
        }
        out.extend(self.subdirs.iter().cloned());
        out
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The identity of segment `segno` of timeline `name_tli` (its file name's timeline). The first
/// page may carry an older `xlp_tli`: at promotion PostgreSQL copies the switch segment to the new
/// timeline, and the pages before the switch point keep the ancestor's timeline. That is accepted
/// when the older timeline is an ancestor in `NAME_TLI.history` (if the directory has it) and the
/// segment starts at or before its switch point; a newer `xlp_tli` never is.
pub(crate) fn read_identity_named(path: &Path, name_tli: u32, segno: u64, dir: &Path) -> Result<WalIdentity, SourceError> {
    let mut id = read_identity(path)?;
    let bad = |why: String| SourceError::BadFirstSegment { path: path.to_path_buf(), why };
    if id.tli > name_tli {
        return Err(bad(format!("its page header says timeline {}, newer than its name's timeline {name_tli}", id.tli)));
    }
    if id.tli < name_tli {
        let history_path = dir.join(WalFileName::History { tli: name_tli }.file_name(id.seg_size));
        if let Ok(text) = std::fs::read_to_string(&history_path) {
            let entries = crate::wal::history::parse_history(&text).map_err(|e| SourceError::BadFirstSegment {
                path: history_path.clone(),
                why: e.to_string(),
            })?;
            let seg_start = Lsn(segno * id.seg_size);
            match crate::wal::history::switch_point(&entries, id.tli) {
                Some(switch) if seg_start <= switch => {}
                Some(switch) => {
                    return Err(bad(format!(
                        "its page header says timeline {}, which ended at {switch} (per {}), before this segment starts at {seg_start}",
                        id.tli,
                        history_path.display()
                    )))
                }
                None => {
                    return Err(bad(format!(
                        "its page header says timeline {}, which is not an ancestor of timeline {name_tli} in {}",
                        id.tli,
                        history_path.display()
                    )))
                }
            }
        }
    }
    id.tli = name_tli;
    Ok(id)
}

pub(crate) fn read_identity(path: &Path) -> Result<WalIdentity, SourceError> {
    let head = crate::wal::read_segment_head(path).map_err(io_err(path))?;
    WalIdentity::from_first_page(&head).map_err(|e| SourceError::BadFirstSegment { path: path.to_path_buf(), why: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::gen::{generate, GenOptions};

    const SEG: u64 = 1 << 20;

    /// Timeline-1 WAL from segment 3 on, its first file renamed to timeline 2 (what PostgreSQL's
    /// copy of the switch segment looks like: pages of the ancestor under the new name).
    fn switch_segment(history: Option<&str>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let opts = GenOptions { dir: dir.path().into(), seg_size: SEG, start_segno: 3, wal_bytes: SEG / 2, ..Default::default() };
        let report = generate(&opts).unwrap();
        let renamed = dir.path().join(WalFileName::Segment { tli: 2, segno: 3 }.file_name(SEG));
        std::fs::rename(&report.segment_files[0], &renamed).unwrap();
        if let Some(h) = history {
            std::fs::write(dir.path().join("00000002.history"), h).unwrap();
        }
        (dir, renamed)
    }

    #[test]
    fn an_ancestor_timeline_on_the_switch_segment_takes_the_name_s_timeline() {
        let (dir, path) = switch_segment(Some("1\t0/380000\tno recovery target specified\n"));
        let id = read_identity_named(&path, 2, 3, dir.path()).unwrap();
        assert_eq!(id.tli, 2);
        let (dir, path) = switch_segment(None);
        assert_eq!(read_identity_named(&path, 2, 3, dir.path()).unwrap().tli, 2, "no history file: tli <= name's is accepted");
    }

    #[test]
    fn a_timeline_that_is_not_an_ancestor_or_ended_earlier_is_refused() {
        let (dir, path) = switch_segment(Some("1\t0/200000\tno recovery target specified\n"));
        let e = read_identity_named(&path, 2, 3, dir.path()).unwrap_err().to_string();
        assert!(e.contains("ended at 0/00200000"), "{e}");
        let (dir, path) = switch_segment(Some("5\t0/380000\tno recovery target specified\n"));
        let e = read_identity_named(&path, 2, 3, dir.path()).unwrap_err().to_string();
        assert!(e.contains("not an ancestor"), "{e}");
        let (dir, path) = switch_segment(None);
        let e = read_identity_named(&path, 0, 3, dir.path()).unwrap_err().to_string();
        assert!(e.contains("newer than its name's timeline"), "{e}");
    }
}
