//! Operations: `/metrics` scraped during and after a real ship and parsed by the reference Prometheus
//! parser (Python `prometheus_client`), `walship status --json`, config file / env / flag precedence,
//! JSON logs. Every test runs the real binary.
//!
//! The Python parser is installed with pip when missing; without python3 or pip the metrics test
//! prints "SKIP: ..." and passes, unless `WALSHIP_REQUIRE_PROM_PARSER=1`.
//!
//! Run: `cargo test --test ops -- --nocapture`.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

type R<T> = Result<T, String>;

/// Samples as the Python parser saw them: (sample name, labels, value).
type Samples = Vec<(String, serde_json::Map<String, serde_json::Value>, f64)>;

/// Make `import prometheus_client` work, installing it with pip if needed. Err(reason) = skip.
fn ensure_prometheus_client() -> R<()> {
    let have = |py: &str| {
        Command::new(py)
            .args([
                "-c",
                "import prometheus_client.parser, prometheus_client.openmetrics.parser",
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if Command::new("python3").arg("--version").output().is_err() {
        return Err("python3 is not installed".into());
    }
    if have("python3") {
        return Ok(());
    }
    let pip = Command::new("python3").args(["-m", "pip", "--version"]).output();
    if !pip.is_ok_and(|o| o.status.success()) {
        return Err("python3 has no pip, so prometheus_client cannot be installed".into());
    }
    eprintln!("installing the Python prometheus_client parser with pip");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "prometheus_client",
        ])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("pip: {e}"))?;
    if !out.status.success() || !have("python3") {
        panic!(
            "pip install prometheus_client failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

const PARSE_PY: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
text = open(sys.argv[1]).read()
# The strict OpenMetrics parser must accept it too (that is what we serve); it raises on any error.
om = {f.name: f.type for f in om_families(text)}
out = []
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps({"samples": out, "openmetrics_types": om}))
"#;

/// Parse exposition `text` with the Python reference parsers.
fn python_parse(dir: &Path, text: &str) -> R<(Samples, serde_json::Value)> {
    let file = dir.join(format!("scrape-{}.txt", std::process::id()));
    std::fs::write(&file, text).map_err(|e| e.to_string())?;
    let out = run_ok(&mut cmd("python3", ["-c", PARSE_PY, file.to_str().unwrap()]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("parser output: {e}"))?;
    let samples = v["samples"]
        .as_array()
        .ok_or("no samples")?
        .iter()
        .map(|s| {
            (
                s[0].as_str().unwrap().to_string(),
                s[1].as_object().unwrap().clone(),
                s[2].as_f64().unwrap(),
            )
        })
        .collect();
    Ok((samples, v["openmetrics_types"].clone()))
}

fn value(samples: &Samples, name: &str) -> Option<f64> {
    samples.iter().find(|(n, _, _)| n == name).map(|s| s.2)
}

fn value_with(samples: &Samples, name: &str, label: &str, want: &str) -> Option<f64> {
    samples
        .iter()
        .find(|(n, l, _)| n == name && l.get(label).and_then(|v| v.as_str()) == Some(want))
        .map(|s| s.2)
}

fn scrape(url: &str) -> R<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    let resp = agent.get(url).call().map_err(|e| format!("GET {url}: {e}"))?;
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(ct.starts_with("application/openmetrics-text"), "content type {ct:?}");
    resp.into_body().read_to_string().map_err(|e| format!("GET {url}: {e}"))
}

/// An exact u64 sample value from our own output (the Python parser gives floats).
fn raw_u64(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

struct Shipped {
    dir: TestDir,
    recv: ChildGuard,
    metrics_url: String,
    /// Where shipping starts: the segment start of the first record (gen-wal's segments are 16 MiB).
    start_lsn: u64,
    end_lsn: u64,
    /// Scrapes taken while the sender ran.
    during: Vec<String>,
    before: String,
}

/// gen-wal `wal_bytes` of WAL, start a receiver with --metrics-listen, scrape, `send --once`
/// (scraping while it runs), wait for the sender to finish.
fn ship(prefix: &str, wal_bytes: &str) -> Shipped {
    let dir = TestDir::new(prefix);
    let out = run_ok(&mut cmd(
        walship_bin(),
        [
            "gen-wal",
            "--dir",
            dir.join("src").to_str().unwrap(),
            "--wal-bytes",
            wal_bytes,
        ],
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let gen = String::from_utf8_lossy(&out.stdout).to_string();
    let first_lsn = parse_lsn(&json_field(&gen, "first_lsn").expect("first_lsn")).expect("lsn");
    let end_lsn = parse_lsn(&json_field(&gen, "end_lsn").expect("end_lsn")).expect("lsn");
    let (port, mport) = (free_port(), free_port());
    let recv_log = dir.join("recv.log");
    let mut c = cmd(
        walship_bin(),
        [
            "recv",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--dir",
            dir.join("recv").to_str().unwrap(),
            "--metrics-listen",
            &format!("127.0.0.1:{mport}"),
        ],
    );
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(&recv_log).unwrap());
    let mut recv = ChildGuard::spawn("recv", &mut c).expect("spawn recv");
    let metrics_url = format!("http://127.0.0.1:{mport}/metrics");
    let before = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        scrape(&metrics_url).ok()
    })
    .unwrap_or_else(|| panic!("no /metrics from the receiver; its log:\n{}", tail_file(&recv_log, 30)));
    assert!(
        recv.try_wait().unwrap().is_none(),
        "receiver exited: {}",
        tail_file(&recv_log, 30)
    );
    let mut send = cmd(
        walship_bin(),
        [
            "send",
            "--once",
            "--pg-wal",
            dir.join("src").to_str().unwrap(),
            "--to",
            &format!("127.0.0.1:{port}"),
        ],
    );
    send.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut sender = ChildGuard::spawn("send", &mut send).expect("spawn send");
    let mut during = Vec::new();
    let started = Instant::now();
    loop {
        if let Ok(t) = scrape(&metrics_url) {
            during.push(t);
        }
        if sender.try_wait().unwrap().is_some() || started.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let child = sender.child.take().expect("sender");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "send --once failed ({}):\n{}\nreceiver log:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        tail_file(&recv_log, 30)
    );
    let start_lsn = first_lsn - first_lsn % (16 << 20);
    Shipped {
        dir,
        recv,
        metrics_url,
        start_lsn,
        end_lsn,
        during,
        before,
    }
}

#[test]
fn receiver_metrics_parse_with_prometheus_client_and_track_the_ship() {
    if let Err(why) = ensure_prometheus_client() {
        if std::env::var("WALSHIP_REQUIRE_PROM_PARSER").as_deref() == Ok("1") {
            panic!("WALSHIP_REQUIRE_PROM_PARSER=1 but: {why}");
        }
        eprintln!("\n*** SKIP: {why}: the /metrics test needs the Python prometheus_client parser ***\n");
        return;
    }
    let s = ship("ops-metrics", "64MiB");
    let (before, _) = python_parse(s.dir.path(), &s.before).unwrap_or_else(|e| panic!("{e}\n{}", s.before));
    assert_eq!(
        value(&before, "walship_recv_flushed_lsn"),
        Some(0.0),
        "empty directory: nothing flushed yet"
    );
    assert_eq!(value(&before, "walship_recv_connections_total"), Some(0.0));

    // The sender finished (--once waits for the durable ack), so the receiver's flushed LSN is the end.
    let after = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        let t = scrape(&s.metrics_url).ok()?;
        (raw_u64(&t, "walship_recv_flushed_lsn") == Some(s.end_lsn)).then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "flushed LSN never reached {}:\n{}",
            fmt_lsn(s.end_lsn),
            scrape(&s.metrics_url).unwrap_or_default()
        )
    });
    let (m, om_types) = python_parse(s.dir.path(), &after).unwrap_or_else(|e| panic!("{e}\n{after}"));
    eprintln!("scrape after the ship:\n{after}");
    let end = s.end_lsn as f64;
    assert!(end < (1u64 << 53) as f64, "LSN exact as a float");
    assert_eq!(
        value(&m, "walship_recv_flushed_lsn"),
        Some(end),
        "flushed LSN == shipped end LSN"
    );
    assert_eq!(value(&m, "walship_recv_written_lsn"), Some(end));
    assert_eq!(value(&m, "walship_recv_received_lsn"), Some(end));
    assert_eq!(
        value(&m, "walship_recv_bytes_total"),
        Some((s.end_lsn - s.start_lsn) as f64),
        "payload bytes"
    );
    assert!(value(&m, "walship_recv_frames_total").unwrap() >= ((s.end_lsn - s.start_lsn) >> 20) as f64);
    assert!(value(&m, "walship_recv_bytes_written_total").unwrap() >= (s.end_lsn - s.start_lsn) as f64);
    assert_eq!(value(&m, "walship_recv_connections_total"), Some(1.0));
    let fsyncs = value(&m, "walship_recv_fsync_duration_seconds_count").expect("fsync histogram");
    assert!(fsyncs >= 1.0, "fdatasyncs observed");
    assert_eq!(
        value_with(&m, "walship_recv_fsync_duration_seconds_bucket", "le", "+Inf"),
        Some(fsyncs)
    );
    let batch_sum = value(&m, "walship_recv_fsync_batch_bytes_sum").expect("batch histogram");
    assert_eq!(
        batch_sum,
        end - s.start_lsn as f64,
        "batches add up to every byte made durable"
    );
    assert_eq!(
        value_with(&m, "walship_build_info", "version", env!("CARGO_PKG_VERSION")),
        Some(1.0)
    );
    assert_eq!(value_with(&m, "walship_role_info", "role", "receiver"), Some(1.0));
    let start = value(&m, "walship_process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        start <= now + 1.0 && start > now - 300.0,
        "process start {start} vs now {now}"
    );
    let errors: Vec<_> = m.iter().filter(|(n, _, _)| n == "walship_recv_errors_total").collect();
    assert!(
        errors.len() >= 10 && errors.iter().all(|e| e.2 == 0.0),
        "every error kind present, all 0: {after}"
    );
    assert_eq!(om_types["walship_recv_fsync_duration_seconds"], "histogram");
    assert_eq!(om_types["walship_recv_bytes"], "counter");
    assert_eq!(om_types["walship_build"], "info");

    // During the ship: every scrape parses, and positions only move forward, never past the end.
    assert!(!s.during.is_empty(), "no scrape while the sender ran");
    let mut last = (0u64, 0u64, 0u64);
    for t in &s.during {
        let rcv = raw_u64(t, "walship_recv_received_lsn").unwrap();
        let wr = raw_u64(t, "walship_recv_written_lsn").unwrap();
        let fl = raw_u64(t, "walship_recv_flushed_lsn").unwrap();
        assert!(fl <= s.end_lsn && rcv <= s.end_lsn, "past the end: {t}");
        assert!(fl <= wr, "flushed {fl} past written {wr}");
        assert!(
            rcv >= last.0 && wr >= last.1 && fl >= last.2,
            "a position moved backwards: {last:?} -> {t}"
        );
        last = (rcv, wr, fl);
    }
    let moved: Vec<u64> = s
        .during
        .iter()
        .filter_map(|t| raw_u64(t, "walship_recv_flushed_lsn"))
        .collect();
    eprintln!(
        "{} scrapes during the ship; flushed LSNs seen: {:?}",
        s.during.len(),
        moved.iter().map(|&l| fmt_lsn(l)).collect::<Vec<_>>()
    );
    let mid = s.during.len() / 2;
    python_parse(s.dir.path(), &s.during[mid]).unwrap_or_else(|e| panic!("mid-ship scrape: {e}\n{}", s.during[mid]));
    drop(s.recv);
}

