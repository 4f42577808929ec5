//! The sender's state machine: which frames to send next, and what the receiver's acks mean.
//! No I/O here.
//!
//! Positions: `sent` (handed to the kernel), and from the receiver's acks `written` and
//! `flushed`. Invariants: `flushed <= written <= sent`, acks never move backwards within a
//! connection, `sent` never passes the horizon, and `sent - flushed` stays within the
//! in-flight budget.
//!
//! How a connection ends (shutdown drain, timeline switch, corrupt end, done, a silent peer) is
//! decided here too, by [`Sender::connection_end`], from the positions and what the source knows
//! ([`SourceFacts`]); the io layer carries the decision out.

use std::time::{Duration, Instant};

use crate::wal::Lsn;

#[derive(Debug, Clone, Copy)]
pub struct SenderLimits {
    /// Frames end at multiples of this in LSN space (and at segment ends and the horizon).
    pub frame_bytes: u64,
    /// Most bytes sent but not yet acknowledged durable.
    pub in_flight_bytes_max: u64,
    pub seg_size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AckError {
    #[error("receiver acknowledged flushed {flushed} past written {written}")]
    FlushedPastWritten { written: Lsn, flushed: Lsn },
    #[error("receiver acknowledged written {written}, but only {sent} was sent")]
    PastSent { written: Lsn, sent: Lsn },
    #[error("receiver's acknowledgement moved backwards: flushed {flushed} after {previous}")]
    Backwards { previous: Lsn, flushed: Lsn },
}

/// The timing rules of one connection's end.
#[derive(Debug, Clone, Copy)]
pub struct EndRules {
    /// Following a live server: a shutdown drains up to the horizon and ends the run cleanly.
    /// At rest (`--once`), a shutdown waits only for what was sent and ends interrupted.
    pub live: bool,
    /// Longest wait for the drain's acknowledgement after a shutdown.
    pub shutdown_timeout: Duration,
    /// Longest a receiver may acknowledge nothing while bytes are outstanding.
    pub peer_timeout: Duration,
}

impl EndRules {
    /// No timeouts (for simulations that drive only the data path).
    pub const PATIENT: EndRules = EndRules { live: false, shutdown_timeout: Duration::MAX, peer_timeout: Duration::MAX };
}

/// What the source knows that decides how a connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceFacts {
    /// Valid WAL ends here for now.
    pub horizon: Lsn,
    /// The horizon will not move again (a directory at rest walked to its end).
    pub is_final: bool,
    /// The server moved to a newer timeline; this timeline ends here.
    pub switch_point: Option<Lsn>,
    /// The source found damage; valid WAL ends here.
    pub corrupt_end: Option<Lsn>,
}

/// Why a connection ends, decided by [`Sender::connection_end`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnEndRule {
    /// Everything up to the final horizon (or, live, the drain's horizon) is durable.
    Done,
    /// A shutdown: `drained` when everything sent is durable, else the drain ran out of time.
    Interrupted { drained: bool },
    /// The receiver holds this timeline up to its switch point: go on on the next timeline.
    TimelineSwitch { switch: Lsn },
    /// The receiver holds every valid byte before the damage: report it.
    CorruptEnd { valid_end: Lsn },
    /// The receiver acknowledged nothing for `peer_timeout` with bytes outstanding.
    PeerSilent { unacked_bytes: u64 },
}

#[derive(Debug, Clone)]
pub struct Sender {
    limits: SenderLimits,
    sent: Lsn,
    written: Lsn,
    flushed: Lsn,
    rules: EndRules,
    /// When a shutdown began (None: not draining).
    draining_since: Option<Instant>,
    /// Last time the receiver made progress, or nothing was outstanding.
    progress_at: Instant,
}

/// One data frame: `len` bytes starting at `lsn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramePlan {
    pub lsn: Lsn,
    pub len: u64,
}

impl Sender {
    /// A machine that never times out (see [`Sender::with_end_rules`]).
    pub fn new(limits: SenderLimits, resume: Lsn) -> Sender {
        Sender::with_end_rules(limits, resume, EndRules::PATIENT, Instant::now())
    }

    /// A connection starting at `resume` at `now`.
    pub fn with_end_rules(limits: SenderLimits, resume: Lsn, rules: EndRules, now: Instant) -> Sender {
        assert!(limits.frame_bytes > 0 && limits.seg_size % limits.frame_bytes == 0);
        assert!(limits.in_flight_bytes_max >= limits.frame_bytes);
        Sender { limits, sent: resume, written: resume, flushed: resume, rules, draining_since: None, progress_at: now }
    }

