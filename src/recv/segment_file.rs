//! The receiver's directory: segment files opened for O_DIRECT, `.partial` naming and durable
//! renames, and finding at start-up what the directory already holds durably.
//!
//! Only canonical PostgreSQL names are ever created, and only inside the directory.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::warn;

use super::published::{self, Published, PublishedError, Publisher};
use super::spares::Spares;
use crate::wal::{Lsn, RecordWalker, SegmentWalk, WalFileName, WalIdentity};

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a WAL segment this receiver can use: {why}")]
    BadSegment { path: PathBuf, why: String },
    #[error("writing {path}: {source}")]
    History { path: PathBuf, source: io::Error },
    #[error("renaming spare segment {spare} to {path}: {source}")]
    Spare { spare: PathBuf, path: PathBuf, source: io::Error },
    #[error(
        "{path}: this receiver acknowledged everything below {published} as durable (per {flushed_file}), but \
         {why}. Refusing to start: recovery never cuts WAL below an acknowledged LSN, and nothing was changed. \
         Was the directory written by another process, or the disk damaged? Check the file with pg_waldump; \
         restore it from another copy, or move it aside (the receiver then resumes from {resume_from}, and the \
         sender ships that segment again if it still has it)"
    )]
    AckedDamaged { path: PathBuf, published: Lsn, flushed_file: PathBuf, why: String, resume_from: Lsn },
    #[error(transparent)]
    Published(#[from] PublishedError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DirError + '_ {
    move |source| DirError::Io { path: path.to_path_buf(), source }
}

/// Who may read the files the receiver creates: their mode and, optionally, their group (so a
/// standby running as another user, e.g. `postgres`, can restore from the directory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileAccess {
    /// Permission bits of every file created (segments, history files, `.walship-flushed`).
    pub file_mode: u32,
    /// Group of every file created, and of the directory (None: the process's group).
    pub gid: Option<u32>,
}

impl Default for FileAccess {
    fn default() -> FileAccess {
        FileAccess { file_mode: 0o640, gid: None }
    }
}

impl FileAccess {
    /// Sets `file`'s mode (whatever the umask made of it) and group.
    pub fn apply(&self, file: &File, path: &Path) -> Result<(), DirError> {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(self.file_mode)).map_err(io_err(path))?;
        if let Some(gid) = self.gid {
            std::os::unix::fs::fchown(file, None, Some(gid)).map_err(|source| DirError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(source.kind(), format!("cannot give it group {gid} (--group): {source}")),
            })?;
        }
        Ok(())
    }

    /// Gives the directory and the WAL files already in it the configured group and mode (a
    /// directory written before `--group` was set becomes readable by that group); the directory
    /// gets group read and search permission to match.
    pub fn apply_to_dir(&self, dir: &Path) -> Result<(), DirError> {
        use std::os::unix::fs::PermissionsExt;
        let Some(gid) = self.gid else { return Ok(()) };
        let dir_file = File::open(dir).map_err(io_err(dir))?;
        std::os::unix::fs::fchown(&dir_file, None, Some(gid)).map_err(io_err(dir))?;
        let mode = dir_file.metadata().map_err(io_err(dir))?.permissions().mode() & 0o7777;
        let group_bits = if self.file_mode & 0o040 != 0 { 0o050 } else { 0 };
        dir_file.set_permissions(std::fs::Permissions::from_mode(mode | group_bits)).map_err(io_err(dir))?;
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let wal = crate::wal::has_segment_name_shape(name.strip_suffix(".partial").unwrap_or(name))
                || name.ends_with(".history")
                || name == published::FILE_NAME;
            if wal && entry.file_type().is_ok_and(|t| t.is_file()) {
                let path = entry.path();
                let file = File::open(&path).map_err(io_err(&path))?;
                self.apply(&file, &path)?;
            }
        }
        Ok(())
    }
}

/// What a receiver directory holds durably.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirState {
    /// Identity of the WAL already here (None: the directory has no segment yet).
    pub identity: Option<WalIdentity>,
    /// Everything below this LSN is durable here (0 when empty).
    pub durable_end: Lsn,
    /// Segment size of the WAL here (0 when empty).
    pub seg_size: u64,
    /// CRC-32C of the bytes of `durable_end`'s segment before it.
    pub durable_crc: u32,
}

/// One open segment file.
#[derive(Debug)]
pub struct SegmentFile {
    pub segno: u64,
    /// O_DIRECT descriptor for the data path.
    pub direct: File,
    /// Buffered descriptor for pre-reading the head of a partially written block.
    pub buffered: File,
}

