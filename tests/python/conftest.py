"""Pytest harness: the real sluice binary on free ports, two shards, one extra listener per shard.

`broker.shard(i)` is a (host, port) served by shard i, so tests can force a publisher and a
subscriber onto different cores. Every wait has a deadline; nothing sleeps to "let things settle".
"""
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

ROOT = Path(__file__).resolve().parents[2]
WAIT = 10.0


def sluice_bin():
    p = os.environ.get("SLUICE_BIN") or str(ROOT / "target" / "debug" / "sluice")
    assert Path(p).exists(), f"{p} missing: run `cargo build --bin sluice` first"
    return p


class Broker:
    def __init__(self, *extra, cores=2):
        self.data_dir = tempfile.mkdtemp(prefix="sluice-py-")
        args = [sluice_bin(), "--listen", "127.0.0.1:0", "--cores", str(cores), "--print-listen",
                "--data-dir", self.data_dir]
        for _ in range(cores):
            args += ["--shard-listen", "127.0.0.1:0"]
        if "--sys-interval" not in extra:
            args += ["--sys-interval", "0"]
        args += list(extra)
        env = dict(os.environ, SLUICE_LOG="warn")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
        self.addr = None
        self.shards = [None] * cores
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + WAIT
        while self.addr is None or None in self.shards:
            w = lines.get(timeout=max(0.01, deadline - time.monotonic())).split()
            if w[:1] == ["listening"]:
                self.addr = parse(w[1])
            elif w[:1] == ["shard"] and w[2] == "listening":
                self.shards[int(w[1])] = parse(w[3])

    def shard(self, i):
        return self.shards[i]

    @property
    def port(self):
        return self.addr[1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def parse(hostport):
    host, port = hostport.rsplit(":", 1)
    return host, int(port)


@pytest.fixture
def broker():
    b = Broker()
    yield b
    b.stop()


class Paho:
    """paho-mqtt with queues instead of callbacks, so tests read like a script."""

    def __init__(self, addr, client_id, v5=False, clean=True, will=None, props=None, keepalive=60):
        self.v5 = v5
        proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
        kw = {} if v5 else {"clean_session": clean}
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=proto, **kw)
        self.messages = queue.Queue()
        self.events = queue.Queue()
        self.c.on_message = lambda c, u, m: self.messages.put(m)
        self.c.on_connect = lambda c, u, f, rc, p: self.events.put(("connect", f, rc, p))
        self.c.on_disconnect = lambda c, u, f, rc, p: self.events.put(("disconnect", f, rc, p))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("subscribe", mid, rcs, p))
        self.c.on_publish = lambda c, u, mid, rc, p: self.events.put(("publish", mid, rc, p))
        if will:
            self.c.will_set(*will)
        self.c.reconnect_delay_set(60, 60)  # tests decide when to reconnect
        kwargs = {"clean_start": clean, "properties": props} if v5 else {}
        self.c.connect(addr[0], addr[1], keepalive, **kwargs)
        self.c.loop_start()
        ev = self.event("connect")
        self.flags, self.rc, self.connack_props = ev[1], ev[2], ev[3]

    def event(self, kind):
        deadline = time.monotonic() + WAIT
        while True:
            ev = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if ev[0] == kind:
                return ev

    def subscribe(self, topic, qos=0, **kw):
        self.c.subscribe(topic, qos, **kw) if not isinstance(topic, list) else self.c.subscribe(topic)
        return self.event("subscribe")

    def publish(self, topic, payload, qos=0, retain=False, props=None):
        info = self.c.publish(topic, payload, qos, retain, properties=props)
        info.wait_for_publish(WAIT)
        assert info.is_published()
        return info

    def message(self, timeout=WAIT):
        return self.messages.get(timeout=timeout)

    def no_message(self, timeout=0.3):
        try:
            m = self.messages.get(timeout=timeout)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message on {m.topic}: {m.payload!r}")

    def close(self):
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture
def paho():
    made = []

    def make(*a, **kw):
        p = Paho(*a, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        try:
            p.close()
        except Exception:
            pass
