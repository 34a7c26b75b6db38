//! The state machine driven in memory: several shards, messages routed between them until
//! quiet, packets in and out through the real codec.
use super::*;
use crate::packet::{Connect, SubOptions};

struct World {
    shards: Vec<Shard>,
    closed: HashSet<(ShardId, ConnId)>,
    now: u64,
    /// Turns of retained scans run so far, over all shards.
    retained_turns: usize,
    /// Password checks the shards asked to run off the reactor.
    verify: Vec<VerifyJob>,
    /// Records for Kafka the shards produced (a bridge's, a cluster's), in order.
    produced: Vec<ProduceRequest>,
    /// The ids of those records, with their shard, not answered yet (see [`World::answer`]).
    unanswered: Vec<(ShardId, u64)>,
}

impl World {
    fn new(n: usize, limits: Limits) -> World {
        World {
            shards: (0..n).map(|i| Shard::new(i, n, limits.clone(), 0)).collect(),
            closed: HashSet::default(),
            now: 0,
            retained_turns: 0,
            verify: Vec::new(),
            produced: Vec::new(),
            unanswered: Vec::new(),
        }
    }

    /// `n` shards of cluster node `n1` (one lease every `heartbeat_ms`, no fencing), with a
    /// session store.
    fn cluster(n: usize, heartbeat_ms: u64) -> World {
        let mut w = World::new(n, Limits::default());
        let cfg = crate::cluster::ClusterConfig {
            name: "t".into(),
            node_id: "n1".into(),
            kafka: "k".into(),
            topic_prefix: None,
            heartbeat_ms,
            dead_after_ms: 60_000,
            partitions: 4,
            fence: false,
            incarnation: 1,
        };
        let mappings = [cfg.forward_mapping(&[]), cfg.retained_mapping(), cfg.claims_mapping()];
        w.shards = (0..n)
            .map(|i| {
                let router = crate::bridge::Router::new(&mappings, &["k".to_string()]).unwrap();
                let options = BridgeOptions {
                    router,
                    delivery: crate::bridge::Delivery::KafkaAck,
                    max_pending_records: 1 << 20,
                    qos0_policy: Default::default(),
                    spill_on_timeout: false,
                };
                Shard::new(i, n, Limits::default(), 0).with_bridge(options).with_session_store()
            })
            .collect();
        w
    }

    /// Every shard's timer at `now` (time moves on to it).
    fn tick(&mut self, now: u64) {
        self.now = now;
        for s in &mut self.shards {
            s.tick(now, 0);
        }
        self.settle();
    }

    /// The claims of `kind` produced so far (with their record's value), taken out.
    fn claims(&mut self, kind: crate::cluster::ClaimKind) -> Vec<(crate::cluster::Claim, Bytes)> {
        let mut out = Vec::new();
        for r in std::mem::take(&mut self.produced) {
            let mut claim = None;
            r.record.for_each_header(|k, v| {
                if k == crate::cluster::CLAIM_HEADER {
                    claim = crate::cluster::Claim::decode(v);
                }
            });
            if let Some(c) = claim.filter(|c| c.kind == kind) {
                out.push((c, r.record.value.clone()));
            }
        }
        out
    }

    /// Kafka answers every record produced so far: stored (`Ok`), or failed with `e`.
    fn answer(&mut self, e: Option<ProduceError>) {
        for (shard, id) in std::mem::take(&mut self.unanswered) {
            let r = match &e {
                Some(e) => ProduceResult::failed(id, e.clone()),
                None => {
                    ProduceResult { outcome: Ok(()), attempts: 1, ..ProduceResult::failed(id, ProduceError::SpillFull) }
                }
            };
            self.shards[shard].on_produce_results([r], self.now);
        }
        self.settle();
    }

    fn settle(&mut self) {
        loop {
            let mut moved = false;
            for i in 0..self.shards.len() {
                // One turn of retained scans per round, as the network layer runs them.
                if self.shards[i].has_retained_work() {
                    self.shards[i].run_retained(self.now);
                    self.retained_turns += 1;
                    moved = true;
                }
                let fx = self.shards[i].drain_effects();
                for c in fx.close {
                    self.closed.insert((i, c));
                }
                self.verify.extend(fx.verify);
                self.unanswered.extend(fx.produce.iter().map(|r| (i, r.id)));
                self.produced.extend(fx.produce);
                for (to, m) in fx.to_shards {
                    moved = true;
                    self.shards[to].on_shard_msgs([m], self.now);
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn send(&mut self, shard: ShardId, conn: ConnId, v: Version, p: Packet) {
        let mut b = BytesMut::new();
        packet::encode(&p, v, &mut b);
        self.shards[shard].on_bytes(conn, &mut b, self.now);
        self.settle();
    }

    fn recv(&mut self, shard: ShardId, conn: ConnId, v: Version) -> Vec<Packet> {
        let mut out = Vec::new();
        if let Some(mut b) = self.shards[shard].take_output(conn) {
            while let Some(p) = packet::decode(&mut b, Some(v), usize::MAX).unwrap() {
                out.push(p);
            }
            // As the network layer does once the kernel took everything.
            self.shards[shard].on_output_drained(conn, self.now);
            self.settle();
        }
        out
    }

    fn connect(&mut self, shard: ShardId, conn: ConnId, v: Version, id: &str, clean: bool) -> ConnAck {
        match self.connect_all(shard, conn, v, id, clean).into_iter().next() {
            Some(Packet::ConnAck(a)) => a,
            o => panic!("{o:?}"),
        }
    }

    /// CONNECT, and the CONNACK with whatever followed it.
    fn connect_all(&mut self, shard: ShardId, conn: ConnId, v: Version, id: &str, clean: bool) -> Vec<Packet> {
        self.shards[shard].on_open(conn, self.now);
        let c = Connect {
            version: v,
            clean_start: clean,
            keep_alive: 10,
            client_id: id.into(),
            will: None,
            username: None,
            password: None,
            properties: Properties { session_expiry_interval: (!clean).then_some(600), ..Default::default() },
        };
        self.send(shard, conn, v, Packet::Connect(Box::new(c)));
        self.recv(shard, conn, v)
    }
}

fn publish(topic: &str, qos: u8, pid: u16, payload: &'static [u8]) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: pid,
        properties: Properties::default().into(),
        payload: Bytes::from_static(payload),
    })
}

fn subscribe(filter: &str, qos: u8) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![(filter.into(), SubOptions { qos, ..Default::default() })],
        properties: Properties::default(),
    })
}

fn unsubscribe(filter: &str) -> Packet {
    Packet::Unsubscribe(Unsubscribe { packet_id: 2, filters: vec![filter.into()], properties: Properties::default() })
}

fn publish_of(p: Packet) -> Publish {
    match p {
        Packet::Publish(p) => p,
        o => panic!("{o:?}"),
    }
}

fn resp(pid: u16) -> PubResp {
    PubResp { packet_id: pid, code: 0, properties: Properties::default() }
}

const V5: Version = Version::V5;

/// What `sluice-net` does with [`SessionChange`]s, in memory: a store per shard, merged at
/// start by the highest generation. Holds `(generation, bytes, shard whose store has it)`.
fn commit_sessions(w: &mut World, store: &mut HashMap<String, (u64, Vec<u8>, ShardId)>) {
    for i in 0..w.shards.len() {
        let (changes, token) = w.shards[i].take_session_changes();
        for c in changes {
            match c {
                SessionChange::Put { client_id, generation, bytes } => {
                    let e = store.entry(client_id.to_string()).or_insert((0, Vec::new(), i));
                    if generation >= e.0 {
                        *e = (generation, bytes, i);
                    }
                }
                SessionChange::Delete { client_id } => {
                    if store.get(client_id.as_ref()).is_some_and(|e| e.2 == i) {
                        store.remove(client_id.as_ref());
                    }
                }
            }
        }
        w.shards[i].on_sessions_synced(token, true, w.now);
    }
    w.settle();
}

#[test]
fn a_persistent_session_comes_back_from_the_store_after_a_restart() {
    let persistent = |n: usize| {
        let mut w = World::new(n, Limits::default());
        w.shards = (0..n).map(|i| Shard::new(i, n, Limits::default(), 0).with_session_store()).collect();
        w
    };
    let mut store = HashMap::default();
    let mut w = persistent(2);
    w.connect(1, 1, V5, "dev", false);
    w.send(1, 1, V5, subscribe("cmd/#", 1));
    assert!(w.recv(1, 1, V5).is_empty(), "SUBACK before the store has the subscription");
    commit_sessions(&mut w, &mut store);
    assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::SubAck(_)]));
    w.shards[1].on_lost(1, w.now);
    w.settle();
    // A publisher on the same shard: its PUBACK waits for the offline queue to be stored.
    w.connect(1, 2, V5, "app", true);
    w.send(1, 2, V5, publish("cmd/1", 1, 7, b"reboot"));
    assert!(w.recv(1, 2, V5).is_empty(), "PUBACK before the queued message is stored");
    commit_sessions(&mut w, &mut store);
    assert!(matches!(w.recv(1, 2, V5).as_slice(), [Packet::PubAck(r)] if r.packet_id == 7));
    // A publisher on another shard: its PUBACK waits for shard 1's commit too.
    w.connect(0, 3, V5, "far-app", true);
    w.send(0, 3, V5, publish("cmd/far", 1, 8, b"from afar"));
    assert!(w.recv(0, 3, V5).is_empty(), "PUBACK before the other shard stored the message");
    let (_, token) = w.shards[0].take_session_changes();
    w.shards[0].on_sessions_synced(token, true, w.now);
    w.settle();
    assert!(w.recv(0, 3, V5).is_empty(), "PUBACK after the wrong shard's commit");
    commit_sessions(&mut w, &mut store);
    assert!(matches!(w.recv(0, 3, V5).as_slice(), [Packet::PubAck(r)] if r.packet_id == 8));
    // Nothing stored anywhere: no wait beyond the other shard's answer.
    w.send(0, 3, V5, publish("nobody/listens", 1, 9, b"x"));
    assert!(matches!(w.recv(0, 3, V5).as_slice(), [Packet::PubAck(r)] if r.packet_id == 9));
    // A clean session is never stored.
    assert_eq!(store.keys().collect::<Vec<_>>(), ["dev"]);

    // Restart with another shard count: every session goes to its directory shard.
    let mut w = persistent(3);
    for (id, (generation, bytes, _)) in store.clone() {
        let at = directory_shard(&id, 3);
        assert!(w.shards[at].restore_sessions(vec![(id, generation, bytes)], 0).is_empty());
    }
    w.settle();
    match w.connect_all(2, 5, V5, "dev", false).as_slice() {
        [Packet::ConnAck(a), Packet::Publish(p), Packet::Publish(q)] if a.session_present => {
            assert_eq!((p.topic.as_str(), p.qos, &p.payload[..]), ("cmd/1", 1, &b"reboot"[..]));
            assert_eq!((q.topic.as_str(), &q.payload[..]), ("cmd/far", &b"from afar"[..]));
        }
        o => panic!("{o:?}"),
    }
    // The subscription came back too.
    w.connect(0, 6, V5, "app", true);
    w.send(0, 6, V5, publish("cmd/2", 0, 0, b"again"));
    assert!(matches!(w.recv(2, 5, V5).as_slice(), [Packet::Publish(p)] if p.topic == "cmd/2"));
    // Ending the session (clean start) deletes it from the store.
    w.shards[2].on_lost(5, w.now);
    w.settle();
    w.connect(1, 7, V5, "dev", true);
    commit_sessions(&mut w, &mut store);
    assert!(store.is_empty(), "{store:?}");
}

#[test]
fn outbound_qos2_state_machine() {
    let mut w = World::new(2, Limits::default());
    w.connect(0, 1, V5, "sub", true);
    w.send(0, 1, V5, subscribe("t", 2));
    assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::SubAck(_)]));
    w.connect(1, 1, V5, "pub", true);
    w.send(1, 1, V5, publish("t", 2, 9, b"x"));
    assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::PubRec(r)] if r.packet_id == 9));
    let pid = match w.recv(0, 1, V5).as_slice() {
        [Packet::Publish(p)] if p.qos == 2 => p.packet_id,
        o => panic!("{o:?}"),
    };
    w.send(0, 1, V5, Packet::PubRec(resp(pid)));
    assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::PubRel(r)] if r.packet_id == pid));
    assert!(matches!(w.shards[0].sessions[&ClientId::from("sub")].inflight.get(pid), Some(Inflight::Release)));
    w.send(0, 1, V5, Packet::PubComp(resp(pid)));
    assert!(w.shards[0].sessions[&ClientId::from("sub")].inflight.is_empty());
    // PUBREL for the incoming side completes with PUBCOMP; an unknown id says so.
    w.send(1, 1, V5, Packet::PubRel(resp(9)));
    assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::PubComp(r)] if r.code == 0));
    w.send(1, 1, V5, Packet::PubRel(resp(9)));
    assert!(matches!(w.recv(1, 1, V5).as_slice(), [Packet::PubComp(r)] if r.code == reason::PACKET_ID_NOT_FOUND));
}

#[test]
fn session_moves_between_shards_on_takeover() {
    let mut w = World::new(3, Limits::default());
    w.connect(0, 1, V5, "dev", false);
    w.send(0, 1, V5, subscribe("a/#", 1));
    w.recv(0, 1, V5);
    let ack = w.connect(2, 7, V5, "dev", false);
    assert!(ack.session_present);
    assert!(w.closed.contains(&(0, 1)));
    assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::Disconnect(d)] if d.code == reason::SESSION_TAKEN_OVER));
    assert!(!w.shards[0].sessions.contains_key("dev"));
    assert!(w.shards[2].sessions.contains_key("dev"));
    assert_eq!(w.shards[0].trie.len(), 0);
    assert_eq!(w.shards[2].trie.len(), 1);
    let dir = directory_shard("dev", 3);
    assert_eq!(w.shards[dir].directory.host("dev"), Some(2));
}

