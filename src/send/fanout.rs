//! The sender's io loop over its destinations (one or several, issue #12): one source, pages
//! mapped and checked once, one io_uring ring; per destination its own connection, handshake (on
//! a thread of its own, so a slow or dead receiver never stalls the others), pure [`Sender`]
//! machine, in-flight window and reconnect backoff. The [`Quorum`] combines what they
//! acknowledged; [`fleet::verdict`] decides when the run ends.
//!
//! A connection that ends is cancelled on the ring and kept (in `closing`) until every operation
//! on it has completed: its control buffer and its socket outlive the kernel's use of them. Every
//! send holds the segment maps it points into until its last completion (zero-copy: the
//! notification), so a mapping outlives every destination's use of it.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::fleet::{self, Finish, Verdict};
use super::pages::{CheckedFrames, PageChecker, PagesOk};
use super::quorum::{OnceOutcome, Quorum};
use super::sender::{ConnEndRule, EndRules, FramePlan, Sender, SenderLimits};
use super::source::{ServerState, Source, SourceError};
use super::{
    explain_gap_at_slot, facts, handshake, hello, slot_covers, zero_copy_on, Destination, HandshakeError, Progress, SendConfig, SendError,
    SendSummary,
};
use crate::metrics::{send_error, SenderMetrics};
use crate::tls::Link;
use crate::uring::{BufferPool, Completion, CompletionKind, Ring, RingError, SendBatch};
use crate::wal::Lsn;
use crate::wire::{self, Decoder, ErrorCode, FrameHeader, Limits, Message, FRAME_HEADER_LEN};

const KIND_SEND: u64 = 1;
const KIND_RECV: u64 = 2;
/// The live source's poller signalled a new flush position (eventfd read into control buffer 0).
const KIND_WAKE: u64 = 3;
const CTL_WAKE: usize = 0;
const ACK_BUF_BYTES: usize = 4096;
/// How often the loop looks for finished handshakes while one is under way.
const HANDSHAKE_POLL: Duration = Duration::from_millis(2);

/// The ring tag of an operation of destination `dest`'s connection number `gen`.
fn tag(dest: usize, gen: u32, kind: u64) -> u64 {
    ((dest as u64) << 40) | (u64::from(gen) << 8) | kind
}

fn untag(tag: u64) -> (usize, u32, u64) {
    ((tag >> 40) as usize, (tag >> 8) as u32, tag & 0xFF)
}

/// The control buffer of destination `dest`'s acks.
fn ctl_acks(dest: usize) -> usize {
    1 + dest
}

/// Why a connection (or an attempt at one) was lost.
enum Lost {
    /// Worth retrying (network trouble, receiver restart).
    Transient(String),
    /// This destination will not be used again in this run.
    Fatal(SendError),
}

/// A finished handshake, handed back by the attempt's thread.
struct Handshaken {
    link: Link,
    peer: String,
    welcome: wire::Welcome,
}

enum AttemptError {
    Lost(Lost),
    Refused { peer: String, code: ErrorCode, message: String },
}

struct AttemptResult {
    dest: usize,
    gen: u32,
    result: Result<Handshaken, AttemptError>,
}

/// Reconnecting after a transient loss: backoff doubling to 5 s, for at most `retry_for` since
/// the last connection that made progress.
struct Retry {
    lost_at: Instant,
    backoff: Duration,
}

impl Retry {
    fn new() -> Retry {
        Retry { lost_at: Instant::now(), backoff: Duration::from_millis(100) }
    }

    /// How long to wait before the next attempt, or the end of the retries.
    fn next(&mut self, retry_for: Duration, why: String) -> Result<Duration, SendError> {
        if self.lost_at.elapsed() > retry_for {
            return Err(SendError::GaveUp { retry_for, last: why });
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        Ok(wait)
    }
}

/// One streaming connection's io state and the pure machine whose decisions it carries out.
struct Conn {
    link: Link,
    peer: String,
    fd: RawFd,
    gen: u32,
    core: Sender,
    decoder: Decoder,
    zero_copy: bool,
    send_in_flight: bool,
    recv_in_flight: bool,
    /// Where this connection started (to tell whether it made progress).
    resumed_at: Lsn,
    /// The source's `.backup` files this connection shipped (see `source::backups`).
    backups: super::source::backups::BackupShipper,
}

impl Conn {
    fn idle(&self) -> bool {
        !self.send_in_flight && !self.recv_in_flight
    }
}

enum State {
    Waiting { until: Instant },
    Connecting,
    Streaming(Box<Conn>),
    WaitSwitch,
    Done,
    Corrupt,
    Interrupted,
    Failed(SendError),
}

struct Dest {
    spec: Destination,
    state: State,
    retry: Retry,
    /// Connection number (tags tell a closed connection's completions from the current one's).
    gen: u32,
    /// Highest durable position this destination acknowledged in this run (this timeline).
    acked: Lsn,
    /// Warned that it no longer holds the slot back.
    dropped_warned: bool,
}

impl Dest {
    fn phase(&self) -> fleet::Phase {
        match self.state {
            State::Waiting { .. } | State::Connecting => fleet::Phase::Connecting,
            State::Streaming(_) => fleet::Phase::Streaming,
            State::WaitSwitch => fleet::Phase::WaitSwitch,
            State::Done => fleet::Phase::Done,
            State::Corrupt => fleet::Phase::Corrupt,
            State::Interrupted => fleet::Phase::Interrupted,
            State::Failed(_) => fleet::Phase::Failed,
        }
    }

