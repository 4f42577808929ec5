//! `walship status`: scrape a walship `/metrics` endpoint and show it like `pg_stat_replication`.
//!
//! Throughput "now" comes from two scrapes `--sample` apart (default 1 s): the byte counter's
//! difference over the time between them. With `--sample 0` only one scrape is made and only the
//! average since the process started (byte counter / uptime) is shown.
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::wal::Lsn;

/// One sample line of the exposition text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    /// The value as written (an LSN gauge is an exact integer here).
    pub raw: String,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
    /// The value as u64: exact when written as an integer, else the float rounded.
    pub fn as_u64(&self) -> u64 {
        self.raw
            .parse::<u64>()
            .unwrap_or(if self.value.is_finite() && self.value > 0.0 {
                self.value as u64
            } else {
                0
            })
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("line {line}: {why}: {text:?}")]
pub struct ParseError {
    pub line: usize,
    pub why: &'static str,
    pub text: String,
}

/// Parse the sample lines of Prometheus / OpenMetrics text (comments and `# EOF` are skipped).
pub fn parse_exposition(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let err = |why| ParseError {
            line: i + 1,
            why,
            text: line.to_string(),
        };
        let name_end = line.find(['{', ' ', '\t']).ok_or_else(|| err("no value"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':')
        {
            return Err(err("bad metric name"));
        }
        let mut rest = &line[name_end..];
        let mut labels = Vec::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                r = r.trim_start_matches([' ', ',']);
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let eq = r.find('=').ok_or_else(|| err("label without '='"))?;
                let key = r[..eq].trim().to_string();
                let v = r[eq + 1..]
                    .trim_start()
                    .strip_prefix('"')
                    .ok_or_else(|| err("label value not quoted"))?;
                let mut value = String::new();
                let mut chars = v.char_indices();
                let end = loop {
                    match chars.next() {
                        Some((j, '"')) => break j,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, 'n')) => value.push('\n'),
                            Some((_, c)) => value.push(c),
                            None => return Err(err("unterminated escape")),
                        },
                        Some((_, c)) => value.push(c),
                        None => return Err(err("unterminated label value")),
                    }
                };
                labels.push((key, value));
                r = &v[end + 1..];
            }
            rest = r;
        }
        let raw = rest
            .split_whitespace()
            .next()
            .ok_or_else(|| err("no value"))?
            .to_string();
        let value = match raw.as_str() {
            "+Inf" | "Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            s => s.parse::<f64>().map_err(|_| err("value is not a number"))?,
        };
        out.push(Sample {
            name: name.to_string(),
            labels,
            raw,
            value,
        });
    }
    Ok(out)
}

/// One scrape, indexed.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// When the scrape completed (local clock).
    pub at: Instant,
}

impl Scrape {
    pub fn get(&self, name: &str) -> Option<&Sample> {
        self.samples.iter().find(|s| s.name == name)
    }
    pub fn u64(&self, name: &str) -> Option<u64> {
        self.get(name).map(Sample::as_u64)
    }
    pub fn f64(&self, name: &str) -> Option<f64> {
        self.get(name).map(|s| s.value)
    }
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }
}

/// GET `url` and parse it.
pub fn scrape(url: &str, timeout: Duration) -> anyhow::Result<Scrape> {
    use anyhow::Context;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    let body = agent
        .get(url)
        .call()
        .with_context(|| format!("fetching {url}"))?
        .into_body()
        .read_to_string()
        .with_context(|| format!("reading the response of {url}"))?;
    let samples = parse_exposition(&body).with_context(|| format!("parsing the metrics of {url}"))?;
    if !samples.iter().any(|s| s.name == "walship_role_info") {
        anyhow::bail!("{url} is not a walship metrics endpoint (no walship_role_info)");
    }
    Ok(Scrape {
        samples,
        at: Instant::now(),
    })
}

