//! The io_uring half of the connection driver: one ring per core, a provided-buffer ring that
//! multishot receives fill, and the few submissions the driver makes (receive, send, wait for
//! room, cancel, wait for a listener).
//!
//! Why: with epoll every read and every write is a system call of its own; with this ring a
//! connection's receive is armed once (multishot: the kernel posts a completion for each arrival
//! until it is cancelled or runs out of buffers), and all the sends of a driver turn go to the
//! kernel in one `io_uring_enter`. An idle connection pins no buffer: the kernel picks one from
//! the shared pool only when bytes arrive, and the driver hands it back as soon as it copied them
//! out. glommio's own ring waits for this ring's descriptor to become readable (completions
//! posted), exactly as it waits on the epoll descriptor in the epoll driver.
//!
//! This module is the only unsafe code of the driver. Its invariants, which the driver keeps:
//! - a send's bytes stay where they are (a `Bytes` held by the connection's slot, never
//!   dropped or replaced) until its completion is reaped;
//! - the ring is dropped before the buffer pool (field order of [`Uring`]), so the kernel never
//!   writes into freed memory;
//! - a buffer id is returned to the pool once, after its bytes were copied out.

#![allow(unsafe_code)]

use std::cell::{Cell, RefCell};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

/// Receive buffers in the pool (a power of two) and the size of each. 128 × 8 KiB: 1 MiB per
/// core, touched as traffic needs it; a burst of more completions than buffers ends some
/// receives with ENOBUFS, and the driver arms them again once the buffers are back.
pub(crate) const BUFFERS: u16 = 128;
pub(crate) const BUFFER_SIZE: usize = 8 * 1024;
const GROUP: u16 = 0;
/// Submission and completion queue sizes.
const SQ_ENTRIES: u32 = 1024;
const CQ_ENTRIES: u32 = 16 * 1024;

/// What a completion is for: the low 8 bits of its user data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Recv = 1,
    Send = 2,
    /// Waiting for room to write (a transport's writes, or a send the kernel refused with EAGAIN).
    Writable = 3,
    Cancel = 4,
    /// A listener has connections to accept (`key` is its index).
    Listen = 5,
}

impl Op {
    fn from(tag: u64) -> Option<Op> {
        Some(match tag {
            1 => Op::Recv,
            2 => Op::Send,
            3 => Op::Writable,
            4 => Op::Cancel,
            5 => Op::Listen,
            _ => return None,
        })
    }
}

/// User data: op in bits 0–7, the slot's generation (low 24 bits) in 8–31, the slot in 32–63.
pub(crate) fn user_data(op: Op, slot: usize, generation: u32) -> u64 {
    (slot as u64) << 32 | u64::from(generation & 0xff_ffff) << 8 | op as u64
}

/// A reaped completion.
pub(crate) struct Completion {
    pub(crate) op: Op,
    pub(crate) slot: usize,
    /// Low 24 bits of the slot's generation when the operation was submitted.
    pub(crate) generation: u32,
    pub(crate) result: i32,
    /// More completions follow for this operation (multishot).
    pub(crate) more: bool,
    /// The receive buffer holding `result` bytes (give it back with [`Uring::recycle`]).
    pub(crate) buffer: Option<u16>,
}

/// Whether `generation` (a slot's full generation) is the one a completion was submitted for.
pub(crate) fn same_generation(generation: u32, reaped: u32) -> bool {
    generation & 0xff_ffff == reaped
}

/// The provided-buffer ring: `BUFFERS` entries the kernel reads and the buffers themselves, both
/// mapped memory (page-aligned as the kernel requires, touched only as traffic needs it) reached
/// through raw pointers only: the kernel writes into buffers the driver holds no reference to.
struct BufferPool {
    entries: *mut types::BufRingEntry,
    entries_len: usize,
    memory: *mut u8,
    memory_len: usize,
    /// The tail this side publishes (the kernel consumes from its head).
    tail: Cell<u16>,
}