    fn conn(&self) -> Option<&Conn> {
        match &self.state {
            State::Streaming(c) => Some(c),
            _ => None,
        }
    }

    fn conn_mut(&mut self) -> Option<&mut Conn> {
        match &mut self.state {
            State::Streaming(c) => Some(c),
            _ => None,
        }
    }
}

/// Ships to every destination until the run's verdict says it is over. Every error is counted
/// in the metrics once: a destination's where it is lost, the run's here.
pub(super) fn ship(
    cfg: &SendConfig,
    source: &mut Source,
    shutdown: &AtomicBool,
    summary: &mut SendSummary,
    progress: &mut Progress,
    m: &SenderMetrics,
) -> Result<(), SendError> {
    let mut f = Fanout::open(cfg, source).inspect_err(|e| m.inc_error(super::error_kind(e)))?;
    let end = f.run(source, shutdown, summary, progress, m).inspect_err(|e| m.inc_error(super::error_kind(e)))?;
    let result = f.finish(end, source);
    if matches!(end, Finish::Corrupt | Finish::Interrupted) {
        if let Err(e) = &result {
            m.inc_error(super::error_kind(e));
        }
    }
    result
}

/// The io state of one run over its destinations. Field order matters: the ring drops first,
/// cancelling and draining every operation before the connections' sockets close.
struct Fanout<'a> {
    ring: Ring,
    cfg: &'a SendConfig,
    dests: Vec<Dest>,
    /// Connections that ended with operations still in flight on them.
    closing: Vec<(usize, Box<Conn>)>,
    quorum: Quorum,
    checker: PageChecker,
    checked: CheckedFrames,
    frame_bytes: u64,
    wake_fd: Option<RawFd>,
    wake_in_flight: bool,
    attempts_tx: mpsc::Sender<AttemptResult>,
    attempts_rx: mpsc::Receiver<AttemptResult>,
    completions: Vec<Completion>,
    plans: Vec<FramePlan>,
    frames_per_batch: usize,
    shutting_down: bool,
    shutdown_logged: Option<Lsn>,
}