/// What `walship status` shows, in the form `--json` prints.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusView {
    pub url: String,
    pub role: String,
    pub version: String,
    pub state: String,
    pub peer: Option<String>,
    pub uptime_seconds: f64,
    /// Name -> LSN: received/written/flushed (receiver), sent/written/flushed/horizon (sender).
    pub positions: Vec<(&'static str, u64)>,
    pub lag_bytes: u64,
    pub lag_seconds: Option<f64>,
    pub bytes_total: u64,
    pub average_bytes_per_s: f64,
    /// From two scrapes `sample_seconds` apart; None with one scrape.
    pub now_bytes_per_s: Option<f64>,
    pub sample_seconds: f64,
    pub connections: u64,
    pub reconnects: Option<u64>,
    pub errors: BTreeMap<String, u64>,
    pub fsync_count: Option<u64>,
    pub fsync_mean_seconds: Option<f64>,
    /// With `--archive-to`: the archive's state.
    pub archive: Option<ArchiveView>,
    /// A sender's destinations (one per `--to`).
    pub destinations: Vec<DestinationView>,
    /// Standbys streaming from a receiver's WAL hub (`--serve-replication`), like `pg_stat_replication`.
    pub standbys: Vec<StandbyView>,
    /// A receiver with `--from-postgres`: the PostgreSQL server it streams from.
    pub upstream: Option<UpstreamView>,
}

/// The PostgreSQL server a `--from-postgres` receiver streams from (`walship_recv_upstream_*`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UpstreamView {
    pub connected: bool,
    pub tls: bool,
    /// The server's end of WAL as its walsender last said.
    pub server: String,
    /// The last status update sent: write and flush (flush = durable here).
    pub reported_write: String,
    pub reported_flush: String,
    /// The server's end - the flush reported to it.
    pub lag_bytes: u64,
    /// Seconds since the last status update was sent (None: none yet).
    pub status_age_seconds: Option<f64>,
    pub reconnects: u64,
}

fn upstream(last: &Scrape) -> Option<UpstreamView> {
    let server = last.u64("walship_recv_upstream_server_lsn")?;
    let flush = last.u64("walship_recv_upstream_reported_flush_lsn").unwrap_or(0);
    let sent_at = last.f64("walship_recv_upstream_last_status_time_seconds").filter(|t| *t > 0.0);
    Some(UpstreamView {
        connected: last.u64("walship_recv_upstream_connected").unwrap_or(0) > 0,
        tls: last.u64("walship_recv_upstream_tls").unwrap_or(0) > 0,
        server: Lsn(server).to_string(),
        reported_write: Lsn(last.u64("walship_recv_upstream_reported_write_lsn").unwrap_or(0)).to_string(),
        reported_flush: Lsn(flush).to_string(),
        lag_bytes: server.saturating_sub(flush),
        status_age_seconds: sent_at.map(|t| (unix_now_s() - t).max(0.0)),
        reconnects: last.u64("walship_recv_upstream_reconnects_total").unwrap_or(0),
    })
}

/// One standby streaming from the receiver's WAL hub.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StandbyView {
    /// `application_name@address`.
    pub standby: String,
    pub sent: String,
    pub write: String,
    pub flush: String,
    pub replay: String,
    /// The receiver's flushed - the standby's replay.
    pub replay_lag_bytes: u64,
}

/// Every `walship_recv_standby_*{standby}` series of a scrape, by standby.
fn standbys(last: &Scrape) -> Vec<StandbyView> {
    let per = |name: &str, who: &str| last.all(name).find(|s| s.label("standby") == Some(who)).map_or(0, |s| s.as_u64());
    let flushed = last.u64("walship_recv_flushed_lsn").unwrap_or(0);
    last.all("walship_recv_standby_sent_lsn")
        .filter_map(|s| s.label("standby"))
        .map(|who| StandbyView {
            standby: who.to_string(),
            sent: Lsn(per("walship_recv_standby_sent_lsn", who)).to_string(),
            write: Lsn(per("walship_recv_standby_write_lsn", who)).to_string(),
            flush: Lsn(per("walship_recv_standby_flush_lsn", who)).to_string(),
            replay: Lsn(per("walship_recv_standby_replay_lsn", who)).to_string(),
            replay_lag_bytes: flushed.saturating_sub(per("walship_recv_standby_replay_lsn", who)),
        })
        .collect()
}

