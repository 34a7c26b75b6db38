//! The connections of one core, driven by one task.
//!
//! Why not a task per connection: an idle device should cost what the broker knows about it, not
//! what the executor needs to wait on its socket. glommio keeps a task-facing poll source per
//! socket it polls (496 bytes, measured) and each connection needed a task (512 bytes) — together
//! more than Mosquitto's whole client. Here every socket of the core (listeners included) sits in
//! one epoll instance, registered once, edge-triggered, for input and output; the executor waits
//! on that one descriptor (`glommio::net::Readiness`); and a connection is a slot: its socket, an
//! input buffer only while a packet is incomplete, and the output the kernel has not taken yet.
//!
//! The driver loop: collect readiness without blocking, read each readable connection (at most
//! [`READ_BUDGET`] bytes a turn, so one busy publisher cannot starve the rest), hand the bytes to
//! the state machine, write what it produced, carry out closes, then yield to the core's other
//! tasks (mesh, Kafka, ticker). A connection's id carries its slot and a generation, so a stale
//! id (a close racing a reused slot) finds nothing.
//!
//! **Lingering close.** When the state machine closes a connection (a DISCONNECT with a reason
//! code queued, say) while the client is still writing, closing the socket with unread input
//! makes the kernel send a reset, and a reset destroys what the client has not read yet — the
//! DISCONNECT and the acknowledgements before it. So once everything is written the driver
//! shuts down the write side (the client reads our bytes, then the end of the stream), tells the
//! state machine the connection is gone, and keeps reading and discarding input, into the core's
//! one scratch buffer, until the peer closes too, [`LINGER_BYTES_MAX`] bytes were discarded or
//! [`LINGER_TIME`] passed, whichever comes first; then it closes. A lingering socket holds its
//! slot and descriptor but no buffer; at most [`LINGER_MAX`] linger per core (counted; beyond
//! that a connection is closed at once, as before, and the episode is logged). A connection
//! whose peer closed or failed is closed at once: there is nobody left to read.
//!
//! **Transports.** A connection accepted on a tls/ws/wss listener carries a `Transport` in its
//! slot: read bytes go through it before the state machine, output through it before the
//! socket, and the state machine's next output is taken only once the transport's bytes are all
//! in the kernel. A plain TCP slot has none, and its path is the one described above.
//!
//! Invariants: the driver knows the rest of the core only through [`Host`]; the state machine is
//! told about a connection's end exactly once ([`Shard::on_lost`]), when it lingers or closes,
//! whichever comes first; a lingering socket is never written to and its input never reaches
//! the state machine.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use sluice_core::shard::{ConnId, Shard};

use crate::notify::Notify;
use crate::transport::{Event, Transport, Wrapping};
use crate::uring::{self, Completion, Op, Uring};

/// What the driver needs from the core it runs on (the runtime implements it): the connection
/// table, the state machine, the clock, and the two decisions that are the core's, not the
/// driver's. The driver never sees the core's stores, spill log, mesh or Kafka link.
pub(crate) trait Host {
    fn conns(&self) -> &Conns;
    fn shard(&self) -> &RefCell<Shard>;
    fn now_ms(&self) -> u64;
    /// Carries out what the calls into the state machine since the last one decided.
    fn dispatch(&self);
    /// Whether reading more input would only grow memory (a peer shard or Kafka far behind).
    fn backlogged(&self) -> bool;
}

/// Bytes read from a socket per read call, into the core's scratch buffer.
const READ_CHUNK: usize = 16 * 1024;
/// How long a closed connection lingers at most, draining input, before its socket closes.
const LINGER_TIME: Duration = Duration::from_secs(2);
/// Input discarded from a lingering connection at most before its socket closes.
const LINGER_BYTES_MAX: u32 = 8 << 20;
/// Connections lingering on one core at most; beyond, a closed connection closes at once.
const LINGER_MAX: usize = 1024;

/// Bytes read from one connection per turn before the others get theirs (and before the output
/// it caused is written: a fan-out multiplies it).
const READ_BUDGET: usize = 32 * 1024;
/// Slots per chunk of the slab.
const CHUNK: usize = 4096;
/// io_uring completions reaped per turn at most.
const REAP_MAX: usize = 4096;
/// Readiness events taken from the kernel per system call.
const EVENTS: usize = 512;
/// Pause after a failed accept (EMFILE and friends) before trying that listener again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Epoll tokens at and above this are listeners; below, `slot`.
const LISTENER_TOKEN: u64 = u64::MAX - 16;

struct Sock {
    stream: TcpStream,
    /// Bytes of an incomplete packet; none between packets.
    input: Option<Box<BytesMut>>,
    /// Output the kernel did not take yet; written when the socket says it has room. Boxed: it
    /// is there only between a short write and the next (a slot is per connection, busy or not).
    unsent: Option<Box<Bytes>>,
    /// The state machine asked to close: write what is left, then close.
    closing: bool,
    /// The peer closed or the socket failed: one last write, then close.
    gone: bool,
    /// Written out and shut down for writing; input is read and discarded until it closes.
    lingering: bool,
    /// Input discarded while lingering.
    discarded: u32,
    /// Queued in `Conns::readable` / `Conns::dirty` (each id at most once).
    queued_read: bool,
    /// The state machine holds this connection's input (it is waiting for room to handle what it
    /// already has): not read until it says so, so TCP flow control reaches the client.
    paused: bool,
    queued_write: bool,
    /// TLS / WebSocket between the socket and the state machine; `None` for plain TCP (its
    /// bytes go to the state machine as they are).
    transport: Option<Box<Transport>>,
    /// io_uring driver only: what the kernel is doing for this socket, and the socket's state
    /// while it does ([`Ring`]).
    ring: Ring,
}

/// A socket's io_uring state, as bits (a slot is per connection: these fit in its padding).
/// Empty under the epoll driver.
#[derive(Default, Clone, Copy)]
struct Ring(u8);

impl Ring {
    /// A multishot receive is armed (until its last completion, `more` unset, is reaped).
    const RECV: u8 = 1;
    /// A send is in flight; its bytes are `Sock::unsent`, which nothing touches until it completes.
    const SEND: u8 = 2;
    /// A one-shot wait for room to write is armed.
    const WAIT: u8 = 4;
    /// Closed: the slot is kept only until the kernel's operations on it have completed.
    const DEAD: u8 = 8;
    /// In `Conns::deferred`: more input than a turn's budget waits in `Sock::input`.
    const DEFERRED: u8 = 16;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }

    fn set(&mut self, bit: u8, on: bool) {
        if on {
            self.0 |= bit;
        } else {
            self.0 &= !bit;
        }
    }

    /// Sets `bit` to `on`, returning what it was.
    fn replace(&mut self, bit: u8, on: bool) -> bool {
        let was = self.has(bit);
        self.set(bit, on);
        was
    }

    fn busy(self) -> bool {
        self.has(Ring::RECV | Ring::SEND | Ring::WAIT)
    }
}