#[derive(Debug)]
pub struct SegmentDir {
    dir: PathBuf,
    /// Open segments with O_DIRECT (default); `false` writes through the page cache (for
    /// comparison: `--write-mode buffered`). Durability is the same: fdatasync either way.
    direct_io: bool,
    publisher: Publisher,
    /// The directory itself, kept open for fsync.
    pub dir_file: File,
    tli: u32,
    seg_size: u64,
    access: FileAccess,
}

impl SegmentDir {
    pub fn open(dir: &Path, tli: u32, seg_size: u64) -> Result<SegmentDir, DirError> {
        let dir_file = File::open(dir).map_err(io_err(dir))?;
        Ok(SegmentDir {
            dir: dir.to_path_buf(),
            direct_io: true,
            publisher: Publisher::new(dir),
            dir_file,
            tli,
            seg_size,
            access: FileAccess::default(),
        })
    }

    /// Mode and group of the files this directory creates.
    pub fn with_access(mut self, access: FileAccess) -> SegmentDir {
        self.access = access;
        self
    }

    /// Writes through the page cache instead of O_DIRECT (`--write-mode buffered`).
    pub fn buffered(mut self, buffered: bool) -> SegmentDir {
        self.direct_io = !buffered;
        self
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn seg_size(&self) -> u64 {
        self.seg_size
    }

    pub fn partial_path(&self, segno: u64) -> PathBuf {
        self.dir.join(WalFileName::Partial { tli: self.tli, segno }.file_name(self.seg_size))
    }

    pub fn final_path(&self, segno: u64) -> PathBuf {
        self.dir.join(WalFileName::Segment { tli: self.tli, segno }.file_name(self.seg_size))
    }

    /// Opens `segno`'s `.partial`, creating it full size (sparse, reads as zeros) when missing,
    /// as pg_receivewal does, or, when `spares` has one ready, by renaming a pre-zeroed spare (all
    /// zeros, durable) to it. Returns whether the file was created (the directory then needs a sync).
    pub fn open_segment(&self, segno: u64, spares: Option<&Spares>) -> Result<(SegmentFile, bool), DirError> {
        let path = self.partial_path(segno);
        let final_path = self.final_path(segno);
        if final_path.exists() {
            return Err(DirError::BadSegment {
                path: final_path,
                why: "the segment is already complete here, but the stream is writing into it again".into(),
            });
        }
        let created = !path.exists();
        if let (true, Some(spares)) = (created, spares) {
            if let Some(spare) = spares.take(self.seg_size) {
                match std::fs::rename(&spare, &path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        // Removed behind our back: create the segment fresh instead.
                        warn!(spare = %spare.display(), "spare segment vanished; creating {} fresh", path.display());
                        spares.untake();
                    }
                    Err(source) => {
                        return Err(DirError::Spare { spare, path, source });
                    }
                }
            }
        }
        let direct = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .custom_flags(if self.direct_io { libc::O_DIRECT | libc::O_CLOEXEC } else { libc::O_CLOEXEC })
            .mode(0o640)
            .open(&path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    DirError::BadSegment {
                        path: path.clone(),
                        why: "the filesystem refuses O_DIRECT (tmpfs?); put the receiver directory on a disk filesystem".into(),
                    }
                } else {
                    DirError::Io { path: path.clone(), source: e }
                }
            })?;
        if created {
            self.access.apply(&direct, &path)?;
        }
        let len = direct.metadata().map_err(io_err(&path))?.len();
        if len != self.seg_size {
            if !created && len > self.seg_size {
                return Err(DirError::BadSegment { path, why: format!("{len} bytes, larger than a segment") });
            }
            direct.set_len(self.seg_size).map_err(io_err(&path))?;
        }
        let buffered = OpenOptions::new().read(true).open(&path).map_err(io_err(&path))?;
        Ok((SegmentFile { segno, direct, buffered }, created))
    }

    /// Reads bytes already on disk (the head of a block a resumed stream rewrites).
    pub fn prefill(&self, file: &SegmentFile, offset: u64, out: &mut [u8]) -> Result<(), DirError> {
        file.buffered.read_exact_at(out, offset).map_err(io_err(&self.partial_path(file.segno)))
    }

    /// Publishes the durable LSN (and the CRC of its segment's bytes before it) for recovery
    /// and `walship restore`.
    pub fn publish_flushed(&self, flushed: Lsn, crc: Option<u32>) -> Result<(), DirError> {
        let access = self.access;
        let path = self.publisher.path().to_path_buf();
        self.publisher
            .publish(Published { lsn: flushed, crc }, |f| access.apply(f, &path).map_err(|e| io::Error::other(e.to_string())))
            .map_err(DirError::from)
    }

    /// Stores a timeline history file durably under its canonical name (temp file, fsync,
    /// rename, fsync of the directory). An existing identical file is left alone.
    pub fn store_history(dir: &Path, tli: u32, content: &str, access: FileAccess) -> Result<(), DirError> {
        Self::store_small_file(dir, &WalFileName::History { tli }.file_name(16 << 20), content, access)
    }

    /// Stores a backup history file (`pg_backup_stop()`'s `.backup`, shipped by the sender)
    /// durably, like [`SegmentDir::store_history`]; `name` must be a backup history file's name.
    pub fn store_backup(dir: &Path, name: &str, seg_size: u64, content: &str, access: FileAccess) -> Result<(), DirError> {
        if !matches!(WalFileName::parse(name, seg_size), Some(WalFileName::Backup { .. })) {
            return Err(DirError::BadSegment {
                path: dir.join(name),
                why: "expected a backup history file name (TTTTTTTTXXXXXXXXYYYYYYYY.OOOOOOOO.backup)".into(),
            });
        }
        Self::store_small_file(dir, name, content, access)
    }

    /// temp file, fsync, rename, fsync of the directory; an identical file is left alone.
    fn store_small_file(dir: &Path, name: &str, content: &str, access: FileAccess) -> Result<(), DirError> {
        let path = dir.join(name);
        if std::fs::read_to_string(&path).is_ok_and(|old| old == content) {
            return Ok(());
        }
        let tmp = dir.join(format!(".{name}.tmp"));
        let err = |source| DirError::History { path: path.clone(), source };
        {
            let mut f = OpenOptions::new().create(true).truncate(true).write(true).mode(0o640).open(&tmp).map_err(err)?;
            access.apply(&f, &path)?;
            std::io::Write::write_all(&mut f, content.as_bytes()).map_err(err)?;
            f.sync_all().map_err(err)?;
        }
        std::fs::rename(&tmp, &path).map_err(err)?;
        File::open(dir).and_then(|d| d.sync_all()).map_err(err)
    }

    /// The segment is complete and durable: `.partial` -> final name. The caller syncs the directory.
    pub fn complete(&self, segno: u64) -> Result<(), DirError> {
        let from = self.partial_path(segno);
        let to = self.final_path(segno);
        std::fs::rename(&from, &to).map_err(io_err(&from))
    }
}

