//! The `walship` binary: flags -> validated config -> library `run`. Errors print once, here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use walship::recv::RecvConfig;
use walship::send::{SendConfig, ZeroCopy};
use walship::wal::gen::GenOptions;

#[derive(Parser)]
#[command(name = "walship", version, about = "Ship PostgreSQL WAL with io_uring; acknowledge only what is durable")]
#[command(after_help = "Every option can also be set by an environment variable (shown as [env: ...]) or in the TOML \
file given by --config (same name with '_': `[recv] fsync_batch_bytes = \"16MiB\"`). \
Precedence: flag > environment > file > default.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// TOML file of option defaults: top-level keys for global options, a [send]/[recv]/... table per subcommand.
    #[arg(long, global = true, env = "WALSHIP_CONFIG", value_name = "FILE", display_order = 900)]
    config: Option<PathBuf>,
    /// Log format on stderr: human (default) or json (one object per line).
    #[arg(long, global = true, env = "WALSHIP_LOG_FORMAT", value_enum, default_value = "human", display_order = 901)]
    log_format: LogFormat,
    /// Log filter: a level (error, warn, info, debug, trace, off) or tracing directives (e.g. walship=debug).
    #[arg(long, global = true, env = "WALSHIP_LOG", default_value = "info", value_name = "FILTER", display_order = 902,
          value_parser = parse_log_filter)]
    log_level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    s.trim().parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|e| format!("not a size ({e}); e.g. 1048576, 1MiB, 64MiB"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("not a duration ({e}); e.g. 30s, 5m, 250ms"))
}

/// A duration that must not be zero (a zero timeout or interval would break the connection or spin).
fn parse_duration_nonzero(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be longer than zero; e.g. 30s, 250ms".into());
    }
    Ok(d)
}

/// A receiver's largest accepted frame, checked by the library's rule (here too, so that a bad value
/// from the environment or the config file is named with its origin).
fn parse_frame_bytes_max(s: &str) -> Result<u64, String> {
    let v = parse_bytes(s)?;
    walship::recv::check_frame_bytes_max(v).map(|_| v).map_err(|e| e.to_string())
}

/// `HOST:PORT` with a port 1..=65535 (`[::1]:5499` for IPv6). Checked at start-up: a typo must not
/// be retried as a transient connection failure for the whole --retry-for.
fn parse_host_port(s: &str) -> Result<String, String> {
    walship::send::check_host_port(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// A log filter: a level name, or `target=level` directives separated by commas. A word that is
/// no level (`inf`) is refused: tracing would take it as a target name and silence every line.
fn parse_log_filter(s: &str) -> Result<String, String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let is_level = |w: &str| LEVELS.contains(&w.trim().to_ascii_lowercase().as_str());
    for directive in s.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let ok = match directive.rsplit_once('=') {
            Some((target, level)) => !target.is_empty() && is_level(level),
            None => is_level(directive) || directive.starts_with("walship"),
        };
        if !ok {
            return Err(format!("{directive:?} is not a log level; use one of {} or TARGET=LEVEL (e.g. walship=debug)", LEVELS.join(", ")));
        }
    }
    tracing_subscriber::EnvFilter::try_new(s).map(|_| s.to_string()).map_err(|e| e.to_string())
}

/// An octal permission mode such as 0640 or 640.
fn parse_file_mode(s: &str) -> Result<u32, String> {
    let mode = u32::from_str_radix(s.trim().trim_start_matches("0o"), 8).map_err(|_| format!("{s:?} is not an octal mode; e.g. 0640"))?;
    walship::recv::check_file_mode(mode).map(|_| mode).map_err(|e| e.to_string())
}

#[derive(Subcommand)]
enum Command {
    /// Ship the WAL in a pg_wal directory (or archive) to a receiver.
    Send(Box<SendArgs>),
    /// Receive WAL into a directory, durably (O_DIRECT + group-commit fdatasync), and acknowledge it.
    Recv(Box<RecvArgs>),
    /// restore_command helper: copy WAL file %f from the receiver directory to %p.
    Restore(RestoreArgs),
    /// Write synthetic, valid PostgreSQL-format WAL segments (for tests, benchmarks and the demo).
    GenWal(GenArgs),
    /// Generate WAL, ship it over loopback to a receiver on this machine, verify and report.
    Demo(DemoArgs),
    /// Show a running sender's or receiver's state, positions, lag and throughput from its /metrics.
    Status(StatusArgs),
    /// Check the WAL of a receiver directory or an archive (s3://BUCKET/PREFIX, reached with the AWS_*
    /// variables): no missing segment per timeline, valid page headers, history files; exit 1 naming the
    /// first problem.
    Verify(VerifyArgs),
    /// Delete archived segments beyond --older-than or --before from s3://BUCKET/PREFIX (reached with the
    /// AWS_* variables), never a history file, a timeline's newest segment, or WAL at or after --keep-from
    /// or the newest base backup's start; prints what it deletes and why the rest stays.
    Prune(PruneArgs),
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("policy").required(true).args(["older_than", "before"])))]
struct PruneArgs {
    /// s3://BUCKET/PREFIX (endpoint and credentials from AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ALLOW_HTTP).
    target: String,
    /// Delete segments uploaded longer ago than this, e.g. 30d.
    #[arg(long, value_parser = parse_duration_nonzero)]
    older_than: Option<Duration>,
    /// Delete segments that end at or below this LSN, e.g. 0/5000000.
    #[arg(long, value_name = "LSN")]
    before: Option<walship::wal::Lsn>,
    /// Never delete a segment holding WAL at or after this LSN.
    #[arg(long, value_name = "LSN")]
    keep_from: Option<walship::wal::Lsn>,
    /// Print what would be deleted; delete nothing.
    #[arg(long)]
    dry_run: bool,
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// A receiver directory, or s3://BUCKET/PREFIX (endpoint and credentials from AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ALLOW_HTTP).
    target: String,
    /// Print one JSON object instead of the human view.
    #[arg(long)]
    json: bool,
    /// Incremental: remember in FILE what was verified (by name and change token) after a good run,
    /// and read only new or changed files next time.
    #[arg(long, value_name = "FILE")]
    state: Option<PathBuf>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The walship metrics endpoint, e.g. http://127.0.0.1:9187/metrics (see --metrics-listen).
    #[arg(long, env = "WALSHIP_STATUS_URL")]
    url: String,
    /// Print one JSON object (for scripts) instead of the human view.
    #[arg(long)]
    json: bool,
    /// Scrape twice this far apart to measure throughput now; 0 = one scrape, average since start only.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    sample: Duration,
    /// Give up on the endpoint after this long.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
}

