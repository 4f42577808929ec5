//! Tests of the receiver state machine, driven by the sender state machine (whose connection-end
//! rules also decide when a run ends): a seeded simulation with a fake disk that completes writes
//! and fsyncs in random order, checking on every step that nothing is acknowledged before the fake
//! disk made it durable, that acks never move backwards, and that the bytes match up to wherever
//! the sender ended (the stream's end, a drain, a timeline switch or damage).

use super::*;
use crate::recv::flusher::{FlushPolicy, SyncTarget};
use crate::send::sender::{ConnEndRule, EndRules, Sender, SenderLimits, SourceFacts};
use std::time::Instant;
use std::collections::BTreeMap;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SEG: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

fn config(slots: usize) -> ReceiverConfig {
    ReceiverConfig {
        seg_size: SEG,
        chunk_bytes: CHUNK,
        slots,
        align_bytes: 4096,
        flush: FlushPolicy { batch_bytes: 200_000, interval_us: 300, batches_in_flight_max: 3 },
    }
}

/// A disk that knows what was written (completed writes) and what is durable (covered by a
/// completed fsync issued after the write completed).
#[derive(Default)]
struct FakeDisk {
    /// segno -> bytes as written (page cache).
    written: BTreeMap<u64, Vec<u8>>,
    /// segno -> (issue sequence of the fsync that made it durable, bytes as durable).
    durable: BTreeMap<u64, (u64, Vec<u8>)>,
    fsync_seq: u64,
    /// A file created whose directory entry is not yet durable.
    dir_entries_pending: Vec<u64>,
    dir_entries_durable: Vec<u64>,
}

impl FakeDisk {
    fn seg(&mut self, segno: u64) -> &mut Vec<u8> {
        self.written.entry(segno).or_insert_with(|| vec![0; SEG as usize])
    }
    /// The longest prefix of the stream, from `start`, that survives a crash now.
    fn durable_prefix(&self, start: Lsn, stream: &[u8]) -> Lsn {
        let end = start.0 + stream.len() as u64;
        let mut lsn = start.0;
        while lsn < end {
            let segno = lsn / SEG;
            if !self.dir_entries_durable.contains(&segno) {
                break;
            }
            let Some((_, d)) = self.durable.get(&segno) else { break };
            let seg_end = ((segno + 1) * SEG).min(end);
            let on_disk = &d[(lsn % SEG) as usize..(lsn % SEG + (seg_end - lsn)) as usize];
            let want = &stream[(lsn - start.0) as usize..(seg_end - start.0) as usize];
            match on_disk.iter().zip(want).position(|(a, b)| a != b) {
                Some(i) => return Lsn(lsn + i as u64),
                None => lsn = seg_end,
            }
        }
        Lsn(lsn)
    }
}

enum Pending {
    Write { write_id: u64, segno: u64, data: Vec<u8>, file_offset: u64 },
    Fsync { req: FsyncRequest, snapshot: Option<(u64, u64, Vec<u8>)>, dir: Vec<u64> },
}

/// Faults a simulation may inject.
#[derive(Clone, Copy, Default)]
struct Faults {
    /// Per step: the connection drops (mid-frame or not); the sender reconnects and resumes at
    /// the receiver's durable LSN once it drained.
    reset_per_mille: u32,
    /// Per fsync completion: it fails with EIO.
    fsync_eio_per_mille: u32,
    /// The sender's connection-end rules decide when the run ends: a live source drained by a
    /// SIGTERM at a random step, a directory at rest sometimes interrupted, and valid WAL that
    /// may stop early at a timeline switch or at damage. Off: the stream is shipped to its end.
    endings: bool,
}

/// Where the simulated source's valid WAL stops, short of the stream's end.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Cut {
    None,
    Switch(Lsn),
    Corrupt(Lsn),
}

/// Runs one seeded simulation. Returns the number of steps taken.
fn simulate(seed: u64, stream_len: usize, frame_max: usize, slots: usize) -> usize {
    simulate_with(seed, stream_len, frame_max, slots, Faults::default())
}

