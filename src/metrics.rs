//! Prometheus metrics for both sides and the HTTP `/metrics` endpoint that serves them.
//!
//! The hot path only touches atomics: every gauge and counter here is a `prometheus-client` metric,
//! which is an `Arc` around an atomic, so the receiver's per-frame updates and the sender's per-ack
//! updates are a relaxed atomic store or add. The two histograms (fdatasync latency, fdatasync batch
//! size) take the histogram's own lock once per fdatasync batch, never per frame. Families (errors by
//! kind, the sender's peer) take a lock per *event* (an error, a connection), never per frame.
//!
//! Derived values (sender lag in seconds) are computed when `/metrics` is scraped ([`Metrics::encode`]),
//! from the same atomics a progress reporter can read with [`SenderMetrics::snapshot`] and
//! [`RecvMetrics::snapshot`].
//!
//! Exposition: OpenMetrics text via `prometheus_client::encoding::text::encode` (Prometheus scrapes
//! it natively). Names, with units last:
//!
//! | both sides | |
//! |---|---|
//! | `walship_build_info{version}` | 1 |
//! | `walship_role_info{role}` | `sender` or `receiver` |
//! | `walship_process_start_time_seconds` | Unix time the process started |
//!
//! | receiver | |
//! |---|---|
//! | `walship_recv_received_lsn` / `_written_lsn` / `_flushed_lsn` | u64 LSN: end of the last verified frame / last byte written + 1 / last byte durable + 1 |
//! | `walship_recv_connected` | 1 while a sender is connected |
//! | `walship_recv_bytes_total`, `walship_recv_frames_total` | verified data frame payload bytes and frames |
//! | `walship_recv_bytes_written_total` | bytes handed to O_DIRECT writes (block-padded) |
//! | `walship_recv_connections_total` | senders accepted (a reconnect counts again) |
//! | `walship_recv_fsync_duration_seconds` | histogram: fdatasync latency |
//! | `walship_recv_fsync_batch_bytes` | histogram: bytes made durable per fdatasync batch |
//! | `walship_recv_errors_total{kind}` | errors by kind |
//!
//! | sender | |
//! |---|---|
//! | `walship_send_sent_lsn` / `_written_lsn` / `_flushed_lsn` | u64 LSN on the current connection |
//! | `walship_send_horizon_lsn` | how far the source may be shipped (flush horizon / end of valid WAL) |
//! | `walship_send_lag_bytes` | horizon - receiver's flushed LSN |
//! | `walship_send_lag_seconds` | 0 when the receiver holds the horizon durably; else seconds since it last did |
//! | `walship_send_last_ack_time_seconds` | Unix time of the last acknowledgement |
//! | `walship_send_connected{peer}` | 1 for the connected receiver, 0 for earlier ones |
//! | `walship_send_bytes_total` | WAL payload bytes handed to the kernel |
//! | `walship_send_connections_total`, `walship_send_reconnects_total` | connections made / re-made after a loss |
//! | `walship_send_errors_total{kind}` | errors by kind |
//! | `walship_send_quorum_flushed_lsn` | the K-th highest acknowledged flushed LSN over the destinations (what the sender counts durable) |
//! | `walship_send_destination_flushed_lsn{destination}` | each destination's acknowledged durable position |
//! | `walship_send_destination_lag_bytes{destination}` | horizon - that destination's flushed LSN |
//! | `walship_send_destination_connected{destination}` | 1 while that destination is connected |
//! | `walship_send_destination_reconnects_total{destination}` | that destination's connections re-made after a loss |
//! | `walship_send_destination_slot_released{destination}` | 1 while it is more than --max-lag-bytes behind the quorum and no longer holds the slot back |
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

/// Which side a process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sender,
    Receiver,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Sender => "sender",
            Role::Receiver => "receiver",
        }
    }
}

/// An LSN gauge: u64, exact in the text output (an LSN below 2^53 is also exact as a float).
pub type LsnGauge = Gauge<u64, AtomicU64>;
type SecondsGauge = Gauge<f64, AtomicU64>;
type KindLabels = Vec<(&'static str, &'static str)>;

fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn unix_now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The registry of one process plus its role-specific metrics.
pub struct Metrics {
    registry: Registry,
    pub role: Role,
    pub recv: Option<Arc<RecvMetrics>>,
    pub send: Option<Arc<SenderMetrics>>,
}

impl Metrics {
    /// Metrics for a receiver process.
    pub fn receiver() -> Metrics {
        let mut registry = common_registry(Role::Receiver);
        let recv = Arc::new(RecvMetrics::new());
        recv.register(&mut registry);
        Metrics {
            registry,
            role: Role::Receiver,
            recv: Some(recv),
            send: None,
        }
    }

    /// Metrics for a sender process.
    pub fn sender() -> Metrics {
        let mut registry = common_registry(Role::Sender);
        let send = Arc::new(SenderMetrics::new());
        send.register(&mut registry);
        Metrics {
            registry,
            role: Role::Sender,
            recv: None,
            send: Some(send),
        }
    }

    /// The registry, for metrics defined outside this module (the archiver's: `archive::ArchiveMetrics`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The exposition text (OpenMetrics 1.0, ends with `# EOF`). Refreshes derived gauges first.
    pub fn encode(&self) -> String {
        if let Some(s) = &self.send {
            s.refresh();
        }
        let mut out = String::with_capacity(8 << 10);
        encode(&mut out, &self.registry).expect("encoding into a String cannot fail");
        out
    }
}

fn common_registry(role: Role) -> Registry {
    let mut registry = Registry::with_prefix("walship");
    registry.register(
        "build",
        "walship build; the value is always 1",
        Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
    );
    registry.register(
        "role",
        "Which side this process is; the value is always 1",
        Info::new(vec![("role", role.as_str())]),
    );
    let start: SecondsGauge = Gauge::default();
    start.set(process_start_unix_s());
    registry.register(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds",
        start,
    );
    registry
}

/// Start time of this process (from /proc/self/stat and the boot time; falls back to "now").
fn process_start_unix_s() -> f64 {
    fn from_proc() -> Option<f64> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Field 22 (starttime, clock ticks since boot); the command name (field 2) may hold spaces.
        let after = stat.rsplit_once(')')?.1;
        let ticks: f64 = after.split_whitespace().nth(19)?.parse().ok()?;
        let btime: f64 = std::fs::read_to_string("/proc/stat")
            .ok()?
            .lines()
            .find_map(|l| l.strip_prefix("btime "))?
            .trim()
            .parse()
            .ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        (hz > 0).then(|| btime + ticks / hz as f64)
    }
    from_proc().unwrap_or_else(unix_now_s)
}

fn kind_counter(family: &Family<KindLabels, Counter>, kind: &'static str) {
    family.get_or_create(&vec![("kind", kind)]).inc();
}

/// Receiver metrics. Cheap to update: every field is an atomic (histograms: one lock per batch).
#[derive(Default)]
pub struct RecvMetrics {
    pub received_lsn: LsnGauge,
    pub written_lsn: LsnGauge,
    pub flushed_lsn: LsnGauge,
    pub connected: Gauge,
    pub bytes: Counter,
    pub frames: Counter,
    pub bytes_written: Counter,
    pub connections: Counter,
    pub fsync_seconds: Option<Histogram>,
    pub fsync_batch_bytes: Option<Histogram>,
    errors: Family<KindLabels, Counter>,
}

/// Receiver error kinds (label values of `walship_recv_errors_total`).
pub mod recv_error {
    pub const PROTOCOL: &str = "protocol";
    pub const CRC: &str = "crc";
    pub const GAP: &str = "gap";
    pub const IDENTITY: &str = "identity";
    pub const TIMEOUT: &str = "peer_timeout";
    pub const NETWORK: &str = "network";
    pub const BUSY: &str = "busy";
    pub const WRITE: &str = "write";
    pub const FSYNC: &str = "fsync";
    pub const OTHER: &str = "other";
    pub const ALL: [&str; 10] = [
        PROTOCOL, CRC, GAP, IDENTITY, TIMEOUT, NETWORK, BUSY, WRITE, FSYNC, OTHER,
    ];
}

