//! An in-process network for QUIC: quinn endpoints over in-memory queues.
//!
//! The simulator runs up to a million virtual clients in one process;
//! kernel UDP sockets (file descriptors, 32 MiB buffers, syscalls) do not
//! scale to that. [`MemSocket`] implements quinn's [`AsyncUdpSocket`] over
//! in-memory queues, so connections are still real QUIC with real TLS
//! (quinn and rustls unchanged): only the sockets are replaced. It is also
//! where per-link latency, bandwidth and loss are shaped ([`LinkShape`]).
//!
//! # Addresses
//!
//! A [`MemNetwork`] is a switchboard mapping virtual addresses to sockets.
//! A socket binds a given address (any specific IP with a non-zero port) or
//! the next automatic one: `10.a.b.c:49152` ([`AUTO_PORT`]), hosts counted
//! from `10.0.0.1` up to `10.255.255.254` and then wrapping around, skipping
//! bound addresses. Freed automatic addresses are not reused until the
//! counter wraps, so late datagrams of a closed socket do not reach a new
//! one (as TIME_WAIT does for TCP). Dropping or [closing](MemSocket::close)
//! a socket frees its address; an unbound address costs no memory.
//!
//! # What is modelled
//!
//! - Delivery like UDP: a datagram to an address without a socket is
//!   dropped silently; a full receive queue ([`RECV_QUEUE_BYTES`] per
//!   socket, the kernel buffer size of [`crate::endpoint`]) drops arrivals.
//! - Per-socket access links ([`LinkShape`]), applied both ways: a datagram
//!   from A to B crosses A's uplink then B's downlink, each with its
//!   latency, serialization at its bandwidth (a virtual clock per
//!   direction, so a link carries at most its bandwidth) and its loss
//!   (seeded, see below). One-way delay is thus `A.latency + B.latency`
//!   plus queueing and serialization. A shaped link queues at most
//!   [`LINK_QUEUE_BYTES`] (a router buffer) and drops datagrams beyond it
//!   (tail drop), which gives QUIC's congestion control the loss signal it
//!   would get from a real bottleneck.
//! - Loss: each socket draws from its own generator seeded from the
//!   network's seed and the socket's address, one draw per datagram and
//!   direction. For a given seed and sequence of datagrams the drop pattern
//!   is the same; in a live QUIC run the sequence itself depends on timing.
//!
//! # What is not modelled
//!
//! - Reordering: datagrams of one link arrive in order (FIFO virtual
//!   clocks, no jitter). A downlink serializes datagrams in the order they
//!   were sent, not in the order they reached the switch: with senders of
//!   different latencies this is a slight approximation.
//! - MTU: none is enforced; quinn's defaults apply (1200-byte initial MTU,
//!   path MTU discovery up to its default upper bound).
//! - ECN: none (datagrams carry no ECN marks, quinn sees no ECN support).
//! - No GSO/GRO: one datagram per transmit and per receive; a transmit with
//!   a `segment_size` is still split into its datagrams.
//! - Timer resolution: delays use tokio timers (1 ms granularity); delays
//!   are applied from one scheduler task per network with a timer heap, so
//!   idle sockets cost no task and no timer.

use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, EndpointConfig, TokioRuntime, UdpPoller};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Bytes of datagrams a socket's receive queue holds before it drops
/// arrivals, like a kernel UDP receive buffer (the size
/// [`crate::endpoint`] requests), so bursts of handshakes fit.
pub const RECV_QUEUE_BYTES: usize = crate::endpoint::UDP_BUFFER_BYTES;

/// Bytes a shaped link direction queues ahead of its serialization before
/// it drops datagrams (tail drop): 1 s at 1 Mbit/s, 10 ms at 100 Mbit/s.
pub const LINK_QUEUE_BYTES: u64 = 128 << 10;

/// Port of automatically assigned addresses.
pub const AUTO_PORT: u16 = 49152;

/// Largest accepted [`LinkShape::latency`]: anything longer is a mistake
/// (and would overflow the clock arithmetic).
pub const MAX_LATENCY: Duration = Duration::from_secs(3600);

/// Automatic hosts: 10.0.0.1 ..= 10.255.255.254.
const AUTO_HOSTS: u32 = (1 << 24) - 2;

/// A receive queue whose capacity grew past this (a burst) is shrunk
/// once drained, so idle sockets stay small.
const RX_KEEP_CAPACITY: usize = 16;