    pub fn sent(&self) -> Lsn {
        self.sent
    }
    pub fn written(&self) -> Lsn {
        self.written
    }
    pub fn flushed(&self) -> Lsn {
        self.flushed
    }

    /// Bytes sent and not yet acknowledged durable.
    pub fn unacked_bytes(&self) -> u64 {
        self.sent - self.flushed
    }

    /// Plans frames up to `horizon`, within the in-flight budget, totalling at most
    /// `batch_bytes_max`; advances `sent` over them.
    pub fn plan(&mut self, horizon: Lsn, batch_bytes_max: u64, frames_max: usize, out: &mut Vec<FramePlan>) {
        let budget_end = self.flushed + self.limits.in_flight_bytes_max;
        let mut batch_bytes = 0u64;
        let mut frames = 0usize;
        while self.sent < horizon && self.sent < budget_end && batch_bytes < batch_bytes_max && frames < frames_max {
            let next_boundary = Lsn((self.sent.0 / self.limits.frame_bytes + 1) * self.limits.frame_bytes);
            let end = next_boundary.min(horizon).min(budget_end.max(self.sent + 1));
            let len = end - self.sent;
            debug_assert!(len > 0 && len <= self.limits.frame_bytes);
            debug_assert_eq!((end.0 - 1) / self.limits.seg_size, self.sent.0 / self.limits.seg_size, "frame crosses a segment");
            out.push(FramePlan { lsn: self.sent, len });
            self.sent = end;
            batch_bytes += len;
            frames += 1;
        }
        assert!(self.sent <= horizon, "sent {} past the horizon {horizon}", self.sent);
    }

    /// An ack arrived. Returns whether `flushed` advanced.
    pub fn on_ack(&mut self, written: Lsn, flushed: Lsn) -> Result<bool, AckError> {
        if flushed > written {
            return Err(AckError::FlushedPastWritten { written, flushed });
        }
        if written > self.sent {
            return Err(AckError::PastSent { written, sent: self.sent });
        }
        if flushed < self.flushed {
            return Err(AckError::Backwards { previous: self.flushed, flushed });
        }
        let advanced = flushed > self.flushed;
        self.written = self.written.max(written);
        self.flushed = flushed;
        debug_assert!(self.flushed <= self.written && self.written <= self.sent);
        Ok(advanced)
    }

    /// [`Sender::on_ack`] at `now`: progress restarts the peer's silence clock.
    pub fn on_ack_at(&mut self, written: Lsn, flushed: Lsn, now: Instant) -> Result<bool, AckError> {
        let advanced = self.on_ack(written, flushed)?;
        if advanced {
            self.progress_at = now;
        }
        Ok(advanced)
    }

    /// A shutdown was asked for. Returns true the first time (the drain starts now).
    pub fn begin_drain(&mut self, now: Instant) -> bool {
        let first = self.draining_since.is_none();
        self.draining_since.get_or_insert(now);
        first
    }

    pub fn is_draining(&self) -> bool {
        self.draining_since.is_some()
    }

    /// How the connection ends now, if it does. The rules, in order:
    /// 1. Draining: live, once everything up to the horizon is durable the run is done
    ///    (walsender's rule: a shutdown ships up to the flush position it saw); at rest, once
    ///    everything sent is durable the run is interrupted; past `shutdown_timeout`, interrupted.
    /// 2. A timeline switch, once the receiver holds this timeline up to the switch point.
    /// 3. A corrupt end, once the receiver holds every valid byte before it.
    /// 4. Done, once the horizon is final and durable.
    /// 5. A silent peer: bytes outstanding and no progress for `peer_timeout`.
    pub fn connection_end(&mut self, facts: &SourceFacts, now: Instant) -> Option<ConnEndRule> {
        if let Some(since) = self.draining_since {
            let target = if self.rules.live { facts.horizon } else { self.sent };
            if self.flushed >= target {
                return Some(if self.rules.live { ConnEndRule::Done } else { ConnEndRule::Interrupted { drained: true } });
            }
            if now.saturating_duration_since(since) > self.rules.shutdown_timeout {
                return Some(ConnEndRule::Interrupted { drained: false });
            }
        }
        if let Some(switch) = facts.switch_point.filter(|&s| self.flushed >= s) {
            return Some(ConnEndRule::TimelineSwitch { switch });
        }
        if let Some(valid_end) = facts.corrupt_end.filter(|&e| self.flushed >= e) {
            return Some(ConnEndRule::CorruptEnd { valid_end });
        }
        if facts.is_final && self.flushed >= facts.horizon {
            return Some(ConnEndRule::Done);
        }
        if self.unacked_bytes() == 0 {
            self.progress_at = now;
        } else if now.saturating_duration_since(self.progress_at) > self.rules.peer_timeout {
            return Some(ConnEndRule::PeerSilent { unacked_bytes: self.unacked_bytes() });
        }
        None
    }
}

