//! The fan-out's durable position over several destinations (issue #12's rules, no I/O): the
//! quorum position (the K-th highest acknowledged `flushed`), the floor the replication slot may
//! advance to (the lowest `flushed`, except destinations too far behind), and how `--once` ends.
//!
//! Each destination's own positions live in its own [`super::sender::Sender`]; this machine only
//! combines what they acknowledged. A destination's `flushed` is its durable position as last
//! acknowledged (or as its Welcome said on a reconnect, which may be lower when its storage lost
//! acknowledged WAL); the quorum position itself never moves backwards.

use crate::wal::Lsn;

/// A [`Quorum`] that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuorumError {
    #[error("--quorum {k} must be between 1 and the number of destinations ({n})")]
    K { k: usize, n: usize },
}

/// How a `--once` ship ended over the destinations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnceOutcome {
    /// Every destination holds the end of valid WAL.
    All,
    /// At least K do; these (index, flushed) do not.
    QuorumOnly { lagging: Vec<(usize, Lsn)> },
    /// Fewer than K do.
    Short { holding: usize },
}

#[derive(Debug, Clone)]
pub struct Quorum {
    k: usize,
    /// Each destination's last known durable position (None: never heard from).
    flushed: Vec<Option<Lsn>>,
    /// A destination further than this behind the quorum position stops holding the slot back.
    max_lag_bytes: u64,
    /// Highest quorum position reported so far.
    position: Lsn,
    /// Where the slot stood when shipping started: a destination not heard from yet counts as
    /// holding this much for the slot (WAL below it was never protected for it anyway).
    slot_start: Lsn,
}

impl Quorum {
    pub fn new(destinations: usize, k: usize, max_lag_bytes: u64, slot_start: Lsn) -> Result<Quorum, QuorumError> {
        if k == 0 || k > destinations {
            return Err(QuorumError::K { k, n: destinations });
        }
        Ok(Quorum { k, flushed: vec![None; destinations], max_lag_bytes, position: Lsn(0), slot_start })
    }

    pub fn destinations(&self) -> usize {
        self.flushed.len()
    }

    /// Destination `dest` holds everything below `flushed` durably (an ack, or its Welcome).
    /// Returns whether the quorum position advanced.
    pub fn on_flushed(&mut self, dest: usize, flushed: Lsn) -> bool {
        self.flushed[dest] = Some(flushed);
        let kth = self.kth_highest();
        let advanced = kth > self.position;
        self.position = self.position.max(kth);
        advanced
    }

    pub fn flushed(&self, dest: usize) -> Option<Lsn> {
        self.flushed[dest]
    }

    /// Every byte below it is durable on at least K destinations (as far as they told us); never
    /// moves backwards.
    pub fn position(&self) -> Lsn {
        self.position
    }

    /// The K-th highest `flushed` now (a destination never heard from counts as 0).
    fn kth_highest(&self) -> Lsn {
        let mut all: Vec<Lsn> = self.flushed.iter().map(|f| f.unwrap_or(Lsn(0))).collect();
        all.sort_unstable_by(|a, b| b.cmp(a));
        all[self.k - 1]
    }

    /// What `dest` holds as far as the slot is concerned.
    fn slot_view(&self, dest: usize) -> Lsn {
        self.flushed[dest].unwrap_or(self.slot_start)
    }

    /// Whether `dest` is so far behind the quorum that it no longer holds the slot back.
    pub fn is_dropped(&self, dest: usize) -> bool {
        self.position - self.slot_view(dest).min(self.position) > self.max_lag_bytes
    }

    /// Where the replication slot may advance to: the lowest position of the destinations still
    /// holding it back (a destination that is down loses nothing), bounded by `max_lag_bytes`
    /// behind the quorum; never below where the slot started.
    pub fn slot_floor(&self) -> Lsn {
        let held = (0..self.flushed.len()).filter(|&d| !self.is_dropped(d)).map(|d| self.slot_view(d)).min();
        held.unwrap_or(self.position).max(self.slot_start)
    }