/// Who may connect: a shared key, or an explicit opt-out.
#[derive(clap::Args)]
struct AuthArgs {
    /// File holding the shared key (at least 16 bytes; e.g. 32 random bytes, base64). Sender and
    /// receiver must use the same key; both prove they know it before any WAL moves.
    #[arg(long, env = "WALSHIP_AUTH_KEY_FILE", conflicts_with = "insecure_no_auth")]
    auth_key_file: Option<PathBuf>,
    /// Run without authentication: anyone who can reach the receiver may write WAL into its
    /// directory. Only for trusted networks and tests.
    #[arg(long, env = "WALSHIP_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
}

impl AuthArgs {
    fn key(&self, side: &str) -> Result<Option<walship::auth::AuthKey>> {
        match (&self.auth_key_file, self.insecure_no_auth) {
            (Some(path), _) => Ok(Some(walship::auth::AuthKey::load(path)?)),
            (None, true) => {
                tracing::warn!("{side} runs WITHOUT authentication (--insecure-no-auth): anyone who can reach it is trusted");
                Ok(None)
            }
            (None, false) => bail!(
                "walship {side} needs --auth-key-file FILE (the key shared by sender and receiver), or --insecure-no-auth \
                 to run without authentication on a trusted network"
            ),
        }
    }
}

#[derive(clap::Args)]
struct SendArgs {
    #[command(flatten)]
    auth: AuthArgs,
    /// Encrypt the connection with TLS 1.3, trusting receivers whose certificate is signed by a CA
    /// in this PEM file (the receiver needs --tls-cert/--tls-key). Costs throughput: see the README.
    #[arg(long, env = "WALSHIP_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// Name the receiver's certificate must carry (DNS name or IP; default: the host of --to).
    /// With several --to: give it once per --to, in the same order (or once, for one --to).
    #[arg(long, env = "WALSHIP_TLS_SERVER_NAME", requires = "tls_ca", value_delimiter = ',')]
    tls_server_name: Vec<String>,
    /// Directory holding WAL segment files (a stopped cluster's pg_wal, or an archive).
    #[arg(long, env = "WALSHIP_PG_WAL")]
    pg_wal: PathBuf,
    /// Receiver address, host:port. Repeat it (or give a comma-separated list) to ship to several
    /// receivers at once, each its own connection, all from one read of the WAL.
    #[arg(long, env = "WALSHIP_TO", value_parser = parse_host_port, value_delimiter = ',', required = true)]
    to: Vec<String>,
    /// How many of the --to receivers must hold WAL durably before the sender counts it durable
    /// (the slot still waits for every receiver within --max-lag-bytes). Default: all of them.
    /// --once exits 3 when only K..N-1 hold the end of WAL after --retry-for.
    #[arg(long, env = "WALSHIP_QUORUM")]
    quorum: Option<usize>,
    /// A receiver further than this behind the quorum stops holding the replication slot back
    /// (loud warning and metric; like max_slot_wal_keep_size) (bytes).
    #[arg(long, env = "WALSHIP_MAX_LAG_BYTES", default_value = "16GiB", value_parser = parse_bytes)]
    max_lag_bytes: u64,
    /// Ship everything valid in the directory (a stopped cluster, an archive), wait until the
    /// receiver holds it durably, exit. Without it, follow the live server given by --conninfo.
    #[arg(long, env = "WALSHIP_ONCE", conflicts_with_all = ["conninfo", "slot"])]
    once: bool,
    /// Follow mode: connection string of the server writing --pg-wal (e.g. "host=/var/run/postgresql
    /// user=postgres dbname=postgres"); its flush LSN is the horizon.
    #[arg(long, env = "WALSHIP_CONNINFO", required_unless_present = "once")]
    conninfo: Option<String>,
    /// Follow mode: physical replication slot that keeps the server's WAL until the receiver holds
    /// it durably (created if missing, advanced only to acknowledged LSNs).
    #[arg(long, env = "WALSHIP_SLOT")]
    slot: Option<String>,
    /// Follow mode: how often to ask the server for its flush LSN at least (the fallback when no
    /// write to pg_wal wakes the poller sooner).
    #[arg(long, env = "WALSHIP_HORIZON_POLL_INTERVAL", default_value = "100ms", value_parser = parse_duration_nonzero)]
    horizon_poll_interval: Duration,
    /// Follow mode: ask for the flush LSN as soon as the server writes to pg_wal (inotify), then
    /// every --horizon-wake-gap until it reaches what was written. `false`: the poll interval only.
    #[arg(long, env = "WALSHIP_HORIZON_WAKE_ON_WRITE", default_value_t = true, action = clap::ArgAction::Set)]
    horizon_wake_on_write: bool,
    /// Follow mode: least time between two flush-LSN questions while following a write to pg_wal.
    #[arg(long, env = "WALSHIP_HORIZON_WAKE_GAP", default_value = "50us", value_parser = parse_duration)]
    horizon_wake_gap: Duration,
    /// Follow mode: advance the slot at most this often.
    #[arg(long, env = "WALSHIP_SLOT_ADVANCE_INTERVAL", default_value = "1s", value_parser = parse_duration_nonzero)]
    slot_advance_interval: Duration,
    /// On SIGTERM, wait at most this long for the receiver to acknowledge the final horizon.
    #[arg(long, env = "WALSHIP_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    shutdown_timeout: Duration,
    /// Keep reconnecting this long after losing the receiver (e.g. 30s, 5m; default 30s with
    /// --once, 1 day when following).
    #[arg(long, env = "WALSHIP_RETRY_FOR", value_parser = parse_duration)]
    retry_for: Option<Duration>,
    /// Zero-copy sends: auto = on for large sends to non-loopback peers.
    #[arg(long, env = "WALSHIP_ZERO_COPY", value_enum, default_value = "auto")]
    zero_copy: ZeroCopy,
    /// Data frame size in bytes; frames end at multiples of it (power of two, 64KiB..16MiB).
    #[arg(long, env = "WALSHIP_FRAME_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    frame_bytes: u64,
    /// Most bytes sent and not yet acknowledged durable by the receiver (bytes: 128MiB).
    #[arg(long, env = "WALSHIP_IN_FLIGHT_BYTES_MAX", default_value = "128MiB", value_parser = parse_bytes)]
    in_flight_bytes_max: u64,
    /// Most bytes handed to the kernel in one sendmsg (bytes; default 8MiB, or --frame-bytes if larger).
    #[arg(long, env = "WALSHIP_SEND_BATCH_BYTES_MAX", value_parser = parse_bytes)]
    send_batch_bytes_max: Option<u64>,
    /// Smallest sendmsg that goes zero-copy when zero-copy is on (bytes).
    #[arg(long, env = "WALSHIP_ZERO_COPY_BYTES_MIN", default_value = "64KiB", value_parser = parse_bytes)]
    zero_copy_bytes_min: u64,
    /// Drop a connection whose receiver acknowledges nothing for this long while data is outstanding (duration).
    #[arg(long, env = "WALSHIP_PEER_TIMEOUT", default_value = "60s", value_parser = parse_duration_nonzero)]
    peer_timeout: Duration,
    /// With --once and no terminal: log a progress line this often (on a terminal a bar is drawn).
    #[arg(long, env = "WALSHIP_PROGRESS_INTERVAL", default_value = "10s", value_parser = parse_duration_nonzero)]
    progress_interval: Duration,
    /// Write a JSON report of the ship to this file.
    #[arg(long, env = "WALSHIP_REPORT_JSON")]
    report_json: Option<PathBuf>,
    /// Name this sender gives itself in the handshake (default: the host name).
    #[arg(long, env = "WALSHIP_NAME")]
    name: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9188 (default: off).
    #[arg(long, env = "WALSHIP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum WriteMode {
    Direct,
    Buffered,
}