/// A map this much larger than its content is shrunk, so that a million
/// sockets come and gone leave no memory behind.
const MAP_KEEP_CAPACITY: usize = 1024;

/// Errors of the in-memory network.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    #[error("address {0} is already bound on this in-memory network")]
    AddrInUse(SocketAddr),
    #[error("cannot bind {0}: an in-memory socket needs a specific IP address and a non-zero port")]
    InvalidAddress(SocketAddr),
    #[error("all automatic addresses of 10.0.0.0/8 are bound")]
    AddressesExhausted,
    #[error("invalid link shape: {0}")]
    InvalidLink(String),
    #[error("QUIC endpoints must be created inside a tokio runtime")]
    NoRuntime,
    #[error("cannot start the QUIC endpoint on {addr}: {source}")]
    Endpoint {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// The access link of one socket, applied to its outgoing datagrams
/// (uplink) and, with a separate clock, to its incoming ones (downlink).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkShape {
    /// One-way propagation delay of the link, each direction.
    pub latency: Duration,
    /// Serialization rate of each direction; `None`: unlimited (no queue).
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Probability in `[0, 1]` that a datagram is lost, each direction.
    pub loss: f64,
}

impl Default for LinkShape {
    /// A perfect link: no delay, unlimited bandwidth, no loss.
    fn default() -> Self {
        LinkShape {
            latency: Duration::ZERO,
            bandwidth_bytes_per_sec: None,
            loss: 0.0,
        }
    }
}

impl LinkShape {
    /// Checks the fields, so that no input can make the shaper misbehave.
    pub fn validate(&self) -> Result<(), MemError> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(MemError::InvalidLink(format!(
                "loss {} is not a probability in [0, 1]",
                self.loss
            )));
        }
        if self.bandwidth_bytes_per_sec == Some(0) {
            return Err(MemError::InvalidLink(
                "bandwidth 0 would deliver nothing (use loss 1.0 for a dead link)".into(),
            ));
        }
        if self.latency > MAX_LATENCY {
            return Err(MemError::InvalidLink(format!(
                "latency {:?} is longer than {MAX_LATENCY:?}",
                self.latency
            )));
        }
        Ok(())
    }
}

/// A seeded generator deciding which datagrams are lost (splitmix64: tiny
/// state, good enough statistics, identical on every platform and version).
#[derive(Debug, Clone)]
pub(crate) struct LossRng(u64);

impl LossRng {
    pub(crate) fn new(seed: u64) -> Self {
        LossRng(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// Whether the next datagram is dropped with probability `p`. Always
    /// draws once, so the pattern depends only on the datagram's index.
    pub(crate) fn drops(&mut self, p: f64) -> bool {
        let u = (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
        u < p
    }
}

/// splitmix64's finalizer.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A socket's loss seed: the same address on the same network seed always
/// draws the same pattern, whatever the order sockets were bound in.
fn socket_seed(seed: u64, addr: SocketAddr) -> u64 {
    let ip = match addr.ip() {
        IpAddr::V4(ip) => u128::from(u32::from(ip)),
        IpAddr::V6(ip) => u128::from(ip) ^ (1 << 127),
    };
    let folded = (ip as u64) ^ mix((ip >> 64) as u64);
    mix(seed ^ mix(folded ^ (u64::from(addr.port()) << 48)))
}

/// Locks, ignoring poisoning: every critical section leaves the state
/// consistent, and panicking here would take the whole simulator down.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// The bound addresses.
struct Table {
    sockets: HashMap<SocketAddr, Weak<MemSocket>>,
    /// Next automatic host, 0-based (0 is 10.0.0.1).
    next_host: u32,
}

impl Table {
    fn taken(&self, addr: &SocketAddr) -> bool {
        self.sockets
            .get(addr)
            .is_some_and(|socket| socket.strong_count() > 0)
    }

    fn next_free(&mut self) -> Result<SocketAddr, MemError> {
        for _ in 0..AUTO_HOSTS {
            let host = self.next_host;
            self.next_host = (host + 1) % AUTO_HOSTS;
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 0, 0, 1)) + host);
            let addr = SocketAddr::new(ip.into(), AUTO_PORT);
            if !self.taken(&addr) {
                return Ok(addr);
            }
        }
        Err(MemError::AddressesExhausted)
    }
}

/// A datagram waiting for its delivery time.
struct InFlight {
    at: Instant,
    /// Ties broken by sending order, so that each link stays FIFO.
    seq: u64,
    src: SocketAddr,
    dest: Weak<MemSocket>,
    data: Box<[u8]>,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<InFlight>>,
    seq: u64,
}

