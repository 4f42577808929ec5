//! `cargo bench --bench fanout`: one sender, 1 vs 3 receivers on loopback (issue #12), in one run.
//!
//! Rows, each repeated `WALSHIP_BENCH_REPS` times (default 3) and interleaved so that the noise of
//! a shared machine falls on every row alike:
//! - `1 dest`: one receiver;
//! - `2 dests K=2`: two receivers (what the K=2 row's running pair does without a third);
//! - `3 dests K=3`: three receivers, every one must hold the end (`--once` waits for all);
//! - `3 dests K=2, 1 stopped`: three receivers, one SIGSTOPped before the ship: the quorum's
//!   throughput is the time until the two running receivers have published the end as durable
//!   (then the stopped one is resumed; the sender exits 0 if it catches up in time, else 3).
//!
//! each with the receivers writing `--write-mode buffered` (the shared disk taken out of it) and
//! with O_DIRECT as deployed. The sender's CPU seconds per GiB shipped come from its rusage, user
//! and sys apart: user CPU is walship's own work (mapping, page checks, CRC32C, framing), which is
//! done once whatever the number of destinations; sys CPU carries the kernel's work per
//! connection. Beside them, the **kernel floor**: the same segment files written by a minimal
//! sender (mmap, blocking `write` of 8 MiB slices to each socket in turn, no checks) to 1 and 3
//! loopback sockets drained by threads, its thread's rusage measured alike. On loopback the
//! kernel's TCP work per connection (the copy into socket buffers, and the receive side's
//! softirq, which runs on the sending thread) is charged to the sender, so the floor shows what
//! any sender pays per added destination here.
//!
//! Writes `results/FANOUT.md` and `results/fanout-<UTC>.json` with the command, commit, kernel and
//! machine. Knobs: `WALSHIP_BENCH_BYTES` (default 1GiB), `WALSHIP_BENCH_REPS`, `WALSHIP_BENCH_DIR`.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value as Json};

struct Bench {
    bin: PathBuf,
    root: PathBuf,
    src: PathBuf,
    end_lsn: u64,
    wal_bytes: u64,
}

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    One,
    Two,
    ThreeAll,
    ThreeQuorumOneStopped,
}

impl Shape {
    fn label(self) -> &'static str {
        match self {
            Shape::One => "1 dest",
            Shape::Two => "2 dests K=2",
            Shape::ThreeAll => "3 dests K=3",
            Shape::ThreeQuorumOneStopped => "3 dests K=2, 1 stopped",
        }
    }
}

struct Row {
    shape: Shape,
    mode: &'static str,
    rep: usize,
    seconds: f64,
    send_cpu: Cpu,
    error: Option<String>,
}

impl Row {
    fn gbps(&self, bytes: u64) -> f64 {
        bytes as f64 / 1e9 / self.seconds
    }
}

fn published(dir: &Path) -> u64 {
    walship::recv::published::read(dir).ok().flatten().map_or(0, |p| p.lsn.0)
}

