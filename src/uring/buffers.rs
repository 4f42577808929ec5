//! Memory the kernel reads or writes behind our back: the aligned buffer pool and the WAL segment maps.
//!
//! Everything here that needs `unsafe` says why the memory outlives the kernel's use of it. The pool
//! counts the operations in flight per slot, so safe code can never get a `&mut` to a slot the kernel
//! is still reading (a write) or writing (a receive).

use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

/// One read-only mapping of a WAL segment file, shared by every send that references it.
///
/// Send operations hold an `Arc<SegmentMap>` until their last completion (for SEND_ZC: the
/// notification), so the mapping is never unmapped while the kernel may still read it.
#[derive(Debug)]
pub struct SegmentMap {
    map: memmap2::Mmap,
}

impl SegmentMap {
    /// Maps `file` read-only; `len_bytes` must equal the file size (a WAL segment size).
    pub fn map(file: &File, len_bytes: u64) -> io::Result<Arc<SegmentMap>> {
        let meta = file.metadata()?;
        if meta.len() != len_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file is {} bytes, expected {} (a whole WAL segment)", meta.len(), len_bytes),
            ));
        }
        // SAFETY: memmap2 requires that the file is not truncated while mapped (a truncated
        // mapping raises SIGBUS on access). PostgreSQL never truncates a WAL segment: it creates
        // them full size and recycles them by rename. Content may change under us when a segment
        // is recycled; that is not undefined behaviour for a shared read-only mapping of bytes
        // we treat as untrusted, and it is caught by the page checks and the frame CRC.
        let map = unsafe { memmap2::MmapOptions::new().len(len_bytes as usize).map(file)? };
        // Sequential read-ahead: we stream each segment front to back once.
        let _ = map.advise(memmap2::Advice::Sequential);
        Ok(Arc::new(SegmentMap { map }))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Asks the kernel to start reading `file` into the page cache now (asynchronous readahead), so a
/// later mapping of it does not stall the single sender thread on page faults. Advisory only.
pub fn prefetch(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: posix_fadvise only reads its integer arguments; the descriptor is open for the whole
    // call (borrowed from `file`), and an error is harmless (the advice is dropped).
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
}

/// A fixed set of equally sized, 4 KiB aligned slots in anonymous memory, suitable for O_DIRECT
/// and for registration as io_uring fixed buffers.
pub struct BufferPool {
    base: NonNull<u8>,
    slot_bytes: usize,
    slots: usize,
    /// Operations in flight that read the slot (writes to disk, sends).
    readers: Vec<u32>,
    /// Operations in flight that write the slot (receives).
    writers: Vec<u32>,
}

// SAFETY: the pool owns its anonymous mapping; it holds no thread-bound state.
unsafe impl Send for BufferPool {}

pub const POOL_ALIGN_BYTES: usize = 4096;

impl BufferPool {
    pub fn new(slots: usize, slot_bytes: usize) -> io::Result<BufferPool> {
        assert!(slots > 0 && slot_bytes > 0);
        assert!(slot_bytes % POOL_ALIGN_BYTES == 0, "slot_bytes must be a multiple of 4096");
        let total = slots.checked_mul(slot_bytes).expect("pool size overflows");
        // SAFETY: an anonymous private mapping with no address hint; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr as *mut u8).expect("mmap returned null");
        Ok(BufferPool { base, slot_bytes, slots, readers: vec![0; slots], writers: vec![0; slots] })
    }

    pub fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    pub fn slots(&self) -> usize {
        self.slots
    }

    /// The iovecs to register with the ring (one per slot, so a slot index is a buffer index).
    pub(crate) fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots)
            .map(|i| libc::iovec { iov_base: self.slot_ptr(i) as *mut libc::c_void, iov_len: self.slot_bytes })
            .collect()
    }

    pub(crate) fn slot_ptr(&self, slot: usize) -> *mut u8 {
        assert!(slot < self.slots);
        // SAFETY: slot < slots, so the offset stays inside the mapping.
        unsafe { self.base.as_ptr().add(slot * self.slot_bytes) }
    }

    pub fn in_flight(&self, slot: usize) -> bool {
        self.readers[slot] > 0 || self.writers[slot] > 0
    }

    pub fn writes_in_flight(&self, slot: usize) -> bool {
        self.writers[slot] > 0
    }

    /// Read access; refused while the kernel may be writing into the slot.
    pub fn slot(&self, slot: usize) -> &[u8] {
        assert!(self.writers[slot] == 0, "slot {slot} read while a receive into it is in flight");
        // SAFETY: no receive is in flight into this slot (checked above), and the pool's
        // mapping lives as long as &self.
        unsafe { std::slice::from_raw_parts(self.slot_ptr(slot), self.slot_bytes) }
    }

    /// Write access; refused while any operation on the slot is in flight.
    pub fn slot_mut(&mut self, slot: usize) -> &mut [u8] {
        assert!(!self.in_flight(slot), "slot {slot} mutated while an operation on it is in flight");
        // SAFETY: no kernel operation touches this slot (checked above) and &mut self is unique.
        unsafe { std::slice::from_raw_parts_mut(self.slot_ptr(slot), self.slot_bytes) }
    }

    pub(crate) fn begin_read(&mut self, slot: usize) {
        self.readers[slot] += 1;
    }
    pub(crate) fn end_read(&mut self, slot: usize) {
        assert!(self.readers[slot] > 0);
        self.readers[slot] -= 1;
    }
    pub(crate) fn begin_write(&mut self, slot: usize) {
        self.writers[slot] += 1;
    }
    pub(crate) fn end_write(&mut self, slot: usize) {
        assert!(self.writers[slot] > 0);
        self.writers[slot] -= 1;
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // The ring that registered this pool drains every operation before it lets the pool go
        // (see Ring::drop); a pool with operations still in flight is leaked instead of freed.
        if (0..self.slots).any(|i| self.in_flight(i)) {
            return;
        }
        // SAFETY: base/len are exactly what mmap returned; nothing references the memory any more.
        unsafe {
            libc::munmap(self.base.as_ptr() as *mut libc::c_void, self.slots * self.slot_bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_aligned_and_distinct() {
        let mut pool = BufferPool::new(3, 8192).unwrap();
        for i in 0..3 {
            assert_eq!(pool.slot_ptr(i) as usize % POOL_ALIGN_BYTES, 0);
            pool.slot_mut(i).fill(i as u8 + 1);
        }
        for i in 0..3 {
            assert!(pool.slot(i).iter().all(|&b| b == i as u8 + 1));
        }
    }

    #[test]
    #[should_panic(expected = "in flight")]
    fn slot_mut_refused_while_in_flight() {
        let mut pool = BufferPool::new(1, 4096).unwrap();
        pool.begin_read(0);
        let _ = pool.slot_mut(0);
    }
}
