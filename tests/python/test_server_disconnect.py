"""A DISCONNECT the broker sends must reach the client even while the client keeps writing.

Closing a socket that still has unread input makes the kernel answer with a reset, and a reset
destroys what the peer has not read yet: the acknowledgements and the DISCONNECT with its reason
code. The broker shuts its write side down and drains input for a bounded time instead
(net/src/conns.rs, "lingering"). Driven over a raw socket against the real binary on two shards,
with a canary beside it."""

import socket
import struct
import threading
import time

import pytest

from conftest import WAIT, Broker
from rawmqtt import mqtt_str, packet, split, varint
from test_hostile_clients import Canary

PUBACK, PUBREC, DISCONNECT = 4, 5, 14
RECEIVE_MAXIMUM_EXCEEDED = 0x93
# Our Receive Maximum (`limits.max_inflight`, `--max-inflight`).
INFLIGHT = 4
PAYLOAD = b"x" * 1000


def connect_v5(client_id):
    # Nothing special announced: no properties, no Receive Maximum of its own.
    body = mqtt_str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", 0) + varint(0)
    return packet(0x10, body + mqtt_str(client_id))


def publish_v5(pid, qos):
    return packet(0x30 | (qos << 1), mqtt_str("flood/t") + struct.pack("!H", pid) + varint(0) + PAYLOAD)


def subscribe_v5(pid, topic, qos):
    return packet(0x82, struct.pack("!H", pid) + varint(0) + mqtt_str(topic) + bytes([qos]))


def flood(qos1_per_round):
    """Rounds of `qos1_per_round` QoS 1 PUBLISHes and one QoS 2 PUBLISH whose PUBREL never comes:
    the (INFLIGHT + 1)-th QoS 2 one exceeds the broker's Receive Maximum (sluice counts a client's
    unreleased QoS 2 messages against it; QoS 1 ones are acknowledged as they come). Returns the
    bytes, the packet ids of the QoS 2 PUBLISHes and the id of the offending one."""
    out = bytearray()
    qos2 = []
    pid = 0
    while True:
        for _ in range(qos1_per_round):
            pid += 1
            out += publish_v5(pid, 1)
        pid += 1
        out += publish_v5(pid, 2)
        qos2.append(pid)
        if len(qos2) == INFLIGHT + 1:
            return bytes(out), qos2[:-1], pid


class Reader:
    """The client's input, parsed: packets until the end of the stream or a reset."""

    def __init__(self, s):
        self.s = s
        self.buf = b""
        self.reset = None

    def packet(self, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while True:
            got = split(self.buf)
            if got:
                first, body, used = got
                self.buf = self.buf[used:]
                return first >> 4, body
            self.s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.s.recv(65536)
            except (ConnectionResetError, BrokenPipeError) as e:
                self.reset = e
                return None
            if not data:
                return None
            self.buf += data


@pytest.mark.parametrize("echo", [True, False], ids=["echoed", "acks-only"])
def test_disconnect_for_receive_maximum_reaches_a_client_that_keeps_writing(echo):
    """An MQTT 5 client that announces nothing special, with a small receive buffer, sends
    PUBLISHes far past the broker's Receive Maximum as fast as it can and goes on sending after
    the offending one, not reading. When it reads at last (still writing), it must find the
    acknowledgements in PUBLISH order with none missing in between, then DISCONNECT 0x93, then
    the end of the stream: no reset, which would destroy whatever it had not read yet.

    `echoed`: it also subscribes to its own topic at QoS 0, so the broker has megabytes to write
    to it and the DISCONNECT waits in the broker's kernel buffer (without the lingering close this
    one fails: reset). `acks-only`: the acknowledgements the broker sent before the DISCONNECT
    (those that had their receipts) must all arrive."""
    broker = Broker("--max-inflight", str(INFLIGHT))
    try:
        canary = Canary(broker.shard(1), broker.shard(0), "disconnect")
        acked = []
        for attempt in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            # A small window: what the broker writes waits in its kernel buffer, where a reset
            # destroys it.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
            s.settimeout(WAIT)
            s.connect(broker.shard(0))
            s.sendall(connect_v5(f"flooder-{attempt}"))
            r = Reader(s)
            kind, body = r.packet()
            assert kind == 2 and body[1] == 0, (kind, body)
            if echo:
                s.sendall(subscribe_v5(1, "flood/t", 0))
                kind, body = r.packet()
                assert kind == 9 and body[-1] == 0, (kind, body)

            burst, qos2, offending = flood(qos1_per_round=400)
            chunk = b"".join(publish_v5(p, 1) for p in range(offending + 1, offending + 101))
            after = [0]
            stop = threading.Event()
            write_error = []

            def writer():
                try:
                    s.sendall(burst)
                    # 4 MiB: more than enough to leave input unread at the close, and under the
                    # broker's bound on what it drains (`conns::LINGER_BYTES_MAX`).
                    while not stop.is_set() and after[0] < 4 << 20:
                        s.sendall(chunk)
                        after[0] += len(chunk)
                except OSError as e:  # the broker closed its side; expected
                    write_error.append(e)

            t = threading.Thread(target=writer, daemon=True)
            t.start()
            # Not reading until the broker has taken the offending PUBLISH and 1 MiB more (or the
            # writer stopped: the broker closed its side).
            deadline = time.monotonic() + WAIT
            while after[0] < 1 << 20 and t.is_alive():
                assert time.monotonic() < deadline, f"the client could not write: {after[0]} bytes"
                time.sleep(0.01)
            got = []
            while (p := r.packet()) is not None:
                got.append(p)
            stop.set()
            t.join(WAIT)
            s.close()
            kinds = [k for k, _ in got]
            acks = [(k, struct.unpack("!H", b[:2])[0], b[2:3]) for k, b in got if k in (PUBACK, PUBREC)]
            print(f"attempt {attempt}: {len(got)} packets read ({len(acks)} acknowledgements), "
                  f"{after[0]} bytes written after the offending PUBLISH, writer: {write_error[:1]}, "
                  f"reset: {r.reset!r}")
            assert r.reset is None, f"connection reset after {len(got)} packets: the DISCONNECT was lost"
            assert got and got[-1][0] == DISCONNECT, kinds[-5:]
            assert got[-1][1][:1] == bytes([RECEIVE_MAXIMUM_EXCEEDED]), got[-1]
            assert all(k in (PUBACK, PUBREC, 3) for k in kinds[:-1]), set(kinds)
            # Acknowledgements leave in PUBLISH order: what arrived is a prefix of the packet
            # ids sent (none lost in between), none for the offending PUBLISH or after it.
            pids = [p for _, p, _ in acks]
            assert pids == list(range(1, len(pids) + 1)) and len(pids) < offending, pids[-5:]
            assert all(k == (PUBREC if p in qos2 else PUBACK) for k, p, _ in acks)
            assert all(code in (b"", b"\x00") for _, _, code in acks), "an acknowledgement refused"
            acked.append(len(pids))
        if not echo:
            # The broker had read half of the PUBLISHes long before the offending one, so
            # acknowledgements went out before the DISCONNECT — unless one turn read the whole
            # burst before any receipt from the other shard came back (those still waiting when
            # the connection closed are not sent): in one attempt of three that can happen.
            assert any(acked), f"no acknowledgement arrived before the DISCONNECT in any attempt: {acked}"
        canary.check(max_gap=3.0)
        assert broker.proc.poll() is None, "the broker died"
    finally:
        broker.stop()
