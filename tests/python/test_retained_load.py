"""Retained messages at volume, on the real binary with two shards: 100,000 retained messages,
then a SUBSCRIBE with 1,000 filters that match nothing (it must not stall the shards: a canary
QoS 1 round trip across both shards keeps going), and new subscribers to `ret/#` (each must get
all 100,000, at QoS 0 and at QoS 1, none dropped by the session's bounds).

MQTT here is spoken over raw sockets (3.1.1): paho's loop cannot read 100,000 messages quickly
enough to keep these tests short, and a few lines of framing are all that is needed.
"""
import multiprocessing
import socket
import struct
import time

import pytest

from conftest import Broker
from rawmqtt import mqtt_str, packet, split

N = 100_000
# 100 bytes each: 10 MB in all, more than one connection's output buffer (4 MiB) holds.
PAYLOAD = b"r" * 100
# Generous for a debug binary on a loaded 2-core machine; the old code took 18 s (release) to
# answer the SUBSCRIBE and stalled the canary as long.
SUBACK_WITHIN_S = 5.0
CANARY_GAP_MAX_S = 2.0


def publish(topic, payload, qos=0, retain=False, pid=0):
    body = mqtt_str(topic) + (struct.pack(">H", pid) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | int(retain), body)


def puback(pid):
    return packet(0x40, struct.pack(">H", pid))


def subscribe(pid, filters):
    body = struct.pack(">H", pid) + b"".join(mqtt_str(f) + bytes([q]) for f, q in filters)
    return packet(0x82, body)


class Raw:
    """One MQTT 3.1.1 connection over a blocking socket, clean session, no keep-alive."""

    def __init__(self, addr, client_id):
        self.s = socket.create_connection(addr, timeout=30)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.unread = []  # whole packets `read` left behind
        body = mqtt_str("MQTT") + bytes([4, 0x02]) + struct.pack(">H", 0) + mqtt_str(client_id)
        self.s.sendall(packet(0x10, body))
        kind, body = self.read()
        assert kind == 0x20 and body[1] == 0, (kind, body)

    def packets(self):
        """Whole packets buffered so far, as (first byte, body)."""
        out, self.unread = self.unread, []
        while (got := split(self.buf)) is not None:
            first, body, used = got
            out.append((first, body))
            del self.buf[:used]
        return out

    def fill(self, timeout):
        """Reads what arrives within `timeout`; False when nothing did."""
        self.s.settimeout(timeout)
        try:
            data = self.s.recv(1 << 20)
        except socket.timeout:
            return False
        assert data, "connection closed by the broker"
        self.buf += data
        return True

    def read(self, timeout=30):
        """The next packet; what arrived behind it stays buffered for `packets()`."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.packets()
            if got:
                self.unread = got[1:]
                return got[0]
            left = deadline - time.monotonic()
            assert left > 0 and self.fill(left), f"no packet within {timeout} s"

    def close(self):
        self.s.close()


def parse_publish(first, body):
    """(topic, qos, retain, packet id)."""
    tl = struct.unpack(">H", body[:2])[0]
    topic = body[2:2 + tl].decode()
    qos = (first >> 1) & 3
    pid = struct.unpack(">H", body[2 + tl:4 + tl])[0] if qos else 0
    return topic, qos, bool(first & 1), pid


def canary_main(pub_addr, sub_addr, conn, stop):
    """The canary's process: QoS 1 round trips until `stop`, then their completion times (or the
    error) back through `conn`. A process of its own, so that the test's reader, busy parsing
    100,000 messages, does not hold it up (the GIL) and pass its own delays off as the broker's."""
    try:
        sub = Raw(sub_addr, "canary-sub")
        sub.s.sendall(subscribe(1, [("canary", 1)]))
        assert sub.read()[0] == 0x90
        pub = Raw(pub_addr, "canary-pub")
        done, pid = [], 0
        while not stop.is_set():
            pid = pid % 65535 + 1
            pub.s.sendall(publish("canary", b"c", qos=1, pid=pid))
            first, body = sub.read(timeout=60)
            assert first >> 4 == 3, first
            sub.s.sendall(puback(parse_publish(first, body)[3]))
            first, body = pub.read(timeout=60)
            assert first == 0x40 and struct.unpack(">H", body)[0] == pid
            done.append(time.monotonic())  # CLOCK_MONOTONIC: the same clock in every process
            if len(done) == 5:
                conn.send("running")
        conn.send(done)
    except Exception as e:
        conn.send(f"canary failed: {e!r}")