struct NetInner {
    seed: u64,
    table: RwLock<Table>,
    timers: Mutex<Timers>,
    /// Wakes the scheduler when an earlier deadline arrives, or to exit.
    notify: Arc<Notify>,
    /// Whether a scheduler task is alive (it clears this when it ends,
    /// e.g. with its runtime, so the next delayed datagram starts another).
    running: Arc<AtomicBool>,
}

impl Drop for NetInner {
    fn drop(&mut self) {
        // The scheduler holds only a weak reference: let it see it is gone.
        self.notify.notify_one();
    }
}

/// A switchboard of virtual addresses connecting [`MemSocket`]s. Cheap to
/// clone (all clones are the same network); it lives as long as any clone
/// or any of its sockets.
#[derive(Clone)]
pub struct MemNetwork {
    inner: Arc<NetInner>,
}

impl fmt::Debug for MemNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemNetwork")
            .field("seed", &self.inner.seed)
            .field("bound", &self.bound())
            .finish()
    }
}

impl MemNetwork {
    /// An empty network whose loss patterns derive from `seed`.
    pub fn new(seed: u64) -> Self {
        MemNetwork {
            inner: Arc::new(NetInner {
                seed,
                table: RwLock::new(Table {
                    sockets: HashMap::new(),
                    next_host: 0,
                }),
                timers: Mutex::new(Timers::default()),
                notify: Arc::new(Notify::new()),
                running: Arc::new(AtomicBool::new(false)),
            }),
        }
    }

    /// The seed given to [`MemNetwork::new`].
    pub fn seed(&self) -> u64 {
        self.inner.seed
    }

    /// Binds a socket at `addr`, or at the next automatic address (see the
    /// module docs) when `None`, behind the access link `link` (`None`: a
    /// perfect link).
    pub fn socket(
        &self,
        addr: Option<SocketAddr>,
        link: Option<LinkShape>,
    ) -> Result<Arc<MemSocket>, MemError> {
        if let Some(link) = &link {
            link.validate()?;
        }
        let mut table = write(&self.inner.table);
        let addr = match addr {
            Some(addr) => {
                if addr.port() == 0 || addr.ip().is_unspecified() {
                    return Err(MemError::InvalidAddress(addr));
                }
                if table.taken(&addr) {
                    return Err(MemError::AddrInUse(addr));
                }
                addr
            }
            None => table.next_free()?,
        };
        let socket = Arc::new(MemSocket {
            addr,
            net: self.inner.clone(),
            link: link.map(|shape| {
                Mutex::new(LinkState {
                    shape,
                    up_free: None,
                    down_free: None,
                    rng: LossRng::new(socket_seed(self.inner.seed, addr)),
                })
            }),
            rx: Mutex::new(RxQueue::default()),
            closed: AtomicBool::new(false),
        });
        table.sockets.insert(addr, Arc::downgrade(&socket));
        Ok(socket)
    }

    /// How many sockets are bound now.
    pub fn bound(&self) -> usize {
        read(&self.inner.table)
            .sockets
            .values()
            .filter(|s| s.strong_count() > 0)
            .count()
    }

    /// Whether a socket is bound at `addr`.
    pub fn is_bound(&self, addr: SocketAddr) -> bool {
        read(&self.inner.table).taken(&addr)
    }
}

impl NetInner {
    fn lookup(&self, addr: &SocketAddr) -> Option<Arc<MemSocket>> {
        read(&self.table).sockets.get(addr).and_then(Weak::upgrade)
    }

    /// Frees `addr` if `socket` is what is bound there.
    fn unbind(&self, addr: &SocketAddr, socket: *const MemSocket) {
        let mut table = write(&self.table);
        if table
            .sockets
            .get(addr)
            .is_some_and(|bound| std::ptr::eq(bound.as_ptr(), socket))
        {
            table.sockets.remove(addr);
            let len = table.sockets.len();
            if table.sockets.capacity() > MAP_KEEP_CAPACITY && len * 4 < table.sockets.capacity() {
                table.sockets.shrink_to(len * 2);
            }
        }
    }