/// A slot keeps its generation while free, so that its next connection gets a new id.
struct Slot {
    generation: u32,
    sock: Option<Sock>,
}

/// Slots in fixed chunks: growing never copies, and never leaves half the slab spare the way a
/// doubling vector would (32 bytes a slot, a few hundred thousand spare ones at a million).
#[derive(Default)]
struct Slab {
    chunks: Vec<Box<[Slot]>>,
    len: usize,
}

impl Slab {
    fn get_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.chunks.get_mut(i / CHUNK)?.get_mut(i % CHUNK)
    }

    /// A never-used slot's index.
    fn grow(&mut self) -> usize {
        if self.len.is_multiple_of(CHUNK) {
            self.chunks.push((0..CHUNK).map(|_| Slot { generation: 0, sock: None }).collect());
        }
        self.len += 1;
        self.len - 1
    }
}

/// A bound listening socket and what its connections speak.
pub(crate) struct Bound {
    pub(crate) socket: TcpListener,
    /// Its index among the configured listeners (told to the state machine per connection).
    pub(crate) index: u16,
    /// `None`: plain TCP.
    pub(crate) wrapping: Option<Rc<Wrapping>>,
}

struct Listener {
    socket: TcpListener,
    index: u16,
    wrapping: Option<Rc<Wrapping>>,
    /// Accepting failed (out of descriptors, say): not before this instant again.
    retry_at: Cell<Option<Instant>>,
    /// Stopped before the kernel said "no more": accept again next turn.
    pending: Cell<bool>,
    /// Failed accepts in a row: logged when the episode starts and when it ends, not each retry.
    failures: Cell<u64>,
}

pub(crate) struct Conns {
    /// The io_uring driver's ring; `None`: the epoll driver. Declared first so that it is dropped
    /// first: the kernel's operations end before the sockets and buffers they use are freed.
    ring: Option<Uring>,
    /// io_uring: connections whose receive ended for want of buffers: armed again next turn.
    rearm: RefCell<Vec<ConnId>>,
    /// io_uring: connections with more input waiting than a turn's budget: read next turn.
    deferred: RefCell<Vec<ConnId>>,
    epoll: Epoll,
    slots: RefCell<Slab>,
    free: RefCell<Vec<u32>>,
    live: Cell<usize>,
    listeners: RefCell<Vec<Listener>>,
    /// Connections with input the driver has not read yet (edge-triggered: the kernel will not
    /// say so again).
    readable: RefCell<VecDeque<ConnId>>,
    /// Connections with output to write or a close to carry out.
    dirty: RefCell<Vec<ConnId>>,
    /// Wakes the driver: output, a close, or shutdown.
    wake: Notify,
    /// Every read on this core lands here first: borrowed only while one socket is read, so one
    /// buffer serves every connection (lingering ones included).
    scratch: RefCell<Vec<u8>>,
    /// Lingering connections and when each must close, oldest first (the deadlines are in
    /// order: each is its start plus [`LINGER_TIME`]). At most [`LINGER_MAX`].
    lingering: RefCell<VecDeque<(ConnId, Instant)>>,
    /// Connections closed at once because [`LINGER_MAX`] were lingering: the total, and whether
    /// the cap is reached now (logged when an episode starts and ends).
    linger_refused: Cell<u64>,
    linger_full: Cell<bool>,
    /// [`LINGER_MAX`]; a field so that a test can reach the cap with a few sockets.
    linger_max: usize,
}

fn id_of(slot: usize, generation: u32) -> ConnId {
    u64::from(generation) << 32 | slot as u64
}

fn slot_of(id: ConnId) -> (usize, u32) {
    ((id & 0xffff_ffff) as usize, (id >> 32) as u32)
}

/// A listening socket with SO_REUSEPORT, so that every core binds the same address and the
/// kernel spreads connections over them.
pub(crate) fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

enum ReadOutcome {
    /// The kernel has nothing more right now.
    Drained,
    /// The budget ran out with input left: read again next turn.
    More,
    /// End of stream or an error.
    Gone,
}