#[test]
fn queue_full_policies() {
    for (policy, want) in [(QueueFullPolicy::DropNewest, [b"0", b"1"]), (QueueFullPolicy::DropOldest, [b"2", b"3"])] {
        let limits = Limits { max_queued_messages: 2, queue_full_policy: policy, ..Limits::default() };
        let mut w = World::new(1, limits);
        w.connect(0, 1, V5, "off", false);
        w.send(0, 1, V5, subscribe("q", 1));
        w.shards[0].on_lost(1, 0);
        w.connect(0, 2, V5, "pub", true);
        for (i, p) in [b"0", b"1", b"2", b"3"].iter().enumerate() {
            w.send(0, 2, V5, publish("q", 1, i as u16 + 1, *p));
        }
        let q: Vec<&[u8]> =
            w.shards[0].sessions[&ClientId::from("off")].queue.iter().map(|d| &d.msg.payload[..]).collect();
        assert_eq!(q, want.iter().map(|b| &b[..]).collect::<Vec<_>>(), "{policy:?}");
        assert_eq!(w.shards[0].stats.dropped_queue_full, 2);
    }
}

#[test]
fn keep_alive_is_one_and_a_half_times_the_interval() {
    let mut w = World::new(1, Limits::default());
    w.connect(0, 1, V5, "ka", true); // keep-alive 10 s
    w.now = 14_900;
    w.shards[0].tick(w.now, 0);
    assert!(w.shards[0].drain_effects().close.is_empty());
    w.now = 15_600;
    w.shards[0].tick(w.now, 0);
    assert_eq!(w.shards[0].drain_effects().close, vec![1]);
}

#[test]
fn a_retained_publish_racing_a_new_subscription_arrives_once() {
    let mut w = World::new(2, Limits::default());
    let topic = (0..).map(|i| format!("r/{i}")).find(|t| shard_of(t, 2) == 0).unwrap();
    w.connect(1, 1, V5, "sub", true);
    w.connect(0, 2, V5, "pub", true);
    // The publish is stored by its owner (shard 0) but its copy for shard 1 is still in
    // flight when the subscription is made on shard 1.
    let mut b = BytesMut::new();
    let p = Publish {
        dup: false,
        qos: 0,
        retain: true,
        topic: topic.clone(),
        packet_id: 0,
        properties: Properties::default().into(),
        payload: Bytes::from_static(b"once"),
    };
    packet::encode(&Packet::Publish(p), V5, &mut b);
    w.shards[0].on_bytes(2, &mut b, 0);
    let mut b = BytesMut::new();
    packet::encode(&subscribe("r/#", 0), V5, &mut b);
    w.shards[1].on_bytes(1, &mut b, 0);
    w.settle();
    let got: Vec<Packet> = w.recv(1, 1, V5).into_iter().filter(|p| matches!(p, Packet::Publish(_))).collect();
    assert_eq!(got.len(), 1, "delivered live and again from the retained store: {got:?}");
}

/// A world of two shards holding `n` retained QoS 0 messages `ret/0` … (spread over both).
fn world_with_retained(n: usize, limits: Limits) -> World {
    world_of_with_retained(2, n, limits)
}

fn world_of_with_retained(shards: usize, n: usize, limits: Limits) -> World {
    let mut w = World::new(shards, limits);
    w.connect(0, 100, V5, "loader", true);
    let mut b = BytesMut::new();
    for i in 0..n {
        let p = Publish {
            dup: false,
            qos: 0,
            retain: true,
            topic: format!("ret/{i}"),
            packet_id: 0,
            properties: Properties::default().into(),
            payload: Bytes::from_static(b"r"),
        };
        packet::encode(&Packet::Publish(p), V5, &mut b);
    }
    w.shards[0].on_bytes(100, &mut b, 0);
    w.settle();
    assert_eq!(w.shards.iter().map(|s| s.retained.len()).sum::<usize>(), n);
    w
}

fn feed_backlog(w: &World, shard: ShardId, id: &str) -> usize {
    w.shards[shard].retained_feeds.get(id).map_or(0, |f| f.backlog.len())
}

/// The most a subscriber's retained backlog may hold: the low-water mark and a slice per owner.
const BACKLOG_MAX: usize = crate::retained_feed::BACKLOG_LOW + 2 * crate::retained_feed::SLICE_NODES;

#[test]
fn every_retained_message_reaches_a_qos0_subscriber_in_bounded_slices() {
    const N: usize = 100_000;
    let limits = Limits { max_outbound_buffer_bytes: 64 << 10, ..Limits::default() };
    let mut w = world_with_retained(N, limits);
    w.connect(1, 1, V5, "all", true);
    w.send(1, 1, V5, subscribe("ret/#", 0));
    let (mut got, mut max_backlog, mut rounds) = (std::collections::HashSet::new(), 0, 0);
    while got.len() < N && rounds < 100_000 {
        rounds += 1;
        max_backlog = max_backlog.max(feed_backlog(&w, 1, "all"));
        for p in w.recv(1, 1, V5) {
            if let Packet::Publish(p) = p {
                assert!(p.retain);
                assert!(got.insert(p.topic), "delivered twice");
            }
        }
    }
    assert_eq!(got.len(), N, "after {rounds} rounds");
    assert!(max_backlog <= BACKLOG_MAX, "backlog reached {max_backlog}");
    assert_eq!(w.shards[1].stats.dropped_slow_qos0, 0);
    assert!(w.shards[1].retained_feeds.is_empty(), "the feed ends with its request");
    assert_eq!(w.shards[0].retained_scans.open_count() + w.shards[1].retained_scans.open_count(), 0);
}

#[test]
fn every_retained_message_reaches_an_acknowledging_qos1_subscriber_without_overflowing_its_queue() {
    const N: usize = 100_000;
    let mut w = world_with_retained(N, Limits::default());
    // Stored at QoS 0 above; published again at QoS 1 (replacing them) for this test.
    let mut b = BytesMut::new();
    for i in 0..N {
        let p = Publish {
            dup: false,
            qos: 1,
            retain: true,
            topic: format!("ret/{i}"),
            packet_id: (i % 60_000 + 1) as u16,
            properties: Properties::default().into(),
            payload: Bytes::from_static(b"r1"),
        };
        packet::encode(&Packet::Publish(p), V5, &mut b);
    }
    w.shards[0].on_bytes(100, &mut b, 0);
    w.settle();
    w.recv(0, 100, V5);
    w.connect(1, 1, V5, "all1", true);
    w.send(1, 1, V5, subscribe("ret/#", 1));
    let (mut got, mut max_backlog, mut rounds) = (std::collections::HashSet::new(), 0, 0);
    while got.len() < N && rounds < 1_000_000 {
        rounds += 1;
        max_backlog = max_backlog.max(feed_backlog(&w, 1, "all1"));
        for p in w.recv(1, 1, V5) {
            if let Packet::Publish(p) = p {
                assert_eq!((p.qos, p.retain, &p.payload[..]), (1, true, &b"r1"[..]));
                assert!(got.insert(p.topic), "delivered twice");
                w.send(1, 1, V5, Packet::PubAck(resp(p.packet_id)));
            }
        }
    }
    assert_eq!(got.len(), N, "after {rounds} rounds");
    assert!(max_backlog <= BACKLOG_MAX, "backlog reached {max_backlog}");
    let s = &w.shards[1];
    assert_eq!(s.stats.dropped_queue_full, 0);
    assert!(s.sessions["all1"].queue.is_empty());
    assert!(s.drain.is_empty(), "the feed holds no publisher back");
}

#[test]
fn a_subscribe_with_many_filters_matching_nothing_is_cheap_and_answered() {
    let mut w = world_with_retained(100_000, Limits::default());
    w.connect(1, 1, V5, "many", true);
    let filters = (0..1000).map(|i| (format!("none/{i}/#"), SubOptions::default())).collect();
    let sub = Subscribe { packet_id: 9, filters, properties: Properties::default() };
    let mut b = BytesMut::new();
    packet::encode(&Packet::Subscribe(sub), V5, &mut b);
    let before = w.retained_turns;
    w.shards[1].on_bytes(1, &mut b, 0);
    w.settle();
    // One turn on each owner answers the whole SUBSCRIBE: its 1000 filters cost a node or two
    // each, not a pass over 100,000 messages.
    assert_eq!(w.retained_turns - before, 2);
    match w.recv(1, 1, V5).as_slice() {
        [Packet::SubAck(a)] => assert_eq!(a.codes.len(), 1000),
        o => panic!("{o:?}"),
    }
    assert!(w.shards[1].retained_feeds.is_empty());
}

#[test]
fn a_feed_blocked_on_its_output_buffer_asks_its_own_shard_for_more_once_it_drained() {
    // One shard: owner and subscriber are the same, so the credit is a local message.
    let limits = Limits { max_outbound_buffer_bytes: 4096, ..Limits::default() };
    let mut w = world_of_with_retained(1, 20_000, limits);
    w.connect(0, 1, V5, "self", true);
    w.send(0, 1, V5, subscribe("ret/#", 0));
    let mut got = 0;
    for _ in 0..100_000 {
        let n = w.recv(0, 1, V5).into_iter().filter(|p| matches!(p, Packet::Publish(_))).count();
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, 20_000);
}

#[test]
fn subscribes_during_a_retained_feed_are_served_after_it_one_request_at_a_time() {
    let mut w = world_with_retained(20_000, Limits { max_outbound_buffer_bytes: 4096, ..Limits::default() });
    w.connect(1, 1, V5, "twice", true);
    w.send(1, 1, V5, subscribe("ret/#", 0));
    w.send(1, 1, V5, subscribe("ret/7", 0));
    w.send(1, 1, V5, subscribe("ret/8", 0));
    let open = |w: &World| w.shards.iter().map(|s| s.retained_scans.open_count()).sum::<usize>();
    assert_eq!(open(&w), 2, "one request per session runs; the others wait at the subscriber");
    let mut got = Vec::new();
    for _ in 0..100_000 {
        let out = w.recv(1, 1, V5);
        if out.is_empty() && w.shards[1].retained_feeds.is_empty() {
            break;
        }
        got.extend(out.into_iter().filter_map(|p| if let Packet::Publish(p) = p { Some(p.topic) } else { None }));
    }
    assert_eq!(got.len(), 20_002);
    assert_eq!(got[20_000..].iter().filter(|t| *t == "ret/7" || *t == "ret/8").count(), 2, "the merged request last");
}

/// A subscriber to 20,000 retained messages that reads nothing (the owners hold their scans
/// open, waiting for credit) and then leaves: by `leave`.
fn retained_feed_cancelled_when(persistent: bool, leave: impl FnOnce(&mut World)) {
    let mut w = world_with_retained(20_000, Limits { max_outbound_buffer_bytes: 4096, ..Limits::default() });
    w.connect(1, 1, V5, "leaver", !persistent);
    w.send(1, 1, V5, subscribe("ret/#", 1));
    let open = |w: &World| w.shards.iter().map(|s| s.retained_scans.open_count()).sum::<usize>();
    assert_eq!(open(&w), 2);
    assert!(feed_backlog(&w, 1, "leaver") <= BACKLOG_MAX);
    leave(&mut w);
    w.settle();
    assert_eq!(open(&w), 0, "scans of a session that went away are dropped");
    assert!(w.shards.iter().all(|s| s.retained_feeds.is_empty()));
}

#[test]
fn a_retained_feed_is_cancelled_when_its_session_ends() {
    retained_feed_cancelled_when(false, |w| w.shards[1].on_lost(1, 0));
}

#[test]
fn a_retained_feed_is_cancelled_when_its_session_moves_to_another_shard() {
    retained_feed_cancelled_when(true, |w| {
        w.connect(0, 7, V5, "leaver", false);
    });
}