    /// Queues a datagram for delivery at `at`, starting the scheduler task
    /// if none runs. Without a tokio runtime it is dropped (as UDP may).
    fn schedule(
        self: &Arc<Self>,
        at: Instant,
        src: SocketAddr,
        dest: &Arc<MemSocket>,
        data: &[u8],
    ) {
        if !self.running.swap(true, Ordering::AcqRel) {
            let Ok(handle) = tokio::runtime::Handle::try_current() else {
                self.running.store(false, Ordering::Release);
                tracing::debug!(%src, "in-memory datagram dropped: no tokio runtime");
                return;
            };
            let guard = RunningGuard(self.running.clone());
            handle.spawn(scheduler(Arc::downgrade(self), self.notify.clone(), guard));
        }
        let earliest = {
            let mut timers = lock(&self.timers);
            timers.seq += 1;
            let seq = timers.seq;
            timers.heap.push(Reverse(InFlight {
                at,
                seq,
                src,
                dest: Arc::downgrade(dest),
                data: data.into(),
            }));
            timers.heap.peek().is_some_and(|first| first.0.seq == seq)
        };
        if earliest {
            self.notify.notify_one();
        }
    }
}

/// Clears the running flag when the scheduler ends, however it ends.
struct RunningGuard(Arc<AtomicBool>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Delivers delayed datagrams when due: one task and one timer per network,
/// whatever the number of sockets. Ends when the network is gone.
async fn scheduler(net: Weak<NetInner>, notify: Arc<Notify>, _running: RunningGuard) {
    let mut due = Vec::new();
    loop {
        let next = {
            let Some(net) = net.upgrade() else { return };
            let now = Instant::now();
            let mut timers = lock(&net.timers);
            while timers.heap.peek().is_some_and(|first| first.0.at <= now) {
                if let Some(Reverse(datagram)) = timers.heap.pop() {
                    due.push(datagram);
                }
            }
            if timers.heap.is_empty() && timers.heap.capacity() > MAP_KEEP_CAPACITY {
                timers.heap.shrink_to_fit();
            }
            timers.heap.peek().map(|first| first.0.at)
        };
        let delivered = !due.is_empty();
        for datagram in due.drain(..) {
            if let Some(dest) = datagram.dest.upgrade() {
                dest.deliver(datagram.src, datagram.data);
            }
        }
        if delivered {
            // Time passed while delivering: look again before sleeping.
            continue;
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = notify.notified() => {}
                }
            }
            None => notify.notified().await,
        }
    }
}

/// One direction's shaping state of a link.
struct LinkState {
    shape: LinkShape,
    /// When the uplink finishes serializing what it has queued.
    up_free: Option<Instant>,
    /// When the downlink finishes serializing what it has queued.
    down_free: Option<Instant>,
    rng: LossRng,
}

impl LinkState {
    /// When a datagram of `len` bytes entering a direction at `start` leaves
    /// its far end, or `None` if it is lost or overflows the queue.
    fn pass(&mut self, uplink: bool, start: Instant, len: usize) -> Option<Instant> {
        if self.rng.drops(self.shape.loss) {
            return None;
        }
        let mut end = start;
        if let Some(rate) = self.shape.bandwidth_bytes_per_sec {
            let free = if uplink {
                &mut self.up_free
            } else {
                &mut self.down_free
            };
            let begin = free.map_or(start, |free| free.max(start));
            if begin.duration_since(start) > transfer_time(LINK_QUEUE_BYTES, rate) {
                return None;
            }
            end = begin.checked_add(transfer_time(len as u64, rate))?;
            *free = Some(end);
        }
        end.checked_add(self.shape.latency)
    }
}