impl<'a> Fanout<'a> {
    fn open(cfg: &'a SendConfig, source: &Source) -> Result<Fanout<'a>, SendError> {
        let n = cfg.destinations.len();
        let id = source.identity();
        let frame_bytes = cfg.frame_bytes.min(id.seg_size);
        let pool = BufferPool::new(1, 4096).map_err(|e| RingError::Io { op: "pool", source: e })?;
        let ring = Ring::new(32 + 8 * n as u32, pool, 1 + n, ACK_BUF_BYTES)?;
        let slot_start = source.slot_protects_from().map_or(Lsn(0), |(_, from)| from);
        let (attempts_tx, attempts_rx) = mpsc::channel();
        let now = Instant::now();
        Ok(Fanout {
            ring,
            cfg,
            dests: cfg
                .destinations
                .iter()
                .map(|spec| Dest {
                    spec: spec.clone(),
                    state: State::Waiting { until: now },
                    retry: Retry::new(),
                    gen: 0,
                    acked: Lsn(0),
                    dropped_warned: false,
                })
                .collect(),
            closing: Vec::new(),
            quorum: Quorum::new(n, cfg.quorum, cfg.max_lag_bytes, slot_start).expect("quorum validated with the config"),
            checker: PageChecker::new(id),
            checked: CheckedFrames::new(frame_bytes),
            frame_bytes,
            wake_fd: source.wake_fd(),
            wake_in_flight: false,
            attempts_tx,
            attempts_rx,
            completions: Vec::new(),
            plans: Vec::new(),
            frames_per_batch: ((crate::uring::IOV_MAX / 2) as u64).min(cfg.send_batch_bytes_max / frame_bytes.max(1) + 2) as usize,
            shutting_down: false,
            shutdown_logged: None,
        })
    }

    fn run(&mut self, source: &mut Source, shutdown: &AtomicBool, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) -> Result<Finish, SendError> {
        loop {
            if shutdown.load(Ordering::Relaxed) {
                self.shut_down(source, Instant::now())?;
            }
            self.refresh(source, progress, m)?;
            self.end_connections(source, Instant::now(), m);
            match fleet::verdict(&self.phases(), self.cfg.quorum, self.shutting_down) {
                Verdict::Continue => {}
                Verdict::Switch => {
                    self.switch_timeline(source, progress)?;
                    continue;
                }
                Verdict::Finish(end) => return Ok(end),
            }
            self.take_handshakes(source, summary, progress, m);
            self.start_attempts(source);
            self.log_state(source, progress, m);
            self.arm_reads();
            self.send_next(source, summary, m);
            self.wait(source)?;
            self.take_completions(source, summary, progress, m);
        }
    }

    fn phases(&self) -> Vec<fleet::Phase> {
        self.dests.iter().map(Dest::phase).collect()
    }

    fn streaming(&self) -> impl Iterator<Item = &Conn> {
        self.dests.iter().filter_map(Dest::conn)
    }

    /// SIGTERM: connections drain (live: up to the horizon as it is now, walsender's rule; at
    /// rest: what was sent); destinations not connected are left behind.
    fn shut_down(&mut self, source: &mut Source, now: Instant) -> Result<(), SendError> {
        if !self.shutting_down {
            self.shutting_down = true;
            if self.cfg.live.is_some() {
                let sent = self.streaming().map(|c| c.core.sent()).max().unwrap_or(Lsn(0));
                source.refresh(sent)?;
                info!(horizon = %source.horizon(), "SIGTERM: shipping up to the current horizon {} and waiting for the acks", source.horizon());
            } else {
                info!("interrupted: waiting for the receivers to acknowledge what was sent");
            }
        }
        for d in &mut self.dests {
            match &mut d.state {
                State::Streaming(c) => {
                    c.core.begin_drain(now);
                }
                State::Waiting { .. } | State::Connecting => d.state = State::Interrupted,
                _ => {}
            }
        }
        Ok(())
    }

    /// Moves the horizon: keeps the directory walk a segment ahead of the furthest destination;
    /// asks a live server.
    fn refresh(&mut self, source: &mut Source, progress: &mut Progress, m: &SenderMetrics) -> Result<(), SendError> {
        let mut ahead = self.streaming().filter(|c| !c.core.is_draining()).map(|c| c.core.sent()).peekable();
        if ahead.peek().is_none() || source.is_final() {
            return Ok(());
        }
        let furthest = ahead.max().expect("one at least");
        source.refresh(furthest + source.identity().seg_size)?;
        m.set_horizon(source.horizon().0);
        if self.cfg.live.is_some() {
            progress.observe_horizon(source.horizon());
        }
        Ok(())
    }

    /// Carries out every connection end the sender machines decide.
    fn end_connections(&mut self, source: &Source, now: Instant, m: &SenderMetrics) {
        let facts = facts(source);
        for d in 0..self.dests.len() {
            let Some(conn) = self.dests[d].conn_mut() else { continue };
            let Some(rule) = conn.core.connection_end(&facts, now) else { continue };
            let peer = conn.peer.clone();
            let next = match rule {
                ConnEndRule::Done => State::Done,
                ConnEndRule::Interrupted { .. } => State::Interrupted,
                ConnEndRule::TimelineSwitch { switch } => {
                    info!(peer = %peer, switch = %switch, "the receiver holds this timeline up to its switch point");
                    State::WaitSwitch
                }
                ConnEndRule::CorruptEnd { .. } => State::Corrupt,
                ConnEndRule::PeerSilent { unacked_bytes } => {
                    let why = format!("receiver {peer} acknowledged nothing for {:?} with {unacked_bytes} bytes outstanding", self.cfg.peer_timeout);
                    self.lose(d, Lost::Transient(why), m);
                    continue;
                }
            };
            let graceful = !matches!(rule, ConnEndRule::Interrupted { drained: false });
            self.close(d, next, graceful, m);
        }
    }

    /// Ends destination `d`'s connection (if any) and moves it to `next`. Operations still in
    /// flight are cancelled; the connection is kept until they complete.
    fn close(&mut self, d: usize, next: State, graceful: bool, m: &SenderMetrics) {
        let old = std::mem::replace(&mut self.dests[d].state, next);
        let State::Streaming(conn) = old else { return };
        m.on_destination_disconnected(&self.dests[d].spec.to, &conn.peer);
        if graceful {
            conn.link.shutdown();
        }
        if conn.idle() {
            return;
        }
        self.ring.cancel_fd(conn.fd);
        self.closing.push((d, conn));
    }

    /// Destination `d` lost its connection or attempt: back off and retry, or give it up.
    fn lose(&mut self, d: usize, lost: Lost, m: &SenderMetrics) {
        let dest = &mut self.dests[d];
        let made_progress = dest.conn().is_some_and(|c| c.core.flushed() > c.resumed_at);
        if made_progress {
            dest.retry = Retry::new();
        }
        let next = match lost {
            _ if self.shutting_down => State::Interrupted,
            Lost::Fatal(e) => {
                m.inc_error(super::error_kind(&e));
                error!(destination = %dest.spec.to, "{e}");
                State::Failed(e)
            }
            Lost::Transient(why) => {
                m.inc_error(send_error::NETWORK);
                match dest.retry.next(self.cfg.retry_for, why.clone()) {
                    Ok(wait) => {
                        m.inc_destination_reconnects(&dest.spec.to);
                        warn!(destination = %dest.spec.to, "{why}; retrying in {wait:?}");
                        State::Waiting { until: Instant::now() + wait }
                    }
                    Err(e) => {
                        error!(destination = %dest.spec.to, "{e}");
                        State::Failed(e)
                    }
                }
            }
        };
        self.close(d, next, false, m);
    }

    /// Starts a handshake for every destination whose backoff is over (on a thread each: a
    /// receiver that does not answer holds up only its own destination).
    fn start_attempts(&mut self, source: &Source) {
        let now = Instant::now();
        for d in 0..self.dests.len() {
            let due = matches!(self.dests[d].state, State::Waiting { until } if until <= now);
            // The control buffer of a closed connection is busy until its receive is cancelled.
            if !due || self.shutting_down || self.closing.iter().any(|(c, _)| *c == d) {
                continue;
            }
            let dest = &mut self.dests[d];
            dest.gen = dest.gen.wrapping_add(1);
            dest.state = State::Connecting;
            let (spec, gen, hello) = (dest.spec.clone(), dest.gen, hello(self.cfg, source));
            let (connect_timeout, peer_timeout, auth) = (self.cfg.connect_timeout, self.cfg.peer_timeout, self.cfg.auth.clone());
            let tx = self.attempts_tx.clone();
            let spawned = std::thread::Builder::new().name(format!("walship-connect-{d}")).spawn(move || {
                let result = connect(&spec, connect_timeout, peer_timeout).and_then(|(link, peer)| {
                    match handshake(&link, &hello, peer_timeout, auth.as_ref()) {
                        Ok(welcome) => Ok(Handshaken { link, peer, welcome }),
                        Err(HandshakeError::Refused(code, message)) => Err(AttemptError::Refused { peer, code, message }),
                        Err(HandshakeError::Io(e)) => Err(AttemptError::Lost(Lost::Transient(format!("handshake with {peer} failed: {e}")))),
                    }
                });
                let _ = tx.send(AttemptResult { dest: d, gen, result });
            });
            if let Err(e) = spawned {
                self.dests[d].state = State::Waiting { until: now + Duration::from_millis(100) };
                warn!("cannot start a connection thread: {e}");
            }
        }
    }

    /// Takes in every finished handshake: checks where the receiver stands and starts streaming.
    fn take_handshakes(&mut self, source: &mut Source, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) {
        while let Ok(attempt) = self.attempts_rx.try_recv() {
            let d = attempt.dest;
            if attempt.gen != self.dests[d].gen || !matches!(self.dests[d].state, State::Connecting) {
                continue; // a shutdown left it behind
            }
            let lost = match attempt.result {
                Ok(h) => match self.greet(d, h, source, summary, progress, m) {
                    Ok(()) => continue,
                    Err(lost) => lost,
                },
                Err(AttemptError::Lost(lost)) => lost,
                Err(AttemptError::Refused { peer, code, message }) => {
                    let message = if matches!(code, ErrorCode::Gap) { explain_gap_at_slot(source, message) } else { message };
                    if code.is_fatal() {
                        Lost::Fatal(SendError::Refused { peer, message })
                    } else {
                        Lost::Transient(format!("receiver {peer} refused: {message}"))
                    }
                }
            };
            self.lose(d, lost, m);
        }
    }

    /// The checks of where the receiver stands; then destination `d` streams from its durable
    /// position.
    fn greet(&mut self, d: usize, h: Handshaken, source: &mut Source, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) -> Result<(), Lost> {
        let durable = Lsn(h.welcome.durable_lsn);
        let resume = if durable == Lsn(0) { source.first_lsn() } else { durable };
        let dest = &self.dests[d];
        if resume < dest.acked {
            warn!(
                peer = %h.peer,
                "receiver acknowledged {} as durable earlier but now holds only {resume}: its storage lost acknowledged WAL; re-sending from {resume}",
                dest.acked
            );
        }
        if self.quorum.is_dropped(d) {
            warn!(peer = %h.peer, "receiver is more than --max-lag-bytes behind the quorum and no longer holds the slot back: resuming from {resume} with what pg_wal still has");
        } else {
            slot_covers(source, &h.peer, resume).map_err(Lost::Fatal)?;
        }
        source.refresh(resume).map_err(|e| Lost::Fatal(e.into()))?;
        if source.is_final() && source.horizon() < resume {
            return Err(Lost::Fatal(SendError::ReceiverAhead { peer: h.peer, receiver: resume, source_end: source.horizon() }));
        }
        summary.connections += 1;
        progress.start_lsn.get_or_insert(resume);
        self.on_flushed(d, resume, source, progress, summary, m);
        info!(peer = %h.peer, resume = %resume, horizon = %source.horizon(), "streaming from {resume}");
        m.on_destination_connected(&self.dests[d].spec.to, &h.peer, resume.0);
        let conn = self.conn(d, h, resume, source);
        self.dests[d].state = State::Streaming(Box::new(conn));
        Ok(())
    }

    fn conn(&self, d: usize, h: Handshaken, resume: Lsn, source: &Source) -> Conn {
        h.link.set_timeouts(None);
        let id = source.identity();
        let limits = SenderLimits { frame_bytes: self.frame_bytes, in_flight_bytes_max: self.cfg.in_flight_bytes_max, seg_size: id.seg_size };
        let rules = EndRules { live: self.cfg.live.is_some(), shutdown_timeout: self.cfg.shutdown_timeout, peer_timeout: self.cfg.peer_timeout };
        let zero_copy = zero_copy_on(self.cfg.zero_copy, &h.link, self.ring.capabilities().sendmsg_zc);
        Conn {
            fd: h.link.as_raw_fd(),
            link: h.link,
            peer: h.peer,
            gen: self.dests[d].gen,
            core: Sender::with_end_rules(limits, resume, rules, Instant::now()),
            decoder: Decoder::new(Limits::default()),
            zero_copy,
            send_in_flight: false,
            recv_in_flight: false,
            resumed_at: resume,
            backups: Default::default(),
        }
    }

    /// Destination `d` holds everything below `flushed` durably: the quorum, the slot, the
    /// latency record and the metrics learn it.
    fn on_flushed(&mut self, d: usize, flushed: Lsn, source: &mut Source, progress: &mut Progress, summary: &mut SendSummary, m: &SenderMetrics) {
        let dest = &mut self.dests[d];
        dest.acked = dest.acked.max(flushed);
        let before = self.quorum.position();
        self.quorum.on_flushed(d, flushed);
        let position = self.quorum.position();
        debug_assert!(position >= before, "the quorum position moved backwards");
        progress.on_acked(position, summary);
        source.on_durable(self.quorum.slot_floor());
        m.set_quorum_flushed(position.0);
        m.set_destination_flushed(&dest.spec.to, flushed.0, source.horizon().0);
    }

    /// Every destination in the run holds this timeline up to the switch point: move the source
    /// to the next timeline; positions there start over.
    fn switch_timeline(&mut self, source: &mut Source, progress: &mut Progress) -> Result<(), SendError> {
        source.apply_switch()?;
        progress.acked = Lsn(0);
        progress.horizons_seen.clear();
        let n = self.dests.len();
        let slot_start = source.slot_protects_from().map_or(Lsn(0), |(_, from)| from);
        self.quorum = Quorum::new(n, self.cfg.quorum, self.cfg.max_lag_bytes, slot_start).expect("quorum validated");
        self.checker = PageChecker::new(source.identity());
        self.checked.clear();
        let now = Instant::now();
        for dest in &mut self.dests {
            if matches!(dest.state, State::WaitSwitch) {
                info!(destination = %dest.spec.to, "reconnecting on the new timeline");
                dest.state = State::Waiting { until: now };
                dest.retry = Retry::new();
                dest.acked = Lsn(0);
            }
        }
        Ok(())
    }

    /// The run is over: Ok when every destination holds the end; otherwise the error that says
    /// which do not.
    fn finish(mut self, end: Finish, source: &mut Source) -> Result<(), SendError> {
        let position = self.quorum.position();
        match end {
            Finish::All => Ok(()),
            Finish::Corrupt => Err(source.take_corruption().expect("corruption described").into()),
            Finish::Interrupted => Err(SendError::Interrupted { flushed: position }),
            Finish::QuorumOnly => Err(self.quorum_only(source.horizon())),
            Finish::Short => {
                let failed = self.dests.iter_mut().find_map(|d| match std::mem::replace(&mut d.state, State::Done) {
                    State::Failed(e) => Some(e),
                    _ => None,
                });
                Err(failed.unwrap_or(SendError::Interrupted { flushed: position }))
            }
        }
    }

    /// The error for "K or more hold the end, not all": each lagging destination and its position.
    fn quorum_only(&self, end: Lsn) -> SendError {
        let OnceOutcome::QuorumOnly { lagging } = self.quorum.once_outcome(end) else {
            // Positions say all hold it (e.g. a drained live run): the phases said otherwise.
            let lagging = self.dests.iter().filter(|d| !matches!(d.state, State::Done)).map(|d| format!("{} at {}", d.spec.to, d.acked));
            return SendError::QuorumOnly { k: self.cfg.quorum, n: self.dests.len(), end, lagging: lagging.collect::<Vec<_>>().join(", ") };
        };
        let lagging = lagging
            .iter()
            .map(|&(d, at)| match at {
                Lsn(0) => format!("{} (never connected)", self.dests[d].spec.to),
                at => format!("{} holds up to {at}", self.dests[d].spec.to),
            })
            .collect::<Vec<_>>();
        SendError::QuorumOnly { k: self.cfg.quorum, n: self.dests.len(), end, lagging: lagging.join(", ") }
    }

    /// The periodic "following" line, the shutdown line, and the warnings for destinations that
    /// stop (or start again) holding the slot back.
    fn log_state(&mut self, source: &Source, progress: &mut Progress, m: &SenderMetrics) {
        let position = self.quorum.position();
        if let Some(ServerState::ShutDown { checkpoint, end }) = source.server_state() {
            if position >= end && self.shutdown_logged != Some(end) {
                self.shutdown_logged = Some(end);
                info!(checkpoint = %checkpoint, "the quorum holds the server's WAL durably through its shutdown checkpoint (up to {end}); waiting for the server to come back");
            }
        }
        for d in 0..self.dests.len() {
            let dropped = self.quorum.is_dropped(d);
            let dest = &mut self.dests[d];
            if dropped != dest.dropped_warned {
                dest.dropped_warned = dropped;
                m.set_destination_dropped(&dest.spec.to, dropped);
                if dropped {
                    error!(destination = %dest.spec.to, quorum = %position, "destination is more than --max-lag-bytes ({}) behind the quorum: it no longer holds the replication slot back, and WAL it has not received may be removed from pg_wal", self.cfg.max_lag_bytes);
                } else {
                    info!(destination = %dest.spec.to, "destination is back within --max-lag-bytes of the quorum and holds the slot back again");
                }
            }
        }
        if self.cfg.live.is_some() && progress.last_report.elapsed() > Duration::from_secs(10) {
            progress.last_report = Instant::now();
            let behind = source.horizon() - position.min(source.horizon());
            info!(quorum_flushed = %position, horizon = %source.horizon(), lag_bytes = behind, slot_floor = %self.quorum.slot_floor(), "following");
        }
    }

    /// Keeps one read of acks per connection (and one of the poller's eventfd) in flight.
    fn arm_reads(&mut self) {
        for (d, dest) in self.dests.iter_mut().enumerate() {
            let Some(c) = dest.conn_mut() else { continue };
            if !c.recv_in_flight {
                let len = ACK_BUF_BYTES.min(c.decoder.room().max(1));
                self.ring.recv_ctl(c.fd, tag(d, c.gen, KIND_RECV), ctl_acks(d), len, false);
                c.recv_in_flight = true;
            }
        }
        if let (Some(wake), false) = (self.wake_fd, self.wake_in_flight) {
            self.ring.read_ctl(wake, tag(0, 0, KIND_WAKE), CTL_WAKE, 8);
            self.wake_in_flight = true;
        }
    }

    /// Each connection with no send in flight: plans its next frames up to the horizon and sends
    /// them from the shared mappings. A destination that cannot be sent to is lost on its own.
    fn send_next(&mut self, source: &mut Source, summary: &mut SendSummary, m: &SenderMetrics) {
        for d in 0..self.dests.len() {
            if let Err(e) = self.send_one(d, source, summary, m) {
                self.lose(d, Lost::Fatal(e), m);
            }
        }
        let low = self.streaming().map(|c| c.core.flushed()).min();
        if let Some(low) = low {
            source.release_below(low);
            self.checker.forget_below(low.0 / source.identity().seg_size);
            self.checked.forget_below(low);
        }
    }

    fn send_one(&mut self, d: usize, source: &mut Source, summary: &mut SendSummary, m: &SenderMetrics) -> Result<(), SendError> {
        let Some(c) = self.dests[d].conn_mut() else { return Ok(()) };
        if c.send_in_flight {
            return Ok(());
        }
        // A new `.backup` file of the source goes out as one frame before the next data batch.
        let source_dir = || source.segment_path(Lsn(0)).parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        if let Some(frame) = c.backups.next_frame(source_dir, source.identity().seg_size) {
            self.ring.send_batch(c.fd, tag(d, c.gen, KIND_SEND), frame, false);
            c.send_in_flight = true;
            return Ok(());
        }
        self.plans.clear();
        c.core.plan(source.horizon(), self.cfg.send_batch_bytes_max, self.frames_per_batch, &mut self.plans);
        if self.plans.is_empty() {
            return Ok(());
        }
        let (fd, gen, zc_on) = (c.fd, c.gen, c.zero_copy);
        let batch = build_batch(source, &mut self.checker, &mut self.checked, self.cfg.live.is_some(), &self.plans)?;
        let zc = zc_on && batch.len_bytes() as u64 >= self.cfg.zero_copy_bytes_min;
        if zc {
            summary.zero_copy_sends += 1;
        }
        self.ring.send_batch(fd, tag(d, gen, KIND_SEND), batch, zc);
        let c = self.dests[d].conn_mut().expect("streaming");
        c.send_in_flight = true;
        m.add_bytes_sent(self.plans.iter().map(|p| p.len).sum());
        self.publish_positions(m);
        Ok(())
    }

    /// The run's positions in the sender's gauges: the furthest sent and written, the quorum's
    /// durable position.
    fn publish_positions(&self, m: &SenderMetrics) {
        let sent = self.streaming().map(|c| c.core.sent()).max().unwrap_or(Lsn(0));
        let written = self.streaming().map(|c| c.core.written()).max().unwrap_or(Lsn(0));
        let flushed = self.quorum.position();
        m.set_positions(sent.0.max(flushed.0), written.0.max(flushed.0), flushed.0);
    }

    fn wait(&mut self, source: &Source) -> Result<(), SendError> {
        let now = Instant::now();
        let mut wait = if self.streaming().any(|c| c.send_in_flight) { Duration::from_millis(100) } else { source.wait_hint().min(Duration::from_millis(100)) };
        for d in &self.dests {
            match d.state {
                State::Connecting => wait = wait.min(HANDSHAKE_POLL),
                State::Waiting { until } => wait = wait.min(until.saturating_duration_since(now)),
                _ => {}
            }
        }
        if !self.closing.is_empty() {
            wait = wait.min(HANDSHAKE_POLL);
        }
        self.ring.submit_and_wait(Some(wait.max(Duration::from_micros(50))))?;
        self.completions.clear();
        self.ring.drain(&mut self.completions);
        Ok(())
    }

    /// Takes in what completed: sends, acks, the poller's wake-up, and the last operations of
    /// closed connections.
    fn take_completions(&mut self, source: &mut Source, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) {
        // By index: the Vec keeps its capacity from one wait to the next (no allocation per turn).
        for i in 0..self.completions.len() {
            let c = self.completions[i];
            let (d, gen, kind) = untag(c.tag);
            if kind == KIND_WAKE {
                self.wake_in_flight = false;
                continue;
            }
            if let CompletionKind::ZeroCopyNotification { copied } = c.kind {
                summary.zero_copy_copied += u64::from(copied);
                continue;
            }
            if let Some(at) = self.closing.iter().position(|(cd, cc)| *cd == d && cc.gen == gen) {
                let conn = &mut self.closing[at].1;
                match kind {
                    KIND_SEND => conn.send_in_flight = false,
                    _ => conn.recv_in_flight = false,
                }
                if conn.idle() {
                    self.closing.swap_remove(at);
                }
                continue;
            }
            if self.dests[d].conn().is_none_or(|conn| conn.gen != gen) {
                continue;
            }
            let lost = match kind {
                KIND_SEND => self.on_sent(d, c.result),
                _ => self.on_received(d, c.result, source, summary, progress, m),
            };
            if let Some(lost) = lost {
                self.lose(d, lost, m);
            }
        }
    }

    fn on_sent(&mut self, d: usize, result: i32) -> Option<Lost> {
        let c = self.dests[d].conn_mut().expect("streaming");
        c.send_in_flight = false;
        (result < 0).then(|| Lost::Transient(format!("send to {} failed: {}", c.peer, std::io::Error::from_raw_os_error(-result))))
    }

    fn on_received(&mut self, d: usize, result: i32, source: &mut Source, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) -> Option<Lost> {
        let c = self.dests[d].conn_mut().expect("streaming");
        c.recv_in_flight = false;
        if result <= 0 {
            let why = if result == 0 { "receiver closed the connection".to_string() } else { std::io::Error::from_raw_os_error(-result).to_string() };
            return Some(Lost::Transient(format!("connection to {} lost: {why}", c.peer)));
        }
        c.decoder.feed(&self.ring.ctl(ctl_acks(d))[..result as usize]);
        self.take_messages(d, source, summary, progress, m)
    }

    /// Every whole message destination `d`'s receiver sent: acks move its machine and the
    /// quorum; anything else ends the connection.
    fn take_messages(&mut self, d: usize, source: &mut Source, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) -> Option<Lost> {
        loop {
            let c = self.dests[d].conn_mut().expect("streaming");
            let peer = c.peer.clone();
            let refused = |message: String| Some(Lost::Fatal(SendError::Refused { peer: peer.clone(), message }));
            let advanced = match c.decoder.next_message() {
                Ok(Some(Message::Ack(ack))) => match c.core.on_ack_at(Lsn(ack.written_lsn), Lsn(ack.flushed_lsn), Instant::now()) {
                    Ok(advanced) => advanced.then(|| c.core.flushed()),
                    Err(e) => return refused(format!("protocol violation: {e}")),
                },
                Ok(Some(Message::Keepalive(_))) => None,
                Ok(Some(Message::Error(e))) if e.code.is_fatal() => return refused(e.message),
                Ok(Some(Message::Error(e))) => return Some(Lost::Transient(format!("receiver {peer} gave up: {}", e.message))),
                Ok(Some(other)) => return refused(format!("unexpected {} frame during streaming", other.kind())),
                Ok(None) => return None,
                Err(e) => return refused(format!("bad frame: {e}")),
            };
            m.on_ack_seen();
            if let Some(flushed) = advanced {
                self.on_flushed(d, flushed, source, progress, summary, m);
                self.publish_positions(m);
            }
        }
    }
}

/// TCP (and TLS) to a destination; the link and the peer's address.
fn connect(spec: &Destination, connect_timeout: Duration, peer_timeout: Duration) -> Result<(Link, String), AttemptError> {
    let transient = |why: String| AttemptError::Lost(Lost::Transient(why));
    let addr = super::resolve(&spec.to).map_err(|e| transient(e.to_string()))?;
    let stream = std::net::TcpStream::connect_timeout(&addr, connect_timeout).map_err(|e| transient(format!("cannot connect to receiver {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let link = match &spec.tls {
        None => Link::Tcp(stream),
        Some(tls) => crate::tls::connect(stream, addr, tls, peer_timeout).map_err(|e| {
            if e.is_transient() {
                transient(e.to_string())
            } else {
                AttemptError::Lost(Lost::Fatal(e.into()))
            }
        })?,
    };
    Ok((link, addr.to_string()))
}

/// Frames as header + payload iovecs straight from the segment maps; each header carries the
/// payload's CRC32C. Pages are checked, and the CRC computed, before a range's first send (a live
/// server may have recycled the file); a later destination's send of the same range reuses both
/// while the WAL cannot have changed since (at rest, or under the slot's protection).
fn build_batch(source: &mut Source, checker: &mut PageChecker, checked: &mut CheckedFrames, live: bool, plans: &[FramePlan]) -> Result<SendBatch, SendError> {
    let seg_size = source.identity().seg_size;
    let protected_from = if live { source.slot_protects_from().map(|(_, from)| from) } else { Some(Lsn(0)) };
    let mut batch = SendBatch::new(plans.len() * FRAME_HEADER_LEN);
    for plan in plans {
        let map = source.map_for(plan.lsn)?;
        let offset = (plan.lsn.0 % seg_size) as usize;
        let payload = &map.bytes()[offset..offset + plan.len as usize];
        let reuse = protected_from.filter(|&from| plan.lsn >= from).and_then(|_| checked.get(plan.lsn, plan.len));
        let (ok, crc) = match reuse {
            Some((ok, crc)) => (ok, crc.unwrap_or_else(|| crc32c::crc32c(payload))),
            None => {
                let ok = checker.check(&map, plan.lsn, plan.len).map_err(|(page, e)| {
                    SendError::Source(SourceError::Recycled {
                        path: source.segment_path(plan.lsn),
                        lsn: page,
                        why: format!("{e}; the file no longer holds the WAL written there (recycled by the server?)"),
                    })
                })?;
                let crc = crc32c::crc32c(payload);
                checked.insert(plan.lsn, plan.len, ok, crc);
                (ok, crc)
            }
        };
        let flags = if ok == PagesOk::SwitchPadding { wire::DATA_FLAG_SWITCH_PADDING } else { 0 };
        let header = FrameHeader { kind: wire::FrameKind::Data, flags, body_len: plan.len as u32, body_crc: crc, lsn: plan.lsn.0 };
        batch.push_small(&header.encode());
        batch.push_map(&map, offset, plan.len as usize);
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_round_trip() {
        for (d, gen, kind) in [(0, 0, KIND_SEND), (15, u32::MAX, KIND_RECV), (3, 7, KIND_WAKE)] {
            assert_eq!(untag(tag(d, gen, kind)), (d, gen, kind));
        }
    }
}
