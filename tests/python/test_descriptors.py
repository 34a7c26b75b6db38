"""Out of file descriptors: the broker keeps serving the connections it has, refuses nothing it
accepted, and accepts the waiting ones once descriptors are free again."""

import os
import select
import socket
import struct

from conftest import Broker, Paho, WAIT

CONNACK_OK = b"\x20\x02\x00\x00"


def connect_packet(client_id):
    cid = client_id.encode()
    body = struct.pack("!H", 4) + b"MQTT" + bytes([4, 0x02]) + struct.pack("!H", 60) + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def answered_until_quiet(socks, quiet=1.0):
    """The sockets that got a CONNACK, collected until none arrives for `quiet` seconds."""
    pending, got = list(socks), []
    while pending:
        ready, _, _ = select.select(pending, [], [], quiet)
        if not ready:
            break
        for s in ready:
            assert s.recv(4) == CONNACK_OK
            got.append(s)
            pending.remove(s)
    return got


def broker_cpu_seconds(b):
    fields = open(f"/proc/{b.proc.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_running_out_of_descriptors_is_survived_and_waiting_clients_get_in():
    b = Broker(cores=1, nofile=64)
    try:
        socks = []
        for i in range(90):
            s = socket.create_connection(b.shard(0), timeout=WAIT)
            s.sendall(connect_packet(f"fd-{i}"))
            socks.append(s)
        # The broker accepts until its descriptors run out; the rest wait in the kernel's backlog.
        answered = answered_until_quiet(socks)
        waiting = [s for s in socks if s not in answered]
        assert 20 <= len(answered) < 64, len(answered)
        assert waiting, "with 64 descriptors some of 90 connections must wait"
        # Waiting for descriptors is not a busy loop.
        cpu = broker_cpu_seconds(b)
        assert answered_until_quiet(waiting, quiet=0.5) == []
        assert broker_cpu_seconds(b) - cpu < 0.25
        # Those it holds are served: a round trip on one of them.
        answered[0].sendall(b"\xc0\x00")  # PINGREQ
        answered[0].settimeout(WAIT)
        assert answered[0].recv(2) == b"\xd0\x00"  # PINGRESP
        # Free descriptors: the waiting connections get in, in a later accept round.
        for s in answered[: len(waiting) + 5]:
            s.close()
        for s in waiting:
            s.settimeout(WAIT)
            assert s.recv(4) == CONNACK_OK
        assert b.proc.poll() is None, "the broker must survive running out of descriptors"
        for s in socks:
            s.close()
        # And it is an ordinary broker again.
        sub = Paho(b.shard(0), "after-sub")
        sub.subscribe("fd/after", 1)
        pub = Paho(b.shard(0), "after-pub")
        pub.publish("fd/after", b"ok", qos=1)
        assert sub.message().payload == b"ok"
        sub.close()
        pub.close()
    finally:
        b.stop()