/// Time to serialize `bytes` at `rate` bytes per second (`rate > 0`).
fn transfer_time(bytes: u64, rate: u64) -> Duration {
    let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(rate.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

struct Datagram {
    src: SocketAddr,
    data: Box<[u8]>,
}

#[derive(Default)]
struct RxQueue {
    datagrams: VecDeque<Datagram>,
    bytes: usize,
    waker: Option<Waker>,
}

/// A datagram socket bound on a [`MemNetwork`]; give it to
/// `quinn::Endpoint::new_with_abstract_socket` (or use
/// [`mem_server_endpoint`] / [`mem_client_endpoint`]). Dropping the last
/// reference (quinn's, once its endpoint is gone) frees the address.
pub struct MemSocket {
    addr: SocketAddr,
    net: Arc<NetInner>,
    link: Option<Mutex<LinkState>>,
    rx: Mutex<RxQueue>,
    closed: AtomicBool,
}

impl fmt::Debug for MemSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemSocket")
            .field("addr", &self.addr)
            .field("link", &self.link())
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl MemSocket {
    /// The address this socket is bound at.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The socket's access link, if shaped.
    pub fn link(&self) -> Option<LinkShape> {
        self.link.as_ref().map(|link| lock(link).shape)
    }

    /// Frees the address now, even while quinn still holds the socket:
    /// queued datagrams are discarded, sends are dropped and nothing more
    /// is received (the endpoint goes silent rather than failing).
    pub fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            self.net.unbind(&self.addr, self);
            *lock(&self.rx) = RxQueue::default();
        }
    }

    /// Whether [`MemSocket::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends one datagram through both access links.
    fn send_one(&self, now: Instant, dest: &Arc<MemSocket>, data: &[u8]) {
        let mut at = now;
        if let Some(link) = &self.link {
            // A statement of its own: the guard is released before `dest`'s
            // link is locked, which may be this very socket's.
            let passed = lock(link).pass(true, at, data.len());
            let Some(passed) = passed else { return };
            at = passed;
        }
        if let Some(link) = &dest.link {
            let passed = lock(link).pass(false, at, data.len());
            let Some(passed) = passed else { return };
            at = passed;
        }
        if at <= now {
            dest.deliver(self.addr, data.into());
        } else {
            self.net.schedule(at, self.addr, dest, data);
        }
    }

    /// Puts a datagram in the receive queue, or drops it if the queue is
    /// full or the socket closed.
    fn deliver(&self, src: SocketAddr, data: Box<[u8]>) {
        if self.is_closed() {
            return;
        }
        let waker = {
            let mut rx = lock(&self.rx);
            if rx.bytes.saturating_add(data.len()) > RECV_QUEUE_BYTES {
                return;
            }
            rx.bytes += data.len();
            rx.datagrams.push_back(Datagram { src, data });
            rx.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

impl Drop for MemSocket {
    fn drop(&mut self) {
        if !self.is_closed() {
            self.net.unbind(&self.addr, self);
        }
    }
}

/// The poller of a socket that is always writable: sends never block (a
/// full link drops instead, like a router).
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for MemSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    /// Never fails: quinn treats send errors as fatal for the connection,
    /// and UDP loses datagrams silently anyway.
    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        if self.is_closed() || transmit.contents.is_empty() {
            return Ok(());
        }
        let Some(dest) = self.net.lookup(&transmit.destination) else {
            return Ok(());
        };
        let segment = transmit
            .segment_size
            .filter(|&size| size > 0)
            .unwrap_or(transmit.contents.len());
        let now = Instant::now();
        for datagram in transmit.contents.chunks(segment) {
            self.send_one(now, &dest, datagram);
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let mut rx = lock(&self.rx);
        if rx.datagrams.is_empty() {
            if !self.is_closed() && !rx.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                rx.waker = Some(cx.waker().clone());
            }
            return Poll::Pending;
        }
        let mut filled = 0;
        for (buf, meta) in bufs.iter_mut().zip(meta.iter_mut()) {
            let Some(datagram) = rx.datagrams.pop_front() else {
                break;
            };
            rx.bytes -= datagram.data.len();
            // quinn's buffers hold any UDP payload; a short one truncates,
            // as recvmsg does.
            let len = datagram.data.len().min(buf.len());
            buf[..len].copy_from_slice(&datagram.data[..len]);
            *meta = RecvMeta {
                addr: datagram.src,
                len,
                stride: len,
                ecn: None,
                dst_ip: Some(self.addr.ip()),
            };
            filled += 1;
        }
        if rx.datagrams.is_empty() && rx.datagrams.capacity() > RX_KEEP_CAPACITY {
            rx.datagrams = VecDeque::new();
        }
        Poll::Ready(Ok(filled))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.addr)
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        1
    }

    fn may_fragment(&self) -> bool {
        false
    }
}

/// A quinn endpoint on a new socket of `net` (see [`MemNetwork::socket`]
/// for `addr` and `link`). Must be called inside a tokio runtime.
pub fn mem_endpoint(
    net: &MemNetwork,
    addr: Option<SocketAddr>,
    link: Option<LinkShape>,
    endpoint_config: EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> Result<quinn::Endpoint, MemError> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(MemError::NoRuntime);
    }
    let socket = net.socket(addr, link)?;
    let addr = socket.addr();
    quinn::Endpoint::new_with_abstract_socket(
        endpoint_config,
        server,
        socket,
        Arc::new(TokioRuntime),
    )
    .map_err(|source| MemError::Endpoint { addr, source })
}