#[derive(clap::Args)]
struct RecvArgs {
    #[command(flatten)]
    auth: AuthArgs,
    /// Require TLS 1.3 from senders, presenting this PEM certificate chain (leaf first).
    #[arg(long, env = "WALSHIP_TLS_CERT", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "WALSHIP_TLS_KEY", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:5499 (needed unless --from-postgres; checked after the
    /// --config file is read, which may supply it).
    #[arg(long, env = "WALSHIP_LISTEN")]
    listen: Option<SocketAddr>,
    #[command(flatten)]
    from_postgres: FromPostgresArgs,
    /// Directory to write WAL into (created if missing); must be on a filesystem with O_DIRECT.
    #[arg(long, env = "WALSHIP_DIR")]
    dir: PathBuf,
    /// Buffer slot size in bytes: the unit of O_DIRECT writes (power of two, 64KiB..16MiB).
    #[arg(long, env = "WALSHIP_CHUNK_BYTES", default_value = "1MiB", value_parser = parse_bytes)]
    chunk_bytes: u64,
    /// Buffer pool size in bytes: bounds what is received but not yet written.
    #[arg(long, env = "WALSHIP_IN_FLIGHT_BYTES_MAX", default_value = "64MiB", value_parser = parse_bytes)]
    in_flight_bytes_max: u64,
    /// Cut an fdatasync batch once this many written bytes wait for it (bytes).
    #[arg(long, env = "WALSHIP_FSYNC_BATCH_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    fsync_batch_bytes: u64,
    /// Cut an fdatasync batch once the oldest unsynced write is this many microseconds old.
    #[arg(long, env = "WALSHIP_FSYNC_INTERVAL_US", default_value_t = 1000)]
    fsync_interval_us: u64,
    /// Most fdatasync batches in flight at once (1..=64).
    #[arg(long, env = "WALSHIP_FSYNC_BATCHES_IN_FLIGHT_MAX", default_value_t = 4)]
    fsync_batches_in_flight_max: usize,
    /// Largest data frame accepted, in bytes (64KiB..; at least the sender's --frame-bytes).
    #[arg(long, env = "WALSHIP_FRAME_BYTES_MAX", default_value = "8MiB", value_parser = parse_frame_bytes_max)]
    frame_bytes_max: u64,
    /// Drop a sender that sends nothing for this long (duration).
    #[arg(long, env = "WALSHIP_PEER_TIMEOUT", default_value = "120s", value_parser = parse_duration_nonzero)]
    peer_timeout: Duration,
    /// Send a status acknowledgement at least this often (duration).
    #[arg(long, env = "WALSHIP_STATUS_INTERVAL", default_value = "1s", value_parser = parse_duration_nonzero)]
    status_interval: Duration,
    /// Permission bits of the files the receiver creates (octal). 0640 lets the --group read them.
    #[arg(long, env = "WALSHIP_FILE_MODE", default_value = "0640", value_parser = parse_file_mode)]
    file_mode: u32,
    /// Group (name or number) of the files the receiver creates and of --dir, e.g. `postgres`, so a
    /// standby running as that user can restore from the directory (default: the receiver's group).
    #[arg(long, env = "WALSHIP_GROUP", value_name = "GROUP")]
    group: Option<String>,
    /// Pre-zeroed spare segment files to keep ready in --dir (0..=8; 0: off). A new segment is a
    /// renamed spare, which makes its O_DIRECT writes and fdatasyncs cheaper; costs this many
    /// segments of disk space.
    #[arg(long, env = "WALSHIP_SPARE_SEGMENTS", default_value_t = 2)]
    spare_segments: usize,
    /// When spares are zeroed: `idle` (only while nothing received waits for the disk) or `always`.
    #[arg(long, env = "WALSHIP_SPARE_REFILL", default_value = "idle")]
    spare_refill: walship::recv::spares::SpareRefill,
    /// How segment files are written: `direct` (O_DIRECT from aligned buffers) or `buffered`
    /// (through the page cache; for comparison). Both fdatasync before acknowledging.
    #[arg(long, env = "WALSHIP_WRITE_MODE", value_enum, default_value = "direct")]
    write_mode: WriteMode,
    /// Serve Prometheus metrics at http://ADDR/metrics, e.g. 127.0.0.1:9187 (default: off).
    #[arg(long, env = "WALSHIP_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// On exit, write a JSON report (durable position, writes, fdatasyncs, latencies) to this file.
    #[arg(long, env = "WALSHIP_RECV_REPORT_JSON", value_name = "FILE")]
    report_json: Option<PathBuf>,
    #[command(flatten)]
    archive: ArchiveArgs,
    #[command(flatten)]
    retention: RetentionArgs,
    /// Boxed: the hub's flags would make `recv` the one large variant of `Command`.
    #[command(flatten)]
    hub: Box<HubArgs>,
}