class Canary:
    """A QoS 1 round trip after another — published on shard 0, received on shard 1 — timed.
    After the `with` block, `max_gap()` is the longest time between two completed round trips."""

    def __init__(self, broker):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.stop = ctx.Event()
        self.proc = ctx.Process(target=canary_main, args=(broker.shard(0), broker.shard(1), child, self.stop),
                                daemon=True)
        self.done = []

    def __enter__(self):
        self.proc.start()
        assert self.conn.poll(30), "the canary does not get round trips"
        msg = self.conn.recv()
        assert msg == "running", msg
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.ended = time.monotonic()
        got = self.conn.recv() if self.conn.poll(70) else "the canary did not stop"
        self.proc.join(10)
        assert isinstance(got, list), got
        self.done = got

    def max_gap(self):
        t = self.done + [self.ended]
        return max(b - a for a, b in zip(t, t[1:]))


@pytest.fixture(scope="module")
def loaded():
    """A broker holding N retained QoS 1 messages `ret/0` … `ret/99999` (100 bytes each), spread
    over both shards by their owners' hash. Their PUBACKs go out once they are stored everywhere, so when the last
    one is in, every message is."""
    broker = Broker()
    try:
        c = Raw(broker.shard(0), "loader")
        chunk = 10_000
        for start in range(0, N, chunk):
            c.s.sendall(b"".join(publish(f"ret/{i}", PAYLOAD, qos=1, retain=True, pid=i - start + 1)
                                 for i in range(start, start + chunk)))
            acked = 0
            while acked < chunk:
                assert c.fill(30), f"PUBACKs stopped at {start + acked}"
                acked += sum(1 for first, _ in c.packets() if first == 0x40)
        c.close()
        yield broker
    finally:
        broker.stop()


def test_a_subscribe_with_1000_filters_matching_nothing_does_not_stall_the_shards(loaded):
    s = Raw(loaded.shard(0), "many-filters")
    with Canary(loaded) as canary:
        t0 = time.monotonic()
        s.s.sendall(subscribe(7, [(f"nothing/{i}/#", 1) for i in range(1000)]))
        first, body = s.read(timeout=SUBACK_WITHIN_S)
        suback_s = time.monotonic() - t0
        assert first == 0x90 and len(body) == 2 + 1000
        # Another client is served meanwhile too: a fresh CONNECT on each shard.
        for shard in (0, 1):
            t1 = time.monotonic()
            Raw(loaded.shard(shard), f"fresh-{shard}").close()
            assert time.monotonic() - t1 < CANARY_GAP_MAX_S
        # The canary keeps going well after the SUBACK: whatever the shards still do for the
        # SUBSCRIBE (nothing, once answered) has to leave it room.
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            time.sleep(0.05)
    gap = canary.max_gap()
    print(f"SUBACK for 1000 filters after {suback_s:.3f} s; canary max gap {gap:.3f} s "
          f"over {len(canary.done)} round trips")
    assert gap < CANARY_GAP_MAX_S
    assert s.fill(0.2) is False, "nothing matches, nothing may arrive"
    s.close()


def receive_all(sub, qos, deadline_s=120, idle_s=5):
    """Reads retained PUBLISHes (acknowledging QoS 1) until N distinct topics arrived, nothing
    came for `idle_s`, or `deadline_s` passed. Returns the distinct topics."""
    topics = set()
    deadline = time.monotonic() + deadline_s
    while len(topics) < N and time.monotonic() < deadline:
        if not sub.unread and not sub.fill(idle_s):
            break
        acks = []
        for first, body in sub.packets():
            assert first >> 4 == 3, first
            topic, q, retain, pid = parse_publish(first, body)
            assert (q, retain) == (qos, True), (topic, q, retain)
            topics.add(topic)
            if q:
                acks.append(puback(pid))
        if acks:
            sub.s.sendall(b"".join(acks))
    return topics


@pytest.mark.parametrize("qos", [0, 1])
def test_a_new_subscriber_gets_every_retained_message(loaded, qos):
    sub = Raw(loaded.shard(1), f"all-at-qos{qos}")
    with Canary(loaded) as canary:
        t0 = time.monotonic()
        sub.s.sendall(subscribe(3, [("ret/#", qos)]))
        first, _ = sub.read(timeout=SUBACK_WITHIN_S)
        assert first == 0x90
        topics = receive_all(sub, qos)
        took = time.monotonic() - t0
    gap = canary.max_gap()
    print(f"QoS {qos}: {len(topics)} of {N} retained messages in {took:.2f} s; "
          f"canary max gap {gap:.3f} s over {len(canary.done)} round trips")
    assert len(topics) == N, f"{len(topics)} of {N} (nothing more for 5 s, or 120 s passed)"
    assert topics == {f"ret/{i}" for i in range(N)}
    assert gap < CANARY_GAP_MAX_S
    sub.close()