/// A server endpoint bound at `addr` of `net` on a perfect link, like
/// [`crate::endpoint::server_endpoint`].
pub fn mem_server_endpoint(
    net: &MemNetwork,
    addr: SocketAddr,
    config: quinn::ServerConfig,
) -> Result<quinn::Endpoint, MemError> {
    mem_endpoint(
        net,
        Some(addr),
        None,
        crate::endpoint::server_endpoint_config(),
        Some(config),
    )
}

/// [`mem_server_endpoint`] with stateless-reset tokens derived from
/// `secret`, like [`crate::endpoint::server_endpoint_with_reset_secret`],
/// so a restarted simulated aggregator resets its clients' connections.
pub fn mem_server_endpoint_with_reset_secret(
    net: &MemNetwork,
    addr: SocketAddr,
    config: quinn::ServerConfig,
    secret: &[u8],
) -> Result<quinn::Endpoint, MemError> {
    let endpoint_config = crate::endpoint::reset_secret_endpoint_config(secret);
    mem_endpoint(net, Some(addr), None, endpoint_config, Some(config))
}

/// A client endpoint at the next automatic address of `net`, behind
/// `link`, whose default client configuration is `config`.
pub fn mem_client_endpoint(
    net: &MemNetwork,
    link: Option<LinkShape>,
    config: quinn::ClientConfig,
) -> Result<quinn::Endpoint, MemError> {
    let mut endpoint = mem_endpoint(net, None, link, EndpointConfig::default(), None)?;
    endpoint.set_default_client_config(config);
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(seed: u64, p: f64, n: usize) -> Vec<bool> {
        let mut rng = LossRng::new(seed);
        (0..n).map(|_| rng.drops(p)).collect()
    }

    #[test]
    fn drop_pattern_is_deterministic_for_a_seed() {
        assert_eq!(pattern(7, 0.1, 10_000), pattern(7, 0.1, 10_000));
        assert_ne!(pattern(7, 0.1, 10_000), pattern(8, 0.1, 10_000));
        let dropped = pattern(7, 0.1, 100_000).iter().filter(|d| **d).count();
        assert!((9_000..11_000).contains(&dropped), "{dropped}");
        assert!(pattern(1, 0.0, 1000).iter().all(|d| !d));
        assert!(pattern(1, 1.0, 1000).iter().all(|d| *d));
    }

    #[test]
    fn socket_seeds_depend_on_seed_and_address() {
        let a: SocketAddr = "10.0.0.1:49152".parse().expect("addr");
        let b: SocketAddr = "10.0.0.2:49152".parse().expect("addr");
        assert_eq!(socket_seed(1, a), socket_seed(1, a));
        assert_ne!(socket_seed(1, a), socket_seed(1, b));
        assert_ne!(socket_seed(1, a), socket_seed(2, a));
    }

    #[tokio::test]
    async fn a_link_direction_serializes_at_its_bandwidth_and_tail_drops() {
        let shape = LinkShape {
            latency: Duration::from_millis(10),
            bandwidth_bytes_per_sec: Some(1000),
            loss: 0.0,
        };
        let mut link = LinkState {
            shape,
            up_free: None,
            down_free: None,
            rng: LossRng::new(0),
        };
        let t0 = Instant::now();
        let first = link.pass(true, t0, 100).expect("first");
        assert_eq!(first - t0, Duration::from_millis(110));
        let second = link.pass(true, t0, 100).expect("second");
        assert_eq!(second - t0, Duration::from_millis(210));
        // The downlink has its own clock.
        let down = link.pass(false, t0, 100).expect("down");
        assert_eq!(down - t0, Duration::from_millis(110));
        // Fill the queue: the backlog may not exceed LINK_QUEUE_BYTES.
        let mut sent = 0;
        while link.pass(true, t0, 1000).is_some() {
            sent += 1;
            assert!(sent < 1000, "no tail drop");
        }
        assert_eq!(sent, LINK_QUEUE_BYTES / 1000);
    }

    #[test]
    fn invalid_shapes_are_refused() {
        let ok = LinkShape::default();
        assert!(ok.validate().is_ok());
        for bad in [
            LinkShape {
                loss: f64::NAN,
                ..ok
            },
            LinkShape { loss: -0.1, ..ok },
            LinkShape { loss: 1.5, ..ok },
            LinkShape {
                bandwidth_bytes_per_sec: Some(0),
                ..ok
            },
            LinkShape {
                latency: Duration::MAX,
                ..ok
            },
        ] {
            assert!(
                matches!(bad.validate(), Err(MemError::InvalidLink(_))),
                "{bad:?}"
            );
        }
    }
}
