//! Seeded simulation of the sender's connection-end rules: a source whose horizon grows (or is a
//! directory at rest), that may reach a timeline switch or damage, a receiver that acknowledges
//! late, in pieces, or goes silent, and a shutdown at a random moment. Every step checks that the
//! connection ends exactly when a rule says so, never earlier and never later.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const SEG: u64 = 16 << 20;
const FRAME: u64 = 1 << 20;

/// What the simulated source does in one run.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Valid WAL up to `end` and nothing more (a directory at rest when not live).
    Plain,
    /// The timeline ends at a switch point; the horizon stops there.
    Switch(Lsn),
    /// Damage; valid WAL ends there.
    Corrupt(Lsn),
}

struct World {
    rng: StdRng,
    seed: u64,
    base: Instant,
    now_ms: u64,
    rules: EndRules,
    start: Lsn,
    end: Lsn,
    ending: Ending,
    horizon: Lsn,
    /// The receiver's durable position and what it has told the sender so far.
    durable: Lsn,
    acked: Lsn,
    /// Acks on the wire: (arrives at ms, flushed).
    acks: Vec<(u64, Lsn)>,
    /// The receiver is silent until then.
    silent_until_ms: u64,
    /// When the sender last saw progress or had nothing outstanding (the sim's own clock).
    progress_ms: u64,
    drain_ms: Option<u64>,
    shutdown_at_ms: Option<u64>,
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = StdRng::seed_from_u64(seed);
        let live = rng.random_bool(0.5);
        let rules = EndRules {
            live,
            shutdown_timeout: Duration::from_millis(rng.random_range(500..5_000)),
            peer_timeout: Duration::from_millis(rng.random_range(500..5_000)),
        };
        let start = Lsn(SEG + rng.random_range(0..SEG));
        let end = start + rng.random_range(1..6 * SEG);
        let cut = start + rng.random_range(0..=(end - start));
        let ending = match rng.random_range(0..3) {
            0 => Ending::Plain,
            1 => Ending::Switch(cut),
            _ => Ending::Corrupt(cut),
        };
        // A live server is followed until a shutdown; a directory at rest is sometimes interrupted.
        let shutdown_at_ms = (live || rng.random_bool(0.3)).then(|| rng.random_range(0..20_000));
        World {
            rng,
            seed,
            base: Instant::now(),
            now_ms: 0,
            rules,
            start,
            end,
            ending,
            horizon: start,
            durable: start,
            acked: start,
            acks: Vec::new(),
            silent_until_ms: 0,
            progress_ms: 0,
            drain_ms: None,
            shutdown_at_ms,
        }
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.now_ms)
    }

    /// Where valid WAL stops on this timeline.
    fn valid_end(&self) -> Lsn {
        match self.ending {
            Ending::Plain => self.end,
            Ending::Switch(at) | Ending::Corrupt(at) => at,
        }
    }

    fn facts(&self) -> SourceFacts {
        let reached = self.horizon >= self.valid_end();
        SourceFacts {
            horizon: self.horizon,
            is_final: !self.rules.live && matches!(self.ending, Ending::Plain) && reached,
            switch_point: match self.ending {
                Ending::Switch(at) if reached => Some(at),
                _ => None,
            },
            corrupt_end: match self.ending {
                Ending::Corrupt(at) if reached => Some(at),
                _ => None,
            },
        }
    }

    /// The end the rules call for now, worked out from the sim's own bookkeeping.
    fn due(&self, s: &Sender) -> Option<ConnEndRule> {
        let f = self.facts();
        if let Some(since) = self.drain_ms {
            let target = if self.rules.live { f.horizon } else { s.sent() };
            if self.acked >= target {
                return Some(if self.rules.live { ConnEndRule::Done } else { ConnEndRule::Interrupted { drained: true } });
            }
            if self.now_ms - since > self.rules.shutdown_timeout.as_millis() as u64 {
                return Some(ConnEndRule::Interrupted { drained: false });
            }
        }
        if let Some(switch) = f.switch_point.filter(|&p| self.acked >= p) {
            return Some(ConnEndRule::TimelineSwitch { switch });
        }
        if let Some(valid_end) = f.corrupt_end.filter(|&e| self.acked >= e) {
            return Some(ConnEndRule::CorruptEnd { valid_end });
        }
        if f.is_final && self.acked >= f.horizon {
            return Some(ConnEndRule::Done);
        }
        let outstanding = s.sent() - self.acked;
        if outstanding > 0 && self.now_ms - self.progress_ms > self.rules.peer_timeout.as_millis() as u64 {
            return Some(ConnEndRule::PeerSilent { unacked_bytes: outstanding });
        }
        None
    }

    /// One tick of the world: time passes, the horizon grows, the receiver syncs and acks.
    fn tick(&mut self, s: &mut Sender) {
        self.now_ms += self.rng.random_range(0..300);
        if self.shutdown_at_ms.is_some_and(|at| self.now_ms >= at) && s.begin_drain(self.now()) {
            self.drain_ms = Some(self.now_ms);
        }
        // A live server's flush moves while not draining; a directory is walked a segment ahead.
        // Now and then the server flushes much more than the in-flight budget at once.
        if self.drain_ms.is_none() && self.rng.random_bool(0.5) {
            let grow = if self.rng.random_range(0..10) == 0 { self.rng.random_range(1..2 * SEG) } else { self.rng.random_range(1..2 * FRAME) };
            self.horizon = (self.horizon + grow).min(self.valid_end());
        }
        if self.rng.random_range(0..200) == 0 {
            self.silent_until_ms = self.now_ms + self.rng.random_range(0..8_000);
        }
        if self.now_ms >= self.silent_until_ms && s.sent() > self.durable && self.rng.random_bool(0.4) {
            // A group commit often covers everything received, sometimes only part of it.
            self.durable = if self.rng.random_bool(0.5) { s.sent() } else { self.durable + self.rng.random_range(1..=(s.sent() - self.durable)) };
            // One TCP stream: acks arrive in the order they were sent.
            let arrives = (self.now_ms + self.rng.random_range(0..500)).max(self.acks.last().map_or(0, |a| a.0));
            self.acks.push((arrives, self.durable));
        }
        let now_ms = self.now_ms;
        let arrived: Vec<Lsn> = self.acks.iter().filter(|a| a.0 <= now_ms).map(|a| a.1).collect();
        self.acks.retain(|a| a.0 > now_ms);
        for flushed in arrived {
            let before = s.flushed();
            let advanced = s.on_ack_at(flushed, flushed, self.now()).unwrap_or_else(|e| panic!("seed {}: {e}", self.seed));
            assert_eq!(advanced, flushed > before);
            assert!(s.flushed() >= before, "seed {}: flushed moved backwards", self.seed);
            if advanced {
                self.acked = flushed;
                self.progress_ms = self.now_ms;
            }
        }
    }
}

