//! `walship send`: ships WAL to a receiver, from a directory at rest (`--once`) or following a
//! live server up to its flush LSN. Handshake over a blocking socket; the data path is io_uring:
//! one sendmsg (header + payload straight from the segment mmap, zero-copy when it pays) in
//! flight per connection, acks received concurrently. With `--tls-ca` the same data path runs on
//! the plaintext end of a TLS pump ([`crate::tls`]).
pub mod pages;
pub mod quorum;
pub mod sender;
pub mod source;

/// The live source, at its former path.
pub use source::live;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use crate::uring::{BufferPool, Completion, CompletionKind, Ring, RingError, SendBatch};
use crate::wal::Lsn;
use crate::wire::{self, Decoder, ErrorCode, FrameHeader, Hello, Limits, Message, FRAME_HEADER_LEN};
use crate::metrics::{send_error, SenderMetrics};
use crate::tls::{Link, TlsClient, TlsError};
use pages::PageChecker;
use sender::{ConnEndRule, EndRules, FramePlan, Sender, SenderLimits, SourceFacts};
use source::{DirSource, LiveConfig, LiveSource, ServerState, Source, SourceError, WalSource};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ZeroCopy {
    /// Zero-copy for large sends to a non-loopback peer, plain sends otherwise.
    Auto,
    On,
    Off,
}

/// A [`SendConfig`] that cannot work, named by the flag that sets it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--frame-bytes must be a power of two between 64KiB and 16MiB, got {0}")]
    FrameBytes(u64),
    #[error("--{flag} ({value}) must be at least --frame-bytes ({frame_bytes})")]
    BelowFrame { flag: &'static str, value: u64, frame_bytes: u64 },
    #[error("--{flag} must be longer than zero")]
    ZeroDuration { flag: &'static str },
    #[error("--to {0:?}: expected HOST:PORT with a port in 1..=65535 (IPv6 in brackets: [::1]:5499)")]
    To(String),
}

/// `HOST:PORT` with a port 1..=65535 (`[::1]:5499` for IPv6): a typo must be refused at start-up,
/// never retried as a transient connection failure.
pub fn check_host_port(to: &str) -> Result<(), ConfigError> {
    let bad = || ConfigError::To(to.to_string());
    let (host, port) = to.rsplit_once(':').ok_or_else(bad)?;
    let host_ok = !host.is_empty() && (!host.contains(':') || (host.starts_with('[') && host.ends_with(']')));
    match port.parse::<u16>() {
        Ok(p) if p > 0 && host_ok => Ok(()),
        _ => Err(bad()),
    }
}

impl SendConfig {
    /// Checks every limit and how they fit together; `run` refuses a config that fails.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.frame_bytes.is_power_of_two() || !(64 << 10..=16 << 20).contains(&self.frame_bytes) {
            return Err(ConfigError::FrameBytes(self.frame_bytes));
        }
        for (flag, value) in [("in-flight-bytes-max", self.in_flight_bytes_max), ("send-batch-bytes-max", self.send_batch_bytes_max)] {
            if value < self.frame_bytes {
                return Err(ConfigError::BelowFrame { flag, value, frame_bytes: self.frame_bytes });
            }
        }
        let live = self.live.as_ref();
        for (flag, d) in [
            ("peer-timeout", Some(self.peer_timeout)),
            ("connect-timeout", Some(self.connect_timeout)),
            ("horizon-poll-interval", live.map(|l| l.poll_interval)),
            ("slot-advance-interval", live.map(|l| l.slot_advance_interval)),
        ] {
            if d.is_some_and(|d| d.is_zero()) {
                return Err(ConfigError::ZeroDuration { flag });
            }
        }
        check_host_port(&self.to)
    }
}

