//! `walship recv`: accepts one sender at a time and carries out the receiver state machine's
//! actions with io_uring (socket receives, O_DIRECT writes, fdatasync, acks).
pub mod dir_lock;
pub mod flusher;
pub mod from_pg;
pub mod published;
pub mod receiver;
pub mod retention;
pub mod segment_file;
pub mod session;
pub mod spares;
pub mod stats;

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use crate::metrics::{recv_error, RecvMetrics};
use crate::tls::{Link, TlsServer};
use crate::uring::{BufferPool, Completion, Ring, RingError};
use crate::wal::{Lsn, WalIdentity};
use crate::wire::{
    self, Ack, ErrorCode, ErrorFrame, FrameHeader, Hello, Limits, Message, Welcome, FRAME_HEADER_LEN,
};
use flusher::{FlushPolicy, SyncTarget};
use receiver::{Action, Receiver, ReceiverConfig, ReceiverError};
use dir_lock::{DirLock, LockError};
use segment_file::{recover_dir, DirError, DirState, FileAccess, SegmentDir, SegmentFile};
use session::{ConnPhase, HeaderStep, Refusal, StreamStart};
use spares::{SpareError, SpareRefill, Spares};
pub use stats::{RecvStats, RecvSummary};

/// Everything `walship recv` needs, validated.
#[derive(Debug, Clone)]
pub struct RecvConfig {
    pub listen: SocketAddr,
    pub dir: PathBuf,
    /// Bytes per buffer slot (and per O_DIRECT write of a full chunk).
    pub chunk_bytes: u64,
    /// Bytes of buffer pool: bounds what is received but not yet written.
    pub in_flight_bytes_max: u64,
    pub fsync_batch_bytes: u64,
    pub fsync_interval_us: u64,
    pub fsync_batches_in_flight_max: usize,
    /// Largest data frame body accepted.
    pub frame_bytes_max: u32,
    /// Drop a sender that sends nothing for this long.
    pub peer_timeout: Duration,
    /// Send a status ack at least this often.
    pub status_interval: Duration,
    /// Shared key senders must prove they know (None: `--insecure-no-auth`).
    pub auth: Option<crate::auth::AuthKey>,
    /// Require TLS from senders (None: plain TCP).
    pub tls: Option<TlsServer>,
    /// Write through the page cache instead of O_DIRECT (for comparison; fdatasync either way).
    pub write_buffered: bool,
    /// Pre-zeroed spare segment files kept ready (0: off; at most `spares::SPARE_SEGMENTS_MAX`).
    pub spare_segments: usize,
    /// When spares are zeroed.
    pub spare_refill: SpareRefill,
    /// Mode and group of the files the receiver creates.
    pub access: FileAccess,
    /// `--archive-to`: upload complete segments and history files (None: no archive).
    pub archive: Option<crate::archive::ArchiveConfig>,
    /// `--keep-local`: delete archived segments beyond a policy (None: keep everything).
    pub retention: Option<retention::RetentionConfig>,
    /// `--serve-replication`: serve PostgreSQL standbys from this directory (None: no hub).
    pub hub: Option<crate::hub::HubConfig>,
}

