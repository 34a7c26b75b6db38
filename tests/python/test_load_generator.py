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


def test_idle_reports_memory_per_connection():
    b = Broker(cores=1)
    try:
        r = run("idle", "--addr", "%s:%d" % b.shard(0), "--clients", "200", "--broker-pid", str(b.proc.pid))
        assert r["clients"] == 200
        assert 0 < r["kib_per_connection"] < 64, r
    finally:
        b.stop()
