//! The WAL hub (`walship recv --serve-replication ADDR`): serves PostgreSQL's physical streaming
//! replication protocol from the receiver's directory, so real standbys stream from the receiver
//! instead of the primary. Only WAL the receiver made durable is ever sent.
//!
//! Plain blocking threads, one per standby (and a reader thread while it streams): a hub serves a
//! handful of standbys, each mostly asleep on the [`Hub`] condvar that the receive loop notifies
//! when `flushed` moves; the io_uring loop stays the receiver's alone, and a slow or hostile
//! standby can never stall or fail WAL receiving (a hub error ends that standby's connection only).
pub mod proto;
pub mod scram;
mod session;
#[cfg(test)]
mod session_tests;
mod wal_read;

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

use crate::metrics::LsnGauge;
use crate::tls::TlsServer;
use crate::wal::{Lsn, WalIdentity};

/// Largest WAL payload of one XLogData message accepted for `--replication-message-bytes-max`.
pub const MESSAGE_BYTES_MAX_LIMIT: usize = 16 << 20;
/// Connections still starting up (not yet authenticated) allowed beside the standbys: bounds the
/// threads a flood of connections can make (each lives at most `--replication-timeout`).
pub const CONNECTIONS_STARTING_MAX: usize = 16;

/// Everything the hub needs, validated.
#[derive(Debug, Clone)]
pub struct HubConfig {
    pub listen: SocketAddr,
    /// Who may stream (from `--replication-password-file`).
    pub users: scram::Users,
    /// TLS for standbys that ask for it (SSLRequest), from `--tls-cert/--tls-key`.
    pub tls: Option<TlsServer>,
    /// Refuse standbys that do not use TLS (`--replication-require-tls`).
    pub require_tls: bool,
    /// A keepalive at least this often while a standby streams (`--replication-keepalive-interval`).
    pub keepalive_interval: Duration,
    /// Drop a standby silent this long, and bound the start-up and authentication
    /// (`--replication-timeout`, PostgreSQL's `wal_sender_timeout`).
    pub standby_timeout: Duration,
    /// WAL bytes per XLogData message (`--replication-message-bytes-max`; PostgreSQL sends 128 KiB).
    pub message_bytes_max: usize,
    /// Standbys served at once (`--replication-standbys-max`).
    pub standbys_max: usize,
    pub metrics: HubMetrics,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HubConfigError {
    #[error("--replication-message-bytes-max must be between 8192 and {MESSAGE_BYTES_MAX_LIMIT}, got {0}")]
    MessageBytes(usize),
    #[error("--replication-standbys-max must be between 1 and 1000, got {0}")]
    Standbys(usize),
    #[error("--{0} must be longer than zero")]
    ZeroDuration(&'static str),
    #[error("--replication-require-tls needs --tls-cert and --tls-key")]
    RequireTlsWithoutTls,
}

impl HubConfig {
    pub fn validate(&self) -> Result<(), HubConfigError> {
        if !(8192..=MESSAGE_BYTES_MAX_LIMIT).contains(&self.message_bytes_max) {
            return Err(HubConfigError::MessageBytes(self.message_bytes_max));
        }
        if !(1..=1000).contains(&self.standbys_max) {
            return Err(HubConfigError::Standbys(self.standbys_max));
        }
        if self.keepalive_interval.is_zero() {
            return Err(HubConfigError::ZeroDuration("replication-keepalive-interval"));
        }
        if self.standby_timeout.is_zero() {
            return Err(HubConfigError::ZeroDuration("replication-timeout"));
        }
        if self.require_tls && self.tls.is_none() {
            return Err(HubConfigError::RequireTlsWithoutTls);
        }
        Ok(())
    }
}

type StandbyLabels = Vec<(&'static str, String)>;

/// The hub's metrics (like `pg_stat_replication`): one series per connected standby, labelled
/// `standby="application_name@address"`, removed when it disconnects.
#[derive(Debug, Clone, Default)]
pub struct HubMetrics {
    pub standbys_connected: Gauge,
    sent_lsn: Family<StandbyLabels, LsnGauge>,
    write_lsn: Family<StandbyLabels, LsnGauge>,
    flush_lsn: Family<StandbyLabels, LsnGauge>,
    replay_lsn: Family<StandbyLabels, LsnGauge>,
}

impl HubMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register("recv_standbys_connected", "Standbys streaming from this receiver's WAL hub", self.standbys_connected.clone());
        registry.register("recv_standby_sent_lsn", "LSN up to which WAL was sent to the standby", self.sent_lsn.clone());
        registry.register("recv_standby_write_lsn", "The standby's reported write position", self.write_lsn.clone());
        registry.register("recv_standby_flush_lsn", "The standby's reported flush position (durable on the standby)", self.flush_lsn.clone());
        registry.register("recv_standby_replay_lsn", "The standby's reported replay (apply) position", self.replay_lsn.clone());
    }

    fn set(&self, label: &str, s: &StandbyStatus) {
        let l = vec![("standby", label.to_string())];
        self.sent_lsn.get_or_create(&l).set(s.sent.0);
        self.write_lsn.get_or_create(&l).set(s.write.0);
        self.flush_lsn.get_or_create(&l).set(s.flush.0);
        self.replay_lsn.get_or_create(&l).set(s.replay.0);
    }

    fn remove(&self, label: &str) {
        let l = vec![("standby", label.to_string())];
        for f in [&self.sent_lsn, &self.write_lsn, &self.flush_lsn, &self.replay_lsn] {
            f.remove(&l);
        }
    }
}

/// What the receiver has made durable, as the hub sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Durable {
    /// The WAL's identity and newest timeline (None: the directory holds no WAL yet).
    pub identity: Option<WalIdentity>,
    /// Everything below this LSN, on `identity.tli`, is durable in the directory.
    pub flushed: Lsn,
    /// The receiver is stopping: standbys get what is durable and are disconnected.
    pub stopping: bool,
    /// Bumped on every change, so a waiter knows something moved.
    pub generation: u64,
}