/// A point-in-time copy of the receiver's numbers (for a progress line or a test).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvSnapshot {
    pub received_lsn: u64,
    pub written_lsn: u64,
    pub flushed_lsn: u64,
    pub bytes: u64,
    pub frames: u64,
    pub connections: u64,
}

impl RecvMetrics {
    /// Unregistered metrics (updates go nowhere visible): what `recv::run` uses without `--metrics-listen`.
    pub fn new() -> RecvMetrics {
        RecvMetrics {
            // 50 us .. ~13 s, doubling.
            fsync_seconds: Some(Histogram::new(exponential_buckets(0.000_05, 2.0, 19))),
            // 4 KiB .. 1 GiB, doubling.
            fsync_batch_bytes: Some(Histogram::new(exponential_buckets(4096.0, 2.0, 19))),
            ..RecvMetrics::default()
        }
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("recv");
        r.register(
            "received_lsn",
            "End of the last verified data frame (u64 LSN)",
            self.received_lsn.clone(),
        );
        r.register(
            "written_lsn",
            "Every byte below this LSN is written (u64 LSN)",
            self.written_lsn.clone(),
        );
        r.register(
            "flushed_lsn",
            "Every byte below this LSN is durable and acknowledged as flushed (u64 LSN)",
            self.flushed_lsn.clone(),
        );
        r.register("connected", "1 while a sender is connected", self.connected.clone());
        r.register(
            "bytes",
            "WAL payload bytes received in verified data frames",
            self.bytes.clone(),
        );
        r.register("frames", "Verified data frames received", self.frames.clone());
        r.register(
            "bytes_written",
            "Bytes handed to O_DIRECT writes (block-padded, rewrites included)",
            self.bytes_written.clone(),
        );
        r.register(
            "connections",
            "Senders accepted (each reconnect counts)",
            self.connections.clone(),
        );
        if let Some(h) = &self.fsync_seconds {
            r.register("fsync_duration_seconds", "fdatasync latency in seconds", h.clone());
        }
        if let Some(h) = &self.fsync_batch_bytes {
            r.register(
                "fsync_batch_bytes",
                "Bytes made durable per completed fdatasync batch",
                h.clone(),
            );
        }
        zero_kinds(&self.errors, &recv_error::ALL);
        r.register("errors", "Errors by kind", self.errors.clone());
    }

    /// Count one error of `kind` (see [`recv_error`]).
    pub fn inc_error(&self, kind: &'static str) {
        kind_counter(&self.errors, kind);
    }

    /// Record a verified data frame ending at `end_lsn` with `len` payload bytes.
    #[inline]
    pub fn on_frame(&self, end_lsn: u64, len: u64) {
        self.received_lsn.set(end_lsn);
        self.bytes.inc_by(len);
        self.frames.inc();
    }

    /// Record the positions acknowledged to the sender.
    #[inline]
    pub fn set_acked(&self, written: u64, flushed: u64) {
        self.written_lsn.set(written);
        self.flushed_lsn.set(flushed);
        if self.received_lsn.get() < written {
            self.received_lsn.set(written);
        }
    }

    /// One fdatasync completed after `seconds`.
    pub fn observe_fsync(&self, seconds: f64) {
        if let Some(h) = &self.fsync_seconds {
            h.observe(seconds);
        }
    }

    /// A batch completion made `bytes` more bytes durable.
    pub fn observe_fsync_batch(&self, bytes: u64) {
        if let Some(h) = &self.fsync_batch_bytes {
            h.observe(bytes as f64);
        }
    }

    pub fn snapshot(&self) -> RecvSnapshot {
        RecvSnapshot {
            received_lsn: self.received_lsn.get(),
            written_lsn: self.written_lsn.get(),
            flushed_lsn: self.flushed_lsn.get(),
            bytes: self.bytes.get(),
            frames: self.frames.get(),
            connections: self.connections.get(),
        }
    }
}