// Longer than ~70 lines on purpose: one seeded loop over a dozen pieces of shared state (fake disk,
// pending completions, the sender, the fault flags), with the io layer's action handling and every
// invariant check inline where the event happens, so a failing seed reads top to bottom.
fn simulate_with(seed: u64, stream_len: usize, frame_max: usize, slots: usize, faults: Faults) -> usize {
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Lsn(SEG); // segment 1
    let stream: Vec<u8> = (0..stream_len).map(|_| rng.random::<u8>() | 1).collect();
    let mut rx = Receiver::new(config(slots), Lsn(0));
    rx.set_start(start);
    // The sender's state machine plans the frames (aligned to a power-of-two frame size, within its
    // in-flight budget, never past a horizon that grows like a live primary's flush LSN) and checks
    // every ack the receiver sends.
    let frame_bytes = {
        let max = (frame_max as u64).min(rx.frame_bytes_max()).max(1);
        if max.is_power_of_two() { max } else { max.next_power_of_two() / 2 }
    };
    let limits = SenderLimits { frame_bytes, in_flight_bytes_max: frame_bytes * rng.random_range(1..=16u64), seg_size: SEG };
    let end = start + stream_len as u64;
    let (rules, cut, shutdown_at_step) = if faults.endings { sender_endings(&mut rng, start, end) } else { (EndRules::PATIENT, Cut::None, None) };
    let valid_end = match cut {
        Cut::None => end,
        Cut::Switch(at) | Cut::Corrupt(at) => at,
    };
    let mut sender = Sender::with_end_rules(limits, start, rules, Instant::now());
    let mut horizon = start;
    let mut pool: Vec<Vec<u8>> = vec![vec![0xEE; CHUNK as usize]; slots];
    let mut disk = FakeDisk::default();
    let mut pending: Vec<Pending> = Vec::new();
    let mut piece_pending: Option<(usize, usize, usize)> = None;
    let mut now = 0u64;
    let mut last_ack = Lsn(0);
    let mut steps = 0;
    // Reset in progress: waiting for the receiver to drain before the sender resumes.
    let mut reconnecting = false;
    // An fsync failed: from then on no ack may be sent, whatever else completes.
    let mut fsync_failed = false;
    let mut actions = Vec::new();
    loop {
        steps += 1;
        assert!(steps < 1_000_000, "simulation does not terminate");
        now += rng.random_range(0..100);
        // Carry out actions.
        while !actions.is_empty() {
            for action in std::mem::take(&mut actions) {
                match action {
                    Action::OpenSegment { segno } => {
                        disk.seg(segno);
                        disk.dir_entries_pending.push(segno);
                        rx.on_directory_changed(now);
                    }
                    Action::Prefill { segno, slot, slot_offset, file_offset, len } => {
                        let src = disk.seg(segno)[file_offset as usize..file_offset as usize + len].to_vec();
                        pool[slot][slot_offset..slot_offset + len].copy_from_slice(&src);
                    }
                    Action::RecvPiece { slot, slot_offset, len } => {
                        assert!(piece_pending.is_none());
                        piece_pending = Some((slot, slot_offset, len));
                    }
                    Action::Write { write_id, segno, slot, slot_offset, len, valid_len, file_offset } => {
                        assert_eq!(file_offset % 4096, 0, "O_DIRECT offset alignment");
                        assert_eq!(len % 4096, 0, "O_DIRECT length alignment");
                        pool[slot][slot_offset + valid_len..slot_offset + len].fill(0);
                        let data = pool[slot][slot_offset..slot_offset + len].to_vec();
                        pending.push(Pending::Write { write_id, segno, data, file_offset });
                    }
                    Action::Fsync(req) => {
                        disk.fsync_seq += 1;
                        let seq = disk.fsync_seq;
                        let snapshot = match req.target {
                            SyncTarget::Segment(s) => Some((s, seq, disk.seg(s).clone())),
                            SyncTarget::Directory => None,
                        };
                        let dir = if snapshot.is_none() { disk.dir_entries_pending.clone() } else { Vec::new() };
                        pending.push(Pending::Fsync { req, snapshot, dir });
                    }
                    Action::CompleteSegment { segno } => {
                        assert!((segno + 1) * SEG <= rx.flushed().0, "renamed before durable");
                        rx.on_directory_changed(now);
                    }
                    Action::Ack { written, flushed } => {
                        assert!(!fsync_failed, "ack of {flushed} after an fsync failed (seed {seed})");
                        assert!(flushed >= last_ack, "ack moved backwards");
                        assert!(flushed <= written);
                        let durable = disk.durable_prefix(start, &stream);
                        assert!(flushed <= durable, "acked {flushed} but only {durable} is durable (seed {seed})");
                        last_ack = flushed;
                        sender.on_ack(written, flushed).unwrap_or_else(|e| panic!("sender refused an ack: {e} (seed {seed})"));
                    }
                }
            }
        }
        assert!(rx.flushed() <= rx.written() && rx.written() <= rx.received());
        if fsync_failed && pending.is_empty() {
            // The io layer exits here; everything acknowledged must have been durable.
            assert!(last_ack <= disk.durable_prefix(start, &stream));
            return steps;
        }
        if reconnecting && pending.is_empty() && rx.is_drained() {
            reconnecting = false;
            let draining = sender.is_draining();
            sender = Sender::with_end_rules(limits, rx.resume_point(), rules, Instant::now());
            if draining {
                sender.begin_drain(Instant::now());
            }
        }
        if !reconnecting && !fsync_failed && faults.reset_per_mille > 0 && rng.random_range(0..1000) < faults.reset_per_mille {
            piece_pending = None;
            rx.abandon_frame();
            reconnecting = true;
            continue;
        }
        if shutdown_at_step.is_some_and(|at| steps >= at) {
            sender.begin_drain(Instant::now());
        }
        if !reconnecting && !fsync_failed {
            let facts = SourceFacts {
                horizon,
                is_final: !rules.live && cut == Cut::None && horizon == end,
                switch_point: matches!(cut, Cut::Switch(at) if horizon == at).then_some(valid_end),
                corrupt_end: matches!(cut, Cut::Corrupt(at) if horizon == at).then_some(valid_end),
            };
            if let Some(rule) = sender.connection_end(&facts, Instant::now()) {
                check_end(rule, &sender, &facts, disk.durable_prefix(start, &stream), seed);
                return steps;
            }
        }
        // Pick an event: a new frame header, a piece arriving, a completion, or a timer tick.
        // The horizon grows like a live primary's flush LSN, up to where valid WAL stops; a
        // shutdown freezes it (the drain ships what was there).
        let choice = rng.random_range(0..4);
        if horizon < valid_end && !sender.is_draining() && rng.random_range(0..4) == 0 {
            horizon = (horizon + rng.random_range(1..=2 * frame_bytes)).min(valid_end);
        }
        if choice == 0 && !rx.frame_in_progress() && sender.sent() < horizon && !reconnecting && !fsync_failed {
            let mut plans = Vec::new();
            sender.plan(horizon, frame_bytes, 1, &mut plans);
            if let Some(f) = plans.first() {
                rx.on_data_header(f.lsn, f.len, &mut actions).unwrap();
            }
        } else if choice == 1 && piece_pending.is_some() {
            let (slot, off, len) = piece_pending.take().unwrap();
            let lsn_in_frame = frame_piece_lsn(&rx, slot, off);
            let from = (lsn_in_frame.0 - start.0) as usize;
            pool[slot][off..off + len].copy_from_slice(&stream[from..from + len]);
            if rx.on_piece_received(&mut actions) {
                rx.on_frame_verified(now, &mut actions);
            }
        } else if choice == 2 && !pending.is_empty() {
            let i = rng.random_range(0..pending.len());
            match pending.swap_remove(i) {
                Pending::Write { write_id, segno, data, file_offset } => {
                    disk.seg(segno)[file_offset as usize..file_offset as usize + data.len()].copy_from_slice(&data);
                    rx.on_write_done(write_id, now, &mut actions);
                }
                Pending::Fsync { req, .. } if faults.fsync_eio_per_mille > 0 && rng.random_range(0..1000) < faults.fsync_eio_per_mille => {
                    // EIO: the disk may have dropped the dirty pages; nothing becomes durable.
                    rx.on_fsync_failed(req.batch_id);
                    fsync_failed = true;
                }
                Pending::Fsync { req, snapshot, dir } => {
                    if let Some((s, seq, bytes)) = snapshot {
                        // A later fsync's view wins whatever order they complete in.
                        if disk.durable.get(&s).is_none_or(|(old, _)| *old < seq) {
                            disk.durable.insert(s, (seq, bytes));
                        }
                    }
                    for d in dir {
                        if !disk.dir_entries_durable.contains(&d) {
                            disk.dir_entries_durable.push(d);
                        }
                    }
                    rx.on_fsync_done(req.batch_id, &mut actions);
                }
            }
        } else if choice == 3 {
            if reconnecting || fsync_failed || ((sender.sent() == horizon || sender.is_draining()) && !rx.frame_in_progress()) {
                rx.force_flush(now, &mut actions);
            } else {
                rx.poll_flush(now, &mut actions);
            }
        }
    }
}