/// One served standby, like a row of `pg_stat_replication`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyStatus {
    pub application_name: String,
    pub user: String,
    pub peer: SocketAddr,
    pub tls: bool,
    /// "startup", "streaming" or "catchup" (streaming a historic timeline).
    pub state: &'static str,
    pub timeline: u32,
    pub sent: Lsn,
    pub write: Lsn,
    pub flush: Lsn,
    pub replay: Lsn,
    /// From the last hot standby feedback ('h'), if any.
    pub xmin: Option<u32>,
}

impl StandbyStatus {
    pub fn label(&self) -> String {
        format!("{}@{}", self.application_name, self.peer)
    }
}

/// State shared between the receive loop (which publishes durable positions) and the standbys.
#[derive(Debug)]
pub struct Hub {
    durable: Mutex<Durable>,
    changed: Condvar,
    standbys: Mutex<BTreeMap<u64, StandbyStatus>>,
    next_id: AtomicU64,
    metrics: HubMetrics,
}

impl Hub {
    pub fn new(metrics: HubMetrics) -> Hub {
        Hub { durable: Mutex::new(Durable::default()), changed: Condvar::new(), standbys: Mutex::new(BTreeMap::new()), next_id: AtomicU64::new(1), metrics }
    }

    fn lock(&self) -> MutexGuard<'_, Durable> {
        self.durable.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The receiver's identity and durable position (at start-up, and after a timeline switch).
    pub fn publish_identity(&self, identity: WalIdentity, flushed: Lsn) {
        let mut d = self.lock();
        d.identity = Some(identity);
        d.flushed = flushed;
        d.generation += 1;
        self.changed.notify_all();
    }

    /// `flushed` moved (called from the receiver's publish path, after fdatasync).
    pub fn publish_flushed(&self, flushed: Lsn) {
        let mut d = self.lock();
        if d.flushed != flushed {
            d.flushed = flushed;
            d.generation += 1;
            self.changed.notify_all();
        }
    }

    /// The receiver stops: every standby is told and disconnected.
    pub fn stop(&self) {
        let mut d = self.lock();
        d.stopping = true;
        d.generation += 1;
        self.changed.notify_all();
    }

    pub fn durable(&self) -> Durable {
        *self.lock()
    }

    /// Wakes every waiting standby (a standby's reader saw something its writer must act on).
    fn poke(&self) {
        let _d = self.lock();
        self.changed.notify_all();
    }