/// The WAL hub (`--serve-replication`): PostgreSQL standbys stream from the receiver.
#[derive(clap::Args)]
struct HubArgs {
    /// Serve PostgreSQL's physical streaming replication protocol on this address, e.g.
    /// 0.0.0.0:5433: a standby's primary_conninfo points here and streams the WAL this receiver
    /// made durable. Needs --replication-password-file.
    #[arg(long, env = "WALSHIP_SERVE_REPLICATION", value_name = "ADDR", requires = "replication_password_file")]
    serve_replication: Option<SocketAddr>,
    /// Who may stream: one `user:password` line per allowed standby user (SCRAM-SHA-256; the
    /// password printable ASCII). The standby sets user= and password= in primary_conninfo.
    #[arg(long, env = "WALSHIP_REPLICATION_PASSWORD_FILE", value_name = "FILE", requires = "serve_replication")]
    replication_password_file: Option<PathBuf>,
    /// Refuse standbys that do not use TLS (needs --tls-cert and --tls-key; without this flag a
    /// standby may use TLS or not, as its sslmode says).
    #[arg(long, env = "WALSHIP_REPLICATION_REQUIRE_TLS", requires = "serve_replication")]
    replication_require_tls: bool,
    /// A keepalive to each streaming standby at least this often (duration).
    #[arg(long, env = "WALSHIP_REPLICATION_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = parse_duration_nonzero)]
    replication_keepalive_interval: Duration,
    /// Drop a standby that sends nothing for this long; also bounds its start-up and
    /// authentication (PostgreSQL's wal_sender_timeout).
    #[arg(long, env = "WALSHIP_REPLICATION_TIMEOUT", default_value = "60s", value_parser = parse_duration_nonzero)]
    replication_timeout: Duration,
    /// WAL bytes per XLogData message sent to a standby (8KiB..16MiB; PostgreSQL sends 128KiB).
    #[arg(long, env = "WALSHIP_REPLICATION_MESSAGE_BYTES_MAX", default_value = "128KiB", value_parser = parse_bytes)]
    replication_message_bytes_max: u64,
    /// Standbys served at once.
    #[arg(long, env = "WALSHIP_REPLICATION_STANDBYS_MAX", default_value_t = 16)]
    replication_standbys_max: usize,
}

impl HubArgs {
    fn config(&self, tls: Option<&walship::tls::TlsServer>) -> Result<Option<walship::hub::HubConfig>> {
        let (Some(listen), Some(file)) = (self.serve_replication, &self.replication_password_file) else { return Ok(None) };
        Ok(Some(walship::hub::HubConfig {
            listen,
            users: walship::hub::scram::Users::load(file)?,
            tls: tls.cloned(),
            require_tls: self.replication_require_tls,
            keepalive_interval: self.replication_keepalive_interval,
            standby_timeout: self.replication_timeout,
            message_bytes_max: usize::try_from(self.replication_message_bytes_max).context("--replication-message-bytes-max too large")?,
            standbys_max: self.replication_standbys_max,
            metrics: walship::hub::HubMetrics::default(),
        }))
    }
}

/// `recv --from-postgres`: receive from a PostgreSQL walsender instead of walship senders.
#[derive(clap::Args)]
struct FromPostgresArgs {
    /// Receive straight from PostgreSQL as a physical replication client (like pg_receivewal),
    /// no walship sender needed: a libpq key=value conninfo or URI, e.g. "host=db port=5432
    /// user=rep sslmode=verify-full sslrootcert=ca.pem" (password= or PGPASSWORD or ~/.pgpass;
    /// sslmode as libpq's, TLS 1.3). Replaces --listen (and the
    /// walship-sender key: --auth-key-file/--insecure-no-auth do not apply).
    #[arg(
        long,
        env = "WALSHIP_FROM_POSTGRES",
        value_name = "CONNINFO",
        conflicts_with_all = ["listen", "tls_cert"]
    )]
    from_postgres: Option<String>,
    /// Physical replication slot to stream from (created with RESERVE_WAL when missing).
    #[arg(long, env = "WALSHIP_SLOT", default_value = "walship", requires = "from_postgres")]
    slot: String,
    /// application_name sent to PostgreSQL: list it in synchronous_standby_names to make walship a
    /// synchronous archive (commits wait for its durable flush). A conninfo application_name wins.
    #[arg(long, env = "WALSHIP_APPLICATION_NAME", default_value = "walship", requires = "from_postgres")]
    application_name: String,
    /// Largest message accepted from PostgreSQL (a walsender sends at most 128KiB of WAL per message).
    #[arg(long, env = "WALSHIP_PG_MESSAGE_BYTES_MAX", default_value = "1MiB", value_parser = parse_bytes)]
    pg_message_bytes_max: u64,
    /// Wait between reconnects once a replication connection was lost.
    #[arg(long, env = "WALSHIP_PG_RETRY_INTERVAL", default_value = "1s", value_parser = parse_duration_nonzero)]
    pg_retry_interval: Duration,
    /// Bound on connecting and on each step before streaming (a conninfo connect_timeout wins).
    #[arg(long, env = "WALSHIP_PG_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration_nonzero)]
    pg_connect_timeout: Duration,
}

impl FromPostgresArgs {
    fn config(&self) -> Result<Option<walship::recv::from_pg::FromPgConfig>> {
        let Some(conninfo) = &self.from_postgres else { return Ok(None) };
        let conninfo = walship::recv::from_pg::ConnInfo::parse(conninfo, &walship::recv::from_pg::conninfo::Env::process())?;
        let cfg = walship::recv::from_pg::FromPgConfig {
            conninfo,
            slot: self.slot.clone(),
            application_name: self.application_name.clone(),
            message_bytes_max: u32::try_from(self.pg_message_bytes_max).unwrap_or(u32::MAX),
            retry_interval: self.pg_retry_interval,
            connect_timeout: self.pg_connect_timeout,
            metrics: walship::recv::from_pg::FromPgMetrics::default(),
        };
        cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
        Ok(Some(cfg))
    }
}

/// Local retention (`--keep-local`): deletes archived segments beyond a policy.
#[derive(clap::Args)]
struct RetentionArgs {
    /// Delete complete segments beyond this policy: a duration (`7d`: older than that) or a size
    /// (`20GiB`: beyond the newest 20 GiB). Only segments already in the --archive-to archive, never
    /// the newest, never at or after a floor (--keep-from, the newest .backup file's start); history
    /// files and .partial are never deleted. Without --archive-to the segments are gone for good.
    #[arg(long, env = "WALSHIP_KEEP_LOCAL", value_name = "SIZE|DURATION", value_parser = walship::archive::retention::parse_keep_local)]
    keep_local: Option<walship::archive::retention::Policy>,
    /// Never delete a segment that holds WAL at or after this LSN (e.g. 0/5000000).
    #[arg(long, env = "WALSHIP_KEEP_FROM", value_name = "LSN", requires = "keep_local")]
    keep_from: Option<walship::wal::Lsn>,
    /// How often local retention looks at the directory.
    #[arg(long, env = "WALSHIP_RETENTION_INTERVAL", default_value = "10s", value_parser = parse_duration_nonzero)]
    retention_interval: Duration,
}

