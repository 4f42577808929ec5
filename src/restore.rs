//! `walship restore %f %p`: PostgreSQL's `restore_command`, served from a receiver directory.
//!
//! A complete segment or history file is copied as is. When only `NAME.partial` exists (the
//! newest, still incomplete segment), it is handed out under the plain name: PostgreSQL never
//! asks for `.partial` files by itself, but needs that segment to reach the end of the WAL.
//!
//! The exit code is what recovery acts on: 1 means "this file does not exist (yet)", which
//! recovery reads as the end of the archive (it then promotes, or waits, or streams). Every other
//! failure (a directory that is missing or unreadable, a file it may not read, an I/O error, a
//! file that is not the segment its name says) exits [`EXIT_FATAL`] (above 125), which stops
//! recovery instead of ending it early on a partial archive.

use std::io;
use std::path::{Path, PathBuf};

use crate::wal::{has_segment_name_shape, is_valid_seg_size, Lsn, PageHeader, WalFileName};

/// Exit code for a failure that must stop recovery: PostgreSQL treats a restore_command exit
/// status above 125 like a signal and stops with FATAL instead of taking it as "no more WAL".
pub const EXIT_FATAL: u8 = 126;
/// Exit code for "this file does not exist (yet)".
pub const EXIT_NOT_FOUND: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{name:?} is not a WAL segment or history file name (expected 24 hex digits, or 8 hex digits + .history)")]
    BadName { name: String },
    #[error("{name} is not in {dir} (neither complete nor .partial)")]
    NotFound { name: String, dir: PathBuf },
    #[error("{name} is not durable in {dir} yet (its .partial holds no acknowledged byte)")]
    NotYetDurable { name: String, dir: PathBuf },
    #[error("the receiver directory {dir} cannot be used: {source}. Fix --dir (or the permissions: the user running PostgreSQL must be able to read it; see `walship recv --group`)")]
    Dir { dir: PathBuf, source: io::Error },
    #[error("{path}: {source}. The file exists but cannot be read: fix its permissions (`walship recv --group`/--file-mode) or the disk")]
    Unreadable { path: PathBuf, source: io::Error },
    #[error("copying {from} to {to}: {source}")]
    Copy { from: PathBuf, to: PathBuf, source: io::Error },
    #[error("{path} is not the segment its name says: {why}. Is --dir the right directory?")]
    WrongContent { path: PathBuf, why: String },
    #[error(transparent)]
    Published(#[from] crate::recv::published::PublishedError),
}

impl RestoreError {
    /// The exit code recovery must see: 1 only when the file is simply not there (yet).
    pub fn exit_code(&self) -> u8 {
        match self {
            RestoreError::BadName { .. } | RestoreError::NotFound { .. } | RestoreError::NotYetDurable { .. } => EXIT_NOT_FOUND,
            _ => EXIT_FATAL,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreOutcome {
    Complete(PathBuf),
    Partial(PathBuf),
}

impl std::fmt::Display for RestoreOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestoreOutcome::Complete(p) => write!(f, "restored {}", p.display()),
            RestoreOutcome::Partial(p) => write!(f, "restored {} (the newest, incomplete segment)", p.display()),
        }
    }
}

/// A segment or history file name; checked before any path is built from it (the segment size
/// is not known here, so the segment number part is checked by shape only).
fn valid_name(name: &str) -> bool {
    has_segment_name_shape(name) || matches!(WalFileName::parse(name, 16 << 20), Some(WalFileName::History { .. }))
}

pub fn restore(dir: &Path, name: &str, target: &Path) -> Result<RestoreOutcome, RestoreError> {
    if !valid_name(name) {
        return Err(RestoreError::BadName { name: name.into() });
    }
    // A directory that is missing or unreadable is a set-up error, never "not there yet".
    std::fs::read_dir(dir).map_err(|source| RestoreError::Dir { dir: dir.to_path_buf(), source })?;
    let complete = dir.join(name);
    if is_file(&complete)? {
        if has_segment_name_shape(name) {
            check_segment_head(&complete, name)?;
        }
        copy(&complete, target)?;
        return Ok(RestoreOutcome::Complete(complete));
    }
    let partial = dir.join(format!("{name}.partial"));
    if has_segment_name_shape(name) && is_file(&partial)? {
        let seg_start = check_segment_head(&partial, name)?;
        let flushed = crate::recv::published::read(dir)?.map_or(Lsn(0), |p| p.lsn);
        if flushed <= seg_start {
            return Err(RestoreError::NotYetDurable { name: name.into(), dir: dir.to_path_buf() });
        }
        copy(&partial, target)?;
        cut_at_flushed(flushed, seg_start, target)?;
        return Ok(RestoreOutcome::Partial(partial));
    }
    Err(RestoreError::NotFound { name: name.into(), dir: dir.to_path_buf() })
}

