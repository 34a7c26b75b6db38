"""The load generator's own accounting, against the real broker: what it reports as sent (QoS 1:
acknowledged) arrives, in both ways of driving clients, and the JSON line carries the numbers
BENCHMARKS.md is built from."""

import json
import os
import subprocess

import pytest

from conftest import ROOT, Broker


def perf_bin():
    p = os.environ.get("SLUICE_PERF_BIN") or str(ROOT / "target" / "debug" / "sluice-perf")
    assert os.path.exists(p), f"{p} missing: run `cargo build --bin sluice-perf` first"
    return p


def run(*args):
    out = subprocess.run([perf_bin(), *args], capture_output=True, text=True, timeout=120, check=True)
    return json.loads([l for l in out.stdout.splitlines() if l.startswith("{")][-1])


@pytest.mark.parametrize("io", ["threads", "epoll"])
def test_p2p_qos1_everything_acknowledged_arrives(io):
    b = Broker(cores=1)
    try:
        r = run("p2p", "--addr", "%s:%d" % b.shard(0), "--clients", "4", "--payload", "64", "--qos", "1",
                "--duration", "1", "--io", io, "--broker-pid", str(b.proc.pid), "--label", "t")
        assert r["sent"] > 100, r
        assert r["delivered"] == r["sent"], r
        assert r["drop_pct"] == 0, r
        assert 0 < r["p50_us"] <= r["p99_us"], r
        assert r["broker_cpu_s"] > 0, r
    finally:
        b.stop()


@pytest.mark.parametrize("io", ["threads", "epoll"])
@pytest.mark.parametrize("qos", [0, 1])
def test_to_kafka_counts_what_kafka_acknowledged_and_holds(kafka, io, qos):
    # What BENCHMARKS.md's MQTT → Kafka rows are made of: at QoS 1 every acknowledged publish is
    # a record Kafka acknowledged (sluice's counter) and holds (read back); at QoS 0 nothing is
    # lost on loopback either. The load's CPU covers the publishing only.
    topic = f"lg-{io}-{qos}"
    kafka.create_topic(topic, partitions=2)
    b = Broker("--http", "127.0.0.1:0", "--kafka", kafka.bootstrap, "--map", f"perf/#={topic}", cores=1)
    try:
        r = run("to-kafka", "--addr", "%s:%d" % b.shard(0), "--clients", "3", "--payload", "100", "--qos", str(qos),
                "--duration", "1", "--io", io, "--broker-pid", str(b.proc.pid), "--kafka", kafka.bootstrap,
                "--kafka-topic", topic, "--metrics", "%s:%d" % b.http, "--label", "t")
        assert r["sent"] > 100, r
        assert r["acked"] == r["sent"], r
        assert r["delivered"] == r["sent"], r
        assert r["acked_per_s"] > 0 and r["records_per_batch"] > 0, r
        assert r["load_cpu_s"] is not None and r["load_cpu_s"] >= 0, r
    finally:
        b.stop()


def test_epoll_refuses_what_it_cannot_drive():
    out = subprocess.run([perf_bin(), "to-kafka", "--kafka", "127.0.0.1:1", "--io", "epoll", "--qos", "2"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--io epoll drives" in out.stderr, out


def test_idle_reports_memory_per_connection():
    b = Broker(cores=1)
    try:
        r = run("idle", "--addr", "%s:%d" % b.shard(0), "--clients", "200", "--broker-pid", str(b.proc.pid))
        assert r["clients"] == 200
        assert 0 < r["kib_per_connection"] < 64, r
    finally:
        b.stop()
