//! sluice-perf: an MQTT load generator that works against any broker (sluice, Mosquitto, rumqttd).
//!
//! Scenarios:
//! - `fan-in`: N publishers → one subscriber on a wildcard filter.
//! - `fan-out`: one publisher → N subscribers of the same topic.
//! - `p2p`: N publisher → subscriber pairs, each on its own topic.
//! - `idle`: N idle connections; reports the broker's resident memory per connection.
//! - `from-kafka`: records produced to a Kafka topic (with rskafka) that the broker maps to
//!   `perf/k2m`, received by N MQTT subscribers.
//! - `to-kafka`: N publishers into a bridged topic; counts the records that reach Kafka (sum of
//!   partition end offsets, read with rskafka) and the rate at which they got there.
//!
//! Payloads carry a send timestamp (ns since this process started), so latency is measured
//! end to end in one clock. It prints a progress line each second, a summary, then one JSON line.
//! It reads the broker's CPU time from /proc/PID/stat (`--broker-pid`) and its own, so results
//! on a shared 2-core machine can be read fairly. Pin it and the broker to different CPUs
//! (`taskset`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::BytesMut;
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use sluice_core::packet::{self, Connect, Packet, Properties, Publish, SubOptions, Subscribe, Version};

#[derive(Copy, Clone, Debug, ValueEnum, PartialEq)]
enum Scenario {
    FanIn,
    FanOut,
    P2p,
    Idle,
    /// Connect, CONNACK, DISCONNECT in a loop from `--clients` threads: connects/s.
    Storm,
    ToKafka,
    FromKafka,
}

#[derive(Parser, Debug)]
#[command(about = "MQTT load generator: fan-in and fan-out, messages/s, latency, broker CPU per message")]
struct Args {
    #[arg(value_enum)]
    scenario: Scenario,
    /// Broker address.
    #[arg(long, default_value = "127.0.0.1:1883")]
    addr: SocketAddr,
    /// Where the subscribers connect, when not to `--addr`: another node of a cluster, to
    /// measure publish → deliver across nodes.
    #[arg(long)]
    sub_addr: Option<SocketAddr>,
    /// Publishers (fan-in) or subscribers (fan-out).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Fan-in: subscribers on the wildcard filter (each gets every message, or with `--share`
    /// one member of the group each).
    #[arg(long, default_value_t = 1)]
    subscribers: usize,
    /// Fan-in: the subscribers form this shared-subscription group (`$share/GROUP/perf/#`), so
    /// each message is delivered once.
    #[arg(long)]
    share: Option<String>,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Publishers (fan-in, to-kafka) send this file's bytes as every payload, unchanged (no
    /// timestamp written into them: e.g. a JSON document for a schema mapping); `--payload` is
    /// then its length.
    #[arg(long)]
    payload_file: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Total publish rate in messages/s; 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Broker process id, to report its CPU time per message.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Kafka bootstrap server, for `to-kafka`.
    #[arg(long)]
    kafka: Option<String>,
    /// Kafka topic the broker bridges `perf/#` into, for `to-kafka`.
    #[arg(long, default_value = "perf")]
    kafka_topic: String,
    /// The broker's HTTP endpoint (`--http` of sluice), for `to-kafka`: after publishing, its
    /// `sluice_kafka_records_produced_total` is read every 10 ms until Kafka has acknowledged
    /// every record, giving `acked_per_s` — the producer-side rate, counted as a native Kafka
    /// client counts its own (first send to last acknowledgement), with no consumer poll. At
    /// the end its produce counters give what the requests carried (`produce_requests`,
    /// `records_per_batch`, `kib_per_request`; null for a build without them).
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// The Kafka broker's process id (a local tansu), for `to-kafka` with `--metrics`: its CPU
    /// time from the first publish to the last acknowledgement is reported as `kafka_cpu_s`
    /// (what Kafka spent taking these records, without the read-back that counts them).
    #[arg(long)]
    kafka_pid: Option<u32>,
    /// Label for the JSON line (e.g. the broker's name).
    #[arg(long, default_value = "broker")]
    label: String,
    /// Spread `idle` and `storm` connections over this many loopback source addresses
    /// (127.0.0.1, 127.0.0.2, …): each gives ~28k ephemeral ports, so more than 64k connections
    /// to one broker address become possible. 0: let the kernel pick (one source address).
    #[arg(long, default_value_t = 0)]
    source_ips: u32,
    /// How `p2p` (QoS 1/2) and `to-kafka` (QoS 0/1) drive their clients: `threads` (a blocking
    /// thread per client) or `epoll` (all clients non-blocking on `--load-threads` event
    /// loops: less load CPU, fewer wake-ups; not with `--rate`).
    #[arg(long, value_enum, default_value = "threads")]
    io: Io,
    /// Event-loop threads for `--io epoll`.
    #[arg(long, default_value_t = 1)]
    load_threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Io {
    Threads,
    Epoll,
}

/// The source address of connection `i` under `--source-ips n`.
fn source_ip(i: usize, n: u32) -> Option<std::net::Ipv4Addr> {
    (n > 0).then(|| std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(127, 0, 0, 1)) + (i as u32 % n)))
}

