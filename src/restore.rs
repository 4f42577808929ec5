//! `walship restore %f %p`: PostgreSQL's `restore_command`, served from a receiver directory.
//!
//! A complete segment or history file is copied as is. When only `NAME.partial` exists (the
//! newest, still incomplete segment), it is handed out under the plain name: PostgreSQL never
//! asks for `.partial` files by itself, but needs that segment to reach the end of the WAL.

use std::path::{Path, PathBuf};

use crate::wal::{has_segment_name_shape, is_valid_seg_size, WalFileName};

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("{name:?} is not a WAL segment or history file name (expected 24 hex digits, or 8 hex digits + .history)")]
    BadName { name: String },
    #[error("{name} is not in {dir} (neither complete nor .partial)")]
    NotFound { name: String, dir: PathBuf },
    #[error("copying {from} to {to}: {source}")]
    Copy { from: PathBuf, to: PathBuf, source: std::io::Error },
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
    let complete = dir.join(name);
    if complete.is_file() {
        copy(&complete, target)?;
        return Ok(RestoreOutcome::Complete(complete));
    }
    let partial = dir.join(format!("{name}.partial"));
    if has_segment_name_shape(name) && partial.is_file() {
        copy(&partial, target)?;
        cut_at_flushed(dir, name, target)?;
        return Ok(RestoreOutcome::Partial(partial));
    }
    Err(RestoreError::NotFound { name: name.into(), dir: dir.to_path_buf() })
}

/// A running receiver may have written bytes of the `.partial` that are not durable yet: zero
/// everything from its published flushed LSN on, so recovery never replays what could be lost.
fn cut_at_flushed(dir: &Path, name: &str, target: &Path) -> Result<(), RestoreError> {
    let Some(flushed) = crate::recv::segment_file::read_published_flushed(dir) else { return Ok(()) };
    let seg_size = std::fs::metadata(target).map_err(|source| copy_err(dir, target, source))?.len();
    // The receiver writes `.partial` files of exactly one segment.
    let Some(WalFileName::Segment { segno, .. }) = WalFileName::parse(name, seg_size).filter(|_| is_valid_seg_size(seg_size)) else {
        return Ok(());
    };
    let seg_start = segno * seg_size;
    if flushed.0 >= seg_start + seg_size {
        return Ok(());
    }
    let keep = flushed.0.saturating_sub(seg_start);
    let file = std::fs::OpenOptions::new().write(true).open(target).map_err(|source| copy_err(dir, target, source))?;
    file.set_len(keep).and_then(|_| file.set_len(seg_size)).map_err(|source| copy_err(dir, target, source))
}

fn copy_err(from: &Path, to: &Path, source: std::io::Error) -> RestoreError {
    RestoreError::Copy { from: from.to_path_buf(), to: to.to_path_buf(), source }
}

fn copy(from: &Path, to: &Path) -> Result<(), RestoreError> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|source| RestoreError::Copy { from: from.to_path_buf(), to: to.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_path_is_built() {
        for bad in ["../etc/passwd", "000000010000000000000001/..", "00000001.history.x", "0000000100000000000000zz", ""] {
            assert!(matches!(restore(Path::new("/nonexistent"), bad, Path::new("/dev/null")), Err(RestoreError::BadName { .. })), "{bad}");
        }
    }

    #[test]
    fn partial_is_cut_at_the_published_flushed_lsn() {
        let dir = tempfile::tempdir().unwrap();
        let name = "000000010000000000000003"; // 16 MiB segments: starts at 0/3000000
        std::fs::write(dir.path().join(format!("{name}.partial")), vec![7u8; 16 << 20]).unwrap();
        std::fs::write(dir.path().join(crate::recv::segment_file::FLUSHED_FILE_NAME), "0/3000100\n").unwrap();
        let target = dir.path().join("out");
        restore(dir.path(), name, &target).unwrap();
        let got = std::fs::read(&target).unwrap();
        assert_eq!(got.len(), 16 << 20);
        assert!(got[..0x100].iter().all(|&b| b == 7));
        assert!(got[0x100..].iter().all(|&b| b == 0), "bytes past flushed handed out");
    }

    #[test]
    fn partial_is_served_under_the_plain_name_and_complete_wins() {
        let dir = tempfile::tempdir().unwrap();
        let name = "000000010000000000000003";
        let target = dir.path().join("out");
        assert!(matches!(restore(dir.path(), name, &target), Err(RestoreError::NotFound { .. })));
        std::fs::write(dir.path().join(format!("{name}.partial")), b"partial").unwrap();
        assert!(matches!(restore(dir.path(), name, &target).unwrap(), RestoreOutcome::Partial(_)));
        assert_eq!(std::fs::read(&target).unwrap(), b"partial");
        std::fs::write(dir.path().join(name), b"complete").unwrap();
        assert!(matches!(restore(dir.path(), name, &target).unwrap(), RestoreOutcome::Complete(_)));
        assert_eq!(std::fs::read(&target).unwrap(), b"complete");
    }
}
