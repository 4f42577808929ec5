//! The io_uring ring: submits operations, drains completions, and keeps every buffer an operation
//! uses alive until the kernel is done with it. Together with `buffers.rs` (the aligned pool and the
//! segment mappings) it holds all of the data path's `unsafe`, each site with a `// SAFETY:` note.
//!
//! Rules enforced here rather than trusted to callers:
//! - an operation's memory (pool slot, control buffer, send batch, segment map) is owned or
//!   pinned by its in-flight record until its last completion; for SEND_ZC that is the
//!   notification CQE (`IORING_CQE_F_NOTIF`), not the result CQE;
//! - the ring is never dropped with operations in flight: `Drop` cancels and drains them.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::buffers::{BufferPool, SegmentMap};

/// `IORING_SEND_ZC_REPORT_USAGE`: ask the notification to say whether the kernel copied anyway.
const SEND_ZC_REPORT_USAGE: u16 = 8;
/// `IORING_NOTIF_USAGE_ZC_COPIED`, set in the notification's `res` when the data was copied.
const NOTIF_USAGE_ZC_COPIED: i32 = 1 << 31;
/// Linux `UIO_MAXIOV`.
pub const IOV_MAX: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error(
        "io_uring is not available here ({0}). walship needs io_uring for its data path. If this runs in a \
         container, allow the io_uring_setup/io_uring_enter/io_uring_register syscalls in the seccomp profile; \
         on the host check `sysctl kernel.io_uring_disabled` (must be 0, or 1 with this user in the \
         io_uring group)"
    )]
    Unavailable(io::Error),
    #[error("io_uring on this kernel lacks opcode {name} (kernel 6.1 or newer is required)")]
    MissingOpcode { name: &'static str },
    #[error("io_uring {op} failed: {source}")]
    Io { op: &'static str, source: io::Error },
}

/// What this kernel's io_uring can do, found by probing rather than assumed.
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub send_zc: bool,
    pub sendmsg_zc: bool,
}

/// One completion, in the caller's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    /// Syscall-style result: bytes or 0 on success, `-errno` on failure.
    pub result: i32,
    pub kind: CompletionKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompletionKind {
    /// The operation's result.
    Done,
    /// A SEND_ZC notification: the kernel no longer uses the buffers. `copied` when it copied anyway.
    ZeroCopyNotification { copied: bool },
}

/// Headers and payload ranges sent with one sendmsg; owns or pins every byte it points at.
pub struct SendBatch {
    small: Vec<u8>,
    parts: Vec<Part>,
    maps: Vec<Arc<SegmentMap>>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
    len_bytes: usize,
}

enum Part {
    Small { offset: usize, len: usize },
    Map { map: usize, offset: usize, len: usize },
}

impl SendBatch {
    /// `small_bytes_max`: room for all headers; it is reserved now so the buffer never moves.
    pub fn new(small_bytes_max: usize) -> SendBatch {
        SendBatch {
            small: Vec::with_capacity(small_bytes_max),
            parts: Vec::new(),
            maps: Vec::new(),
            iov: Vec::new(),
            // SAFETY: msghdr is a plain C struct for which all-zeroes is a valid (empty) value.
            msg: unsafe { std::mem::zeroed() },
            len_bytes: 0,
        }
    }

    pub fn len_bytes(&self) -> usize {
        self.len_bytes
    }

    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    pub fn has_room(&self, parts: usize, small_bytes: usize) -> bool {
        self.parts.len() + parts <= IOV_MAX && self.small.len() + small_bytes <= self.small.capacity()
    }

    pub fn push_small(&mut self, bytes: &[u8]) {
        assert!(self.has_room(1, bytes.len()), "send batch full");
        let offset = self.small.len();
        self.small.extend_from_slice(bytes);
        self.parts.push(Part::Small { offset, len: bytes.len() });
        self.len_bytes += bytes.len();
    }

    pub fn push_map(&mut self, map: &Arc<SegmentMap>, offset: usize, len: usize) {
        assert!(self.has_room(1, 0), "send batch full");
        assert!(offset + len <= map.bytes().len(), "range outside the segment map");
        let index = match self.maps.iter().position(|m| Arc::ptr_eq(m, map)) {
            Some(i) => i,
            None => {
                self.maps.push(Arc::clone(map));
                self.maps.len() - 1
            }
        };
        self.parts.push(Part::Map { map: index, offset, len });
        self.len_bytes += len;
    }