#[test]
fn kafka_ack_spills_what_times_out_and_keeps_order_across_the_switch() {
    use crate::bridge::MappingConfig;
    let m: MappingConfig =
        toml::from_str("name = \"k\"\nfilters = [\"k/#\"]\ndestinations = [{ cluster = \"c\", topic = \"t\" }]")
            .unwrap();
    let router = crate::bridge::Router::new(&[m], &["c".to_string()]).unwrap();
    let options = BridgeOptions {
        router,
        delivery: crate::bridge::Delivery::KafkaAck,
        max_pending_records: 100,
        qos0_policy: Default::default(),
        spill_on_timeout: true,
    };
    let mut shard = Shard::new(0, 1, Limits::default(), 0).with_bridge(options);
    shard.on_open(1, 0);
    let feed = |shard: &mut Shard, p: Packet| {
        let mut b = BytesMut::new();
        packet::encode(&p, V5, &mut b);
        shard.on_bytes(1, &mut b, 0);
        shard.drain_effects().produce
    };
    let ids = |v: &[ProduceRequest]| v.iter().map(|r| (r.id, r.durable)).collect::<Vec<_>>();
    // A time-out as the Kafka side reports it: the record handed back with it.
    let timed_out = |r: &ProduceRequest| ProduceResult {
        timed_out: Some(Box::new(r.record.clone())),
        ..ProduceResult::failed(r.id, ProduceError::TimedOut)
    };
    let connect = Connect {
        version: V5,
        clean_start: true,
        keep_alive: 0,
        client_id: "dev".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    feed(&mut shard, Packet::Connect(Box::new(connect)));
    let acks = |shard: &mut Shard| -> Vec<u16> {
        let mut out = shard.take_output(1).unwrap_or_default();
        let mut pids = Vec::new();
        while let Some(p) = packet::decode(&mut out, Some(V5), usize::MAX).unwrap() {
            if let Packet::PubAck(r) = p {
                assert_eq!(r.code, 0);
                pids.push(r.packet_id);
            }
        }
        pids
    };
    acks(&mut shard);
    let ra = feed(&mut shard, publish("k/1", 1, 1, b"a"));
    let rb = feed(&mut shard, publish("k/1", 1, 2, b"b"));
    assert!(matches!((ids(&ra).as_slice(), ids(&rb).as_slice()), ([(_, false)], [(_, false)])), "straight to Kafka");
    let (a, b) = (ra[0].id, rb[0].id);
    // Kafka timed out on the first: it goes to the spill log; the shard is spilling now.
    shard.on_produce_results([timed_out(&ra[0])], 0);
    assert_eq!(shard.drain_effects().produce.iter().map(|r| (r.id, r.durable)).collect::<Vec<_>>(), [(a, true)]);
    assert!(shard.kafka_spilling());
    // A new record waits behind the one still in flight (it may time out and spill too).
    assert!(feed(&mut shard, publish("k/1", 1, 3, b"c")).is_empty());
    shard.on_durable(&[a], Ok(()), 0);
    assert_eq!(acks(&mut shard), [1]);
    shard.on_produce_results([timed_out(&rb[0])], 0);
    let spilled: Vec<(u64, bool)> = shard.drain_effects().produce.iter().map(|r| (r.id, r.durable)).collect();
    assert_eq!(spilled.len(), 2);
    assert_eq!(spilled[0], (b, true), "the timed-out record before the held one");
    assert!(spilled[1].1);
    shard.on_durable(&[b, spilled[1].0], Ok(()), 0);
    assert_eq!(acks(&mut shard), [2, 3]);
    // The log drained: acknowledgements wait for Kafka again.
    shard.end_spilling();
    assert!(!shard.kafka_spilling());
    assert!(matches!(ids(&feed(&mut shard, publish("k/1", 1, 4, b"d"))).as_slice(), [(_, false)]));
    assert!(acks(&mut shard).is_empty());
}

/// A subscriber with a window of one on `sub_shard` and a publisher on shard 0, sessions
/// stored as in the broker (so every QoS 1 publish asks the other shard for a receipt).
fn slow_subscriber_holds_back_the_publisher(sub_shard: ShardId) {
    let limits = Limits { max_queued_messages: 8, max_inflight: 1, ..Limits::default() };
    let mut w = World::new(2, limits.clone());
    w.shards = (0..2).map(|i| Shard::new(i, 2, limits.clone(), 0).with_session_store()).collect();
    w.connect(sub_shard, 1, V5, "slow", true);
    w.send(sub_shard, 1, V5, subscribe("bp", 1));
    w.recv(sub_shard, 1, V5);
    w.connect(0, 2, V5, "fast", true);
    // One message in flight (window 1), then the queue: past half full (4) acks are held.
    for pid in 1..=8u16 {
        w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
    }
    let acks = |w: &mut World| -> Vec<u16> {
        w.recv(0, 2, V5)
            .into_iter()
            .filter_map(|p| if let Packet::PubAck(r) = p { Some(r.packet_id) } else { None })
            .collect()
    };
    assert_eq!(acks(&mut w), vec![1, 2, 3, 4], "acks after the queue passed half full must wait");
    assert_eq!(w.shards[sub_shard].stats.dropped_queue_full, 0);
    // The subscriber catches up: once its queue is a quarter full, the held acks go out, in order.
    let mut released = Vec::new();
    for _ in 0..8 {
        let pid = match w.recv(sub_shard, 1, V5).as_slice() {
            [Packet::Publish(p)] => p.packet_id,
            o => panic!("{o:?}"),
        };
        w.send(sub_shard, 1, V5, Packet::PubAck(resp(pid)));
        released.extend(acks(&mut w));
    }
    assert_eq!(released, vec![5, 6, 7, 8]);
}

/// A subscriber that never acknowledges holds publishers back for `max_backpressure_ms`
/// once; then they stop waiting for it (its queue drops instead), until it has drained.
fn a_silent_subscriber_holds_back_publishers_for_the_bound_only(sub_shard: ShardId) {
    let limits = Limits { max_queued_messages: 8, max_inflight: 1, max_backpressure_ms: 1000, ..Limits::default() };
    let mut w = World::new(2, limits.clone());
    w.shards = (0..2).map(|i| Shard::new(i, 2, limits.clone(), 0).with_session_store()).collect();
    w.connect(sub_shard, 1, V5, "silent", true);
    w.send(sub_shard, 1, V5, subscribe("bp", 1));
    w.recv(sub_shard, 1, V5);
    w.connect(0, 2, V5, "publisher", true);
    let acks = |w: &mut World| -> Vec<u16> {
        w.recv(0, 2, V5)
            .into_iter()
            .filter_map(|p| if let Packet::PubAck(r) = p { Some(r.packet_id) } else { None })
            .collect()
    };
    let tick = |w: &mut World, now: u64| {
        w.now = now;
        for i in 0..2 {
            w.shards[i].tick(now, 0);
        }
        w.settle();
    };
    for pid in 1..=8u16 {
        w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
    }
    assert_eq!(acks(&mut w), vec![1, 2, 3, 4]);
    tick(&mut w, 100);
    tick(&mut w, 900);
    assert_eq!(acks(&mut w), Vec::<u16>::new(), "held within the bound");
    tick(&mut w, 1100);
    assert_eq!(acks(&mut w), vec![5, 6, 7, 8], "released once the bound passed");
    // From now on nobody waits for it: its queue drops by its policy instead.
    for pid in 9..=30u16 {
        w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
    }
    assert_eq!(acks(&mut w), (9..=30).collect::<Vec<u16>>());
    assert!(w.shards[sub_shard].stats.dropped_queue_full > 0);
    assert_eq!(w.shards[sub_shard].stats.slow_subscribers, 1);
    // It catches up and drains: publishers wait for it again.
    loop {
        let got = w.recv(sub_shard, 1, V5);
        let Some(Packet::Publish(p)) = got.first() else { break };
        let pid = p.packet_id;
        w.send(sub_shard, 1, V5, Packet::PubAck(resp(pid)));
    }
    for pid in 31..=38u16 {
        w.send(0, 2, V5, publish("bp", 1, pid, b"m"));
    }
    assert_eq!(acks(&mut w), vec![31, 32, 33, 34], "held again after it drained");
}

#[test]
fn a_silent_subscriber_holds_back_publishers_on_its_shard_for_the_bound_only() {
    a_silent_subscriber_holds_back_publishers_for_the_bound_only(0);
}

#[test]
fn a_silent_subscriber_holds_back_publishers_on_another_shard_for_the_bound_only() {
    a_silent_subscriber_holds_back_publishers_for_the_bound_only(1);
}

#[test]
fn a_filling_subscriber_queue_holds_back_the_publishers_acknowledgements() {
    slow_subscriber_holds_back_the_publisher(0);
}

#[test]
fn a_filling_subscriber_queue_on_another_shard_holds_back_the_publishers_acknowledgements() {
    slow_subscriber_holds_back_the_publisher(1);
}

#[test]
fn a_full_output_buffer_holds_qos1_messages_in_the_queue_until_it_drains() {
    let limits = Limits { max_outbound_buffer_bytes: 1000, max_inflight: 100, ..Limits::default() };
    let mut w = World::new(1, limits);
    w.connect(0, 1, V5, "reader", true);
    w.send(0, 1, V5, subscribe("ob", 1));
    w.recv(0, 1, V5);
    w.connect(0, 2, V5, "writer", true);
    for pid in 1..=20u16 {
        let body: &'static [u8] = Box::leak(vec![pid as u8; 300].into_boxed_slice());
        w.send(0, 2, V5, publish("ob", 1, pid, body));
    }
    // The window (100) has room, but the buffer stops taking messages past 1000 bytes: four
    // ~310-byte PUBLISHes, the rest queued. Each time the output goes out, four more follow.
    let mut got = Vec::new();
    for round in 0..5 {
        let batch: Vec<u8> = w
            .recv(0, 1, V5)
            .into_iter()
            .filter_map(|p| if let Packet::Publish(p) = p { Some(p.payload[0]) } else { None })
            .collect();
        assert_eq!(batch.len(), 4, "round {round}: {batch:?}");
        got.extend(batch);
    }
    assert_eq!(got, (1..=20).collect::<Vec<u8>>(), "every message, in order");
    assert!(w.recv(0, 1, V5).is_empty());
    assert_eq!(w.shards[0].stats.dropped_queue_full, 0);
}

#[test]
fn will_survives_a_connection_lost_before_its_connack() {
    let mut w = World::new(2, Limits::default());
    w.connect(0, 1, V5, "watcher", true);
    w.send(0, 1, V5, subscribe("will/#", 0));
    w.recv(0, 1, V5);
    // Find a client id whose directory shard is the other one, so the CONNECT stays pending.
    let id = (0..).map(|i| format!("c{i}")).find(|id| directory_shard(id, 2) == 0).unwrap();
    w.shards[1].on_open(5, 0);
    let c = Connect {
        version: V5,
        clean_start: true,
        keep_alive: 0,
        client_id: id,
        will: Some(Will {
            topic: "will/x".into(),
            payload: Bytes::from_static(b"w"),
            qos: 0,
            retain: false,
            properties: Properties::default(),
        }),
        username: None,
        password: None,
        properties: Properties::default(),
    };
    let mut b = BytesMut::new();
    packet::encode(&Packet::Connect(Box::new(c)), V5, &mut b);
    w.shards[1].on_bytes(5, &mut b, 0);
    assert!(w.shards[1].is_pending(5));
    w.shards[1].on_lost(5, 0);
    w.settle();
    assert!(matches!(w.recv(0, 1, V5).as_slice(), [Packet::Publish(p)] if p.topic == "will/x"));
    assert!(!w.shards[1].conns.contains_key(&5));
}

#[test]
fn packets_pipelined_behind_connect_are_handled_in_order() {
    let mut w = World::new(2, Limits::default());
    w.shards[1].on_open(1, 0);
    let mut b = BytesMut::new();
    let c = Connect {
        version: V5,
        clean_start: true,
        keep_alive: 0,
        client_id: "pipelined".into(), // its directory shard may be the other one
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    packet::encode(&Packet::Connect(Box::new(c)), V5, &mut b);
    packet::encode(&subscribe("p", 0), V5, &mut b);
    packet::encode(&Packet::PingReq, V5, &mut b);
    w.shards[1].on_bytes(1, &mut b, 0);
    w.settle();
    let got = w.recv(1, 1, V5);
    let names: Vec<&str> = got.iter().map(Packet::name).collect();
    assert_eq!(names, ["CONNACK", "SUBACK", "PINGRESP"]);
}

/// A tiny deterministic generator for interleavings (xorshift64*).
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

/// Shard messages in flight, one FIFO per ordered pair of shards (as the mesh keeps them),
/// delivered one at a time from a pair the generator picks: every interleaving the real
/// mesh allows can happen here.
struct Mesh {
    queues: HashMap<(ShardId, ShardId), VecDeque<ShardMsg>>,
}

impl Mesh {
    fn collect(&mut self, w: &mut World) {
        for i in 0..w.shards.len() {
            let fx = w.shards[i].drain_effects();
            for c in fx.close {
                w.closed.insert((i, c));
            }
            for (to, m) in fx.to_shards {
                self.queues.entry((i, to)).or_default().push_back(m);
            }
        }
    }

    /// Delivers one message, if any is in flight.
    fn step(&mut self, w: &mut World, rng: &mut Rng) -> bool {
        let busy: Vec<(ShardId, ShardId)> =
            self.queues.iter().filter(|(_, q)| !q.is_empty()).map(|(k, _)| *k).collect();
        if busy.is_empty() {
            return false;
        }
        let mut keys = busy;
        keys.sort_unstable();
        let (from, to) = keys[rng.below(keys.len())];
        let m = self.queues.get_mut(&(from, to)).and_then(VecDeque::pop_front);
        if let Some(m) = m {
            w.shards[to].on_shard_msgs([m], w.now);
        }
        self.collect(w);
        true
    }
}

fn bytes_of(p: Packet, v: Version) -> BytesMut {
    let mut b = BytesMut::new();
    packet::encode(&p, v, &mut b);
    b
}

/// Two devices share one client id, each looping CONNECT → SUBSCRIBE → PUBLISH → close on its
/// own shard while shard messages interleave in every order the mesh allows. No shard may
/// panic, and once all is quiet at most one shard hosts the session, which the directory
/// names, with at most one connection.
#[test]
fn clients_sharing_an_id_race_across_shards_without_breaking_the_session_rule() {
    for seed in 1..400u64 {
        for v in [Version::V311, V5] {
            let n = 3;
            let mut w = World::new(n, Limits::default());
            w.shards = (0..n).map(|i| Shard::new(i, n, Limits::default(), 0).with_session_store()).collect();
            let mut mesh = Mesh { queues: HashMap::default() };
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut next_conn: ConnId = 1;
            // Per device: (shard, open connection, packets sent on it).
            let mut devices: Vec<(ShardId, Option<ConnId>, u32)> = vec![(0, None, 0), (1, None, 0), (2, None, 0)];
            for _ in 0..60 {
                let d = rng.below(devices.len() + 2);
                if d >= devices.len() {
                    for _ in 0..rng.below(4) + 1 {
                        mesh.step(&mut w, &mut rng);
                    }
                    continue;
                }
                let (shard, conn, sent) = devices[d];
                match conn {
                    None => {
                        let c = next_conn;
                        next_conn += 1;
                        w.shards[shard].on_open(c, w.now);
                        let clean = rng.below(2) == 0;
                        let connect = Connect {
                            version: v,
                            clean_start: clean,
                            keep_alive: 0,
                            client_id: "twin".into(),
                            will: None,
                            username: None,
                            password: None,
                            properties: Properties {
                                session_expiry_interval: (!clean && v == V5).then_some(60),
                                ..Default::default()
                            },
                        };
                        w.shards[shard].on_bytes(c, &mut bytes_of(Packet::Connect(Box::new(connect)), v), w.now);
                        devices[d] = (shard, Some(c), 0);
                    }
                    Some(c) if sent >= 3 || rng.below(4) == 0 => {
                        w.shards[shard].on_lost(c, w.now);
                        devices[d] = (shard, None, 0);
                    }
                    Some(c) => {
                        let p = match rng.below(3) {
                            0 => subscribe("twin/#", 1),
                            1 => publish("twin/x", 1, 7, b"x"),
                            _ => Packet::Unsubscribe(Unsubscribe {
                                packet_id: 2,
                                filters: vec!["twin/#".into()],
                                properties: Properties::default(),
                            }),
                        };
                        w.shards[shard].on_bytes(c, &mut bytes_of(p, v), w.now);
                        devices[d] = (shard, Some(c), sent + 1);
                    }
                }
                mesh.collect(&mut w);
            }
            while mesh.step(&mut w, &mut rng) {}
            for i in 0..n {
                let _ = w.shards[i].take_session_changes();
                w.shards[i].on_sessions_synced(u64::MAX, true, w.now);
                mesh.collect(&mut w);
            }
            while mesh.step(&mut w, &mut rng) {}
            let hosts: Vec<ShardId> = (0..n).filter(|i| w.shards[*i].sessions.contains_key("twin")).collect();
            assert!(hosts.len() <= 1, "seed {seed} {v:?}: session hosted on {hosts:?}");
            let dir = &w.shards[directory_shard("twin", n)].directory;
            if let Some(h) = hosts.first() {
                assert_eq!(dir.host("twin"), Some(*h), "seed {seed} {v:?}: directory");
            }
            for s in &w.shards {
                for c in s.conns.values() {
                    if let ConnState::Active { client_id: id } = &c.state {
                        assert!(s.sessions.contains_key(id), "seed {seed} {v:?}: active connection without session");
                    }
                }
            }
        }
    }
}

/// An encoded 3.1.1 CONNECT whose client id is `id_len` bytes long.
fn connect_bytes(id_len: usize) -> BytesMut {
    let c = Connect {
        version: Version::V311,
        clean_start: true,
        keep_alive: 60,
        client_id: "c".repeat(id_len),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    let mut b = BytesMut::new();
    packet::encode(&Packet::Connect(Box::new(c)), Version::V311, &mut b);
    b
}

#[test]
fn the_connect_deadline_counts_from_accept_not_from_the_last_byte() {
    let mut w = World::new(1, Limits { connect_timeout_ms: 1000, ..Limits::default() });
    let connect = connect_bytes(100);
    // Conn 1 drips its CONNECT a byte every 100 ms; conn 2 sends all of its at 900 ms.
    w.shards[0].on_open(1, 0);
    w.shards[0].on_open(2, 0);
    let mut dripped = BytesMut::new();
    let mut closed_at = None;
    for (i, t) in (0..=2000).step_by(100).enumerate() {
        w.now = t;
        if closed_at.is_none() {
            dripped.extend_from_slice(&connect[i..i + 1]);
            w.shards[0].on_bytes(1, &mut dripped, t);
        }
        if t == 900 {
            w.shards[0].on_bytes(2, &mut connect.clone(), t);
        }
        w.shards[0].tick(t, 0);
        w.settle();
        if closed_at.is_none() && w.closed.contains(&(0, 1)) {
            closed_at = Some(t);
        }
    }
    // Scanned every 500 ms: closed at the first scan at or after the deadline.
    assert_eq!(closed_at, Some(1000));
    assert!(!w.closed.contains(&(0, 2)), "a connection that completed CONNECT in time stays");
    assert!(matches!(w.recv(0, 2, Version::V311).first(), Some(Packet::ConnAck(a)) if a.code == 0));
    let st = w.shards[0].stats();
    assert_eq!((st.connect_timeouts, st.preconnect_connections, st.preconnect_bytes), (1, 0, 0));
}

#[test]
fn partial_connects_share_the_shard_budget_and_a_large_connect_is_refused_from_its_header() {
    let limits =
        Limits { max_connect_packet_bytes: 4096, max_preconnect_buffer_bytes_per_shard: 8192, ..Limits::default() };
    let mut w = World::new(1, limits);
    let connect = connect_bytes(3500);
    let mut bufs: Vec<BytesMut> = (0..4).map(|_| BytesMut::from(&connect[..3000])).collect();
    for (conn, b) in bufs.iter_mut().enumerate().take(3) {
        w.shards[0].on_open(conn as u64, 0);
        w.shards[0].on_bytes(conn as u64, b, 0);
    }
    w.settle();
    // Two fit (6000 bytes); the third would take the shard past 8192: closed, its buffer dropped.
    assert_eq!(w.closed, [(0, 2)].into_iter().collect());
    assert!(bufs[2].is_empty());
    let st = w.shards[0].stats();
    assert_eq!(st.refused_preconnect, 1);
    assert_eq!(st.preconnect_bytes as usize, bufs[0].capacity() + bufs[1].capacity());
    assert_eq!(st.preconnect_connections, 2);
    // Conn 0 completes its CONNECT: it no longer counts, and a new one fits.
    bufs[0].extend_from_slice(&connect[3000..]);
    w.shards[0].on_bytes(0, &mut bufs[0], 0);
    w.shards[0].on_open(3, 0);
    w.shards[0].on_bytes(3, &mut bufs[3], 0);
    w.settle();
    assert!(!w.closed.contains(&(0, 3)));
    assert!(matches!(w.recv(0, 0, Version::V311).first(), Some(Packet::ConnAck(_))));
    assert_eq!(w.shards[0].stats().preconnect_connections, 2);
    // A CONNECT announcing more than max_connect_packet_bytes: refused from its 4-byte fixed
    // header, nothing buffered.
    let mut big = BytesMut::from(&connect_bytes(5000)[..4]);
    w.shards[0].on_open(4, 0);
    w.shards[0].on_bytes(4, &mut big, 0);
    w.settle();
    assert!(w.closed.contains(&(0, 4)) && big.is_empty());
    // Closing and losing connections gives their bytes back.
    w.shards[0].on_lost(1, 0);
    w.shards[0].on_lost(3, 0);
    w.shards[0].on_lost(2, 0);
    w.shards[0].on_lost(4, 0);
    let st = w.shards[0].stats();
    assert_eq!((st.preconnect_connections, st.preconnect_bytes), (0, 0));
}

#[test]
fn unauthenticated_connections_per_address_are_capped() {
    let mut w = World::new(1, Limits { max_preconnect_per_address: 2, ..Limits::default() });
    let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
    let sh = &mut w.shards[0];
    for conn in [1, 2] {
        assert!(sh.admit_from(a));
        sh.on_open_from(conn, a, 0);
    }
    assert!(!sh.admit_from(a));
    assert!(!sh.admit_from(a));
    assert!(sh.admit_from(b));
    let fx = sh.drain_effects();
    assert_eq!(fx.warnings.len(), 1, "logged once per episode: {:?}", fx.warnings);
    assert_eq!(sh.stats().refused_preconnect, 2);
    // Completing CONNECT frees the place.
    sh.on_bytes(1, &mut connect_bytes(5), 0);
    assert!(sh.admit_from(a));
}

/// 3.1.1 has no Receive Maximum: QoS 2 publishes beyond `max_inflight` unreleased ones wait
/// (flow control) instead of closing the connection; what was accepted is acknowledged, and
/// everything is delivered once, in order.
#[test]
fn a_311_client_past_the_qos2_window_is_flow_controlled_not_disconnected() {
    let v = Version::V311;
    let limits = Limits { max_inflight: 2, ..Limits::default() };
    let mut w = World::new(2, limits);
    w.connect(1, 9, v, "reader", true);
    w.send(1, 9, v, subscribe("q2", 2));
    w.recv(1, 9, v);
    w.connect(0, 1, v, "writer", true);
    let mut b = BytesMut::new();
    for pid in 1..=4u16 {
        packet::encode(&publish("q2", 2, pid, b"m"), v, &mut b);
    }
    packet::encode(&Packet::PingReq, v, &mut b);
    packet::encode(&publish("q2", 2, 5, b"m"), v, &mut b);
    w.shards[0].on_bytes(1, &mut b, 0);
    w.settle();
    let names = |ps: Vec<Packet>| -> Vec<String> {
        ps.iter()
            .map(|p| match p {
                Packet::PubRec(r) => format!("PUBREC {}", r.packet_id),
                Packet::PubComp(r) => format!("PUBCOMP {}", r.packet_id),
                o => o.name().to_string(),
            })
            .collect()
    };
    // 3 and 4 fill the (tiny) deferral queue; the ping passes them, 5 waits in the input.
    assert_eq!(names(w.recv(0, 1, v)), ["PUBREC 1", "PUBREC 2", "PINGRESP"]);
    assert!(!w.closed.contains(&(0, 1)));
    w.send(0, 1, v, Packet::PubRel(resp(1)));
    assert_eq!(names(w.recv(0, 1, v)), ["PUBCOMP 1", "PUBREC 3"]);
    w.send(0, 1, v, Packet::PubRel(resp(2)));
    assert_eq!(names(w.recv(0, 1, v)), ["PUBCOMP 2", "PUBREC 4"]);
    w.send(0, 1, v, Packet::PubRel(resp(3)));
    assert_eq!(names(w.recv(0, 1, v)), ["PUBCOMP 3", "PUBREC 5"]);
    // The reader gets all five, once each (acknowledging as it goes).
    let mut got = Vec::new();
    for _ in 0..12 {
        for p in w.recv(1, 9, v) {
            match p {
                Packet::Publish(m) => {
                    got.push(m.payload.clone());
                    w.send(1, 9, v, Packet::PubRec(resp(m.packet_id)));
                }
                Packet::PubRel(r) => w.send(1, 9, v, Packet::PubComp(resp(r.packet_id))),
                _ => {}
            }
        }
    }
    assert_eq!(got.len(), 5);
}

/// Two shards with Kafka → MQTT on (sessions stored as in the broker), queues of 8 and a
/// window of 1: a burst from Kafka is many times what a queue holds.
fn kafka_world(max_wait_ms: u64) -> World {
    use crate::inbound::{InboundMappingConfig, PayloadSource, StartAt};
    let limits = Limits { max_queued_messages: 8, max_inflight: 1, ..Limits::default() };
    let cfg = InboundMappingConfig {
        name: "cmd".into(),
        cluster: "c".into(),
        kafka_topics: vec!["t".into()],
        kafka_topic_pattern: None,
        mqtt_topics: vec!["d/${key}".into()],
        payload: PayloadSource::Value,
        qos: 1,
        retain: false,
        start: StartAt::Earliest,
        schema: None,
        registry: None,
        mode: None,
        subject: None,
        internal: None,
    };
    let mut w = World::new(2, limits.clone());
    w.shards = (0..2)
        .map(|i| {
            let inbound = Inbound::new(std::slice::from_ref(&cfg), &["c".to_string()]).unwrap();
            Shard::new(i, 2, limits.clone(), 0).with_session_store().with_inbound(inbound, 1, max_wait_ms)
        })
        .collect();
    w
}

/// `n` records of partition 0, keys k0 and k1 in turn, values their offsets.
fn kafka_burst(n: i64) -> Vec<InboundRecord> {
    (0..n)
        .map(|o| InboundRecord {
            mapping: 0,
            topic: "t".into(),
            partition: 0,
            offset: o,
            key: Some(Bytes::from(format!("k{}", o % 2))),
            value: Some(Bytes::from(o.to_string())),
            headers: Vec::new(),
        })
        .collect()
}

/// What a subscriber got (payloads), each acknowledged when `ack`.
fn take_kafka_messages(w: &mut World, shard: ShardId, conn: ConnId, ack: bool) -> Vec<i64> {
    let mut got = Vec::new();
    for p in w.recv(shard, conn, V5) {
        if let Packet::Publish(p) = p {
            got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
            if ack {
                w.send(shard, conn, V5, Packet::PubAck(resp(p.packet_id)));
            }
        }
    }
    got
}

fn stored_position(w: &mut World) -> Option<i64> {
    w.shards[0].take_positions().and_then(|p| p.get(&("cmd".to_string(), "t".to_string(), 0)).copied())
}

#[test]
fn a_kafka_burst_is_routed_in_slices_that_fit_the_receivers_queues() {
    let mut w = kafka_world(60_000);
    // "all" on the consuming shard gets every key; "odd" on the other shard only k1.
    w.connect(0, 1, V5, "all", true);
    w.send(0, 1, V5, subscribe("d/+", 1));
    w.recv(0, 1, V5);
    w.connect(1, 2, V5, "odd", true);
    w.send(1, 2, V5, subscribe("d/k1", 1));
    w.recv(1, 2, V5);
    w.shards[0].on_kafka_records(kafka_burst(80), w.now);
    w.settle();
    assert!(w.shards[0].kafka_records_waiting(), "a burst of 10 queues' worth waits for room");
    let early = stored_position(&mut w).unwrap_or(0);
    assert!(early < 80, "the position waits for what is not delivered: {early}");
    let (mut all, mut odd) = (Vec::new(), Vec::new());
    for _ in 0..1000 {
        all.extend(take_kafka_messages(&mut w, 0, 1, true));
        odd.extend(take_kafka_messages(&mut w, 1, 2, true));
        w.shards[0].feed_kafka_records(w.now);
        w.settle();
        if all.len() == 80 && odd.len() == 40 {
            break;
        }
    }
    assert_eq!(all, (0..80).collect::<Vec<_>>(), "every record, in order");
    assert_eq!(odd, (0..80).filter(|o| o % 2 == 1).collect::<Vec<_>>());
    assert_eq!(w.shards[0].stats.dropped_queue_full + w.shards[1].stats.dropped_queue_full, 0);
    assert!(!w.shards[0].kafka_records_waiting());
    assert_eq!(stored_position(&mut w), Some(80), "the position moved past every record");
}

#[test]
fn a_receiver_that_takes_nothing_holds_kafka_records_back_only_for_the_max_wait() {
    let mut w = kafka_world(1000);
    w.connect(0, 1, V5, "live", true);
    w.send(0, 1, V5, subscribe("d/+", 1));
    w.recv(0, 1, V5);
    // On the other shard, a subscriber that never acknowledges: its queue fills.
    w.connect(1, 2, V5, "stuck", true);
    w.send(1, 2, V5, subscribe("d/+", 1));
    w.recv(1, 2, V5);
    w.shards[0].on_kafka_records(kafka_burst(40), w.now);
    w.settle();
    let mut live = Vec::new();
    for _ in 0..100 {
        live.extend(take_kafka_messages(&mut w, 0, 1, true));
        take_kafka_messages(&mut w, 1, 2, false);
        if live.len() == 40 {
            break;
        }
        w.now += 100;
        for s in &mut w.shards {
            s.tick(w.now, 0);
        }
        w.shards[0].feed_kafka_records(w.now);
        w.settle();
    }
    assert!(w.now >= 1000, "the stuck receiver held the records back first ({} ms)", w.now);
    assert_eq!(live, (0..40).collect::<Vec<_>>(), "the other receiver gets every record, in order");
    assert_eq!(w.shards[1].feed.receivers_skipped, 1);
    assert!(w.shards[1].stats.dropped_queue_full > 0, "the stuck receiver's queue followed its policy");
    assert_eq!(w.shards[0].stats.dropped_queue_full, 0);
    assert_eq!(stored_position(&mut w), Some(40));
}

#[test]
fn an_offline_receiver_that_moves_to_another_shard_lets_the_held_kafka_records_go() {
    let mut w = kafka_world(60_000);
    let mut store = HashMap::default();
    // A persistent session on shard 1, offline: its queue fills to half and holds the feed.
    w.connect(1, 2, V5, "dev", false);
    w.send(1, 2, V5, subscribe("d/+", 1));
    w.recv(1, 2, V5);
    w.shards[1].on_lost(2, w.now);
    w.settle();
    w.shards[0].on_kafka_records(kafka_burst(40), w.now);
    w.settle();
    for _ in 0..10 {
        commit_sessions(&mut w, &mut store);
        w.shards[0].feed_kafka_records(w.now);
        w.settle();
    }
    assert!(w.shards[0].kafka_records_waiting());
    assert!(!w.shards[1].feed.held.is_empty(), "shard 1 holds its answer for the offline session");
    // It comes back on shard 0: the session moves, and what shard 1 held for it must go.
    let mut got = Vec::new();
    for p in w.connect_all(0, 3, V5, "dev", false) {
        if let Packet::Publish(p) = p {
            got.push(std::str::from_utf8(&p.payload).unwrap().parse().unwrap());
            w.send(0, 3, V5, Packet::PubAck(resp(p.packet_id)));
        }
    }
    for _ in 0..100 {
        got.extend(take_kafka_messages(&mut w, 0, 3, true));
        if got.len() == 40 {
            break;
        }
        w.now += 100;
        for s in &mut w.shards {
            s.tick(w.now, 0);
        }
        w.shards[0].feed_kafka_records(w.now);
        w.settle();
        commit_sessions(&mut w, &mut store);
    }
    assert_eq!(got, (0..40).collect::<Vec<_>>(), "every record, in order");
    assert!(w.now < 60_000, "released when the session left, not by the time bound");
    assert_eq!(w.shards[0].stats.dropped_queue_full + w.shards[1].stats.dropped_queue_full, 0);
    assert_eq!(w.shards[0].feed.receivers_skipped + w.shards[1].feed.receivers_skipped, 0);
}

/// The fuzz target's world on pseudo-random inputs, so that stable CI runs it too (the
/// coverage-guided run is `scripts/fuzz`).
#[test]
fn the_simulated_broker_keeps_its_invariants_on_random_action_streams() {
    let mut rng = Rng(0x5eed);
    for _ in 0..3000 {
        let len = rng.below(400);
        let data: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
        sim::Sim::run(&data);
    }
}

// ---- authentication and authorization (access.rs) ----

/// alice / "s3cret pass" and bob / "hunter2", as `mosquitto_passwd` wrote them; devices may use
/// `devices/<client id>/#` only.
fn access_world(allow_anonymous: bool) -> World {
    const PASSWORDS: &str = "alice:$7$101$THB+U8AF19njwmXp$CruZM9nC4FKYpcWYdtxYAxKu7pzsSBvnI4qseWBD8+d2GyUPopm5/iPKHzSQQfNvnYIu2xTkDkuVLfS6/21IYQ==\nbob:$7$101$dUDH0dTKhLySJ1yG$vzIqRqLSbqYzQ0hgMSTd/osFqnaAbpAiDyMgo39qjn2fEHIcanDpZe1JoDoLo5gdxcjv/Kc1VWJsOvte9qUyoA==\n";
    let rules = Arc::new(AccessRules {
        allow_anonymous,
        // Listener 1 takes clients without credentials.
        anonymous_listeners: vec![false, true],
        passwords: Some(crate::auth::PasswordFile::parse(PASSWORDS).unwrap()),
        acl: Some(crate::auth::Acl::parse_mosquitto("pattern readwrite devices/%c/#\n").unwrap()),
        jwt: None,
        generation: 1,
    });
    let mut w = World::new(2, Limits::default());
    for s in &mut w.shards {
        s.set_access(rules.clone(), 100, 60_000);
    }
    w
}

/// CONNECT from address 10.0.0.`conn`; the CONNACK's code (0xff: none yet).
fn connect_as(w: &mut World, shard: ShardId, conn: ConnId, id: &str, user: Option<&str>, pw: Option<&str>) -> u8 {
    connect_from(w, shard, conn, &format!("10.0.0.{conn}"), id, user, pw)
}

fn connect_from(
    w: &mut World,
    shard: ShardId,
    conn: ConnId,
    addr: &str,
    id: &str,
    user: Option<&str>,
    pw: Option<&str>,
) -> u8 {
    connect_on(w, shard, conn, addr, 0, id, user, pw)
}

/// [`connect_from`], accepted by `listener`.
#[allow(clippy::too_many_arguments)]
fn connect_on(
    w: &mut World,
    shard: ShardId,
    conn: ConnId,
    addr: &str,
    listener: u16,
    id: &str,
    user: Option<&str>,
    pw: Option<&str>,
) -> u8 {
    w.shards[shard].on_open_from(conn, addr.parse().unwrap(), w.now);
    w.shards[shard].set_origin(conn, listener, None);
    let c = Connect {
        version: V5,
        clean_start: true,
        keep_alive: 0,
        client_id: id.into(),
        will: None,
        username: user.map(Into::into),
        password: pw.map(|p| Bytes::copy_from_slice(p.as_bytes())),
        properties: Properties::default(),
    };
    w.send(shard, conn, V5, Packet::Connect(Box::new(c)));
    match w.recv(shard, conn, V5).first() {
        Some(Packet::ConnAck(a)) => a.code,
        Some(o) => panic!("{o:?}"),
        None => 0xff,
    }
}

#[test]
fn a_client_connects_only_with_its_password_and_anonymous_clients_only_when_allowed() {
    let mut w = access_world(false);
    assert_eq!(connect_as(&mut w, 0, 1, "c1", Some("alice"), Some("s3cret pass")), reason::SUCCESS);
    assert_eq!(connect_as(&mut w, 1, 2, "c2", Some("bob"), Some("wrong")), reason::BAD_USERNAME_OR_PASSWORD);
    assert_eq!(connect_as(&mut w, 1, 3, "c3", Some("mallory"), Some("x")), reason::BAD_USERNAME_OR_PASSWORD);
    assert_eq!(connect_as(&mut w, 1, 4, "c4", None, None), reason::NOT_AUTHORIZED);
    assert!(w.closed.contains(&(1, 2)) && w.closed.contains(&(1, 4)));
    let mut w = access_world(true);
    assert_eq!(connect_as(&mut w, 0, 1, "c1", None, None), reason::SUCCESS);
}

#[test]
fn repeated_failures_from_one_address_are_answered_after_a_growing_back_off() {
    let mut w = access_world(false);
    let guess = |w: &mut World, conn| connect_from(w, 0, conn, "10.0.0.9", "c", Some("bob"), Some("no"));
    assert_eq!(guess(&mut w, 1), reason::BAD_USERNAME_OR_PASSWORD);
    // The second failure from the same address waits.
    assert_eq!(guess(&mut w, 2), 0xff, "no CONNACK yet");
    w.now += 99;
    w.shards[0].tick(w.now, 0);
    w.settle();
    assert!(w.recv(0, 2, V5).is_empty());
    w.now += 1;
    w.shards[0].tick(w.now, 0);
    w.settle();
    assert!(matches!(w.recv(0, 2, V5).first(), Some(Packet::ConnAck(a)) if a.code == reason::BAD_USERNAME_OR_PASSWORD));
    assert!(w.closed.contains(&(0, 2)));
    assert_eq!(w.shards[0].stats().auth_failures, 2);
}

#[test]
fn a_device_publishes_and_reads_only_its_own_topics() {
    let mut w = access_world(false);
    connect_as(&mut w, 0, 1, "car1", Some("alice"), Some("s3cret pass"));
    connect_as(&mut w, 1, 2, "car2", Some("bob"), Some("hunter2"));
    // SUBSCRIBE: its own tree yes, another device's or everything no.
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: ["devices/car1/#", "devices/car2/#", "#"]
            .iter()
            .map(|f| (f.to_string(), SubOptions { qos: 1, ..Default::default() }))
            .collect(),
        properties: Properties::default(),
    });
    w.send(0, 1, V5, sub);
    match w.recv(0, 1, V5).as_slice() {
        [Packet::SubAck(a)] => assert_eq!(a.codes, vec![1, reason::NOT_AUTHORIZED, reason::NOT_AUTHORIZED]),
        o => panic!("{o:?}"),
    }
    // PUBLISH into another device's tree: refused with 0x87, delivered to nobody.
    w.send(1, 2, V5, publish("devices/car1/cmd", 1, 7, b"x"));
    match w.recv(1, 2, V5).as_slice() {
        [Packet::PubAck(a)] => assert_eq!((a.packet_id, a.code), (7, reason::NOT_AUTHORIZED)),
        o => panic!("{o:?}"),
    }
    assert!(w.recv(0, 1, V5).is_empty());
    // Its own topic: accepted.
    w.send(0, 1, V5, publish("devices/car1/speed", 1, 8, b"42"));
    let got = w.recv(0, 1, V5);
    assert!(got.iter().any(|p| matches!(p, Packet::PubAck(a) if a.code == 0)), "{got:?}");
    assert!(got.iter().any(|p| matches!(p, Packet::Publish(m) if m.topic == "devices/car1/speed")), "{got:?}");
    assert_eq!(w.shards[1].stats().acl_denied, 1);
}

/// Listener 1 has its own rules: only bob, and `ops/%c/#`; listener 0 keeps the global ones.
#[test]
fn a_listener_with_its_own_rules_replaces_the_global_ones_for_its_connections() {
    const BOB: &str = "bob:$7$101$dUDH0dTKhLySJ1yG$vzIqRqLSbqYzQ0hgMSTd/osFqnaAbpAiDyMgo39qjn2fEHIcanDpZe1JoDoLo5gdxcjv/Kc1VWJsOvte9qUyoA==\n";
    let mut w = access_world(false);
    let own = Arc::new(AccessRules {
        passwords: Some(crate::auth::PasswordFile::parse(BOB).unwrap()),
        acl: Some(crate::auth::Acl::parse_mosquitto("pattern readwrite ops/%c/#\n").unwrap()),
        generation: 2,
        ..AccessRules::default()
    });
    for s in &mut w.shards {
        s.set_listener_access(1, own.clone(), 100, 60_000);
    }
    let on = |w: &mut World, listener: u16, conn: ConnId, id: &str, user: &str, pw: &str| {
        connect_on(w, 0, conn, &format!("10.0.1.{conn}"), listener, id, Some(user), Some(pw))
    };
    // alice is known globally (and her check is cached there), not on listener 1; bob the other way.
    assert_eq!(on(&mut w, 0, 1, "a0", "alice", "s3cret pass"), reason::SUCCESS);
    assert_eq!(on(&mut w, 1, 2, "a1", "alice", "s3cret pass"), reason::BAD_USERNAME_OR_PASSWORD);
    assert_eq!(on(&mut w, 1, 3, "car1", "bob", "hunter2"), reason::SUCCESS);
    // PUBACK codes of a publish to devices/ID/x and one to ops/ID/x.
    let both = |w: &mut World, conn: ConnId, id: &str| {
        w.send(0, conn, V5, publish(&format!("devices/{id}/x"), 1, 7, b"x"));
        w.send(0, conn, V5, publish(&format!("ops/{id}/x"), 1, 8, b"x"));
        match w.recv(0, conn, V5).as_slice() {
            [Packet::PubAck(a), Packet::PubAck(b)] => (a.code, b.code),
            o => panic!("{o:?}"),
        }
    };
    // Listener 1's ACL for car1: ops/car1/#, not the global devices/car1/#.
    assert_eq!(both(&mut w, 3, "car1"), (reason::NOT_AUTHORIZED, reason::SUCCESS));
    // The same user on listener 0 has the global rights.
    assert_eq!(on(&mut w, 0, 4, "car2", "bob", "hunter2"), reason::SUCCESS);
    assert_eq!(both(&mut w, 4, "car2"), (reason::SUCCESS, reason::NOT_AUTHORIZED));
}

/// One shard whose only user, erin ("pw"), has an argon2id hash: checked off the shard.
fn slow_hash_world() -> World {
    let hash = crate::auth::password::hash_argon2id_with_salt(b"pw", &[7; 16]).unwrap();
    let rules = Arc::new(AccessRules {
        passwords: Some(crate::auth::PasswordFile::parse(&format!("erin:{hash}\n")).unwrap()),
        generation: 1,
        ..AccessRules::default()
    });
    let mut w = World::new(1, Limits::default());
    w.shards[0].set_access(rules, 100, 60_000);
    w
}

#[test]
fn a_slow_password_hash_is_checked_off_the_shard_and_the_connect_waits_for_it() {
    let mut w = slow_hash_world();
    for (conn, pw, ok) in [(1, "pw", true), (2, "nope", false)] {
        assert_eq!(connect_as(&mut w, 0, conn, &format!("c{conn}"), Some("erin"), Some(pw)), 0xff, "waits");
        // A PINGREQ behind the CONNECT waits too, in order.
        w.send(0, conn, V5, Packet::PingReq);
        assert!(w.recv(0, conn, V5).is_empty());
        let jobs = std::mem::take(&mut w.verify);
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].run(), ok, "the job checks the password");
        w.shards[0].on_verified(conn, jobs[0].run(), w.now);
        w.settle();
        let got = w.recv(0, conn, V5);
        let code = if ok { reason::SUCCESS } else { reason::BAD_USERNAME_OR_PASSWORD };
        assert!(matches!(got.first(), Some(Packet::ConnAck(a)) if a.code == code), "{got:?}");
        assert_eq!(got.iter().any(|p| matches!(p, Packet::PingResp)), ok, "{got:?}");
    }
    // The successful check is cached: the next CONNECT needs no job.
    assert_eq!(connect_as(&mut w, 0, 3, "c3", Some("erin"), Some("pw")), reason::SUCCESS);
}