/// Finds what `dir` holds durably: complete segments are durable by construction (renamed only
/// after their data was synced); `.partial` files are walked record by record and the
/// durable end is the end of the last valid record in them (a torn tail is ignored and cut off).
/// Partial files that turn out complete are fsynced and renamed; files past the durable end
/// are removed (nothing in them was ever acknowledged).
///
/// Bytes below the published acknowledged LSN are never cut: if they no longer check out, recovery
/// refuses to start and changes nothing. Takes the directory's lock as proof that no other process
/// writes here while recovery decides what is durable.
pub fn recover_dir(lock: &super::dir_lock::DirLock) -> Result<DirState, DirError> {
    let dir = lock.path().parent().expect("the lock file lives in the directory");
    let published = published::read(dir)?.map(|p| (p.lsn, p.crc));
    let candidates = wal_file_names(dir)?;
    let Some(first) = candidates.first() else {
        return Ok(DirState { identity: None, durable_end: Lsn(0), seg_size: 0, durable_crc: 0 });
    };
    let identity = read_identity(&dir.join(first))?;
    let seg_size = identity.seg_size;
    let (tli, complete, partial) = newest_timeline_files(&candidates, seg_size);
    let identity = WalIdentity { tli, ..identity };
    let segdir = SegmentDir::open(dir, tli, seg_size)?;
    let complete_end = complete.last().map(|&s| Lsn((s + 1) * seg_size));
    let partial_above: Vec<u64> = partial.into_iter().filter(|&s| complete_end.is_none_or(|end| s * seg_size >= end.0)).collect();
    let mut walk = PartialWalk {
        segdir: &segdir,
        identity,
        published,
        walker: None,
        durable_end: complete_end.unwrap_or(Lsn(0)),
        durable_crc: 0,
        stopped: false,
    };
    for segno in partial_above {
        walk.recover_partial(segno)?;
    }
    let (durable_end, durable_crc) = (walk.durable_end, walk.durable_crc);
    warn_if_acknowledged_tail_lost(dir, published, durable_end);
    Ok(DirState { identity: Some(identity), durable_end, seg_size, durable_crc })
}