/// Whether `path` is a regular file; only "it does not exist" is a no, any other failure to look
/// (permission, I/O) is an error.
fn is_file(path: &Path) -> Result<bool, RestoreError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.is_file()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(RestoreError::Unreadable { path: path.to_path_buf(), source }),
    }
}

/// The file's first page must be the long header of the segment `name` says, at its size: a
/// wrong directory or a renamed file must stop recovery, not feed it foreign WAL. Returns the
/// segment's start LSN.
fn check_segment_head(path: &Path, name: &str) -> Result<Lsn, RestoreError> {
    let wrong = |why: String| RestoreError::WrongContent { path: path.to_path_buf(), why };
    let seg_size = std::fs::metadata(path).map_err(|source| RestoreError::Unreadable { path: path.to_path_buf(), source })?.len();
    if !is_valid_seg_size(seg_size) {
        return Err(wrong(format!("{seg_size} bytes is not a WAL segment size")));
    }
    let Some(WalFileName::Segment { tli, segno }) = WalFileName::parse(name, seg_size) else {
        return Err(wrong(format!("{name} is not a canonical segment name for {seg_size}-byte segments")));
    };
    let seg_start = Lsn(segno * seg_size);
    let head = crate::wal::read_segment_head(path).map_err(|source| RestoreError::Unreadable { path: path.to_path_buf(), source })?;
    if head.iter().all(|&b| b == 0) {
        // A .partial whose first bytes are not written yet: judged by the published LSN.
        return Ok(seg_start);
    }
    let hdr = PageHeader::parse(&head).map_err(|e| wrong(e.to_string()))?;
    if hdr.pageaddr != seg_start {
        return Err(wrong(format!("its first page is the WAL at {}, not at {seg_start}", hdr.pageaddr)));
    }
    if hdr.tli > tli {
        return Err(wrong(format!("its first page is of timeline {}, newer than the name's {tli}", hdr.tli)));
    }
    match hdr.long {
        Some(long) if u64::from(long.seg_size) == seg_size => Ok(seg_start),
        Some(long) => Err(wrong(format!("its header says {}-byte segments, the file has {seg_size} bytes", long.seg_size))),
        None => Err(wrong("its first page has no long header".into())),
    }
}

/// A running receiver may have written bytes of the `.partial` that are not durable yet: zero
/// everything from its published flushed LSN on, so recovery never replays what could be lost.
fn cut_at_flushed(flushed: Lsn, seg_start: Lsn, target: &Path) -> Result<(), RestoreError> {
    let err = |source| RestoreError::Copy { from: target.to_path_buf(), to: target.to_path_buf(), source };
    let seg_size = std::fs::metadata(target).map_err(err)?.len();
    if flushed.0 >= seg_start.0 + seg_size {
        return Ok(());
    }
    let keep = flushed.0.saturating_sub(seg_start.0);
    let file = std::fs::OpenOptions::new().write(true).open(target).map_err(err)?;
    file.set_len(keep).and_then(|_| file.set_len(seg_size)).map_err(err)
}