#[test]
fn with_authentication_and_no_acl_sys_topics_are_for_nobody() {
    const PASSWORDS: &str = "alice:$7$101$THB+U8AF19njwmXp$CruZM9nC4FKYpcWYdtxYAxKu7pzsSBvnI4qseWBD8+d2GyUPopm5/iPKHzSQQfNvnYIu2xTkDkuVLfS6/21IYQ==\n";
    let rules = Arc::new(AccessRules {
        passwords: Some(crate::auth::PasswordFile::parse(PASSWORDS).unwrap()),
        generation: 1,
        ..AccessRules::default()
    });
    let mut w = World::new(1, Limits::default());
    w.shards[0].set_access(rules, 100, 60_000);
    assert_eq!(connect_as(&mut w, 0, 1, "c1", Some("alice"), Some("s3cret pass")), reason::SUCCESS);
    let sub = Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: ["$SYS/#", "any/#"].iter().map(|f| (f.to_string(), SubOptions::default())).collect(),
        properties: Properties::default(),
    });
    w.send(0, 1, V5, sub);
    match w.recv(0, 1, V5).as_slice() {
        [Packet::SubAck(a)] => assert_eq!(a.codes, vec![reason::NOT_AUTHORIZED, 0]),
        o => panic!("{o:?}"),
    }
}