/// One of a sender's destinations.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DestinationView {
    pub to: String,
    pub connected: bool,
    pub flushed: String,
    pub lag_bytes: u64,
    pub reconnects: u64,
    /// More than --max-lag-bytes behind the quorum: no longer holds the replication slot back.
    pub slot_released: bool,
}

/// Every `walship_send_destination_*{destination}` series of a scrape, by destination.
fn destinations(last: &Scrape) -> Vec<DestinationView> {
    let per = |name: &str, to: &str| last.all(name).find(|s| s.label("destination") == Some(to)).map_or(0, |s| s.as_u64());
    last.all("walship_send_destination_flushed_lsn")
        .filter_map(|s| s.label("destination"))
        .map(|to| DestinationView {
            to: to.to_string(),
            connected: per("walship_send_destination_connected", to) > 0,
            flushed: Lsn(per("walship_send_destination_flushed_lsn", to)).to_string(),
            lag_bytes: per("walship_send_destination_lag_bytes", to),
            reconnects: per("walship_send_destination_reconnects_total", to),
            slot_released: per("walship_send_destination_slot_released", to) > 0,
        })
        .collect()
}

/// The receiver's archive: how far behind `flushed` it is, what waits, whether it stopped.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ArchiveView {
    /// flushed - archived.
    pub lag_bytes: u64,
    /// Age of the oldest complete local file not archived yet.
    pub lag_seconds: f64,
    pub pending_files: u64,
    pub uploaded_objects: u64,
    pub failures: u64,
    /// Stopped on a hard error (a conflicting object): see the receiver's log.
    pub stopped: bool,
}