/// An anonymous private mapping of `len` bytes.
fn map(len: usize) -> std::io::Result<*mut u8> {
    // SAFETY: a fresh mapping, checked for failure, unmapped by its owner's Drop.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl BufferPool {
    fn new() -> std::io::Result<BufferPool> {
        let entries_len = usize::from(BUFFERS) * std::mem::size_of::<types::BufRingEntry>();
        let memory_len = usize::from(BUFFERS) * BUFFER_SIZE;
        let entries = map(entries_len)?.cast();
        let memory = match map(memory_len) {
            Ok(m) => m,
            Err(e) => {
                // SAFETY: the mapping just made, not used by anyone.
                unsafe { libc::munmap(entries as *mut libc::c_void, entries_len) };
                return Err(e);
            }
        };
        let pool = BufferPool { entries, entries_len, memory, memory_len, tail: Cell::new(0) };
        for bid in 0..BUFFERS {
            pool.push(bid);
        }
        pool.publish();
        Ok(pool)
    }

    /// Puts buffer `bid` at the tail (seen by the kernel after [`BufferPool::publish`]).
    fn push(&self, bid: u16) {
        let tail = self.tail.get();
        let i = usize::from(tail & (BUFFERS - 1));
        let addr = self.memory as u64 + u64::from(bid) * BUFFER_SIZE as u64;
        // SAFETY: `i` < BUFFERS, inside the mapping; the kernel reads an entry only once the
        // published tail is past it, and at most BUFFERS buffers exist, so this one is not in
        // the kernel's hands. (The first entry's tail field is not touched by these setters.)
        let entry = unsafe { &mut *self.entries.add(i) };
        entry.set_addr(addr);
        entry.set_len(BUFFER_SIZE as u32);
        entry.set_bid(bid);
        self.tail.set(tail.wrapping_add(1));
    }

    fn publish(&self) {
        // SAFETY: the tail field lives in the first entry of the mapping; the kernel reads it
        // with acquire ordering, and this release store orders the entries written before it.
        unsafe {
            let tail = types::BufRingEntry::tail(self.entries) as *const AtomicU16;
            (*tail).store(self.tail.get(), Ordering::Release);
        }
    }

    fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        let bid = bid.min(BUFFERS - 1);
        // SAFETY: inside the mapping (bid < BUFFERS, len ≤ BUFFER_SIZE); the kernel filled
        // this buffer and no longer writes it until it is pushed back, which the caller does
        // only after it is done with the slice.
        unsafe { std::slice::from_raw_parts(self.memory.add(usize::from(bid) * BUFFER_SIZE), len.min(BUFFER_SIZE)) }
    }
}

impl Drop for BufferPool {
    fn drop(&mut self) {
        // SAFETY: the mappings made in `new`, unmapped once; the ring that used them is gone.
        unsafe {
            libc::munmap(self.entries as *mut libc::c_void, self.entries_len);
            libc::munmap(self.memory as *mut libc::c_void, self.memory_len);
        }
    }
}

/// One core's ring. Field order matters: the ring goes before the buffers it writes into.
/// Every method borrows the ring only for its own length, so a completion's handler may submit.
pub(crate) struct Uring {
    ring: RefCell<IoUring>,
    pool: BufferPool,
    /// Submissions pushed since the last `submit`.
    queued: Cell<usize>,
}

impl Uring {
    /// A ring with its buffer pool registered, or why this kernel cannot have one.
    pub(crate) fn new() -> std::io::Result<Uring> {
        let ring = IoUring::builder().setup_cqsize(CQ_ENTRIES).setup_single_issuer().build(SQ_ENTRIES)?;
        let pool = BufferPool::new()?;
        // SAFETY: the entries stay mapped as long as the pool, which outlives the ring.
        unsafe { ring.submitter().register_buf_ring_with_flags(pool.entries as u64, BUFFERS, GROUP, 0)? };
        Ok(Uring { ring: RefCell::new(ring), pool, queued: Cell::new(0) })
    }