#[test]
fn a_listener_with_allow_anonymous_takes_clients_without_credentials_and_only_it() {
    let mut w = access_world(false);
    w.shards[0].on_open(5, w.now);
    w.shards[0].set_origin(5, 1, None);
    let c = Connect {
        version: V5,
        clean_start: true,
        keep_alive: 0,
        client_id: "local".into(),
        will: None,
        username: None,
        password: None,
        properties: Properties::default(),
    };
    w.send(0, 5, V5, Packet::Connect(Box::new(c)));
    assert!(matches!(w.recv(0, 5, V5).first(), Some(Packet::ConnAck(a)) if a.code == 0));
    assert_eq!(connect_as(&mut w, 0, 6, "c6", None, None), reason::NOT_AUTHORIZED, "listener 0 does not");
}

#[test]
fn a_flood_of_slow_password_checks_is_bounded_and_refused_as_busy_beyond() {
    let mut w = slow_hash_world();
    let max = access::VERIFYING_MAX as u64;
    for conn in 1..=max {
        assert_eq!(connect_as(&mut w, 0, conn, &format!("c{conn}"), Some("erin"), Some("guess")), 0xff);
    }
    assert_eq!(w.verify.len(), max as usize, "one check per waiting CONNECT, no more");
    // One more: refused at once, nothing queued.
    assert_eq!(connect_as(&mut w, 0, max + 1, "extra", Some("erin"), Some("pw")), reason::SERVER_BUSY);
    assert_eq!(w.verify.len(), max as usize);
    assert_eq!(w.shards[0].stats().auth_busy, 1);
    // A check that comes back (its connection gone meanwhile) frees its place.
    w.shards[0].on_lost(1, w.now);
    w.shards[0].on_verified(1, false, w.now);
    assert_eq!(connect_as(&mut w, 0, max + 2, "next", Some("erin"), Some("pw")), 0xff, "queued again");
}