/// Everything `walship send` needs, validated.
#[derive(Debug, Clone)]
pub struct SendConfig {
    pub pg_wal: PathBuf,
    pub to: String,
    pub once: bool,
    /// Keep reconnecting this long after losing the receiver.
    pub retry_for: Duration,
    pub zero_copy: ZeroCopy,
    /// Data frame size (frames end at multiples of it in LSN space).
    pub frame_bytes: u64,
    /// Most bytes sent and not yet acknowledged durable.
    pub in_flight_bytes_max: u64,
    /// Most bytes per sendmsg.
    pub send_batch_bytes_max: u64,
    /// Smallest sendmsg that goes zero-copy (when zero-copy is on).
    pub zero_copy_bytes_min: u64,
    /// Give up on a connection whose receiver acknowledges nothing for this long.
    pub peer_timeout: Duration,
    pub connect_timeout: Duration,
    pub name: String,
    /// Follow a live server (None: ship the directory at rest, `once`).
    pub live: Option<LiveConfig>,
    /// On SIGTERM, wait this long for the receiver to acknowledge the final horizon.
    pub shutdown_timeout: Duration,
    /// Shared key for the mutual handshake authentication (None: `--insecure-no-auth`).
    pub auth: Option<crate::auth::AuthKey>,
    /// TLS to the receiver (None: plain TCP).
    pub tls: Option<TlsClient>,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("invalid sender configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error("receiver {peer} refused: {message}")]
    Refused { peer: String, message: String },
    #[error("gave up after {retry_for:?} without a receiver: {last}")]
    GaveUp { retry_for: Duration, last: String },
    #[error("receiver {peer} holds WAL up to {receiver}, but the source's valid WAL ends at {source_end}: it holds WAL this source does not have (another history?)")]
    ReceiverAhead { peer: String, receiver: Lsn, source_end: Lsn },
    #[error(
        "receiver {peer} holds WAL durably only up to {receiver}, but replication slot {slot} keeps WAL only from \
         {slot_from} on: the WAL between them is not protected from recycling (the server may have removed it \
         already), so shipping it could stop half-way, and shipping from {slot_from} would leave a gap. Refusing to \
         ship. The receiver's directory is not the one this slot served, or it lost WAL. Give the receiver the \
         directory that holds WAL up to {slot_from}, or start an empty receiver directory (shipping then starts at \
         the slot) with a new base backup"
    )]
    SlotAhead { peer: String, receiver: Lsn, slot: String, slot_from: Lsn },
    #[error("interrupted; the receiver holds everything below {flushed} durably")]
    Interrupted { flushed: Lsn },
    #[error("cannot resolve {to}: {why}")]
    Resolve { to: String, why: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What a ship achieved.
#[derive(Debug, Clone, Default)]
pub struct SendSummary {
    pub start_lsn: Lsn,
    pub end_lsn: Lsn,
    pub bytes: u64,
    pub segments: u64,
    pub seconds: f64,
    pub connections: u64,
    pub zero_copy_sends: u64,
    pub zero_copy_copied: u64,
    /// Time from seeing a horizon (the server's flush LSN) to the receiver's durable ack
    /// covering it, microseconds.
    pub ack_latency_us: Option<hdrhistogram::Histogram<u64>>,
}

impl SendSummary {
    pub fn mb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes as f64 / 1e6 / self.seconds
        } else {
            0.0
        }
    }

    /// (p50, p99, p99.9, max) of the ack latency in microseconds, when measured.
    pub fn ack_latency_percentiles_us(&self) -> Option<(u64, u64, u64, u64)> {
        self.ack_latency_us.as_ref().filter(|h| !h.is_empty()).map(|h| {
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.value_at_quantile(0.999), h.max())
        })
    }
}

/// Why one connection ended.
enum ConnEnd {
    /// Everything up to the final horizon is acknowledged durable.
    Done,
    /// The server moved to a newer timeline and the receiver holds ours up to the switch point.
    TimelineSwitch,
    /// Worth retrying (network trouble, receiver restart).
    Transient(String),
    Fatal(SendError),
}

const TAG_SEND: u64 = 1;
const TAG_RECV: u64 = 2;
/// The live source's poller signalled a new flush position (eventfd read into control buffer 1).
const TAG_WAKE: u64 = 3;
const CTL_ACKS: usize = 0;
const CTL_WAKE: usize = 1;
const ACK_BUF_BYTES: usize = 4096;

/// Progress shared across connections of one run.
struct Progress {
    start_lsn: Option<Lsn>,
    /// Highest flushed LSN the receiver acknowledged.
    acked: Lsn,
    /// Horizons observed and not yet acknowledged: (lsn, when seen), for the ack latency.
    horizons_seen: std::collections::VecDeque<(Lsn, Instant)>,
    last_report: Instant,
}

impl Progress {
    fn observe_horizon(&mut self, horizon: Lsn) {
        if self.horizons_seen.back().is_none_or(|&(l, _)| horizon > l) && horizon > self.acked {
            if self.horizons_seen.len() >= 100_000 {
                self.horizons_seen.pop_front();
            }
            self.horizons_seen.push_back((horizon, Instant::now()));
        }
    }

    fn on_acked(&mut self, flushed: Lsn, summary: &mut SendSummary) {
        self.acked = self.acked.max(flushed);
        while let Some(&(lsn, seen)) = self.horizons_seen.front() {
            if lsn > flushed {
                break;
            }
            self.horizons_seen.pop_front();
            let h = summary
                .ack_latency_us
                .get_or_insert_with(|| hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"));
            let _ = h.record((seen.elapsed().as_micros() as u64).max(1));
        }
    }
}

/// Ships until done (`--once`: the receiver acknowledged the directory's end; follow mode: until
/// SIGTERM, then drains), reconnecting as needed.
pub fn run(cfg: &SendConfig, shutdown: Arc<AtomicBool>) -> Result<SendSummary, SendError> {
    run_with_metrics(cfg, shutdown, Arc::new(SenderMetrics::new()))
}

/// [`run`], publishing positions, lag and errors into `m` as it goes.
pub fn run_with_metrics(cfg: &SendConfig, shutdown: Arc<AtomicBool>, m: Arc<SenderMetrics>) -> Result<SendSummary, SendError> {
    cfg.validate()?;
    let mut source = open_source(cfg)?;
    m.set_horizon(source.horizon().0);
    let started = Instant::now();
    let mut summary = SendSummary::default();
    let mut progress = Progress {
        start_lsn: None,
        acked: Lsn(0),
        horizons_seen: Default::default(),
        last_report: Instant::now(),
    };
    let mut retry = Retry::new();
    loop {
        if shutdown.load(Ordering::Relaxed) && progress.start_lsn.is_none() {
            return Err(SendError::Interrupted { flushed: progress.acked });
        }
        let acked_before = progress.acked;
        let end = ship_once(cfg, &mut source, &shutdown, &mut summary, &mut progress, &m);
        m.on_disconnected();
        if progress.acked > acked_before {
            // A connection that made progress resets the retry clock and the backoff.
            retry = Retry::new();
        }
        match end {
            ConnEnd::Done => break,
            ConnEnd::TimelineSwitch => {
                source.apply_switch()?;
                // Positions on the new timeline start over at its first segment.
                progress.acked = Lsn(0);
                progress.horizons_seen.clear();
                retry.lost_at = Instant::now();
            }
            ConnEnd::Fatal(e) => {
                m.inc_error(error_kind(&e));
                return Err(e);
            }
            ConnEnd::Transient(why) => {
                m.inc_error(send_error::NETWORK);
                if shutdown.load(Ordering::Relaxed) {
                    return Err(SendError::Interrupted { flushed: progress.acked });
                }
                retry.wait(cfg.retry_for, why, &shutdown, &m)?;
            }
        }
    }
    summarize(&mut summary, &progress, source.first_lsn(), source.identity().seg_size, started);
    Ok(summary)
}

/// The directory at rest (walked to its first segment) or the live server.
fn open_source(cfg: &SendConfig) -> Result<Source, SendError> {
    let source: Source = match &cfg.live {
        None => {
            let mut dir = DirSource::open(&cfg.pg_wal)?;
            dir.walk_until(dir.first_lsn() + 1)?;
            Box::new(dir)
        }
        Some(live) => Box::new(LiveSource::open(live.clone())?),
    };
    let id = source.identity();
    info!(
        dir = %cfg.pg_wal.display(),
        system_id = id.system_id,
        timeline = id.tli,
        seg_size = id.seg_size,
        block_size = id.block_size,
        magic = format_args!("{:#06X}", id.magic),
        first = %source.first_lsn(),
        "source opened"
    );
    Ok(source)
}

/// The metric label of a fatal error.
fn error_kind(e: &SendError) -> &'static str {
    match e {
        SendError::Source(_) => send_error::SOURCE,
        SendError::Refused { .. } | SendError::ReceiverAhead { .. } | SendError::SlotAhead { .. } => send_error::REFUSED,
        _ => send_error::OTHER,
    }
}