fn unix_now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Build the view from the last scrape and, if there is one, an earlier one.
pub fn view(url: &str, last: &Scrape, first: Option<&Scrape>) -> StatusView {
    let role = last
        .get("walship_role_info")
        .and_then(|s| s.label("role"))
        .unwrap_or("unknown")
        .to_string();
    let version = last
        .get("walship_build_info")
        .and_then(|s| s.label("version"))
        .unwrap_or("unknown")
        .to_string();
    let uptime_seconds = last
        .f64("walship_process_start_time_seconds")
        .map_or(0.0, |t| (unix_now_s() - t).max(0.0));
    let side = if role == "sender" { "send" } else { "recv" };
    let m = |n: &str| format!("walship_{side}_{n}");
    let bytes_total = last.u64(&m("bytes_total")).unwrap_or(0);
    let now_bytes_per_s = first.map(|f| {
        let dt = last.at.duration_since(f.at).as_secs_f64().max(1e-3);
        bytes_total.saturating_sub(f.u64(&m("bytes_total")).unwrap_or(0)) as f64 / dt
    });
    let sample_seconds = first.map_or(0.0, |f| last.at.duration_since(f.at).as_secs_f64());
    let mut errors = BTreeMap::new();
    for s in last.all(&m("errors_total")) {
        *errors.entry(s.label("kind").unwrap_or("?").to_string()).or_insert(0) += s.as_u64();
    }
    let lsn = |n: &str| last.u64(&m(n)).unwrap_or(0);
    let (state, peer, positions, lag_bytes, lag_seconds, reconnects);
    if role == "sender" {
        let connected = last.all("walship_send_connected").find(|s| s.value >= 1.0);
        peer = connected.and_then(|s| s.label("peer")).map(str::to_string);
        lag_bytes = lsn("lag_bytes");
        lag_seconds = last.f64("walship_send_lag_seconds");
        state = match (&peer, lag_bytes) {
            (None, _) => "disconnected".to_string(),
            (Some(_), 0) => "streaming (caught up)".to_string(),
            (Some(_), _) => "streaming (catching up)".to_string(),
        };
        let mut p = vec![
            ("sent", lsn("sent_lsn")),
            ("written", lsn("written_lsn")),
            ("flushed", lsn("flushed_lsn")),
            ("horizon", lsn("horizon_lsn")),
        ];
        if last.get("walship_send_quorum_flushed_lsn").is_some() {
            p.push(("quorum_flushed", lsn("quorum_flushed_lsn")));
        }
        positions = p;
        reconnects = last.u64("walship_send_reconnects_total");
    } else {
        peer = None;
        let connected = last.f64("walship_recv_connected").unwrap_or(0.0) >= 1.0;
        state = if connected {
            "streaming".to_string()
        } else {
            "waiting for a sender".to_string()
        };
        let mut p = vec![
            ("received", lsn("received_lsn")),
            ("written", lsn("written_lsn")),
            ("flushed", lsn("flushed_lsn")),
        ];
        // With --archive-to: every byte below `archived` is in the object store.
        if last.get("walship_recv_archived_lsn").is_some() {
            p.push(("archived", lsn("archived_lsn")));
        }
        positions = p;
        lag_bytes = lsn("received_lsn").saturating_sub(lsn("flushed_lsn"));
        lag_seconds = None;
        reconnects = None;
    }
    let fsync_count = last.u64("walship_recv_fsync_duration_seconds_count");
    let fsync_mean_seconds = match (fsync_count, last.f64("walship_recv_fsync_duration_seconds_sum")) {
        (Some(n), Some(sum)) if n > 0 => Some(sum / n as f64),
        _ => None,
    };
    let archive = last.get("walship_recv_archived_lsn").map(|a| ArchiveView {
        lag_bytes: last.u64("walship_recv_flushed_lsn").unwrap_or(0).saturating_sub(a.as_u64()),
        lag_seconds: last.f64("walship_recv_archive_lag_seconds").unwrap_or(0.0),
        pending_files: last.u64("walship_recv_archive_pending_files").unwrap_or(0),
        uploaded_objects: last.u64("walship_recv_archive_uploaded_objects_total").unwrap_or(0),
        failures: last.u64("walship_recv_archive_failures_total").unwrap_or(0),
        stopped: last.u64("walship_recv_archive_stopped").unwrap_or(0) > 0,
    });
    StatusView {
        archive,
        destinations: destinations(last),
        standbys: standbys(last),
        upstream: upstream(last),
        url: url.to_string(),
        role,
        version,
        state,
        peer,
        uptime_seconds,
        positions,
        lag_bytes,
        lag_seconds,
        bytes_total,
        average_bytes_per_s: if uptime_seconds > 0.0 {
            bytes_total as f64 / uptime_seconds
        } else {
            0.0
        },
        now_bytes_per_s,
        sample_seconds,
        connections: last.u64(&m("connections_total")).unwrap_or(0),
        reconnects,
        errors,
        fsync_count,
        fsync_mean_seconds,
    }
}

impl StatusView {
    pub fn to_json(&self) -> serde_json::Value {
        let positions: serde_json::Map<String, serde_json::Value> = self
            .positions
            .iter()
            .map(|(k, v)| (k.to_string(), Lsn(*v).to_string().into()))
            .collect();
        let positions_u64: serde_json::Map<String, serde_json::Value> = self
            .positions
            .iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect();
        serde_json::json!({
            "url": self.url,
            "role": self.role,
            "version": self.version,
            "state": self.state,
            "peer": self.peer,
            "uptime_seconds": self.uptime_seconds,
            "positions": positions,
            "positions_u64": positions_u64,
            "lag_bytes": self.lag_bytes,
            "lag_seconds": self.lag_seconds,
            "bytes_total": self.bytes_total,
            "throughput": {
                "now_bytes_per_s": self.now_bytes_per_s,
                "sample_seconds": self.sample_seconds,
                "average_bytes_per_s": self.average_bytes_per_s,
                "method": if self.now_bytes_per_s.is_some() { "two scrapes sample_seconds apart" } else { "bytes_total / uptime only" },
            },
            "connections": self.connections,
            "reconnects": self.reconnects,
            "errors": self.errors,
            "fsync": { "count": self.fsync_count, "mean_seconds": self.fsync_mean_seconds },
            "archive": self.archive,
            "destinations": self.destinations,
            "standbys": self.standbys,
            "upstream": self.upstream,
        })
    }