#[test]
fn failed_slow_checks_count_for_the_back_off_of_their_address() {
    let mut w = slow_hash_world();
    for conn in [1, 2] {
        assert_eq!(connect_from(&mut w, 0, conn, "10.0.0.9", "c", Some("erin"), Some("no")), 0xff);
        let jobs = std::mem::take(&mut w.verify);
        w.shards[0].on_verified(conn, jobs[0].run(), w.now);
        w.settle();
    }
    assert!(matches!(w.recv(0, 1, V5).first(), Some(Packet::ConnAck(a)) if a.code == reason::BAD_USERNAME_OR_PASSWORD));
    assert!(w.recv(0, 2, V5).is_empty(), "the second failure from 10.0.0.9 waits out its back-off");
    w.now += 100;
    w.shards[0].tick(w.now, 0);
    w.settle();
    assert!(matches!(w.recv(0, 2, V5).first(), Some(Packet::ConnAck(a)) if a.code == reason::BAD_USERNAME_OR_PASSWORD));
}

/// One publisher of `version` on a shard bridging `k/#`; a QoS 1 publish whose record Kafka's
/// side refused as invalid. Returns what the client received (None: closed, no PUBACK).
fn invalid_payload_answer(
    version: Version,
    policy: crate::schemas::OnInvalid,
    problem_information: bool,
) -> Option<PubResp> {
    use crate::bridge::MappingConfig;
    let m: MappingConfig =
        toml::from_str("name = \"k\"\nfilters = [\"k/#\"]\ndestinations = [{ cluster = \"c\", topic = \"t\" }]")
            .unwrap();
    let router = crate::bridge::Router::new(&[m], &["c".to_string()]).unwrap();
    let options = BridgeOptions {
        router,
        delivery: crate::bridge::Delivery::KafkaAck,
        max_pending_records: 100,
        qos0_policy: Default::default(),
        spill_on_timeout: true,
    };
    let mut shard = Shard::new(0, 1, Limits::default(), 0).with_bridge(options);
    shard.on_open(1, 0);
    let mut properties = Properties::default();
    if !problem_information {
        properties.request_problem_information = Some(0);
    }
    let connect = Connect {
        version,
        clean_start: true,
        keep_alive: 0,
        client_id: "dev".into(),
        will: None,
        username: None,
        password: None,
        properties: if version == V5 { properties } else { Properties::default() },
    };
    let mut b = BytesMut::new();
    packet::encode(&Packet::Connect(Box::new(connect)), version, &mut b);
    packet::encode(&publish("k/1", 1, 9, b"{}"), version, &mut b);
    shard.on_bytes(1, &mut b, 0);
    let ids: Vec<u64> = shard.drain_effects().produce.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 1);
    let _ = shard.take_output(1);
    let e = ProduceError::Invalid {
        reason: "schema `s`: \"temp\" is a required property".into(),
        policy,
        cause: "json_schema",
    };
    shard.on_produce_results([ProduceResult::failed(ids[0], e)], 0);
    let closed = shard.drain_effects().close.contains(&1);
    let mut out = shard.take_output(1).unwrap_or_default();
    let mut ack = None;
    while let Some(p) = packet::decode(&mut out, Some(version), usize::MAX).unwrap() {
        if let Packet::PubAck(r) = p {
            ack = Some(r);
        }
    }
    assert_eq!(closed, ack.is_none(), "closed exactly when not acknowledged");
    let invalid = shard.outbox.mapping_stats().map(|(_, _, s)| s.records_invalid).sum::<u64>();
    assert_eq!(invalid, 1);
    ack
}

#[test]
fn an_invalid_payload_is_0x99_with_its_reason_for_mqtt5_and_the_policy_for_311() {
    use crate::schemas::OnInvalid;
    let a = invalid_payload_answer(V5, OnInvalid::Disconnect, true).unwrap();
    assert_eq!((a.packet_id, a.code), (9, reason::PAYLOAD_FORMAT_INVALID));
    assert_eq!(a.properties.reason_string.as_deref(), Some("schema `s`: \"temp\" is a required property"));
    let a = invalid_payload_answer(V5, OnInvalid::Drop, false).unwrap();
    assert_eq!(a.code, reason::PAYLOAD_FORMAT_INVALID);
    assert_eq!(a.properties.reason_string, None, "the client asked for no problem information");
    for policy in [OnInvalid::Drop, OnInvalid::DeadLetter] {
        let a = invalid_payload_answer(Version::V311, policy, true).unwrap();
        assert_eq!((a.packet_id, a.code), (9, 0), "{policy:?}: acknowledged");
    }
    assert!(invalid_payload_answer(Version::V311, OnInvalid::Disconnect, true).is_none());
}

/// Every shard's answer to `q`, as the HTTP side gathers them.
fn ask_all(w: &mut World, q: AdminQuery) -> Vec<AdminReply> {
    let now = w.now;
    let out = (0..w.shards.len()).map(|i| w.shards[i].admin(q.clone(), now)).collect();
    w.settle();
    out
}

fn client_ids(replies: &[AdminReply]) -> Vec<String> {
    let mut ids: Vec<String> = replies
        .iter()
        .flat_map(|r| match r {
            AdminReply::Clients(p) => p.items.iter().map(|c| c.client_id.clone()).collect(),
            _ => Vec::new(),
        })
        .collect();
    ids.sort();
    ids
}

#[test]
fn admin_lists_clients_in_pages_and_disconnects_one() {
    let mut w = World::new(2, Limits::default());
    w.connect(0, 1, V5, "dev-a", true);
    w.connect(1, 2, V5, "dev-b", true);
    w.connect(1, 3, Version::V311, "other-c", true);
    let all = ask_all(&mut w, AdminQuery::Clients { search: String::new(), after: String::new(), limit: 10 });
    assert_eq!(client_ids(&all), ["dev-a", "dev-b", "other-c"]);
    let page = ask_all(&mut w, AdminQuery::Clients { search: String::new(), after: "dev-a".into(), limit: 1 });
    // Each shard gives its first one after the cursor; the merge keeps the smallest.
    assert_eq!(client_ids(&page), ["dev-b"]);
    let totals: usize = page.iter().map(|r| if let AdminReply::Clients(p) = r { p.total } else { 0 }).sum();
    assert_eq!(totals, 2, "dev-b and other-c are after dev-a");
    let found = ask_all(&mut w, AdminQuery::Clients { search: "dev".into(), after: String::new(), limit: 10 });
    assert_eq!(client_ids(&found), ["dev-a", "dev-b"]);

    let done = ask_all(&mut w, AdminQuery::Disconnect { client_id: "dev-b".into() });
    assert_eq!(done.iter().filter(|r| matches!(r, AdminReply::Done(true))).count(), 1);
    assert!(matches!(w.recv(1, 2, V5).as_slice(), [Packet::Disconnect(d)] if d.code == reason::ADMINISTRATIVE_ACTION));
    assert!(w.closed.contains(&(1, 2)));
    let gone = ask_all(&mut w, AdminQuery::Disconnect { client_id: "nobody".into() });
    assert!(gone.iter().all(|r| matches!(r, AdminReply::Done(false))));
}

#[test]
fn admin_refuses_a_page_over_the_bound_and_a_malformed_filter() {
    let mut w = World::new(1, Limits::default());
    let big = AdminQuery::Clients { search: String::new(), after: String::new(), limit: PAGE_MAX + 1 };
    assert!(matches!(&ask_all(&mut w, big)[0], AdminReply::Refused(why) if why.contains("page maximum")));
    let bad = AdminQuery::Subscriptions { filter: Some("a/#/b".into()), after: Default::default(), limit: 10 };
    assert!(matches!(&ask_all(&mut w, bad)[0], AdminReply::Refused(why) if why.contains("a/#/b")));
    let tap = AdminQuery::LiveWatch { tap: 1, filter: "+x".into() };
    assert!(matches!(&ask_all(&mut w, tap)[0], AdminReply::Refused(_)));
}

#[test]
fn deleting_a_retained_message_removes_it_from_the_store_too() {
    let mut w = World::new(1, Limits::default());
    w.connect(0, 1, V5, "p", true);
    let mut p = publish("status/1", 0, 0, b"on");
    if let Packet::Publish(pb) = &mut p {
        pb.retain = true;
    }
    w.send(0, 1, V5, p);
    let listed = ask_all(&mut w, AdminQuery::Retained { filter: "status/#".into(), limit: 10 });
    assert!(matches!(&listed[0], AdminReply::Retained(v) if v.len() == 1 && v[0].payload == "on"));
    let now = w.now;
    assert!(matches!(
        w.shards[0].admin(AdminQuery::DeleteRetained { topic: "status/1".into() }, now),
        AdminReply::Done(true)
    ));
    let fx = w.shards[0].drain_effects();
    assert!(matches!(fx.retained.as_slice(), [(t, None)] if t == "status/1"), "the store forgets it too");
    assert!(matches!(
        w.shards[0].admin(AdminQuery::DeleteRetained { topic: "status/1".into() }, now),
        AdminReply::Done(false)
    ));
}

#[test]
fn a_live_tap_samples_matching_messages_at_a_bounded_rate_and_expires_unpolled() {
    let mut w = World::new(2, Limits::default());
    w.connect(0, 1, V5, "pub", true);
    ask_all(&mut w, AdminQuery::LiveWatch { tap: 7, filter: "cars/#".into() });
    for _ in 0..50 {
        w.send(0, 1, V5, publish("cars/1/speed", 0, 0, b"88"));
        w.send(0, 1, V5, publish("boats/1", 0, 0, b"no"));
    }
    let take = |w: &mut World| {
        ask_all(w, AdminQuery::LiveTake { tap: 7 })
            .into_iter()
            .map(|r| match r {
                AdminReply::Live(b) => b,
                o => panic!("{o:?}"),
            })
            .collect::<Vec<_>>()
    };
    let got = take(&mut w);
    // Sampled once, on the publisher's shard; the rest of the second is counted, not kept.
    assert_eq!(got[0].samples.len(), TAP_RATE_PER_SEC as usize);
    assert_eq!(got[0].skipped, 50 - u64::from(TAP_RATE_PER_SEC));
    assert!(got[1].samples.is_empty() && got[1].known);
    assert!(got[0]
        .samples
        .iter()
        .all(|s| s.topic == "cars/1/speed" && s.client_id == "pub" && &s.payload[..] == b"88"));
    w.now += 1000;
    w.send(0, 1, V5, publish("cars/2", 0, 0, b"x"));
    assert_eq!(take(&mut w)[0].samples.len(), 1, "a new second, a new allowance");
    w.now += TAP_IDLE_MS;
    let gone = take(&mut w);
    assert!(gone.iter().all(|b| !b.known), "nobody polled it for TAP_IDLE_MS: removed");
    for i in 0..TAPS_MAX as u64 {
        ask_all(&mut w, AdminQuery::LiveWatch { tap: 100 + i, filter: "#".into() });
    }
    let over = ask_all(&mut w, AdminQuery::LiveWatch { tap: 999, filter: "#".into() });
    assert!(matches!(&over[0], AdminReply::Refused(_)), "at most TAPS_MAX taps per shard");
}