/// Reconnecting after a transient end: backoff doubling to 5 s, for at most `retry_for` since
/// the last connection that made progress.
struct Retry {
    lost_at: Instant,
    backoff: Duration,
}

impl Retry {
    fn new() -> Retry {
        Retry { lost_at: Instant::now(), backoff: Duration::from_millis(100) }
    }

    fn wait(&mut self, retry_for: Duration, why: String, shutdown: &AtomicBool, m: &SenderMetrics) -> Result<(), SendError> {
        if self.lost_at.elapsed() > retry_for {
            return Err(SendError::GaveUp { retry_for, last: why });
        }
        m.inc_reconnects();
        warn!("{why}; retrying in {:?}", self.backoff);
        sleep_unless(self.backoff, shutdown);
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        Ok(())
    }
}

fn summarize(summary: &mut SendSummary, progress: &Progress, first: Lsn, seg_size: u64, started: Instant) {
    let start = progress.start_lsn.unwrap_or(first);
    summary.start_lsn = start;
    summary.end_lsn = progress.acked;
    summary.bytes = progress.acked - start.min(progress.acked);
    summary.segments = if summary.bytes == 0 { 0 } else { (progress.acked.0 - 1) / seg_size - start.0 / seg_size + 1 };
    summary.seconds = started.elapsed().as_secs_f64();
}