impl Bench {
    fn receiver(&self, dir: &Path, port: u16, mode: &str, label: &str) -> Result<Running, String> {
        let mut c = Command::new(&self.bin);
        c.args(["recv", "--listen", &format!("127.0.0.1:{port}"), "--insecure-no-auth", "--write-mode", mode, "--dir"]).arg(dir);
        let r = spawn(&mut c, &self.root, label).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !tcp_listening(port) {
            if r.exited() || Instant::now() > deadline {
                return Err(format!("receiver on {port} did not listen"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(r)
    }

    fn run(&self, shape: Shape, mode: &'static str, rep: usize) -> Row {
        let mut row = Row { shape, mode, rep, seconds: 0.0, send_cpu: Cpu::default(), error: None };
        if let Err(e) = self.try_run(&mut row) {
            row.error = Some(e);
        }
        row
    }

    fn try_run(&self, row: &mut Row) -> Result<(), String> {
        let n = match row.shape {
            Shape::One => 1,
            Shape::Two => 2,
            _ => 3,
        };
        let mut dirs = Vec::new();
        let mut recvs = Vec::new();
        let mut tos = Vec::new();
        for i in 0..n {
            let dir = self.root.join(format!("dst-{i}"));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let port = free_port().map_err(|e| e.to_string())?;
            recvs.push(self.receiver(&dir, port, row.mode, &format!("recv-{i}"))?);
            tos.push(format!("127.0.0.1:{port}"));
            dirs.push(dir);
        }
        if row.shape == Shape::ThreeQuorumOneStopped {
            recvs[2].signal(libc::SIGSTOP);
        }
        let mut c = Command::new(&self.bin);
        c.args(["send", "--once", "--insecure-no-auth", "--pg-wal"]).arg(&self.src);
        for to in &tos {
            c.args(["--to", to]);
        }
        if row.shape == Shape::ThreeQuorumOneStopped {
            c.args(["--quorum", "2", "--retry-for", "1s", "--peer-timeout", "1s"]);
        }
        let send = spawn(&mut c, &self.root, "send").map_err(|e| e.to_string())?;
        let started = send.started;
        let mut quorum_at = None;
        if row.shape == Shape::ThreeQuorumOneStopped {
            while quorum_at.is_none() && started.elapsed() < Duration::from_secs(600) {
                if published(&dirs[0]) >= self.end_lsn && published(&dirs[1]) >= self.end_lsn {
                    quorum_at = Some(started.elapsed());
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            recvs[2].signal(libc::SIGCONT);
        }
        let done = send.wait(Duration::from_secs(900)).map_err(|e| e.to_string())?;
        for r in recvs {
            r.signal(libc::SIGTERM);
            let _ = r.wait(Duration::from_secs(30));
        }
        // With one stopped: exit 3 (quorum only), or 0 when it caught up after SIGCONT in time.
        let ok = done.exit_code == Some(0) || (row.shape == Shape::ThreeQuorumOneStopped && done.exit_code == Some(3));
        if !ok {
            return Err(format!("send: {}", done.describe_failure()));
        }
        row.seconds = quorum_at.unwrap_or(done.wall).as_secs_f64();
        row.send_cpu = done.cpu;
        for dir in dirs.iter().take(if row.shape == Shape::ThreeQuorumOneStopped { 2 } else { n }) {
            if published(dir) != self.end_lsn {
                return Err(format!("{} holds {} durably, not the end {}", dir.display(), published(dir), self.end_lsn));
            }
        }
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

const SHAPES: [Shape; 4] = [Shape::One, Shape::Two, Shape::ThreeAll, Shape::ThreeQuorumOneStopped];

/// The kernel floor: CPU of one thread writing every file of `files` (mapped) to `sockets`
/// loopback connections in 8 MiB slices, each connection drained by a thread of its own.
fn kernel_floor(files: &[PathBuf], sockets: usize) -> Result<Cpu, String> {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let mut streams = Vec::new();
    let mut sinks = Vec::new();
    for _ in 0..sockets {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        sinks.push(std::thread::spawn(move || {
            let (mut c, _) = listener.accept().expect("floor sink accept");
            let mut buf = vec![0u8; 1 << 20];
            while c.read(&mut buf).map(|n| n > 0).unwrap_or(false) {}
        }));
        streams.push(TcpStream::connect(addr).map_err(|e| e.to_string())?);
    }
    let before = thread_cpu();
    for path in files {
        let file = fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY (bench only): the source directory is private to this run and not modified.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))?;
        for slice in map.chunks(8 << 20) {
            for s in &mut streams {
                s.write_all(slice).map_err(|e| e.to_string())?;
            }
        }
    }
    let cpu = thread_cpu().minus(&before);
    drop(streams);
    for t in sinks {
        let _ = t.join();
    }
    Ok(cpu)
}

fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return; // `cargo test --benches` and `cargo bench -- --list`: nothing to list
    }
    let bytes = std::env::var("WALSHIP_BENCH_BYTES").ok().map(|s| parse_size(&s).expect("WALSHIP_BENCH_BYTES")).unwrap_or(GIB);
    let reps: usize = std::env::var("WALSHIP_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let base = std::env::var_os("WALSHIP_BENCH_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    let root = base.join(format!("walship-fanout-{}", std::process::id()));
    fs::create_dir_all(&root).expect("bench dir");
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_walship"));
    let src = root.join("src");
    let out = Command::new(&bin).args(["gen-wal", "--dir"]).arg(&src).args(["--wal-bytes", &bytes.to_string()]).output().expect("gen-wal");
    assert!(out.status.success(), "gen-wal: {}", String::from_utf8_lossy(&out.stderr));
    let gen: Json = serde_json::from_slice(&out.stdout).expect("gen-wal json");
    let lsn = |k: &str| gen[k].as_str().unwrap().parse::<walship::wal::Lsn>().unwrap().0;
    let (first, end) = (lsn("first_lsn"), lsn("end_lsn"));
    let b = Bench { bin, root: root.clone(), src: src.clone(), end_lsn: end, wal_bytes: end - first };
    let files = list_files(&src).unwrap_or_default();
    let _ = warm(&files);
    let file_bytes: u64 = files.iter().filter_map(|f| fs::metadata(f).ok()).map(|m| m.len()).sum();
    let mut rows = Vec::new();
    let mut floors: Vec<(usize, Cpu)> = Vec::new();
    for rep in 0..reps {
        for sockets in [1, 3] {
            match kernel_floor(&files, sockets) {
                Ok(cpu) => {
                    eprintln!("  rep {rep} kernel floor, {sockets} socket(s): cpu {:.2} s (user {:.2})", cpu.total_s(), cpu.user_s);
                    floors.push((sockets, cpu));
                }
                Err(e) => eprintln!("  rep {rep} kernel floor, {sockets} socket(s) FAILED: {e}"),
            }
        }
        for mode in ["buffered", "direct"] {
            for shape in SHAPES {
                let r = b.run(shape, mode, rep);
                match &r.error {
                    None => eprintln!(
                        "  rep {rep} {mode:<8} {:<24} {:6.2} GB/s  send cpu {:.2} s (user {:.2})",
                        shape.label(),
                        r.gbps(b.wal_bytes),
                        r.send_cpu.total_s(),
                        r.send_cpu.user_s
                    ),
                    Some(e) => eprintln!("  rep {rep} {mode:<8} {:<24} FAILED: {e}", shape.label()),
                }
                rows.push(r);
            }
        }
    }
    report(&b, &rows, &floors, file_bytes, reps);
    let _ = fs::remove_dir_all(&root);
}

/// Median CPU per GiB: (total, user, sys).
fn cpu_per_gib(cpus: &[Cpu], gib: f64) -> (f64, f64, f64) {
    (
        median(cpus.iter().map(|c| c.total_s() / gib).collect()),
        median(cpus.iter().map(|c| c.user_s / gib).collect()),
        median(cpus.iter().map(|c| c.sys_s / gib).collect()),
    )
}

fn report(b: &Bench, rows: &[Row], floors: &[(usize, Cpu)], file_bytes: u64, reps: usize) {
    let gib = b.wal_bytes as f64 / GIB as f64;
    let stat = |shape: Shape, mode: &str| {
        let ok: Vec<&Row> = rows.iter().filter(|r| r.shape == shape && r.mode == mode && r.error.is_none()).collect();
        let cpus: Vec<Cpu> = ok.iter().map(|r| r.send_cpu).collect();
        (median(ok.iter().map(|r| r.gbps(b.wal_bytes)).collect()), cpu_per_gib(&cpus, gib), ok.len())
    };
    let floor = |sockets: usize| {
        let cpus: Vec<Cpu> = floors.iter().filter(|(n, _)| *n == sockets).map(|(_, c)| *c).collect();
        (cpu_per_gib(&cpus, file_bytes as f64 / GIB as f64), cpus.len())
    };
    let commit = command_output("git", &["rev-parse", "--short", "HEAD"]).unwrap_or_default();
    let kernel = command_output("uname", &["-r"]).unwrap_or_default();
    let when = command_output("date", &["-u", "+%Y%m%dT%H%M%SZ"]).unwrap_or_default();
    let mut md = format!(
        "# Fan-out: one sender, 1 vs 3 receivers on loopback (issue #12)\n\n\
         Command: `cargo bench --bench fanout` (WAL {:.0} MiB from gen-wal, {reps} interleaved reps, medians). \
         Commit {} · kernel {} · {} · {} cores · run {}.\n\n\
         GB/s: WAL bytes / seconds until the row's receivers hold the end durably (K=2 with one stopped: until the \
         two running receivers published the end). Sender CPU: the sender's seconds per GiB from its rusage, \
         total and user / sys apart. User CPU is walship's own work (mapping, page checks, CRC32C, framing); sys \
         carries the kernel's TCP work per connection, which on loopback includes the copy into the socket and \
         the receiving side's softirq processing (it runs on the sending thread). **Kernel floor**: a minimal \
         sender writing the same files (mmap, 8 MiB blocking writes, no checks) to 1 and 3 loopback sockets \
         drained by threads: what any sender pays per connection on this host.\n\n\
         | receivers write | row | GB/s | vs 1 dest | sender CPU s/GiB | vs 1 dest | user | sys | ok reps |\n\
         |---|---|---|---|---|---|---|---|---|\n",
        b.wal_bytes as f64 / MIB as f64,
        commit.trim(),
        kernel.trim(),
        cpu_model(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        when.trim()
    );
    let mut json_rows = Vec::new();
    let ((f1, _, _), _) = floor(1);
    for sockets in [1, 3] {
        let ((c, u, sy), n) = floor(sockets);
        md += &format!("| - | kernel floor, {sockets} socket{} | - | - | {c:.2} | {:.2}x | {u:.2} | {sy:.2} | {n}/{reps} |\n", if sockets == 1 { "" } else { "s" }, c / f1);
        json_rows.push(json!({"mode": "-", "row": format!("kernel floor, {sockets} sockets"), "send_cpu_s_per_gib": c, "cpu_vs_one": c / f1, "user_s_per_gib": u, "sys_s_per_gib": sy, "ok_reps": n}));
    }
    let ((f3, _, _), _) = floor(3);
    let mut verdicts = Vec::new();
    for mode in ["buffered", "direct"] {
        let (g1, (c1, u1, _), _) = stat(Shape::One, mode);
        for shape in SHAPES {
            let (g, (c, u, sy), n) = stat(shape, mode);
            md += &format!("| {mode} | {} | {g:.2} | {:.2}x | {c:.2} | {:.2}x | {u:.2} | {sy:.2} | {n}/{reps} |\n", shape.label(), g / g1, c / c1);
            json_rows.push(json!({"mode": mode, "row": shape.label(), "gbps": g, "vs_one": g / g1, "send_cpu_s_per_gib": c, "cpu_vs_one": c / c1, "user_s_per_gib": u, "sys_s_per_gib": sy, "ok_reps": n}));
        }
        let (_, (c3, u3, _), _) = stat(Shape::ThreeAll, mode);
        let (g2, _, _) = stat(Shape::Two, mode);
        let (gq, _, _) = stat(Shape::ThreeQuorumOneStopped, mode);
        verdicts.push(format!(
            "- **{mode}**: 3 destinations cost {:.2}x the CPU of one (the kernel floor: {:.2}x); walship's added CPU per \
             added destination is {:.2} s/GiB against the floor's {:.2} s/GiB ({:.2}x the floor); user CPU 3 vs 1 \
             destination: {:.2}x (pages mapped, checked and CRC'd once). The two running receivers of K=2 with the \
             third SIGSTOPped: {gq:.2} GB/s against {g2:.2} GB/s with no third receiver at all ({:.2}x).",
            c3 / c1,
            f3 / f1,
            (c3 - c1) / 2.0,
            (f3 - f1) / 2.0,
            (c3 - c1) / (f3 - f1),
            u3 / u1,
            gq / g2,
        ));
    }
    md += &format!(
        "\nReading it: the issue's target (3 destinations under 1.5x one's sender CPU) is below what the kernel \
         floor itself costs on loopback ({:.2}x), because each loopback connection's TCP work is charged to the \
         sender and is about as large as walship's whole user-space work per GiB. What the target stands for, \
         pages read and checked once and no per-destination copy in user space, is what the user column and the \
         added-CPU-per-destination against the floor show:\n\n{}\n",
        f3 / f1,
        verdicts.join("\n")
    );
    let failures: Vec<String> = rows.iter().filter_map(|r| r.error.as_ref().map(|e| format!("- rep {} {} {}: {e}", r.rep, r.mode, r.shape.label()))).collect();
    if !failures.is_empty() {
        md += &format!("\nFailed runs:\n{}\n", failures.join("\n"));
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    let _ = fs::create_dir_all(&dir);
    fs::write(dir.join("FANOUT.md"), &md).expect("write FANOUT.md");
    let doc = json!({"commit": commit.trim(), "kernel": kernel.trim(), "cpu": cpu_model(), "wal_bytes": b.wal_bytes, "reps": reps, "rows": json_rows});
    fs::write(dir.join(format!("fanout-{}.json", when.trim())), serde_json::to_string_pretty(&doc).unwrap()).expect("write json");
    print!("{md}");
}
