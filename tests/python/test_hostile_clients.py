"""Hostile and careless clients, driven over raw sockets against the real binary on two shards,
each with a well-behaved canary beside it: what one client does may close its own connection,
never crash, freeze or starve the broker for anyone else."""

import os
import socket
import struct
import subprocess
import threading
import time

from conftest import WAIT, Paho, sluice_bin
from rawmqtt import mqtt_str, packet, split, varint


# ---------------------------------------------------------------------------------------------
# A minimal MQTT client over a raw socket: what a misbehaving device sends, byte for byte.
# ---------------------------------------------------------------------------------------------

def connect_packet(client_id, v5=False, clean=True, keepalive=0, props=b""):
    flags = 0x02 if clean else 0
    body = mqtt_str("MQTT") + bytes([5 if v5 else 4, flags]) + struct.pack("!H", keepalive)
    if v5:
        body += varint(len(props)) + props
    return packet(0x10, body + mqtt_str(client_id))


def subscribe_packet(pid, topic, qos, v5=False):
    body = struct.pack("!H", pid) + (b"\x00" if v5 else b"") + mqtt_str(topic) + bytes([qos])
    return packet(0x82, body)


def publish_packet(topic, payload, qos=0, pid=1, v5=False, retain=False):
    body = mqtt_str(topic) + (struct.pack("!H", pid) if qos else b"") + (b"\x00" if v5 else b"") + payload
    return packet(0x30 | (qos << 1) | int(retain), body)


class Raw:
    """A raw MQTT connection; `packets()` decodes what the broker sent."""

    def __init__(self, addr, timeout=WAIT):
        self.s = socket.create_connection(addr, timeout=timeout)
        self.buf = b""

    def send(self, data):
        self.s.sendall(data)

    def packet(self, timeout=WAIT):
        """(type, flags, body) of the next packet, or None once the broker closed."""
        deadline = time.monotonic() + timeout
        while True:
            got = self._parse()
            if got:
                return got
            self.s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.s.recv(65536)
            except (ConnectionResetError, BrokenPipeError):
                return None
            if not data:
                return None
            self.buf += data

    def _parse(self):
        got = split(self.buf)
        if got is None:
            return None
        first, body, used = got
        self.buf = self.buf[used:]
        return first >> 4, first & 0x0F, body

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


class Canary:
    """A QoS 1 publisher and subscriber pair (paho) that keeps round-tripping in the background and
    records the longest wait for any PUBACK or delivery."""

    def __init__(self, pub_addr, sub_addr, name, **paho_kw):
        self.topic = f"canary/{name}"
        self.sub = Paho(sub_addr, f"{name}-sub", v5=True, **paho_kw)
        self.sub.subscribe(self.topic, 1)
        self.pub = Paho(pub_addr, f"{name}-pub", v5=True, **paho_kw)
        self.sent = 0
        self.received = 0
        self.max_gap = 0.0
        self.errors = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop_flag.is_set():
                t0 = time.monotonic()
                payload = str(self.sent).encode()
                self.pub.publish(self.topic, payload, 1)
                m = self.sub.message(timeout=WAIT)
                assert m.payload == payload, (m.payload, payload)
                self.sent += 1
                self.received += 1
                self.max_gap = max(self.max_gap, time.monotonic() - t0)
                time.sleep(0.02)
        except Exception as e:  # reported by check()
            self.errors.append(repr(e))

    def check(self, max_gap):
        self.stop_flag.set()
        self.thread.join(WAIT * 2)
        assert not self.errors, self.errors
        assert self.received > 0 and self.received == self.sent
        print(f"canary {self.topic}: {self.received} round trips, longest {self.max_gap * 1000:.0f} ms")
        assert self.max_gap < max_gap, f"canary stalled {self.max_gap:.2f} s"
        self.pub.close()
        self.sub.close()


def qos1_round_trip(addr, name):
    sub = Paho(addr, f"{name}-s", v5=True)
    sub.subscribe(f"rt/{name}", 1)
    pub = Paho(addr, f"{name}-p", v5=True)
    assert pub.publish_rc(f"rt/{name}", b"ok", 1) == 0
    assert sub.message().payload == b"ok"
    pub.close()
    sub.close()


# ---------------------------------------------------------------------------------------------
# 1. Two clients with one client id
# ---------------------------------------------------------------------------------------------