impl RetentionArgs {
    fn config(&self) -> Option<walship::recv::retention::RetentionConfig> {
        let mut cfg = walship::recv::retention::RetentionConfig::new(self.keep_local?);
        cfg.keep_from = self.keep_from;
        cfg.interval = self.retention_interval;
        Some(cfg)
    }
}

/// The object-store archive (`--archive-to s3://BUCKET/PREFIX`); the standard AWS variables set the rest.
#[derive(clap::Args)]
struct ArchiveArgs {
    /// Upload every complete segment and history file to this S3-compatible location, create-only,
    /// with a SHA-256 in each object's metadata, e.g. s3://wal-archive/prod.
    #[arg(long, env = "WALSHIP_ARCHIVE_TO", value_name = "s3://BUCKET/PREFIX")]
    archive_to: Option<String>,
    /// S3 endpoint of a store other than AWS (path-style addressing), e.g. http://127.0.0.1:8333.
    #[arg(long, env = "AWS_ENDPOINT_URL", value_name = "URL")]
    archive_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "AWS_REGION", default_value = walship::archive::settings::DEFAULT_REGION)]
    archive_region: String,
    /// S3 access key id.
    #[arg(long, env = "AWS_ACCESS_KEY_ID", value_name = "ID")]
    archive_access_key_id: Option<String>,
    /// S3 secret access key (better from the environment or the config file than on the command line).
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", value_name = "SECRET", hide_env_values = true, hide_default_value = true)]
    archive_secret_access_key: Option<String>,
    /// S3 session token (temporary credentials).
    #[arg(long, env = "AWS_SESSION_TOKEN", value_name = "TOKEN", hide_env_values = true, hide_default_value = true)]
    archive_session_token: Option<String>,
    /// Allow a plain http:// endpoint that is not a loopback address.
    #[arg(long, env = "AWS_ALLOW_HTTP")]
    archive_allow_http: bool,
    /// Uploads in flight at once (1..=64); each holds one segment in memory.
    #[arg(long, env = "WALSHIP_ARCHIVE_PARALLEL", default_value_t = 4)]
    archive_parallel: usize,
    /// How often the directory is looked at for newly completed segments.
    #[arg(long, env = "WALSHIP_ARCHIVE_SCAN_INTERVAL", default_value = "1s", value_parser = parse_duration_nonzero)]
    archive_scan_interval: Duration,
    /// Upload the newest, unfinished segment as NAME.partial (durable bytes, zeros after; replaced as
    /// it grows, deleted once the segment is archived) after the durable position rested this long,
    /// so the store holds a stopped server's WAL up to its shutdown checkpoint; 0 = never.
    #[arg(long, env = "WALSHIP_ARCHIVE_PARTIAL_AFTER", default_value = "10s", value_parser = parse_duration)]
    archive_partial_after: Duration,
    /// Compress each object: none, zstd or lz4 (the key and the SHA-256 of the file stay the same;
    /// the object's walship-compression metadata says which; reads decompress, then verify).
    #[arg(long, env = "WALSHIP_ARCHIVE_COMPRESS", default_value = "none", value_parser = parse_compression)]
    archive_compress: walship::archive::Compression,
}

fn parse_compression(s: &str) -> Result<walship::archive::Compression, String> {
    walship::archive::Compression::parse(s).ok_or_else(|| format!("{s:?}: expected none, zstd or lz4"))
}

impl ArchiveArgs {
    /// The archive configuration, validated; None without --archive-to.
    fn config(&self) -> Result<Option<walship::archive::ArchiveConfig>> {
        let Some(url) = &self.archive_to else { return Ok(None) };
        let mut s = walship::archive::ArchiveSettings::new(url)?;
        let non_empty = |v: &Option<String>| v.as_ref().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
        s.endpoint = non_empty(&self.archive_endpoint);
        s.region = self.archive_region.trim().to_string();
        s.access_key_id = non_empty(&self.archive_access_key_id);
        s.secret_access_key = non_empty(&self.archive_secret_access_key).map(walship::archive::Secret::new);
        s.session_token = non_empty(&self.archive_session_token).map(walship::archive::Secret::new);
        s.allow_http = self.archive_allow_http;
        let mut cfg = walship::archive::ArchiveConfig::new(s);
        cfg.parallel = self.archive_parallel;
        cfg.scan_interval = self.archive_scan_interval;
        cfg.partial_after = (!self.archive_partial_after.is_zero()).then_some(self.archive_partial_after);
        cfg.compression = self.archive_compress;
        cfg.validate()?;
        Ok(Some(cfg))
    }
}

#[derive(clap::Args)]
struct RestoreArgs {
    /// WAL file name requested by PostgreSQL (%f).
    wal_file: String,
    /// Where PostgreSQL wants it (%p).
    target: PathBuf,
    /// The receiver's directory (asked first when --from is given too).
    #[arg(long, env = "WALSHIP_DIR")]
    dir: Option<PathBuf>,
    /// The archive, s3://BUCKET/PREFIX (endpoint and credentials from AWS_ENDPOINT_URL, AWS_REGION,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ALLOW_HTTP).
    #[arg(long, env = "WALSHIP_RESTORE_FROM", value_name = "s3://BUCKET/PREFIX")]
    from: Option<String>,
    /// Segments to fetch ahead, in parallel, into --cache-dir when a segment is fetched from the archive (0..=64).
    #[arg(long, env = "WALSHIP_RESTORE_PREFETCH", default_value_t = 0)]
    prefetch: usize,
    /// The prefetch cache (relative paths are under the data directory, where PostgreSQL runs restore_command).
    #[arg(long, env = "WALSHIP_RESTORE_CACHE_DIR", default_value = "walship-restore-cache")]
    cache_dir: PathBuf,
    /// The most bytes the prefetch cache holds.
    #[arg(long, env = "WALSHIP_RESTORE_CACHE_BYTES_MAX", default_value = "1GiB", value_parser = parse_bytes)]
    cache_bytes_max: u64,
    /// The cluster whose WAL to restore (default: the system identifier in global/pg_control of the
    /// working directory, else the archive's only cluster).
    #[arg(long)]
    system_id: Option<u64>,
}

