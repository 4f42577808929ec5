//! The replay-and-verify step every real-PostgreSQL test ends with: a standby made from a base backup
//! with an EMPTY pg_wal (recovery would otherwise fall back to the backup's own WAL and hide a missing
//! segment), fed only by `walship restore` from a receiver directory, must replay to exactly the target
//! LSN, show the source's table checksums, and have restored every expected file (never a `.partial`
//! name). Returns the standby, stopped, for checks of its pg_control.
#![allow(dead_code)]

use super::pg::*;
use super::*;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const REPLAY_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Replay<'a> {
    /// The standby to create (its `data` must not exist yet).
    pub standby: Server,
    /// The base backup to copy.
    pub base: &'a Path,
    /// The `walship` binary the postgres user can run, and the receiver directory it restores from.
    pub restore_exe: PathBuf,
    pub recv_dir: &'a Path,
    /// Extra postgresql.conf lines (e.g. `recovery_target_timeline = 'latest'`).
    pub extra_conf: &'a str,
    /// Replay must reach exactly this LSN.
    pub target: u64,
    /// `(table, checksum)` of the source, from [`checksums`].
    pub sums: &'a [(String, String)],
    /// Files the standby's log must show as `restored log file "NAME"`.
    pub want_restored: Vec<String>,
}

/// Builds the standby, replays, verifies; `say` prints progress.
pub fn replay_and_verify(r: Replay<'_>, say: &dyn Fn(String)) -> R<Server> {
    let mut standby = r.standby;
    standby_data_from_base(r.base, &standby.data)?;
    let restore = format!("{} restore %f %p --dir {}", r.restore_exe.display(), r.recv_dir.display());
    append(
        &standby.data.join("postgresql.auto.conf"),
        &format!(
            "\n# walship replay-and-verify standby\nport = {}\nunix_socket_directories = '{}'\nrestore_command = '{restore}'\n\
             hot_standby = on\nwal_retrieve_retry_interval = '1s'\n{}\n",
            standby.port,
            standby.sock.display(),
            r.extra_conf
        ),
    )?;
    standby.pg.chown(&standby.data)?;
    chmod_a_rx(r.recv_dir).map_err(|e| format!("chmod -R a+rX {}: {e}", r.recv_dir.display()))?;
    say(format!("{}: restore_command = '{restore}', replaying to {}", standby.name, fmt_lsn(r.target)));
    standby.pg_ctl_start(false)?;
    let reached = wait_for_replay(&standby, r.target)?;
    if reached != r.target {
        return Err(standby.err(format!("pg_last_wal_replay_lsn() = {} != the source's end of WAL {}", fmt_lsn(reached), fmt_lsn(r.target))));
    }
    if standby.sql("SELECT pg_is_in_recovery()")? != "t" {
        return Err(standby.err(format!("{} is not in recovery", standby.name)));
    }
    compare_checksums(&standby, r.sums)?;
    say(format!("all {} table checksums equal the source's", r.sums.len()));
    check_restored(&standby, &r.want_restored, say)?;
    standby.stop("fast")?;
    Ok(standby)
}

/// Polls `pg_last_wal_replay_lsn()` until it reaches `target`; a standby that died is an error at once.
fn wait_for_replay(standby: &Server, target: u64) -> R<u64> {
    let t0 = Instant::now();
    let mut last = String::new();
    poll_until(REPLAY_TIMEOUT, Duration::from_millis(250), || match standby.sql_quiet("SELECT pg_last_wal_replay_lsn()") {
        Ok(s) => {
            last = s.clone();
            parse_lsn(&s).filter(|&l| l >= target).map(Ok)
        }
        Err(e) => {
            last = e;
            if t0.elapsed() > Duration::from_secs(3) && !standby.alive() {
                Some(Err(standby.err(format!("{} died during recovery (last psql: {last})", standby.name))))
            } else {
                None
            }
        }
    })
    .ok_or_else(|| standby.err(format!("{} did not replay to {} within {REPLAY_TIMEOUT:?}; last: {last}", standby.name, fmt_lsn(target))))?
}

fn compare_checksums(standby: &Server, sums: &[(String, String)]) -> R<()> {
    let got = checksums_of(standby, sums.iter().map(|(t, _)| t.as_str()))?;
    let mut bad = String::new();
    for ((tbl, want), (_, have)) in sums.iter().zip(&got) {
        if want != have {
            let _ = writeln!(bad, "  {tbl}: source  {want}\n  {tbl}: standby {have}");
        }
    }
    if bad.is_empty() && got.len() == sums.len() {
        Ok(())
    } else {
        Err(standby.err(format!("checksums differ after replay:\n{bad}")))
    }
}

/// Every wanted file shows up as restored in the standby's log, and recovery never asked for a
/// `.partial` name (walship restore's stderr lands in the server log).
fn check_restored(standby: &Server, want: &[String], say: &dyn Fn(String)) -> R<()> {
    let log = fs::read_to_string(&standby.log).unwrap_or_default();
    let restored: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("restored log file \"").nth(1).and_then(|s| s.split('"').next()))
        .collect();
    let missing: Vec<&String> = want.iter().filter(|n| !restored.contains(&n.as_str())).collect();
    if !missing.is_empty() {
        return Err(standby.err(format!("{} log shows no `restored log file` for {missing:?} (restored: {restored:?})", standby.name)));
    }
    if let Some(l) = log.lines().find(|l| l.contains(".partial is not in")) {
        return Err(standby.err(format!("recovery asked restore_command for a .partial name: {l}")));
    }
    if restored.iter().any(|n| n.contains("partial")) {
        return Err(standby.err(format!("recovery restored a .partial name: {restored:?}")));
    }
    say(format!("{} restored {} files via walship restore", standby.name, restored.len()));
    Ok(())
}
