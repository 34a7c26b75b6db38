"""Interop with the mosquitto_pub / mosquitto_sub command-line clients (Debian's mosquitto-clients)."""
import signal
import subprocess
import time

import pytest

WAIT = 10


def sub_proc(addr, *args):
    return subprocess.Popen(["mosquitto_sub", "-h", addr[0], "-p", str(addr[1]), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pub(addr, *args):
    subprocess.run(["mosquitto_pub", "-h", addr[0], "-p", str(addr[1]), *args], check=True, timeout=WAIT)



@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
@pytest.mark.parametrize("qos", ["0", "1", "2"])
def test_pub_sub_cross_shard(broker, version, qos):
    # -C: exit after N messages. The first message is a retained "ready" marker so we know the
    # subscription is live before the real publishes (no sleeps).
    pub(broker.shard(0), "-V", version, "-t", "mq/ready", "-m", "ready", "-r", "-q", "1")
    s = sub_proc(broker.shard(1), "-V", version, "-t", "mq/#", "-q", qos, "-C", "11", "-v")
    # Wait for the retained marker to prove the subscription exists.
    line = s.stdout.readline().strip()
    assert line == "mq/ready ready"
    for i in range(10):
        pub(broker.shard(0), "-V", version, "-t", f"mq/{i}", "-m", f"msg{i}", "-q", qos)
    out, _ = s.communicate(timeout=WAIT)
    assert out.split("\n")[:10] == [f"mq/{i} msg{i}" for i in range(10)]


def test_retained_with_mosquitto(broker):
    pub(broker.shard(0), "-t", "r/a", "-m", "A", "-r")
    pub(broker.shard(1), "-t", "r/b", "-m", "B", "-r")
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "r/#", "-C", "2", "-v",
                          "-W", str(WAIT)], capture_output=True, text=True, timeout=WAIT + 5, check=True).stdout
    assert sorted(out.split("\n")[:2]) == ["r/a A", "r/b B"]


def test_will_via_mosquitto_sub_killed(broker):
    watcher = sub_proc(broker.shard(0), "-t", "wills/#", "-C", "2", "-v", "-q", "1")
    # A retained marker proves the watcher is subscribed.
    pub(broker.shard(1), "-t", "wills/ready", "-m", "ready", "-r", "-q", "1")
    assert watcher.stdout.readline().strip() == "wills/ready ready"
    victim = sub_proc(broker.shard(1), "-t", "nothing", "--will-topic", "wills/victim", "--will-payload", "dead",
                      "--will-qos", "1", "-i", "victim")
    # The victim is connected once the broker has its session: a takeover probe would disturb it,
    # so poll the victim's own subscription with a retained message instead.
    pub(broker.shard(0), "-t", "nothing", "-m", "x", "-r", "-q", "1")
    deadline = time.monotonic() + WAIT
    assert victim.stdout.readline().strip() == "x"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out, _ = watcher.communicate(timeout=max(1, deadline - time.monotonic()))
    assert out.strip() == "wills/victim dead"


def test_v5_user_properties_from_mosquitto_pub(broker):
    pub(broker.shard(0), "-t", "up/ready", "-m", "ready", "-r")
    s = sub_proc(broker.shard(1), "-V", "mqttv5", "-t", "up/#", "-C", "2", "-F", "%t %P %p")
    assert s.stdout.readline().strip() == "up/ready  ready"
    pub(broker.shard(0), "-V", "mqttv5", "-t", "up/x", "-m", "hi", "-D", "publish", "user-property", "k", "v")
    out, _ = s.communicate(timeout=WAIT)
    assert out.strip() == "up/x k:v hi"
