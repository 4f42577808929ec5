//! Group commit: turns completed writes into as few fdatasyncs as the limits allow, and says when
//! `flushed` may advance. Pure logic; the io loop carries out the fsyncs it asks for.
//!
//! A batch is cut at the `written` LSN current when it is issued: it syncs every file that got a
//! completed write since the previous batch (and the directory, when a file was created or
//! renamed), and `flushed` moves to the batch's target only when all of that batch's fsyncs *and
//! every earlier batch* completed. fsyncs are issued only after the write completions they cover,
//! because io_uring does not order an fsync after earlier writes.

use std::collections::{BTreeSet, VecDeque};

use crate::wal::Lsn;

/// What a single fsync in a batch covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SyncTarget {
    Segment(u64),
    Directory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsyncRequest {
    pub batch_id: u64,
    pub target: SyncTarget,
}

#[derive(Debug, Clone, Copy)]
pub struct FlushPolicy {
    /// Issue a batch once this many written bytes wait for a sync.
    pub batch_bytes: u64,
    /// Issue a batch once the oldest unsynced write is this old.
    pub interval_us: u64,
    /// At most this many batches in flight.
    pub batches_in_flight_max: usize,
}

#[derive(Debug)]
struct Batch {
    id: u64,
    target: Lsn,
    fsyncs_pending: usize,
}

#[derive(Debug)]
pub struct Flusher {
    policy: FlushPolicy,
    dirty_segments: BTreeSet<u64>,
    dir_dirty: bool,
    batches: VecDeque<Batch>,
    next_batch_id: u64,
    /// Highest target handed to a batch (or the durable start).
    issued_target: Lsn,
    flushed: Lsn,
    /// When the oldest write not yet covered by a batch completed.
    unsynced_since_us: Option<u64>,
    /// An fsync failed: the kernel may have dropped dirty pages and a later fsync can "succeed"
    /// without them (PostgreSQL's fsyncgate), so `flushed` never moves again.
    poisoned: bool,
}

impl Flusher {
    pub fn new(policy: FlushPolicy, durable: Lsn) -> Flusher {
        assert!(policy.batches_in_flight_max > 0);
        Flusher {
            policy,
            dirty_segments: BTreeSet::new(),
            dir_dirty: false,
            batches: VecDeque::new(),
            next_batch_id: 1,
            issued_target: durable,
            flushed: durable,
            unsynced_since_us: None,
            poisoned: false,
        }
    }

