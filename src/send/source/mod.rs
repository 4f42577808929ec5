//! The sender's source of WAL behind one interface, [`WalSource`]: a `pg_wal` directory (or an
//! archive) at rest ([`dir`]) or a live server's `pg_wal` ([`live`], whose flush position comes
//! from the thread in [`poller`]). Also what both share: [`SourceError`], the cache of segment
//! mappings ([`SegmentMaps`]) and the history file reader.
//!
//! The io_uring loop in [`crate::send`] only calls [`WalSource`] methods; what one source has no
//! use for (a slot, a timeline switch, corruption found by a walk) has a default that says so.

pub mod backups;
pub mod dir;
pub mod live;
pub mod poller;

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::uring::SegmentMap;
use crate::wal::{Lsn, WalFileName, WalIdentity};

pub use dir::{estimate_end, DirSource, WalEnd};
pub use live::{LiveConfig, LiveSource, ServerState};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{dir}: no WAL segment files found")]
    Empty { dir: PathBuf },
    #[error("{path}: not a usable WAL segment: {why}")]
    BadFirstSegment { path: PathBuf, why: String },
    #[error(
        "corrupt WAL in {path} at offset {offset} (LSN {lsn}): {reason}; valid WAL ends at {valid_end}, \
         but WAL continues at {claimed} (page header valid for that position), so this is damage, not the end \
         of WAL. Everything before {valid_end} was shipped; nothing after it"
    )]
    Corrupt { path: PathBuf, offset: u64, lsn: Lsn, reason: String, valid_end: Lsn, claimed: Lsn },
    #[error(
        "--pg-wal and --conninfo are different clusters: the server at {conninfo} is system {server}, but {pg_wal} \
         holds WAL of system {wal} and {pg_control} says system {control}. Nothing was done on the server (no slot \
         created). Point --pg-wal at the pg_wal of the server --conninfo reaches (or fix --conninfo)"
    )]
    WrongCluster { conninfo: String, server: u64, pg_wal: PathBuf, wal: u64, pg_control: PathBuf, control: u64 },
    #[error("cannot use the server ({conninfo}): {why}")]
    Server { conninfo: String, why: String },
    #[error("{path}: WAL at {lsn} is no longer what the server wrote there: {why}")]
    Recycled { path: PathBuf, lsn: Lsn, why: String },
    #[error("segment {name} is missing from {dir} although later segments exist (WAL between {from} and {to} is not available)")]
    MissingSegment { dir: PathBuf, name: String, from: Lsn, to: Lsn },
}

/// Where the WAL comes from: a directory at rest or a live server. One per process.
pub type Source = Box<dyn WalSource>;

/// What the sender's loop asks of a source of WAL.
pub trait WalSource {
    fn identity(&self) -> WalIdentity;
    /// First byte this source has.
    fn first_lsn(&self) -> Lsn;
    /// Everything below this may be shipped.
    fn horizon(&self) -> Lsn;
    /// The horizon will not move any more (the directory walk ended).
    fn is_final(&self) -> bool {
        false
    }
    /// Moves the horizon: walks further toward `want` (directory) or takes in what the server
    /// said (live).
    fn refresh(&mut self, want: Lsn) -> Result<(), SourceError>;
    /// An eventfd that becomes readable when the horizon may have moved (following a server).
    fn wake_fd(&self) -> Option<RawFd> {
        None
    }
    /// How long the loop may wait before calling `refresh` again.
    fn wait_hint(&self) -> Duration;
    /// The mapping of the segment holding `lsn` (which must be below the horizon).
    fn map_for(&mut self, lsn: Lsn) -> Result<Arc<SegmentMap>, SourceError>;
    /// The file that holds `lsn` (or would).
    fn segment_path(&self, lsn: Lsn) -> PathBuf;
    /// Segments wholly below `lsn` are no longer needed by the source (sends in flight keep
    /// their own reference).
    fn release_below(&mut self, lsn: Lsn);
    /// The receiver holds everything below `flushed` durably.
    fn on_durable(&mut self, _flushed: Lsn) {}
    /// Where valid WAL ends because of damage, once the walk found it.
    fn corrupt_end(&self) -> Option<Lsn> {
        None
    }
    /// The damage that ended the walk, if it was damage.
    fn take_corruption(&mut self) -> Option<SourceError> {
        None
    }
    /// This timeline's history file, for the handshake.
    fn history(&self) -> String;
    /// Where the current timeline ends, when the server moved to a newer one.
    fn switch_point(&self) -> Option<Lsn> {
        None
    }
    /// Continue on the newer timeline (after `switch_point` was shipped).
    fn apply_switch(&mut self) -> Result<(), SourceError> {
        Ok(())
    }
    fn server_state(&self) -> Option<ServerState> {
        None
    }
    /// The slot's name and the start of the oldest segment it keeps (None without a slot).
    fn slot_protects_from(&self) -> Option<(&str, Lsn)> {
        None
    }
}

pub(crate) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SourceError + '_ {
    move |source| SourceError::Io { path: path.to_path_buf(), source }
}

/// The mapped segments a source holds, by segment number: mapped once, shared with the sends in
/// flight (`Arc`), dropped when everything below a position is durable.
#[derive(Debug)]
pub(crate) struct SegmentMaps {
    seg_size: u64,
    maps: BTreeMap<u64, Arc<SegmentMap>>,
}

impl SegmentMaps {
    pub(crate) fn new(seg_size: u64) -> SegmentMaps {
        SegmentMaps { seg_size, maps: BTreeMap::new() }
    }

    pub(crate) fn get(&self, segno: u64) -> Option<Arc<SegmentMap>> {
        self.maps.get(&segno).map(Arc::clone)
    }

    /// The mapping of segment `segno`, mapping `path` if it is not held yet; `open_err` tells
    /// what a failure to open the file means.
    pub(crate) fn map(
        &mut self,
        segno: u64,
        path: &Path,
        open_err: impl FnOnce(io::Error) -> SourceError,
    ) -> Result<Arc<SegmentMap>, SourceError> {
        if let Some(m) = self.get(segno) {
            return Ok(m);
        }
        let file = File::open(path).map_err(open_err)?;
        let map = SegmentMap::map(&file, self.seg_size).map_err(io_err(path))?;
        self.maps.insert(segno, Arc::clone(&map));
        Ok(map)
    }

    /// Forgets the segments wholly below `lsn`.
    pub(crate) fn release_below(&mut self, lsn: Lsn) {
        let segno = lsn.0 / self.seg_size;
        self.maps.retain(|&s, _| s >= segno);
    }

    pub(crate) fn clear(&mut self) {
        self.maps.clear();
    }
}

/// The history file of timeline `tli` in `dir` (empty for timeline 1).
pub fn read_history(dir: &Path, tli: u32) -> Result<String, SourceError> {
    if tli <= 1 {
        return Ok(String::new());
    }
    let path = dir.join(WalFileName::History { tli }.file_name(16 << 20));
    std::fs::read_to_string(&path).map_err(io_err(&path))
}
