//! Test harness: starts the real `sluice` binary on free ports and drives it with a small blocking
//! MQTT client.
//!
//! The broker runs with `--cores 2` and one extra listener per shard (`--shard-listen`), so a test
//! can put a publisher on shard 0 and a subscriber on shard 1 and know that delivery crossed
//! cores. Every wait has a deadline; nothing sleeps for a fixed time to "let things settle".

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
pub use sluice_core::packet::{
    self, reason, ConnAck, Connect, Disconnect, Packet, Properties, PubResp, Publish, SubAck, SubOptions, Subscribe,
    Unsubscribe, Version, Will,
};

/// How long any single expected event may take on a loaded 2-core machine.
pub const WAIT: Duration = Duration::from_secs(10);

/// The `sluice` binary: `$SLUICE_BIN`, or the workspace's debug build.
pub fn sluice_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return p.into();
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/sluice");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --bin sluice` first (the README's test command does)",
        p.display()
    );
    p
}

/// A running broker; killed when dropped.
pub struct Broker {
    child: Child,
    pub addr: SocketAddr,
    /// `shard_addrs[i]` is served by shard i.
    pub shard_addrs: Vec<SocketAddr>,
    pub data_dir: PathBuf,
}

impl Broker {
    /// Two shards, per-shard listeners, no `$SYS` noise unless `extra` asks for it.
    pub fn start(extra: &[&str]) -> Broker {
        Self::start_with_cores(2, extra)
    }