/// A [`RecvConfig`] that cannot work, named by the flag that sets it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--{flag} must be a power of two between {min} and {max} bytes, got {value}")]
    NotPowerOfTwoInRange { flag: &'static str, value: u64, min: u64, max: u64 },
    #[error("--{flag} must be between {min} and {max}, got {value}")]
    OutOfRange { flag: &'static str, value: u64, min: u64, max: u64 },
    #[error("--in-flight-bytes-max ({value}) must hold at least 4 chunks of --chunk-bytes ({needed} bytes)")]
    PoolTooSmall { value: u64, needed: u64 },
    #[error("--frame-bytes-max ({value}) must be at most half of --in-flight-bytes-max ({pool})")]
    FrameLargerThanHalfThePool { value: u64, pool: u64 },
    #[error("--{flag} must be longer than zero")]
    ZeroDuration { flag: &'static str },
    #[error("--file-mode {mode:o}: only permission bits, and at least 0600 (the receiver reads and writes its files)")]
    FileMode { mode: u32 },
    #[error(transparent)]
    Hub(#[from] crate::hub::HubConfigError),
}

/// `--frame-bytes-max`: at least the smallest sender frame (64 KiB), at most the wire format's ceiling.
pub fn check_frame_bytes_max(value: u64) -> Result<(), ConfigError> {
    let (min, max) = (64 << 10, u64::from(wire::DATA_BODY_BYTES_MAX_LIMIT));
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange { flag: "frame-bytes-max", value, min, max })
    }
}

/// `--file-mode`: permission bits only, and the receiver itself must read and write its files.
pub fn check_file_mode(mode: u32) -> Result<(), ConfigError> {
    if mode > 0o777 || mode & 0o600 != 0o600 {
        return Err(ConfigError::FileMode { mode });
    }
    Ok(())
}

impl RecvConfig {
    /// Checks every limit and how they fit together; `run` refuses a config that fails.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let pow2 = |flag, value: u64, min: u64, max: u64| {
            if value.is_power_of_two() && (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::NotPowerOfTwoInRange { flag, value, min, max })
            }
        };
        let range = |flag, value: u64, min: u64, max: u64| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange { flag, value, min, max })
            }
        };
        pow2("chunk-bytes", self.chunk_bytes, 64 << 10, 16 << 20)?;
        if self.in_flight_bytes_max < 4 * self.chunk_bytes {
            return Err(ConfigError::PoolTooSmall { value: self.in_flight_bytes_max, needed: 4 * self.chunk_bytes });
        }
        let frame_bytes_max = u64::from(self.frame_bytes_max);
        check_frame_bytes_max(frame_bytes_max)?;
        if frame_bytes_max > self.in_flight_bytes_max / 2 {
            return Err(ConfigError::FrameLargerThanHalfThePool { value: frame_bytes_max, pool: self.in_flight_bytes_max });
        }
        range("fsync-batches-in-flight-max", self.fsync_batches_in_flight_max as u64, 1, 64)?;
        range("fsync-batch-bytes", self.fsync_batch_bytes, 1, 1 << 40)?;
        range("spare-segments", self.spare_segments as u64, 0, spares::SPARE_SEGMENTS_MAX as u64)?;
        if self.peer_timeout.is_zero() {
            return Err(ConfigError::ZeroDuration { flag: "peer-timeout" });
        }
        if self.status_interval.is_zero() {
            return Err(ConfigError::ZeroDuration { flag: "status-interval" });
        }
        if let Some(hub) = &self.hub {
            hub.validate()?;
        }
        check_file_mode(self.access.file_mode)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("invalid receiver configuration: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ring(#[from] RingError),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error(
        "fdatasync of {path} failed: {source}. This is fatal and is not retried (the kernel may have dropped \
         the dirty pages); nothing past {flushed} was acknowledged, the sender still holds it, and a restart \
         resumes from there"
    )]
    FsyncFailed { path: PathBuf, flushed: Lsn, source: std::io::Error },
    #[error("write to {path} at offset {offset} failed: {reason}; nothing past {flushed} was acknowledged")]
    WriteFailed { path: PathBuf, offset: u64, flushed: Lsn, reason: String },
    #[error(transparent)]
    Spare(#[from] SpareError),
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot create the receiver directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Archive(#[from] crate::archive::ArchiveError),
    #[error("cannot start local retention: {0}")]
    Retention(#[source] std::io::Error),
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
    #[error("invalid --from-postgres configuration: {0}")]
    FromPostgresConfig(String),
    #[error("cannot start the replication client: {0}")]
    FromPostgresStart(#[source] std::io::Error),
    /// The replication client stopped for good (after the receiver made what it got durable).
    #[error("{0}")]
    FromPostgres(String),
}

/// CRC-32C of the bytes of the segment being received, from its start to each frame end, so the
/// durable LSN can be published with the CRC of everything before it in its segment. Recovery
/// trusts a published LSN inside a `.partial` only when the file's bytes still match that CRC.
#[derive(Debug)]
struct SegmentCrc {
    seg_size: u64,
    /// LSN up to which `crc` covers the segment holding it.
    end: Lsn,
    crc: u32,
    /// (frame end, CRC of its segment up to there), oldest first.
    marks: VecDeque<(Lsn, u32)>,
}

impl SegmentCrc {
    fn new(seg_size: u64, end: Lsn, crc: u32) -> SegmentCrc {
        let seg_size = seg_size.max(1);
        SegmentCrc { seg_size, end, crc, marks: VecDeque::from([(end, crc)]) }
    }

    fn set_seg_size(&mut self, seg_size: u64) {
        self.seg_size = seg_size;
    }

    fn reset(&mut self, end: Lsn) {
        self.end = end;
        self.crc = 0;
        self.marks = VecDeque::from([(end, 0)]);
    }

    /// Continues the running CRC over `bytes` at `lsn` (a second pass over them: with the
    /// hardware CRC that costs less than `crc32c_combine`, whose shift by the piece length is a
    /// slow matrix power: 73 us against 53 us for a whole pass over 1 MiB here).
    fn extend(&mut self, lsn: Lsn, bytes: &[u8]) {
        if lsn.0 % self.seg_size == 0 {
            self.crc = 0;
        } else {
            debug_assert_eq!(lsn, self.end, "pieces are contiguous");
        }
        self.crc = crc32c::crc32c_append(self.crc, bytes);
        self.end = lsn + bytes.len() as u64;
    }

    /// Continues the running CRC over `len` bytes at `lsn` whose own CRC-32C (`crc`, e.g. the
    /// frame CRC just verified) is known, without a second pass over them: a segment start
    /// restarts the CRC, otherwise the two are combined ([`crc32c_combine`], about 1 us).
    fn extend_known(&mut self, lsn: Lsn, len: u64, crc: u32) {
        if lsn.0 % self.seg_size == 0 {
            self.crc = crc;
        } else {
            debug_assert_eq!(lsn, self.end, "pieces are contiguous");
            self.crc = crc32c_combine(self.crc, crc, len);
        }
        self.end = lsn + len;
    }

    fn mark(&mut self) {
        if self.marks.len() >= 65_536 {
            self.marks.pop_front();
        }
        self.marks.push_back((self.end, self.crc));
    }

    /// The CRC at `flushed` (always a frame end); marks below it are dropped.
    fn crc_at(&mut self, flushed: Lsn) -> Option<u32> {
        while self.marks.len() > 1 && self.marks[1].0 <= flushed {
            self.marks.pop_front();
        }
        self.marks.front().filter(|&&(lsn, _)| lsn == flushed).map(|&(_, crc)| crc)
    }
}

/// CRC-32C's polynomial, bit-reflected.
const CRC32C_POLY_REFLECTED: u32 = 0x82F6_3B78;

/// a(x) * b(x) mod P(x), both reflected (bit 31 is x^0).
fn crc32c_mul_mod(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut m = 1u32 << 31;
    while m != 0 {
        if a & m != 0 {
            product ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 { (b >> 1) ^ CRC32C_POLY_REFLECTED } else { b >> 1 };
    }
    product
}

/// x^(2^n) mod P(x) for n = 0..32, reflected.
static CRC32C_X2N: std::sync::LazyLock<[u32; 32]> = std::sync::LazyLock::new(|| {
    let mut table = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    for entry in table.iter_mut() {
        *entry = p;
        p = crc32c_mul_mod(p, p);
    }
    table
});

/// CRC-32C of A followed by B from CRC(A), CRC(B) and B's length (zlib's `crc32_combine` method:
/// shift CRC(A) by `len_b` zero bytes, i.e. multiply by x^(8 len_b) mod P, then add CRC(B)).
/// At most 61 small multiplications, against a whole pass over B's bytes.
fn crc32c_combine(crc_a: u32, crc_b: u32, len_b: u64) -> u32 {
    let mut shift = 1u32 << 31; // x^0
    let mut n = len_b;
    let mut k = 3; // bytes -> bits
    while n != 0 {
        if n & 1 != 0 {
            shift = crc32c_mul_mod(CRC32C_X2N[k & 31], shift);
        }
        n >>= 1;
        k += 1;
    }
    crc32c_mul_mod(shift, crc_a) ^ crc_b
}

const TAG_ACCEPT: u64 = 1 << 56;
const TAG_RECV_HEADER: u64 = 2 << 56;
const TAG_RECV_BODY: u64 = 3 << 56;
const TAG_RECV_PIECE: u64 = 4 << 56;
const TAG_WRITE: u64 = 5 << 56;
const TAG_FSYNC: u64 = 6 << 56;
const TAG_SEND: u64 = 7 << 56;
const TAG_KIND_MASK: u64 = 0xFF << 56;
/// Control buffer for headers and control bodies.
const CTL: usize = 0;

fn now_us(epoch: Instant) -> u64 {
    epoch.elapsed().as_micros() as u64
}

fn unix_time_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

struct Conn {
    stream: Link,
    peer: SocketAddr,
    phase: ConnPhase,
    /// A receive on the socket is in flight.
    recv_pending: bool,
    /// Bytes that receive must deliver (MSG_WAITALL): fewer means the peer closed mid-frame.
    recv_len: usize,
    send_pending: bool,
    send_queue: VecDeque<Vec<u8>>,
    /// Latest ack not yet sent (acks coalesce).
    ack_pending: Option<(Lsn, Lsn)>,
    last_heard: Instant,
    last_status: Instant,
    /// Closing: no new receives; wait for in-flight socket operations, then drop.
    closing: bool,
    /// While authenticating: our nonce, and the Hello (with its body bytes) it answers.
    auth_pending: Option<([u8; wire::AUTH_NONCE_LEN], Hello, Vec<u8>)>,
}

impl Conn {
    /// A connection that waits for the sender's Hello.
    fn new(stream: Link, peer: SocketAddr) -> Conn {
        Conn {
            stream,
            peer,
            phase: ConnPhase::AwaitHelloHeader,
            recv_pending: false,
            recv_len: 0,
            send_pending: false,
            send_queue: VecDeque::new(),
            ack_pending: None,
            last_heard: Instant::now(),
            last_status: Instant::now(),
            closing: false,
            auth_pending: None,
        }
    }
}

struct Io {
    ring: Ring,
    segdir: Option<SegmentDir>,
    files: HashMap<u64, SegmentFile>,
    /// Writes in flight: id -> (segment, file offset, length, issue time), to name them in errors,
    /// detect short writes and time them.
    writes: HashMap<u64, (u64, u64, usize, Instant)>,
    /// Running CRC of the current segment's received bytes, to publish with `flushed`.
    segment_crc: SegmentCrc,
    epoch: Instant,
    /// Every figure of the run: feeds the Prometheus metrics and makes the summary.
    stats: RecvStats,
    /// Pre-zeroed spare segment files (None: disabled).
    spares: Option<Spares>,
    /// The WAL hub, told the identity and every new durable position (None: no hub).
    hub: Option<Arc<crate::hub::Hub>>,
}

/// Runs the receiver until `shutdown` is set; then drains, flushes, acks and returns.
pub fn run(cfg: &RecvConfig, shutdown: Arc<AtomicBool>) -> Result<RecvSummary, RecvError> {
    run_with_metrics(cfg, shutdown, Arc::new(RecvMetrics::new()))
}

/// [`run`], updating `metrics` (OPS-METRICS) as it goes.
pub fn run_with_metrics(cfg: &RecvConfig, shutdown: Arc<AtomicBool>, metrics: Arc<RecvMetrics>) -> Result<RecvSummary, RecvError> {
    let (listener, hub, dir) = start_up(cfg)?;
    run_loop(cfg, shutdown, metrics, Incoming::Listener(listener), hub, dir)
}

/// `recv --from-postgres`: the receiver fed by a replication client of a real walsender instead of
/// walship senders (`cfg.listen` is not used). Returns when `shutdown` is set, or with the
/// client's error when it stops for good (after what arrived is durable).
pub fn run_from_postgres(cfg: &RecvConfig, pg: from_pg::FromPgConfig, shutdown: Arc<AtomicBool>, metrics: Arc<RecvMetrics>) -> Result<RecvSummary, RecvError> {
    cfg.validate()?;
    pg.validate().map_err(RecvError::FromPostgresConfig)?;
    let hub = start_hub(cfg)?;
    let dir = prepare_dir(cfg)?;
    let start = from_pg::DirStart { identity: dir.state.identity, durable_end: dir.state.durable_end };
    let events = from_pg::spawn(pg, start, cfg.frame_bytes_max).map_err(RecvError::FromPostgresStart)?;
    run_loop(cfg, shutdown, metrics, Incoming::Bridge(events), hub, dir)
}

/// Where the loop's senders come from.
enum Incoming {
    /// walship senders connecting to `--listen`.
    Listener(TcpListener),
    /// `--from-postgres`: the replication client's sessions, one at a time.
    Bridge(std::sync::mpsc::Receiver<from_pg::BridgeEvent>),
}

/// The directory, owned and recovered, ready for the loop.
struct PreparedDir {
    lock: DirLock,
    state: DirState,
    /// Pre-zeroed spare segment files (None: disabled).
    spares: Option<Spares>,
}

fn run_loop(
    cfg: &RecvConfig,
    shutdown: Arc<AtomicBool>,
    metrics: Arc<RecvMetrics>,
    incoming: Incoming,
    hub: Option<crate::hub::HubHandle>,
    dir: PreparedDir,
) -> Result<RecvSummary, RecvError> {
    let PreparedDir { lock, state, spares } = dir;
    // The archiver reads the recovered directory on a thread of its own; dropped (stopped) on return.
    let _archiver = cfg.archive.as_ref().map(|a| crate::archive::Archiver::start(a, &cfg.dir)).transpose()?;
    // Retention too (it deletes only what the archiver reports as in the store).
    let archived_names = cfg.archive.as_ref().map(|a| Arc::clone(&a.archived_names));
    let _retention = cfg.retention.as_ref().map(|r| retention::Retention::start(r, &cfg.dir, archived_names)).transpose().map_err(RecvError::Retention)?;
    let mut io = new_io(cfg, &state, metrics, spares)?;
    io.hub = hub.as_ref().map(|h| Arc::clone(&h.hub));
    let mut st = LoopState::recovered(cfg, &mut io, &state)?;
    let limits = Limits::new(cfg.frame_bytes_max).expect("validated: frame_bytes_max in range");
    let mut completions: Vec<Completion> = Vec::new();
    let mut bridge_error: Option<String> = None;
    loop {
        if shutdown.load(Ordering::Relaxed) && !st.stopping {
            st.stopping = true;
            info!("shutting down: finishing writes and flushing");
            if let Some(c) = st.conn.as_mut() {
                begin_close(&mut io, c, st.receiver.as_mut());
            }
        }
        match &incoming {
            Incoming::Listener(listener) if !st.accept_posted && !st.stopping => {
                io.ring.accept(listener.as_raw_fd(), TAG_ACCEPT);
                st.accept_posted = true;
            }
            // The next session only once the previous one is retired (everything it sent durable).
            Incoming::Bridge(events) if st.conn.is_none() && !st.stopping => {
                if let Some(why) = on_bridge_event(&mut io, events, &mut st) {
                    error!("{why}");
                    st.stopping = true;
                    bridge_error = Some(why);
                }
            }
            _ => {}
        }
        on_timers(&mut io, cfg, &mut st);
        execute(&mut io, &mut st.actions, st.receiver.as_mut(), st.conn.as_mut())?;
        if let Some(c) = st.conn.as_mut() {
            pump_sends(&mut io, c);
        }
        retire_closed_conn(&mut io, &mut st);
        let drained = st.receiver.as_ref().is_none_or(|r| r.is_drained());
        if st.stopping && st.conn.is_none() && drained {
            break;
        }
        if let Some(spares) = io.spares.as_ref() {
            // Spares are zeroed only while nothing received waits for a write or an fdatasync.
            spares.set_busy(!drained);
        }
        io.ring.submit_and_wait(Some(Duration::from_millis(20)))?;
        completions.clear();
        io.ring.drain(&mut completions);
        for &c in &completions {
            handle_completion(&mut io, cfg, &limits, c, &incoming, &mut st)?;
            execute(&mut io, &mut st.actions, st.receiver.as_mut(), st.conn.as_mut())?;
        }
    }
    let summary = finish(io, st.receiver.as_ref(), lock);
    match bridge_error {
        Some(why) => Err(RecvError::FromPostgres(why)),
        None => Ok(summary),
    }
}

/// Takes the replication client's next session, if one is waiting; `Some(why)` when the client
/// stopped for good.
fn on_bridge_event(io: &mut Io, events: &std::sync::mpsc::Receiver<from_pg::BridgeEvent>, st: &mut LoopState) -> Option<String> {
    match events.try_recv() {
        Ok(from_pg::BridgeEvent::Link(link, peer)) => {
            info!(peer = %peer, "replication client session opened");
            io.stats.connection_opened();
            let mut conn = Conn::new(link, peer);
            post_header_recv(io, &mut conn);
            st.conn = Some(conn);
            None
        }
        Ok(from_pg::BridgeEvent::Fatal(why)) => Some(why),
        Err(std::sync::mpsc::TryRecvError::Empty) => None,
        Err(std::sync::mpsc::TryRecvError::Disconnected) => Some("the replication client thread ended".into()),
    }
}

/// What the io loop keeps between completions.
struct LoopState {
    conn: Option<Conn>,
    /// The state machine, once the directory's (or the first sender's) identity is known.
    receiver: Option<Receiver>,
    identity: Option<WalIdentity>,
    /// Actions the state machine asked for, not yet carried out.
    actions: Vec<Action>,
    accept_posted: bool,
    stopping: bool,
}

impl LoopState {
    /// The loop's state over a recovered directory (its segment directory opened when it holds WAL).
    fn recovered(cfg: &RecvConfig, io: &mut Io, state: &DirState) -> Result<LoopState, RecvError> {
        let identity = state.identity;
        let receiver = identity.map(|id| Receiver::new(receiver_config(cfg, id.seg_size), state.durable_end));
        if let (Some(id), true) = (identity, state.durable_end > Lsn(0)) {
            let segdir = open_segdir(cfg, id.tli, id.seg_size)?;
            // Recovery made everything below durable_end durable (and the Welcome will say so):
            // the published position must not say less.
            let published = published::read(&cfg.dir).ok().flatten().map(|p| p.lsn);
            if published.is_none_or(|p| state.durable_end > p) {
                segdir.publish_flushed(state.durable_end, Some(state.durable_crc))?;
            }
            io.segdir = Some(segdir);
        }
        if let (Some(hub), Some(id)) = (io.hub.as_ref(), identity) {
            hub.publish_identity(id, state.durable_end);
        }
        Ok(LoopState { conn: None, receiver, identity, actions: Vec::new(), accept_posted: false, stopping: false })
    }
}

/// Checks the config, binds the port, then owns, prepares and recovers the directory and starts
/// its spare pool (which removes a crashed run's half-zeroed spares, before anything is
/// received); says what the directory holds and where it listens.
#[allow(clippy::type_complexity)]
fn start_up(cfg: &RecvConfig) -> Result<(TcpListener, Option<crate::hub::HubHandle>, PreparedDir), RecvError> {
    cfg.validate()?;
    // The ports first: a receiver that cannot listen must not touch the directory.
    let listener = bind_listener(cfg.listen)?;
    // Standbys wait for an identity until recovery publishes one.
    let hub = start_hub(cfg)?;
    let dir = prepare_dir(cfg)?;
    info!(listen = %listener.local_addr().map_or(cfg.listen, |a| a), "listening");
    Ok((listener, hub, dir))
}

/// The WAL hub's listener and threads when `--serve-replication` is set.
fn start_hub(cfg: &RecvConfig) -> Result<Option<crate::hub::HubHandle>, RecvError> {
    Ok(cfg.hub.as_ref().map(|h| crate::hub::start(h, &cfg.dir)).transpose()?)
}

/// Owns, prepares and recovers the directory and starts its spare pool; says what it holds.
fn prepare_dir(cfg: &RecvConfig) -> Result<PreparedDir, RecvError> {
    std::fs::create_dir_all(&cfg.dir).map_err(|source| RecvError::CreateDir { path: cfg.dir.clone(), source })?;
    // Nothing reads or changes the directory before this process owns it.
    let lock = DirLock::acquire(&cfg.dir, "walship recv")?;
    warn_if_not_durable_across_reboot(&cfg.dir);
    cfg.access.apply_to_dir(&cfg.dir)?;
    let state = recover_dir(&lock)?;
    let spares = Spares::start(&cfg.dir, cfg.spare_segments, cfg.spare_refill, (state.seg_size > 0).then_some(state.seg_size))?;
    let spares = (cfg.spare_segments > 0).then_some(spares);
    match &state.identity {
        Some(id) => info!(
            dir = %cfg.dir.display(),
            durable_end = %state.durable_end,
            system_id = id.system_id,
            timeline = id.tli,
            "directory holds WAL durably up to {}", state.durable_end
        ),
        None => info!(dir = %cfg.dir.display(), "directory is empty; the first sender decides where it starts"),
    }
    Ok(PreparedDir { lock, state, spares })
}

/// The buffer pool and the ring, and everything the io loop owns besides its state.
fn new_io(cfg: &RecvConfig, state: &DirState, metrics: Arc<RecvMetrics>, spares: Option<Spares>) -> Result<Io, RecvError> {
    let slots = (cfg.in_flight_bytes_max / cfg.chunk_bytes).max(4) as usize;
    let pool = BufferPool::new(slots, cfg.chunk_bytes as usize).map_err(|e| RingError::Io { op: "buffer pool", source: e })?;
    let ring = Ring::new(256, pool, 1, CONTROL_BUF_BYTES)?;
    if !ring.pool_registered() {
        warn!("could not register the buffer pool with io_uring (RLIMIT_MEMLOCK?); using unregistered writes");
    }
    Ok(Io {
        ring,
        segdir: None,
        files: HashMap::new(),
        writes: HashMap::new(),
        segment_crc: SegmentCrc::new(state.seg_size, state.durable_end, state.durable_crc),
        epoch: Instant::now(),
        stats: RecvStats::new(metrics, state.durable_end),
        spares,
        hub: None,
    })
}

/// Timers: flush deadlines (everything at once while closing or stopping), silent peers, status acks.
fn on_timers(io: &mut Io, cfg: &RecvConfig, st: &mut LoopState) {
    if let Some(rx) = st.receiver.as_mut() {
        let now = now_us(io.epoch);
        if st.conn.as_ref().is_some_and(|c| c.closing) || st.stopping {
            rx.force_flush(now, &mut st.actions);
        } else {
            rx.poll_flush(now, &mut st.actions);
        }
    }
    let Some(c) = st.conn.as_mut() else { return };
    if !c.closing && c.last_heard.elapsed() > cfg.peer_timeout {
        warn!(peer = %c.peer, "sender silent for {:?}; dropping the connection", cfg.peer_timeout);
        io.stats.error(recv_error::TIMEOUT);
        begin_close(io, c, st.receiver.as_mut());
    } else if !c.closing && c.last_status.elapsed() > cfg.status_interval {
        if let Some(Action::Ack { written, flushed }) = st.receiver.as_ref().map(|r| r.status()) {
            c.ack_pending = Some((written, flushed));
        }
        c.last_status = Instant::now();
    }
}

/// A closed connection is gone once its socket operations completed and, so that the next
/// sender resumes at an exact durable LSN, everything it sent is written and flushed.
fn retire_closed_conn(io: &mut Io, st: &mut LoopState) {
    let done = st.conn.as_ref().is_some_and(|c| c.closing && !c.recv_pending && !c.send_pending);
    if !done || !st.receiver.as_ref().is_none_or(|r| r.is_drained()) {
        return;
    }
    let c = st.conn.take().expect("conn");
    if let Some(rx) = st.receiver.as_ref() {
        // Best effort: tell the sender the final durable position before closing.
        let _ = blocking_send(&c.stream, &Message::Ack(ack_now(rx.written(), rx.flushed())));
    }
    io.stats.connection_closed(st.receiver.as_ref().map(|r| r.flushed()));
    info!(peer = %c.peer, flushed = %io.stats.flushed(), "connection closed");
}

/// The run's summary, logged; then the directory's lock is released and `io` dropped (its
/// ring first: it drains anything left before the files it may reference).
fn finish(mut io: Io, receiver: Option<&Receiver>, lock: DirLock) -> RecvSummary {
    let flushed = receiver.map_or(io.stats.flushed(), |r| r.flushed());
    let spare_counts = io.spares.take().map(|spares| spares.counts()).unwrap_or_default();
    let summary = io.stats.summary(flushed, spare_counts);
    info!(flushed = %flushed, "receiver stopped; everything below {flushed} is durable; {}", summary.describe());
    drop(lock);
    summary
}

fn open_segdir(cfg: &RecvConfig, tli: u32, seg_size: u64) -> Result<SegmentDir, DirError> {
    Ok(SegmentDir::open(&cfg.dir, tli, seg_size)?.buffered(cfg.write_buffered).with_access(cfg.access))
}

/// tmpfs (and ramfs) lose everything at a reboot, whatever fdatasync says: say so at start-up.
fn warn_if_not_durable_across_reboot(dir: &std::path::Path) {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    if let Ok(fs) = rustix::fs::statfs(dir) {
        #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
        let kind = fs.f_type as i64;
        if kind == TMPFS_MAGIC || kind == RAMFS_MAGIC {
            warn!(
                dir = %dir.display(),
                "{} is on tmpfs/ramfs: what is acknowledged there is lost at a reboot. Put the receiver directory on a disk filesystem",
                dir.display()
            );
        }
    }
}

/// How long a restarted receiver waits for its port to be released.
const BIND_RETRY_FOR: Duration = Duration::from_secs(5);

/// Binds the listening socket. After a crash (kill -9) the previous process's io_uring is torn down
/// asynchronously and can hold its listening socket (a pending ACCEPT) for a moment: "address in
/// use" is retried briefly before it is reported.
fn bind_listener(addr: SocketAddr) -> Result<TcpListener, RecvError> {
    let deadline = Instant::now() + BIND_RETRY_FOR;
    loop {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(source) => return Err(RecvError::Listen { addr, source }),
        }
    }
}

const CONTROL_BUF_BYTES: usize = FRAME_HEADER_LEN + wire::CONTROL_BODY_BYTES_MAX as usize;

fn receiver_config(cfg: &RecvConfig, seg_size: u64) -> ReceiverConfig {
    let chunk_bytes = cfg.chunk_bytes.min(seg_size);
    ReceiverConfig {
        seg_size,
        chunk_bytes,
        slots: ((cfg.in_flight_bytes_max / cfg.chunk_bytes).max(4)) as usize,
        align_bytes: 4096,
        flush: FlushPolicy {
            batch_bytes: cfg.fsync_batch_bytes,
            interval_us: cfg.fsync_interval_us,
            batches_in_flight_max: cfg.fsync_batches_in_flight_max,
        },
    }
}

fn ack_now(written: Lsn, flushed: Lsn) -> Ack {
    Ack { written_lsn: written.0, flushed_lsn: flushed.0, time_us: unix_time_us() }
}

fn blocking_send(stream: &Link, msg: &Message) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    msg.encode(&mut bytes);
    stream.set_timeouts(Some(Duration::from_secs(2)));
    (&*stream).write_all(&bytes)
}

fn queue_message(conn: &mut Conn, msg: &Message) {
    let mut bytes = Vec::new();
    msg.encode(&mut bytes);
    conn.send_queue.push_back(bytes);
}

fn pump_sends(io: &mut Io, conn: &mut Conn) {
    if conn.send_pending || conn.closing {
        return;
    }
    if let Some((written, flushed)) = conn.ack_pending.take() {
        queue_message(conn, &Message::Ack(ack_now(written, flushed)));
    }
    if let Some(bytes) = conn.send_queue.pop_front() {
        io.ring.send_bytes(conn.stream.as_raw_fd(), TAG_SEND, bytes);
        conn.send_pending = true;
    }
}

fn begin_close(io: &mut Io, conn: &mut Conn, receiver: Option<&mut Receiver>) {
    if conn.closing {
        return;
    }
    conn.closing = true;
    conn.stream.shutdown();
    io.stats.connection_closing();
    if conn.recv_pending || conn.send_pending {
        io.ring.cancel_fd(conn.stream.as_raw_fd());
    }
    if let Some(rx) = receiver {
        if matches!(conn.phase, ConnPhase::DataBody(_)) && !conn.recv_pending {
            rx.abandon_frame();
        }
    }
}

fn post_header_recv(io: &mut Io, conn: &mut Conn) {
    debug_assert!(!conn.recv_pending);
    io.ring.recv_ctl(conn.stream.as_raw_fd(), TAG_RECV_HEADER, CTL, FRAME_HEADER_LEN, true);
    conn.recv_pending = true;
    conn.recv_len = FRAME_HEADER_LEN;
}

fn send_error_and_close(io: &mut Io, conn: &mut Conn, receiver: Option<&mut Receiver>, code: ErrorCode, message: String) {
    error!(peer = %conn.peer, "{message}");
    io.stats.refused(code);
    let _ = blocking_send(&conn.stream, &Message::Error(ErrorFrame { code, message }));
    begin_close(io, conn, receiver);
}

fn handle_completion(io: &mut Io, cfg: &RecvConfig, limits: &Limits, c: Completion, incoming: &Incoming, st: &mut LoopState) -> Result<(), RecvError> {
    let now = now_us(io.epoch);
    match c.tag & TAG_KIND_MASK {
        TAG_ACCEPT => {
            st.accept_posted = false;
            if let Incoming::Listener(listener) = incoming {
                on_accept(io, cfg, c, listener, &mut st.conn);
            }
        }
        TAG_SEND => {
            let Some(conn) = st.conn.as_mut() else { return Ok(()) };
            conn.send_pending = false;
            if c.result < 0 && !conn.closing {
                warn!(peer = %conn.peer, "send failed: {}", std::io::Error::from_raw_os_error(-c.result));
                io.stats.error(recv_error::NETWORK);
                begin_close(io, conn, st.receiver.as_mut());
            }
        }
        TAG_RECV_HEADER | TAG_RECV_BODY | TAG_RECV_PIECE => on_received(io, cfg, limits, c, st, now)?,
        TAG_WRITE => on_write_done(io, c, st.receiver.as_mut().expect("write without receiver"), &mut st.actions, now)?,
        TAG_FSYNC => on_fsync_done(io, cfg, c, st.receiver.as_mut().expect("fsync without receiver"), &mut st.actions)?,
        _ => unreachable!("unknown completion tag {:#x}", c.tag),
    }
    Ok(())
}

/// A sender connected: refused while another one is connected, else its connection starts with a
/// Hello header receive (after the TLS handshake when the receiver runs TLS).
fn on_accept(io: &mut Io, cfg: &RecvConfig, c: Completion, listener: &TcpListener, conn_slot: &mut Option<Conn>) {
    if c.result < 0 {
        if c.result != -libc::ECANCELED {
            warn!("accept failed: {}", std::io::Error::from_raw_os_error(-c.result));
        }
        return;
    }
    let tcp = crate::uring::accepted_stream(&c);
    let peer = tcp.peer_addr().unwrap_or_else(|_| listener.local_addr().expect("local addr"));
    let _ = tcp.set_nodelay(true);
    let stream = match &cfg.tls {
        None => Link::Tcp(tcp),
        Some(tls) => match crate::tls::accept(tcp, peer, tls, cfg.peer_timeout) {
            Ok(link) => link,
            Err(e) => {
                warn!(peer = %peer, "cannot start TLS for sender {peer}: {e}");
                return;
            }
        },
    };
    if conn_slot.is_some() {
        let _ = blocking_send(
            &stream,
            &Message::Error(ErrorFrame { code: ErrorCode::Other, message: "receiver is busy with another sender".into() }),
        );
        warn!(peer = %peer, "refused a second sender while one is connected");
        io.stats.error(recv_error::BUSY);
        return;
    }
    info!(peer = %peer, tls = stream.is_tls(), "sender connected");
    io.stats.connection_opened();
    let mut conn = Conn::new(stream, peer);
    post_header_recv(io, &mut conn);
    *conn_slot = Some(conn);
}

/// A receive on the connection completed: a header, a control body or a piece of a data frame.
fn on_received(io: &mut Io, cfg: &RecvConfig, limits: &Limits, c: Completion, st: &mut LoopState, now: u64) -> Result<(), RecvError> {
    let Some(conn) = st.conn.as_mut() else { return Ok(()) };
    conn.recv_pending = false;
    if receive_ended(io, c, conn, st.receiver.as_mut()) {
        return Ok(());
    }
    conn.last_heard = Instant::now();
    match c.tag & TAG_KIND_MASK {
        TAG_RECV_HEADER => on_header(io, limits, conn, &mut st.receiver, &mut st.actions)?,
        TAG_RECV_BODY => on_control_body(io, cfg, conn, &mut st.receiver, &mut st.identity, c.result as usize)?,
        _ => {
            let id = st.identity.expect("identity known once streaming");
            on_piece(io, conn, st.receiver.as_mut().expect("receiver"), &id, &mut st.actions, now)
        }
    }
    Ok(())
}

/// MSG_WAITALL delivers everything asked for, unless the peer closed (or the socket failed)
/// first: a short receive is a connection that ended mid-frame, never data. True (and the
/// connection closing) when this receive ended it.
fn receive_ended(io: &mut Io, c: Completion, conn: &mut Conn, mut receiver: Option<&mut Receiver>) -> bool {
    let short = c.result > 0 && (c.result as usize) < conn.recv_len;
    if !conn.closing && !short && c.result > 0 {
        return false;
    }
    // (When closing, the socket was shut down on purpose: nothing to report.)
    if !conn.closing {
        if short {
            warn!(peer = %conn.peer, got = c.result, expected = conn.recv_len, "sender closed the connection in the middle of a frame; the partial frame is discarded");
        } else if c.result == 0 {
            info!(peer = %conn.peer, "sender closed the connection");
        } else {
            warn!(peer = %conn.peer, "receive failed: {}", std::io::Error::from_raw_os_error(-c.result));
            io.stats.error(recv_error::NETWORK);
        }
    }
    if c.tag & TAG_KIND_MASK == TAG_RECV_PIECE {
        if let Some(rx) = receiver.as_deref_mut() {
            rx.abandon_frame();
        }
    }
    begin_close(io, conn, receiver);
    true
}

/// A write completed: a failed or short write is fatal (nothing past `flushed` was acknowledged).
fn on_write_done(io: &mut Io, c: Completion, rx: &mut Receiver, actions: &mut Vec<Action>, now: u64) -> Result<(), RecvError> {
    let write_id = c.tag & !TAG_KIND_MASK;
    let (segno, offset, len, issued) = io.writes.remove(&write_id).expect("completion of an unknown write");
    let path = io.segdir.as_ref().expect("segment dir").partial_path(segno);
    if c.result < 0 {
        io.stats.error(recv_error::WRITE);
        let reason = std::io::Error::from_raw_os_error(-c.result).to_string();
        return Err(RecvError::WriteFailed { path, offset, flushed: rx.flushed(), reason });
    }
    if c.result as usize != len {
        io.stats.error(recv_error::WRITE);
        let reason = format!("short O_DIRECT write: {} of {len} bytes (disk full?)", c.result);
        return Err(RecvError::WriteFailed { path, offset, flushed: rx.flushed(), reason });
    }
    io.stats.write_done(len as u64, issued.elapsed());
    rx.on_write_done(write_id, now, actions);
    Ok(())
}

/// An fdatasync completed: a failure is fatal and poisons the flusher (no later fsync may
/// advance `flushed`).
fn on_fsync_done(io: &mut Io, cfg: &RecvConfig, c: Completion, rx: &mut Receiver, actions: &mut Vec<Action>) -> Result<(), RecvError> {
    let batch_id = c.tag & !TAG_KIND_MASK;
    if c.result < 0 {
        io.stats.error(recv_error::FSYNC);
        let flushed = rx.on_fsync_failed(batch_id);
        return Err(RecvError::FsyncFailed { path: cfg.dir.clone(), flushed, source: std::io::Error::from_raw_os_error(-c.result) });
    }
    let flushed_before = rx.flushed();
    rx.on_fsync_done(batch_id, actions);
    io.stats.fsync_done(batch_id, rx.flushed() - flushed_before, rx.fsync_batch_pending(batch_id));
    Ok(())
}

fn on_header(
    io: &mut Io,
    limits: &Limits,
    conn: &mut Conn,
    receiver: &mut Option<Receiver>,
    actions: &mut Vec<Action>,
) -> Result<(), RecvError> {
    let mut raw = [0u8; FRAME_HEADER_LEN];
    raw.copy_from_slice(&io.ring.ctl(CTL)[..FRAME_HEADER_LEN]);
    let header = match FrameHeader::decode(&raw, limits) {
        Ok(h) => h,
        Err(_) if conn.phase == ConnPhase::AwaitHelloHeader && crate::tls::starts_tls_handshake(&raw) => {
            let message = format!(
                "sender {} started a TLS handshake, but this receiver runs without TLS: give it --tls-cert and --tls-key, \
                 or start the sender without --tls-ca",
                conn.peer
            );
            send_error_and_close(io, conn, receiver.as_mut(), ErrorCode::Protocol, message);
            return Ok(());
        }
        Err(e) => {
            send_error_and_close(io, conn, receiver.as_mut(), ErrorCode::Protocol, format!("bad frame from {}: {e}", conn.peer));
            return Ok(());
        }
    };
    match session::on_header(conn.phase, header, &conn.peer.to_string()) {
        Err(Refusal { code, message }) => send_error_and_close(io, conn, receiver.as_mut(), code, message),
        Ok(HeaderStep::ControlBody(phase)) => {
            conn.phase = phase;
            post_body_recv(io, conn, header);
        }
        Ok(HeaderStep::DataBody(phase)) => {
            let rx = receiver.as_mut().expect("streaming without receiver");
            conn.phase = phase;
            io.stats.frame_arrived(Lsn(header.lsn + header.body_len as u64));
            if let Err(e) = rx.on_data_header(Lsn(header.lsn), header.body_len as u64, actions) {
                let code = match e {
                    ReceiverError::NotContiguous { .. } => ErrorCode::Gap,
                    _ => ErrorCode::Protocol,
                };
                conn.phase = ConnPhase::AwaitHeader;
                send_error_and_close(io, conn, Some(rx), code, format!("from {}: {e}", conn.peer));
            }
        }
    }
    Ok(())
}

fn post_body_recv(io: &mut Io, conn: &mut Conn, header: FrameHeader) {
    if header.body_len == 0 {
        // Every control message has a body.
        let msg = format!("empty {} frame from {}", header.kind, conn.peer);
        send_error_and_close(io, conn, None, ErrorCode::Protocol, msg);
        return;
    }
    io.ring.recv_ctl(conn.stream.as_raw_fd(), TAG_RECV_BODY, CTL, header.body_len as usize, true);
    conn.recv_pending = true;
    conn.recv_len = header.body_len as usize;
}

fn on_control_body(
    io: &mut Io,
    cfg: &RecvConfig,
    conn: &mut Conn,
    receiver: &mut Option<Receiver>,
    identity: &mut Option<WalIdentity>,
    got: usize,
) -> Result<(), RecvError> {
    let header = match conn.phase {
        ConnPhase::AwaitHelloBody(h) | ConnPhase::AwaitControlBody(h) | ConnPhase::AwaitAuthBody(h) => h,
        _ => unreachable!("control body in phase {:?}", conn.phase),
    };
    let body = io.ring.ctl(CTL)[..got.min(header.body_len as usize)].to_vec();
    let msg = match header.verify_body(&body).and_then(|_| wire::decode_control(&header, &body)) {
        Ok(m) => m,
        Err(e) => {
            send_error_and_close(io, conn, receiver.as_mut(), ErrorCode::Protocol, format!("bad {} frame from {}: {e}", header.kind, conn.peer));
            return Ok(());
        }
    };
    match msg {
        Message::Hello(hello) => match &cfg.auth {
            None => on_hello(io, cfg, conn, receiver, identity, hello)?,
            Some(_) => challenge(io, conn, receiver.as_mut(), hello, body),
        },
        Message::Auth(a) if matches!(conn.phase, ConnPhase::AwaitAuthBody(_)) && a.step == wire::AuthStep::Response => {
            let key = cfg.auth.as_ref().expect("auth phase without a key");
            let (nonce_r, hello, hello_body) = conn.auth_pending.take().expect("auth pending");
            let proof = match session::on_auth_response(key, &nonce_r, &hello_body, &a, &conn.peer.to_string()) {
                Ok(proof) => proof,
                Err(Refusal { code, message }) => {
                    send_error_and_close(io, conn, receiver.as_mut(), code, message);
                    return Ok(());
                }
            };
            queue_message(conn, &Message::Auth(wire::Auth { step: wire::AuthStep::Proof, nonce: [0; wire::AUTH_NONCE_LEN], mac: proof }));
            info!(peer = %conn.peer, "sender authenticated");
            on_hello(io, cfg, conn, receiver, identity, hello)?;
        }
        Message::Keepalive(k) => {
            if k.reply_requested {
                if let Some(Action::Ack { written, flushed }) = receiver.as_ref().map(|r| r.status()) {
                    conn.ack_pending = Some((written, flushed));
                }
            }
            conn.phase = ConnPhase::AwaitHeader;
            post_header_recv(io, conn);
        }
        Message::Error(e) => {
            warn!(peer = %conn.peer, code = ?e.code, "sender gave up: {}", e.message);
            begin_close(io, conn, receiver.as_mut());
        }
        Message::BackupFile(b) if identity.is_some() => {
            let seg_size = identity.map_or(0, |id| id.seg_size);
            // A few hundred bytes, once per base backup: written here, durably, before the next frame.
            if let Err(e) = SegmentDir::store_backup(&cfg.dir, &b.name, seg_size, &b.content, cfg.access) {
                let code = if matches!(e, DirError::BadSegment { .. }) { ErrorCode::Protocol } else { ErrorCode::Io };
                send_error_and_close(io, conn, receiver.as_mut(), code, format!("backup history file from {}: {e}", conn.peer));
                return Ok(());
            }
            info!(peer = %conn.peer, file = %b.name, "stored the backup history file {}", b.name);
            conn.phase = ConnPhase::AwaitHeader;
            post_header_recv(io, conn);
        }
        other => {
            send_error_and_close(io, conn, receiver.as_mut(), ErrorCode::Protocol, format!("unexpected {} from {}", other.kind(), conn.peer));
        }
    }
    Ok(())
}

/// A receiver with a key answers a Hello with a challenge: nothing is decided, and nothing
/// written, before the sender proves it knows the key.
fn challenge(io: &mut Io, conn: &mut Conn, receiver: Option<&mut Receiver>, hello: Hello, hello_body: Vec<u8>) {
    let nonce_r = match crate::auth::nonce() {
        Ok(n) => n,
        Err(e) => {
            send_error_and_close(io, conn, receiver, ErrorCode::Io, e.to_string());
            return;
        }
    };
    conn.auth_pending = Some((nonce_r, hello, hello_body));
    queue_message(conn, &Message::Auth(wire::Auth { step: wire::AuthStep::Challenge, nonce: nonce_r, mac: [0; wire::AUTH_MAC_LEN] }));
    conn.phase = ConnPhase::AwaitAuthHeader;
    post_header_recv(io, conn);
}

/// Carries out the session's decision on a Hello (`session::on_hello`): a refusal ends the
/// connection; an accepted sender may first move this directory to a newer timeline, then streams
/// from the decided start.
fn on_hello(
    io: &mut Io,
    cfg: &RecvConfig,
    conn: &mut Conn,
    receiver: &mut Option<Receiver>,
    identity: &mut Option<WalIdentity>,
    hello: Hello,
) -> Result<(), RecvError> {
    let durable = receiver.as_ref().map_or(Lsn(0), |r| r.resume_point());
    let accepted = match session::on_hello(&hello, *identity, durable, &conn.peer.to_string()) {
        Ok(a) => a,
        Err(Refusal { code, message }) => {
            send_error_and_close(io, conn, receiver.as_mut(), code, message);
            return Ok(());
        }
    };
    let seg_size = accepted.identity.seg_size;
    if let Some(sw) = accepted.switch {
        info!(
            peer = %conn.peer,
            from = sw.from_tli,
            to = accepted.identity.tli,
            switch = %sw.switch,
            "timeline switch: timeline {} ends at {}; continuing on timeline {} from {}", sw.from_tli, sw.switch, accepted.identity.tli, sw.start
        );
        io.files.clear();
        io.segdir = Some(open_segdir(cfg, accepted.identity.tli, seg_size)?);
        io.segment_crc = SegmentCrc::new(seg_size, sw.start, 0);
        *receiver = Some(Receiver::new(receiver_config(cfg, seg_size), sw.start));
    }
    if !hello.history.is_empty() {
        SegmentDir::store_history(&cfg.dir, hello.timeline, &hello.history, cfg.access)?;
    }
    let rx = receiver.get_or_insert_with(|| Receiver::new(receiver_config(cfg, seg_size), Lsn(0)));
    if let StreamStart::Fresh(first) = accepted.start {
        rx.set_start(first);
        io.segment_crc.set_seg_size(seg_size);
        io.segment_crc.reset(first);
    }
    *identity = Some(accepted.identity);
    if io.segdir.is_none() {
        io.segdir = Some(open_segdir(cfg, accepted.identity.tli, seg_size)?);
    }
    if let Some(hub) = io.hub.as_ref() {
        // After the history file is stored: a standby on the old timeline reads its switch point there.
        hub.publish_identity(accepted.identity, rx.flushed());
    }
    let resume = accepted.start.lsn();
    info!(
        peer = %conn.peer,
        name = %hello.sender_name,
        system_id = hello.system_id,
        timeline = hello.timeline,
        sender_first = %Lsn(hello.first_lsn),
        sender_horizon = %Lsn(hello.horizon_lsn),
        resume = %resume,
        "handshake done; the stream resumes at {resume}"
    );
    let welcome = Welcome {
        protocol_version: wire::PROTOCOL_VERSION,
        timeline: accepted.identity.tli,
        system_id: accepted.identity.system_id,
        durable_lsn: if matches!(accepted.start, StreamStart::Fresh(_)) { 0 } else { resume.0 },
    };
    queue_message(conn, &Message::Welcome(welcome));
    conn.phase = ConnPhase::AwaitHeader;
    post_header_recv(io, conn);
    Ok(())
}

/// Safety rule 4 on the receiving side: every page header that starts inside the frame must
/// belong to its position. Frames the sender flagged as reaching into the padding after an
/// `XLOG_SWITCH` (pages PostgreSQL never wrote) are exempt.
fn check_frame_pages(io: &Io, header: &FrameHeader, pieces: &[(Lsn, usize, usize, usize)], id: &WalIdentity) -> Result<(), String> {
    if header.flags & wire::DATA_FLAG_SWITCH_PADDING != 0 {
        return Ok(());
    }
    let block = id.block_size;
    for &(lsn, slot, off, len) in pieces {
        let bytes = &io.ring.pool().slot(slot)[off..off + len];
        let end = lsn + len as u64;
        let mut page = Lsn(lsn.0.div_ceil(block) * block);
        while page < end {
            let header_len = if page.0 % id.seg_size == 0 { crate::wal::LONG_PAGE_HEADER_LEN } else { crate::wal::SHORT_PAGE_HEADER_LEN };
            if page + header_len as u64 > end {
                break; // the rest of this header arrives with the next frame
            }
            let at = (page - lsn) as usize;
            if let Err(e) = crate::wal::validate_page(&bytes[at..], page, id) {
                return Err(e.to_string());
            }
            page = page + block;
        }
    }
    Ok(())
}

fn on_piece(io: &mut Io, conn: &mut Conn, rx: &mut Receiver, id: &WalIdentity, actions: &mut Vec<Action>, now: u64) {
    let ConnPhase::DataBody(header) = conn.phase else { unreachable!("piece outside a data frame") };
    if !rx.on_piece_received(actions) {
        if rx.frame_waiting() {
            io.stats.frame_stalled();
        }
        return; // more pieces to come (the next one may already be in `actions`)
    }
    // The whole body is in the pool: verify before anything is written.
    let pieces = rx.frame_pieces();
    let crc = pieces.iter().fold(0u32, |acc, &(_, slot, off, len)| crc32c::crc32c_append(acc, &io.ring.pool().slot(slot)[off..off + len]));
    if crc != header.body_crc {
        let msg = format!(
            "data frame at {} ({} bytes) from {} failed its CRC (expected {:#010x}, computed {:#010x}); nothing of it was written",
            Lsn(header.lsn),
            header.body_len,
            conn.peer,
            header.body_crc,
            crc
        );
        rx.abandon_frame();
        conn.phase = ConnPhase::AwaitHeader;
        send_error_and_close(io, conn, Some(rx), ErrorCode::Corrupt, msg);
        return;
    }
    if let Err(why) = check_frame_pages(io, &header, &pieces, id) {
        let msg = format!(
            "data frame at {} ({} bytes) from {} carries a page that is not valid WAL for its position: {why}; nothing of it was written",
            Lsn(header.lsn),
            header.body_len,
            conn.peer
        );
        rx.abandon_frame();
        conn.phase = ConnPhase::AwaitHeader;
        send_error_and_close(io, conn, Some(rx), ErrorCode::Corrupt, msg);
        return;
    }
    // The segment CRC continues with the frame's (verified) CRC rather than a second pass over
    // its bytes, unless a segment starts inside the frame.
    let frame_start = Lsn(header.lsn);
    let frame_len = header.body_len as u64;
    let seg_size = io.segment_crc.seg_size;
    if frame_start.0 / seg_size == (frame_start.0 + frame_len - 1) / seg_size {
        io.segment_crc.extend_known(frame_start, frame_len, crc);
    } else {
        for (lsn, slot, off, len) in pieces {
            io.segment_crc.extend(lsn, &io.ring.pool().slot(slot)[off..off + len]);
        }
    }
    io.segment_crc.mark();
    io.stats.frame_verified(Lsn(header.lsn + header.body_len as u64), header.body_len as u64);
    rx.on_frame_verified(now, actions);
    conn.phase = ConnPhase::AwaitHeader;
    post_header_recv(io, conn);
}

fn execute(io: &mut Io, actions: &mut Vec<Action>, mut receiver: Option<&mut Receiver>, mut conn: Option<&mut Conn>) -> Result<(), RecvError> {
    // Actions may produce more actions (e.g. a piece posted after a prefill): loop until empty.
    while !actions.is_empty() {
        let batch: Vec<Action> = std::mem::take(actions);
        for action in batch {
            execute_one(io, action, receiver.as_deref_mut(), conn.as_deref_mut())?;
        }
    }
    Ok(())
}

fn execute_one(io: &mut Io, action: Action, receiver: Option<&mut Receiver>, conn: Option<&mut Conn>) -> Result<(), RecvError> {
    let now = now_us(io.epoch);
    match action {
        Action::OpenSegment { segno } => {
            let segdir = io.segdir.as_ref().expect("segment dir");
            if let Some(spares) = io.spares.as_ref() {
                spares.set_seg_size(segdir.seg_size());
            }
            let (file, created) = segdir.open_segment(segno, io.spares.as_ref())?;
            io.files.insert(segno, file);
            if let (true, Some(rx)) = (created, receiver) {
                rx.on_directory_changed(now);
            }
        }
        Action::Prefill { segno, slot, slot_offset, file_offset, len } => {
            let segdir = io.segdir.as_ref().expect("segment dir");
            let file = io.files.get(&segno).expect("prefill of a closed segment");
            let buf = &mut io.ring.pool_mut().slot_mut(slot)[slot_offset..slot_offset + len];
            segdir.prefill(file, file_offset, buf)?;
        }
        Action::RecvPiece { slot, slot_offset, len } => {
            let c = conn.expect("piece without connection");
            if c.closing {
                if let Some(rx) = receiver {
                    rx.abandon_frame();
                }
                return Ok(());
            }
            io.ring.recv_slot(c.stream.as_raw_fd(), TAG_RECV_PIECE, slot, slot_offset, len);
            c.recv_pending = true;
            c.recv_len = len;
        }
        Action::Write { write_id, segno, slot, slot_offset, len, valid_len, file_offset } => {
            io.ring.pool_mut().slot_mut(slot)[slot_offset + valid_len..slot_offset + len].fill(0);
            let fd = io.files.get(&segno).expect("write to a closed segment").direct.as_raw_fd();
            io.writes.insert(write_id, (segno, file_offset, len, Instant::now()));
            io.ring.write_slot(fd, TAG_WRITE | write_id, slot, slot_offset, len, file_offset);
        }
        Action::Fsync(req) => {
            io.stats.fsync_issued(req.batch_id);
            let (fd, data_only) = match req.target {
                SyncTarget::Segment(segno) => (io.files.get(&segno).expect("fsync of a closed segment").direct.as_raw_fd(), true),
                SyncTarget::Directory => (io.segdir.as_ref().expect("segment dir").dir_file.as_raw_fd(), false),
            };
            io.ring.fsync(fd, TAG_FSYNC | req.batch_id, data_only);
        }
        Action::CompleteSegment { segno } => {
            io.segdir.as_ref().expect("segment dir").complete(segno)?;
            io.files.remove(&segno);
            if let Some(rx) = receiver {
                rx.on_directory_changed(now);
            }
        }
        Action::Ack { written, flushed } => {
            // For `walship restore` (never hand out bytes past what is durable) and for
            // recovery (never resume below what was acknowledged).
            let crc = io.segment_crc.crc_at(flushed);
            io.segdir.as_ref().expect("segment dir").publish_flushed(flushed, crc)?;
            io.stats.acked(written, flushed);
            if let Some(hub) = io.hub.as_ref() {
                hub.publish_flushed(flushed);
            }
            if let Some(c) = conn {
                c.ack_pending = Some((written, flushed));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod segment_crc_tests {
    use super::*;

    #[test]
    fn combine_equals_one_pass_over_both() {
        let bytes: Vec<u8> = (0..3_000_000u64).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        for (a, b) in [(0, 1), (1, 1), (5, 8192), (8192, 1 << 20), (1 << 20, (1 << 20) + 7), (12345, 2_000_000), (3, 0)] {
            let (x, y) = (&bytes[..a], &bytes[a..a + b]);
            let whole = crc32c::crc32c_append(crc32c::crc32c(x), y);
            assert_eq!(crc32c_combine(crc32c::crc32c(x), crc32c::crc32c(y), b as u64), whole, "a={a} b={b}");
        }
    }

    #[test]
    fn extend_known_matches_extend_across_frames_and_segment_starts() {
        let seg = 1u64 << 16;
        let bytes: Vec<u8> = (0..3 * seg).map(|i| (i * 7 + (i >> 9)) as u8).collect();
        let (mut passes, mut known) = (SegmentCrc::new(seg, Lsn(0), 0), SegmentCrc::new(seg, Lsn(0), 0));
        let mut at = 0u64;
        for len in [8192u64, 1000, 24576, 31768, 8192, 57344, 8192, 16384, 8192, 40960, 3 * seg] {
            let end = (at + len).min(3 * seg).min((at / seg + 1) * seg); // frames stay inside a segment
            let piece = &bytes[at as usize..end as usize];
            passes.extend(Lsn(at), piece);
            known.extend_known(Lsn(at), end - at, crc32c::crc32c(piece));
            assert_eq!(known.crc, passes.crc, "after the frame at {at}");
            at = end;
            if at == 3 * seg {
                break;
            }
        }
    }
}

#[cfg(test)]
mod config_tests {
    use super::*;

    fn good() -> RecvConfig {
        RecvConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            dir: PathBuf::from("/nonexistent"),
            chunk_bytes: 1 << 20,
            in_flight_bytes_max: 64 << 20,
            fsync_batch_bytes: 16 << 20,
            fsync_interval_us: 1000,
            fsync_batches_in_flight_max: 4,
            frame_bytes_max: 8 << 20,
            peer_timeout: Duration::from_secs(120),
            status_interval: Duration::from_secs(1),
            auth: None,
            tls: None,
            write_buffered: false,
            spare_segments: 2,
            spare_refill: SpareRefill::Idle,
            access: FileAccess::default(),
            archive: None,
            retention: None,
            hub: None,
        }
    }

    type Break = fn(&mut RecvConfig);

    #[test]
    fn the_defaults_are_valid_and_each_broken_limit_is_named() {
        good().validate().unwrap();
        let cases: Vec<(Break, &str)> = vec![
            (|c| c.chunk_bytes = 3 << 20, "--chunk-bytes"),
            (|c| c.chunk_bytes = 32 << 10, "--chunk-bytes"),
            (|c| c.in_flight_bytes_max = 3 << 20, "--in-flight-bytes-max"),
            (|c| c.frame_bytes_max = 0, "--frame-bytes-max"),
            (|c| c.frame_bytes_max = 40 << 20, "--frame-bytes-max"),
            (|c| c.fsync_batches_in_flight_max = 0, "--fsync-batches-in-flight-max"),
            (|c| c.fsync_batches_in_flight_max = 65, "--fsync-batches-in-flight-max"),
            (|c| c.spare_segments = spares::SPARE_SEGMENTS_MAX + 1, "--spare-segments"),
            (|c| c.peer_timeout = Duration::ZERO, "--peer-timeout"),
            (|c| c.status_interval = Duration::ZERO, "--status-interval"),
            (|c| c.access.file_mode = 0o440, "--file-mode"),
        ];
        for (breaks, flag) in cases {
            let mut c = good();
            breaks(&mut c);
            let err = c.validate().expect_err(flag).to_string();
            assert!(err.contains(flag), "{flag}: {err}");
        }
    }
}