#[derive(clap::Args)]
struct GenArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Bytes of valid WAL to generate.
    #[arg(long, default_value = "64MiB", value_parser = parse_bytes)]
    wal_bytes: u64,
    #[arg(long, default_value = "16MiB", value_parser = parse_bytes)]
    seg_size: u64,
    #[arg(long, default_value = "8KiB", value_parser = parse_bytes)]
    block_size: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 7_000_000_000_000_000_001)]
    system_id: u64,
    #[arg(long, default_value_t = 1)]
    timeline: u32,
    /// Extra segment files after the end holding stale WAL, like PostgreSQL's recycled files.
    #[arg(long, default_value_t = 0)]
    recycled_segments: u32,
    /// Largest record in bytes (record sizes are uniform in 24..=this).
    #[arg(long, default_value_t = 24576)]
    record_bytes_max: u32,
    /// Emit an XLOG_SWITCH record in every n-th segment.
    #[arg(long)]
    switch_every_segments: Option<u32>,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// How much WAL to generate and ship.
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    wal_bytes: u64,
    /// Scratch directory (on a disk filesystem, not tmpfs); removed afterwards unless --keep.
    #[arg(long, default_value = "walship-demo")]
    dir: PathBuf,
    #[arg(long)]
    keep: bool,
    /// Loopback port for the demo receiver.
    #[arg(long, default_value_t = 54990)]
    port: u16,
}

fn main() -> ExitCode {
    let cli = match parse_cli() {
        Ok(cli) => cli,
        Err(e) => {
            eprintln!("walship: error: {}", describe_error(&e));
            return ExitCode::from(2);
        }
    };
    init_logging(cli.log_format, &cli.log_level);
    let json_logs = cli.log_format == LogFormat::Json;
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: a JSON log consumer gets it as a log object, a person on the terminal as one line.
            let text = describe_error(&e);
            if json_logs {
                tracing::error!("{text}");
            } else {
                eprintln!("walship: error: {text}");
            }
            ExitCode::from(e.downcast_ref::<Exit>().map_or(1, |x| x.0))
        }
    }
}

/// An error whose exit code is not 1 (restore's "stop recovery" code).
#[derive(Debug)]
struct Exit(u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit code {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// The error chain on one line, each cause once: a cause whose text the message before it already
/// contains (`{path}: {source}` formats) is not repeated.
fn describe_error(e: &anyhow::Error) -> String {
    let mut out = String::new();
    // An exit code given as context is not part of the message.
    let exit = e.downcast_ref::<Exit>().map(|x| x.to_string());
    for cause in e.chain() {
        if cause.downcast_ref::<Exit>().is_some() || exit.as_deref() == Some(&cause.to_string()) {
            continue;
        }
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Flags > environment > `--config` file > defaults: the file's values become clap defaults.
fn parse_cli() -> Result<Cli> {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    let config = walship::config_file::config_path(&args);
    if let Some(path) = &config {
        cmd = walship::config_file::apply_file(cmd, path)?;
    }
    let matches = match cmd.clone().try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => bail!("{}", with_value_origin(&cmd, &args, config.as_deref(), &e)),
    };
    Ok(Cli::from_arg_matches(&matches)?)
}

/// clap's message for a bad value, plus where the value came from when it was not the command
/// line: the `WALSHIP_*` variable or the `--config` file, so the operator knows what to fix.
fn with_value_origin(cmd: &clap::Command, args: &[std::ffi::OsString], config: Option<&std::path::Path>, e: &clap::Error) -> String {
    let rendered = e.render().to_string();
    let text = rendered.trim().trim_start_matches("error: ").to_string();
    let Some(clap::error::ContextValue::String(arg)) = e.get(clap::error::ContextKind::InvalidArg) else { return text };
    let Some(long) = arg.strip_prefix("--").and_then(|a| a.split([' ', '=']).next()) else { return text };
    let on_command_line = args.iter().filter_map(|a| a.to_str()).any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
    if on_command_line {
        return text;
    }
    let env = std::iter::once(cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env().map(|v| v.to_string_lossy().into_owned()));
    match (env.filter(|v| std::env::var_os(v).is_some()), config) {
        (Some(var), _) => format!("{text}\n(the value came from the environment variable {var})"),
        (None, Some(path)) => format!("{text}\n(the value came from the config file {}, key `{}`)", path.display(), long.replace('-', "_")),
        (None, None) => text,
    }
}

/// SIGHUP (a closed terminal, or `systemctl reload`) must neither kill walship silently nor stop
/// the ship: it is logged and otherwise ignored (there is nothing to reload; SIGTERM stops).
fn log_and_ignore_sighup() -> Result<()> {
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGHUP]).context("installing the SIGHUP handler")?;
    std::thread::Builder::new()
        .name("walship-sighup".into())
        .spawn(move || {
            for _ in signals.forever() {
                tracing::warn!("SIGHUP received: walship has no configuration to reload, and keeps running (SIGTERM stops it, draining first)");
            }
        })
        .context("starting the SIGHUP thread")?;
    Ok(())
}

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(level).unwrap_or_else(|e| {
        eprintln!("walship: warning: bad --log-level/WALSHIP_LOG {level:?} ({e}); using info");
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// Start the `/metrics` endpoint when asked to.
fn serve_metrics(listen: Option<SocketAddr>, metrics: &Arc<walship::metrics::Metrics>) -> Result<()> {
    if let Some(addr) = listen {
        let (bound, _thread) = walship::metrics::serve(addr, Arc::clone(metrics))?;
        tracing::info!(metrics = %format_args!("http://{bound}/metrics"), "serving Prometheus metrics");
    }
    Ok(())
}

fn shutdown_flag() -> Result<Arc<AtomicBool>> {
    log_and_ignore_sighup()?;
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&flag)).context("installing signal handlers")?;
    }
    Ok(flag)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Send(a) => run_send(*a),
        Command::Recv(a) => run_recv(*a),
        Command::Restore(a) => run_restore(a),
        Command::GenWal(a) => run_gen_wal(a),
        Command::Demo(a) => Ok(walship::demo::run(&a.dir, a.wal_bytes, a.port, a.keep)?),
        Command::Status(a) => walship::status::run(&a.url, a.sample, a.json, a.timeout),
        Command::Verify(a) => run_verify(a),
        Command::Prune(a) => run_prune(a),
    }
}

