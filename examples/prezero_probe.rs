//! Measures what the receiver's file preparation buys on this filesystem: O_DIRECT 1 MiB writes
//! with an fdatasync after every 4 MiB into 16 MiB segment files that are
//! (a) fresh: created and `set_len` (sparse) inside the timed loop, as `walship recv` does today;
//! (b) fallocated ahead of time (unwritten extents);
//! (c) pre-zeroed ahead of time (written with zeros, fdatasynced, directory fsynced).
//! Modes are interleaved per repetition (the machine is shared and noisy).
//!
//! `cargo run --release --example prezero_probe -- DIR [FILES_PER_MODE] [REPS]`
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::Instant;

const SEG: u64 = 16 << 20;
const IO: usize = 1 << 20;
const SYNC_EVERY: u64 = 4 << 20;

fn aligned(buf: &mut [u8]) -> &mut [u8] {
    let off = buf.as_ptr().align_offset(4096);
    &mut buf[off..off + IO]
}

fn open_direct(p: &Path, create: bool) -> File {
    OpenOptions::new().create(create).write(true).custom_flags(libc::O_DIRECT).open(p).expect("open")
}

fn prepare(dir: &Path, mode: &str, n: usize, zero: &[u8]) -> f64 {
    let t = Instant::now();
    for i in 0..n {
        let p = dir.join(format!("{mode}-{i}"));
        match mode {
            "falloc" => {
                let f = open_direct(&p, true);
                let r = unsafe_free_fallocate(&f);
                assert_eq!(r, 0, "fallocate");
                f.sync_data().unwrap();
            }
            "zeroed" => {
                let f = open_direct(&p, true);
                let mut off = 0;
                while off < SEG {
                    f.write_all_at(zero, off).unwrap();
                    off += IO as u64;
                }
                f.sync_data().unwrap();
            }
            _ => {}
        }
    }
    File::open(dir).unwrap().sync_all().unwrap();
    t.elapsed().as_secs_f64()
}

/// fallocate through the safe std API is not available; posix_fallocate via libc needs no unsafe
/// pointer handling but is an extern fn, so call it through nix-free std: use `File::set_len` is
/// sparse, so we shell out to fallocate(1) instead (untimed preparation).
fn unsafe_free_fallocate(f: &File) -> i32 {
    let path = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd())).unwrap();
    let st = std::process::Command::new("fallocate").arg("-l").arg(SEG.to_string()).arg(&path).status().unwrap();
    if st.success() { 0 } else { 1 }
}

fn run(dir: &Path, mode: &str, n: usize, data: &[u8], lat: &mut Vec<u64>) -> f64 {
    // Live-follow pattern (PROBE_SMALL=1): 8 KiB writes, each followed by fdatasync, over the
    // first 2 MiB of each file.
    let small = std::env::var("PROBE_SMALL").is_ok();
    let (io, sync_every, per_file) = if small { (8192usize, 8192u64, 2u64 << 20) } else { (IO, SYNC_EVERY, SEG) };
    let data = &data[..io];
    let t = Instant::now();
    for i in 0..n {
        let p = dir.join(format!("{mode}-{i}"));
        let f = if mode == "fresh" {
            let f = open_direct(&p, true);
            f.set_len(SEG).unwrap();
            f
        } else {
            open_direct(&p, false)
        };
        let mut off = 0u64;
        while off < per_file {
            f.write_all_at(data, off).unwrap();
            off += io as u64;
            if off % sync_every == 0 {
                let s = Instant::now();
                f.sync_data().unwrap();
                lat.push(s.elapsed().as_micros() as u64);
            }
        }
        if mode == "fresh" && i == 0 {
            // walship fsyncs the directory after creating a file (in the same group commit)
            File::open(dir).unwrap().sync_all().unwrap();
        }
    }
    File::open(dir).unwrap().sync_all().unwrap();
    (n as u64 * per_file) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn pct(v: &mut [u64], q: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = Path::new(args.get(1).expect("DIR"));
    let n: usize = args.get(2).map_or(32, |s| s.parse().unwrap());
    let reps: usize = args.get(3).map_or(3, |s| s.parse().unwrap());
    let mut zb = vec![0u8; IO + 4096];
    let zero = aligned(&mut zb).to_vec();
    let mut zbuf = vec![0u8; IO + 4096];
    let z = aligned(&mut zbuf);
    z.copy_from_slice(&zero);
    let mut db = vec![0u8; IO + 4096];
    let data = aligned(&mut db);
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i * 131 % 251) as u8 | 1;
    }
    println!("mode    rep  GB/s   fdatasync p50 us  p99 us  max us  prep s (untimed)");
    let mut all: std::collections::BTreeMap<&str, (Vec<f64>, Vec<u64>)> = Default::default();
    for rep in 0..reps {
        let modes = ["fresh", "falloc", "zeroed"];
        for k in 0..3 {
            // rotate order per rep so no mode always runs first
            let mode = modes[(k + rep) % 3];
            let dir = root.join(format!("r{rep}-{mode}"));
            std::fs::create_dir_all(&dir).unwrap();
            let prep = prepare(&dir, mode, n, z);
            let mut lat = Vec::new();
            let gbs = run(&dir, mode, n, data, &mut lat);
            let e = all.entry(mode).or_default();
            e.0.push(gbs);
            e.1.extend(&lat);
            let max = *lat.iter().max().unwrap();
            println!("{mode:7} {rep:3}  {gbs:5.2}  {:8}  {:8}  {:8}  {prep:.2}", pct(&mut lat, 0.5), pct(&mut lat, 0.99), max);
            std::fs::remove_dir_all(&dir).unwrap();
            File::open(root).unwrap().sync_all().unwrap();
        }
    }
    println!("\nsummary: mode, GB/s per rep, fdatasync p50/p99 over all reps (us)");
    for (mode, (g, mut l)) in all {
        println!("{mode:7} {:?}  p50 {} p99 {}", g.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>(), pct(&mut l, 0.5), pct(&mut l, 0.99));
    }
}