/// Sender error kinds (label values of `walship_send_errors_total`).
pub mod send_error {
    /// Could not connect, or the handshake failed on the network.
    pub const CONNECT: &str = "connect";
    /// The connection broke while streaming (send/recv failed, peer closed).
    pub const NETWORK: &str = "network";
    /// The receiver acknowledged nothing for `--peer-timeout`.
    pub const TIMEOUT: &str = "peer_timeout";
    /// The receiver refused us (identity, gap, protocol) or broke the protocol.
    pub const REFUSED: &str = "refused";
    /// The source directory: unreadable, or corrupt WAL before the horizon.
    pub const SOURCE: &str = "source";
    pub const OTHER: &str = "other";
    pub const ALL: [&str; 6] = [CONNECT, NETWORK, TIMEOUT, REFUSED, SOURCE, OTHER];
}

/// Create every `kind` at 0, so `increase()` sees the first error and dashboards show the kinds.
fn zero_kinds(family: &Family<KindLabels, Counter>, kinds: &[&'static str]) {
    for &kind in kinds {
        let _ = family.get_or_create(&vec![("kind", kind)]);
    }
}

/// Sender metrics: positions of the current connection, the horizon, lag, traffic, errors.
///
/// All setters take `&self` and are relaxed atomic stores/adds except [`SenderMetrics::on_connected`]
/// and [`SenderMetrics::inc_error`], which take a lock (once per connection / error).
pub struct SenderMetrics {
    sent_lsn: LsnGauge,
    written_lsn: LsnGauge,
    flushed_lsn: LsnGauge,
    horizon_lsn: LsnGauge,
    lag_bytes: LsnGauge,
    lag_seconds: SecondsGauge,
    last_ack_time_seconds: SecondsGauge,
    bytes: Counter,
    connections: Counter,
    reconnects: Counter,
    connected: Family<Vec<(&'static str, String)>, Gauge>,
    errors: Family<KindLabels, Counter>,
    quorum_flushed_lsn: LsnGauge,
    dest_flushed_lsn: Family<Vec<(&'static str, String)>, LsnGauge>,
    dest_lag_bytes: Family<Vec<(&'static str, String)>, LsnGauge>,
    dest_connected: Family<Vec<(&'static str, String)>, Gauge>,
    dest_reconnects: Family<Vec<(&'static str, String)>, Counter>,
    dest_slot_released: Family<Vec<(&'static str, String)>, Gauge>,
    /// Unix time (us) at which the flushed LSN last covered the horizon; start of the current lag.
    caught_up_unix_us: AtomicU64,
    peer: Mutex<Vec<String>>,
}

/// A point-in-time copy of the sender's numbers (for `--once` progress lines).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SenderSnapshot {
    pub sent_lsn: u64,
    pub written_lsn: u64,
    pub flushed_lsn: u64,
    pub horizon_lsn: u64,
    pub lag_bytes: u64,
    pub lag_seconds: f64,
    pub bytes: u64,
    pub connections: u64,
    pub reconnects: u64,
}

impl Default for SenderMetrics {
    fn default() -> Self {
        SenderMetrics::new()
    }
}

impl SenderMetrics {
    /// Unregistered metrics; [`Metrics::sender`] registers them.
    pub fn new() -> SenderMetrics {
        SenderMetrics {
            sent_lsn: Gauge::default(),
            written_lsn: Gauge::default(),
            flushed_lsn: Gauge::default(),
            horizon_lsn: Gauge::default(),
            lag_bytes: Gauge::default(),
            lag_seconds: Gauge::default(),
            last_ack_time_seconds: Gauge::default(),
            bytes: Counter::default(),
            connections: Counter::default(),
            reconnects: Counter::default(),
            connected: Family::default(),
            errors: Family::default(),
            quorum_flushed_lsn: Gauge::default(),
            dest_flushed_lsn: Family::default(),
            dest_lag_bytes: Family::default(),
            dest_connected: Family::default(),
            dest_reconnects: Family::default(),
            dest_slot_released: Family::default(),
            caught_up_unix_us: AtomicU64::new(unix_now_us()),
            peer: Mutex::new(Vec::new()),
        }
    }

    fn register(&self, r: &mut Registry) {
        let r = r.sub_registry_with_prefix("send");
        r.register(
            "sent_lsn",
            "Every byte below this LSN was handed to the kernel on the current connection (u64 LSN)",
            self.sent_lsn.clone(),
        );
        r.register(
            "written_lsn",
            "The receiver acknowledged every byte below this LSN as written (u64 LSN)",
            self.written_lsn.clone(),
        );
        r.register(
            "flushed_lsn",
            "The receiver acknowledged every byte below this LSN as durable (u64 LSN)",
            self.flushed_lsn.clone(),
        );
        r.register(
            "horizon_lsn",
            "The source may be shipped up to this LSN (flush horizon or end of valid WAL)",
            self.horizon_lsn.clone(),
        );
        r.register(
            "lag_bytes",
            "Horizon minus the receiver's flushed LSN, in bytes",
            self.lag_bytes.clone(),
        );
        r.register(
            "lag_seconds",
            "0 while the receiver holds the horizon durably; otherwise seconds since it last did",
            self.lag_seconds.clone(),
        );
        r.register(
            "last_ack_time_seconds",
            "Unix time of the last acknowledgement, in seconds",
            self.last_ack_time_seconds.clone(),
        );
        r.register(
            "connected",
            "1 for the receiver currently connected, 0 for earlier ones",
            self.connected.clone(),
        );
        r.register("bytes", "WAL payload bytes handed to the kernel", self.bytes.clone());
        r.register(
            "connections",
            "Connections made to a receiver",
            self.connections.clone(),
        );
        r.register(
            "reconnects",
            "Connections re-made after losing the receiver",
            self.reconnects.clone(),
        );
        zero_kinds(&self.errors, &send_error::ALL);
        r.register("errors", "Errors by kind", self.errors.clone());
        r.register(
            "quorum_flushed_lsn",
            "The K-th highest acknowledged flushed LSN over the destinations: durable on at least K of them (u64 LSN)",
            self.quorum_flushed_lsn.clone(),
        );
        r.register("destination_flushed_lsn", "Each destination's acknowledged durable position (u64 LSN)", self.dest_flushed_lsn.clone());
        r.register("destination_lag_bytes", "Horizon minus each destination's flushed LSN, in bytes", self.dest_lag_bytes.clone());
        r.register("destination_connected", "1 while the destination is connected", self.dest_connected.clone());
        r.register("destination_reconnects", "Connections to the destination re-made after a loss", self.dest_reconnects.clone());
        r.register(
            "destination_slot_released",
            "1 while the destination is more than --max-lag-bytes behind the quorum and no longer holds the replication slot back",
            self.dest_slot_released.clone(),
        );
    }

    fn dest(to: &str) -> Vec<(&'static str, String)> {
        vec![("destination", to.to_string())]
    }

    /// Destination `to` (connected as `peer`) finished its handshake and streams from `resume`.
    pub fn on_destination_connected(&self, to: &str, peer: &str, resume: u64) {
        self.on_connected(peer);
        self.dest_connected.get_or_create(&Self::dest(to)).set(1);
        self.dest_flushed_lsn.get_or_create(&Self::dest(to)).set(resume);
    }

    /// Destination `to`'s connection ended.
    pub fn on_destination_disconnected(&self, to: &str, peer: &str) {
        self.dest_connected.get_or_create(&Self::dest(to)).set(0);
        self.on_disconnected(peer);
    }

    /// Destination `to` lost its receiver and connects again.
    pub fn inc_destination_reconnects(&self, to: &str) {
        self.dest_reconnects.get_or_create(&Self::dest(to)).inc();
        self.inc_reconnects();
    }

    /// Destination `to` holds everything below `flushed` durably; the horizon is `horizon`.
    pub fn set_destination_flushed(&self, to: &str, flushed: u64, horizon: u64) {
        self.dest_flushed_lsn.get_or_create(&Self::dest(to)).set(flushed);
        self.dest_lag_bytes.get_or_create(&Self::dest(to)).set(horizon.saturating_sub(flushed));
    }

    /// Whether destination `to` stopped holding the slot back (too far behind the quorum).
    pub fn set_destination_dropped(&self, to: &str, dropped: bool) {
        self.dest_slot_released.get_or_create(&Self::dest(to)).set(i64::from(dropped));
    }

    /// The quorum's durable position moved.
    pub fn set_quorum_flushed(&self, lsn: u64) {
        self.quorum_flushed_lsn.set(lsn);
    }

    /// An acknowledgement arrived (stamps its time).
    pub fn on_ack_seen(&self) {
        self.last_ack_time_seconds.set(unix_now_s());
    }

    /// The handshake with `peer` succeeded: it is connected (with several destinations, several
    /// peers are).
    pub fn on_connected(&self, peer: &str) {
        let mut cur = self.peer.lock().expect("peer lock");
        self.connected.get_or_create(&vec![("peer", peer.to_string())]).set(1);
        cur.push(peer.to_string());
        self.connections.inc();
    }

    /// The connection to `peer` ended.
    pub fn on_disconnected(&self, peer: &str) {
        let mut cur = self.peer.lock().expect("peer lock");
        cur.retain(|p| p != peer);
        self.connected.get_or_create(&vec![("peer", peer.to_string())]).set(0);
    }

    /// Positions on the current connection: sent by us; written and flushed as last acknowledged.
    #[inline]
    pub fn set_positions(&self, sent: u64, written: u64, flushed: u64) {
        debug_assert!(
            flushed <= written && written <= sent,
            "positions out of order: {sent} {written} {flushed}"
        );
        self.sent_lsn.set(sent);
        self.written_lsn.set(written);
        self.flushed_lsn.set(flushed);
        self.update_lag(flushed, self.horizon_lsn.get());
    }

    /// An acknowledgement arrived (call with the new positions; also stamps the ack time).
    #[inline]
    pub fn on_ack(&self, sent: u64, written: u64, flushed: u64) {
        self.last_ack_time_seconds.set(unix_now_s());
        self.set_positions(sent, written, flushed);
    }

    /// The source's horizon moved (or was found).
    #[inline]
    pub fn set_horizon(&self, lsn: u64) {
        self.horizon_lsn.set(lsn);
        self.update_lag(self.flushed_lsn.get(), lsn);
    }

    #[inline]
    pub fn add_bytes_sent(&self, n: u64) {
        self.bytes.inc_by(n);
    }

    /// Lost the receiver and about to connect again.
    #[inline]
    pub fn inc_reconnects(&self) {
        self.reconnects.inc();
    }

    /// Count one error of `kind` (see [`send_error`]).
    pub fn inc_error(&self, kind: &'static str) {
        kind_counter(&self.errors, kind);
    }

    fn update_lag(&self, flushed: u64, horizon: u64) {
        self.lag_bytes.set(horizon.saturating_sub(flushed));
        if flushed >= horizon {
            self.caught_up_unix_us.store(unix_now_us(), Ordering::Relaxed);
        }
    }

    fn lag_seconds_now(&self) -> f64 {
        if self.flushed_lsn.get() >= self.horizon_lsn.get() {
            return 0.0;
        }
        let since = self.caught_up_unix_us.load(Ordering::Relaxed);
        unix_now_us().saturating_sub(since) as f64 / 1e6
    }

    /// Recompute the derived gauges (done on every scrape).
    pub fn refresh(&self) {
        self.lag_seconds.set(self.lag_seconds_now());
    }

    pub fn snapshot(&self) -> SenderSnapshot {
        SenderSnapshot {
            sent_lsn: self.sent_lsn.get(),
            written_lsn: self.written_lsn.get(),
            flushed_lsn: self.flushed_lsn.get(),
            horizon_lsn: self.horizon_lsn.get(),
            lag_bytes: self.lag_bytes.get(),
            lag_seconds: self.lag_seconds_now(),
            bytes: self.bytes.get(),
            connections: self.connections.get(),
            reconnects: self.reconnects.get(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {why}")]
pub struct ServeError {
    pub addr: SocketAddr,
    pub why: String,
}

/// Serve `GET /metrics` on `addr` from a thread of its own. Binds before returning, so a busy port
/// fails here, at start-up. Returns the bound address (useful with port 0) and the thread.
pub fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> Result<(SocketAddr, JoinHandle<()>), ServeError> {
    let server = tiny_http::Server::http(addr).map_err(|e| ServeError {
        addr,
        why: e.to_string(),
    })?;
    let bound = server.server_addr().to_ip().unwrap_or(addr);
    let handle = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            for request in server.incoming_requests() {
                let path = request.url().split('?').next().unwrap_or("");
                let response = match (request.method(), path) {
                    (tiny_http::Method::Get, "/metrics") => {
                        let body = metrics.encode();
                        tiny_http::Response::from_string(body).with_header(
                            tiny_http::Header::from_bytes(
                                &b"Content-Type"[..],
                                &b"application/openmetrics-text; version=1.0.0; charset=utf-8"[..],
                            )
                            .expect("static header"),
                        )
                    }
                    (tiny_http::Method::Get, "/") => tiny_http::Response::from_string("walship: metrics at /metrics\n"),
                    _ => tiny_http::Response::from_string("not found; try GET /metrics\n").with_status_code(404),
                };
                if let Err(e) = request.respond(response) {
                    tracing::debug!("metrics response failed: {e}");
                }
            }
        })
        .map_err(|e| ServeError {
            addr,
            why: format!("spawning the metrics thread: {e}"),
        })?;
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receiver_exposition_names_and_values() {
        let m = Metrics::receiver();
        let r = m.recv.as_ref().unwrap();
        r.on_frame(0x100_0000, 4096);
        r.set_acked(0x100_0000, 0xF0_0000);
        r.observe_fsync(0.0002);
        r.observe_fsync_batch(1 << 20);
        r.inc_error(recv_error::CRC);
        let text = m.encode();
        for want in [
            "walship_recv_received_lsn 16777216",
            "walship_recv_written_lsn 16777216",
            "walship_recv_flushed_lsn 15728640",
            "walship_recv_bytes_total 4096",
            "walship_recv_frames_total 1",
            "walship_recv_errors_total{kind=\"crc\"} 1",
            "walship_recv_fsync_duration_seconds_count 1",
            "walship_recv_fsync_batch_bytes_count 1",
            "walship_role_info{role=\"receiver\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(
            text.contains(&format!(
                "walship_build_info{{version=\"{}\"}} 1",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        assert!(text.contains("walship_process_start_time_seconds "), "{text}");
    }

    #[test]
    fn sender_lag_follows_positions_and_horizon() {
        let m = Metrics::sender();
        let s = m.send.as_ref().unwrap();
        s.on_connected("127.0.0.1:5499");
        s.set_horizon(1000);
        s.set_positions(800, 600, 500);
        assert_eq!(s.snapshot().lag_bytes, 500);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(s.snapshot().lag_seconds >= 0.01, "{:?}", s.snapshot());
        s.on_ack(1000, 1000, 1000);
        let snap = s.snapshot();
        assert_eq!((snap.lag_bytes, snap.lag_seconds), (0, 0.0));
        s.on_disconnected("127.0.0.1:5499");
        s.on_connected("127.0.0.1:5500");
        let text = m.encode();
        assert!(
            text.contains("walship_send_connected{peer=\"127.0.0.1:5499\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("walship_send_connected{peer=\"127.0.0.1:5500\"} 1"),
            "{text}"
        );
        assert!(text.contains("walship_send_flushed_lsn 1000"), "{text}");
        assert!(text.contains("walship_send_connections_total 2"), "{text}");
    }

    #[test]
    fn serves_http_and_404s() {
        let m = Arc::new(Metrics::receiver());
        let (addr, _t) = serve("127.0.0.1:0".parse().unwrap(), m).unwrap();
        let body = ureq::get(&format!("http://{addr}/metrics"))
            .call()
            .unwrap()
            .into_body()
            .read_to_string()
            .unwrap();
        assert!(body.contains("walship_recv_flushed_lsn 0"), "{body}");
        let e = ureq::get(&format!("http://{addr}/nope")).call();
        assert!(matches!(e, Err(ureq::Error::StatusCode(404))), "{e:?}");
    }
}