/// `walship send`: flags -> SendConfig -> the library, then the summary line and report.
fn run_send(a: SendArgs) -> Result<()> {
    let cfg = send_config(&a)?;
    let metrics = Arc::new(walship::metrics::Metrics::sender());
    serve_metrics(a.metrics_listen, &metrics)?;
    let sender_metrics = metrics.send.clone().expect("sender metrics");
    let progress_interval = a.progress_interval;
    let progress_done = Arc::new(AtomicBool::new(false));
    let progress = cfg.once.then(|| {
        let end = first_segment_size(&cfg.pg_wal).and_then(|seg| walship::send::source::estimate_end(&cfg.pg_wal, seg));
        walship::progress::spawn(Arc::clone(&sender_metrics), end, Arc::clone(&progress_done), progress_interval)
    });
    let result = walship::send::run_with_metrics(&cfg, shutdown_flag()?, sender_metrics);
    progress_done.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    let summary = result.map_err(|e| {
        let quorum_only = matches!(e, walship::send::SendError::QuorumOnly { .. });
        let e = anyhow::Error::new(e);
        if quorum_only {
            e.context(Exit(walship::send::EXIT_QUORUM_ONLY))
        } else {
            e
        }
    })?;
    println!(
        "shipped {} bytes ({} segments) {}..{} in {:.3} s: {:.1} MB/s durable at the receiver",
        summary.bytes,
        summary.segments,
        summary.start_lsn,
        summary.end_lsn,
        summary.seconds,
        summary.mb_per_s()
    );
    if let Some((p50, p99, p999, max)) = summary.ack_latency_percentiles_us() {
        println!("flush-to-durable-ack latency: p50 {p50} us, p99 {p99} us, p99.9 {p999} us, max {max} us");
    }
    if let Some(path) = &a.report_json {
        walship::report::write(path, &walship::report::SendReport::from(&summary))
            .with_context(|| format!("writing the report {}", path.display()))?;
    }
    Ok(())
}

/// The flags as a validated SendConfig, with the key loaded last.
fn send_config(a: &SendArgs) -> Result<SendConfig> {
    let send_batch_bytes_max = a.send_batch_bytes_max.unwrap_or((8 << 20).max(a.frame_bytes));
    let live = a.conninfo.clone().map(|conninfo| walship::send::source::LiveConfig {
        pg_wal: a.pg_wal.clone(),
        conninfo,
        slot: a.slot.clone(),
        poll_interval: a.horizon_poll_interval,
        wake_on_write: a.horizon_wake_on_write,
        wake_gap: a.horizon_wake_gap,
        slot_advance_interval: a.slot_advance_interval,
    });
    let destinations = destinations(a)?;
    let default_retry = if a.once { Duration::from_secs(30) } else { Duration::from_secs(86_400) };
    let mut cfg = SendConfig {
        pg_wal: a.pg_wal.clone(),
        quorum: a.quorum.unwrap_or(destinations.len()),
        max_lag_bytes: a.max_lag_bytes,
        destinations,
        once: a.once,
        retry_for: a.retry_for.unwrap_or(default_retry),
        live,
        shutdown_timeout: a.shutdown_timeout,
        auth: None,
        zero_copy: a.zero_copy,
        frame_bytes: a.frame_bytes,
        in_flight_bytes_max: a.in_flight_bytes_max,
        send_batch_bytes_max,
        zero_copy_bytes_min: a.zero_copy_bytes_min,
        peer_timeout: a.peer_timeout,
        connect_timeout: Duration::from_secs(5),
        name: a.name.clone().unwrap_or_else(host_name),
    };
    // Limits first: a bad value is the one error reported, before any warning about the key.
    cfg.validate()?;
    cfg.auth = a.auth.key("send")?;
    Ok(cfg)
}

/// Each --to with its TLS settings: the server name given for it (by position), else its host.
fn destinations(a: &SendArgs) -> Result<Vec<walship::send::Destination>> {
    let names = &a.tls_server_name;
    if !names.is_empty() && names.len() != a.to.len() {
        bail!("--tls-server-name is given {} times for {} --to: give it once per --to, in the same order", names.len(), a.to.len());
    }
    let ca = a.tls_ca.as_ref();
    a.to.iter()
        .enumerate()
        .map(|(i, to)| {
            let tls = match ca {
                None => None,
                Some(ca) => {
                    let name = names.get(i).cloned().unwrap_or_else(|| walship::tls::host_of(to).to_string());
                    Some(walship::tls::TlsClient::load(ca, &name)?)
                }
            };
            Ok(walship::send::Destination { to: to.clone(), tls })
        })
        .collect()
}

/// `walship recv`: flags -> RecvConfig -> the library, then the report.
fn run_recv(a: RecvArgs) -> Result<()> {
    let from_postgres = a.from_postgres.config()?;
    if a.listen.is_none() && from_postgres.is_none() {
        bail!("walship recv needs --listen ADDR (WALSHIP_LISTEN, or `listen` in the [recv] section of --config) for walship senders, or --from-postgres CONNINFO");
    }
    let mut cfg = RecvConfig {
        // Not used with --from-postgres (nothing listens).
        listen: a.listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))),
        dir: a.dir,
        chunk_bytes: a.chunk_bytes,
        in_flight_bytes_max: a.in_flight_bytes_max,
        fsync_batch_bytes: a.fsync_batch_bytes,
        fsync_interval_us: a.fsync_interval_us,
        fsync_batches_in_flight_max: a.fsync_batches_in_flight_max,
        frame_bytes_max: u32::try_from(a.frame_bytes_max).context("--frame-bytes-max too large")?,
        peer_timeout: a.peer_timeout,
        status_interval: a.status_interval,
        auth: None,
        tls: match (&a.tls_cert, &a.tls_key) {
            (Some(cert), Some(key)) => Some(walship::tls::TlsServer::load(cert, key)?),
            _ => None,
        },
        write_buffered: a.write_mode == WriteMode::Buffered,
        spare_segments: a.spare_segments,
        spare_refill: a.spare_refill,
        access: walship::recv::segment_file::FileAccess {
            file_mode: a.file_mode,
            gid: a.group.as_deref().map(resolve_group).transpose()?,
        },
        archive: a.archive.config()?,
        retention: a.retention.config(),
        hub: None,
    };
    cfg.hub = a.hub.config(cfg.tls.as_ref())?;
    // Limits first: a bad value is the one error reported, before any warning about the key.
    cfg.validate()?;
    if from_postgres.is_none() {
        cfg.auth = a.auth.key("recv")?;
    }
    let mut metrics = walship::metrics::Metrics::receiver();
    if let Some(archive) = &cfg.archive {
        archive.metrics.register(metrics.registry_mut());
    }
    if let Some(retention) = &cfg.retention {
        retention.metrics.register(metrics.registry_mut());
    }
    if let Some(hub) = &cfg.hub {
        hub.metrics.register(metrics.registry_mut());
    }
    if let Some(pg) = &from_postgres {
        pg.metrics.register(metrics.registry_mut());
    }
    let metrics = Arc::new(metrics);
    serve_metrics(a.metrics_listen, &metrics)?;
    let recv_metrics = metrics.recv.clone().expect("receiver metrics");
    let summary = match from_postgres {
        Some(pg) => walship::recv::run_from_postgres(&cfg, pg, shutdown_flag()?, recv_metrics)?,
        None => walship::recv::run_with_metrics(&cfg, shutdown_flag()?, recv_metrics)?,
    };
    if let Some(path) = a.report_json {
        walship::report::write(&path, &walship::report::RecvReport::from(&summary))
            .with_context(|| format!("writing the report {}", path.display()))?;
    }
    Ok(())
}