    /// Waits until the durable state changes from `seen` (its generation), `woken()` says so, or
    /// `timeout` passes.
    fn wait(&self, seen: u64, timeout: Duration, woken: impl Fn() -> bool) -> Durable {
        let d = self.lock();
        let (d, _) = self.changed.wait_timeout_while(d, timeout, |d| d.generation == seen && !woken()).unwrap_or_else(|e| e.into_inner());
        *d
    }

    /// The standbys being served, oldest connection first.
    pub fn standbys(&self) -> Vec<StandbyStatus> {
        self.standbys.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    fn register(&self, status: StandbyStatus) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.metrics.set(&status.label(), &status);
        let mut s = self.standbys.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(id, status);
        self.metrics.standbys_connected.set(s.len() as i64);
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut StandbyStatus)) {
        let mut s = self.standbys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = s.get_mut(&id) {
            f(st);
            self.metrics.set(&st.label(), st);
        }
    }

    fn unregister(&self, id: u64) {
        let mut s = self.standbys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(st) = s.remove(&id) {
            self.metrics.remove(&st.label());
        }
        self.metrics.standbys_connected.set(s.len() as i64);
    }

    fn sessions(&self) -> usize {
        self.standbys.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(transparent)]
    Config(#[from] HubConfigError),
    #[error("cannot listen for standbys on {addr} (--serve-replication): {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the WAL hub's thread: {0}")]
    Thread(std::io::Error),
}

/// The running hub: dropping it stops it (standbys are told and disconnected).
#[derive(Debug)]
pub struct HubHandle {
    pub hub: Arc<Hub>,
    pub addr: SocketAddr,
}

