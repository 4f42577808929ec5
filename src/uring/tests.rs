//! Tests of the ring against the real kernel: O_DIRECT writes + fdatasync, sends over loopback TCP,
//! SEND_ZC notifications. An opcode the kernel lacks is probed, reported and skipped.

use super::*;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

/// A scratch directory on the project's filesystem (O_DIRECT needs a real one, not tmpfs).
fn scratch_dir() -> Result<tempfile::TempDir, std::io::Error> {
    let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target").join("tmp");
    std::fs::create_dir_all(&base)?;
    tempfile::tempdir_in(base)
}

fn wait_for(ring: &mut Ring, n: usize) -> Vec<Completion> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while out.len() < n {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {n} completions, got {out:?}");
        ring.submit_and_wait(Some(Duration::from_millis(100))).unwrap();
        ring.drain(&mut out);
    }
    out
}

#[test]
fn o_direct_write_fixed_then_fdatasync() {
    let dir = scratch_dir().unwrap();
    let path = dir.path().join("f");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .unwrap();
    let mut ring = Ring::new(32, BufferPool::new(2, 65536).unwrap(), 1, 4096).unwrap();
    ring.pool_mut().slot_mut(1)[..8192].fill(0xAB);
    ring.write_slot(file.as_raw_fd(), 7, 1, 0, 8192, 4096);
    let done = wait_for(&mut ring, 1);
    assert_eq!(done[0], Completion { tag: 7, result: 8192, kind: CompletionKind::Done });
    ring.fsync(file.as_raw_fd(), 8, true);
    let done = wait_for(&mut ring, 1);
    assert_eq!(done[0].result, 0);
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(bytes.len(), 4096 + 8192);
    assert!(bytes[..4096].iter().all(|&b| b == 0));
    assert!(bytes[4096..].iter().all(|&b| b == 0xAB));
    assert_eq!(ring.in_flight(), 0);
}

fn loopback_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

fn send_batch_roundtrip(zero_copy: bool) {
    let (client, mut server) = loopback_pair();
    let dir = scratch_dir().unwrap();
    let path = dir.path().join("seg");
    let content: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&path, &content).unwrap();
    let map = SegmentMap::map(&std::fs::File::open(&path).unwrap(), 1 << 20).unwrap();
    let mut ring = Ring::new(32, BufferPool::new(1, 4096).unwrap(), 1, 4096).unwrap();
    if zero_copy && !ring.capabilities().sendmsg_zc {
        eprintln!("SKIP: this kernel's io_uring has no SENDMSG_ZC");
        return;
    }
    let mut batch = SendBatch::new(64);
    batch.push_small(b"head");
    batch.push_map(&map, 100, 300_000);
    batch.push_small(b"tail");
    batch.push_map(&map, 0, 10);
    drop(map); // the batch pins the mapping now
    let reader = std::thread::spawn(move || {
        let mut got = vec![0u8; 4 + 300_000 + 4 + 10];
        server.read_exact(&mut got).unwrap();
        got
    });
    ring.send_batch(client.as_raw_fd(), 1, batch, zero_copy);
    let done = wait_for(&mut ring, if zero_copy { 2 } else { 1 });
    assert_eq!(done[0], Completion { tag: 1, result: 300_018, kind: CompletionKind::Done });
    if zero_copy {
        assert!(matches!(done[1].kind, CompletionKind::ZeroCopyNotification { .. }));
    }
    assert_eq!(ring.in_flight(), 0);
    let got = reader.join().unwrap();
    assert_eq!(&got[..4], b"head");
    assert_eq!(&got[4..300_004], &content[100..300_100]);
    assert_eq!(&got[300_004..300_008], b"tail");
    assert_eq!(&got[300_008..], &content[..10]);
}

#[test]
fn sendmsg_plain_keeps_map_alive() {
    send_batch_roundtrip(false);
}

#[test]
fn sendmsg_zero_copy_delivers_notification() {
    send_batch_roundtrip(true);
}

#[test]
fn recv_into_slot_and_ctl() {
    let (mut client, server) = loopback_pair();
    let mut ring = Ring::new(32, BufferPool::new(1, 8192).unwrap(), 1, 4096).unwrap();
    ring.recv_slot(server.as_raw_fd(), 3, 0, 100, 5000);
    std::io::Write::write_all(&mut client, &vec![9u8; 5000]).unwrap();
    let done = wait_for(&mut ring, 1);
    assert_eq!(done[0].result, 5000);
    assert!(ring.pool().slot(0)[100..5100].iter().all(|&b| b == 9));
    ring.recv_ctl(server.as_raw_fd(), 4, 0, 32, true);
    std::io::Write::write_all(&mut client, &[1u8; 32]).unwrap();
    let done = wait_for(&mut ring, 1);
    assert_eq!(done[0].result, 32);
    assert_eq!(&ring.ctl(0)[..32], &[1u8; 32]);
}

#[test]
fn drop_with_receive_in_flight_cancels_and_drains() {
    let (_client, server) = loopback_pair();
    let mut ring = Ring::new(8, BufferPool::new(1, 4096).unwrap(), 1, 4096).unwrap();
    ring.recv_slot(server.as_raw_fd(), 1, 0, 0, 4096);
    ring.submit_and_wait(Some(Duration::from_millis(10))).unwrap();
    assert_eq!(ring.in_flight(), 1);
    drop(ring); // must not hang or free the slot while the kernel could write into it
}
