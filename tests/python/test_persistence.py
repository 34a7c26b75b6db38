"""What survives a restart of the broker: retained messages (and, with local-durable delivery,
the spill log — see test_spill.py)."""
import tempfile

from conftest import Broker


def retained_of(b, paho, n):
    s = paho(b.shard(0), f"reader-{id(b)}")
    s.subscribe("keep/#", 1)
    got = {}
    while len(got) < n:
        m = s.message()
        assert m.retain
        got[m.topic] = m.payload
    s.no_message(0.5)
    return got


def test_retained_messages_survive_restart_and_a_new_shard_count(paho):
    data_dir = tempfile.mkdtemp(prefix="sluice-retained-")
    b1 = Broker(data_dir=data_dir)
    want = {}
    try:
        p = paho(b1.shard(0), "retainer", v5=True)
        for i in range(20):
            p.publish(f"keep/{i}", f"v{i}".encode(), 1, retain=True)
            want[f"keep/{i}"] = f"v{i}".encode()
        p.publish("keep/3", b"replaced", 1, retain=True)
        want["keep/3"] = b"replaced"
        p.publish("keep/7", b"", 1, retain=True)  # cleared
        del want["keep/7"]
        p.publish("plain/x", b"not retained", 1)
        assert retained_of(b1, paho, len(want)) == want
    finally:
        b1.stop()  # SIGTERM
    b2 = Broker(data_dir=data_dir)
    try:
        assert retained_of(b2, paho, len(want)) == want
        p = paho(b2.shard(1), "retainer2")
        p.publish("keep/0", b"after restart", 1, retain=True)
        want["keep/0"] = b"after restart"
    finally:
        b2.stop()
    b3 = Broker(data_dir=data_dir, cores=1)  # topics move to the one remaining shard
    try:
        assert retained_of(b3, paho, len(want)) == want
    finally:
        b3.stop()
    b4 = Broker(data_dir=data_dir)  # and back to two
    try:
        assert retained_of(b4, paho, len(want)) == want
    finally:
        b4.stop()


def expiry(seconds):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = seconds
    return p


def test_persistent_sessions_survive_sigkill_and_a_new_shard_count(paho):
    """Subscriptions and offline queues of persistent sessions (MQTT 5 session expiry, 3.1.1
    clean session 0) come back after SIGKILL; clean sessions do not. A SUBACK, and the PUBACK of
    a message queued for a persistent session on the publisher's shard, mean it is on disk."""
    data_dir = tempfile.mkdtemp(prefix="sluice-sessions-")
    b1 = Broker(data_dir=data_dir)
    try:
        d5 = paho(b1.shard(1), "dev-5", v5=True, clean=False, props=expiry(3600))
        d5.subscribe("cmd/dev-5/#", 1)
        d3 = paho(b1.shard(0), "dev-3", clean=False)
        d3.subscribe("cmd/dev-3/#", 2)
        gone = paho(b1.shard(0), "clean-one")
        gone.subscribe("cmd/#", 1)
        d5.close()
        d3.close()
        # Publishers on the shard hosting each offline session.
        a1 = paho(b1.shard(1), "app-1", v5=True)
        a0 = paho(b1.shard(0), "app-0")
        for i in range(5):
            a1.publish(f"cmd/dev-5/{i}", f"five-{i}".encode(), 1)
            a0.publish(f"cmd/dev-3/{i}", f"three-{i}".encode(), 2)
        a0.publish("cmd/dev-3/q0", b"qos 0 is not queued", 0)
    finally:
        b1.kill()  # SIGKILL: only what was committed survives
    b2 = Broker(data_dir=data_dir, cores=1)  # every session moves to the one shard left
    try:
        d5 = paho(b2.shard(0), "dev-5", v5=True, clean=False, props=expiry(3600))
        assert d5.flags.session_present
        got = [(m.topic, m.payload, m.qos) for m in (d5.message() for _ in range(5))]
        assert got == [(f"cmd/dev-5/{i}", f"five-{i}".encode(), 1) for i in range(5)]
        d3 = paho(b2.shard(0), "dev-3", clean=False)
        assert d3.flags.session_present
        got = [(m.topic, m.payload, m.qos) for m in (d3.message() for _ in range(5))]
        assert got == [(f"cmd/dev-3/{i}", f"three-{i}".encode(), 2) for i in range(5)]
        d3.no_message(0.3)
        # The subscriptions are live again.
        app = paho(b2.shard(0), "app")
        app.publish("cmd/dev-5/live", b"after restart", 1)
        m = d5.message()
        assert (m.topic, m.payload) == ("cmd/dev-5/live", b"after restart")
        # A clean session was never stored.
        again = paho(b2.shard(0), "clean-one", clean=False)
        assert not again.flags.session_present
        again.close()
        d5.close()  # offline again; its session goes on
    finally:
        b2.stop()
    b3 = Broker(data_dir=data_dir)  # back to two shards, after a clean stop
    try:
        app = paho(b3.shard(1), "app")
        d5 = paho(b3.shard(1), "dev-5", v5=True, clean=False, props=expiry(3600))
        assert d5.flags.session_present
        app.publish("cmd/dev-5/two", b"two shards", 1)
        assert d5.message().payload == b"two shards"
        # Ending the session (clean start) removes it from the store too.
        d5.close()
        d5 = paho(b3.shard(0), "dev-5", v5=True, clean=True)
        d5.close()
    finally:
        b3.stop()
    b4 = Broker(data_dir=data_dir)
    try:
        d5 = paho(b4.shard(0), "dev-5", v5=True, clean=False, props=expiry(3600))
        assert not d5.flags.session_present
    finally:
        b4.stop()