impl Drop for HubHandle {
    fn drop(&mut self) {
        self.hub.stop();
        // Wake the accept loop so it sees the stop.
        let _ = std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Binds the hub's port (before the receiver touches its directory) and starts accepting
/// standbys; WAL is read from `dir`.
pub fn start(cfg: &HubConfig, dir: &std::path::Path) -> Result<HubHandle, HubError> {
    cfg.validate()?;
    let listener = TcpListener::bind(cfg.listen).map_err(|source| HubError::Listen { addr: cfg.listen, source })?;
    let addr = listener.local_addr().map_err(|source| HubError::Listen { addr: cfg.listen, source })?;
    let hub = Arc::new(Hub::new(cfg.metrics.clone()));
    let (cfg, dir, h) = (Arc::new(cfg.clone()), dir.to_path_buf(), Arc::clone(&hub));
    std::thread::Builder::new()
        .name("walship-hub".into())
        .spawn(move || accept_loop(listener, h, cfg, dir))
        .map_err(HubError::Thread)?;
    info!(listen = %addr, "serving PostgreSQL streaming replication to standbys on {addr}");
    Ok(HubHandle { hub, addr })
}

fn accept_loop(listener: TcpListener, hub: Arc<Hub>, cfg: Arc<HubConfig>, dir: std::path::PathBuf) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for stream in listener.incoming() {
        if hub.durable().stopping {
            return;
        }
        let tcp = match stream {
            Ok(s) => s,
            Err(e) => {
                warn!("accepting a standby failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let peer = match tcp.peer_addr() {
            Ok(p) => p,
            Err(_) => continue,
        };
        let _ = tcp.set_nodelay(true);
        if open.load(Ordering::Relaxed) >= cfg.standbys_max + CONNECTIONS_STARTING_MAX {
            warn!(peer = %peer, "refused a connection from {peer}: {} connections are open already", cfg.standbys_max + CONNECTIONS_STARTING_MAX);
            continue;
        }
        open.fetch_add(1, Ordering::Relaxed);
        let (hub, cfg, dir, done) = (Arc::clone(&hub), Arc::clone(&cfg), dir.clone(), Arc::clone(&open));
        let spawned = std::thread::Builder::new().name("walship-standby".into()).spawn(move || {
            session::serve(hub, cfg, dir, tcp, peer);
            done.fetch_sub(1, Ordering::Relaxed);
        });
        if let Err(e) = spawned {
            open.fetch_sub(1, Ordering::Relaxed);
            warn!(peer = %peer, "cannot start a thread for standby {peer}: {e}");
        }
    }
}

/// PostgreSQL's major version for a WAL page magic (`XLOG_PAGE_MAGIC`), for `server_version`.
pub fn server_version_for_magic(magic: u16) -> Option<&'static str> {
    Some(match magic {
        0xD106 => "13.0",
        0xD10D => "14.0",
        0xD110 => "15.0",
        0xD113 => "16.0",
        0xD116 => "17.0",
        0xD118 => "18.0",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(tli: u32) -> WalIdentity {
        WalIdentity { system_id: 7, seg_size: 16 << 20, block_size: 8192, magic: 0xD110, tli }
    }

    #[test]
    fn a_waiting_standby_wakes_when_flushed_moves_not_by_polling() {
        let hub = Arc::new(Hub::new(HubMetrics::default()));
        hub.publish_identity(id(1), Lsn(100));
        let seen = hub.durable().generation;
        let h = Arc::clone(&hub);
        let t = std::thread::spawn(move || {
            let start = std::time::Instant::now();
            let d = h.wait(seen, Duration::from_secs(30), || false);
            (d.flushed, start.elapsed())
        });
        std::thread::sleep(Duration::from_millis(50));
        hub.publish_flushed(Lsn(200));
        let (flushed, waited) = t.join().unwrap();
        assert_eq!(flushed, Lsn(200));
        assert!(waited < Duration::from_secs(5), "woken by the publish, not the timeout: {waited:?}");
        // Publishing the same position is not a change.
        let g = hub.durable().generation;
        hub.publish_flushed(Lsn(200));
        assert_eq!(hub.durable().generation, g);
    }

    #[test]
    fn standbys_are_listed_and_their_metrics_removed_when_they_go() {
        let metrics = HubMetrics::default();
        let hub = Hub::new(metrics.clone());
        let st = StandbyStatus {
            application_name: "s1".into(),
            user: "rep".into(),
            peer: "127.0.0.1:5000".parse().unwrap(),
            tls: false,
            state: "streaming",
            timeline: 1,
            sent: Lsn(10),
            write: Lsn(0),
            flush: Lsn(0),
            replay: Lsn(0),
            xmin: None,
        };
        let n = hub.register(st);
        hub.update(n, |s| s.replay = Lsn(9));
        assert_eq!(hub.standbys()[0].replay, Lsn(9));
        let mut reg = Registry::with_prefix("walship");
        metrics.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(text.contains("walship_recv_standby_replay_lsn{standby=\"s1@127.0.0.1:5000\"} 9"), "{text}");
        assert!(text.contains("walship_recv_standbys_connected 1"), "{text}");
        // `walship status` shows it like a row of pg_stat_replication.
        let scrape = crate::status::Scrape { samples: crate::status::parse_exposition(&text).unwrap(), at: std::time::Instant::now() };
        let v = crate::status::view("u", &scrape, None);
        assert_eq!(v.standbys.len(), 1);
        assert_eq!((v.standbys[0].standby.as_str(), v.standbys[0].sent.as_str(), v.standbys[0].replay.as_str()), ("s1@127.0.0.1:5000", "0/0000000A", "0/00000009"));
        assert!(v.render().contains("standby      s1@127.0.0.1:5000 sent 0/0000000A"), "{}", v.render());
        hub.unregister(n);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(!text.contains("s1@"), "{text}");
        assert!(hub.standbys().is_empty());
    }

    #[test]
    fn the_config_is_checked() {
        let users = scram::Users::parse("u:p\n", std::path::Path::new("f")).unwrap();
        let good = HubConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            users,
            tls: None,
            require_tls: false,
            keepalive_interval: Duration::from_secs(10),
            standby_timeout: Duration::from_secs(60),
            message_bytes_max: 128 << 10,
            standbys_max: 16,
            metrics: HubMetrics::default(),
        };
        good.validate().unwrap();
        let mut c = good.clone();
        c.require_tls = true;
        assert_eq!(c.validate(), Err(HubConfigError::RequireTlsWithoutTls));
        let mut c = good.clone();
        c.message_bytes_max = 100;
        assert!(c.validate().is_err());
        let mut c = good;
        c.keepalive_interval = Duration::ZERO;
        assert!(c.validate().is_err());
    }
}
