"""Pytest harness: the real sluice binary on free ports, two shards, one extra listener per shard.

`broker.shard(i)` is a (host, port) served by shard i, so tests can force a publisher and a
subscriber onto different cores. Every wait has a deadline; nothing sleeps to "let things settle".
"""
import os
import queue
import resource
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
    def __init__(self, *extra, cores=2, data_dir=None, nofile=None):
        self.keep_data = data_dir is not None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="sluice-py-")
        args = [sluice_bin(), "--listen", "127.0.0.1:0", "--cores", str(cores), "--print-listen",
                "--data-dir", self.data_dir]
        for _ in range(cores):
            args += ["--shard-listen", "127.0.0.1:0"]
        if "--sys-interval" not in extra:
            args += ["--sys-interval", "0"]
        # SLUICE_IO_DRIVER=io-uring runs a suite on the io_uring driver (scripts/test does, for
        # the files that exercise the driver's edge cases); the default is the binary's (epoll).
        if os.environ.get("SLUICE_IO_DRIVER") and "--io-driver" not in extra:
            args += ["--io-driver", os.environ["SLUICE_IO_DRIVER"]]
        args += list(extra)
        env = dict(os.environ, SLUICE_LOG=os.environ.get("SLUICE_LOG", "warn"))
        # `nofile`: the broker's open-file limit, for running it out of descriptors.
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env, preexec_fn=limit)
        self.addr = None
        self.shards = [None] * cores
        # Every configured listener: index -> (kind, (host, port)); 0 is --listen.
        self.listeners = {}
        # `--http ADDR`: the HTTP endpoint's (host, port), printed before the listeners.
        self.http = None
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + WAIT
        while self.addr is None or None in self.shards:
            w = lines.get(timeout=max(0.01, deadline - time.monotonic())).split()
            if w[:1] == ["listening"]:
                self.addr = parse(w[1])
            elif w[:1] == ["http"]:
                self.http = parse(w[1])
            elif w[:1] == ["listener"]:
                self.listeners[int(w[1])] = (w[2], parse(w[3]))
            elif w[:1] == ["shard"] and w[2] == "listening":
                self.shards[int(w[1])] = parse(w[3])

    def shard(self, i):
        return self.shards[i]

    @property
    def port(self):
        return self.addr[1]

    def kill(self):
        """SIGKILL: no clean shutdown, nothing flushed beyond what the broker already made durable."""
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.keep_data:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def wait_for(cond, what, timeout=WAIT):
    """Polls `cond` until it returns something true (returned), failing after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


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

    def __init__(self, addr, client_id, v5=False, clean=True, will=None, props=None, keepalive=60, user=None,
                 password=None):
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
        if user is not None or password is not None:
            self.c.username_pw_set(user, password)
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

    def publish_rc(self, topic, payload, qos=1, timeout=WAIT):
        """Publishes and returns the reason code of the PUBACK/PUBREC (MQTT 5)."""
        codes = []
        previous = self.c.on_publish
        self.c.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
        try:
            self.c.publish(topic, payload, qos).wait_for_publish(timeout)
        finally:
            self.c.on_publish = previous
        assert len(codes) == 1, codes
        return codes[0]

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


# ---------------------------------------------------------------------------------------------
# Kafka: a real Kafka-compatible broker (tansu, in-memory storage) on a free port.
# ---------------------------------------------------------------------------------------------

def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tansu_bin():
    p = shutil.which("tansu") or str(Path.home() / ".cargo" / "bin" / "tansu")
    assert Path(p).exists(), "tansu missing: scripts/install-test-deps installs it"
    return p


class Tansu:
    def __init__(self, port=None, advertised_port=None):
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        url = f"tcp://127.0.0.1:{self.port}"
        advertised = f"tcp://127.0.0.1:{advertised_port}" if advertised_port else url
        self.log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", advertised,
             "--storage-engine", "memory://tansu/"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def wait_ready(self):
        from confluent_kafka.admin import AdminClient
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, open(self.log.name).read()
            try:
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=1)
                return
            except Exception:
                assert time.monotonic() < deadline, "tansu did not come up"
                time.sleep(0.1)

    def create_topic(self, name, partitions=3):
        from confluent_kafka.admin import AdminClient, NewTopic
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        fs = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
        for f in fs.values():
            f.result(WAIT)
        deadline = time.monotonic() + WAIT
        while name not in admin.list_topics(timeout=WAIT).topics:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def consume(self, topic, n, timeout=30, bootstrap=None, **extra):
        """The first `n` records of `topic` (all partitions, from the start), or fewer at timeout.
        `extra`: librdkafka settings (dots as underscores), e.g. for SASL in front of tansu."""
        from confluent_kafka import Consumer, TopicPartition
        conf = {"bootstrap.servers": bootstrap or self.bootstrap, "group.id": f"t-{time.monotonic_ns()}",
                "enable.auto.commit": False, "auto.offset.reset": "earliest"}
        conf.update({k.replace("_", "."): v for k, v in extra.items()})
        c = Consumer(conf)
        parts = c.list_topics(topic, timeout=WAIT).topics[topic].partitions
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is None or m.error():
                continue
            got.append(m)
        c.close()
        return got

    def pause(self):
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        self.resume()
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def kafka():
    t = Tansu()
    yield t
    t.stop()


def broker_with(*args, cores=2, config=None, data_dir=None):
    extra = list(args)
    if config is not None:
        f = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
        f.write(config)
        f.close()
        extra += ["--config", f.name]
    return Broker(*extra, cores=cores, data_dir=data_dir)


class FrontedBridge:
    """tansu behind a front (TLS terminator, SASL front) whose address it advertises, and a sluice
    broker bridging `s/#` to `topic` on cluster `secure`, reached through the front with
    `cluster_settings` (TOML lines: tls, sasl, time-outs…). Use as a context manager."""

    def __init__(self, make_front, cluster_settings, topic="never"):
        self.front_port, plain_port = free_port(), free_port()
        self.front = make_front(self.front_port, plain_port)
        self.kafka = Tansu(port=plain_port, advertised_port=self.front_port)
        self.topic = topic
        # Failures reach the publisher (the tests check the reason code) instead of the spill log.
        config = f"""
[kafka]
spill_on_timeout = false

[kafka.clusters.secure]
bootstrap = ["127.0.0.1:{self.front_port}"]
{cluster_settings}

[[mqtt_to_kafka]]
name = "secure"
filters = ["s/#"]
destinations = [{{ cluster = "secure", topic = "{topic}" }}]
"""
        self.broker = broker_with(config=config)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.broker.stop()
        self.kafka.stop()
        self.front.close()