fn copy(from: &Path, to: &Path) -> Result<(), RestoreError> {
    std::fs::copy(from, to).map(|_| ()).map_err(|source| {
        if source.kind() == io::ErrorKind::PermissionDenied && std::fs::File::open(from).is_err() {
            RestoreError::Unreadable { path: from.to_path_buf(), source }
        } else {
            RestoreError::Copy { from: from.to_path_buf(), to: to.to_path_buf(), source }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wal::gen::{generate, GenOptions};

    #[test]
    fn names_are_checked_before_any_path_is_built() {
        for bad in ["../etc/passwd", "000000010000000000000001/..", "00000001.history.x", "0000000100000000000000zz", ""] {
            assert!(matches!(restore(Path::new("/nonexistent"), bad, Path::new("/dev/null")), Err(RestoreError::BadName { .. })), "{bad}");
        }
    }

    /// Real WAL: segments 1..=3 of 1 MiB, the last one as the receiver's `.partial`.
    fn wal_dir() -> (tempfile::TempDir, u64) {
        let dir = tempfile::tempdir().unwrap();
        let seg = 1u64 << 20;
        let opts = GenOptions { dir: dir.path().to_path_buf(), seg_size: seg, wal_bytes: 3 * seg - 4096, ..GenOptions::default() };
        generate(&opts).unwrap();
        (dir, seg)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    #[test]
    fn partial_is_cut_at_the_published_flushed_lsn() {
        let (dir, seg) = wal_dir();
        let last = names(dir.path()).into_iter().filter(|n| has_segment_name_shape(n)).max().unwrap();
        let Some(WalFileName::Segment { segno, .. }) = WalFileName::parse(&last, seg) else { panic!() };
        std::fs::rename(dir.path().join(&last), dir.path().join(format!("{last}.partial"))).unwrap();
        let flushed = Lsn(segno * seg + 0x100);
        std::fs::write(dir.path().join(crate::recv::published::FILE_NAME), format!("{flushed}\n")).unwrap();
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("out");
        assert!(matches!(restore(dir.path(), &last, &target).unwrap(), RestoreOutcome::Partial(_)));
        let got = std::fs::read(&target).unwrap();
        let src = std::fs::read(dir.path().join(format!("{last}.partial"))).unwrap();
        assert_eq!(got.len() as u64, seg);
        assert_eq!(got[..0x100], src[..0x100]);
        assert!(got[0x100..].iter().all(|&b| b == 0), "bytes past flushed handed out");
    }

    #[test]
    fn a_partial_with_nothing_acknowledged_is_not_there_yet() {
        let (dir, _) = wal_dir();
        let last = names(dir.path()).into_iter().filter(|n| has_segment_name_shape(n)).max().unwrap();
        std::fs::rename(dir.path().join(&last), dir.path().join(format!("{last}.partial"))).unwrap();
        let err = restore(dir.path(), &last, &dir.path().join("out")).unwrap_err();
        assert!(matches!(err, RestoreError::NotYetDurable { .. }), "{err}");
        assert_eq!(err.exit_code(), EXIT_NOT_FOUND);
    }

    #[test]
    fn partial_is_served_under_the_plain_name_and_complete_wins() {
        let (dir, seg) = wal_dir();
        let first = names(dir.path()).into_iter().find(|n| has_segment_name_shape(n)).unwrap();
        let out = tempfile::tempdir().unwrap();
        let target = out.path().join("out");
        std::fs::write(dir.path().join(crate::recv::published::FILE_NAME), "FF/0 00000000\n").unwrap();
        std::fs::copy(dir.path().join(&first), dir.path().join(format!("{first}.partial"))).unwrap();
        assert!(matches!(restore(dir.path(), &first, &target).unwrap(), RestoreOutcome::Complete(_)));
        std::fs::remove_file(dir.path().join(&first)).unwrap();
        assert!(matches!(restore(dir.path(), &first, &target).unwrap(), RestoreOutcome::Partial(_)));
        assert_eq!(std::fs::read(&target).unwrap().len() as u64, seg);
    }

    #[test]
    fn a_missing_directory_or_foreign_content_is_fatal_not_absent() {
        let missing = restore(Path::new("/nonexistent/walship"), "000000010000000000000001", Path::new("/dev/null")).unwrap_err();
        assert!(matches!(missing, RestoreError::Dir { .. }), "{missing}");
        assert_eq!(missing.exit_code(), EXIT_FATAL);
        let (dir, _) = wal_dir();
        let segs: Vec<String> = names(dir.path()).into_iter().filter(|n| has_segment_name_shape(n)).collect();
        // Segment 2's bytes under segment 3's name: another position's WAL.
        std::fs::copy(dir.path().join(&segs[0]), dir.path().join(&segs[1])).unwrap();
        let wrong = restore(dir.path(), &segs[1], &dir.path().join("out")).unwrap_err();
        assert!(matches!(wrong, RestoreError::WrongContent { .. }), "{wrong}");
        assert_eq!(wrong.exit_code(), EXIT_FATAL);
        let absent = restore(dir.path(), "000000010000000000000042", &dir.path().join("out")).unwrap_err();
        assert_eq!(absent.exit_code(), EXIT_NOT_FOUND, "{absent}");
    }
}
