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
