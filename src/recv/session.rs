//! Who may talk to the receiver, and from where the stream goes on: the pure control plane of one
//! sender connection. The Hello, this directory's identity and its durable position go in; a
//! decision (start fresh, resume, continue on a newer timeline) or a refusal with its wire error
//! code comes out. Also the table of which frame kind each connection phase accepts. No I/O: the
//! receive loop in `recv/mod.rs` carries the decisions out, and unit tests and the seeded
//! simulation drive these rules directly.

use crate::auth::AuthKey;
use crate::wal::{Lsn, WalIdentity};
use crate::wire::{Auth, ErrorCode, FrameHeader, FrameKind, Hello, AUTH_MAC_LEN, AUTH_NONCE_LEN};

/// Where a connection is in its life: what the next frame may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnPhase {
    AwaitHelloHeader,
    AwaitHelloBody(FrameHeader),
    /// Challenge sent; waiting for the sender's response.
    AwaitAuthHeader,
    AwaitAuthBody(FrameHeader),
    AwaitHeader,
    AwaitControlBody(FrameHeader),
    /// Receiving a data frame's body into the buffer pool.
    DataBody(FrameHeader),
}

/// What the receive loop does with a frame header, per the phase table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderStep {
    /// Receive the control body, then decode it in the given phase.
    ControlBody(ConnPhase),
    /// Receive a data frame's body.
    DataBody(ConnPhase),
}

/// The connection must end: tell the sender why (an Error frame with `code`), then close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: String) -> Refusal {
        Refusal { code, message }
    }
}

/// The phase/frame-kind table: which frame each phase accepts, and the phase that follows.
pub fn on_header(phase: ConnPhase, header: FrameHeader, peer: &str) -> Result<HeaderStep, Refusal> {
    match (phase, header.kind) {
        (ConnPhase::AwaitHelloHeader, FrameKind::Hello) => Ok(HeaderStep::ControlBody(ConnPhase::AwaitHelloBody(header))),
        (ConnPhase::AwaitAuthHeader, FrameKind::Auth) => Ok(HeaderStep::ControlBody(ConnPhase::AwaitAuthBody(header))),
        (ConnPhase::AwaitAuthHeader, kind) => {
            Err(Refusal::new(ErrorCode::Auth, format!("expected an authentication response from {peer}, got {kind}")))
        }
        (ConnPhase::AwaitHelloHeader, kind) => Err(Refusal::new(ErrorCode::Protocol, format!("expected Hello from {peer}, got {kind}"))),
        (ConnPhase::AwaitHeader, FrameKind::Data) => Ok(HeaderStep::DataBody(ConnPhase::DataBody(header))),
        (ConnPhase::AwaitHeader, FrameKind::Keepalive | FrameKind::Error | FrameKind::BackupFile) => {
            Ok(HeaderStep::ControlBody(ConnPhase::AwaitControlBody(header)))
        }
        (_, kind) => Err(Refusal::new(ErrorCode::Protocol, format!("unexpected {kind} frame from {peer}"))),
    }
}

/// The sender's answer to our challenge `nonce_r`: it must prove it knows `key`, bound to its
/// Hello (`hello_body`). Nothing is decided, and nothing written, before it did; on success, our
/// proof for the sender.
pub fn on_auth_response(key: &AuthKey, nonce_r: &[u8; AUTH_NONCE_LEN], hello_body: &[u8], response: &Auth, peer: &str) -> Result<[u8; AUTH_MAC_LEN], Refusal> {
    if !key.verify_sender(nonce_r, &response.nonce, hello_body, &response.mac) {
        return Err(Refusal::new(
            ErrorCode::Auth,
            format!("sender {peer} failed authentication (it does not know this receiver's --auth-key-file key); refused before anything was written"),
        ));
    }
    Ok(key.receiver_mac(&response.nonce, nonce_r))
}