#[test]
fn status_json_shows_receiver_positions() {
    let s = ship("ops-status", "32MiB");
    poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (raw_u64(&scrape(&s.metrics_url).ok()?, "walship_recv_connected") == Some(0)).then_some(())
    })
    .expect("receiver never noticed the sender leave");
    let out = run_ok(&mut cmd(
        walship_bin(),
        ["status", "--url", &s.metrics_url, "--json", "--sample", "300ms"],
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    eprintln!("status --json: {v}");
    assert_eq!(v["role"], "receiver");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(v["state"], "waiting for a sender");
    let want = format!("{:X}/{:08X}", s.end_lsn >> 32, s.end_lsn & 0xffff_ffff);
    assert_eq!(v["positions"]["flushed"], want.as_str(), "%X/%08X form");
    assert_eq!(v["positions"]["received"], want.as_str());
    assert_eq!(v["positions_u64"]["flushed"], s.end_lsn);
    assert_eq!(v["lag_bytes"], 0);
    assert_eq!(v["bytes_total"], s.end_lsn - s.start_lsn);
    assert_eq!(v["connections"], 1);
    assert_eq!(v["throughput"]["now_bytes_per_s"], 0.0, "idle now");
    assert!(v["throughput"]["sample_seconds"].as_f64().unwrap() >= 0.3);
    assert!(v["throughput"]["average_bytes_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["fsync"]["count"].as_u64().unwrap() >= 1);

    let out = run_ok(&mut cmd(
        walship_bin(),
        ["status", "--url", &s.metrics_url, "--sample", "0"],
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}");
    assert!(text.contains(&format!("flushed_lsn  {want}")), "{text}");
    assert!(text.contains("n/a (--sample 0)"), "{text}");
    drop(s.recv);

    // A dead endpoint: a clear error naming the URL, non-zero exit.
    let dead = format!("http://127.0.0.1:{}/metrics", free_port());
    let out = run(&mut cmd(walship_bin(), ["status", "--url", &dead, "--timeout", "2s"])).unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&dead),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `recv` rejects a chunk size that is not a power of two before touching anything, and names the
/// value it got: that shows which source (flag, env, file, default) won.
fn recv_chunk_error(dir: &TestDir, config: Option<&Path>, env: Option<&str>, flag: Option<&str>) -> String {
    let mut c = cmd(walship_bin(), ["recv"]);
    if let Some(p) = config {
        c.arg("--config").arg(p);
    }
    if let Some(f) = flag {
        c.args(["--chunk-bytes", f]);
    }
    c.env_remove("WALSHIP_CHUNK_BYTES")
        .env_remove("WALSHIP_LISTEN")
        .env_remove("WALSHIP_DIR")
        .env_remove("WALSHIP_CONFIG");
    if let Some(e) = env {
        c.env("WALSHIP_CHUNK_BYTES", e);
    }
    if config.is_none() {
        c.args(["--listen", "127.0.0.1:1", "--dir", dir.join("r").to_str().unwrap()]);
    }
    let out = run(&mut c).unwrap();
    assert!(
        !out.status.success(),
        "expected failure: {}",
        describe_failure(&c, &out)
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[test]
fn recv_without_listen_or_from_postgres_says_what_it_needs() {
    let dir = TestDir::new("ops-no-listen");
    let mut c = cmd(walship_bin(), ["recv", "--insecure-no-auth", "--dir", dir.join("r").to_str().unwrap()]);
    c.env_remove("WALSHIP_LISTEN").env_remove("WALSHIP_FROM_POSTGRES").env_remove("WALSHIP_CONFIG");
    let out = run(&mut c).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--listen") && err.contains("--from-postgres"), "{}", describe_failure(&c, &out));
    assert!(!dir.join("r").exists(), "the directory was touched before the arguments were complete");
}

#[test]
fn config_file_env_and_flag_precedence() {
    let dir = TestDir::new("ops-config");
    let cfg = dir.join("walship.toml");
    std::fs::write(
        &cfg,
        format!(
            "log_level = \"warn\"\n[recv]\nlisten = \"127.0.0.1:1\"\ndir = \"{}\"\nchunk_bytes = \"6MiB\"\n",
            dir.join("r").display()
        ),
    )
    .unwrap();
    // file > default
    let e = recv_chunk_error(&dir, Some(&cfg), None, None);
    assert!(e.contains("got 6291456"), "{e}");
    // env > file
    let e = recv_chunk_error(&dir, Some(&cfg), Some("3MiB"), None);
    assert!(e.contains("got 3145728"), "{e}");
    // flag > env
    let e = recv_chunk_error(&dir, Some(&cfg), Some("3MiB"), Some("5MiB"));
    assert!(e.contains("got 5242880"), "{e}");
    // --help shows the file's value as the default.
    let out = run_ok(&mut cmd(
        walship_bin(),
        ["--config", cfg.to_str().unwrap(), "recv", "--help"],
    ))
    .unwrap_or_else(|e| panic!("{e}"));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("[default: 6MiB]") && help.contains("WALSHIP_CHUNK_BYTES"),
        "{help}"
    );

    // A typo in the file is an error that names the file, the section and the key.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[recv]\nfsync_batch_byte = \"1MiB\"\n").unwrap();
    let out = run(&mut cmd(walship_bin(), ["--config", bad.to_str().unwrap(), "recv"])).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("bad.toml") && err.contains("fsync_batch_byte") && err.contains("[recv]"),
        "{err}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = TestDir::new("ops-logs");
    let mut c = cmd(
        walship_bin(),
        [
            "--log-format",
            "json",
            "recv",
            "--listen",
            "127.0.0.1:1",
            "--dir",
            dir.join("r").to_str().unwrap(),
            "--chunk-bytes",
            "3MiB",
        ],
    );
    c.env_remove("WALSHIP_LOG").env_remove("WALSHIP_LOG_FORMAT");
    let out = run(&mut c).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line = err
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON log line in:\n{err}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["level"], "ERROR", "{line}");
    assert!(v["message"].as_str().unwrap().contains("--chunk-bytes"), "{line}");
}

/// The sender's `/metrics` during a throttled `send --once`: positions and horizon move, parse with
/// the reference parser, and agree with what was shipped; flushed never passes sent.
#[test]
fn sender_metrics_track_the_ship() {
    if let Err(why) = ensure_prometheus_client() {
        if std::env::var("WALSHIP_REQUIRE_PROM_PARSER").as_deref() == Ok("1") {
            panic!("{why}");
        }
        println!("SKIP: {why}");
        return;
    }
    let dir = TestDir::new("ops-sender-metrics");
    let out = run_ok(&mut cmd(walship_bin(), ["gen-wal", "--dir", dir.join("src").to_str().unwrap(), "--wal-bytes", "48MiB"]))
        .unwrap_or_else(|e| panic!("{e}"));
    let gen = String::from_utf8_lossy(&out.stdout).to_string();
    let end_lsn = parse_lsn(&json_field(&gen, "end_lsn").expect("end_lsn")).expect("lsn");
    let (port, mport) = (free_port(), free_port());
    let mut r = cmd(walship_bin(), ["recv", "--listen", &format!("127.0.0.1:{port}"), "--dir", dir.join("recv").to_str().unwrap()]);
    r.stdout(Stdio::null()).stderr(std::fs::File::create(dir.join("recv.log")).unwrap());
    let _recv = ChildGuard::spawn("recv", &mut r).expect("spawn recv");
    let send_log = dir.join("send.log");
    let mut s = cmd(
        walship_bin(),
        [
            "send", "--once", "--retry-for", "20s", "--pg-wal", dir.join("src").to_str().unwrap(), "--to",
            &format!("127.0.0.1:{port}"), "--metrics-listen", &format!("127.0.0.1:{mport}"),
            "--in-flight-bytes-max", "1MiB", "--frame-bytes", "64KiB", "--send-batch-bytes-max", "64KiB",
        ],
    );
    s.stdout(Stdio::null()).stderr(std::fs::File::create(&send_log).unwrap());
    let mut send = ChildGuard::spawn("send", &mut s).expect("spawn send");
    let url = format!("http://127.0.0.1:{mport}/metrics");
    let mut scrapes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while send.try_wait().unwrap().is_none() && Instant::now() < deadline {
        if let Ok(text) = scrape(&url) {
            scrapes.push(text);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let st = send.wait_timeout(Duration::from_secs(30)).unwrap().expect("sender finished");
    assert!(st.success(), "sender failed:\n{}", tail_file(&send_log, 30));
    assert!(scrapes.len() >= 3, "only {} scrapes while the sender ran", scrapes.len());
    let mut flushed_seen = Vec::new();
    for text in &scrapes {
        let (samples, _) = python_parse(dir.path(), text).unwrap_or_else(|e| panic!("{e}"));
        let sent = value(&samples, "walship_send_sent_lsn").expect("sent_lsn");
        let flushed = value(&samples, "walship_send_flushed_lsn").expect("flushed_lsn");
        let horizon = value(&samples, "walship_send_horizon_lsn").expect("horizon_lsn");
        assert!(flushed <= sent && sent <= horizon.max(sent), "flushed {flushed} sent {sent} horizon {horizon}");
        assert!(value(&samples, "walship_build_info").is_some());
        flushed_seen.push(raw_u64(text, "walship_send_flushed_lsn").unwrap_or(0));
    }
    assert!(flushed_seen.windows(2).all(|w| w[0] <= w[1]), "flushed moved backwards: {flushed_seen:?}");
    let distinct: std::collections::BTreeSet<_> = flushed_seen.iter().collect();
    assert!(distinct.len() >= 2, "flushed never moved while scraped: {flushed_seen:?}");
    assert!(flushed_seen.iter().all(|&f| f <= end_lsn));
}
