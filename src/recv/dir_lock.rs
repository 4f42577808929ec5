//! The receiver directory's owner: an exclusive `flock` on `DIR/.walship.lock`, taken before
//! recovery reads or changes anything and held for the life of the process.
//!
//! Two receivers on one directory destroy each other's acknowledged bytes (each one's start-up
//! recovery cuts the other's `.partial` back), so a second process refuses to start and names the
//! holder. The lock is the kernel's: it goes away with the process however it ends (kill -9
//! included), so a stale lock file never blocks a restart. The pid written into the file is only
//! for the message.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock file's name (not a WAL name: PostgreSQL, restore and the directory scan ignore it).
pub const LOCK_FILE_NAME: &str = ".walship.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{dir} is in use by another walship process ({holder}, per {lock_file}); two processes on one \
         directory would destroy each other's acknowledged WAL. Stop that process first, or give this one \
         another --dir"
    )]
    Held { dir: PathBuf, lock_file: PathBuf, holder: String },
    #[error("cannot lock {lock_file}: {source}")]
    Io { lock_file: PathBuf, source: io::Error },
}

/// Holds the directory's lock until dropped (the process's end).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
}

impl DirLock {
    /// Takes the exclusive lock on `dir` (which must exist) for `what` (e.g. "walship recv"),
    /// without waiting: a held lock is an error naming the holder.
    pub fn acquire(dir: &Path, what: &str) -> Result<DirLock, LockError> {
        let path = dir.join(LOCK_FILE_NAME);
        let io_err = |source| LockError::Io { lock_file: path.clone(), source };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(io_err)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(LockError::Held { dir: dir.to_path_buf(), lock_file: path.clone(), holder: describe_holder(&mut file) });
            }
            Err(errno) => return Err(io_err(errno.into())),
        }
        let line = format!("pid {} {what}\n", std::process::id());
        file.set_len(0).and_then(|_| file.rewind()).and_then(|_| file.write_all(line.as_bytes())).map_err(io_err)?;
        Ok(DirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// "pid 1234 walship recv", from what the holder wrote into the lock file.
fn describe_holder(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.rewind().and_then(|_| file.read_to_string(&mut text));
    let text = text.trim();
    if text.is_empty() {
        "pid unknown: it holds the lock but has not written its pid yet".into()
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_same_directory_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirLock::acquire(dir.path(), "walship recv").unwrap();
        // flock locks belong to the open file description: a second open in this same process
        // conflicts exactly as another process's would.
        let err = DirLock::acquire(dir.path(), "walship recv").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, LockError::Held { .. }), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "holder not named: {msg}");
        drop(first);
        DirLock::acquire(dir.path(), "walship recv").expect("free again once the holder is gone");
    }
}
