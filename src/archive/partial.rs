//! The receiver's newest, unfinished segment in the store (`NAME.partial` objects): once the
//! published durable position has stayed put for `--archive-partial-after`, the `.partial` is
//! uploaded, its bytes past that position zeroed (as `walship restore` serves it), replacing the
//! previous upload; once the complete segment is in the store the `.partial` object is deleted. So
//! after a clean stop the store holds the WAL up to the shutdown checkpoint, and a standby restoring
//! from the store alone reaches it.
//!
//! A `.partial` of a timeline the WAL has left (promotion upstream: the newest history file names
//! where that timeline ended) never grows again: it goes to the store once, its bytes up to that
//! switch point (zeros after), as PostgreSQL's own archiver keeps the old timeline's last segment
//! as `NAME.partial`; it is never deleted (no complete segment of that timeline will come).
//!
//! What to upload is decided by [`PartialState::due`] and [`PartialState::abandoned_due`] (pure);
//! the archiver's thread carries it out.

use std::path::Path;
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use crate::wal::history::{switch_point, HistoryEntry};
use crate::wal::{Lsn, WalFileName};

/// What the archiver knows about the `.partial` between two looks.
#[derive(Debug, Default, Clone)]
pub struct PartialState {
    /// The durable position last seen and since when it has not moved.
    seen: Option<(Lsn, Instant)>,
    /// The `.partial` name and durable position last uploaded.
    uploaded: Option<(String, Lsn)>,
    /// Abandoned timelines' `.partial` files already in the store (this run).
    abandoned_uploaded: BTreeSet<String>,
}

/// One `.partial` to upload: the file's name and the durable position inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    pub name: String,
    pub durable: Lsn,
}

impl PartialState {
    /// Called at each look with the published durable position (None: nothing published) and the
    /// `.partial` file names in the directory: what to upload now, if anything.
    pub fn due(&mut self, durable: Option<Lsn>, partials: &[String], seg_size: u64, idle: Duration, now: Instant) -> Option<Upload> {
        let durable = durable?;
        match self.seen {
            Some((lsn, _)) if lsn == durable => {}
            _ => self.seen = Some((durable, now)),
        }
        let (_, since) = self.seen.expect("set above");
        if durable.0 % seg_size == 0 || now.saturating_duration_since(since) < idle {
            return None; // at a segment boundary the complete segment holds it all; or still moving
        }
        let segno = durable.0 / seg_size;
        // The newest timeline's `.partial` of the segment holding the durable position.
        let name = partials
            .iter()
            .filter(|n| matches!(WalFileName::parse(n, seg_size), Some(WalFileName::Partial { segno: s, .. }) if s == segno))
            .max()?
            .clone();
        if self.uploaded.as_ref().is_some_and(|(n, l)| *n == name && *l == durable) {
            return None;
        }
        Some(Upload { name, durable })
    }

    /// `up` is in the store.
    pub fn uploaded(&mut self, up: Upload) {
        self.uploaded = Some((up.name, up.durable));
    }

    /// The `.partial` files of timelines the WAL has left, not yet uploaded: those of an ancestor in
    /// `history` (the newest history file's entries) whose segment holds that ancestor's switch
    /// point, once the durable position has passed it (so every byte before it is durable). Each
    /// with the switch point as its end: the bytes after it are not that timeline's WAL.
    pub fn abandoned_due(&self, durable: Option<Lsn>, names: &[String], history: &[HistoryEntry], seg_size: u64) -> Vec<Upload> {
        let Some(durable) = durable else { return Vec::new() };
        names
            .iter()
            .filter(|n| !self.abandoned_uploaded.contains(*n))
            .filter_map(|n| match WalFileName::parse(n, seg_size)? {
                WalFileName::Partial { tli, segno } => {
                    let end = switch_point(history, tli)?;
                    let holds_end = end.0 / seg_size == segno && end.0 % seg_size != 0;
                    (holds_end && durable >= end).then(|| Upload { name: n.clone(), durable: end })
                }
                _ => None,
            })
            .collect()
    }

    /// The abandoned `.partial` `name` is in the store.
    pub fn abandoned_uploaded(&mut self, name: &str) {
        self.abandoned_uploaded.insert(name.to_string());
    }
}