/// A run's end rules: live or at rest, where valid WAL stops, and when a SIGTERM comes.
fn sender_endings(rng: &mut StdRng, start: Lsn, end: Lsn) -> (EndRules, Cut, Option<usize>) {
    let live = rng.random_bool(0.5);
    let rules = EndRules { live, ..EndRules::PATIENT };
    let at = start + rng.random_range(0..=(end - start));
    let cut = match rng.random_range(0..4) {
        0 => Cut::Switch(at),
        1 => Cut::Corrupt(at),
        _ => Cut::None,
    };
    // A live source is followed until a SIGTERM; a directory at rest is sometimes interrupted.
    let shutdown = (live || rng.random_bool(0.5)).then(|| rng.random_range(0..800));
    (rules, cut, shutdown)
}

/// The sender ended the connection by `rule`: whatever it believes durable must be durable on
/// the fake disk, with the stream's bytes.
fn check_end(rule: ConnEndRule, sender: &Sender, facts: &SourceFacts, durable: Lsn, seed: u64) {
    let must_hold = match rule {
        ConnEndRule::Done => facts.horizon,
        ConnEndRule::Interrupted { drained: true } => sender.sent(),
        ConnEndRule::TimelineSwitch { switch: at } | ConnEndRule::CorruptEnd { valid_end: at } => {
            assert!(sender.sent() <= at, "sent {} past the end of valid WAL {at} (seed {seed})", sender.sent());
            at
        }
        other => panic!("{other:?} without a timeout (seed {seed})"),
    };
    assert!(sender.flushed() >= must_hold, "{rule:?} with only {} acknowledged (seed {seed})", sender.flushed());
    assert!(durable >= must_hold, "{rule:?}: {must_hold} acknowledged but only {durable} durable with the right bytes (seed {seed})");
}