fn sleep_unless(d: Duration, shutdown: &AtomicBool) {
    let until = Instant::now() + d;
    while Instant::now() < until && !shutdown.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resolve(to: &str) -> Result<SocketAddr, SendError> {
    to.to_socket_addrs()
        .map_err(|e| SendError::Resolve { to: to.into(), why: e.to_string() })?
        .next()
        .ok_or_else(|| SendError::Resolve { to: to.into(), why: "no address".into() })
}

/// One connection: handshake, then stream until done or broken.
fn ship_once(
    cfg: &SendConfig,
    source: &mut Source,
    shutdown: &AtomicBool,
    summary: &mut SendSummary,
    progress: &mut Progress,
    m: &SenderMetrics,
) -> ConnEnd {
    let (link, peer) = match connect(cfg) {
        Ok(c) => c,
        Err(end) => return end,
    };
    summary.connections += 1;
    let resume = match greet(cfg, source, &link, &peer, progress) {
        Ok(r) => r,
        Err(end) => return end,
    };
    progress.start_lsn.get_or_insert(resume);
    progress.acked = resume;
    source.on_durable(resume);
    info!(peer = %peer, resume = %resume, horizon = %source.horizon(), "streaming from {resume}");
    m.on_connected(&peer);
    m.set_positions(resume.0, resume.0, resume.0);
    m.set_horizon(source.horizon().0);
    match stream_data(cfg, source, &link, &peer, resume, shutdown, summary, progress, m) {
        Ok(end) => end,
        Err(e) => ConnEnd::Fatal(e),
    }
}

/// TCP (and TLS) to the receiver; the link and the peer's address.
fn connect(cfg: &SendConfig) -> Result<(Link, String), ConnEnd> {
    let addr = resolve(&cfg.to).map_err(|e| ConnEnd::Transient(e.to_string()))?;
    let stream = TcpStream::connect_timeout(&addr, cfg.connect_timeout)
        .map_err(|e| ConnEnd::Transient(format!("cannot connect to receiver {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let link = match &cfg.tls {
        None => Link::Tcp(stream),
        Some(tls) => crate::tls::connect(stream, addr, tls, cfg.peer_timeout).map_err(|e| {
            if e.is_transient() {
                ConnEnd::Transient(e.to_string())
            } else {
                ConnEnd::Fatal(e.into())
            }
        })?,
    };
    Ok((link, addr.to_string()))
}

/// The handshake and the checks of where the receiver stands; returns where streaming resumes.
fn greet(cfg: &SendConfig, source: &mut Source, link: &Link, peer: &str, progress: &Progress) -> Result<Lsn, ConnEnd> {
    let welcome = match handshake(link, &hello(cfg, source), cfg.peer_timeout, cfg.auth.as_ref()) {
        Ok(w) => w,
        Err(HandshakeError::Refused(code, message)) => {
            let message = if matches!(code, ErrorCode::Gap) { explain_gap_at_slot(source, message) } else { message };
            return Err(if code.is_fatal() {
                ConnEnd::Fatal(SendError::Refused { peer: peer.into(), message })
            } else {
                ConnEnd::Transient(format!("receiver {peer} refused: {message}"))
            });
        }
        Err(HandshakeError::Io(e)) => return Err(ConnEnd::Transient(format!("handshake with {peer} failed: {e}"))),
    };
    let durable = Lsn(welcome.durable_lsn);
    let resume = if durable == Lsn(0) { source.first_lsn() } else { durable };
    if resume < progress.acked {
        warn!(
            peer = %peer,
            "receiver acknowledged {} as durable earlier but now holds only {resume}: its storage lost acknowledged WAL; re-sending from {resume}",
            progress.acked
        );
    }
    slot_covers(source, peer, resume).map_err(ConnEnd::Fatal)?;
    source.refresh(resume).map_err(|e| ConnEnd::Fatal(e.into()))?;
    if source.is_final() && source.horizon() < resume {
        return Err(ConnEnd::Fatal(SendError::ReceiverAhead { peer: peer.into(), receiver: resume, source_end: source.horizon() }));
    }
    Ok(resume)
}

fn hello(cfg: &SendConfig, source: &Source) -> Hello {
    let id = source.identity();
    Hello {
        protocol_version: wire::PROTOCOL_VERSION,
        page_magic: id.magic,
        timeline: id.tli,
        system_id: id.system_id,
        seg_size: id.seg_size as u32,
        block_size: id.block_size as u32,
        first_lsn: source.first_lsn().0,
        horizon_lsn: source.horizon().0.max(source.first_lsn().0),
        sender_name: cfg.name.clone(),
        history: source.history(),
    }
}

/// The slot must keep every byte the receiver still needs (from `resume` on): a slot ahead of
/// the receiver means WAL it needs may be recycled.
fn slot_covers(source: &Source, peer: &str, resume: Lsn) -> Result<(), SendError> {
    match source.slot_protects_from() {
        Some((slot, slot_from)) if resume < slot_from => {
            Err(SendError::SlotAhead { peer: peer.into(), receiver: resume, slot: slot.into(), slot_from })
        }
        _ => Ok(()),
    }
}

/// The receiver refused a gap: when shipping starts at the slot's segment (older WAL in pg_wal
/// is not protected), say why the sender starts there and what to do.
fn explain_gap_at_slot(source: &Source, message: String) -> String {
    match source.slot_protects_from() {
        Some((slot, from)) if source.first_lsn() == from => format!(
            "{message}. walship starts at {from} because replication slot {slot} keeps WAL only from there: WAL before \
             it is not protected from recycling and is not shipped. The receiver's directory is not the one this slot \
             served, or it lost WAL: give the receiver the directory that holds WAL up to {from}, or start an empty \
             receiver directory (shipping then starts at the slot) with a new base backup"
        ),
        _ => message,
    }
}

enum HandshakeError {
    Refused(ErrorCode, String),
    Io(String),
}

fn handshake(
    stream: &Link,
    hello: &Hello,
    timeout: Duration,
    auth: Option<&crate::auth::AuthKey>,
) -> Result<wire::Welcome, HandshakeError> {
    let mut bytes = Vec::new();
    Message::Hello(hello.clone()).encode(&mut bytes);
    stream.set_timeouts(Some(timeout));
    (&*stream).write_all(&bytes).map_err(|e| HandshakeError::Io(e.to_string()))?;
    let mut proof = AuthExchange { key: auth, hello_body: bytes[FRAME_HEADER_LEN..].to_vec(), answered: None, receiver_proved: false };
    let mut decoder = Decoder::new(Limits::default());
    let mut buf = [0u8; 4096];
    loop {
        match decoder.next_message() {
            Ok(Some(Message::Auth(a))) => proof.on_auth(&a, stream)?,
            Ok(Some(Message::Welcome(w))) => {
                proof.check_done()?;
                wire::check_version(w.protocol_version).map_err(|e| HandshakeError::Refused(ErrorCode::Protocol, e.to_string()))?;
                if w.system_id != 0 && w.system_id != hello.system_id {
                    return Err(HandshakeError::Refused(
                        ErrorCode::Identity,
                        format!("receiver holds system {} but this source is system {}", w.system_id, hello.system_id),
                    ));
                }
                return Ok(w);
            }
            Ok(Some(Message::Error(e))) => return Err(HandshakeError::Refused(e.code, e.message)),
            Ok(Some(other)) => {
                return Err(HandshakeError::Refused(ErrorCode::Protocol, format!("expected Welcome, got {}", other.kind())))
            }
            // Read only once every whole message already received has been taken: the receiver
            // sends its proof and the Welcome back to back, often in one segment.
            Ok(None) => {
                let n = (&*stream).read(&mut buf).map_err(|e| HandshakeError::Io(e.to_string()))?;
                if n == 0 {
                    return Err(HandshakeError::Io("receiver closed the connection during the handshake".into()));
                }
                decoder.feed(&buf[..n]);
            }
            Err(e) => return Err(HandshakeError::Refused(ErrorCode::Protocol, e.to_string())),
        }
    }
}

/// The sender's half of the mutual authentication: answer the receiver's challenge, then check
/// its proof.
struct AuthExchange<'a> {
    key: Option<&'a crate::auth::AuthKey>,
    /// The Hello as sent, which the response's MAC covers.
    hello_body: Vec<u8>,
    /// (our nonce, the receiver's nonce) once we answered its challenge.
    answered: Option<([u8; wire::AUTH_NONCE_LEN], [u8; wire::AUTH_NONCE_LEN])>,
    receiver_proved: bool,
}

impl AuthExchange<'_> {
    fn on_auth(&mut self, a: &wire::Auth, stream: &Link) -> Result<(), HandshakeError> {
        let refuse = |why: String| Err(HandshakeError::Refused(ErrorCode::Auth, why));
        match (a.step, self.key) {
            (wire::AuthStep::Challenge, None) => {
                refuse("the receiver requires authentication: give the sender the receiver's key with --auth-key-file".into())
            }
            (wire::AuthStep::Challenge, Some(key)) if self.answered.is_none() => {
                let nonce_s = crate::auth::nonce().map_err(|e| HandshakeError::Io(e.to_string()))?;
                let mac = key.sender_mac(&a.nonce, &nonce_s, &self.hello_body);
                let mut out = Vec::new();
                Message::Auth(wire::Auth { step: wire::AuthStep::Response, nonce: nonce_s, mac }).encode(&mut out);
                (&*stream).write_all(&out).map_err(|e| HandshakeError::Io(e.to_string()))?;
                self.answered = Some((nonce_s, a.nonce));
                Ok(())
            }
            (wire::AuthStep::Proof, Some(key)) if self.answered.is_some() => {
                let (nonce_s, nonce_r) = self.answered.expect("answered");
                if !key.verify_receiver(&nonce_s, &nonce_r, &a.mac) {
                    return refuse("the receiver failed to prove it knows the key (wrong --auth-key-file, or not the receiver you meant)".into());
                }
                self.receiver_proved = true;
                Ok(())
            }
            (step, _) => refuse(format!("unexpected authentication step {step:?} from the receiver")),
        }
    }

    /// A Welcome arrived: with a key, the receiver must have proved it knows it.
    fn check_done(&self) -> Result<(), HandshakeError> {
        if self.key.is_some() && !self.receiver_proved {
            return Err(HandshakeError::Refused(
                ErrorCode::Auth,
                "the receiver did not authenticate itself (is it running with --insecure-no-auth?); this sender has \
                 --auth-key-file and ships only to a receiver that proves it knows the key"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What the source knows that decides how the connection ends.
fn facts(source: &Source) -> SourceFacts {
    SourceFacts {
        horizon: source.horizon(),
        is_final: source.is_final(),
        switch_point: source.switch_point(),
        corrupt_end: source.corrupt_end(),
    }
}

/// One streaming connection's io state: the ring, what is in flight on it, and the pure sender
/// machine whose decisions it carries out. Dropping it drops the ring, which cancels whatever is
/// still in flight (the poller's eventfd read too) and waits for the kernel to let go.
struct Streaming<'a> {
    cfg: &'a SendConfig,
    link: &'a Link,
    peer: &'a str,
    core: Sender,
    checker: PageChecker,
    ring: Ring,
    fd: std::os::fd::RawFd,
    wake_fd: Option<std::os::fd::RawFd>,
    zero_copy: bool,
    decoder: Decoder,
    send_in_flight: bool,
    recv_in_flight: bool,
    wake_in_flight: bool,
    completions: Vec<Completion>,
    plans: Vec<FramePlan>,
    frames_per_batch: usize,
    shutdown_logged: Option<Lsn>,
    /// The source's `.backup` files this connection shipped (see `source::backups`).
    backups: source::backups::BackupShipper,
}

/// Streams from `resume` until the connection ends; the end is [`Sender::connection_end`]'s
/// decision, a broken connection, or a receiver's error.
#[allow(clippy::too_many_arguments)]
fn stream_data(
    cfg: &SendConfig,
    source: &mut Source,
    link: &Link,
    peer: &str,
    resume: Lsn,
    shutdown: &AtomicBool,
    summary: &mut SendSummary,
    progress: &mut Progress,
    m: &SenderMetrics,
) -> Result<ConnEnd, SendError> {
    let mut conn = Streaming::open(cfg, source, link, peer, resume)?;
    let live = cfg.live.is_some();
    loop {
        if shutdown.load(Ordering::Relaxed) && conn.core.begin_drain(Instant::now()) {
            conn.start_drain(source)?;
        }
        // Move the horizon: keep the directory walk a segment ahead; ask a live server.
        if !conn.core.is_draining() && !source.is_final() {
            source.refresh(conn.core.sent() + source.identity().seg_size)?;
            m.set_horizon(source.horizon().0);
            if live {
                progress.observe_horizon(source.horizon());
            }
        }
        if let Some(rule) = conn.core.connection_end(&facts(source), Instant::now()) {
            return Ok(conn.end(rule, source));
        }
        conn.log_state(source, progress);
        conn.arm_reads();
        conn.send_next(source, summary, m)?;
        conn.wait(source)?;
        if let Some(end) = conn.take_completions(source, summary, progress, m) {
            return Ok(end);
        }
    }
}

impl<'a> Streaming<'a> {
    fn open(cfg: &'a SendConfig, source: &Source, link: &'a Link, peer: &'a str, resume: Lsn) -> Result<Streaming<'a>, SendError> {
        link.set_timeouts(None);
        let id = source.identity();
        let frame_bytes = cfg.frame_bytes.min(id.seg_size);
        let limits = SenderLimits { frame_bytes, in_flight_bytes_max: cfg.in_flight_bytes_max, seg_size: id.seg_size };
        let rules = EndRules { live: cfg.live.is_some(), shutdown_timeout: cfg.shutdown_timeout, peer_timeout: cfg.peer_timeout };
        let ring = Ring::new(64, BufferPool::new(1, 4096).map_err(|e| RingError::Io { op: "pool", source: e })?, 2, ACK_BUF_BYTES)?;
        let zero_copy = zero_copy_on(cfg.zero_copy, link, ring.capabilities().sendmsg_zc);
        Ok(Streaming {
            cfg,
            link,
            peer,
            core: Sender::with_end_rules(limits, resume, rules, Instant::now()),
            checker: PageChecker::new(id),
            ring,
            fd: link.as_raw_fd(),
            wake_fd: source.wake_fd(),
            zero_copy,
            decoder: Decoder::new(Limits::default()),
            send_in_flight: false,
            recv_in_flight: false,
            wake_in_flight: false,
            completions: Vec::new(),
            plans: Vec::new(),
            frames_per_batch: ((crate::uring::IOV_MAX / 2) as u64).min(cfg.send_batch_bytes_max / frame_bytes.max(1) + 2) as usize,
            shutdown_logged: None,
            backups: Default::default(),
        })
    }

    /// A shutdown began: live, ship up to the horizon as it is now (walsender's rule), then go.
    fn start_drain(&mut self, source: &mut Source) -> Result<(), SendError> {
        if self.cfg.live.is_some() {
            source.refresh(self.core.sent())?;
            info!(horizon = %source.horizon(), "SIGTERM: shipping up to the current horizon {} and waiting for the ack", source.horizon());
        } else {
            info!("interrupted: waiting for the receiver to acknowledge what was sent");
        }
        Ok(())
    }

    /// Carries out the end the sender machine decided.
    fn end(self, rule: ConnEndRule, source: &mut Source) -> ConnEnd {
        let flushed = self.core.flushed();
        match rule {
            ConnEndRule::Done => {
                self.link.shutdown();
                ConnEnd::Done
            }
            ConnEndRule::Interrupted { drained } => {
                if drained {
                    self.link.shutdown();
                }
                ConnEnd::Fatal(SendError::Interrupted { flushed })
            }
            ConnEndRule::TimelineSwitch { switch } => {
                info!(switch = %switch, "the receiver holds this timeline up to its switch point; reconnecting on the new timeline");
                self.link.shutdown();
                ConnEnd::TimelineSwitch
            }
            ConnEndRule::CorruptEnd { .. } => ConnEnd::Fatal(source.take_corruption().expect("corruption described").into()),
            ConnEndRule::PeerSilent { unacked_bytes } => ConnEnd::Transient(format!(
                "receiver {} acknowledged nothing for {:?} with {unacked_bytes} bytes outstanding",
                self.peer, self.cfg.peer_timeout
            )),
        }
    }

    /// The periodic "following" line and the one line when the server's shutdown WAL is durable.
    fn log_state(&mut self, source: &Source, progress: &mut Progress) {
        let flushed = self.core.flushed();
        if let Some(ServerState::ShutDown { checkpoint, end }) = source.server_state() {
            if flushed >= end && self.shutdown_logged != Some(end) {
                self.shutdown_logged = Some(end);
                info!(
                    checkpoint = %checkpoint,
                    "the receiver holds the server's WAL durably through its shutdown checkpoint (up to {end}); waiting for the server to come back"
                );
            }
        }
        if self.cfg.live.is_some() && progress.last_report.elapsed() > Duration::from_secs(10) {
            progress.last_report = Instant::now();
            info!(
                sent = %self.core.sent(),
                written = %self.core.written(),
                flushed = %flushed,
                horizon = %source.horizon(),
                lag_bytes = source.horizon() - flushed.min(source.horizon()),
                "following"
            );
        }
    }

    /// Keeps one read of acks (and one of the poller's eventfd) in flight.
    fn arm_reads(&mut self) {
        if !self.recv_in_flight {
            self.ring.recv_ctl(self.fd, TAG_RECV, CTL_ACKS, ACK_BUF_BYTES.min(self.decoder.room().max(1)), false);
            self.recv_in_flight = true;
        }
        if let (Some(wake), false) = (self.wake_fd, self.wake_in_flight) {
            self.ring.read_ctl(wake, TAG_WAKE, CTL_WAKE, 8);
            self.wake_in_flight = true;
        }
    }

    /// With no send in flight, plans the next frames up to the horizon and sends them.
    fn send_next(&mut self, source: &mut Source, summary: &mut SendSummary, m: &SenderMetrics) -> Result<(), SendError> {
        if self.send_in_flight {
            return Ok(());
        }
        // Hook: a new `.backup` file of the source goes out as one frame before the next data batch.
        let source_dir = || source.segment_path(Lsn(0)).parent().map(std::path::Path::to_path_buf).unwrap_or_default();
        if let Some(frame) = self.backups.next_frame(source_dir, source.identity().seg_size) {
            self.ring.send_batch(self.fd, TAG_SEND, frame, false);
            self.send_in_flight = true;
            return Ok(());
        }
        self.plans.clear();
        self.core.plan(source.horizon(), self.cfg.send_batch_bytes_max, self.frames_per_batch, &mut self.plans);
        if self.plans.is_empty() {
            return Ok(());
        }
        let batch = build_batch(source, &mut self.checker, &self.plans)?;
        let zc = self.zero_copy && batch.len_bytes() as u64 >= self.cfg.zero_copy_bytes_min;
        if zc {
            summary.zero_copy_sends += 1;
        }
        self.ring.send_batch(self.fd, TAG_SEND, batch, zc);
        self.send_in_flight = true;
        m.add_bytes_sent(self.plans.iter().map(|p| p.len).sum());
        m.set_positions(self.core.sent().0, self.core.written().0, self.core.flushed().0);
        source.release_below(self.core.flushed());
        self.checker.forget_below(self.core.flushed().0 / source.identity().seg_size);
        Ok(())
    }

    fn wait(&mut self, source: &Source) -> Result<(), SendError> {
        let wait = if self.send_in_flight { Duration::from_millis(100) } else { source.wait_hint().min(Duration::from_millis(100)) };
        self.ring.submit_and_wait(Some(wait))?;
        self.completions.clear();
        self.ring.drain(&mut self.completions);
        Ok(())
    }

    /// Takes in what completed; returns how the connection ends when a completion ends it.
    fn take_completions(&mut self, source: &mut Source, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) -> Option<ConnEnd> {
        // By index: the Vec keeps its capacity from one wait to the next (no allocation per turn).
        for i in 0..self.completions.len() {
            let c = self.completions[i];
            match (c.tag, c.kind) {
                (TAG_SEND, CompletionKind::Done) => {
                    self.send_in_flight = false;
                    if c.result < 0 {
                        let e = std::io::Error::from_raw_os_error(-c.result);
                        return Some(ConnEnd::Transient(format!("send to {} failed: {e}", self.peer)));
                    }
                }
                (TAG_SEND, CompletionKind::ZeroCopyNotification { copied: true }) => summary.zero_copy_copied += 1,
                // The loop's next turn takes in what the poller learned.
                (TAG_WAKE, _) => self.wake_in_flight = false,
                (TAG_RECV, _) => {
                    self.recv_in_flight = false;
                    if c.result <= 0 {
                        let why = if c.result == 0 {
                            "receiver closed the connection".to_string()
                        } else {
                            std::io::Error::from_raw_os_error(-c.result).to_string()
                        };
                        return Some(ConnEnd::Transient(format!("connection to {} lost: {why}", self.peer)));
                    }
                    self.decoder.feed(&self.ring.ctl(CTL_ACKS)[..c.result as usize]);
                    if let Some(end) = self.take_messages(source, summary, progress, m) {
                        return Some(end);
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Every whole message the receiver sent: acks move the machine; anything else ends the
    /// connection.
    fn take_messages(&mut self, source: &mut Source, summary: &mut SendSummary, progress: &mut Progress, m: &SenderMetrics) -> Option<ConnEnd> {
        let refused = |message: String| Some(ConnEnd::Fatal(SendError::Refused { peer: self.peer.into(), message }));
        loop {
            match self.decoder.next_message() {
                Ok(Some(Message::Ack(ack))) => match self.core.on_ack_at(Lsn(ack.written_lsn), Lsn(ack.flushed_lsn), Instant::now()) {
                    Ok(advanced) => {
                        m.on_ack(self.core.sent().0, self.core.written().0, self.core.flushed().0);
                        if advanced {
                            progress.on_acked(self.core.flushed(), summary);
                            source.on_durable(self.core.flushed());
                        }
                    }
                    Err(e) => return refused(format!("protocol violation: {e}")),
                },
                Ok(Some(Message::Keepalive(_))) => {}
                Ok(Some(Message::Error(e))) if e.code.is_fatal() => return refused(e.message),
                Ok(Some(Message::Error(e))) => return Some(ConnEnd::Transient(format!("receiver {} gave up: {}", self.peer, e.message))),
                Ok(Some(other)) => return refused(format!("unexpected {} frame during streaming", other.kind())),
                Ok(None) => return None,
                Err(e) => return refused(format!("bad frame: {e}")),
            }
        }
    }
}

/// Whether sends go zero-copy: never through TLS (every byte is encrypted into a new buffer) or
/// without kernel support; `auto`: only to a peer off this host.
fn zero_copy_on(setting: ZeroCopy, link: &Link, kernel_has_zc: bool) -> bool {
    if setting == ZeroCopy::On && link.is_tls() {
        info!("--zero-copy on has no effect with TLS: every byte is encrypted into a new buffer");
    } else if setting == ZeroCopy::On && !kernel_has_zc {
        warn!("--zero-copy on, but this kernel's io_uring lacks SENDMSG_ZC: sending with plain sendmsg");
    }
    let wanted = match setting {
        ZeroCopy::Off => false,
        ZeroCopy::On => true,
        ZeroCopy::Auto => !link.peer_is_loopback(),
    };
    wanted && kernel_has_zc && !link.is_tls()
}

/// Frames as header + payload iovecs straight from the segment maps; each header carries the
/// payload's CRC32C. Pages are re-checked first (a live server may have recycled the file).
fn build_batch(source: &mut Source, checker: &mut PageChecker, plans: &[FramePlan]) -> Result<SendBatch, SendError> {
    let seg_size = source.identity().seg_size;
    let mut batch = SendBatch::new(plans.len() * FRAME_HEADER_LEN);
    for plan in plans {
        let map = source.map_for(plan.lsn)?;
        let padding = match checker.check(&map, plan.lsn, plan.len) {
            Ok(pages::PagesOk::AllValid) => false,
            Ok(pages::PagesOk::SwitchPadding) => true,
            Err((page, e)) => {
                return Err(SendError::Source(SourceError::Recycled {
                    path: source.segment_path(plan.lsn),
                    lsn: page,
                    why: format!("{e}; the file no longer holds the WAL written there (recycled by the server?)"),
                }))
            }
        };
        let offset = (plan.lsn.0 % seg_size) as usize;
        let payload = &map.bytes()[offset..offset + plan.len as usize];
        let mut header = FrameHeader::data(plan.lsn.0, payload);
        if padding {
            header.flags |= wire::DATA_FLAG_SWITCH_PADDING;
        }
        batch.push_small(&header.encode());
        batch.push_map(&map, offset, plan.len as usize);
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn hello() -> Hello {
        Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            page_magic: 0xD110,
            timeline: 1,
            system_id: 7,
            seg_size: 16 << 20,
            block_size: 8192,
            first_lsn: 16 << 20,
            horizon_lsn: 32 << 20,
            sender_name: "t".into(),
            history: String::new(),
        }
    }

    /// The receiver answers the sender's response with its proof and the Welcome in one write and
    /// then sends nothing more (until its first status ack, a second later): the handshake must take
    /// the Welcome it already holds instead of waiting for more bytes. (It used to wait: every
    /// authenticated connection lost a second.)
    #[test]
    fn authenticated_handshake_takes_a_welcome_that_arrived_with_the_proof() {
        let key = crate::auth::AuthKey::from_bytes(b"a shared key of enough bytes");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver_key = key.clone();
        let receiver = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut decoder = Decoder::new(Limits::default());
            let mut next = |s: &mut TcpStream| loop {
                if let Some(m) = decoder.next_message().unwrap() {
                    return m;
                }
                let mut buf = [0u8; 4096];
                let n = s.read(&mut buf).unwrap();
                assert!(n > 0, "sender hung up");
                decoder.feed(&buf[..n]);
            };
            let Message::Hello(_) = next(&mut s) else { panic!("expected Hello") };
            let nonce_r = [3u8; wire::AUTH_NONCE_LEN];
            let mut out = Vec::new();
            Message::Auth(wire::Auth { step: wire::AuthStep::Challenge, nonce: nonce_r, mac: [0; wire::AUTH_MAC_LEN] }).encode(&mut out);
            s.write_all(&out).unwrap();
            let Message::Auth(response) = next(&mut s) else { panic!("expected the response") };
            let mut out = Vec::new();
            let proof = receiver_key.receiver_mac(&response.nonce, &nonce_r);
            Message::Auth(wire::Auth { step: wire::AuthStep::Proof, nonce: [0; wire::AUTH_NONCE_LEN], mac: proof }).encode(&mut out);
            Message::Welcome(wire::Welcome { protocol_version: wire::PROTOCOL_VERSION, timeline: 1, system_id: 7, durable_lsn: 0 }).encode(&mut out);
            s.write_all(&out).unwrap();
            std::thread::sleep(Duration::from_secs(3)); // silent, connection open
        });
        let link = Link::Tcp(TcpStream::connect(addr).unwrap());
        let started = Instant::now();
        let welcome = handshake(&link, &hello(), Duration::from_secs(2), Some(&key));
        assert!(matches!(welcome, Ok(ref w) if w.system_id == 7), "handshake did not take the Welcome it held");
        assert!(started.elapsed() < Duration::from_secs(2));
        receiver.join().unwrap();
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn good() -> SendConfig {
        SendConfig {
            pg_wal: PathBuf::from("/nonexistent"),
            to: "archive.example:5499".into(),
            once: true,
            retry_for: Duration::from_secs(30),
            zero_copy: ZeroCopy::Auto,
            frame_bytes: 1 << 20,
            in_flight_bytes_max: 128 << 20,
            send_batch_bytes_max: 8 << 20,
            zero_copy_bytes_min: 64 << 10,
            peer_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            name: "test".into(),
            live: None,
            shutdown_timeout: Duration::from_secs(30),
            auth: None,
            tls: None,
        }
    }

    type Break = fn(&mut SendConfig);

    #[test]
    fn the_defaults_are_valid_and_each_broken_limit_is_named() {
        good().validate().unwrap();
        let cases: Vec<(Break, &str)> = vec![
            (|c| c.frame_bytes = 3 << 20, "--frame-bytes"),
            (|c| c.frame_bytes = 32 << 20, "--frame-bytes"),
            (|c| c.in_flight_bytes_max = 512 << 10, "--in-flight-bytes-max"),
            (|c| c.send_batch_bytes_max = 512 << 10, "--send-batch-bytes-max"),
            (|c| c.peer_timeout = Duration::ZERO, "--peer-timeout"),
            (|c| c.to = "nonsense".into(), "--to"),
            (|c| c.to = "host:99999".into(), "--to"),
            (|c| c.to = "host:0".into(), "--to"),
            (|c| c.to = ":5499".into(), "--to"),
            (|c| c.to = "::1:5499".into(), "--to"),
        ];
        for (breaks, flag) in cases {
            let mut c = good();
            breaks(&mut c);
            let err = c.validate().expect_err(flag).to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
        for to in ["[::1]:5499", "10.0.0.2:1", "a:65535"] {
            assert_eq!(check_host_port(to), Ok(()), "{to}");
        }
    }
}
