//! `walship demo`: generate WAL, ship it over loopback between two real walship processes,
//! verify the copy byte for byte, and report throughput.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::wal::gen::{generate, GenOptions};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("demo step '{step}' failed: {why}")]
    Step { step: &'static str, why: String },
}

fn step<E: std::fmt::Display>(step: &'static str) -> impl FnOnce(E) -> DemoError {
    move |e| DemoError::Step { step, why: e.to_string() }
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(dir: &Path, wal_bytes: u64, port: u16, keep: bool) -> Result<(), DemoError> {
    let exe = std::env::current_exe().map_err(step("find own executable"))?;
    let src = dir.join("pg_wal");
    let dst = dir.join("received");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(&src).map_err(step("create scratch dir"))?;
    println!("walship demo: generating {} MiB of synthetic PostgreSQL WAL in {}", wal_bytes >> 20, src.display());
    let t = Instant::now();
    let report = generate(&GenOptions { dir: src.clone(), wal_bytes, recycled_segments: 2, ..GenOptions::default() })
        .map_err(step("generate WAL"))?;
    println!(
        "  {} segments, {} records, valid WAL {}..{} (+2 recycled segments that must not be shipped), {:.2} s",
        report.segment_files.len() - 2,
        report.records,
        report.first_lsn,
        report.end_lsn,
        t.elapsed().as_secs_f64()
    );
    // The demo authenticates like a real deployment: one shared key for both sides.
    let key_file = dir.join("auth.key");
    let key: String = crate::auth::nonce().map_err(step("make a key"))?.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&key_file, key).map_err(step("write the key file"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).map_err(step("chmod the key file"))?;
    }
    let listen = format!("127.0.0.1:{port}");
    let recv = Command::new(&exe)
        .args(["recv", "--listen", &listen, "--dir"])
        .arg(&dst)
        .arg("--auth-key-file")
        .arg(&key_file)
        .env("WALSHIP_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .map_err(step("start receiver"))?;
    let mut recv = KillOnDrop(recv);
    let report_json = dir.join("send-report.json");
    let status = Command::new(&exe)
        .args(["send", "--once", "--retry-for", "20s", "--to", &listen, "--pg-wal"])
        .arg(&src)
        .arg("--report-json")
        .arg(&report_json)
        .arg("--auth-key-file")
        .arg(&key_file)
        .env("WALSHIP_LOG", "warn")
        .status()
        .map_err(step("run sender"))?;
    if !status.success() {
        return Err(DemoError::Step { step: "ship", why: format!("sender exited with {status}") });
    }
    // SAFETY-free signalling through the kill(1) command keeps this module free of unsafe.
    let _ = Command::new("kill").args(["-TERM", &recv.0.id().to_string()]).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = recv.0.try_wait().map_err(step("wait for receiver"))? {
            if !st.success() {
                return Err(DemoError::Step { step: "receiver shutdown", why: format!("receiver exited with {st}") });
            }
            break;
        }
        if Instant::now() > deadline {
            return Err(DemoError::Step { step: "receiver shutdown", why: "receiver did not exit within 30 s of SIGTERM".into() });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let json = std::fs::read_to_string(&report_json).map_err(step("read send report"))?;
    verify(&report.segment_files, &dst, report.end_lsn.0, 16 << 20)?;
    println!("  shipped and verified byte for byte: {}", json.trim());
    let report: serde_json::Value = serde_json::from_str(&json).map_err(|e| DemoError::Step { step: "read send report", why: e.to_string() })?;
    if let Some(mb_per_s) = report["mb_per_s"].as_f64() {
        println!("  durable throughput: {mb_per_s:.1} MB/s over loopback");
    }
    if !keep {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// Complete segments identical; the `.partial` identical up to the end and zero after it; the
/// recycled segments absent.
fn verify(files: &[PathBuf], dst: &Path, end: u64, seg_size: u64) -> Result<(), DemoError> {
    for path in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        let Some(crate::wal::WalFileName::Segment { segno, .. }) = crate::wal::WalFileName::parse(&name, seg_size) else {
            return Err(DemoError::Step { step: "verify", why: format!("{name} is not a segment file name") });
        };
        let seg_start = segno * seg_size;
        let original = std::fs::read(path).map_err(step("read source segment"))?;
        if seg_start >= end {
            if dst.join(&name).exists() || dst.join(format!("{name}.partial")).exists() {
                return Err(DemoError::Step { step: "verify", why: format!("{name} lies past the end of WAL but was shipped") });
            }
            continue;
        }
        if seg_start + seg_size <= end {
            let copy = std::fs::read(dst.join(&name)).map_err(step("read received segment"))?;
            if copy != original {
                return Err(DemoError::Step { step: "verify", why: format!("{name} differs from the source") });
            }
        } else {
            let copy = std::fs::read(dst.join(format!("{name}.partial"))).map_err(step("read received .partial"))?;
            let valid = (end - seg_start) as usize;
            if copy.len() != original.len() || copy[..valid] != original[..valid] || copy[valid..].iter().any(|&b| b != 0) {
                return Err(DemoError::Step { step: "verify", why: format!("{name}.partial differs from the source up to the end of WAL") });
            }
        }
    }
    Ok(())
}