    /// An fsync of batch `batch_id` failed. Fatal: nothing is acknowledged from now on.
    pub fn on_fsync_failed(&mut self, batch_id: u64) {
        debug_assert!(self.batch_pending(batch_id));
        self.poisoned = true;
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    pub fn batches_in_flight(&self) -> usize {
        self.batches.len()
    }

    /// A write into `segno` completed at `now_us`.
    pub fn on_write_completed(&mut self, segno: u64, now_us: u64) {
        self.dirty_segments.insert(segno);
        self.unsynced_since_us.get_or_insert(now_us);
    }

    /// A file was created or renamed in the directory: the next batch syncs the directory.
    pub fn on_directory_changed(&mut self, now_us: u64) {
        self.dir_dirty = true;
        self.unsynced_since_us.get_or_insert(now_us);
    }

    /// Work waiting for a sync that a batch would cover.
    pub fn has_unsynced(&self, written: Lsn) -> bool {
        written > self.issued_target || self.dir_dirty
    }

    /// Decides whether to cut a batch now. `idle` means no frame is being received: flush what
    /// there is (PostgreSQL's walreceiver: drain what is readable, flush once). `force` flushes
    /// regardless of thresholds (shutdown, disconnect).
    pub fn poll(&mut self, now_us: u64, written: Lsn, idle: bool, force: bool, out: &mut Vec<FsyncRequest>) {
        if self.poisoned || !self.has_unsynced(written) {
            return;
        }
        let waiting_bytes = written - self.issued_target.min(written);
        let waited_us = self.unsynced_since_us.map_or(0, |t| now_us.saturating_sub(t));
        let full = waiting_bytes >= self.policy.batch_bytes;
        let late = waited_us >= self.policy.interval_us;
        let may_issue = if self.batches.is_empty() {
            full || late || idle || force
        } else {
            self.batches.len() < self.policy.batches_in_flight_max && (full || late || force)
        };
        if may_issue {
            self.issue(written, out);
        }
    }

    fn issue(&mut self, written: Lsn, out: &mut Vec<FsyncRequest>) {
        let id = self.next_batch_id;
        self.next_batch_id += 1;
        let mut targets: Vec<SyncTarget> = self.dirty_segments.iter().map(|&s| SyncTarget::Segment(s)).collect();
        if self.dir_dirty {
            targets.push(SyncTarget::Directory);
        }
        self.dirty_segments.clear();
        self.dir_dirty = false;
        self.unsynced_since_us = None;
        let target = written.max(self.issued_target);
        self.issued_target = target;
        if targets.is_empty() {
            // Nothing to sync (e.g. the written LSN moved over bytes of an already-synced file):
            // an empty batch completes at once, in order behind earlier batches.
            self.batches.push_back(Batch { id, target, fsyncs_pending: 0 });
            self.complete_front();
            return;
        }
        self.batches.push_back(Batch { id, target, fsyncs_pending: targets.len() });
        out.extend(targets.into_iter().map(|target| FsyncRequest { batch_id: id, target }));
    }

    /// Whether batch `batch_id` still waits for fsyncs.
    pub fn batch_pending(&self, batch_id: u64) -> bool {
        self.batches.iter().any(|b| b.id == batch_id)
    }

    /// One fsync of batch `batch_id` succeeded. Returns the new `flushed` if it advanced.
    pub fn on_fsync_done(&mut self, batch_id: u64) -> Option<Lsn> {
        let batch = self
            .batches
            .iter_mut()
            .find(|b| b.id == batch_id)
            .expect("fsync completion for an unknown batch");
        assert!(batch.fsyncs_pending > 0, "more fsync completions than fsyncs in batch {batch_id}");
        batch.fsyncs_pending -= 1;
        if self.poisoned {
            return None;
        }
        let before = self.flushed;
        self.complete_front();
        (self.flushed > before).then_some(self.flushed)
    }

    fn complete_front(&mut self) {
        while let Some(front) = self.batches.front() {
            if front.fsyncs_pending > 0 {
                break;
            }
            assert!(front.target >= self.flushed, "flushed would move backwards");
            self.flushed = front.target;
            self.batches.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> FlushPolicy {
        FlushPolicy { batch_bytes: 1000, interval_us: 500, batches_in_flight_max: 2 }
    }

    #[test]
    fn idle_flushes_at_once_and_flushed_waits_for_every_fsync() {
        let mut f = Flusher::new(policy(), Lsn(0));
        f.on_write_completed(1, 0);
        f.on_directory_changed(0);
        let mut out = Vec::new();
        f.poll(0, Lsn(10), false, false, &mut out);
        assert!(out.is_empty(), "small, young, busy: wait");
        f.poll(0, Lsn(10), true, false, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(f.on_fsync_done(out[0].batch_id), None);
        assert_eq!(f.on_fsync_done(out[1].batch_id), Some(Lsn(10)));
    }

    #[test]
    fn later_batch_cannot_overtake_an_earlier_one() {
        let mut f = Flusher::new(policy(), Lsn(0));
        let mut out = Vec::new();
        f.on_write_completed(1, 0);
        f.poll(0, Lsn(1000), false, false, &mut out);
        f.on_write_completed(2, 0);
        f.poll(0, Lsn(2000), false, false, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(f.on_fsync_done(out[1].batch_id), None, "batch 2 done, batch 1 not: flushed stays");
        assert_eq!(f.flushed(), Lsn(0));
        assert_eq!(f.on_fsync_done(out[0].batch_id), Some(Lsn(2000)));
    }

    #[test]
    fn in_flight_limit_holds_and_timer_fires() {
        let mut f = Flusher::new(policy(), Lsn(0));
        let mut out = Vec::new();
        for (i, w) in [1000u64, 2000, 3000].iter().enumerate() {
            f.on_write_completed(i as u64, 0);
            f.poll(0, Lsn(*w), false, false, &mut out);
        }
        assert_eq!(f.batches_in_flight(), 2);
        f.on_fsync_done(out[0].batch_id);
        out.clear();
        f.poll(10, Lsn(3100), false, false, &mut out);
        assert_eq!(out.len(), 1, "room again and 2100 bytes waiting");
        f.on_write_completed(9, 20);
        out.clear();
        f.poll(400, Lsn(3200), false, false, &mut out);
        assert!(out.is_empty());
        f.poll(600, Lsn(3200), false, false, &mut out);
        assert!(out.is_empty(), "two batches in flight");
    }
}