/// Where the accepted stream starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamStart {
    /// The directory holds nothing of this stream yet: start at the sender's first LSN.
    Fresh(Lsn),
    /// Resume at this directory's durable end.
    Resume(Lsn),
}

impl StreamStart {
    pub fn lsn(self) -> Lsn {
        match self {
            StreamStart::Fresh(l) | StreamStart::Resume(l) => l,
        }
    }
}

/// A newer timeline branching off ours: ours ends at `switch`; the stream continues on the new
/// timeline from `start`, the start of the segment holding `switch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimelineSwitch {
    pub from_tli: u32,
    pub switch: Lsn,
    pub start: Lsn,
}

/// The sender may stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The stream's identity from now on (the directory's, on the sender's timeline).
    pub identity: WalIdentity,
    /// Set when the sender moved to a newer timeline: the loop switches files and receiver first.
    pub switch: Option<TimelineSwitch>,
    pub start: StreamStart,
}

/// The identity the sender's Hello describes.
pub fn hello_identity(hello: &Hello) -> WalIdentity {
    WalIdentity {
        system_id: hello.system_id,
        seg_size: u64::from(hello.seg_size),
        block_size: u64::from(hello.block_size),
        magic: hello.page_magic,
        tli: hello.timeline,
    }
}

/// Decides on a Hello. `ours` is the directory's identity (None: empty), `durable` where its
/// stream would resume (its durable end; 0 when it holds nothing). Identity first (system,
/// geometry, timeline, page magic), then a timeline switch (the directory must hold the old
/// timeline up to the switch point), then the gap check (the sender must have the WAL from the
/// resume point on).
pub fn on_hello(hello: &Hello, ours: Option<WalIdentity>, durable: Lsn, peer: &str) -> Result<Accepted, Refusal> {
    crate::wire::check_version(hello.protocol_version).map_err(|e| Refusal::new(ErrorCode::Protocol, format!("sender {peer}: {e}")))?;
    let theirs = hello_identity(hello);
    if let Some(ours) = ours {
        if let Some(why) = identity_mismatch(&ours, &theirs) {
            return Err(Refusal::new(ErrorCode::Identity, format!("refusing sender {peer}: it ships {why}")));
        }
    }
    let (identity, switch, durable) = match ours {
        Some(ours) if theirs.tli > ours.tli => {
            let switch = timeline_switch(hello, &ours, durable, peer)?;
            (WalIdentity { tli: theirs.tli, ..ours }, Some(switch), switch.start)
        }
        Some(ours) => (ours, None, durable),
        None => (theirs, None, durable),
    };
    let first = Lsn(hello.first_lsn);
    // LSN 0 is "holds nothing" only for a directory that did not just switch timelines.
    let start = if durable == Lsn(0) && switch.is_none() {
        if hello.first_lsn % theirs.seg_size.max(1) != 0 {
            return Err(Refusal::new(ErrorCode::Protocol, format!("sender {peer} starts at {first} which is not a segment start")));
        }
        StreamStart::Fresh(first)
    } else if durable < first {
        return Err(Refusal::new(
            ErrorCode::Gap,
            format!("gap: this directory holds WAL up to {durable} but sender {peer} starts at {first}; the WAL in between is missing"),
        ));
    } else {
        StreamStart::Resume(durable)
    };
    Ok(Accepted { identity, switch, start })
}

/// Why the sender's WAL cannot go into this directory, if it cannot.
fn identity_mismatch(ours: &WalIdentity, theirs: &WalIdentity) -> Option<String> {
    if ours.system_id != theirs.system_id {
        Some(format!("system identifier {} but this directory holds WAL of system {}", theirs.system_id, ours.system_id))
    } else if ours.seg_size != theirs.seg_size || ours.block_size != theirs.block_size {
        Some(format!(
            "segment/block size {}/{} but this directory holds {}/{}",
            theirs.seg_size, theirs.block_size, ours.seg_size, ours.block_size
        ))
    } else if theirs.tli < ours.tli {
        Some(format!("timeline {} but this directory already follows the newer timeline {}", theirs.tli, ours.tli))
    } else if ours.magic != theirs.magic {
        Some(format!("page magic {:#06X} but this directory holds {:#06X}", theirs.magic, ours.magic))
    } else {
        None
    }
}