fn epoch() -> Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// utime + stime of a process, in seconds, from /proc.
fn cpu_secs(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

struct Conn {
    s: TcpStream,
    buf: BytesMut,
}

impl Conn {
    fn connect(addr: SocketAddr, id: &str) -> anyhow::Result<Conn> {
        Self::connect_from(addr, id, None)
    }

    /// Connects from `source` (a loopback address) when given.
    fn connect_from(addr: SocketAddr, id: &str, source: Option<std::net::Ipv4Addr>) -> anyhow::Result<Conn> {
        let s = match source {
            None => TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?,
            Some(ip) => {
                let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                sock.bind(&SocketAddr::from((ip, 0)).into()).with_context(|| format!("bind {ip}"))?;
                sock.connect(&addr.into()).with_context(|| format!("connect {addr} from {ip}"))?;
                sock.into()
            }
        };
        s.set_nodelay(true)?;
        let mut c = Conn { s, buf: BytesMut::with_capacity(1 << 16) };
        c.send(&Packet::Connect(Box::new(Connect {
            version: Version::V311,
            clean_start: true,
            keep_alive: 120,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties::default(),
        })))?;
        match c.recv()? {
            Packet::ConnAck(a) if a.code == 0 => Ok(c),
            other => bail!("{id}: CONNACK refused: {other:?}"),
        }
    }

    fn send(&mut self, p: &Packet) -> anyhow::Result<()> {
        let mut out = BytesMut::new();
        packet::encode(p, Version::V311, &mut out);
        self.s.write_all(&out)?;
        Ok(())
    }

    fn recv(&mut self) -> anyhow::Result<Packet> {
        loop {
            if let Some(p) = packet::decode(&mut self.buf, Some(Version::V311), usize::MAX)? {
                return Ok(p);
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> anyhow::Result<usize> {
        let mut chunk = [0u8; 65536];
        let n = self.s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed by broker");
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Waits for at least one PUBACK, then takes every one already received; returns how many.
    fn recv_pubacks(&mut self) -> anyhow::Result<usize> {
        let mut acked = 0;
        loop {
            while let Some(p) = packet::decode(&mut self.buf, Some(Version::V311), usize::MAX)? {
                if let Packet::PubAck(_) = p {
                    acked += 1;
                }
            }
            if acked > 0 {
                return Ok(acked);
            }
            self.fill()?;
        }
    }

    fn subscribe(&mut self, filter: &str, qos: u8) -> anyhow::Result<()> {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter.into(), SubOptions { qos, ..Default::default() })],
            properties: Properties::default(),
        }))?;
        match self.recv()? {
            Packet::SubAck(_) => Ok(()),
            other => bail!("expected SUBACK, got {other:?}"),
        }
    }
}

struct Shared {
    sent: AtomicU64,
    received: AtomicU64,
    /// QoS 1/2 publishes not acknowledged yet, for event loops (thread publishers wait for
    /// their own before they end).
    unacked: AtomicU64,
    stop_publishing: AtomicBool,
    stop_receiving: AtomicBool,
    hist: Mutex<Histogram<u64>>,
}

/// Appends a PUBLISH whose payload (`body`) starts with its send time, for latency at the far end.
/// `--payload-file`'s bytes, set once before the publishers start.
static PAYLOAD_FILE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();

fn encode_timestamped(out: &mut BytesMut, topic: &str, qos: u8, packet_id: u16, body: &mut [u8]) {
    let body: &[u8] = match PAYLOAD_FILE.get() {
        Some(fixed) => fixed,
        None => {
            body[..8].copy_from_slice(&now_ns().to_le_bytes());
            body
        }
    };
    let p = packet::PublishRef {
        dup: false,
        qos,
        retain: false,
        topic,
        packet_id,
        properties: &Properties::EMPTY,
        payload: body,
    };
    packet::encode_publish(&p, Version::V311, out);
}

/// A subscriber got `p`: its latency recorded, its PUBACK (QoS 1) appended to `acks`, counted.
fn on_delivery(p: &Publish, hist: &mut Histogram<u64>, acks: &mut BytesMut, a: &Shared) {
    if p.payload.len() >= 8 {
        let t = u64::from_le_bytes(p.payload[..8].try_into().unwrap());
        let _ = hist.record(now_ns().saturating_sub(t).max(1_000));
    }
    if p.qos == 1 {
        let ack = packet::PubResp { packet_id: p.packet_id, code: 0, properties: Properties::default() };
        packet::encode(&Packet::PubAck(ack), Version::V311, acks);
    }
    // Exact, so the end of a run can wait for the last message rather than guess.
    a.received.fetch_add(1, Ordering::Relaxed);
}