/// Names in `dir` shaped like a segment or a `.partial`, sorted.
fn wal_file_names(dir: &Path) -> Result<Vec<String>, DirError> {
    let mut candidates: Vec<String> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        if let Some(name) = entry.file_name().to_str() {
            if crate::wal::has_segment_name_shape(name.strip_suffix(".partial").unwrap_or(name)) {
                candidates.push(name.to_string());
            }
        }
    }
    candidates.sort();
    Ok(candidates)
}

/// The newest timeline among `names` (the one the stream continues on; older timelines' files
/// stay as they are, history for a standby that restores across a switch) and its complete and
/// `.partial` segment numbers, sorted; a partial whose complete twin exists is a leftover (the
/// complete file wins) and is left out.
fn newest_timeline_files(names: &[String], seg_size: u64) -> (u32, Vec<u64>, Vec<u64>) {
    let mut complete: Vec<(u32, u64)> = Vec::new();
    let mut partial: Vec<(u32, u64)> = Vec::new();
    for name in names {
        match WalFileName::parse(name, seg_size) {
            Some(WalFileName::Segment { tli, segno }) => complete.push((tli, segno)),
            Some(WalFileName::Partial { tli, segno }) => partial.push((tli, segno)),
            _ => {}
        }
    }
    let tli = complete.iter().chain(partial.iter()).map(|&(t, _)| t).max().expect("a segment file");
    let of_tli = |files: Vec<(u32, u64)>| {
        let mut segnos: Vec<u64> = files.into_iter().filter(|&(t, _)| t == tli).map(|(_, s)| s).collect();
        segnos.sort();
        segnos
    };
    let complete = of_tli(complete);
    let mut partial = of_tli(partial);
    partial.retain(|s| !complete.contains(s));
    (tli, complete, partial)
}

/// The walk over the newest timeline's `.partial` files above its complete segments, in order.
struct PartialWalk<'a> {
    segdir: &'a SegmentDir,
    identity: WalIdentity,
    /// The published acknowledged LSN and the CRC of its segment's bytes before it.
    published: Option<(Lsn, Option<u32>)>,
    walker: Option<RecordWalker>,
    durable_end: Lsn,
    durable_crc: u32,
    /// The walk ended inside an earlier partial: later ones hold nothing acknowledged.
    stopped: bool,
}

impl PartialWalk<'_> {
    fn recover_partial(&mut self, segno: u64) -> Result<(), DirError> {
        let seg_size = self.identity.seg_size;
        let path = self.segdir.partial_path(segno);
        let seg_start = Lsn(segno * seg_size);
        if self.stopped {
            // The previous segment is not complete, so nothing here was ever acknowledged.
            return std::fs::remove_file(&path).map_err(io_err(&path));
        }
        if self.durable_end != Lsn(0) && seg_start != self.durable_end {
            return Err(DirError::BadSegment {
                path,
                why: format!("it starts at {seg_start} but the directory's WAL ends at {}: a segment is missing", self.durable_end),
            });
        }
        let bytes = read_partial(&path, seg_size)?;
        let identity = self.identity;
        let w = self.walker.get_or_insert_with(|| RecordWalker::new(identity, seg_start));
        let walk = w
            .walk_segment(seg_start, &bytes)
            .map_err(|e| DirError::BadSegment { path: path.clone(), why: e.to_string() })?;
        match walk {
            SegmentWalk::Continues { .. } => {
                // Every byte of this segment is valid WAL: it was complete, only not renamed.
                let file = File::open(&path).map_err(io_err(&path))?;
                file.sync_all().map_err(io_err(&path))?;
                self.segdir.complete(segno)?;
                self.segdir.dir_file.sync_all().map_err(io_err(&self.segdir.dir))?;
                self.durable_end = Lsn((segno + 1) * seg_size);
            }
            SegmentWalk::Ended { valid_end, .. } => {
                let mut end = valid_end.max(seg_start).max(self.durable_end);
                // The receiver acknowledges frame ends, usually inside a record: the published
                // durable LSN (with the CRC of the bytes before it) keeps that acknowledged tail.
                if let Some((acked, crc)) = self.published.filter(|&(acked, _)| acked > end) {
                    end = keep_acknowledged_tail(&self.segdir.dir, &path, &bytes, seg_start, seg_size, acked, crc, end)?;
                }
                cut_tail(&path, end.0 - seg_start.0, seg_size)?;
                self.durable_crc = crc32c::crc32c(&bytes[..(end - seg_start) as usize]);
                self.durable_end = end;
                self.stopped = true;
            }
        }
        Ok(())
    }
}