    pub fn start_with_cores(cores: usize, extra: &[&str]) -> Broker {
        let data_dir = std::env::temp_dir().join(format!("sluice-test-{}-{}", std::process::id(), unique()));
        let mut cmd = Command::new(sluice_bin());
        cmd.args(["--listen", "127.0.0.1:0", "--cores", &cores.to_string(), "--print-listen"])
            .arg("--data-dir")
            .arg(&data_dir);
        for _ in 0..cores {
            cmd.args(["--shard-listen", "127.0.0.1:0"]);
        }
        if !extra.contains(&"--sys-interval") {
            cmd.args(["--sys-interval", "0"]);
        }
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::inherit()).env("SLUICE_LOG", "warn");
        let mut child = cmd.spawn().expect("spawn sluice");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut addr = None;
        let mut shard_addrs = vec![None; cores];
        let deadline = Instant::now() + WAIT;
        while addr.is_none() || shard_addrs.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).expect("sluice did not report its listeners in time");
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.as_slice() {
                ["listening", a] => addr = Some(a.parse().unwrap()),
                ["shard", i, "listening", a] => shard_addrs[i.parse::<usize>().unwrap()] = Some(a.parse().unwrap()),
                _ => {}
            }
        }
        Broker {
            child,
            addr: addr.unwrap(),
            shard_addrs: shard_addrs.into_iter().map(Option::unwrap).collect(),
            data_dir,
        }
    }

    pub fn shard(&self, i: usize) -> SocketAddr {
        self.shard_addrs[i]
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status code.
    pub fn terminate(mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st.code();
            }
            assert!(Instant::now() < deadline, "sluice did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A blocking MQTT client on the broker's own codec (the Python and mosquitto tests bring
/// independent implementations).
pub struct Client {
    stream: TcpStream,
    buf: BytesMut,
    pub version: Version,
    next_pid: u16,
    pub connack: Option<ConnAck>,
}

pub fn connect_packet(version: Version, client_id: &str, clean: bool) -> Connect {
    Connect {
        version,
        clean_start: clean,
        keep_alive: 60,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    }
}

impl Client {
    /// Opens TCP only.
    pub fn open(addr: SocketAddr, version: Version) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to sluice");
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: BytesMut::new(), version, next_pid: 0, connack: None }
    }

    /// CONNECT and wait for CONNACK; panics unless it is a success.
    pub fn connect(addr: SocketAddr, c: Connect) -> Client {
        let mut cl = Self::open(addr, c.version);
        let ack = cl.handshake(c);
        assert_eq!(ack.code, reason::SUCCESS, "CONNACK refused: {ack:?}");
        cl
    }

    pub fn v5(addr: SocketAddr, id: &str) -> Client {
        Self::connect(addr, connect_packet(Version::V5, id, true))
    }

    pub fn v311(addr: SocketAddr, id: &str) -> Client {
        Self::connect(addr, connect_packet(Version::V311, id, true))
    }

    pub fn handshake(&mut self, c: Connect) -> ConnAck {
        self.send(&Packet::Connect(Box::new(c)));
        match self.recv() {
            Some(Packet::ConnAck(a)) => {
                self.connack = Some(a.clone());
                a
            }
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        packet::encode(p, self.version, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    pub fn send_raw(&mut self, raw: &[u8]) {
        let _ = self.stream.write_all(raw);
    }

    fn pid(&mut self) -> u16 {
        self.next_pid = self.next_pid % u16::MAX + 1;
        self.next_pid
    }

    /// Next packet within `WAIT`; `None` when the connection closed.
    pub fn recv(&mut self) -> Option<Packet> {
        self.recv_within(WAIT).unwrap_or_else(|| panic!("no packet within {WAIT:?}"))
    }

    /// `None`: nothing arrived within `d`. `Some(None)`: the connection closed.
    pub fn recv_within(&mut self, d: Duration) -> Option<Option<Packet>> {
        let deadline = Instant::now() + d;
        loop {
            if let Some(p) =
                packet::decode(&mut self.buf, Some(self.version), usize::MAX).expect("broker sent a malformed packet")
            {
                return Some(Some(p));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Some(None),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return None
                }
                Err(_) => return Some(None),
            }
        }
    }

    /// Asserts that nothing arrives for `d` (used only to check the absence of a delivery, after
    /// a positive marker has proven the path works).
    pub fn expect_nothing(&mut self, d: Duration) {
        if let Some(p) = self.recv_within(d) {
            panic!("expected nothing, got {p:?}");
        }
    }

    /// Reads until the broker closes the connection; returns what came before.
    pub fn until_closed(&mut self) -> Vec<Packet> {
        let mut got = Vec::new();
        loop {
            match self.recv_within(WAIT) {
                Some(Some(p)) => got.push(p),
                Some(None) => return got,
                None => panic!("connection not closed within {WAIT:?}; got {got:?}"),
            }
        }
    }

    /// The next PUBLISH, acknowledging it as a well-behaved client would.
    pub fn next_publish(&mut self) -> Publish {
        loop {
            match self.recv() {
                Some(Packet::Publish(p)) => {
                    self.ack(&p);
                    return p;
                }
                Some(Packet::PubRel(r)) => self.send(&Packet::PubComp(PubResp {
                    packet_id: r.packet_id,
                    code: 0,
                    properties: Properties::default(),
                })),
                Some(other) => panic!("expected PUBLISH, got {other:?}"),
                None => panic!("connection closed while waiting for PUBLISH"),
            }
        }
    }

    pub fn ack(&mut self, p: &Publish) {
        let r = PubResp { packet_id: p.packet_id, code: 0, properties: Properties::default() };
        match p.qos {
            1 => self.send(&Packet::PubAck(r)),
            2 => self.send(&Packet::PubRec(r)),
            _ => {}
        }
    }

    pub fn subscribe_with(&mut self, filters: &[(&str, SubOptions)], properties: Properties) -> SubAck {
        let packet_id = self.pid();
        let filters = filters.iter().map(|(f, o)| (f.to_string(), *o)).collect();
        self.send(&Packet::Subscribe(Subscribe { packet_id, filters, properties }));
        match self.recv() {
            Some(Packet::SubAck(a)) => {
                assert_eq!(a.packet_id, packet_id);
                a
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    pub fn subscribe(&mut self, filter: &str, qos: u8) -> SubAck {
        self.subscribe_with(&[(filter, SubOptions { qos, ..Default::default() })], Properties::default())
    }

    pub fn unsubscribe(&mut self, filter: &str) -> Packet {
        let packet_id = self.pid();
        self.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id,
            filters: vec![filter.into()],
            properties: Properties::default(),
        }));
        self.recv().expect("UNSUBACK")
    }

    /// Publishes and completes the QoS handshake. Returns the reason code of the PUBACK/PUBREC.
    pub fn publish_with(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool, properties: Properties) -> u8 {
        let packet_id = if qos > 0 { self.pid() } else { 0 };
        self.send(&Packet::Publish(Publish {
            dup: false,
            qos,
            retain,
            topic: topic.into(),
            packet_id,
            properties: properties.into(),
            payload: Bytes::copy_from_slice(payload),
        }));
        match qos {
            0 => 0,
            1 => match self.recv() {
                Some(Packet::PubAck(r)) if r.packet_id == packet_id => r.code,
                other => panic!("expected PUBACK, got {other:?}"),
            },
            _ => {
                let code = match self.recv() {
                    Some(Packet::PubRec(r)) if r.packet_id == packet_id => r.code,
                    other => panic!("expected PUBREC, got {other:?}"),
                };
                if code >= 0x80 {
                    return code;
                }
                self.send(&Packet::PubRel(PubResp { packet_id, code: 0, properties: Properties::default() }));
                match self.recv() {
                    Some(Packet::PubComp(r)) if r.packet_id == packet_id => code,
                    other => panic!("expected PUBCOMP, got {other:?}"),
                }
            }
        }
    }

    pub fn publish(&mut self, topic: &str, payload: &[u8], qos: u8, retain: bool) -> u8 {
        self.publish_with(topic, payload, qos, retain, Properties::default())
    }

    pub fn disconnect(mut self) {
        self.send(&Packet::Disconnect(Disconnect { code: 0, properties: Properties::default() }));
        let _ = self.until_closed();
    }

    /// Drops the TCP connection without DISCONNECT (an "abnormal" disconnect).
    pub fn kill(self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// Round-trips a PINGREQ: everything the broker decided before it has been written.
    pub fn ping(&mut self) {
        self.send(&Packet::PingReq);
        match self.recv() {
            Some(Packet::PingResp) => {}
            other => panic!("expected PINGRESP, got {other:?}"),
        }
    }
}

/// Polls `f` until it returns true or `WAIT` passes.
pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
