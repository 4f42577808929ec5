//! The receiver's published durable position, `DIR/.walship-flushed`: the one owner of its format.
//! The receive loop writes it after every advance of `flushed`; recovery reads it to keep an
//! acknowledged tail (and refuses to cut below it); `walship restore` reads it to hand out only
//! durable bytes of the newest `.partial`.
//!
//! One line, rewritten in place: `LSN CRC` where CRC is the CRC-32C (hex) of the bytes of LSN's
//! segment before it, or `-`. No fsync: the value written is always one that was durable when it was
//! written, and after a crash an older value is as true as the newer one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::wal::Lsn;

/// The file's name (not a WAL name: PostgreSQL and the directory scan ignore it).
pub const FILE_NAME: &str = ".walship-flushed";

/// Width the line is padded to, so a rewrite in place always covers the previous line.
const LINE_BYTES: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum PublishedError {
    #[error("{path}: cannot read the receiver's published durable LSN: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path}: cannot publish the durable LSN: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// What a receiver published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Everything below this was durable (and acknowledged) when it was written.
    pub lsn: Lsn,
    /// CRC-32C of the bytes of `lsn`'s segment before `lsn` (None: an old file without one).
    pub crc: Option<u32>,
}

impl Published {
    fn line(&self) -> String {
        let crc = self.crc.map_or("-".to_string(), |c| format!("{c:08x}"));
        format!("{:<width$}\n", format!("{} {crc}", self.lsn), width = LINE_BYTES - 1)
    }

    fn parse(text: &str) -> Option<Published> {
        let mut words = text.split_whitespace();
        let lsn = words.next()?.parse().ok()?;
        let crc = words.next().and_then(|w| u32::from_str_radix(w, 16).ok());
        Some(Published { lsn, crc })
    }
}

/// Reads what a receiver published in `dir`: `Ok(None)` when nothing was (no file, or no LSN in
/// it); an error when the file exists but cannot be read, since a reader that went on without it
/// would hand out bytes that are not durable.
pub fn read(dir: &Path) -> Result<Option<Published>, PublishedError> {
    let path = dir.join(FILE_NAME);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(Published::parse(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PublishedError::Read { path, source }),
    }
}

/// The writing side, kept open by the receiver.
#[derive(Debug)]
pub struct Publisher {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

impl Publisher {
    pub fn new(dir: &Path) -> Publisher {
        Publisher { path: dir.join(FILE_NAME), file: Mutex::new(None) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rewrites the line; `on_create` sets the new file's mode and group.
    pub fn publish(&self, published: Published, on_create: impl FnOnce(&File) -> io::Result<()>) -> Result<(), PublishedError> {
        let err = |source| PublishedError::Write { path: self.path.clone(), source };
        let mut guard = self.file.lock().expect("published file lock");
        if guard.is_none() {
            let f = OpenOptions::new().create(true).truncate(false).write(true).mode(0o640).open(&self.path).map_err(err)?;
            on_create(&f).map_err(err)?;
            *guard = Some(f);
        }
        guard.as_ref().expect("open").write_all_at(published.line().as_bytes(), 0).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_published_reads_back_and_a_shorter_line_covers_a_longer_one() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        let p = Publisher::new(dir.path());
        let long = Published { lsn: Lsn(0xFFFF_FFFF_0000_0000), crc: Some(0xdead_beef) };
        let short = Published { lsn: Lsn(0x100), crc: None };
        p.publish(long, |_| Ok(())).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(long));
        p.publish(short, |_| Ok(())).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(short));
        assert_eq!(std::fs::read(dir.path().join(FILE_NAME)).unwrap().len(), LINE_BYTES);
    }

    #[test]
    fn an_unreadable_file_is_an_error_not_nothing() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(FILE_NAME)).unwrap(); // reading a directory fails
        assert!(matches!(read(dir.path()), Err(PublishedError::Read { .. })));
    }
}