/// The LSN a pending piece lands at: derived from the frame's pieces and the chunk layout.
fn frame_piece_lsn(rx: &Receiver, slot: usize, off: usize) -> Lsn {
    let chunk = rx.chunks.iter().find(|c| c.slot == slot).expect("chunk of piece");
    chunk.start + off as u64
}

#[test]
fn small_frames_many_seeds() {
    for seed in 0..200 {
        simulate(seed, 300_000, 9_000, 4);
    }
}

#[test]
fn large_frames_cross_chunks_and_segments() {
    for seed in 0..50 {
        simulate(1000 + seed, 3 * SEG as usize + 12345, 2 * CHUNK as usize, 6);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_seed_keeps_the_invariants(seed in any::<u64>(), len in 1usize..400_000, frame_max in 1usize..200_000) {
        simulate(seed, len, frame_max.min(3 * CHUNK as usize), 8);
    }

    #[test]
    fn any_seed_with_faults_keeps_the_invariants(seed in any::<u64>(), reset in 0u32..30, eio in 0u32..50) {
        simulate_with(seed, 300_000, 40_000, 6, Faults { reset_per_mille: reset, fsync_eio_per_mille: eio, endings: false });
    }
}

#[test]
fn connection_resets_resume_at_the_durable_lsn() {
    for seed in 0..300 {
        simulate_with(5000 + seed, 400_000, 70_000, 6, Faults { reset_per_mille: 20, ..Faults::default() });
    }
}

#[test]
fn fsync_eio_is_fatal_and_nothing_after_it_is_acknowledged() {
    for seed in 0..300 {
        simulate_with(9000 + seed, 600_000, 50_000, 6, Faults { fsync_eio_per_mille: 100, reset_per_mille: 5, endings: false });
    }
}

/// The sender's connection-end rules (SIGTERM drain, timeline switch, corrupt end, done) against
/// the real receiver machine and the fake disk, with connection resets and fsync EIO on top:
/// however a connection ends, nothing the sender counts as durable is missing from the disk.
#[test]
fn connection_ends_never_count_undurable_bytes() {
    for seed in 0..400 {
        simulate_with(20_000 + seed, 500_000, 60_000, 6, Faults { reset_per_mille: 5, fsync_eio_per_mille: 2, endings: true });
    }
}

#[test]
fn gap_is_refused() {
    let mut rx = Receiver::new(config(4), Lsn(0));
    rx.set_start(Lsn(SEG));
    let mut out = Vec::new();
    assert!(matches!(rx.on_data_header(Lsn(SEG + 10), 5, &mut out), Err(ReceiverError::NotContiguous { .. })));
    assert!(matches!(rx.on_data_header(Lsn(SEG), 0, &mut out), Err(ReceiverError::EmptyFrame { .. })));
    assert!(matches!(rx.on_data_header(Lsn(SEG), 10 * CHUNK, &mut out), Err(ReceiverError::FrameTooLarge { .. })));
}

#[test]
fn resume_mid_block_prefills_the_block_head() {
    let mut rx = Receiver::new(config(4), Lsn(SEG + 5000));
    let mut out = Vec::new();
    rx.on_data_header(Lsn(SEG + 5000), 100, &mut out).unwrap();
    assert_eq!(out[0], Action::OpenSegment { segno: 1 });
    assert_eq!(
        out[1],
        Action::Prefill { segno: 1, slot: 0, slot_offset: 4096, file_offset: 4096, len: 904 }
    );
    assert!(matches!(out[2], Action::RecvPiece { slot: 0, slot_offset: 5000, len: 100 }));
}