    /// The one-screen view.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "walship {} {} at {} (up {})",
            self.version,
            self.role,
            self.url,
            fmt_secs(self.uptime_seconds)
        );
        let _ = writeln!(
            s,
            "  state        {}{}",
            self.state,
            self.peer.as_ref().map_or(String::new(), |p| format!(", receiver {p}"))
        );
        for (name, lsn) in &self.positions {
            let _ = writeln!(s, "  {:<12} {}", format!("{name}_lsn"), Lsn(*lsn));
        }
        let what = if self.role == "sender" {
            "horizon - flushed"
        } else {
            "received - flushed"
        };
        let _ = write!(s, "  lag          {} ({what})", fmt_bytes(self.lag_bytes as f64));
        if let Some(t) = self.lag_seconds {
            let _ = write!(s, ", {t:.1} s");
        }
        s.push('\n');
        let now = self.now_bytes_per_s.map_or("n/a (--sample 0)".to_string(), |b| {
            format!("{}/s over {:.1} s", fmt_bytes(b), self.sample_seconds)
        });
        let _ = writeln!(
            s,
            "  throughput   now {now}; average {}/s since start",
            fmt_bytes(self.average_bytes_per_s)
        );
        let _ = write!(
            s,
            "  traffic      {} total, {} connections",
            fmt_bytes(self.bytes_total as f64),
            self.connections
        );
        if let Some(r) = self.reconnects {
            let _ = write!(s, ", {r} reconnects");
        }
        s.push('\n');
        if let (Some(n), Some(mean)) = (self.fsync_count, self.fsync_mean_seconds) {
            let _ = writeln!(s, "  fdatasync    {n} calls, mean {:.3} ms", mean * 1e3);
        }
        let errors = if self.errors.values().all(|&n| n == 0) {
            "none".to_string()
        } else {
            self.errors
                .iter()
                .filter(|(_, &n)| n > 0)
                .map(|(k, n)| format!("{k}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        if let Some(a) = &self.archive {
            let _ = writeln!(
                s,
                "  archive      lag {} (flushed - archived), {:.1} s, {} files pending, {} uploaded, {} failed tries{}",
                fmt_bytes(a.lag_bytes as f64),
                a.lag_seconds,
                a.pending_files,
                a.uploaded_objects,
                a.failures,
                if a.stopped { "; STOPPED on a hard error, see the receiver's log" } else { "" }
            );
        }
        for d in &self.destinations {
            let _ = writeln!(
                s,
                "  destination  {} {} flushed {} lag {} reconnects {}{}",
                d.to,
                if d.connected { "connected" } else { "DISCONNECTED" },
                d.flushed,
                fmt_bytes(d.lag_bytes as f64),
                d.reconnects,
                if d.slot_released { "; more than --max-lag-bytes behind: no longer holds the slot" } else { "" }
            );
        }
        for st in &self.standbys {
            let _ = writeln!(
                s,
                "  standby      {} sent {} write {} flush {} replay {} (replay lag {})",
                st.standby,
                st.sent,
                st.write,
                st.flush,
                st.replay,
                fmt_bytes(st.replay_lag_bytes as f64)
            );
        }
        if let Some(u) = &self.upstream {
            let _ = writeln!(
                s,
                "  upstream     PostgreSQL {}{} server {} status sent write {} flush {}{} (lag {}) reconnects {}",
                if u.connected { "connected" } else { "DISCONNECTED" },
                if u.tls { " (TLS)" } else { "" },
                u.server,
                u.reported_write,
                u.reported_flush,
                u.status_age_seconds.map_or(String::new(), |a| format!(" {} ago", fmt_secs(a))),
                fmt_bytes(u.lag_bytes as f64),
                u.reconnects
            );
        }
        let _ = writeln!(s, "  errors       {errors}");
        s
    }
}