/// QoS 1 messages a publisher keeps unacknowledged.
const WINDOW: usize = 64;
/// QoS 0 messages a publisher encodes per write.
const QOS0_BATCH: usize = 64;

/// Publishes as fast as allowed until told to stop. QoS 0 is written in batches; QoS 1 keeps a
/// window of 64 in flight.
fn publisher(
    addr: SocketAddr,
    id: usize,
    topic: String,
    a: Arc<Shared>,
    payload: usize,
    qos: u8,
    rate: u64,
) -> anyhow::Result<()> {
    let mut c = Conn::connect(addr, &format!("perf-pub-{id}"))?;
    let batch = QOS0_BATCH;
    let mut out = BytesMut::with_capacity(batch * (payload + 64));
    let mut pid: u16 = 0;
    let mut inflight = 0usize;
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut body = vec![0u8; payload.max(8)];
    while !a.stop_publishing.load(Ordering::Relaxed) {
        if rate > 0 {
            let due = (start.elapsed().as_secs_f64() * rate as f64) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        // QoS 0 writes a batch of 64; QoS 1 refills its window with as many as were acknowledged
        // since the last write (the whole window at first), like a client that publishes bursts.
        let n = if qos == 0 { batch } else { WINDOW - inflight };
        for _ in 0..n {
            let packet_id = if qos > 0 {
                pid = pid % u16::MAX + 1;
                pid
            } else {
                0
            };
            encode_timestamped(&mut out, &topic, qos, packet_id, &mut body);
        }
        c.s.write_all(&out)?;
        out.clear();
        sent += n as u64;
        if qos == 0 {
            a.sent.fetch_add(n as u64, Ordering::Relaxed);
        } else {
            // QoS 1 counts as sent once acknowledged: what the broker took responsibility for.
            inflight += n;
            let acked = c.recv_pubacks()?;
            inflight -= acked;
            a.sent.fetch_add(acked as u64, Ordering::Relaxed);
        }
    }
    // Collect the acknowledgements still out before leaving.
    c.s.set_read_timeout(Some(Duration::from_secs(5)))?;
    while inflight > 0 {
        match c.recv() {
            Ok(Packet::PubAck(_)) => {
                inflight -= 1;
                a.sent.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

fn subscriber(mut c: Conn, a: Arc<Shared>) -> anyhow::Result<()> {
    c.s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut local = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut acks = BytesMut::new();
    loop {
        while let Some(p) = packet::decode(&mut c.buf, Some(Version::V311), usize::MAX)? {
            if let Packet::Publish(p) = p {
                on_delivery(&p, &mut local, &mut acks, &a);
            }
        }
        if !acks.is_empty() {
            c.s.write_all(&acks)?;
            acks.clear();
        }
        match c.fill() {
            Ok(_) => {}
            Err(e) => {
                let timeout = e
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut));
                if !timeout {
                    return Err(e);
                }
                if a.stop_receiving.load(Ordering::Relaxed) {
                    break;
                }
            }
        }
    }
    a.hist.lock().unwrap().add(&local)?;
    Ok(())
}

/// One side of a `p2p --io epoll` pair.
struct Peer {
    conn: Conn,
    /// Bytes not yet taken by the kernel.
    out: BytesMut,
    /// `Some(topic)` for a publisher.
    topic: Option<String>,
    inflight: usize,
    next_pid: u16,
}

impl Peer {
    /// Writes what the kernel takes; the rest waits for EPOLLOUT.
    fn flush(&mut self) -> anyhow::Result<()> {
        while !self.out.is_empty() {
            match self.conn.s.write(&self.out) {
                Ok(n) => {
                    let _ = self.out.split_to(n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// Clients on one non-blocking event loop (`--io epoll`): a publisher (`Some(topic)`) keeps
/// `WINDOW` QoS 1 messages in flight and refills after each read of PUBACKs, or at QoS 0 writes
/// batches of 64 until the kernel takes no more; a subscriber acknowledges after each read. One
/// thread, no wake-ups between load threads: the broker is what is measured, and the load's own
/// CPU stays small (a thread per client costs a wake-up per read).
fn event_loop(clients: Vec<(Conn, Option<String>)>, a: Arc<Shared>, payload: usize, qos: u8) -> anyhow::Result<()> {
    use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
    let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
    let mut peers = Vec::new();
    for (conn, topic) in clients {
        conn.s.set_nonblocking(true)?;
        let flags = EpollFlags::EPOLLIN | EpollFlags::EPOLLOUT | EpollFlags::EPOLLET;
        epoll.add(&conn.s, EpollEvent::new(flags, peers.len() as u64))?;
        peers.push(Peer { conn, out: BytesMut::new(), topic, inflight: 0, next_pid: 0 });
    }
    let mut local = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
    let mut body = vec![0u8; payload.max(8)];
    let mut events = vec![EpollEvent::empty(); 256];
    let mut chunk = vec![0u8; 1 << 16];
    let mut refill = |p: &mut Peer, a: &Shared| {
        let Some(topic) = &p.topic else { return };
        if a.stop_publishing.load(Ordering::Relaxed) {
            return;
        }
        if qos == 0 {
            for _ in 0..QOS0_BATCH {
                encode_timestamped(&mut p.out, topic, 0, 0, &mut body);
            }
            a.sent.fetch_add(QOS0_BATCH as u64, Ordering::Relaxed);
            return;
        }
        let n = WINDOW - p.inflight;
        for _ in 0..n {
            p.next_pid = p.next_pid % u16::MAX + 1;
            encode_timestamped(&mut p.out, topic, qos, p.next_pid, &mut body);
        }
        p.inflight += n;
        a.unacked.fetch_add(n as u64, Ordering::Relaxed);
    };
    // QoS 0: a publisher writes until the kernel takes no more (edge-triggered: the next
    // EPOLLOUT comes only after a write that would block).
    let write = |p: &mut Peer, a: &Shared, refill: &mut dyn FnMut(&mut Peer, &Shared)| -> anyhow::Result<()> {
        p.flush()?;
        while qos == 0 && p.topic.is_some() && p.out.is_empty() && !a.stop_publishing.load(Ordering::Relaxed) {
            refill(p, a);
            p.flush()?;
        }
        Ok(())
    };
    for p in &mut peers {
        refill(p, &a);
        write(p, &a, &mut refill)?;
    }
    while !a.stop_receiving.load(Ordering::Relaxed) {
        let n = match epoll.wait(&mut events, 100) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for ev in &events[..n] {
            let p = &mut peers[ev.data() as usize];
            if ev.events().intersects(EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR) {
                loop {
                    match p.conn.s.read(&mut chunk) {
                        Ok(0) => bail!("connection closed by broker"),
                        Ok(k) => p.conn.buf.extend_from_slice(&chunk[..k]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                let mut acked = 0u64;
                while let Some(packet) = packet::decode(&mut p.conn.buf, Some(Version::V311), usize::MAX)? {
                    match packet {
                        Packet::PubAck(_) => acked += 1,
                        Packet::Publish(m) => on_delivery(&m, &mut local, &mut p.out, &a),
                        _ => {}
                    }
                }
                if acked > 0 {
                    // QoS 1 counts as sent once acknowledged: what the broker took responsibility for.
                    p.inflight -= acked as usize;
                    a.unacked.fetch_sub(acked, Ordering::Relaxed);
                    a.sent.fetch_add(acked, Ordering::Relaxed);
                    refill(p, &a);
                }
            }
            write(p, &a, &mut refill)?;
        }
    }
    a.hist.lock().unwrap().add(&local)?;
    Ok(())
}

/// Produces timestamped records to Kafka (partition 0) until told to stop, in batches of 500.
fn kafka_producer(bootstrap: &str, topic: &str, a: Arc<Shared>, payload: usize, rate: u64) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let c = rskafka::client::ClientBuilder::new(vec![bootstrap.to_string()]).build().await?;
        let pc = c.partition_client(topic, 0, rskafka::client::partition::UnknownTopicHandling::Retry).await?;
        let start = Instant::now();
        let mut sent = 0u64;
        let mut body = vec![0u8; payload.max(8)];
        while !a.stop_publishing.load(Ordering::Relaxed) {
            if rate > 0 && sent >= (start.elapsed().as_secs_f64() * rate as f64) as u64 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
            let records: Vec<rskafka::record::Record> = (0..500)
                .map(|_| {
                    body[..8].copy_from_slice(&now_ns().to_le_bytes());
                    rskafka::record::Record {
                        key: None,
                        value: Some(body.clone()),
                        headers: Default::default(),
                        timestamp: rskafka::chrono::DateTime::from_timestamp_millis(0).unwrap(),
                    }
                })
                .collect();
            pc.produce(records, rskafka::client::partition::Compression::NoCompression).await?;
            sent += 500;
            a.sent.fetch_add(500, Ordering::Relaxed);
        }
        anyhow::Ok(())
    })
}

/// Counts the records in a Kafka topic by reading them (tansu 0.6's "latest offset" answer lags
/// behind the records it holds, so end offsets cannot be trusted for counting).
struct KafkaCount {
    rt: tokio::runtime::Runtime,
    parts: Vec<(rskafka::client::partition::PartitionClient, i64)>,
    seen: u64,
}

impl KafkaCount {
    fn new(bootstrap: &str, topic: &str) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let parts = rt.block_on(async {
            let c = rskafka::client::ClientBuilder::new(vec![bootstrap.to_string()]).build().await?;
            let t = c
                .list_topics()
                .await?
                .into_iter()
                .find(|t| t.name == topic)
                .with_context(|| format!("Kafka topic {topic} does not exist"))?;
            let mut parts = Vec::new();
            for p in t.partitions {
                let pc = c.partition_client(topic, p, rskafka::client::partition::UnknownTopicHandling::Retry).await?;
                parts.push((pc, 0));
            }
            anyhow::Ok(parts)
        })?;
        Ok(KafkaCount { rt, parts, seen: 0 })
    }

    /// Records in the topic so far.
    fn total(&mut self) -> anyhow::Result<u64> {
        let KafkaCount { rt, parts, seen } = self;
        rt.block_on(async {
            for (pc, next) in parts.iter_mut() {
                loop {
                    let (records, _) = pc.fetch_records(*next, 1..8_000_000, 10).await?;
                    let Some(last) = records.last() else { break };
                    *next = last.offset + 1;
                    *seen += records.len() as u64;
                }
            }
            Ok(*seen)
        })
    }
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()
}

/// Opens `n` idle connections and reports the broker's memory per connection.
fn idle(args: &Args) -> anyhow::Result<()> {
    let pid = args.broker_pid.context("idle needs --broker-pid")?.to_string();
    let before = rss_kib(&pid).context("cannot read the broker's /proc status")?;
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(args.clients);
    for i in 0..args.clients {
        conns.push(Conn::connect_from(args.addr, &format!("perf-idle-{i}"), source_ip(i, args.source_ips))?);
        if (i + 1) % 1000 == 0 {
            eprintln!("[{:>6.1}s] {} connections", t0.elapsed().as_secs_f64(), i + 1);
        }
    }
    let connect_secs = t0.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(&pid).context("cannot read the broker's /proc status")?;
    let per = (after.saturating_sub(before)) as f64 / args.clients as f64;
    println!(
        "{} idle x{}: broker RSS {before} KiB -> {after} KiB, {per:.2} KiB per connection; {:.0} connects/s",
        args.label,
        args.clients,
        args.clients as f64 / connect_secs
    );
    println!(
        "{{\"label\":\"{}\",\"scenario\":\"Idle\",\"clients\":{},\"rss_before_kib\":{before},\"rss_after_kib\":{after},\"kib_per_connection\":{per:.3},\"connects_per_s\":{:.0}}}",
        args.label,
        args.clients,
        args.clients as f64 / connect_secs
    );
    drop(conns);
    Ok(())
}

/// Connection storm: `--clients` threads connect, wait for CONNACK and disconnect, over and
/// over, for `--duration` seconds. Reports connects/s, connect latency percentiles and the
/// broker's CPU per connect.
fn storm(args: &Args) -> anyhow::Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?));
    let cpu0 = args.broker_pid.and_then(|p| cpu_secs(&p.to_string()));
    let self0 = cpu_secs("self");
    let t0 = Instant::now();
    let threads: Vec<_> = (0..args.clients)
        .map(|t| {
            let (stop, done, hist, addr, n_ips) =
                (stop.clone(), done.clone(), hist.clone(), args.addr, args.source_ips);
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut local = Histogram::<u64>::new_with_bounds(1_000, 60_000_000_000, 3)?;
                let mut k = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let start = now_ns();
                    let mut c = Conn::connect_from(addr, &format!("perf-storm-{t}-{k}"), source_ip(k * 64 + t, n_ips))?;
                    local.record((now_ns() - start).max(1_000))?;
                    c.send(&Packet::Disconnect(packet::Disconnect { code: 0, properties: Properties::default() }))?;
                    done.fetch_add(1, Ordering::Relaxed);
                    k += 1;
                }
                hist.lock().unwrap().add(&local)?;
                Ok(())
            })
        })
        .collect();
    let mut last = 0;
    while t0.elapsed() < Duration::from_secs(args.duration) {
        std::thread::sleep(Duration::from_secs(1));
        let n = done.load(Ordering::Relaxed);
        eprintln!("[{:>5.1}s] {} connects/s", t0.elapsed().as_secs_f64(), n - last);
        last = n;
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("storm thread panicked"))??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    let h = hist.lock().unwrap();
    let broker_cpu = args.broker_pid.and_then(|p| cpu_secs(&p.to_string())).zip(cpu0).map(|(a, b)| a - b);
    let load_cpu = cpu_secs("self").zip(self0).map(|(a, b)| a - b).unwrap_or(0.0);
    let per = broker_cpu.map_or(0.0, |c| c * 1e6 / n.max(1) as f64);
    println!(
        "{} storm x{}: {n} connects ({:.0}/s), CONNACK latency p50 {} us p99 {} us, broker CPU {:.2} s ({per:.1} us/connect), load CPU {load_cpu:.2} s",
        args.label,
        args.clients,
        n as f64 / secs,
        h.value_at_quantile(0.5) / 1000,
        h.value_at_quantile(0.99) / 1000,
        broker_cpu.unwrap_or(0.0)
    );
    println!(
        "{{\"label\":\"{}\",\"scenario\":\"Storm\",\"clients\":{},\"connects\":{n},\"connects_per_s\":{:.0},\"p50_us\":{},\"p99_us\":{},\"broker_cpu_us_per_connect\":{per:.2},\"load_cpu_s\":{load_cpu:.2}}}",
        args.label,
        args.clients,
        n as f64 / secs,
        h.value_at_quantile(0.5) / 1000,
        h.value_at_quantile(0.99) / 1000
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let _ = epoch();
    if let Some(path) = &args.payload_file {
        let bytes = std::fs::read(path).with_context(|| format!("--payload-file {}", path.display()))?;
        args.payload = bytes.len();
        let _ = PAYLOAD_FILE.set(bytes);
    }
    if args.scenario == Scenario::Idle {
        return idle(&args);
    }
    if args.scenario == Scenario::Storm {
        return storm(&args);
    }
    let shared = Arc::new(Shared {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        unacked: AtomicU64::new(0),
        stop_publishing: AtomicBool::new(false),
        stop_receiving: AtomicBool::new(false),
        hist: Mutex::new(Histogram::new_with_bounds(1_000, 60_000_000_000, 3)?),
    });
    let (n_pub, n_sub) = match args.scenario {
        Scenario::FanIn => (args.clients, args.subscribers.max(1)),
        Scenario::FanOut => (1, args.clients),
        Scenario::ToKafka => (args.clients, 0),
        Scenario::P2p => (args.clients, args.clients),
        Scenario::FromKafka => (0, args.clients),
        Scenario::Idle | Scenario::Storm => unreachable!(),
    };
    // The event loop is not paced, keeps a QoS 1 window, and drives p2p at QoS 1/2 and
    // to-kafka's publishers at QoS 0/1; other cases use threads.
    let epoll_p2p = args.scenario == Scenario::P2p && args.io == Io::Epoll && args.rate == 0 && args.qos > 0;
    let epoll_pubs = args.scenario == Scenario::ToKafka && args.io == Io::Epoll && args.rate == 0 && args.qos <= 1;
    if args.io == Io::Epoll && !epoll_p2p && !epoll_pubs {
        bail!("--io epoll drives p2p at QoS 1/2 and to-kafka at QoS 0/1, without --rate");
    }
    let mut kafka = match (args.scenario, &args.kafka) {
        (Scenario::ToKafka, Some(k)) => Some(KafkaCount::new(k, &args.kafka_topic)?),
        (Scenario::ToKafka, None) => bail!("to-kafka needs --kafka HOST:PORT"),
        _ => None,
    };
    let kafka_base = kafka.as_mut().map(KafkaCount::total).transpose()?.unwrap_or(0);
    let acked_base = args.metrics.map(records_produced).transpose()?.unwrap_or(0);
    let mut epoll_subs = Vec::new();
    let mut subs = Vec::new();
    for i in 0..n_sub {
        let mut c = Conn::connect(args.sub_addr.unwrap_or(args.addr), &format!("perf-sub-{i}"))?;
        let filter = match args.scenario {
            Scenario::FanIn => match &args.share {
                Some(group) => format!("$share/{group}/perf/#"),
                None => "perf/#".to_string(),
            },
            Scenario::P2p => format!("perf/{i}/data"),
            Scenario::FromKafka => "perf/k2m".to_string(),
            _ => "perf/fanout".to_string(),
        };
        c.subscribe(&filter, args.qos)?;
        if epoll_p2p {
            epoll_subs.push(c);
            continue;
        }
        let a = shared.clone();
        subs.push(std::thread::spawn(move || subscriber(c, a)));
    }
    let broker_pid = args.broker_pid.map(|p| p.to_string());
    let cpu0 = broker_pid.as_deref().and_then(cpu_secs);
    let kafka_pid = args.kafka_pid.map(|p| p.to_string());
    let kafka_cpu0 = kafka_pid.as_deref().and_then(cpu_secs);
    let self0 = cpu_secs("self");
    let t0 = Instant::now();
    let mut pubs = Vec::new();
    if epoll_p2p || epoll_pubs {
        let loops = args.load_threads.max(1);
        let mut groups: Vec<Vec<(Conn, Option<String>)>> = (0..loops).map(|_| Vec::new()).collect();
        let mut p2p_subs = std::mem::take(&mut epoll_subs).into_iter();
        for i in 0..n_pub {
            let p = Conn::connect(args.addr, &format!("perf-pub-{i}"))?;
            let group = &mut groups[i % loops];
            group.push((p, Some(format!("perf/{i}/data"))));
            if let Some(s) = p2p_subs.next() {
                group.push((s, None));
            }
        }
        for group in groups {
            let (a, payload, qos) = (shared.clone(), args.payload, args.qos);
            subs.push(std::thread::spawn(move || event_loop(group, a, payload, qos)));
        }
    }
    for i in 0..if epoll_p2p || epoll_pubs { 0 } else { n_pub } {
        let topic = match args.scenario {
            Scenario::FanIn | Scenario::ToKafka | Scenario::P2p => format!("perf/{i}/data"),
            Scenario::FanOut | Scenario::Idle | Scenario::Storm | Scenario::FromKafka => "perf/fanout".into(),
        };
        let a = shared.clone();
        let (addr, payload, qos, rate) = (args.addr, args.payload, args.qos, args.rate / n_pub as u64);
        pubs.push(std::thread::spawn(move || publisher(addr, i, topic, a, payload, qos, rate)));
    }
    if args.scenario == Scenario::FromKafka {
        let bootstrap = args.kafka.clone().context("from-kafka needs --kafka HOST:PORT")?;
        let (topic, a, payload, rate) = (args.kafka_topic.clone(), shared.clone(), args.payload, args.rate);
        pubs.push(std::thread::spawn(move || kafka_producer(&bootstrap, &topic, a, payload, rate)));
    }
    let mut last = (0u64, 0u64);
    for sec in 1..=args.duration {
        std::thread::sleep(
            Duration::from_secs(1).saturating_sub(t0.elapsed().saturating_sub(Duration::from_secs(sec - 1))),
        );
        let (s, r) = (shared.sent.load(Ordering::Relaxed), shared.received.load(Ordering::Relaxed));
        eprintln!("[{sec:>3}s] sent {:>10}/s  received {:>10}/s", s - last.0, r - last.1);
        last = (s, r);
    }
    shared.stop_publishing.store(true, Ordering::Relaxed);
    for p in pubs {
        p.join().unwrap()?;
    }
    // Event-loop publishers: their last acknowledgements, as thread publishers wait for theirs.
    let deadline = Instant::now() + Duration::from_secs(5);
    while shared.unacked.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    let sent = shared.sent.load(Ordering::Relaxed);
    // Kafka's acknowledgements as the broker counts them: the time of the last one that came.
    let acked = match args.metrics {
        Some(addr) => {
            let (n, at) = follow_count(sent, Duration::from_millis(10), || Ok(records_produced(addr)? - acked_base))?;
            Some((n, at.duration_since(t0).as_secs_f64().max(publish_secs)))
        }
        None => None,
    };
    let kafka_cpu = kafka_pid.as_deref().and_then(cpu_secs).zip(kafka_cpu0).map(|(b, a)| b - a);
    // The load's own CPU while it published (to the last acknowledgement), without the
    // read-back below that counts the records in Kafka.
    let publish_cpu = cpu_secs("self").zip(self0).map(|(b, a)| b - a);
    if let Some(k) = &mut kafka {
        // Wait until Kafka holds every record, or nothing has arrived for 5 s.
        let (in_kafka, _) = follow_count(sent, Duration::from_millis(50), || Ok(k.total()? - kafka_base))?;
        shared.received.store(in_kafka, Ordering::Relaxed);
    }
    let expected = match args.scenario {
        Scenario::P2p => sent,
        Scenario::FanIn if args.share.is_some() => sent,
        _ => sent * n_sub.max(1) as u64,
    };
    // Drain: wait until everything arrived or nothing has arrived for 2 s.
    let mut prev = u64::MAX;
    let mut still = Instant::now();
    loop {
        let r = shared.received.load(Ordering::Relaxed);
        if r >= expected || still.elapsed() > Duration::from_secs(3) {
            break;
        }
        if r != prev {
            prev = r;
            still = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let total_secs = t0.elapsed().as_secs_f64().max(publish_secs);
    shared.stop_receiving.store(true, Ordering::Relaxed);
    for s in subs {
        s.join().unwrap()?;
    }
    let received = shared.received.load(Ordering::Relaxed);
    let broker_cpu = match (broker_pid.as_deref().and_then(cpu_secs), cpu0) {
        (Some(b), Some(a)) => Some(b - a),
        _ => None,
    };
    let self_cpu = if kafka.is_some() { publish_cpu } else { cpu_secs("self").zip(self0).map(|(b, a)| b - a) };
    let h = shared.hist.lock().unwrap();
    let p50 = h.value_at_quantile(0.50) as f64 / 1e3;
    let p99 = h.value_at_quantile(0.99) as f64 / 1e3;
    let shape = args.metrics.map(produce_shape).transpose()?.flatten();
    let sent_rate = sent as f64 / publish_secs;
    let recv_rate = received as f64 / total_secs;
    let drop_pct =
        if expected > 0 { 100.0 * (expected.saturating_sub(received)) as f64 / expected as f64 } else { 0.0 };
    let cpu_us = broker_cpu.map(|c| c * 1e6 / received.max(1) as f64);
    println!(
        "{} {:?} qos{} {}B x{}: sent {sent} ({sent_rate:.0}/s), delivered {received} ({recv_rate:.0}/s), dropped {drop_pct:.2}%, \
         latency p50 {p50:.0} us p99 {p99:.0} us, broker CPU {} s ({} us/delivery), load CPU {} s",
        args.label,
        args.scenario,
        args.qos,
        args.payload,
        args.clients,
        broker_cpu.map_or("?".into(), |c| format!("{c:.2}")),
        cpu_us.map_or("?".into(), |c| format!("{c:.2}")),
        self_cpu.map_or("?".into(), |c| format!("{c:.2}")),
    );
    println!(
        "{{\"label\":\"{}\",\"scenario\":\"{:?}\",\"rate\":{},\"qos\":{},\"payload\":{},\"clients\":{},\"sent\":{sent},\"delivered\":{received},\
         \"sent_per_s\":{sent_rate:.0},\"delivered_per_s\":{recv_rate:.0},\"drop_pct\":{drop_pct:.3},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\
         \"broker_cpu_s\":{},\"broker_cpu_us_per_delivery\":{},\"load_cpu_s\":{},\"acked\":{},\"acked_per_s\":{},\"kafka_cpu_s\":{},\
         \"produce_requests\":{},\"records_per_batch\":{},\"kib_per_request\":{}}}",
        args.label,
        args.scenario,
        args.rate,
        args.qos,
        args.payload,
        args.clients,
        broker_cpu.map_or("null".into(), |c| format!("{c:.3}")),
        cpu_us.map_or("null".into(), |c| format!("{c:.3}")),
        self_cpu.map_or("null".into(), |c| format!("{c:.3}")),
        acked.map_or("null".into(), |(n, _)| n.to_string()),
        acked.map_or("null".into(), |(n, secs)| format!("{:.0}", n as f64 / secs)),
        kafka_cpu.map_or("null".into(), |c| format!("{c:.2}")),
        shape.map_or("null".into(), |s| s.0.to_string()),
        shape.map_or("null".into(), |s| format!("{:.1}", s.1)),
        shape.map_or("null".into(), |s| format!("{:.1}", s.2)),
    );
    Ok(())
}

/// Reads `count` every `poll` until it reaches `target` or has not moved for 5 s: the last
/// count and when it was first seen.
fn follow_count(
    target: u64,
    poll: Duration,
    mut count: impl FnMut() -> anyhow::Result<u64>,
) -> anyhow::Result<(u64, Instant)> {
    let (mut last, mut at) = (count()?, Instant::now());
    while last < target && at.elapsed() <= Duration::from_secs(5) {
        std::thread::sleep(poll);
        let n = count()?;
        if n != last {
            (last, at) = (n, Instant::now());
        }
    }
    Ok((last, at))
}

/// The broker's `sluice_kafka_records_produced_total`, summed over its labels, from `/metrics`.
fn records_produced(addr: SocketAddr) -> anyhow::Result<u64> {
    Ok(metric_totals(addr, &["sluice_kafka_records_produced_total"])?[0])
}

/// Each of the broker's metrics `names`, summed over its labels, from one read of `/metrics`.
fn metric_totals(addr: SocketAddr, names: &[&str]) -> anyhow::Result<Vec<u64>> {
    let mut s = TcpStream::connect(addr).with_context(|| format!("cannot reach the broker's metrics at {addr}"))?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    let mut totals = vec![0u64; names.len()];
    for line in body.lines() {
        let name = line.split(['{', ' ']).next().unwrap_or("");
        if let Some(i) = names.iter().position(|n| *n == name) {
            let v = line.rsplit(' ').next().unwrap_or("");
            totals[i] += v.parse::<f64>().with_context(|| format!("metrics line {line:?}"))? as u64;
        }
    }
    Ok(totals)
}

/// What the broker's produce requests carried, from its counters: `(requests, records per
/// batch, KiB per request)`; `None` for a build without them.
fn produce_shape(addr: SocketAddr) -> anyhow::Result<Option<(u64, f64, f64)>> {
    let t = metric_totals(
        addr,
        &[
            "sluice_kafka_produce_requests_total",
            "sluice_kafka_produce_batches_total",
            "sluice_kafka_produce_batch_records_total",
            "sluice_kafka_produce_batch_bytes_total",
        ],
    )?;
    let (requests, batches, records, bytes) = (t[0], t[1], t[2], t[3]);
    Ok((requests > 0)
        .then(|| (requests, records as f64 / batches.max(1) as f64, bytes as f64 / 1024.0 / requests as f64)))
}