    /// How `--once` ends when valid WAL ends at `end`.
    pub fn once_outcome(&self, end: Lsn) -> OnceOutcome {
        let lagging: Vec<(usize, Lsn)> = self
            .flushed
            .iter()
            .enumerate()
            .filter_map(|(i, f)| {
                let f = f.unwrap_or(Lsn(0));
                (f < end).then_some((i, f))
            })
            .collect();
        let holding = self.flushed.len() - lagging.len();
        if lagging.is_empty() {
            OnceOutcome::All
        } else if holding >= self.k {
            OnceOutcome::QuorumOnly { lagging }
        } else {
            OnceOutcome::Short { holding }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_position_is_the_kth_highest_and_never_moves_back() {
        let mut q = Quorum::new(3, 2, u64::MAX, Lsn(0)).unwrap();
        assert!(!q.on_flushed(0, Lsn(100)));
        assert_eq!(q.position(), Lsn(0), "one of two is not a quorum");
        assert!(q.on_flushed(1, Lsn(50)));
        assert_eq!(q.position(), Lsn(50));
        assert!(q.on_flushed(2, Lsn(80)));
        assert_eq!(q.position(), Lsn(80));
        // Destination 0 lost its storage and came back lower: 80 was durable on two when it
        // was reported, and a report is never taken back.
        q.on_flushed(0, Lsn(10));
        assert_eq!(q.position(), Lsn(80), "the reported quorum position never moves backwards");
    }

    #[test]
    fn k_must_fit_the_destinations() {
        assert_eq!(Quorum::new(3, 0, 0, Lsn(0)).unwrap_err(), QuorumError::K { k: 0, n: 3 });
        assert_eq!(Quorum::new(3, 4, 0, Lsn(0)).unwrap_err(), QuorumError::K { k: 4, n: 3 });
    }

    #[test]
    fn the_slot_waits_for_a_down_destination_within_the_lag_bound() {
        let mut q = Quorum::new(3, 2, 1000, Lsn(4000)).unwrap();
        assert_eq!(q.slot_floor(), Lsn(4000), "nobody has said where it stands: the slot stays");
        q.on_flushed(0, Lsn(4800));
        q.on_flushed(1, Lsn(4800));
        assert_eq!(q.slot_floor(), Lsn(4000), "destination 2 never answered and is within the bound");
        q.on_flushed(2, Lsn(4500));
        assert_eq!(q.slot_floor(), Lsn(4500));
        q.on_flushed(0, Lsn(9000));
        q.on_flushed(1, Lsn(9000));
        assert!(q.is_dropped(2));
        assert_eq!(q.slot_floor(), Lsn(9000), "too far behind: no longer holds the slot");
    }

    #[test]
    fn once_ends_all_quorum_only_or_short() {
        let mut q = Quorum::new(3, 2, u64::MAX, Lsn(0)).unwrap();
        q.on_flushed(0, Lsn(100));
        q.on_flushed(1, Lsn(100));
        q.on_flushed(2, Lsn(60));
        assert_eq!(q.once_outcome(Lsn(100)), OnceOutcome::QuorumOnly { lagging: vec![(2, Lsn(60))] });
        assert_eq!(q.once_outcome(Lsn(120)), OnceOutcome::Short { holding: 0 });
        q.on_flushed(2, Lsn(100));
        assert_eq!(q.once_outcome(Lsn(100)), OnceOutcome::All);
    }

    proptest! {
        /// Whatever the destinations acknowledge, in whatever order, the reported position is
        /// at most what K of them held at some moment, never moves backwards, and the slot floor
        /// is never above a destination that still holds it back.
        #[test]
        fn quorum_invariants(n in 1usize..6, k_seed in 0usize..6, lag in 0u64..5000, start in 0u64..3000,
                             acks in proptest::collection::vec((0usize..6, 0u64..10_000), 1..200)) {
            let k = k_seed % n + 1;
            let mut q = Quorum::new(n, k, lag, Lsn(start)).unwrap();
            let mut last = Lsn(0);
            for (dest, lsn) in acks {
                let dest = dest % n;
                let before = q.position();
                let advanced = q.on_flushed(dest, Lsn(lsn));
                prop_assert!(q.position() >= last);
                prop_assert_eq!(advanced, q.position() > before);
                if advanced {
                    // At this moment, K destinations hold at least the new position.
                    let holding = (0..n).filter(|&d| q.flushed(d).is_some_and(|f| f >= q.position())).count();
                    prop_assert!(holding >= k);
                }
                last = q.position();
                // The slot never passes a destination that still holds it back (one not heard
                // from holds the slot where it started).
                let floor = q.slot_floor();
                prop_assert!(floor >= Lsn(start));
                for d in 0..n {
                    if !q.is_dropped(d) {
                        prop_assert!(floor <= q.flushed(d).unwrap_or(Lsn(start)).max(Lsn(start)), "floor {} above destination {}", floor, d);
                    }
                }
            }
        }
    }
}