/// `walship restore`: exit 1 for "not (yet) there", above 125 for anything that must stop recovery.
/// With --dir and --from, the directory is asked first and the archive when the directory has no such file.
fn run_restore(a: RestoreArgs) -> Result<()> {
    use walship::restore::{EXIT_FATAL, EXIT_NOT_FOUND};
    let mut not_found = Vec::new();
    if let Some(dir) = &a.dir {
        match walship::restore::restore(dir, &a.wal_file, &a.target) {
            Ok(outcome) => {
                eprintln!("walship restore: {outcome}");
                return Ok(());
            }
            Err(e) if e.exit_code() == EXIT_NOT_FOUND => not_found.push(e.to_string()),
            // Anything else stops recovery (exit above 125) instead of letting it promote on a partial archive.
            Err(e) => {
                let code = e.exit_code();
                return Err(anyhow::Error::new(e).context(Exit(code)));
            }
        }
    }
    if let Some(url) = &a.from {
        let cfg = walship::archive::restore::FetchConfig {
            settings: walship::archive::ArchiveSettings::from_env(url).context(Exit(EXIT_FATAL))?,
            system_id: a.system_id,
            prefetch_count: a.prefetch,
            cache_dir: a.cache_dir.clone(),
            cache_bytes_max: a.cache_bytes_max,
            data_dir: PathBuf::from("."),
        };
        match walship::archive::restore::restore_from_archive(&cfg, &a.wal_file, &a.target) {
            Ok(served) => {
                eprintln!("walship restore: {served}");
                return Ok(());
            }
            Err(e) if e.is_not_found() => not_found.push(e.to_string()),
            Err(e) => return Err(anyhow::Error::new(e).context(Exit(EXIT_FATAL))),
        }
    }
    if not_found.is_empty() {
        return Err(anyhow::anyhow!("walship restore needs --dir DIR or --from s3://BUCKET/PREFIX (or both)").context(Exit(EXIT_FATAL)));
    }
    // "Not (yet) there" is one plain line and exit 1.
    eprintln!("walship restore: {}", not_found.join("; "));
    std::process::exit(i32::from(EXIT_NOT_FOUND));
}

/// `walship gen-wal`: synthetic valid WAL, and one JSON line describing it.
fn run_gen_wal(a: GenArgs) -> Result<()> {
    let opts = GenOptions {
        dir: a.dir,
        system_id: a.system_id,
        tli: a.timeline,
        seg_size: a.seg_size,
        block_size: a.block_size,
        wal_bytes: a.wal_bytes,
        seed: a.seed,
        recycled_segments: a.recycled_segments,
        record_bytes_max: a.record_bytes_max,
        switch_every_segments: a.switch_every_segments,
        ..GenOptions::default()
    };
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("creating {}", opts.dir.display()))?;
    let report = walship::wal::gen::generate(&opts).context("generating WAL")?;
    println!(
        "{{\"first_lsn\":\"{}\",\"end_lsn\":\"{}\",\"segments\":{},\"records\":{},\"bytes\":{}}}",
        report.first_lsn,
        report.end_lsn,
        report.segment_files.len(),
        report.records,
        report.end_lsn - report.first_lsn
    );
    Ok(())
}

/// `walship verify DIR | s3://...`: exit 0 when the WAL checks out, else 1 naming the first problem.
fn run_verify(a: VerifyArgs) -> Result<()> {
    use walship::archive::verify;
    let report = if a.target.starts_with("s3://") {
        verify::verify_store_incremental(&walship::archive::ArchiveSettings::from_env(&a.target)?, a.state.as_deref())?
    } else {
        verify::verify_dir_incremental(std::path::Path::new(&a.target), a.state.as_deref())?
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for t in &report.timelines {
            println!(
                "system {} timeline {}: {} segments {}..{}{}",
                t.system_id,
                t.timeline,
                t.segments,
                t.first.as_deref().unwrap_or("-"),
                t.last.as_deref().unwrap_or("-"),
                if t.history { ", history file" } else { "" }
            );
            if let Some(p) = &t.partial {
                println!("  {p}");
            }
        }
        println!(
            "{}: {} files, {} bytes checked ({} .partial files seen, {} skipped as already verified)",
            report.target, report.files_checked, report.bytes_checked, report.partial_files, report.skipped_verified
        );
    }
    match &report.problem {
        None => {
            if !a.json {
                println!("OK");
            }
            Ok(())
        }
        Some(p) => bail!("verify: {p}"),
    }
}

/// `walship prune s3://...`: what it deletes (or would) and why the rest stays, on stdout.
fn run_prune(a: PruneArgs) -> Result<()> {
    use walship::archive::retention::Policy;
    if !a.target.starts_with("s3://") {
        bail!("prune works on an archive (s3://BUCKET/PREFIX), not {:?}; a receiver directory is pruned by recv --keep-local", a.target);
    }
    let policy = match (a.older_than, a.before) {
        (Some(d), _) => Policy::KeepAge(d),
        (None, Some(l)) => Policy::Before(l),
        (None, None) => bail!("prune needs --older-than DURATION or --before LSN"),
    };
    let opts = walship::archive::prune::PruneOptions { policy, keep_from: a.keep_from, dry_run: a.dry_run };
    let settings = walship::archive::ArchiveSettings::from_env(&a.target)?;
    let done = walship::archive::prune::prune_store(&settings, &opts, &mut std::io::stdout())?;
    if done.is_empty() {
        println!("{}: no cluster with segments under this prefix; nothing to do", a.target);
    }
    Ok(())
}

/// The segment size of the WAL in `dir`, from the size of its first segment-named file.
fn first_segment_size(dir: &std::path::Path) -> Option<u64> {
    std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let name = e.file_name().into_string().ok()?;
        walship::wal::has_segment_name_shape(&name).then(|| e.metadata().ok().map(|m| m.len()))?
    })
}

/// A group name (`postgres`) or number.
fn resolve_group(group: &str) -> Result<u32> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(group) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => bail!("--group {group}: no such group on this host"),
        Err(e) => bail!("--group {group}: cannot look the group up: {e}"),
    }
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "walship".into())
}