impl Conns {
    /// The connections of a core, driven by `ring` (io_uring) or, without one, by epoll.
    pub(crate) fn new(listeners: Vec<Bound>, ring: Option<Uring>) -> std::io::Result<Conns> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, l) in listeners.iter().enumerate() {
            match &ring {
                Some(r) => r.listen(l.socket.as_raw_fd(), uring::user_data(Op::Listen, i, 0)),
                None => epoll.add(
                    &l.socket,
                    EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLET, LISTENER_TOKEN + i as u64),
                )?,
            }
        }
        let listeners = listeners
            .into_iter()
            .map(|Bound { socket, index, wrapping }| Listener {
                socket,
                index,
                wrapping,
                retry_at: Cell::new(None),
                pending: Cell::new(true),
                failures: Cell::new(0),
            })
            .collect();
        Ok(Conns {
            ring,
            rearm: RefCell::new(Vec::new()),
            deferred: RefCell::new(Vec::new()),
            epoll,
            slots: RefCell::new(Slab::default()),
            free: RefCell::new(Vec::new()),
            live: Cell::new(0),
            listeners: RefCell::new(listeners),
            readable: RefCell::new(VecDeque::new()),
            dirty: RefCell::new(Vec::new()),
            wake: Notify::default(),
            scratch: RefCell::new(vec![0; READ_CHUNK]),
            lingering: RefCell::new(VecDeque::new()),
            linger_refused: Cell::new(0),
            linger_full: Cell::new(false),
            linger_max: LINGER_MAX,
        })
    }

    /// Open connections, lingering ones included.
    pub(crate) fn len(&self) -> usize {
        self.live.get()
    }

    /// Stop reading `id` until [`Conns::resume_reading`].
    pub(crate) fn pause_reading(&self, id: ConnId) {
        self.with(id, |s| s.paused = true);
        self.stop_receiving(id);
    }

    /// Queues `id` for the turn's reads, once.
    fn queue_read(&self, id: ConnId) {
        if self.with(id, |s| !std::mem::replace(&mut s.queued_read, true)) == Some(true) {
            self.readable.borrow_mut().push_back(id);
        }
    }

    /// Which driver runs this core's connections.
    pub(crate) fn driver(&self) -> &'static str {
        if self.ring.is_some() {
            "io_uring"
        } else {
            "epoll"
        }
    }

    /// io_uring: cancels `id`'s receive, so that what the client sends waits in the kernel (TCP
    /// flow control reaches it) until reading resumes.
    fn stop_receiving(&self, id: ConnId) {
        let Some(ring) = &self.ring else { return };
        if self.with(id, |s| s.ring.has(Ring::RECV)) == Some(true) {
            let (slot, generation) = slot_of(id);
            ring.cancel(uring::user_data(Op::Recv, slot, generation));
        }
    }

    /// io_uring: arms `id`'s receive unless it is armed, held, or the socket is done reading.
    fn start_receiving(&self, id: ConnId) {
        let Some(ring) = &self.ring else { return };
        let fd = self.with(id, |s| {
            // Not while whole packets wait for the next turn (`DEFERRED`); an incomplete one
            // needs more bytes, however large it is.
            let want = !s.ring.has(Ring::RECV | Ring::DEAD | Ring::DEFERRED) && !s.paused && !s.gone;
            if want {
                s.ring.set(Ring::RECV, true);
            }
            want.then(|| s.stream.as_raw_fd())
        });
        if let Some(Some(fd)) = fd {
            let (slot, generation) = slot_of(id);
            ring.recv(fd, uring::user_data(Op::Recv, slot, generation));
        }
    }

    /// Read `id` again (at once: the kernel will not report input that came while paused).
    pub(crate) fn resume_reading(&self, id: ConnId) {
        let queue = self.with(id, |s| {
            s.paused = false;
            !std::mem::replace(&mut s.queued_read, true)
        });
        if queue == Some(true) {
            self.readable.borrow_mut().push_back(id);
            self.wake.notify();
        }
    }

    /// `id` has output waiting (called from the runtime's `apply`).
    pub(crate) fn output(&self, id: ConnId) {
        self.queue_write(id, false);
    }

    /// The state machine closed `id`: write what is left, then close the socket.
    pub(crate) fn close(&self, id: ConnId) {
        self.queue_write(id, true);
    }

    fn queue_write(&self, id: ConnId, closing: bool) {
        let newly = self.with(id, |s| {
            s.closing |= closing;
            !std::mem::replace(&mut s.queued_write, true)
        });
        if newly == Some(true) {
            self.dirty.borrow_mut().push(id);
            self.wake.notify();
        }
    }

    /// Stop accepting (shutdown): the listeners close; open connections are served on.
    pub(crate) fn stop_accepting(&self) {
        // io_uring: the kernel holds a listener's socket while a poll on it is armed; cancelled,
        // the socket closes (and its port is free) once the listener here is dropped too.
        if let Some(ring) = &self.ring {
            for i in 0..self.listeners.borrow().len() {
                ring.cancel(uring::user_data(Op::Listen, i, 0));
            }
            ring.submit();
        }
        self.listeners.borrow_mut().clear();
        self.wake.notify();
    }

    fn insert(&self, stream: TcpStream, transport: Option<Box<Transport>>) -> std::io::Result<ConnId> {
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(s) => s as usize,
            None => slots.grow(),
        };
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
        if self.ring.is_none() {
            if let Err(e) = self.epoll.add(stream.as_fd(), EpollEvent::new(flags, slot as u64)) {
                self.free.borrow_mut().push(slot as u32);
                return Err(e.into());
            }
        }
        let Some(s) = slots.get_mut(slot) else { unreachable!("a slot from the free list or just grown") };
        s.generation = s.generation.wrapping_add(1).max(1);
        s.sock = Some(Sock {
            stream,
            input: None,
            unsent: None,
            closing: false,
            gone: false,
            lingering: false,
            discarded: 0,
            queued_read: false,
            queued_write: false,
            paused: false,
            transport,
            ring: Ring::default(),
        });
        self.live.set(self.live.get() + 1);
        let id = id_of(slot, s.generation);
        drop(slots);
        self.start_receiving(id);
        Ok(id)
    }

    /// Runs `f` on the socket of `id`, if it is still open.
    fn with<R>(&self, id: ConnId, f: impl FnOnce(&mut Sock) -> R) -> Option<R> {
        let (slot, generation) = slot_of(id);
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(slot) {
            Some(Slot { generation: g, sock: Some(s) }) if *g == generation && !s.ring.has(Ring::DEAD) => Some(f(s)),
            _ => None,
        }
    }

    /// Runs `f` on the socket in `slot` a completion is for (closed ones included), with its id.
    fn with_reaped<R>(&self, c: &Completion, f: impl FnOnce(ConnId, &mut Sock) -> R) -> Option<R> {
        let mut slots = self.slots.borrow_mut();
        match slots.get_mut(c.slot) {
            Some(Slot { generation, sock: Some(s) }) if uring::same_generation(*generation, c.generation) => {
                Some(f(id_of(c.slot, *generation), s))
            }
            _ => None,
        }
    }

    /// A closed socket whose last operation completed: now it goes, and its slot is free.
    fn release_if_idle(&self, slot: usize) {
        let mut slots = self.slots.borrow_mut();
        let Some(s) = slots.get_mut(slot) else { return };
        if s.sock.as_ref().is_some_and(|k| k.ring.has(Ring::DEAD) && !k.ring.busy()) {
            s.sock = None;
            self.free.borrow_mut().push(slot as u32);
        }
    }

    /// Readiness from the kernel, without blocking.
    fn collect_events(&self, events: &mut [EpollEvent]) {
        loop {
            let n = match self.epoll.wait(events, 0) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "epoll_wait failed");
                    return;
                }
            };
            for ev in &events[..n] {
                let token = ev.data();
                if token >= LISTENER_TOKEN {
                    if let Some(l) = self.listeners.borrow().get((token - LISTENER_TOKEN) as usize) {
                        l.pending.set(true);
                    }
                    continue;
                }
                let flags = ev.events();
                let slot = token as usize;
                let mut slots = self.slots.borrow_mut();
                let Some(Slot { generation, sock: Some(s) }) = slots.get_mut(slot) else { continue };
                let id = id_of(slot, *generation);
                let input = EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR;
                if flags.intersects(input) && !s.queued_read {
                    s.queued_read = true;
                    self.readable.borrow_mut().push_back(id);
                }
                let pending = s.unsent.is_some() || s.transport.as_ref().is_some_and(|t| t.has_output());
                if flags.contains(EpollFlags::EPOLLOUT) && pending && !s.queued_write {
                    s.queued_write = true;
                    self.dirty.borrow_mut().push(id);
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    /// When the next accept may be tried, if a listener is waiting for that.
    fn accept_backoff(&self, now: Instant) -> Option<Duration> {
        self.listeners
            .borrow()
            .iter()
            .filter(|l| l.pending.get())
            .filter_map(|l| l.retry_at.get())
            .map(|at| at.saturating_duration_since(now))
            .min()
    }

    fn may_accept_now(&self, now: Instant) -> bool {
        self.listeners.borrow().iter().any(|l| l.pending.get() && l.retry_at.get().is_none_or(|at| at <= now))
    }

    /// How long until the oldest lingering connection must close, if one lingers.
    fn linger_wait(&self, now: Instant) -> Option<Duration> {
        self.lingering.borrow().front().map(|(_, at)| at.saturating_duration_since(now))
    }
}

/// Accepts what the listeners have (a bounded number per turn).
fn accept(host: &impl Host) {
    let conns = host.conns();
    let now = Instant::now();
    // The state machine changed (a connection opened, a refusal counted): dispatch its effects.
    let mut changed = false;
    let listeners = conns.listeners.borrow();
    for l in listeners.iter() {
        if !l.pending.get() || l.retry_at.get().is_some_and(|at| at > now) {
            continue;
        }
        l.retry_at.set(None);
        let mut done = false;
        for _ in 0..256 {
            match l.socket.accept() {
                Ok((stream, peer)) => {
                    if l.failures.get() > 0 {
                        tracing::warn!(failed = l.failures.replace(0), "accepting connections again");
                    }
                    if !host.shard().borrow().may_accept() {
                        continue;
                    }
                    // Too many from this address have not completed CONNECT: dropping the stream
                    // closes it (the refusal is counted, and may have left a warning to log).
                    if !host.shard().borrow_mut().admit_from(peer.ip()) {
                        changed = true;
                        continue;
                    }
                    if let Err(e) = stream.set_nonblocking(true) {
                        tracing::warn!(error = %e, "cannot make an accepted socket non-blocking");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    let transport = l.wrapping.as_ref().map(|w| Box::new(Transport::new(w)));
                    match conns.insert(stream, transport) {
                        Ok(id) => {
                            let mut shard = host.shard().borrow_mut();
                            // The CONNECT deadline counts from here, TLS handshake included.
                            shard.on_open_from(id, peer.ip(), host.now_ms());
                            if l.index != 0 {
                                shard.set_origin(id, l.index, None);
                            }
                            changed = true;
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot watch an accepted socket"),
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    done = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning; connections wait
                    // in the kernel's backlog meanwhile.
                    if l.failures.get() == 0 {
                        tracing::warn!(error = %e, "cannot accept connections; retrying every 50 ms");
                    }
                    l.failures.set(l.failures.get() + 1);
                    l.retry_at.set(Some(now + ACCEPT_BACKOFF));
                    break;
                }
            }
        }
        if done {
            l.pending.set(false);
        }
    }
    drop(listeners);
    if changed {
        host.dispatch();
    }
}

/// Reads from `stream` into `scratch` until the kernel has nothing more, the budget ran out or
/// the stream ended, handing each chunk to `take`.
fn read_some(stream: &mut TcpStream, scratch: &mut [u8], mut take: impl FnMut(&[u8])) -> ReadOutcome {
    let mut total = 0;
    loop {
        match stream.read(scratch) {
            Ok(0) => return ReadOutcome::Gone,
            Ok(n) => {
                take(&scratch[..n]);
                total += n;
                if n < scratch.len() {
                    return ReadOutcome::Drained;
                }
                if total >= READ_BUDGET {
                    return ReadOutcome::More;
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return ReadOutcome::Drained,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return ReadOutcome::Gone,
        }
    }
}

/// What reading a connection found.
enum Input {
    /// Bytes for the state machine (possibly none).
    Bytes(BytesMut, ReadOutcome),
    /// A lingering connection: its input was discarded.
    Discarded(ReadOutcome),
    /// Bytes that came through a transport, and what it did besides.
    /// `before_connect`: the transport's socket bytes so far while the CONNECT is awaited.
    Wrapped {
        input: BytesMut,
        outcome: ReadOutcome,
        established: Option<(u16, Option<Box<str>>)>,
        write: bool,
        before_connect: Option<usize>,
    },
}

/// Where a connection's input comes from.
#[derive(Clone, Copy)]
enum Src<'a> {
    /// Read the socket (epoll: it said it is readable).
    Socket,
    /// io_uring: bytes a receive brought.
    Chunk(&'a [u8]),
    /// io_uring: input held while reading was paused or the core backlogged, if any.
    Held,
}

/// Takes `src`'s bytes, handing each chunk to `take`.
fn pull(stream: &mut TcpStream, scratch: &mut [u8], src: Src<'_>, mut take: impl FnMut(&[u8])) -> ReadOutcome {
    match src {
        Src::Socket => read_some(stream, scratch, take),
        Src::Chunk(b) => {
            take(b);
            ReadOutcome::Drained
        }
        Src::Held => ReadOutcome::Drained,
    }
}

/// Reads what `id` has (up to the budget) and hands it to the state machine.
fn read(host: &impl Host, id: ConnId) {
    let src = if host.conns().ring.is_some() { Src::Held } else { Src::Socket };
    read_from(host, id, src);
}

/// Takes `src`'s input for `id` and hands it to the state machine.
///
/// io_uring: a receive's bytes (`Src::Chunk`) are only taken in — into the slot's input, through
/// the transport if there is one — and the connection queued; the turn's reads then hand at most
/// [`READ_BUDGET`] bytes of it to the state machine (`Src::Held`), as the epoll driver reads at
/// most that much. Multishot receives fill buffers as fast as a client sends, so beyond a
/// budget's worth waiting the receive is cancelled (the client feels TCP's flow control) and
/// armed again once the input is handled.
fn read_from(host: &impl Host, id: ConnId, src: Src<'_>) {
    let conns = host.conns();
    let got = conns.with(id, |s| {
        if matches!(src, Src::Socket | Src::Held) {
            s.queued_read = false;
        }
        if s.paused && matches!(src, Src::Socket | Src::Held) {
            return None;
        }
        if matches!(src, Src::Held) && s.input.is_none() && !s.lingering && !s.gone {
            return None;
        }
        let mut scratch = conns.scratch.borrow_mut();
        if s.lingering {
            let mut discarded = s.discarded;
            let mut outcome = pull(&mut s.stream, &mut scratch[..], src, |b| {
                discarded = discarded.saturating_add(b.len() as u32);
            });
            s.discarded = discarded;
            if discarded >= LINGER_BYTES_MAX {
                outcome = ReadOutcome::Gone;
            }
            return Some(Input::Discarded(outcome));
        }
        let mut input = s.input.take().map(|b| *b).unwrap_or_default();
        let Some(t) = s.transport.as_deref_mut() else {
            let mut outcome = pull(&mut s.stream, &mut scratch[..], src, |b| {
                // A read that filled the scratch buffer is followed by more (a turn reads at most
                // READ_BUDGET): room for the whole budget at once, instead of growing (and
                // copying what came before) chunk by chunk.
                if b.len() == READ_CHUNK && input.capacity() - input.len() < b.len() {
                    input.reserve(READ_BUDGET);
                }
                input.extend_from_slice(b)
            });
            if matches!(src, Src::Held) && s.gone {
                outcome = ReadOutcome::Gone;
            }
            return Some(Input::Bytes(input, outcome));
        };
        let (mut established, mut ended) = (None, None);
        let mut outcome = pull(&mut s.stream, &mut scratch[..], src, |b| match t.input(b, &mut input) {
            Ok(Event::Nothing) => {}
            Ok(Event::Established(identity)) => established = Some((t.listener(), identity)),
            Err(e) => ended = ended.or(Some(e)),
        });
        if matches!(src, Src::Held) && s.gone {
            outcome = ReadOutcome::Gone;
        }
        // A handshake reply, a pong, a refusal: written with the connection's other output.
        let reply = t.has_output();
        if let Some(why) = ended {
            tracing::debug!(why = why.0, "transport ended; closing the connection");
            s.closing = true;
        }
        let before_connect = t.bytes_before_connect();
        Some(Input::Wrapped { input, outcome, established, write: reply || ended.is_some(), before_connect })
    });
    let mut before_connect = None;
    let got = match got.flatten() {
        Some(Input::Wrapped { input, outcome, established, write, before_connect: counted }) => {
            before_connect = counted;
            if let Some(identity) = established {
                let (listener, identity) = identity;
                host.shard().borrow_mut().set_origin(id, listener, identity);
            }
            if write {
                conns.queue_write(id, false);
            }
            Some(Input::Bytes(input, outcome))
        }
        other => other,
    };
    let outcome = match got {
        None | Some(Input::Wrapped { .. }) => {
            if matches!(src, Src::Held) {
                conns.start_receiving(id);
            }
            return;
        }
        Some(Input::Discarded(ReadOutcome::Gone)) => return close_now(host, id),
        Some(Input::Discarded(outcome)) => {
            requeue(conns, id, &outcome);
            return;
        }
        Some(Input::Bytes(input, ReadOutcome::Drained)) if matches!(src, Src::Chunk(_)) => {
            // Taken in; handed over by this turn's reads.
            let many = input.len() > READ_BUDGET;
            conns.with(id, |s| s.input = (!input.is_empty()).then(|| Box::new(input)));
            conns.queue_read(id);
            if many {
                conns.stop_receiving(id);
            }
            // A transport's bytes before CONNECT count as they arrive (a handshake that only
            // drips brings no MQTT bytes to hand over).
            if let Some(received) = before_connect {
                count_before_connect(host, id, received);
            }
            return;
        }
        Some(Input::Bytes(mut input, outcome)) => {
            // io_uring: whole packets up to a turn's budget; the rest waits for the next turn
            // with the receive stopped, so that this turn's output goes out first and the
            // client feels TCP's flow control.
            let uring = conns.ring.is_some();
            if !input.is_empty() {
                let now = host.now_ms();
                let budget = if uring { READ_BUDGET } else { usize::MAX };
                let more = host.shard().borrow_mut().on_bytes_within(id, &mut input, now, budget);
                host.dispatch();
                if more {
                    let first = conns.with(id, |s| !s.ring.replace(Ring::DEFERRED, true));
                    if first == Some(true) {
                        conns.deferred.borrow_mut().push(id);
                    }
                }
            }
            conns.with(id, |s| s.input = (!input.is_empty()).then(|| Box::new(input)));
            if uring {
                conns.start_receiving(id);
            }
            // After the MQTT bytes: once they completed the CONNECT, nothing more is counted.
            if let Some(received) = before_connect {
                count_before_connect(host, id, received);
            }
            outcome
        }
    };
    requeue(conns, id, &outcome);
    if matches!(outcome, ReadOutcome::Gone) {
        conns.with(id, |s| s.gone = true);
        flush(host, id);
    }
}

/// Tells the state machine how many bytes `id`'s transport received while its CONNECT is
/// awaited; once it no longer counts them, the transport stops counting too.
fn count_before_connect(host: &impl Host, id: ConnId, received: usize) {
    let now = host.now_ms();
    let counted = host.shard().borrow_mut().on_transport_input(id, received, now);
    if !counted {
        host.conns().with(id, |s| s.transport.as_deref_mut().map(Transport::connect_done));
    }
    host.dispatch();
}

/// After a read that stopped at the budget: `id` is read again next turn.
fn requeue(conns: &Conns, id: ConnId, outcome: &ReadOutcome) {
    if !matches!(outcome, ReadOutcome::More) {
        return;
    }
    conns.queue_read(id);
}

/// Writes what the state machine has for `id` until the kernel takes no more; once the state
/// machine asked to close and everything is out, the connection lingers (or closes: the peer is
/// gone, or too many linger).
fn flush(host: &impl Host, id: ConnId) {
    let conns = host.conns();
    let done = conns.with(id, |s| {
        s.queued_write = false;
        if s.lingering {
            // Written out and shut down already; nothing more goes to this socket.
            return None;
        }
        if let Some(t) = s.transport.as_deref_mut() {
            let done = flush_wrapped(host, id, &mut s.stream, t, s.closing, &mut s.gone);
            if let Some(ring) = &conns.ring {
                // The kernel was full: a completion says when it has room.
                if t.has_output() && !s.gone {
                    wait_writable(ring, id, s);
                }
            }
            return Some(done);
        }
        if let Some(ring) = &conns.ring {
            return Some(submit_send(host, ring, id, s));
        }
        let mut out = match s.unsent.take() {
            Some(b) => *b,
            None => Bytes::new(),
        };
        loop {
            if out.is_empty() {
                match host.shard().borrow_mut().take_output(id) {
                    Some(o) => out = o.freeze(),
                    None => break,
                }
            }
            match s.stream.write(&out) {
                Ok(n) => {
                    out.advance(n);
                    if !out.is_empty() {
                        break; // the kernel is full: EPOLLOUT says when it has room
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    s.gone = true;
                    break;
                }
            }
        }
        if !out.is_empty() && !s.gone {
            s.unsent = Some(Box::new(out));
        }
        let linger = !s.gone && s.closing && s.unsent.is_none();
        Some((s.gone, linger, !s.closing && !s.gone && s.unsent.is_none()))
    });
    let Some((gone, linger, drained)) = done.flatten() else { return };
    if gone {
        return close_now(host, id);
    }
    if linger {
        return start_lingering(host, id);
    }
    // All of it went out: messages held back for room in the output buffer move on (dispatch
    // queues this connection again if that wrote anything).
    let more = drained && host.shard().borrow_mut().on_output_drained(id, host.now_ms());
    if more {
        host.dispatch();
    }
}

/// io_uring: one completion when `id`'s socket has room to write, unless one is armed already.
fn wait_writable(ring: &Uring, id: ConnId, s: &mut Sock) {
    if !s.ring.replace(Ring::WAIT, true) {
        let (slot, generation) = slot_of(id);
        ring.writable(s.stream.as_raw_fd(), uring::user_data(Op::Writable, slot, generation));
    }
}

/// [`flush`] under io_uring, for a plain socket: one send in flight at a time, of what was left
/// over or else the state machine's next output; its completion ([`on_sent`]) flushes again.
/// Returns (gone, linger, drained) as [`flush`] decides on them.
#[allow(unsafe_code)]
fn submit_send(host: &impl Host, ring: &Uring, id: ConnId, s: &mut Sock) -> (bool, bool, bool) {
    if !s.ring.has(Ring::SEND) && !s.gone {
        let mut out = s.unsent.take().map(|b| *b).unwrap_or_default();
        if out.is_empty() {
            if let Some(o) = host.shard().borrow_mut().take_output(id) {
                out = o.freeze();
            }
        }
        if !out.is_empty() {
            let (slot, generation) = slot_of(id);
            // SAFETY: the bytes are `s.unsent`'s, which stays as it is until the completion
            // (`on_sent`), also when the connection closes meanwhile (the slot is kept).
            unsafe {
                ring.send(s.stream.as_raw_fd(), out.as_ptr(), out.len(), uring::user_data(Op::Send, slot, generation));
            }
            s.ring.set(Ring::SEND, true);
            s.unsent = Some(Box::new(out));
        }
    }
    let idle = s.unsent.is_none();
    (s.gone, !s.gone && s.closing && idle, !s.closing && !s.gone && idle)
}

/// [`flush`] through a transport: its queued bytes first; the state machine's next output only
/// once they are all in the kernel (so the transport holds at most one output chunk, framed or
/// encrypted). Returns what [`flush`] decides on: (gone, linger, drained).
fn flush_wrapped(
    host: &impl Host,
    id: ConnId,
    stream: &mut TcpStream,
    t: &mut Transport,
    closing: bool,
    gone: &mut bool,
) -> (bool, bool, bool) {
    loop {
        match t.write_to(stream) {
            Ok(true) => {}
            Ok(false) => break, // the kernel is full: EPOLLOUT says when it has room
            Err(_) => {
                *gone = true;
                break;
            }
        }
        if t.ended() {
            if closing {
                // What the state machine still had is not wanted any more.
                while host.shard().borrow_mut().take_output(id).is_some() {}
            }
            break;
        }
        match host.shard().borrow_mut().take_output(id) {
            Some(o) => t.output(&o),
            None if closing => t.close(), // TLS: close_notify, written next round
            None => break,
        }
    }
    let all_out = !t.has_output();
    (*gone, !*gone && closing && all_out, !closing && !*gone && all_out)
}

/// Everything the state machine wrote for `id` before closing it is in the kernel: shut the
/// write side down (the peer reads it all, then the end of the stream) and drain input until the
/// peer closes too, instead of closing over unread input (which sends a reset).
fn start_lingering(host: &impl Host, id: ConnId) {
    let conns = host.conns();
    let full = conns.lingering.borrow().len() >= conns.linger_max;
    if full != conns.linger_full.replace(full) {
        if full {
            tracing::warn!(
                max = conns.linger_max,
                "closed connections lingering at the cap on this core; closing the next ones at once (their peers may see a reset)"
            );
        } else {
            tracing::warn!(closed_at_once = conns.linger_refused.get(), "closed connections linger again");
        }
    }
    if full {
        conns.linger_refused.set(conns.linger_refused.get() + 1);
        return close_now(host, id);
    }
    let shut = conns.with(id, |s| {
        s.input = None;
        // Input the state machine held back is not wanted any more: drained like the rest.
        s.paused = false;
        s.lingering = s.stream.shutdown(Shutdown::Write).is_ok();
        s.lingering
    });
    if shut != Some(true) {
        return close_now(host, id);
    }
    conns.lingering.borrow_mut().push_back((id, Instant::now() + LINGER_TIME));
    // Input may be waiting already (edge-triggered: the kernel will not say so again).
    conns.queue_read(id);
    // Done with it as far as the state machine is concerned.
    let now = host.now_ms();
    host.shard().borrow_mut().on_lost(id, now);
    host.dispatch();
}

/// Closes lingering connections whose time is up.
fn expire_lingering(host: &impl Host, now: Instant) {
    loop {
        let front = host.conns().lingering.borrow().front().copied();
        match front {
            Some((id, at)) if at <= now => {
                host.conns().lingering.borrow_mut().pop_front();
                close_now(host, id);
            }
            _ => return,
        }
    }
}

fn close_now(host: &impl Host, id: ConnId) {
    let conns = host.conns();
    let (slot, generation) = slot_of(id);
    let lingered = {
        let mut slots = conns.slots.borrow_mut();
        let Some(s) = slots.get_mut(slot) else { return };
        if s.generation != generation || s.sock.as_ref().is_none_or(|k| k.ring.has(Ring::DEAD)) {
            return;
        }
        let busy = s.sock.as_ref().is_some_and(|k| k.ring.busy());
        if busy {
            // io_uring: the kernel still holds operations on this socket (a send reading
            // `unsent`, say). End them; the slot goes when the last completes.
            let Some(k) = s.sock.as_mut() else { return };
            k.ring.set(Ring::DEAD, true);
            let _ = k.stream.shutdown(Shutdown::Both);
            if let Some(ring) = &conns.ring {
                if k.ring.has(Ring::RECV) {
                    ring.cancel(uring::user_data(Op::Recv, slot, generation));
                }
                if k.ring.has(Ring::WAIT) {
                    ring.cancel(uring::user_data(Op::Writable, slot, generation));
                }
            }
            k.lingering
        } else {
            let Some(sock) = s.sock.take() else { return };
            // Closing the descriptor removes it from the epoll set (it is never duplicated).
            let lingering = sock.lingering;
            drop(sock);
            conns.free.borrow_mut().push(slot as u32);
            lingering
        }
    };
    conns.live.set(conns.live.get() - 1);
    if lingered {
        // The state machine heard of it when it started lingering. Usually the oldest entry
        // (or already taken out by `expire_lingering`).
        let mut lingering = conns.lingering.borrow_mut();
        if let Some(i) = lingering.iter().position(|(l, _)| *l == id) {
            lingering.remove(i);
        }
        return;
    }
    let now = host.now_ms();
    host.shard().borrow_mut().on_lost(id, now);
    host.dispatch();
}

/// io_uring: takes every posted completion and acts on it (the epoll driver's
/// `collect_events`, plus the reads themselves: the bytes are here already).
fn reap(host: &impl Host) {
    let conns = host.conns();
    let Some(ring) = &conns.ring else { return };
    let deferred = std::mem::take(&mut *conns.deferred.borrow_mut());
    for id in deferred {
        conns.with(id, |s| s.ring.set(Ring::DEFERRED, false));
        conns.queue_read(id);
    }
    // What was posted when the turn began, as epoll's readiness is what was ready then: bytes
    // that arrive meanwhile wait for the next turn, after this one's output went out.
    for _ in 0..ring.posted().min(REAP_MAX) {
        let Some(c) = ring.next() else { break };
        match c.op {
            Op::Listen => {
                let listeners = conns.listeners.borrow();
                let Some(l) = listeners.get(c.slot) else { continue };
                l.pending.set(true);
                if !c.more {
                    ring.listen(l.socket.as_raw_fd(), uring::user_data(Op::Listen, c.slot, 0));
                }
            }
            Op::Cancel => {}
            Op::Recv => on_received(host, ring, &c),
            Op::Send => on_sent(host, &c),
            Op::Writable => {
                let id = conns.with_reaped(&c, |id, s| {
                    s.ring.set(Ring::WAIT, false);
                    (!s.ring.has(Ring::DEAD)).then_some(id)
                });
                conns.release_if_idle(c.slot);
                if let Some(Some(id)) = id {
                    conns.queue_write(id, false);
                }
            }
        }
    }
}

/// A receive's completion: its bytes go the way a read's do; its end (the stream's, a cancel's,
/// or the buffers') decides whether to arm it again.
fn on_received(host: &impl Host, ring: &Uring, c: &Completion) {
    let conns = host.conns();
    let state = conns.with_reaped(c, |id, s| {
        if !c.more {
            s.ring.set(Ring::RECV, false);
        }
        (id, s.ring.has(Ring::DEAD))
    });
    let recycle = || {
        if let Some(bid) = c.buffer {
            ring.recycle(bid);
        }
    };
    let Some((id, dead)) = state else { return recycle() };
    if dead {
        recycle();
        return conns.release_if_idle(c.slot);
    }
    match c.result {
        n if n > 0 => {
            if let Some(bid) = c.buffer {
                read_from(host, id, Src::Chunk(ring.bytes(bid, n as usize)));
                ring.recycle(bid);
            }
        }
        e if e == -libc::ENOBUFS => conns.rearm.borrow_mut().push(id),
        e if e == -libc::ECANCELED => {}
        _ => {
            // The stream ended or failed: what was taken in before is still handed over.
            let waiting = conns.with(id, |s| {
                s.gone = true;
                s.input.is_some().then(|| !std::mem::replace(&mut s.queued_read, true))
            });
            match waiting.flatten() {
                Some(true) => conns.readable.borrow_mut().push_back(id),
                Some(false) => {} // queued already: its read finds the end too
                None => flush(host, id),
            }
            return;
        }
    }
    if !c.more && c.result != -libc::ENOBUFS {
        // Cancelled (reading held, or input piling up) or ended by the kernel: armed again
        // unless it is still held; then handling the input arms it.
        conns.start_receiving(id);
    }
}

/// A send's completion: what the kernel took is dropped from `unsent`; the rest, or the next
/// output, goes in the next flush.
fn on_sent(host: &impl Host, c: &Completion) {
    let conns = host.conns();
    let next = conns.with_reaped(c, |id, s| {
        s.ring.set(Ring::SEND, false);
        if s.ring.has(Ring::DEAD) {
            s.unsent = None;
            return None;
        }
        match c.result {
            n if n >= 0 => {
                if let Some(u) = s.unsent.as_deref_mut() {
                    u.advance((n as usize).min(u.len()));
                    if u.is_empty() {
                        s.unsent = None;
                    }
                }
                Some((id, false))
            }
            e if e == -libc::EAGAIN => Some((id, true)),
            _ => {
                s.gone = true;
                s.unsent = None;
                Some((id, false))
            }
        }
    });
    conns.release_if_idle(c.slot);
    match next.flatten() {
        Some((id, true)) => {
            if let Some(ring) = &conns.ring {
                conns.with(id, |s| wait_writable(ring, id, s));
            }
        }
        Some((id, false)) => conns.queue_write(id, false),
        None => {}
    }
}

/// io_uring: receives that ran out of buffers are armed again.
fn rearm_receives(conns: &Conns) {
    let rearm = std::mem::take(&mut *conns.rearm.borrow_mut());
    for id in rearm {
        conns.start_receiving(id);
    }
}

/// The core's connection driver: runs until the task is dropped.
pub(crate) async fn drive(host: Rc<impl Host>) {
    let host = &*host;
    let conns = host.conns();
    // Either driver waits on one descriptor: the ring's (completions posted) or epoll's.
    let fd = conns.ring.as_ref().map_or(conns.epoll.0.as_raw_fd(), Uring::fd);
    let mut readiness = glommio::net::Readiness::new(fd);
    let mut events = vec![EpollEvent::empty(); EVENTS];
    loop {
        let now = Instant::now();
        let backlogged = host.backlogged();
        let work = (!backlogged && !conns.readable.borrow().is_empty())
            || !conns.dirty.borrow().is_empty()
            || conns.may_accept_now(now)
            || conns.linger_wait(now) == Some(Duration::ZERO)
            || !conns.rearm.borrow().is_empty()
            || !conns.deferred.borrow().is_empty();
        if let Some(ring) = &conns.ring {
            ring.submit();
        }
        if !work {
            let wait = std::future::poll_fn(|cx| {
                if conns.wake.poll_notified(cx).is_ready() {
                    return Poll::Ready(());
                }
                readiness.poll_readable(cx).map(|_| ())
            });
            // Backlogged (some peer or Kafka far behind): look again shortly, keep writing.
            let pause = if backlogged { Some(Duration::from_millis(1)) } else { conns.accept_backoff(now) };
            let pause = match (pause, conns.linger_wait(now)) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            match pause {
                Some(d) => futures_lite::future::or(wait, glommio::timer::sleep(d)).await,
                None => wait.await,
            }
        }
        match conns.ring {
            Some(_) => reap(host),
            None => conns.collect_events(&mut events),
        }
        rearm_receives(conns);
        accept(host);
        let turn = conns.readable.borrow().len();
        for _ in 0..turn {
            if host.backlogged() {
                break;
            }
            let Some(id) = conns.readable.borrow_mut().pop_front() else { break };
            read(host, id);
        }
        let dirty = std::mem::take(&mut *conns.dirty.borrow_mut());
        for id in dirty {
            flush(host, id);
        }
        expire_lingering(host, Instant::now());
        // Every send of the turn, and the receives armed, in one system call.
        if let Some(ring) = &conns.ring {
            ring.submit();
        }
        // The core's other tasks (mesh, Kafka, ticker, commits) get their turn.
        if conns.deferred.borrow().is_empty() {
            futures_lite::future::yield_now().await;
        } else {
            // Input is waiting, so the next turn would start at once, and glommio polls its own
            // ring (the mesh's channels from other shards among it) only when no task is
            // runnable: without this pause a flood held here starves the receipts that release
            // its acknowledgements.
            glommio::timer::sleep(Duration::from_micros(1)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot per connection, busy or idle: the lingering state fits in what was padding
    /// (40 bytes before it too).
    #[test]
    fn a_slot_stays_small() {
        assert_eq!(std::mem::size_of::<Slot>(), 48);
    }

    /// The driver around a real state machine, with the glue the runtime would add.
    struct TestHost {
        conns: Conns,
        shard: RefCell<Shard>,
        epoch: Instant,
    }

    impl Host for TestHost {
        fn conns(&self) -> &Conns {
            &self.conns
        }
        fn shard(&self) -> &RefCell<Shard> {
            &self.shard
        }
        fn now_ms(&self) -> u64 {
            self.epoch.elapsed().as_millis() as u64
        }
        fn dispatch(&self) {
            let fx = self.shard.borrow_mut().drain_effects();
            for id in fx.dirty {
                self.conns.output(id);
            }
            for id in fx.close {
                self.conns.close(id);
            }
        }
        fn backlogged(&self) -> bool {
            false
        }
    }

    /// Waits (polling, with a deadline) until `cond` holds.
    async fn until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            glommio::timer::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What a client reads now: `Some(true)` the end of the stream, `Some(false)` a reset,
    /// `None` nothing yet.
    fn peer_sees(c: &mut TcpStream) -> Option<bool> {
        let mut buf = [0u8; 64];
        match c.read(&mut buf) {
            Ok(0) => Some(true),
            Ok(_) => None,
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(_) => Some(false),
        }
    }

    /// Connections the state machine closes (here: garbage instead of CONNECT) linger — the
    /// peer sees the end of the stream, can go on writing without a reset, and its input is
    /// discarded — until the peer closes or the time is up; beyond the cap they close at once,
    /// counted.
    #[test]
    fn closed_connections_linger_until_the_peer_closes_within_their_bounds() {
        lingering_closes(false);
    }

    /// The same with the io_uring driver.
    #[test]
    fn closed_connections_linger_under_io_uring_too() {
        lingering_closes(true);
    }

    fn lingering_closes(io_uring: bool) {
        glommio::LocalExecutorBuilder::default()
            .spawn(move || async move {
                let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
                let addr = listener.local_addr().unwrap();
                let ring = io_uring.then(|| Uring::new().expect("io_uring on this kernel"));
                let mut conns = Conns::new(vec![Bound { socket: listener, index: 0, wrapping: None }], ring).unwrap();
                conns.linger_max = 2;
                let shard = Shard::new(0, 1, sluice_core::config::Limits::default(), 0);
                let host = Rc::new(TestHost { conns, shard: RefCell::new(shard), epoch: Instant::now() });
                let driver = glommio::spawn_local(drive(host.clone()));
                let mut clients = Vec::new();
                for i in 0..3 {
                    let mut c = TcpStream::connect(addr).unwrap();
                    c.set_nonblocking(true).unwrap();
                    // Packet type 0 is reserved: the state machine closes the connection.
                    c.write_all(&[0x00, 0x00]).unwrap();
                    let refused = host.conns.linger_refused.get();
                    until("the close", || {
                        host.conns.lingering.borrow().len() == (i + 1).min(2)
                            && host.conns.linger_refused.get() == refused + u64::from(i == 2)
                    })
                    .await;
                    clients.push(c);
                }
                // The third closed at once: two sockets left, both lingering.
                assert_eq!(host.conns.len(), 2);
                assert_eq!(host.conns.linger_refused.get(), 1);
                // A lingering socket: its peer reads the end of the stream and may keep writing
                // (discarded) without being reset.
                let mut seen = None;
                until("the end of the stream", || {
                    seen = peer_sees(&mut clients[0]);
                    seen.is_some()
                })
                .await;
                assert_eq!(seen, Some(true), "a reset instead of the end of the stream");
                clients[0].write_all(&[0x30; 4096]).unwrap();
                let before = Instant::now();
                until("the discarded input", || {
                    let (slot, _) = slot_of(host.conns.lingering.borrow()[0].0);
                    host.conns.slots.borrow_mut().get_mut(slot).and_then(|s| s.sock.as_ref()).unwrap().discarded >= 4096
                })
                .await;
                assert_eq!(peer_sees(&mut clients[0]), Some(true));
                // The peer closes: so does the lingering socket, at once.
                drop(clients.remove(0));
                until("the peer's close", || host.conns.len() == 1).await;
                assert!(before.elapsed() < LINGER_TIME);
                // The other one never closes: it goes after LINGER_TIME.
                until("the linger time", || host.conns.len() == 0).await;
                assert!(host.conns.lingering.borrow().is_empty());
                assert!(before.elapsed() >= LINGER_TIME - Duration::from_millis(500));
                drop(driver);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
