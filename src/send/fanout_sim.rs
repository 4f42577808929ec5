//! Seeded simulation of the fan-out (issue #12): several destinations, each a pure [`Sender`]
//! machine talking to a simulated receiver with random delays, crashes (non-durable bytes lost,
//! connection gone, reconnect from its durable position) and stops; the [`Quorum`] and the run's
//! [`fleet::verdict`] combine them as the io loop does. Every step checks: the reported quorum
//! position never moves backwards and is durable on at least K receivers; the slot floor is never
//! above a receiver that still holds it back; and once the faults stop, `--once` ends with every
//! receiver holding the end.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::fleet::{self, Finish, Phase, Verdict};
use super::quorum::Quorum;
use super::sender::{FramePlan, Sender, SenderLimits};
use crate::wal::Lsn;

const SEG: u64 = 16 << 20;
const FRAME: u64 = 1 << 20;

/// One simulated receiver and the sender's connection to it.
struct Dest {
    /// None: disconnected (crashed, or stopped past the peer timeout).
    conn: Option<Sender>,
    /// Bytes received in order and not yet durable, and the durable position (survives crashes).
    written: Lsn,
    durable: Lsn,
    /// Frames in flight to it: their end LSNs.
    wire: Vec<Lsn>,
    /// Does nothing until this step (SIGSTOP, or restarting after a crash).
    paused_until: u64,
}

fn limits() -> SenderLimits {
    SenderLimits { frame_bytes: FRAME, in_flight_bytes_max: 8 * FRAME, seg_size: SEG }
}

fn run(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = rng.random_range(1..=5usize);
    let k = rng.random_range(1..=n);
    let start = Lsn(SEG);
    let end = start + rng.random_range(1..8 * SEG);
    let max_lag = rng.random_range(FRAME..6 * SEG);
    let mut q = Quorum::new(n, k, max_lag, start).unwrap();
    let mut dests: Vec<Dest> = (0..n).map(|_| Dest { conn: None, written: start, durable: start, wire: Vec::new(), paused_until: 0 }).collect();
    let faults_until = rng.random_range(0..400u64);
    let mut reported = Lsn(0);
    let mut plans: Vec<FramePlan> = Vec::new();
    for step in 0..20_000u64 {
        let faulty = step < faults_until;
        for (d, dest) in dests.iter_mut().enumerate() {
            if dest.paused_until > step {
                continue;
            }
            let Some(conn) = dest.conn.as_mut() else {
                // Reconnect: the handshake says where the receiver stands durably.
                let mut s = Sender::new(limits(), dest.durable);
                s.plan(dest.durable, u64::MAX, 0, &mut plans);
                dest.conn = Some(s);
                dest.written = dest.durable;
                dest.wire.clear();
                q.on_flushed(d, dest.durable);
                continue;
            };
            plans.clear();
            conn.plan(end, 4 * FRAME, 4, &mut plans);
            dest.wire.extend(plans.iter().map(|p| p.lsn + p.len));
            // The receiver takes some frames, makes some durable, acknowledges.
            let take = rng.random_range(0..=dest.wire.len());
            if let Some(&last) = dest.wire[..take].last() {
                dest.written = last;
            }
            dest.wire.drain(..take);
            if rng.random_bool(0.5) {
                dest.durable = dest.written;
            }
            if rng.random_bool(0.7) && conn.on_ack(dest.written, dest.durable).expect("valid ack") {
                q.on_flushed(d, conn.flushed());
            }
            if faulty && rng.random_bool(0.02) {
                // kill -9: what was not durable is gone, so is the connection.
                dest.conn = None;
                dest.paused_until = step + rng.random_range(1..50);
            } else if faulty && rng.random_bool(0.01) {
                dest.paused_until = step + rng.random_range(1..200); // SIGSTOP
            }
        }
        check(&q, &dests, k, start, &mut reported);
        let phases: Vec<Phase> = dests.iter().map(|d| if d.conn.as_ref().is_some_and(|c| c.flushed() >= end) { Phase::Done } else { Phase::Streaming }).collect();
        if let Verdict::Finish(f) = fleet::verdict(&phases, k, false) {
            assert_eq!(f, Finish::All, "seed {seed}");
            assert!(dests.iter().all(|d| d.durable == end), "seed {seed}: done before every receiver holds the end");
            assert_eq!(q.position(), end, "seed {seed}");
            return;
        }
    }
    panic!("seed {seed}: n {n} k {k}: the ship never ended (faults stopped at step {faults_until})");
}

/// The invariants of one step.
fn check(q: &Quorum, dests: &[Dest], k: usize, start: Lsn, reported: &mut Lsn) {
    assert!(q.position() >= *reported, "the quorum position moved backwards");
    *reported = q.position();
    let holding = dests.iter().filter(|d| d.durable >= q.position()).count();
    assert!(holding >= k, "reported {} durable, only {holding} receivers hold it", q.position());
    let floor = q.slot_floor();
    for (d, dest) in dests.iter().enumerate() {
        if !q.is_dropped(d) {
            assert!(floor <= dest.durable.max(start), "slot floor {floor} above receiver {d}'s durable {}", dest.durable);
        }
    }
}

#[test]
fn fanout_survives_delays_crashes_and_stops() {
    for seed in 0..2_000 {
        run(seed);
    }
}
