//! Backup history files (`TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup`, written into `pg_wal` by
//! `pg_backup_stop()`) that a connection has not shipped yet. The receiver keeps them (and its
//! archiver uploads them) so that retention knows where the newest base backup starts.
//!
//! PostgreSQL writes the file in place (no rename), so a file is shipped only once it is whole:
//! its last line, `STOP TIMELINE: N`, is there and ends with a newline.
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::uring::SendBatch;
use crate::wal::WalFileName;
use crate::wire::{BackupFile, Message, BACKUP_FILE_BYTES_MAX, FRAME_HEADER_LEN};

/// How often the source directory is looked at for new backup history files.
pub const BACKUP_LOOK_INTERVAL: Duration = Duration::from_secs(1);

/// The backup history files in `dir` not in `shipped`, by name (the backup's start order).
pub fn unshipped_backup_files(dir: &Path, seg_size: u64, shipped: &BTreeSet<String>) -> std::io::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !shipped.contains(n) && matches!(WalFileName::parse(n, seg_size), Some(WalFileName::Backup { .. })))
        .collect();
    names.sort();
    Ok(names)
}

/// Whether a backup history file's content is whole (PostgreSQL writes `STOP TIMELINE` last).
pub fn is_complete_backup_file(content: &str) -> bool {
    content.ends_with('\n') && content.lines().any(|l| l.starts_with("STOP TIMELINE:"))
}

/// One connection's view: which backup history files it shipped.
#[derive(Debug)]
pub struct BackupShipper {
    shipped: BTreeSet<String>,
    next_look: Instant,
}

impl Default for BackupShipper {
    fn default() -> Self {
        BackupShipper { shipped: BTreeSet::new(), next_look: Instant::now() }
    }
}

impl BackupShipper {
    /// The next whole backup history file in `dir` this connection has not shipped, as one frame
    /// ready to send (and counted as shipped); looks at `dir` once per [`BACKUP_LOOK_INTERVAL`]
    /// (`dir` is asked for only then: nothing is allocated between two looks).
    pub fn next_frame(&mut self, dir: impl FnOnce() -> PathBuf, seg_size: u64) -> Option<SendBatch> {
        if Instant::now() < self.next_look {
            return None;
        }
        let dir = dir();
        let dir = dir.as_path();
        let names = match unshipped_backup_files(dir, seg_size, &self.shipped) {
            Ok(n) => n,
            Err(e) => {
                warn!(dir = %dir.display(), "cannot look for backup history files: {e}");
                Vec::new()
            }
        };
        for name in names {
            let path = dir.join(&name);
            let Ok(bytes) = std::fs::read(&path) else { continue }; // removed meanwhile
            let content = String::from_utf8_lossy(&bytes).into_owned();
            if content.len() > BACKUP_FILE_BYTES_MAX {
                warn!(file = %path.display(), bytes = content.len(), "backup history file larger than {BACKUP_FILE_BYTES_MAX} bytes: not shipped");
                self.shipped.insert(name);
                continue;
            }
            if !is_complete_backup_file(&content) {
                continue; // still being written: next look
            }
            self.shipped.insert(name.clone());
            info!(file = %name, "shipping the backup history file {name}");
            let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + content.len() + 64);
            Message::BackupFile(BackupFile { name, content }).encode(&mut frame);
            let mut batch = SendBatch::new(frame.len());
            batch.push_small(&frame);
            return Some(batch);
        }
        self.next_look = Instant::now() + BACKUP_LOOK_INTERVAL;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;
    const WHOLE: &str = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTOP WAL LOCATION: 0/2000100 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\nBACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-12-01 01:00:00 UTC\nLABEL: x\nSTART TIMELINE: 1\nSTOP TIME: 2026-12-01 01:00:01 UTC\nSTOP TIMELINE: 1\n";

    #[test]
    fn lists_only_unshipped_backup_files() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["000000010000000000000002.00000028.backup", "000000010000000000000001.00000028.backup", "000000010000000000000002", "00000002.history", "x.backup"] {
            std::fs::write(dir.path().join(n), WHOLE).unwrap();
        }
        let mut shipped = BTreeSet::new();
        let got = unshipped_backup_files(dir.path(), SEG, &shipped).unwrap();
        assert_eq!(got, vec!["000000010000000000000001.00000028.backup", "000000010000000000000002.00000028.backup"]);
        shipped.insert(got[0].clone());
        assert_eq!(unshipped_backup_files(dir.path(), SEG, &shipped).unwrap(), vec!["000000010000000000000002.00000028.backup"]);
    }

    #[test]
    fn only_whole_files_are_shipped_once() {
        assert!(is_complete_backup_file(WHOLE));
        assert!(!is_complete_backup_file(&WHOLE[..WHOLE.len() - 1]));
        assert!(!is_complete_backup_file("START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("000000010000000000000002.00000028.backup");
        std::fs::write(&path, &WHOLE[..40]).unwrap();
        let mut s = BackupShipper::default();
        assert!(s.next_frame(|| dir.path().to_path_buf(), SEG).is_none());
        std::fs::write(&path, WHOLE).unwrap();
        s.next_look = Instant::now();
        assert!(s.next_frame(|| dir.path().to_path_buf(), SEG).is_some());
        s.next_look = Instant::now();
        assert!(s.next_frame(|| dir.path().to_path_buf(), SEG).is_none());
    }
}