/// The sender is on a newer timeline: its history must branch off ours, and this directory must
/// hold ours up to the switch point (the sender ships it first).
fn timeline_switch(hello: &Hello, ours: &WalIdentity, durable: Lsn, peer: &str) -> Result<TimelineSwitch, Refusal> {
    let switch = crate::wal::history::parse_history(&hello.history)
        .ok()
        .and_then(|h| crate::wal::history::switch_point(&h, ours.tli))
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::Identity,
                format!(
                    "refusing sender {peer}: it ships timeline {} whose history does not branch off this directory's timeline {}",
                    hello.timeline, ours.tli
                ),
            )
        })?;
    if durable < switch {
        return Err(Refusal::new(
            ErrorCode::Gap,
            format!(
                "gap: sender {peer} switched to timeline {} at {switch}, but this directory holds timeline {} only up to {durable}",
                hello.timeline, ours.tli
            ),
        ));
    }
    Ok(TimelineSwitch { from_tli: ours.tli, switch, start: switch.segment_start(ours.seg_size) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PROTOCOL_VERSION;

    const SEG: u64 = 16 << 20;

    fn id(tli: u32) -> WalIdentity {
        WalIdentity { system_id: 42, seg_size: SEG, block_size: 8192, magic: 0xD110, tli }
    }

    fn hello(tli: u32, first: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            page_magic: 0xD110,
            timeline: tli,
            system_id: 42,
            seg_size: SEG as u32,
            block_size: 8192,
            first_lsn: first,
            horizon_lsn: first + SEG,
            sender_name: "test".into(),
            history: String::new(),
        }
    }

    fn refused(r: Result<Accepted, Refusal>) -> Refusal {
        r.expect_err("must be refused")
    }

    #[test]
    fn an_empty_directory_starts_where_the_sender_starts_at_a_segment_start() {
        let a = on_hello(&hello(1, 3 * SEG), None, Lsn(0), "p").unwrap();
        assert_eq!(a.start, StreamStart::Fresh(Lsn(3 * SEG)));
        assert_eq!(a.identity, id(1));
        assert_eq!(refused(on_hello(&hello(1, 3 * SEG + 8192), None, Lsn(0), "p")).code, ErrorCode::Protocol);
    }

    #[test]
    fn a_directory_resumes_at_its_durable_end_when_the_sender_has_it() {
        let a = on_hello(&hello(1, 2 * SEG), Some(id(1)), Lsn(5 * SEG + 100), "p").unwrap();
        assert_eq!(a.start, StreamStart::Resume(Lsn(5 * SEG + 100)));
        assert_eq!(a.switch, None);
        // The sender starts past our durable end: the WAL in between is missing.
        let r = refused(on_hello(&hello(1, 6 * SEG), Some(id(1)), Lsn(5 * SEG + 100), "p"));
        assert_eq!(r.code, ErrorCode::Gap);
        assert!(r.message.contains("missing"), "{}", r.message);
    }

    #[test]
    fn another_system_geometry_or_page_magic_is_refused_as_identity() {
        for tweak in [
            (|h: &mut Hello| h.system_id = 43) as fn(&mut Hello),
            |h| h.seg_size = (SEG / 2) as u32,
            |h| h.block_size = 16384,
            |h| h.page_magic = 0xD113,
        ] {
            let mut h = hello(1, 0);
            tweak(&mut h);
            let r = refused(on_hello(&h, Some(id(1)), Lsn(SEG), "p"));
            assert_eq!(r.code, ErrorCode::Identity, "{}", r.message);
        }
    }

    #[test]
    fn an_older_timeline_is_refused() {
        let r = refused(on_hello(&hello(1, 0), Some(id(2)), Lsn(SEG), "p"));
        assert_eq!(r.code, ErrorCode::Identity);
        assert!(r.message.contains("newer timeline 2"), "{}", r.message);
    }

    #[test]
    fn a_newer_timeline_switches_only_when_its_history_branches_off_ours_and_we_hold_the_switch() {
        let switch = Lsn(4 * SEG + 0x1234);
        let mut h = hello(2, 4 * SEG);
        h.history = format!("1\t{switch}\tno recovery target specified\n");
        let a = on_hello(&h, Some(id(1)), Lsn(4 * SEG + 0x2000), "p").unwrap();
        assert_eq!(a.switch, Some(TimelineSwitch { from_tli: 1, switch, start: Lsn(4 * SEG) }));
        assert_eq!(a.identity, id(2));
        assert_eq!(a.start, StreamStart::Resume(Lsn(4 * SEG)));
        // We hold timeline 1 only up to below the switch point: a gap.
        assert_eq!(refused(on_hello(&h, Some(id(1)), Lsn(4 * SEG + 0x1000), "p")).code, ErrorCode::Gap);
        // A history that does not mention our timeline: not our stream.
        h.history = format!("3\t{switch}\tno recovery target specified\n");
        assert_eq!(refused(on_hello(&h, Some(id(1)), Lsn(4 * SEG + 0x2000), "p")).code, ErrorCode::Identity);
        h.history = String::new();
        assert_eq!(refused(on_hello(&h, Some(id(1)), Lsn(4 * SEG + 0x2000), "p")).code, ErrorCode::Identity);
    }

    #[test]
    fn another_protocol_version_is_refused() {
        let mut h = hello(1, 0);
        h.protocol_version = PROTOCOL_VERSION + 1;
        assert_eq!(refused(on_hello(&h, None, Lsn(0), "p")).code, ErrorCode::Protocol);
    }

    /// The directory as the session sees it across many connections.
    #[derive(Debug, Clone, Copy)]
    struct Dir {
        identity: Option<WalIdentity>,
        durable: Lsn,
    }

    /// One random sender: mostly the right cluster on the current or a newer timeline, sometimes
    /// another system, an older timeline, a history that does not branch off ours, a sender that
    /// starts past our durable end (a gap), or a non-segment start.
    fn random_hello(rng: &mut rand::rngs::StdRng, dir: &Dir) -> Hello {
        use rand::Rng;
        let tli = dir.identity.map_or(1, |i| i.tli);
        let durable = dir.durable.0;
        let mut h = hello(tli, durable.saturating_sub(rng.random_range(0..3) * SEG) / SEG * SEG);
        match rng.random_range(0..10) {
            0 => h.system_id = 43,
            1 if tli > 1 => h.timeline = tli - 1,
            2 => h.first_lsn = durable / SEG * SEG + rng.random_range(1..4) * SEG, // a gap
            3 | 4 => {
                // A newer timeline, switching somewhere around our durable end (or not off ours).
                h.timeline = tli + 1;
                let switch = (durable + rng.random_range(0..2 * SEG)).saturating_sub(SEG);
                let parent = if rng.random_range(0..4) == 0 { tli + 7 } else { tli };
                h.history = format!("{parent}\t{}\tno recovery target specified\n", Lsn(switch));
                h.first_lsn = switch / SEG * SEG;
            }
            5 if durable == 0 => h.first_lsn += 8192, // not a segment start
            _ => {}
        }
        h
    }

    /// The receiver's key in the simulation, and the key of a sender that does not know it.
    const KEY: &[u8] = b"walship simulation key: the receiver's";
    const OTHER_KEY: &[u8] = b"walship simulation key: somebody else's";

    /// A random sender's handshake with a receiver that has a key, through the phase table and
    /// the challenge: it sends Hello, then either answers the challenge (with the receiver's key
    /// when `knows_key`) or sends `other` (a frame that is not an answer) in the middle of it.
    fn authenticate(rng: &mut rand::rngs::StdRng, h: &Hello, knows_key: bool, other: Option<FrameKind>) -> Result<(), Refusal> {
        use rand::Rng;
        let header = |kind| FrameHeader { kind, flags: 0, lsn: 0, body_len: 8, body_crc: 0 };
        let step = on_header(ConnPhase::AwaitHelloHeader, header(FrameKind::Hello), "sim")?;
        assert!(matches!(step, HeaderStep::ControlBody(ConnPhase::AwaitHelloBody(_))));
        if let Some(kind) = other {
            let r = on_header(ConnPhase::AwaitAuthHeader, header(kind), "sim");
            assert!(r.is_err(), "a {kind} frame was taken in the middle of authentication");
            return r.map(|_| ());
        }
        let step = on_header(ConnPhase::AwaitAuthHeader, header(FrameKind::Auth), "sim")?;
        assert!(matches!(step, HeaderStep::ControlBody(ConnPhase::AwaitAuthBody(_))));
        let hello_body = format!("{h:?}").into_bytes();
        let (nonce_r, nonce_s): ([u8; AUTH_NONCE_LEN], [u8; AUTH_NONCE_LEN]) = (rng.random(), rng.random());
        let senders_key = AuthKey::from_bytes(if knows_key { KEY } else { OTHER_KEY });
        let mac = senders_key.sender_mac(&nonce_r, &nonce_s, &hello_body);
        let response = Auth { step: crate::wire::AuthStep::Response, nonce: nonce_s, mac };
        on_auth_response(&AuthKey::from_bytes(KEY), &nonce_r, &hello_body, &response, "sim").map(|_| ())
    }

    /// Seeded simulation over sessions: the directory only changes on an accepted Hello of a
    /// sender that authenticated (one without the key, or one that sends another frame in the
    /// middle of authenticating, is refused with the Auth code); then the sender's identity
    /// (system, geometry, magic) is the directory's, its timeline never goes back, a timeline switch
    /// follows a history that branches off the directory's timeline at a point it holds, the resume
    /// point is never below what it holds durably (acks never move backwards) except onto a newer
    /// timeline at that switch point, the sender has the WAL from the resume point on (no gap),
    /// and a fresh start is always a segment start of an empty directory.
    #[test]
    fn a_seeded_simulation_of_many_senders_keeps_the_session_invariants() {
        use rand::{Rng, SeedableRng};
        for seed in 0..300u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut dir = Dir { identity: None, durable: Lsn(0) };
            for step in 0..200 {
                let h = random_hello(&mut rng, &dir);
                let knows_key = rng.random_range(0..8) != 0;
                let other = (rng.random_range(0..10) == 0).then(|| [FrameKind::Data, FrameKind::Keepalive, FrameKind::Hello][rng.random_range(0..3)]);
                let before = dir;
                match authenticate(&mut rng, &h, knows_key, other).and_then(|()| on_hello(&h, dir.identity, dir.durable, "sim")) {
                    Err(r) => {
                        assert_ne!(r.code, ErrorCode::Other, "seed {seed} step {step}: refusals carry a specific code");
                        assert!(!r.message.is_empty());
                        if !knows_key || other.is_some() {
                            assert_eq!(r.code, ErrorCode::Auth, "seed {seed} step {step}: {}", r.message);
                        }
                    }
                    Ok(a) => {
                        assert!(knows_key && other.is_none(), "seed {seed} step {step}: accepted a sender that did not authenticate");
                        check_accepted(&h, &a, before, seed, step);
                        // The sender streams a while; what becomes durable moves forward from the start.
                        let streamed = rng.random_range(0..3 * SEG);
                        dir = Dir { identity: Some(a.identity), durable: a.start.lsn() + streamed };
                    }
                }
            }
        }
    }

    /// The session invariants of one accepted Hello `h` against the directory `before` it.
    fn check_accepted(h: &Hello, a: &Accepted, before: Dir, seed: u64, step: usize) {
        if let Some(ours) = before.identity {
            let theirs = hello_identity(h);
            let shape = |i: &WalIdentity| (i.system_id, i.seg_size, i.block_size, i.magic);
            assert_eq!(shape(&theirs), shape(&ours), "seed {seed} step {step}: accepted a sender of another system or geometry");
            assert_eq!(shape(&a.identity), shape(&ours), "seed {seed} step {step}: the directory's identity changed");
            assert!(a.identity.tli >= ours.tli, "seed {seed} step {step}: timeline went back");
            assert!(h.timeline >= ours.tli, "seed {seed} step {step}: accepted a sender of an older timeline");
            assert_eq!(a.identity.tli, h.timeline, "seed {seed} step {step}: the stream continues on the sender's timeline");
        }
        match (a.switch, a.start) {
            (None, StreamStart::Resume(l)) => assert_eq!(l, before.durable, "seed {seed} step {step}"),
            (None, StreamStart::Fresh(l)) => {
                assert_eq!(before.durable, Lsn(0));
                assert_eq!(l.0 % SEG, 0);
            }
            (Some(sw), start) => {
                let ours = before.identity.expect("a switch off a timeline the directory holds");
                let history = crate::wal::history::parse_history(&h.history).expect("a switch follows a parsable history");
                assert_eq!(
                    crate::wal::history::switch_point(&history, ours.tli),
                    Some(sw.switch),
                    "seed {seed} step {step}: switched on a history that does not branch off timeline {}",
                    ours.tli
                );
                assert!(before.durable >= sw.switch, "seed {seed} step {step}: switched without holding the switch point");
                assert_eq!(start, StreamStart::Resume(sw.start));
                assert!(sw.start <= sw.switch && sw.switch.0 - sw.start.0 < SEG);
            }
        }
        assert!(
            a.start.lsn() >= Lsn(h.first_lsn) || a.start == StreamStart::Fresh(Lsn(h.first_lsn)),
            "seed {seed} step {step}: a gap: the sender starts at {} past the resume point {}",
            Lsn(h.first_lsn),
            a.start.lsn()
        );
    }

    #[test]
    fn the_phase_table_accepts_only_the_expected_frame_kinds() {
        let h = |kind| FrameHeader { kind, flags: 0, lsn: 0, body_len: 8, body_crc: 0 };
        let all = [FrameKind::Hello, FrameKind::Auth, FrameKind::Data, FrameKind::Keepalive, FrameKind::Error, FrameKind::Welcome, FrameKind::Ack, FrameKind::BackupFile];
        for kind in all {
            let hello_ok = on_header(ConnPhase::AwaitHelloHeader, h(kind), "p").is_ok();
            assert_eq!(hello_ok, kind == FrameKind::Hello, "{kind} before Hello");
            let auth = on_header(ConnPhase::AwaitAuthHeader, h(kind), "p");
            assert_eq!(auth.is_ok(), kind == FrameKind::Auth, "{kind} while authenticating");
            if let Err(r) = auth {
                assert_eq!(r.code, ErrorCode::Auth);
            }
            let streaming = on_header(ConnPhase::AwaitHeader, h(kind), "p");
            match kind {
                FrameKind::Data => assert!(matches!(streaming, Ok(HeaderStep::DataBody(ConnPhase::DataBody(_))))),
                FrameKind::Keepalive | FrameKind::Error | FrameKind::BackupFile => {
                    assert!(matches!(streaming, Ok(HeaderStep::ControlBody(ConnPhase::AwaitControlBody(_)))))
                }
                _ => assert_eq!(streaming.unwrap_err().code, ErrorCode::Protocol, "{kind} while streaming"),
            }
        }
    }
}