#[test]
#[ignore = "measurement: cargo test -p sluice-core --release -- --ignored admin_page_cost"]
fn admin_page_cost() {
    let mut w = World::new(1, Limits::default());
    let n = 100_000;
    for i in 0..n {
        w.connect(0, i as ConnId + 1, Version::V311, &format!("dev-{i:06}"), true);
        w.shards[0].take_output(i as ConnId + 1);
    }
    let t = std::time::Instant::now();
    let q = AdminQuery::Clients { search: String::new(), after: "dev-050000".into(), limit: 100 };
    let r = w.shards[0].admin(q, 0);
    let page = t.elapsed();
    let t = std::time::Instant::now();
    let s = w.shards[0].admin(AdminQuery::Snapshot, 0);
    eprintln!("{n} sessions: a page of 100 in {page:?}, a snapshot in {:?}", t.elapsed());
    assert!(matches!(r, AdminReply::Clients(p) if p.items.len() == 100 && p.total == n / 2 - 1));
    assert!(matches!(s, AdminReply::Snapshot(_)));
}

/// Two members of `$share/g/jobs`, window 2 each, both on shard `members_on`: "stuck" never
/// acknowledges, "worker" does; "producer" on the other shard publishes 20 QoS 1 jobs. Returns
/// the world and how many jobs each member got (the world's shard `members_on` hosts them).
fn silent_member_run(members_on_owner: bool) -> (World, usize, usize, usize) {
    let limits = Limits { max_inflight: 2, ..Limits::default() };
    let mut w = World::new(2, limits);
    let owner = shard_of(&share_key("g", "jobs"), 2);
    let members = if members_on_owner { owner } else { 1 - owner };
    let producer = 1 - members;
    w.connect(members, 1, V5, "stuck", true);
    w.send(members, 1, V5, subscribe("$share/g/jobs", 1));
    w.recv(members, 1, V5);
    w.connect(members, 2, V5, "worker", true);
    w.send(members, 2, V5, subscribe("$share/g/jobs", 1));
    w.recv(members, 2, V5);
    w.connect(producer, 3, V5, "producer", true);
    let (mut stuck, mut worker) = (0, 0);
    for pid in 1..=20u16 {
        w.send(producer, 3, V5, publish("jobs", 1, pid, b"job"));
        stuck += w.recv(members, 1, V5).iter().filter(|p| matches!(p, Packet::Publish(_))).count();
        for p in w.recv(members, 2, V5) {
            if let Packet::Publish(p) = p {
                worker += 1;
                w.send(members, 2, V5, Packet::PubAck(resp(p.packet_id)));
            }
        }
    }
    (w, members, stuck, worker)
}

/// The members on the group's owner. Once the silent one's window is full it must not collect
/// more of the group's messages while the other member has room (plain round-robin queued every
/// other message behind it).
#[test]
fn a_shared_member_that_never_acknowledges_does_not_collect_the_groups_messages() {
    let (w, members, stuck, worker) = silent_member_run(true);
    assert_eq!(stuck, 2, "the silent member gets its window, no more");
    assert_eq!(worker, 18, "the rest goes to the member with room, none waits behind the other");
    let s = w.shards[members].sessions.get(&ClientId::from("stuck")).unwrap();
    assert!(s.queue.is_empty(), "nothing queued behind the full window: {}", s.queue.len());
}

/// The same with both members on the shard that does not own the group: the owner learns
/// from their shard that the silent one is busy (`ShareBusy`) and passes it over.
#[test]
fn a_shared_member_on_another_shard_that_never_acknowledges_is_passed_over() {
    let (mut w, other, stuck, worker) = silent_member_run(false);
    let owner = 1 - other;
    assert_eq!((stuck, worker), (2, 18));
    // It acknowledges at last: room again, so it takes its turns again.
    w.send(other, 1, V5, Packet::PubAck(resp(1)));
    w.send(other, 1, V5, Packet::PubAck(resp(2)));
    for pid in 21..=24u16 {
        w.send(owner, 3, V5, publish("jobs", 1, pid, b"job"));
    }
    let back = w.recv(other, 1, V5).iter().filter(|p| matches!(p, Packet::Publish(_))).count();
    assert!(back >= 1, "a member with room again gets messages again");
}

/// The lease's `low` (what a dead node's floor is taken from): the age of the oldest QoS 1/2
/// message queued or in flight for a persistent session, never less than its true age; none
/// once it is acknowledged; a message of unknown age (one restored or handed over) says so.
#[test]
fn the_lease_low_is_the_age_of_the_oldest_message_a_persistent_session_still_needs() {
    let mut w = World::new(1, Limits::default());
    w.now = 10_000;
    w.connect(0, 1, V5, "keeper", false);
    w.send(0, 1, V5, subscribe("t/#", 1));
    w.recv(0, 1, V5);
    w.connect(0, 2, V5, "volatile", true);
    w.send(0, 2, V5, subscribe("t/#", 1));
    w.recv(0, 2, V5);
    w.connect(0, 3, V5, "pub", true);
    assert_eq!(w.shards[0].pending_low(w.now), None, "nothing pending");
    w.now = 12_300;
    w.send(0, 3, V5, publish("t/a", 1, 1, b"x"));
    w.now = 15_000;
    w.send(0, 3, V5, publish("t/b", 1, 2, b"y"));
    let low = w.shards[0].pending_low(20_000).expect("in flight for keeper");
    assert!((7_700..=8_700).contains(&low), "queued at 12.3 s, asked at 20 s: {low}");
    let pids: Vec<u16> = w
        .recv(0, 1, V5)
        .into_iter()
        .filter_map(|p| if let Packet::Publish(p) = p { Some(p.packet_id) } else { None })
        .collect();
    assert_eq!(pids.len(), 2);
    w.send(0, 1, V5, Packet::PubAck(resp(pids[0])));
    let low = w.shards[0].pending_low(20_000).expect("the second still in flight");
    assert!((5_000..=6_000).contains(&low), "{low}");
    w.send(0, 1, V5, Packet::PubAck(resp(pids[1])));
    assert_eq!(w.shards[0].pending_low(20_000), None, "acknowledged; the non-persistent session does not count");
    let s = w.shards[0].sessions.get_mut(&ClientId::from("keeper")).unwrap();
    let msg = Arc::new(Message {
        topic: "t/c".into(),
        payload: Bytes::from_static(b"z"),
        qos: 1,
        retain: false,
        properties: None,
        expiry_at_ms: None,
        origin: "pub".into(),
    });
    s.queue.push_back(Delivery { msg, qos: 1, retain: false, sub_ids: Vec::new(), queued_s: 0 });
    assert_eq!(w.shards[0].pending_low(20_000), Some(crate::cluster::LOW_UNKNOWN));
}

#[test]
#[ignore = "measurement: cargo test -p sluice-core --release -- --ignored lease_walk_cost"]
fn lease_walk_cost() {
    let mut w = World::new(1, Limits::default());
    let n = 200_000;
    for i in 0..n {
        w.connect(0, i as ConnId + 1, Version::V311, &format!("dev-{i:06}"), false);
        w.shards[0].take_output(i as ConnId + 1);
    }
    let t = std::time::Instant::now();
    let low = w.shards[0].pending_low(1_000);
    eprintln!("{n} persistent sessions, nothing pending: the lease's walk took {:?}", t.elapsed());
    assert_eq!(low, None);
}

/// A persistent session's changes in a cluster: each written at once as a `Session` record
/// (nothing waits for a lease that may never come), but one record at a time: a change while
/// one is on its way goes with its answer, with the subscriptions then (a SUBSCRIBE flood costs
/// a record per Kafka round trip, not one per packet). A SUBACK goes only once the record that
/// carries its change is answered: a node killed right after it leaves the survivors that
/// subscription. A failed record is written again with the lease, as is one whose answer never
/// came, and their SUBACKs wait for that; a session's end is said at once.
#[test]
fn a_persistent_sessions_subscriptions_are_recorded_at_once_one_record_in_flight_at_a_time() {
    use crate::cluster::ClaimKind;
    let mut w = World::cluster(1, 1000);
    w.tick(0);
    w.answer(None);
    w.now = 10;
    let mut store = HashMap::default();
    let subs_of = |value: &Bytes| {
        let s = Session::decode("orphan".into(), 0, value, 0, 0).expect("a session's stored form");
        let mut f: Vec<String> = s.subs.keys().cloned().collect();
        f.sort();
        f
    };
    let subacks =
        |w: &mut World, conn: ConnId| w.recv(0, conn, V5).iter().filter(|p| matches!(p, Packet::SubAck(_))).count();
    w.connect(0, 1, V5, "orphan", false);
    w.send(0, 1, V5, subscribe("fleet/#", 1));
    commit_sessions(&mut w, &mut store);
    assert_eq!(subacks(&mut w, 1), 0, "stored on this node only: the SUBACK waits for the cluster's record");
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1, "at once, not at the lease at 1000 ms");
    assert!(recs[0].0.active && recs[0].0.client == "orphan" && recs[0].0.expiry == 600);
    assert_eq!(subs_of(&recs[0].1), ["fleet/#"]);
    let wall = |t: u64| u64::try_from(w.shards[0].wall_offset_ms + t as i64).unwrap();
    assert_eq!(recs[0].0.at_ms, wall(10), "when it was written: readers order a session's records by it");
    w.answer(None);
    assert_eq!(subacks(&mut w, 1), 1, "the record answered: the SUBACK goes");
    assert!(w.claims(ClaimKind::Session).is_empty(), "answered, nothing changed since: nothing more");

    // A change with nothing on its way: at once (an UNSUBACK promises nothing a survivor could
    // lose, so it does not wait). A SUBSCRIBE before its answer waits for it, and its SUBACK
    // for the record after; the connection's next SUBSCRIBE waits for that SUBACK.
    w.now = 20;
    w.send(0, 1, V5, unsubscribe("fleet/#"));
    assert!(w.recv(0, 1, V5).iter().any(|p| matches!(p, Packet::UnsubAck(_))));
    w.now = 30;
    commit_sessions(&mut w, &mut store);
    w.send(0, 1, V5, subscribe("home/#", 1));
    commit_sessions(&mut w, &mut store);
    w.send(0, 1, V5, subscribe("away/#", 1));
    commit_sessions(&mut w, &mut store);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1, "the UNSUBSCRIBE at once, the SUBSCRIBE waits for its answer");
    assert!(subs_of(&recs[0].1).is_empty());
    assert_eq!(w.shards[0].claims.stats().state_coalesced, 1);
    assert_eq!(subacks(&mut w, 1), 0);
    w.answer(None);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1, "the change that waited, with the subscriptions then");
    assert_eq!(subs_of(&recs[0].1), ["home/#"]);
    assert_eq!(subacks(&mut w, 1), 0, "not the answer of a record without home/#");
    w.answer(None);
    assert_eq!(subacks(&mut w, 1), 1, "home/#");
    commit_sessions(&mut w, &mut store);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1, "the next SUBSCRIBE, read once the first was answered");
    assert_eq!(subs_of(&recs[0].1), ["away/#", "home/#"]);
    w.answer(None);
    assert_eq!(subacks(&mut w, 1), 1, "away/#");
    w.tick(1000);
    assert!(w.claims(ClaimKind::Session).is_empty(), "the lease has nothing to write");
    w.answer(None);
    assert_eq!(w.shards[0].claims.session_records.len(), 0);

    // A record Kafka refuses: not again at once (a full disk refuses while it is handed out),
    // but with the next lease; its SUBACK waits for that one.
    w.now = 1100;
    w.send(0, 1, V5, subscribe("b/#", 1));
    commit_sessions(&mut w, &mut store);
    assert_eq!(w.claims(ClaimKind::Session).len(), 1);
    w.answer(Some(ProduceError::SpillFull));
    assert!(w.claims(ClaimKind::Session).is_empty());
    assert_eq!(subacks(&mut w, 1), 0, "refused by Kafka: nothing promised yet");
    w.tick(2000);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1, "written again with the lease");
    assert_eq!(subs_of(&recs[0].1), ["away/#", "b/#", "home/#"]);
    assert_eq!(w.shards[0].claims.stats().state_failed, 1);
    w.answer(None);
    assert_eq!(subacks(&mut w, 1), 1, "b/#, once written again");

    w.send(
        0,
        1,
        V5,
        Packet::Disconnect(Disconnect {
            code: 0,
            properties: Properties { session_expiry_interval: Some(0), ..Default::default() },
        }),
    );
    commit_sessions(&mut w, &mut store);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1, "its end (expiry 0 at DISCONNECT), at once");
    assert!(!recs[0].0.active && recs[0].1.is_empty());
    w.answer(None);

    // An answer that never comes: given up on at the lease after STALE_MS, written again
    // (its SUBACK waits for that one: `session_records`' unit tests).
    w.connect(0, 2, V5, "orphan", false);
    w.send(0, 2, V5, subscribe("c/#", 1));
    commit_sessions(&mut w, &mut store);
    assert_eq!(w.claims(ClaimKind::Session).len(), 1);
    w.unanswered.clear();
    let late = w.now + super::session_records::STALE_MS;
    w.tick(late - 1000);
    assert!(w.claims(ClaimKind::Session).is_empty(), "not yet given up on");
    w.tick(late);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1);
    assert_eq!(subs_of(&recs[0].1), ["c/#"]);
    assert_eq!(w.shards[0].claims.stats().state_stale, 1);
    assert_eq!(w.shards[0].claims.stats().state_records, 9);
}

/// A persistent session whose change waits for its record's answer moves to another shard of
/// the node (its client reconnects there): the change is written before it leaves, by the
/// shard it leaves (which writes nothing more for it after), and the shard it arrives at
/// writes nothing for the arrival — never an end for a session that lives on.
#[test]
fn a_session_moving_to_another_shard_writes_its_waiting_change_before_it_goes() {
    use crate::cluster::ClaimKind;
    let mut w = World::cluster(2, 1000);
    w.tick(0);
    w.answer(None);
    w.now = 10;
    let id = (0..)
        .map(|i| format!("mover-{i}"))
        .find(|id| directory_shard(id, 2) == 0)
        .expect("an id whose directory is shard 0");
    w.connect(0, 1, V5, &id, false);
    let mut store = HashMap::default();
    for f in ["a/#", "b/#", "c/#"] {
        w.send(0, 1, V5, subscribe(f, 1));
        commit_sessions(&mut w, &mut store);
        w.answer(None);
    }
    assert_eq!(w.claims(ClaimKind::Session).len(), 3);
    // An UNSUBSCRIBE's record on its way, and a second change waiting for its answer.
    w.send(0, 1, V5, unsubscribe("a/#"));
    w.send(0, 1, V5, unsubscribe("b/#"));
    commit_sessions(&mut w, &mut store);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1);
    w.connect(1, 2, V5, &id, false);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1, "the waiting change, as the session leaves shard 0");
    assert!(recs[0].0.active && recs[0].0.shard == 0);
    let s = Session::decode(id.as_str().into(), 0, &recs[0].1, 0, 0).expect("stored form");
    assert_eq!(s.subs.keys().collect::<Vec<_>>(), ["c/#"]);
    w.answer(None);
    assert!(w.claims(ClaimKind::Session).is_empty(), "no end from shard 0, no record from shard 1");
    w.send(1, 2, V5, subscribe("c/#", 1));
    commit_sessions(&mut w, &mut store);
    let recs = w.claims(ClaimKind::Session);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].0.shard, 1);
}

