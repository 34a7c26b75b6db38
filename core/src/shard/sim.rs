//! A whole broker in memory for stateful fuzzing: several shards, connections on each, and the
//! mesh as one FIFO per ordered pair of shards, driven by an arbitrary byte string.
//!
//! Each step the input picks one action — open a connection on a shard, send it a packet
//! (CONNECT with one of a few client ids so that takeovers race across shards, SUBSCRIBE,
//! UNSUBSCRIBE, PUBLISH at every QoS, PUBACK/PUBREC/PUBREL/PUBCOMP for what it received,
//! PINGREQ, DISCONNECT) or raw bytes, lose a connection, deliver one shard message from a pair
//! it picks, tick the clock, commit the session store (successfully or not), or read a
//! connection's output — and after every step [`Sim::check`] asserts the invariants the module
//! docs state: a session is hosted by at most one shard, an active connection holds its session,
//! every session queue within `max_queued_messages`, output bounded. A panic anywhere is a find.
//!
//! Built for `fuzz/` (feature `sim`) and for the core's own tests; not part of the broker.

use super::*;

const CLIENT_IDS: [&str; 3] = ["twin", "dev-1", "dev-2"];
const TOPICS: [&str; 4] = ["a/b", "a/c", "$share/g/a/#", "a/#"];

/// The in-memory world.
pub struct Sim {
    shards: Vec<Shard>,
    mesh: HashMap<(ShardId, ShardId), VecDeque<ShardMsg>>,
    /// Open connections: (shard, conn, version once CONNECT was sent).
    conns: Vec<(ShardId, ConnId, Option<Version>)>,
    next_conn: ConnId,
    now: u64,
    limits: Limits,
}

impl Sim {
    pub fn new(n: usize) -> Sim {
        let limits = Limits {
            max_queued_messages: 8,
            max_inflight: 4,
            max_outbound_buffer_bytes: 4096,
            max_backpressure_ms: 300,
            ..Limits::default()
        };
        Sim {
            shards: (0..n).map(|i| Shard::new(i, n, limits.clone(), 0).with_session_store()).collect(),
            mesh: HashMap::default(),
            conns: Vec::new(),
            next_conn: 1,
            now: 0,
            limits,
        }
    }

    /// Runs the actions `data` describes, checking after each one.
    pub fn run(data: &[u8]) {
        let mut sim = Sim::new(2 + usize::from(data.first().copied().unwrap_or(0) % 2));
        let mut input = data.get(1..).unwrap_or_default();
        while let Some((&op, rest)) = input.split_first() {
            input = rest;
            let arg = |input: &mut &[u8]| -> u8 {
                let Some((&b, rest)) = input.split_first() else { return 0 };
                *input = rest;
                b
            };
            match op % 12 {
                0 => {
                    let shard = usize::from(arg(&mut input)) % sim.shards.len();
                    let conn = sim.next_conn;
                    sim.next_conn += 1;
                    sim.shards[shard].on_open(conn, sim.now);
                    sim.conns.push((shard, conn, None));
                }
                1..=5 => {
                    let which = arg(&mut input);
                    let what = arg(&mut input);
                    sim.send_packet(which, op % 12, what);
                }
                6 => {
                    let which = arg(&mut input);
                    let len = usize::from(arg(&mut input) % 32);
                    let take = len.min(input.len());
                    let (raw, rest) = input.split_at(take);
                    input = rest;
                    sim.send_raw(which, raw);
                }
                7 => {
                    let which = arg(&mut input);
                    if !sim.conns.is_empty() {
                        let i = usize::from(which) % sim.conns.len();
                        let (shard, conn, _) = sim.conns.remove(i);
                        sim.shards[shard].on_lost(conn, sim.now);
                    }
                }
                8 => {
                    let n = arg(&mut input) % 8 + 1;
                    for _ in 0..n {
                        let pick = arg(&mut input);
                        sim.deliver_one(pick);
                    }
                }
                9 => {
                    sim.now += u64::from(arg(&mut input)) * 20;
                    for s in &mut sim.shards {
                        s.tick(sim.now, 0);
                    }
                }
                10 => {
                    let ok = arg(&mut input) % 4 != 0;
                    for s in &mut sim.shards {
                        let (_, token) = s.take_session_changes();
                        s.on_sessions_synced(token, ok, sim.now);
                    }
                }
                _ => {
                    let which = arg(&mut input);
                    sim.read_and_acknowledge(which);
                }
            }
            sim.collect();
            sim.check();
        }
        // Quiet: everything in flight delivered, then the invariants once more.
        for _ in 0..10_000 {
            if !sim.deliver_one(0) {
                break;
            }
        }
        sim.check();
    }

    fn conn_at(&self, which: u8) -> Option<(usize, ShardId, ConnId, Option<Version>)> {
        if self.conns.is_empty() {
            return None;
        }
        let i = usize::from(which) % self.conns.len();
        let (s, c, v) = self.conns[i];
        Some((i, s, c, v))
    }

    fn send_bytes(&mut self, shard: ShardId, conn: ConnId, mut b: BytesMut) {
        self.shards[shard].on_bytes(conn, &mut b, self.now);
    }