#[cfg(test)]
mod sim;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> SenderLimits {
        SenderLimits { frame_bytes: 1 << 20, in_flight_bytes_max: 8 << 20, seg_size: 16 << 20 }
    }

    #[test]
    fn frames_align_to_frame_bytes_and_stop_at_horizon() {
        let mut s = Sender::new(limits(), Lsn(16 << 20) + 100);
        let mut out = Vec::new();
        s.plan(Lsn((16 << 20) + (3 << 20) + 5), u64::MAX, usize::MAX, &mut out);
        assert_eq!(out[0], FramePlan { lsn: Lsn((16 << 20) + 100), len: (1 << 20) - 100 });
        assert_eq!(out.last().unwrap().len, 5);
        assert_eq!(s.sent(), Lsn((16 << 20) + (3 << 20) + 5));
    }

    #[test]
    fn budget_limits_unacked_bytes() {
        let mut s = Sender::new(limits(), Lsn(0));
        let mut out = Vec::new();
        s.plan(Lsn(1 << 30), u64::MAX, usize::MAX, &mut out);
        assert_eq!(s.unacked_bytes(), 8 << 20);
        assert!(s.on_ack(Lsn(4 << 20), Lsn(2 << 20)).unwrap());
        out.clear();
        s.plan(Lsn(1 << 30), u64::MAX, usize::MAX, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn bad_acks_are_refused() {
        let mut s = Sender::new(limits(), Lsn(0));
        let mut out = Vec::new();
        s.plan(Lsn(3 << 20), u64::MAX, usize::MAX, &mut out);
        assert!(matches!(s.on_ack(Lsn(1), Lsn(2)), Err(AckError::FlushedPastWritten { .. })));
        assert!(matches!(s.on_ack(Lsn(4 << 20), Lsn(0)), Err(AckError::PastSent { .. })));
        s.on_ack(Lsn(2 << 20), Lsn(2 << 20)).unwrap();
        assert!(matches!(s.on_ack(Lsn(2 << 20), Lsn(1 << 20)), Err(AckError::Backwards { .. })));
    }

    fn facts(horizon: u64) -> SourceFacts {
        SourceFacts { horizon: Lsn(horizon), is_final: false, switch_point: None, corrupt_end: None }
    }

    fn rules(live: bool) -> EndRules {
        EndRules { live, shutdown_timeout: Duration::from_secs(30), peer_timeout: Duration::from_secs(60) }
    }

    /// A sender that sent [0, sent) and holds acks up to `flushed`.
    fn at(live: bool, sent: u64, flushed: u64, now: Instant) -> Sender {
        let mut s = Sender::with_end_rules(limits(), Lsn(0), rules(live), now);
        let mut out = Vec::new();
        s.plan(Lsn(sent), u64::MAX, usize::MAX, &mut out);
        s.on_ack_at(Lsn(flushed), Lsn(flushed), now).unwrap();
        s
    }

    #[test]
    fn a_live_drain_ends_done_only_when_the_horizon_is_durable() {
        let t = Instant::now();
        let mut s = at(true, 4 << 20, 3 << 20, t);
        assert!(s.begin_drain(t) && !s.begin_drain(t), "the drain starts once");
        assert_eq!(s.connection_end(&facts(6 << 20), t), None);
        s.on_ack(Lsn(4 << 20), Lsn(4 << 20)).unwrap();
        assert_eq!(s.connection_end(&facts(6 << 20), t), None, "all sent is durable, but not the whole horizon");
        let mut out = Vec::new();
        s.plan(Lsn(6 << 20), u64::MAX, usize::MAX, &mut out);
        s.on_ack(Lsn(6 << 20), Lsn(6 << 20)).unwrap();
        assert_eq!(s.connection_end(&facts(6 << 20), t), Some(ConnEndRule::Done));
    }

    #[test]
    fn a_drain_at_rest_waits_for_what_was_sent_then_ends_interrupted() {
        let t = Instant::now();
        let mut s = at(false, 4 << 20, 3 << 20, t);
        s.begin_drain(t);
        assert_eq!(s.connection_end(&facts(8 << 20), t), None);
        s.on_ack(Lsn(4 << 20), Lsn(4 << 20)).unwrap();
        assert_eq!(s.connection_end(&facts(8 << 20), t), Some(ConnEndRule::Interrupted { drained: true }));
    }

    #[test]
    fn a_drain_gives_up_after_the_shutdown_timeout() {
        let t = Instant::now();
        let mut s = at(true, 4 << 20, 3 << 20, t);
        s.begin_drain(t);
        assert_eq!(s.connection_end(&facts(4 << 20), t + Duration::from_secs(30)), None);
        assert_eq!(s.connection_end(&facts(4 << 20), t + Duration::from_secs(31)), Some(ConnEndRule::Interrupted { drained: false }));
    }

    #[test]
    fn a_switch_and_a_corrupt_end_wait_for_the_receiver_to_hold_everything_before_them() {
        let t = Instant::now();
        let mut s = at(true, 4 << 20, 3 << 20, t);
        let switch = SourceFacts { switch_point: Some(Lsn(4 << 20)), ..facts(4 << 20) };
        let corrupt = SourceFacts { corrupt_end: Some(Lsn(4 << 20)), ..facts(4 << 20) };
        assert_eq!(s.connection_end(&switch, t), None);
        assert_eq!(s.connection_end(&corrupt, t), None);
        s.on_ack(Lsn(4 << 20), Lsn(4 << 20)).unwrap();
        assert_eq!(s.connection_end(&switch, t), Some(ConnEndRule::TimelineSwitch { switch: Lsn(4 << 20) }));
        assert_eq!(s.connection_end(&corrupt, t), Some(ConnEndRule::CorruptEnd { valid_end: Lsn(4 << 20) }));
    }

    #[test]
    fn done_needs_a_final_horizon() {
        let t = Instant::now();
        let mut s = at(false, 4 << 20, 4 << 20, t);
        assert_eq!(s.connection_end(&facts(4 << 20), t), None, "a horizon that may move is not the end");
        let last = SourceFacts { is_final: true, ..facts(4 << 20) };
        assert_eq!(s.connection_end(&last, t), Some(ConnEndRule::Done));
        let more = SourceFacts { is_final: true, ..facts(5 << 20) };
        assert_eq!(s.connection_end(&more, t), None, "bytes left to ship");
    }

    #[test]
    fn a_peer_is_silent_only_with_bytes_outstanding_and_no_progress() {
        let t = Instant::now();
        let mut s = at(true, 4 << 20, 4 << 20, t);
        let later = t + Duration::from_secs(120);
        assert_eq!(s.connection_end(&facts(4 << 20), later), None, "nothing outstanding: an idle peer is fine");
        let mut out = Vec::new();
        s.plan(Lsn(5 << 20), u64::MAX, usize::MAX, &mut out);
        assert_eq!(s.connection_end(&facts(5 << 20), later + Duration::from_secs(60)), None);
        s.on_ack_at(Lsn(5 << 20), Lsn(4 << 20) + 1, later + Duration::from_secs(59)).unwrap();
        assert_eq!(s.connection_end(&facts(5 << 20), later + Duration::from_secs(119)), None, "progress restarts the clock");
        assert_eq!(
            s.connection_end(&facts(5 << 20), later + Duration::from_secs(120)),
            Some(ConnEndRule::PeerSilent { unacked_bytes: (1 << 20) - 1 })
        );
    }

    proptest! {
        /// Frames are contiguous, never cross a frame boundary or the horizon, and cover exactly
        /// the range, however the horizon advances and acks arrive.
        #[test]
        fn frames_tile_the_range(start in 0u64..(64 << 20), steps in proptest::collection::vec((1u64..(5 << 20), any::<bool>()), 1..40)) {
            let mut s = Sender::new(limits(), Lsn(start));
            let mut horizon = Lsn(start);
            let mut next = Lsn(start);
            for (grow, ack) in steps {
                horizon = horizon + grow;
                let mut out = Vec::new();
                s.plan(horizon, 3 << 20, 64, &mut out);
                for f in out {
                    prop_assert_eq!(f.lsn, next);
                    prop_assert!(f.len > 0);
                    prop_assert_eq!((f.lsn.0) / (1 << 20), (f.lsn.0 + f.len - 1) / (1 << 20));
                    next = f.lsn + f.len;
                }
                prop_assert!(s.sent() <= horizon);
                prop_assert!(s.unacked_bytes() <= 8 << 20);
                if ack {
                    let sent = s.sent();
                    s.on_ack(sent, sent).unwrap();
                }
            }
        }
    }
}