/// Runs one seeded connection to its end; returns the end and the world it ended in.
fn run(seed: u64) -> (ConnEndRule, World, Sender) {
    let mut w = World::new(seed);
    let limits = SenderLimits { frame_bytes: FRAME, in_flight_bytes_max: FRAME * w.rng.random_range(1..=8u64), seg_size: SEG };
    let mut s = Sender::with_end_rules(limits, w.start, w.rules, w.now());
    let mut plans = Vec::new();
    for _ in 0..200_000 {
        w.tick(&mut s);
        let due = w.due(&s);
        let got = s.connection_end(&w.facts(), w.now());
        assert_eq!(got, due, "seed {}: the connection ended {got:?} where the rules say {due:?}", w.seed);
        if s.sent() == w.acked {
            w.progress_ms = w.now_ms;
        }
        if let Some(end) = got {
            return (end, w, s);
        }
        plans.clear();
        s.plan(w.horizon, 4 * FRAME, 8, &mut plans);
        assert!(s.sent() <= w.horizon && s.sent() <= w.valid_end(), "seed {}: sent past valid WAL", w.seed);
    }
    panic!("seed {seed}: the connection never ended");
}

#[test]
fn connection_ends_exactly_when_a_rule_says_so() {
    let mut seen = std::collections::BTreeMap::<&str, u32>::new();
    for seed in 0..3_000 {
        let (end, w, s) = run(seed);
        assert!(s.flushed() <= s.sent() && s.sent() <= w.horizon);
        let kind = match end {
            ConnEndRule::Done => {
                // Done means: every valid byte durable (at rest), or the drain's horizon (live).
                assert!(s.flushed() >= w.horizon, "seed {seed}");
                assert!(w.rules.live || w.horizon == w.end, "seed {seed}");
                "done"
            }
            ConnEndRule::Interrupted { drained: true } => "drained",
            ConnEndRule::Interrupted { drained: false } => "drain timed out",
            ConnEndRule::TimelineSwitch { switch } => {
                assert!(matches!(w.ending, Ending::Switch(at) if at == switch) && s.sent() <= switch, "seed {seed}");
                "switch"
            }
            ConnEndRule::CorruptEnd { valid_end } => {
                assert!(matches!(w.ending, Ending::Corrupt(at) if at == valid_end) && s.sent() <= valid_end, "seed {seed}");
                "corrupt"
            }
            ConnEndRule::PeerSilent { .. } => "silent peer",
        };
        *seen.entry(kind).or_default() += 1;
    }
    // Every rule was exercised, many times.
    for kind in ["done", "drained", "drain timed out", "switch", "corrupt", "silent peer"] {
        assert!(seen.get(kind).copied().unwrap_or(0) >= 20, "rule {kind:?} barely exercised: {seen:?}");
    }
}