def test_two_clients_with_one_client_id_cannot_crash_a_shard(broker):
    """Devices share a client id, each looping CONNECT → CONNACK → SUBSCRIBE → close as fast as
    they can, two on each shard (3.1.1 and 5.0): every takeover races another. Nothing may panic; the canary
    keeps round-tripping; afterwards both shards answer CONNECTs and QoS 1 on each works."""
    canary = Canary(broker.shard(0), broker.shard(1), "twins")
    done = time.monotonic() + 4
    counts = [0, 0, 0, 0]
    errors = []

    def twin(i, v5):
        try:
            while time.monotonic() < done:
                c = Raw(broker.shard(i))
                c.send(connect_packet("twin", v5=v5))
                first = c.packet()
                if first is not None and first[0] == 2:
                    c.send(subscribe_packet(1, "twin/#", 1, v5=v5))
                    counts[i + 2 * v5] += 1
                c.close()
        except Exception as e:
            errors.append(repr(e))

    threads = [threading.Thread(target=twin, args=(i % 2, i >= 2)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    print(f"connections: {counts}")
    assert min(counts) > 20, counts
    assert broker.proc.poll() is None, "the broker died"
    canary.check(max_gap=3.0)
    for i in range(2):
        qos1_round_trip(broker.shard(i), f"after-twins-{i}")


# ---------------------------------------------------------------------------------------------
# A shard that panics anyway
# ---------------------------------------------------------------------------------------------

def test_a_panicking_shard_ends_the_process_instead_of_leaving_it_half_working():
    """A panic on shard 1 (fault injection) must not leave shard 0 serving half a broker: the
    process exits abnormally, saying why, for its supervisor to restart it."""
    data = os.path.join("/tmp", f"sluice-panic-{os.getpid()}")
    env = dict(os.environ, SLUICE_LOG="warn", SLUICE_FAILPOINT="shard-panic:1")
    p = subprocess.Popen([sluice_bin(), "--listen", "127.0.0.1:0", "--cores", "2", "--data-dir", data,
                          "--sys-interval", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, env=env)
    try:
        rc = p.wait(WAIT * 2)
    except subprocess.TimeoutExpired:
        p.kill()
        raise AssertionError("the process kept running with a dead shard")
    err = p.stderr.read()
    assert rc != 0, rc
    assert "shard 1 panics" in err and "supervisor restarts sluice" in err, err[-2000:]


# ---------------------------------------------------------------------------------------------
# 2. Subscribers that never acknowledge or never read
# ---------------------------------------------------------------------------------------------

def test_subscribers_that_never_ack_or_never_read_slow_publishers_only_for_the_bound(broker, paho):
    """One subscriber to `#` at QoS 1 never sends PUBACK, another never reads its socket, both with
    keep-alive 0. A QoS 1 publisher sends 2,000 messages with 20 in flight (paho's default): each must be
    acknowledged, the longest wait for one within the 1 s bound plus slack, and a canary
    subscriber gets all 2,000 in order."""
    silent = []
    for i, reads in [(0, True), (1, False)]:
        c = Raw(broker.shard(i))
        c.send(connect_packet(f"silent-{i}", v5=True))
        assert c.packet()[0] == 2
        c.send(subscribe_packet(1, "#", 1, v5=True))
        assert c.packet()[0] == 9
        if not reads:
            c.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        silent.append((c, reads))
    stop = threading.Event()

    def read_never_ack(c):
        while not stop.is_set():
            try:
                c.s.settimeout(0.2)
                if not c.s.recv(65536):
                    return
            except socket.timeout:
                pass
            except OSError:
                return

    reader = threading.Thread(target=read_never_ack, args=(silent[0][0],), daemon=True)
    reader.start()
    canary = paho(broker.shard(1), "bp-canary", v5=True)
    canary.subscribe("bp/#", 1)
    pub = paho(broker.shard(0), "bp-publisher", v5=True)
    acked = []
    ack_times = []

    def on_publish(c, u, mid, rc, p):
        acked.append(rc.value)
        ack_times.append(time.monotonic())

    pub.c.on_publish = on_publish
    t0 = time.monotonic()
    for i in range(2000):
        pub.c.publish(f"bp/{i % 7}", str(i).encode(), 1)
    deadline = time.monotonic() + 60
    while len(acked) < 2000 and time.monotonic() < deadline:
        time.sleep(0.05)
    elapsed = time.monotonic() - t0
    stop.set()
    # The publisher always has 20 in flight, so the longest gap between acknowledgements is the
    # longest any publish was held.
    times = [t0] + ack_times
    longest = max(b - a for a, b in zip(times, times[1:])) if ack_times else float("inf")
    print(f"{len(acked)} of 2000 QoS 1 acknowledged in {elapsed:.2f} s, longest gap {longest * 1000:.0f} ms")
    assert len(acked) == 2000, f"only {len(acked)} of 2000 acknowledged in 60 s"
    assert set(acked) == {0}, set(acked)
    assert longest < 3.0, f"publishers held {longest:.2f} s (bound 1 s)"
    got = [canary.message().payload for _ in range(2000)]
    assert got == [str(i).encode() for i in range(2000)]
    assert broker.proc.poll() is None
    for c, _ in silent:
        c.close()


# ---------------------------------------------------------------------------------------------
# 7. A 3.1.1 client past the QoS 2 window
# ---------------------------------------------------------------------------------------------

def test_a_311_client_past_the_qos2_window_is_flow_controlled_not_disconnected(broker, paho):
    """3.1.1 has no Receive Maximum: a client that pipelines 150 QoS 2 publishes (the broker's
    window is 64) gets PUBRECs for what was accepted and, as it releases them, for the rest — no
    disconnect — and the subscriber gets all 150 once, in order."""
    sub = paho(broker.shard(1), "q2-reader", v5=True)
    sub.subscribe("q2/x", 2)
    canary = Canary(broker.shard(0), broker.shard(1), "q2")
    c = Raw(broker.shard(0))
    c.send(connect_packet("q2-writer"))
    assert c.packet()[0] == 2
    c.send(b"".join(publish_packet("q2/x", str(i).encode(), qos=2, pid=i) for i in range(1, 151)))
    comps = set()
    while len(comps) < 150:
        p = c.packet()
        assert p is not None, f"disconnected after {len(comps)} PUBCOMPs"
        kind, _, body = p
        pid = struct.unpack("!H", body[:2])[0]
        if kind == 5:  # PUBREC: release it
            c.send(packet(0x62, struct.pack("!H", pid)))
        elif kind == 7:
            comps.add(pid)
    got = [sub.message().payload for _ in range(150)]
    assert got == [str(i).encode() for i in range(1, 151)]
    sub.no_message()
    c.close()
    canary.check(max_gap=3.0)