/// A `.partial`'s bytes, padded with zeros to a whole segment when it is shorter.
fn read_partial(path: &Path, seg_size: u64) -> Result<Vec<u8>, DirError> {
    let mut bytes = std::fs::read(path).map_err(io_err(path))?;
    if bytes.len() as u64 > seg_size {
        return Err(DirError::BadSegment { path: path.to_path_buf(), why: format!("{} bytes, more than a segment ({seg_size})", bytes.len()) });
    }
    if (bytes.len() as u64) < seg_size {
        // Created but not yet sized (a crash right after creation), or cut short: what is
        // missing reads as zeros, and the walk finds where valid WAL ends.
        warn!(path = %path.display(), len = bytes.len(), "partial segment shorter than a segment; padding it with zeros");
        bytes.resize(seg_size as usize, 0);
    }
    Ok(bytes)
}

/// Nothing to cut or keep when the files holding the acknowledged tail are gone: say so.
fn warn_if_acknowledged_tail_lost(dir: &Path, published: Option<(Lsn, Option<u32>)>, durable_end: Lsn) {
    if let Some((acked, _)) = published.filter(|&(acked, _)| acked > durable_end) {
        warn!(
            dir = %dir.display(),
            published = %acked,
            durable_end = %durable_end,
            "this receiver acknowledged WAL up to {acked}, but the directory now holds it only up to {durable_end}: \
             files were removed behind walship's back. Resuming from {durable_end}; the sender ships the rest again \
             only if it still has it"
        );
    }
}

/// The published acknowledged LSN `acked` lies past the last valid record (`valid_end`) of the
/// `.partial` at `seg_start`: keep it when the bytes before it match the published CRC; anything
/// else means acknowledged bytes are not what was acknowledged, and recovery must not cut them.
#[allow(clippy::too_many_arguments)]
fn keep_acknowledged_tail(
    dir: &Path,
    path: &Path,
    bytes: &[u8],
    seg_start: Lsn,
    seg_size: u64,
    acked: Lsn,
    crc: Option<u32>,
    valid_end: Lsn,
) -> Result<Lsn, DirError> {
    let refuse = |why: String| DirError::AckedDamaged {
        path: path.to_path_buf(),
        published: acked,
        flushed_file: dir.join(published::FILE_NAME),
        why,
        resume_from: seg_start,
    };
    if acked >= seg_start + seg_size {
        return Err(refuse(format!(
            "the valid WAL in this (last) segment ends at {valid_end}, and no later segment is here"
        )));
    }
    let Some(crc) = crc else {
        // An old-format file without a CRC: nothing to check the tail against; keep the
        // acknowledged bytes as they are rather than cut them.
        warn!(path = %path.display(), published = %acked, "no CRC published with the acknowledged LSN {acked}; keeping the bytes before it unchecked");
        return Ok(acked);
    };
    let upto = (acked - seg_start) as usize;
    let found = crc32c::crc32c(&bytes[..upto]);
    if found != crc {
        return Err(refuse(format!(
            "the bytes of this segment before it no longer match the CRC-32C published with it \
             ({found:08x} found, {crc:08x} published); the last valid record ends at {valid_end}"
        )));
    }
    Ok(acked)
}

/// Zeroes everything after `keep_bytes` (torn or unacknowledged bytes), durably.
fn cut_tail(path: &Path, keep_bytes: u64, seg_size: u64) -> Result<(), DirError> {
    let file = OpenOptions::new().write(true).open(path).map_err(io_err(path))?;
    file.set_len(keep_bytes).map_err(io_err(path))?;
    file.set_len(seg_size).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

fn read_identity(path: &Path) -> Result<WalIdentity, DirError> {
    let head = crate::wal::read_segment_head(path).map_err(io_err(path))?;
    WalIdentity::from_first_page(&head).map_err(|e| DirError::BadSegment { path: path.to_path_buf(), why: e.to_string() })
}