fn fmt_bytes(b: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn fmt_secs(s: f64) -> String {
    humantime::format_duration(Duration::from_secs(s as u64)).to_string()
}

/// `walship status`: scrape (twice, `sample` apart, unless `sample` is zero) and print.
pub fn run(url: &str, sample: Duration, json: bool, timeout: Duration) -> anyhow::Result<()> {
    let first = scrape(url, timeout)?;
    let (last, first) = if sample.is_zero() {
        (first, None)
    } else {
        std::thread::sleep(sample);
        (scrape(url, timeout)?, Some(first))
    };
    let v = view(url, &last, first.as_ref());
    if json {
        println!("{}", v.to_json());
    } else {
        print!("{}", v.render());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    #[test]
    fn parses_labels_escapes_and_special_values() {
        let text =
            "# HELP a x\n# TYPE a gauge\na 5\nb{k=\"v \\\"q\\\"\",z=\"1\"} +Inf\nc_total{} 3 1700000000\n# EOF\n";
        let s = parse_exposition(text).unwrap();
        assert_eq!(s.len(), 3);
        assert_eq!(s[1].label("k"), Some("v \"q\""));
        assert_eq!(s[1].label("z"), Some("1"));
        assert!(s[1].value.is_infinite());
        assert_eq!(s[2].as_u64(), 3);
        assert!(parse_exposition("x{a=1} 2").is_err());
        assert!(parse_exposition("x").is_err());
    }

    #[test]
    fn view_of_a_sender() {
        let m = Metrics::sender();
        let s = m.send.as_ref().unwrap();
        s.on_connected("10.0.0.2:5499");
        s.set_horizon(0x3_0000_0000);
        s.on_ack(0x2_8000_0000, 0x2_0000_0000, 0x1_0000_0000);
        s.add_bytes_sent(1 << 30);
        let first = Scrape {
            samples: parse_exposition(&m.encode()).unwrap(),
            at: Instant::now(),
        };
        s.add_bytes_sent(1 << 20);
        let mut last = Scrape {
            samples: parse_exposition(&m.encode()).unwrap(),
            at: Instant::now(),
        };
        last.at = first.at + Duration::from_secs(1);
        let v = view("u", &last, Some(&first));
        assert_eq!(v.role, "sender");
        assert_eq!(v.peer.as_deref(), Some("10.0.0.2:5499"));
        assert_eq!(v.state, "streaming (catching up)");
        assert_eq!(v.lag_bytes, 0x2_0000_0000);
        assert_eq!(v.now_bytes_per_s, Some((1 << 20) as f64));
        assert_eq!(v.positions[2], ("flushed", 0x1_0000_0000));
        let j = v.to_json();
        assert_eq!(j["positions"]["horizon"], "3/00000000");
        assert_eq!(j["positions_u64"]["sent"], 0x2_8000_0000u64);
        assert!(v.render().contains("flushed_lsn  1/00000000"), "{}", v.render());
    }

    #[test]
    fn view_of_a_sender_with_destinations() {
        let m = Metrics::sender();
        let s = m.send.as_ref().unwrap();
        s.set_horizon(0x3000);
        s.on_destination_connected("a:5499", "10.0.0.2:5499", 0x1000);
        s.on_destination_connected("b:5499", "10.0.0.3:5499", 0x1000);
        s.set_destination_flushed("a:5499", 0x2000, 0x3000);
        s.on_destination_disconnected("b:5499", "10.0.0.3:5499");
        s.inc_destination_reconnects("b:5499");
        s.set_destination_dropped("b:5499", true);
        s.set_quorum_flushed(0x1000);
        let last = Scrape { samples: parse_exposition(&m.encode()).unwrap(), at: Instant::now() };
        let v = view("u", &last, None);
        assert_eq!(v.positions.last(), Some(&("quorum_flushed", 0x1000)));
        let a = v.destinations.iter().find(|d| d.to == "a:5499").expect("a");
        assert!(a.connected && !a.slot_released);
        assert_eq!((a.flushed.as_str(), a.lag_bytes), ("0/00002000", 0x1000));
        let b = v.destinations.iter().find(|d| d.to == "b:5499").expect("b");
        assert!(!b.connected && b.slot_released && b.reconnects == 1);
        let text = v.render();
        assert!(text.contains("destination  b:5499 DISCONNECTED") && text.contains("no longer holds the slot"), "{text}");
    }

    #[test]
    fn view_of_an_archiving_receiver() {
        let mut m = Metrics::receiver();
        let plain = Scrape { samples: parse_exposition(&m.encode()).unwrap(), at: Instant::now() };
        let v = view("u", &plain, None);
        assert!(v.archive.is_none() && v.positions.iter().all(|(n, _)| *n != "archived"));
        let a = crate::archive::ArchiveMetrics::default();
        a.register(m.registry_mut());
        m.recv.as_ref().unwrap().set_acked(0x5_0000_0000, 0x5_0000_0000);
        a.archived_lsn.set(0x4_0000_0000);
        a.pending.set(3);
        a.stopped.set(1);
        a.lag_seconds.set(12.5);
        let last = Scrape { samples: parse_exposition(&m.encode()).unwrap(), at: Instant::now() };
        let v = view("u", &last, None);
        assert_eq!(v.positions.last(), Some(&("archived", 0x4_0000_0000)));
        let av = v.archive.clone().unwrap();
        assert_eq!((av.lag_bytes, av.pending_files, av.stopped), (0x1_0000_0000, 3, true));
        let r = v.render();
        assert!(r.contains("archived_lsn 4/00000000") && r.contains("STOPPED") && r.contains("12.5 s"), "{r}");
        assert_eq!(v.to_json()["archive"]["pending_files"], 3);
    }

    #[test]
    fn view_of_a_receiver_from_postgres() {
        let mut m = Metrics::receiver();
        let plain = Scrape { samples: parse_exposition(&m.encode()).unwrap(), at: Instant::now() };
        assert!(view("u", &plain, None).upstream.is_none());
        let u = crate::recv::from_pg::FromPgMetrics::default();
        u.register(m.registry_mut());
        u.connected.set(1);
        u.tls.set(1);
        u.server_lsn.set(0x3_0000_1000);
        u.reported_write_lsn.set(0x3_0000_0800);
        u.reported_flush_lsn.set(0x3_0000_0400);
        u.last_status_time_s.set(unix_now_s() - 2.0);
        u.reconnects.inc();
        let last = Scrape { samples: parse_exposition(&m.encode()).unwrap(), at: Instant::now() };
        let v = view("u", &last, None);
        let up = v.upstream.clone().unwrap();
        assert!(up.connected && up.tls);
        assert_eq!((up.server.as_str(), up.reported_flush.as_str(), up.lag_bytes, up.reconnects), ("3/00001000", "3/00000400", 0xc00, 1));
        assert!(up.status_age_seconds.is_some_and(|a| (1.5..10.0).contains(&a)), "{up:?}");
        let r = v.render();
        assert!(r.contains("upstream     PostgreSQL connected (TLS) server 3/00001000") && r.contains("flush 3/00000400"), "{r}");
        assert_eq!(v.to_json()["upstream"]["reported_write"], "3/00000800");
    }
}