    /// The descriptor that is readable while completions wait.
    pub(crate) fn fd(&self) -> RawFd {
        self.ring.borrow().as_raw_fd()
    }

    fn push(&self, entry: squeue::Entry) {
        loop {
            // SAFETY: every entry built here refers only to memory the invariants above keep
            // alive until its completion.
            if unsafe { self.ring.borrow_mut().submission().push(&entry) }.is_ok() {
                self.queued.set(self.queued.get() + 1);
                return;
            }
            // The queue is full: hand it to the kernel and push again.
            if !self.submit() {
                return;
            }
        }
    }

    /// A multishot receive on `fd` into the pool.
    pub(crate) fn recv(&self, fd: RawFd, key: u64) {
        self.push(opcode::RecvMulti::new(types::Fd(fd), GROUP).build().user_data(key));
    }

    /// Sends `len` bytes at `ptr`.
    ///
    /// # Safety
    /// The bytes stay where they are, unchanged, until this send's completion is reaped.
    pub(crate) unsafe fn send(&self, fd: RawFd, ptr: *const u8, len: usize, key: u64) {
        let len = len.min(u32::MAX as usize) as u32;
        self.push(opcode::Send::new(types::Fd(fd), ptr, len).flags(libc::MSG_NOSIGNAL).build().user_data(key));
    }

    /// One completion when `fd` has room to write.
    pub(crate) fn writable(&self, fd: RawFd, key: u64) {
        self.push(opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32).build().user_data(key));
    }

    /// Completions whenever listener `fd` has connections waiting (multishot).
    pub(crate) fn listen(&self, fd: RawFd, key: u64) {
        self.push(opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).multi(true).build().user_data(key));
    }

    /// Cancels the operation submitted with `key` (its last completion follows).
    pub(crate) fn cancel(&self, key: u64) {
        let key_of_cancel = key & !0xff | Op::Cancel as u64;
        self.push(opcode::AsyncCancel::new(key).build().user_data(key_of_cancel));
    }

    /// Hands what was pushed to the kernel, without waiting: one system call, none when nothing
    /// was pushed. False when the kernel took nothing (it is reported, and retried next turn).
    pub(crate) fn submit(&self) -> bool {
        if self.queued.get() == 0 {
            return true;
        }
        loop {
            match self.ring.borrow().submit() {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // EBUSY: completions must be reaped first; the driver reaps every turn and the
                // entries stay queued for the next submit.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return false,
                Err(e) => {
                    tracing::warn!(error = %e, "io_uring submit failed");
                    return false;
                }
            }
        }
        self.queued.set(0);
        true
    }

    /// Completions posted now (more may be posted while they are taken).
    pub(crate) fn posted(&self) -> usize {
        self.ring.borrow_mut().completion().len()
    }

    /// Takes the next completion, if one is posted.
    pub(crate) fn next(&self) -> Option<Completion> {
        loop {
            let cqe = self.ring.borrow_mut().completion().next()?;
            let data = cqe.user_data();
            let flags = cqe.flags();
            let Some(op) = Op::from(data & 0xff) else { continue };
            return Some(Completion {
                op,
                slot: (data >> 32) as usize,
                generation: ((data >> 8) & 0xff_ffff) as u32,
                result: cqe.result(),
                more: cqueue::more(flags),
                buffer: cqueue::buffer_select(flags),
            });
        }
    }

    /// The bytes a receive completion brought (valid until the buffer is recycled).
    pub(crate) fn bytes(&self, bid: u16, len: usize) -> &[u8] {
        self.pool.bytes(bid, len)
    }

    /// Gives buffer `bid` back to the kernel, at once (a release store).
    pub(crate) fn recycle(&self, bid: u16) {
        self.pool.push(bid);
        self.pool.publish();
    }
}