    /// Points the iovecs and the msghdr at the bytes. Called once the batch sits in its final
    /// (boxed) place; `small` never reallocates after `new` because pushes stay within capacity.
    fn finalize(&mut self) {
        self.iov = self
            .parts
            .iter()
            .map(|part| match *part {
                Part::Small { offset, len } => libc::iovec {
                    iov_base: self.small[offset..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                },
                Part::Map { map, offset, len } => libc::iovec {
                    iov_base: self.maps[map].bytes()[offset..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                },
            })
            .collect();
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
    }
}

/// What an in-flight operation keeps alive or has borrowed.
enum Hold {
    Nothing,
    Batch(#[allow(dead_code)] Box<SendBatch>),
    Bytes(#[allow(dead_code)] Box<[u8]>),
    SlotRead(usize),
    SlotWrite(usize),
    Ctl(usize),
}

struct InFlight {
    tag: u64,
    hold: Hold,
    /// The result CQE has arrived; a zero-copy send then waits for its notification.
    result_seen: bool,
}

pub struct Ring {
    uring: IoUring,
    pool: BufferPool,
    pool_registered: bool,
    ctl: Vec<Box<[u8]>>,
    ctl_busy: Vec<bool>,
    ops: Vec<Option<InFlight>>,
    free: Vec<usize>,
    in_flight: usize,
    backlog: VecDeque<squeue::Entry>,
    caps: Capabilities,
}

impl Ring {
    /// Probes io_uring, sets up a ring with `entries` submission slots, registers `pool` as fixed
    /// buffers, and allocates `ctl_count` control buffers of `ctl_bytes` each.
    pub fn new(entries: u32, pool: BufferPool, ctl_count: usize, ctl_bytes: usize) -> Result<Ring, RingError> {
        let uring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .build(entries)
            .map_err(RingError::Unavailable)?;
        let caps = probe_capabilities(&uring)?;
        let iov = pool.iovecs();
        // SAFETY: the iovecs describe the pool's anonymous mapping, which the Ring owns and
        // unmaps only after the ring is gone (field order: `uring` drops first; Drop drains).
        let pool_registered = unsafe { uring.submitter().register_buffers(&iov) }.is_ok();
        Ok(Ring {
            uring,
            pool,
            pool_registered,
            ctl: (0..ctl_count).map(|_| vec![0u8; ctl_bytes].into_boxed_slice()).collect(),
            ctl_busy: vec![false; ctl_count],
            ops: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            backlog: VecDeque::new(),
            caps,
        })
    }

    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }

    pub fn pool(&self) -> &BufferPool {
        &self.pool
    }

    pub fn pool_mut(&mut self) -> &mut BufferPool {
        &mut self.pool
    }

    pub fn pool_registered(&self) -> bool {
        self.pool_registered
    }

    /// Operations whose last completion has not arrived.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// A control buffer's bytes; refused while a receive into it is in flight.
    pub fn ctl(&self, index: usize) -> &[u8] {
        assert!(!self.ctl_busy[index], "control buffer {index} read while in flight");
        &self.ctl[index]
    }

    pub fn accept(&mut self, listener: RawFd, tag: u64) {
        let entry = opcode::Accept::new(types::Fd(listener), std::ptr::null_mut(), std::ptr::null_mut())
            .flags(libc::SOCK_CLOEXEC)
            .build();
        self.push(entry, tag, Hold::Nothing);
    }

    /// Receives up to `len` bytes (exactly `len` with `wait_all`) into control buffer `index`.
    pub fn recv_ctl(&mut self, socket: RawFd, tag: u64, index: usize, len: usize, wait_all: bool) {
        assert!(!self.ctl_busy[index], "control buffer {index} already in flight");
        assert!(len > 0 && len <= self.ctl[index].len());
        self.ctl_busy[index] = true;
        let ptr = self.ctl[index].as_mut_ptr();
        let flags = if wait_all { libc::MSG_WAITALL } else { 0 };
        let entry = opcode::Recv::new(types::Fd(socket), ptr, len as u32).flags(flags).build();
        self.push(entry, tag, Hold::Ctl(index));
    }

    /// Reads up to `len` bytes from `fd` (e.g. an eventfd's 8-byte counter) into control buffer
    /// `index`. The buffer is the ring's own, held until the completion like a receive's.
    pub fn read_ctl(&mut self, fd: RawFd, tag: u64, index: usize, len: usize) {
        assert!(!self.ctl_busy[index], "control buffer {index} already in flight");
        assert!(len > 0 && len <= self.ctl[index].len());
        self.ctl_busy[index] = true;
        let ptr = self.ctl[index].as_mut_ptr();
        let entry = opcode::Read::new(types::Fd(fd), ptr, len as u32).offset(u64::MAX).build();
        self.push(entry, tag, Hold::Ctl(index));
    }

    /// Receives exactly `len` bytes into pool slot `slot` at `offset` (MSG_WAITALL).
    pub fn recv_slot(&mut self, socket: RawFd, tag: u64, slot: usize, offset: usize, len: usize) {
        assert!(offset + len <= self.pool.slot_bytes());
        assert!(!self.pool.in_flight(slot), "receive into slot {slot} while it is in flight");
        self.pool.begin_write(slot);
        // SAFETY (pointer arithmetic only): offset + len lies inside the slot (asserted above).
        let ptr = unsafe { self.pool.slot_ptr(slot).add(offset) };
        let entry = opcode::Recv::new(types::Fd(socket), ptr, len as u32).flags(libc::MSG_WAITALL).build();
        self.push(entry, tag, Hold::SlotWrite(slot));
    }

    /// Writes `len` bytes of pool slot `slot` from `offset` to `file_offset` of `file`.
    pub fn write_slot(&mut self, file: RawFd, tag: u64, slot: usize, offset: usize, len: usize, file_offset: u64) {
        assert!(offset + len <= self.pool.slot_bytes());
        assert!(!self.pool.writes_in_flight(slot), "write from slot {slot} while a receive into it is in flight");
        self.pool.begin_read(slot);
        // SAFETY (pointer arithmetic only): offset + len lies inside the slot (asserted above).
        let ptr = unsafe { self.pool.slot_ptr(slot).add(offset) } as *const u8;
        let entry = if self.pool_registered {
            opcode::WriteFixed::new(types::Fd(file), ptr, len as u32, slot as u16).offset(file_offset).build()
        } else {
            opcode::Write::new(types::Fd(file), ptr, len as u32).offset(file_offset).build()
        };
        self.push(entry, tag, Hold::SlotRead(slot));
    }

    /// fdatasync (or fsync) of `file`. Unordered with respect to other operations: submit it
    /// only after the completions of the writes it must cover.
    pub fn fsync(&mut self, file: RawFd, tag: u64, data_only: bool) {
        let flags = if data_only { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
        let entry = opcode::Fsync::new(types::Fd(file)).flags(flags).build();
        self.push(entry, tag, Hold::Nothing);
    }

    /// Sends all of `bytes` (MSG_WAITALL), keeping them until the completion.
    pub fn send_bytes(&mut self, socket: RawFd, tag: u64, bytes: Vec<u8>) {
        let bytes = bytes.into_boxed_slice();
        let entry = opcode::Send::new(types::Fd(socket), bytes.as_ptr(), bytes.len() as u32)
            .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
            .build();
        self.push(entry, tag, Hold::Bytes(bytes));
    }

    /// Sends a batch with one sendmsg (MSG_WAITALL), zero-copy when `zero_copy`. The batch, and
    /// through it every segment map it points into, stays alive until the last completion.
    pub fn send_batch(&mut self, socket: RawFd, tag: u64, batch: SendBatch, zero_copy: bool) {
        let mut batch = Box::new(batch);
        batch.finalize();
        let msg: *const libc::msghdr = &batch.msg;
        let flags = (libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32;
        let entry = if zero_copy {
            assert!(self.caps.sendmsg_zc, "zero-copy send requested on a kernel without SENDMSG_ZC");
            opcode::SendMsgZc::new(types::Fd(socket), msg).flags(flags).ioprio(SEND_ZC_REPORT_USAGE).build()
        } else {
            opcode::SendMsg::new(types::Fd(socket), msg).flags(flags).build()
        };
        self.push(entry, tag, Hold::Batch(batch));
    }

    /// Cancels every operation on `fd` (e.g. a dead connection); their completions still arrive.
    pub fn cancel_fd(&mut self, fd: RawFd) {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build();
        self.push_untracked(entry);
    }

    fn push(&mut self, entry: squeue::Entry, tag: u64, hold: Hold) {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.ops.push(None);
                self.ops.len() - 1
            }
        };
        debug_assert!(self.ops[index].is_none());
        self.ops[index] = Some(InFlight { tag, hold, result_seen: false });
        self.in_flight += 1;
        self.backlog.push_back(entry.user_data(index as u64));
    }

    fn push_untracked(&mut self, entry: squeue::Entry) {
        self.backlog.push_back(entry.user_data(u64::MAX));
    }

    fn flush_backlog(&mut self) -> io::Result<()> {
        while !self.backlog.is_empty() {
            {
                let mut sq = self.uring.submission();
                while let Some(entry) = self.backlog.front() {
                    // SAFETY: every entry's memory is held by its InFlight record (see `Hold`),
                    // which is released only after the operation's last completion.
                    if unsafe { sq.push(entry) }.is_err() {
                        break;
                    }
                    self.backlog.pop_front();
                }
            }
            if !self.backlog.is_empty() {
                self.submit_retrying(0)?;
            }
        }
        Ok(())
    }

    fn submit_retrying(&self, want: usize) -> io::Result<()> {
        loop {
            match self.uring.submit_and_wait(want) {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Submits what is queued and waits for at least one completion, or `timeout`.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> Result<(), RingError> {
        self.flush_backlog().map_err(|source| RingError::Io { op: "submit", source })?;
        let want = if self.in_flight > 0 || timeout.is_some() { 1 } else { 0 };
        let result = match timeout {
            Some(t) => {
                let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.uring.submitter().submit_with_args(want, &args)
            }
            None => self.uring.submit_and_wait(want),
        };
        match result {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)) => Ok(()),
            Err(source) => Err(RingError::Io { op: "submit_and_wait", source }),
        }
    }

    /// Moves every available completion into `out`, releasing what each finished operation held.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let mut raw: Vec<(u64, i32, u32)> = Vec::new();
        for cqe in self.uring.completion() {
            raw.push((cqe.user_data(), cqe.result(), cqe.flags()));
        }
        for (user_data, result, flags) in raw {
            if user_data == u64::MAX {
                continue; // a cancel request's own completion
            }
            let index = user_data as usize;
            let op = self.ops[index].as_mut().expect("completion for an unknown operation");
            let tag = op.tag;
            if cqueue::notif(flags) {
                debug_assert!(op.result_seen);
                let copied = result & NOTIF_USAGE_ZC_COPIED != 0;
                out.push(Completion { tag, result: 0, kind: CompletionKind::ZeroCopyNotification { copied } });
                self.release(index);
                continue;
            }
            op.result_seen = true;
            out.push(Completion { tag, result, kind: CompletionKind::Done });
            if !cqueue::more(flags) {
                self.release(index);
            }
        }
    }

    fn release(&mut self, index: usize) {
        let op = self.ops[index].take().expect("released twice");
        match op.hold {
            Hold::SlotRead(slot) => self.pool.end_read(slot),
            Hold::SlotWrite(slot) => self.pool.end_write(slot),
            Hold::Ctl(i) => self.ctl_busy[i] = false,
            Hold::Nothing | Hold::Batch(_) | Hold::Bytes(_) => {}
        }
        self.free.push(index);
        self.in_flight -= 1;
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        self.backlog.clear();
        // Cancel everything, then wait until the kernel has returned every buffer.
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::any().all()).build();
        self.push_untracked(entry);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut sink = Vec::new();
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            if self.submit_and_wait(Some(Duration::from_millis(100))).is_err() {
                break;
            }
            self.drain(&mut sink);
            sink.clear();
        }
        if self.in_flight > 0 {
            // The kernel still owns some buffers: leak them rather than free memory it may touch.
            let pool = std::mem::replace(&mut self.pool, BufferPool::new(1, 4096).expect("tiny pool"));
            std::mem::forget(pool);
            let ctl = std::mem::take(&mut self.ctl);
            std::mem::forget(ctl);
            let ops = std::mem::take(&mut self.ops);
            std::mem::forget(ops);
        }
    }
}

/// Takes ownership of the socket a successful accept completion returned.
pub fn accepted_stream(c: &Completion) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    assert!(c.result >= 0 && c.kind == CompletionKind::Done, "not a successful accept: {c:?}");
    // SAFETY: a successful IORING_OP_ACCEPT result is a new descriptor that nothing else owns;
    // each completion is handed out once (drain moves it out of the ring).
    unsafe { std::net::TcpStream::from_raw_fd(c.result) }
}

fn probe_capabilities(uring: &IoUring) -> Result<Capabilities, RingError> {
    let mut probe = io_uring::Probe::new();
    uring
        .submitter()
        .register_probe(&mut probe)
        .map_err(|source| RingError::Io { op: "register_probe", source })?;
    let required: [(u8, &'static str); 7] = [
        (opcode::Recv::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::WriteFixed::CODE, "WRITE_FIXED"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::Accept::CODE, "ACCEPT"),
    ];
    for (code, name) in required {
        if !probe.is_supported(code) {
            return Err(RingError::MissingOpcode { name });
        }
    }
    Ok(Capabilities {
        send_zc: probe.is_supported(opcode::SendZc::CODE),
        sendmsg_zc: probe.is_supported(opcode::SendMsgZc::CODE),
    })
}