/// The `.partial`'s bytes with everything at or past `durable` zeroed: only durable WAL leaves
/// the receiver.
pub fn durable_bytes(dir: &Path, up: &Upload, seg_size: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = std::fs::read(dir.join(&up.name))?;
    bytes.resize(seg_size as usize, 0);
    let cut = (up.durable.0 % seg_size) as usize;
    bytes[cut..].fill(0);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEG: u64 = 16 << 20;

    #[test]
    fn uploads_once_the_position_rests_and_once_per_position() {
        let mut p = PartialState::default();
        let t0 = Instant::now();
        let idle = Duration::from_secs(5);
        let names = vec!["000000010000000000000003.partial".to_string(), "000000010000000000000002.partial".to_string()];
        let at = Lsn(3 * SEG + 100);
        assert_eq!(p.due(Some(at), &names, SEG, idle, t0), None, "just seen");
        assert_eq!(p.due(Some(at), &names, SEG, idle, t0 + Duration::from_secs(4)), None, "not idle long enough");
        let up = p.due(Some(at), &names, SEG, idle, t0 + Duration::from_secs(6)).expect("due");
        assert_eq!(up, Upload { name: names[0].clone(), durable: at });
        p.uploaded(up);
        assert_eq!(p.due(Some(at), &names, SEG, idle, t0 + Duration::from_secs(20)), None, "already uploaded");
        let later = at + 5000;
        assert_eq!(p.due(Some(later), &names, SEG, idle, t0 + Duration::from_secs(21)), None, "moved: the clock starts again");
        assert!(p.due(Some(later), &names, SEG, idle, t0 + Duration::from_secs(27)).is_some());
        assert_eq!(p.due(Some(Lsn(4 * SEG)), &names, SEG, Duration::ZERO, t0), None, "a segment boundary needs no .partial");
        assert_eq!(p.due(None, &names, SEG, Duration::ZERO, t0), None);
        assert_eq!(p.due(Some(Lsn(5 * SEG + 1)), &names, SEG, Duration::ZERO, t0), None, "no such .partial");
    }

    #[test]
    fn an_abandoned_timelines_partial_goes_once_cut_at_its_switch_point() {
        let mut p = PartialState::default();
        let switch = Lsn(5 * SEG + 0x60);
        let history = vec![HistoryEntry { tli: 1, switch_lsn: switch }];
        let names: Vec<String> = [
            "000000010000000000000005.partial", // timeline 1 ended in it: abandoned
            "000000010000000000000004.partial", // not where timeline 1 ended (a stray): left alone
            "000000020000000000000005.partial", // the live timeline's: `due`'s business
            "00000002.history",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(p.abandoned_due(None, &names, &history, SEG), vec![], "nothing durable yet");
        assert_eq!(p.abandoned_due(Some(Lsn(switch.0 - 1)), &names, &history, SEG), vec![], "the switch point is not durable yet");
        let due = p.abandoned_due(Some(switch), &names, &history, SEG);
        assert_eq!(due, vec![Upload { name: names[0].clone(), durable: switch }]);
        p.abandoned_uploaded(&due[0].name);
        assert_eq!(p.abandoned_due(Some(Lsn(9 * SEG)), &names, &history, SEG), vec![], "once");
        let at_boundary = vec![HistoryEntry { tli: 1, switch_lsn: Lsn(6 * SEG) }];
        let q = PartialState::default();
        assert_eq!(q.abandoned_due(Some(Lsn(9 * SEG)), &["000000010000000000000006.partial".to_string()], &at_boundary, SEG), vec![], "a switch at a boundary leaves nothing of timeline 1 in segment 6");
        assert_eq!(q.abandoned_due(Some(Lsn(9 * SEG)), &names, &[], SEG), vec![], "no history: nothing is abandoned");
    }

    #[test]
    fn bytes_past_the_durable_position_are_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let name = "000000010000000000000001.partial".to_string();
        std::fs::write(dir.path().join(&name), vec![7u8; 4096]).unwrap();
        let b = durable_bytes(dir.path(), &Upload { name, durable: Lsn(SEG + 1000) }, SEG).unwrap();
        assert_eq!(b.len() as u64, SEG);
        assert!(b[..1000].iter().all(|&x| x == 7) && b[1000..].iter().all(|&x| x == 0));
    }
}