    fn send_packet(&mut self, which: u8, kind: u8, what: u8) {
        let Some((i, shard, conn, version)) = self.conn_at(which) else { return };
        let v = version.unwrap_or(if what & 1 == 0 { Version::V311 } else { Version::V5 });
        let topic = TOPICS[usize::from(what >> 2) % TOPICS.len()];
        let p = match (version, kind) {
            (None, _) => {
                self.conns[i].2 = Some(v);
                let clean = what & 2 == 0;
                Packet::Connect(Box::new(Connect {
                    version: v,
                    clean_start: clean,
                    keep_alive: 0,
                    client_id: CLIENT_IDS[usize::from(what >> 2) % CLIENT_IDS.len()].into(),
                    will: None,
                    username: None,
                    password: None,
                    properties: Properties {
                        session_expiry_interval: (!clean && v == Version::V5).then_some(30),
                        ..Default::default()
                    },
                }))
            }
            (Some(_), 1) => Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(topic.into(), SubOptions { qos: what % 3, ..Default::default() })],
                properties: Properties::default(),
            }),
            (Some(_), 2) => Packet::Publish(Publish {
                dup: false,
                qos: what % 3,
                retain: what & 8 != 0,
                topic: topic.trim_start_matches("$share/g/").trim_end_matches("/#").into(),
                packet_id: if what.is_multiple_of(3) { 0 } else { u16::from(what >> 4) + 1 },
                properties: Properties::default().into(),
                payload: Bytes::from_static(b"m"),
            }),
            (Some(_), 3) => Packet::PubRel(PubResp {
                packet_id: u16::from(what >> 4) + 1,
                code: 0,
                properties: Properties::default(),
            }),
            (Some(_), 4) => Packet::Unsubscribe(Unsubscribe {
                packet_id: 2,
                filters: vec![topic.into()],
                properties: Properties::default(),
            }),
            (Some(_), _) if what & 1 == 0 => Packet::PingReq,
            (Some(_), _) => Packet::Disconnect(Disconnect { code: 0, properties: Properties::default() }),
        };
        let mut b = BytesMut::new();
        packet::encode(&p, v, &mut b);
        self.send_bytes(shard, conn, b);
    }

    fn send_raw(&mut self, which: u8, raw: &[u8]) {
        let Some((_, shard, conn, _)) = self.conn_at(which) else { return };
        self.send_bytes(shard, conn, BytesMut::from(raw));
    }

    /// Reads what `which` was sent and acknowledges every QoS 1/2 PUBLISH in it.
    fn read_and_acknowledge(&mut self, which: u8) {
        let Some((_, shard, conn, Some(v))) = self.conn_at(which) else { return };
        let Some(mut out) = self.shards[shard].take_output(conn) else { return };
        let mut reply = BytesMut::new();
        while let Ok(Some(p)) = packet::decode(&mut out, Some(v), usize::MAX) {
            let r = |packet_id| PubResp { packet_id, code: 0, properties: Properties::default() };
            let answer = match p {
                Packet::Publish(m) if m.qos == 1 => Packet::PubAck(r(m.packet_id)),
                Packet::Publish(m) if m.qos == 2 => Packet::PubRec(r(m.packet_id)),
                Packet::PubRel(x) => Packet::PubComp(r(x.packet_id)),
                Packet::PubRec(x) => Packet::PubRel(r(x.packet_id)),
                _ => continue,
            };
            packet::encode(&answer, v, &mut reply);
        }
        self.shards[shard].on_output_drained(conn, self.now);
        if !reply.is_empty() {
            self.send_bytes(shard, conn, reply);
        }
    }

    fn collect(&mut self) {
        for i in 0..self.shards.len() {
            let fx = self.shards[i].drain_effects();
            for c in fx.close {
                self.conns.retain(|(s, id, _)| !(*s == i && *id == c));
                self.shards[i].on_lost(c, self.now);
            }
            for (to, m) in fx.to_shards {
                self.mesh.entry((i, to)).or_default().push_back(m);
            }
        }
        for i in 0..self.shards.len() {
            // Closing produced more effects (wills, releases): keep them in order too.
            let fx = self.shards[i].drain_effects();
            for (to, m) in fx.to_shards {
                self.mesh.entry((i, to)).or_default().push_back(m);
            }
        }
    }

    /// Delivers one shard message from a non-empty pair picked by `pick`.
    fn deliver_one(&mut self, pick: u8) -> bool {
        let mut busy: Vec<(ShardId, ShardId)> =
            self.mesh.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if busy.is_empty() {
            return false;
        }
        busy.sort_unstable();
        let (from, to) = busy[usize::from(pick) % busy.len()];
        if let Some(m) = self.mesh.get_mut(&(from, to)).and_then(VecDeque::pop_front) {
            self.shards[to].on_shard_msgs([m], self.now);
        }
        self.collect();
        true
    }

    /// The invariants of [`crate::shard`], asserted.
    pub fn check(&self) {
        for id in CLIENT_IDS {
            let hosts = self.shards.iter().filter(|s| s.sessions.contains_key(id)).count();
            assert!(hosts <= 1, "session `{id}` hosted by {hosts} shards");
        }
        for s in &self.shards {
            for (conn, c) in &s.conns {
                if let ConnState::Active { client_id: id } = &c.state {
                    assert!(
                        s.sessions.get(id).is_some_and(|x| x.conn == Some(*conn)),
                        "active connection without its session"
                    );
                }
                assert!(c.held.len() <= HELD_INPUT_MAX + (64 << 10), "held input past its bound");
            }
            for session in s.sessions.values() {
                assert!(session.queue.len() <= self.limits.max_queued_messages, "session queue past its bound");
            }
        }
    }
}