/// A node that starts after this one's Share records reads the topic from its end: the first
/// lease of each run of another node that says it reads the topic has this node's groups with
/// members written again (with the counts now); an earlier lease, or one of a run already
/// heard, nothing.
#[test]
fn a_node_that_starts_later_hears_the_share_groups_again() {
    use crate::cluster::{Claim, ClaimKind};
    let mut w = World::cluster(1, 1000);
    w.tick(0);
    w.connect(0, 1, V5, "m1", true);
    w.send(0, 1, V5, subscribe("$share/g/work/#", 1));
    w.connect(0, 2, V5, "m2", true);
    w.send(0, 2, V5, subscribe("$share/g/work/#", 1));
    w.send(0, 2, V5, subscribe("$share/h/other/#", 1));
    w.send(0, 2, V5, unsubscribe("$share/h/other/#"));
    let counts = |w: &mut World| {
        let mut c: Vec<(String, bool, u32)> =
            w.claims(ClaimKind::Share).into_iter().map(|(c, _)| (c.client, c.active, c.members)).collect();
        c.sort();
        c
    };
    counts(&mut w);
    let lease = |inc| Claim { inc, reading: true, ..Claim::new("n2", "lease", 0, ClaimKind::Lease) };
    let not_yet = Claim { reading: false, ..lease(7) };
    w.shards[0].on_cluster_claim(&not_yet.encode(), w.now);
    w.settle();
    assert!(counts(&mut w).is_empty(), "n2 does not read the topic yet: it would not hear them");
    w.shards[0].on_cluster_claim(&lease(7).encode(), w.now);
    w.settle();
    assert_eq!(counts(&mut w), [(share_key("g", "work/#"), true, 2)], "g with its count now; h has no members");
    w.shards[0].on_cluster_claim(&lease(7).encode(), w.now);
    w.settle();
    assert!(counts(&mut w).is_empty(), "a run already heard");
    w.shards[0].on_cluster_claim(&lease(8).encode(), w.now);
    w.settle();
    assert_eq!(counts(&mut w).len(), 1, "n2 restarted");
    // Whatever a node missed (its readers of other partitions came up after its first lease
    // that said it reads), it hears again within a minute. Meanwhile the shard's own leases and
    // its members' claims are read back (it is not cut off, they stay), and they keep alive.
    use super::cluster_claims::SHARE_REANNOUNCE_MS;
    let mut shares = 0;
    for t in (1000..=SHARE_REANNOUNCE_MS).step_by(1000) {
        for r in std::mem::take(&mut w.produced) {
            let mut claim = None;
            r.record.for_each_header(|k, v| {
                if k == crate::cluster::CLAIM_HEADER {
                    claim = Claim::decode(v);
                }
            });
            match claim {
                Some(c) if c.kind == ClaimKind::Share => shares += 1,
                Some(c) => w.shards[0].on_cluster_claim(&c.encode(), w.now),
                None => {}
            }
        }
        assert_eq!(shares, 0, "not before the minute is over ({t} ms)");
        w.send(0, 1, V5, Packet::PingReq);
        w.send(0, 2, V5, Packet::PingReq);
        w.tick(t);
    }
    assert_eq!(counts(&mut w), [(share_key("g", "work/#"), true, 2)], "unchanged, written again");
}

/// Node n2's last member of a group leaves while n1 still leaves n2 its share (n1 has not read
/// it yet): once n1 reads n2's record, what it routed since n2's member left (less the margin)
/// and left to n2 goes to n1's member — every message reaches the group. What it routed
/// before that is not delivered again, and a record that does not say when weighs the last
/// second.
#[test]
fn messages_left_to_a_node_whose_last_member_left_are_delivered_once_its_record_is_read() {
    use super::cluster_claims::{RECENT_LOOKBACK_MS, SHARE_LEFT_MARGIN_MS};
    use crate::cluster::{Claim, ClaimKind};
    let mut w = World::cluster(1, 1000);
    w.tick(0);
    let key = share_key("g", "work/#");
    w.connect(0, 1, V5, "m1", true);
    w.send(0, 1, V5, subscribe("$share/g/work/#", 1));
    w.connect(0, 9, V5, "pub", true);
    w.recv(0, 1, V5);
    let n2 = Claim { active: true, members: 1, ..Claim::new("n2", &key, 0, ClaimKind::Share) };
    w.shards[0].on_cluster_claim(&n2.encode(), w.now);
    w.now += w.shards[0].claims.share_grace_ms();
    let got = |w: &mut World| -> Vec<String> {
        w.recv(0, 1, V5)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
                _ => None,
            })
            .collect()
    };
    let send = |w: &mut World, range: std::ops::Range<u16>| {
        for i in range {
            let p = Publish { payload: Bytes::from(format!("x{i}")), ..publish_of(publish("work/hot", 0, 0, b"")) };
            w.send(0, 9, V5, Packet::Publish(p));
        }
    };
    let n2s = |range: std::ops::Range<u16>| -> Vec<String> {
        range
            .map(|i| format!("x{i}"))
            .filter(|p| crate::cluster::share_node(&[("n1", 1), ("n2", 1)], "work/hot", p.as_bytes()) == Some("n2"))
            .collect()
    };
    // 0..100 before n2's member left (more than the margin before), 100..200 after.
    send(&mut w, 0..100);
    let before = got(&mut w);
    assert_eq!(before.len() + n2s(0..100).len(), 100, "n1 delivers its share only");
    w.now += SHARE_LEFT_MARGIN_MS + 100;
    let left_at = w.now - 50;
    send(&mut w, 100..200);
    let after = got(&mut w);
    assert_eq!(after.len() + n2s(100..200).len(), 100);
    let wall = |t: u64| u64::try_from(w.shards[0].wall_offset_ms + t as i64).unwrap();
    let gone = Claim { at_ms: wall(left_at), ..Claim::new("n2", &key, 0, ClaimKind::Share) };
    w.shards[0].on_cluster_claim(&gone.encode(), w.now);
    w.settle();
    let again = got(&mut w);
    assert_eq!(again, n2s(100..200), "what n2 had no one for, once, in order; none from before");
    assert_eq!(w.shards[0].claims.stats().share_redelivered, again.len() as u64);
    send(&mut w, 200..210);
    assert_eq!(got(&mut w).len(), 10, "n1 alone delivers everything now");

    // A record that does not say when (an older node): the last second routed here.
    let n2 = Claim { active: true, members: 1, ..Claim::new("n2", &key, 0, ClaimKind::Share) };
    w.shards[0].on_cluster_claim(&n2.encode(), w.now);
    w.now += w.shards[0].claims.share_grace_ms();
    send(&mut w, 300..350);
    w.now += RECENT_LOOKBACK_MS / 2;
    send(&mut w, 350..400);
    got(&mut w);
    w.now += RECENT_LOOKBACK_MS / 2 + 1;
    w.shards[0].on_cluster_claim(&Claim::new("n2", &key, 0, ClaimKind::Share).encode(), w.now);
    w.settle();
    assert_eq!(got(&mut w), n2s(350..400));
}

/// A node's member count of a shared-subscription group: its first member and its last said at
/// once, a new count with the next lease; and with another node's three members against this
/// node's one, this node delivers about a quarter of the group's messages.
#[test]
fn a_share_groups_member_count_is_announced_coalesced_and_weighs_the_nodes_pick() {
    use crate::cluster::{Claim, ClaimKind};
    let mut w = World::cluster(1, 1000);
    w.tick(0);
    let key = share_key("g", "work/#");
    for (conn, id) in [(1, "m1"), (2, "m2"), (3, "m3")] {
        w.connect(0, conn, V5, id, true);
        w.send(0, conn, V5, subscribe("$share/g/work/#", 1));
    }
    let counts =
        |w: &mut World| w.claims(ClaimKind::Share).into_iter().map(|(c, _)| (c.active, c.members)).collect::<Vec<_>>();
    assert_eq!(counts(&mut w), [(true, 1)], "the first member at once, the others wait for the lease");
    w.tick(1000);
    assert_eq!(counts(&mut w), [(true, 3)]);
    w.send(0, 3, V5, unsubscribe("$share/g/work/#"));
    w.send(0, 3, V5, subscribe("$share/g/work/#", 1));
    w.tick(2000);
    assert!(counts(&mut w).is_empty(), "back to the count announced: nothing to say");
    for conn in [2, 3] {
        w.send(0, conn, V5, unsubscribe("$share/g/work/#"));
    }
    w.tick(3000);
    assert_eq!(counts(&mut w), [(true, 1)]);
    assert_eq!(w.shards[0].shared.announced(&key), 1);

    // Node n2 has three members: n1 (one) delivers about a quarter, the same ones every time,
    // once the views replaced (n1's own count of 3, no other node) stopped counting.
    let grace = w.shards[0].claims.share_grace_ms();
    let remote = Claim { active: true, members: 3, ..Claim::new("n2", &key, 0, ClaimKind::Share) };
    w.shards[0].on_cluster_claim(&remote.encode(), w.now);
    w.connect(0, 9, V5, "pub", true);
    w.recv(0, 1, V5);
    let delivered = |w: &mut World| {
        let mut mine = Vec::new();
        for i in 0..400u16 {
            let p = Publish { payload: Bytes::from(format!("x{i}")), ..publish_of(publish("work/hot", 0, 0, b"")) };
            w.send(0, 9, V5, Packet::Publish(p));
            for p in w.recv(0, 1, V5) {
                if let Packet::Publish(p) = p {
                    mine.push(String::from_utf8_lossy(&p.payload).into_owned());
                }
            }
        }
        mine
    };
    let picked = |weights: &[(&str, u32)]| -> Vec<String> {
        (0..400)
            .map(|i| format!("x{i}"))
            .filter(|p| crate::cluster::share_node(weights, "work/hot", p.as_bytes()) == Some("n1"))
            .collect()
    };
    assert_eq!(delivered(&mut w).len(), 400, "n2's members are news: n1 still delivers what it did before");
    w.now += grace;
    let mine = delivered(&mut w);
    assert!((60..=140).contains(&mine.len()), "about 100 of 400: {}", mine.len());
    assert_eq!(mine, picked(&[("n1", 1), ("n2", 3)]), "what every node computes for these counts");
    // A third node, a0, with one member; then it says three: until every node has read that,
    // n1 delivers what either view gives it (a message twice rather than lost), then by the
    // new view alone.
    let a0 = |members| Claim { active: true, members, ..Claim::new("a0", &key, 0, ClaimKind::Share) };
    w.shards[0].on_cluster_claim(&a0(1).encode(), w.now);
    w.now += grace;
    let old_view = picked(&[("a0", 1), ("n1", 1), ("n2", 3)]);
    assert_eq!(delivered(&mut w), old_view);
    w.shards[0].on_cluster_claim(&a0(3).encode(), w.now);
    let new_view = picked(&[("a0", 3), ("n1", 1), ("n2", 3)]);
    let union: Vec<String> =
        (0..400).map(|i| format!("x{i}")).filter(|p| old_view.contains(p) || new_view.contains(p)).collect();
    assert!(union.len() > new_view.len() && union.len() > old_view.len(), "the views give n1 other messages");
    assert_eq!(delivered(&mut w), union, "within the grace: either view");
    w.now += grace;
    assert_eq!(delivered(&mut w), new_view, "after it: the new view");
    // n1's own count goes to 2, then back to 1 (each written with the lease): the others weigh
    // it by 2 until they read the 1, so for the grace n1 delivers by either count, then by 1.
    w.send(0, 2, V5, subscribe("$share/g/work/#", 1));
    w.recv(0, 2, V5);
    let next = w.now + 1000;
    w.tick(next);
    assert_eq!(counts(&mut w), [(true, 2)]);
    w.now += grace;
    w.send(0, 2, V5, unsubscribe("$share/g/work/#"));
    w.recv(0, 2, V5);
    let next = w.now + 1000;
    w.tick(next);
    assert_eq!(counts(&mut w), [(true, 1)]);
    let (old_view, new_view) = (picked(&[("a0", 3), ("n1", 2), ("n2", 3)]), new_view);
    let union: Vec<String> =
        (0..400).map(|i| format!("x{i}")).filter(|p| old_view.contains(p) || new_view.contains(p)).collect();
    assert!(union.len() > new_view.len(), "a count of 2 gave n1 more messages");
    assert_eq!(delivered(&mut w), union, "within the grace: by either count");
    w.now += grace;
    assert_eq!(delivered(&mut w), new_view, "after it: by the count it wrote last");
    // The last members of a0 and n2 leave (a lookback later: nothing routed since to deliver
    // again, see the next test): n1 delivers everything again, at once; its first member
    // leaving clears it.
    w.now += super::cluster_claims::RECENT_LOOKBACK_MS + 1;
    for node in ["a0", "n2"] {
        w.shards[0].on_cluster_claim(&Claim::new(node, &key, 0, ClaimKind::Share).encode(), w.now);
    }
    w.send(0, 9, V5, publish("work/hot", 0, 0, b"x0"));
    assert_eq!(w.recv(0, 1, V5).len(), 1);
    w.send(0, 1, V5, unsubscribe("$share/g/work/#"));
    assert_eq!(counts(&mut w), [(false, 0)], "the last member at once");
    w.tick(4000);
    assert!(counts(&mut w).is_empty());
}
