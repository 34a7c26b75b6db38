"""A cluster of sluice nodes sharing routing, retained messages and membership through Kafka
(issue #17): several real sluice processes (separate data dirs) on one real tansu, real paho
clients on different nodes. Every wait has a deadline."""
import json
import time
import urllib.request

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import WAIT, Paho, Tansu, broker_with


def node_config(kafka, node, prefix, heartbeat_ms=300, dead_after_ms=3000):
    return f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]
linger_ms = 1

[cluster]
name = "t"
node_id = "{node}"
topic_prefix = "{prefix}"
heartbeat_ms = {heartbeat_ms}
dead_after_ms = {dead_after_ms}
partitions = 4
"""


def start_node(kafka, node, prefix, **kw):
    return broker_with("--http", "127.0.0.1:0", config=node_config(kafka, node, prefix, **kw))


def cluster_view(b):
    with urllib.request.urlopen(f"http://{b.http[0]}:{b.http[1]}/api/v1/cluster", timeout=WAIT) as r:
        return json.load(r)


def wait_for(cond, what, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def states(b):
    return {m["node"]: m["state"] for m in cluster_view(b)["members"]}


def connected(a, b, pub, sub, topic="probe/x"):
    """Waits until a message published on node `a` reaches a subscriber on node `b` (each
    node's consumer of the message topic is positioned at the end of it when it starts)."""
    sub.subscribe("probe/#", 1)
    deadline = time.monotonic() + 30
    n = 0
    while True:
        n += 1
        pub.publish(topic, f"p{n}", qos=1)
        try:
            m = sub.message(timeout=0.5)
            if m.topic.startswith("probe/"):
                break
        except Exception:
            pass
        assert time.monotonic() < deadline, "cross-node path never came up"
    while True:  # drain later probes
        try:
            sub.message(timeout=0.5)
        except Exception:
            break
    sub.c.unsubscribe("probe/#")


@pytest.fixture(scope="module")
def kafka():
    t = Tansu()
    yield t
    t.stop()


@pytest.fixture
def three(kafka, request):
    prefix = f"c{time.monotonic_ns()}"
    nodes = [start_node(kafka, f"n{i}", prefix) for i in range(1, 4)]
    yield nodes, prefix
    for n in nodes:
        n.stop()


def test_nodes_see_each_other_and_a_killed_node_dies_and_a_stopped_one_leaves(three):
    nodes, _ = three
    for b in nodes:
        wait_for(lambda b=b: states(b) == {"n1": "alive", "n2": "alive", "n3": "alive"}, "three alive nodes")
    v = cluster_view(nodes[0])
    assert v["node"] == "n1" and v["topics_ready"] and v["name"] == "t"
    nodes[2].kill()
    wait_for(lambda: states(nodes[0]).get("n3") == "dead", "n3 dead on n1")
    nodes[1].stop()
    wait_for(lambda: states(nodes[0]).get("n2") == "left", "n2 left")
    # /metrics counts them by state.
    with urllib.request.urlopen(f"http://{nodes[0].http[0]}:{nodes[0].http[1]}/metrics", timeout=WAIT) as r:
        text = r.read().decode()
    assert 'sluice_cluster_nodes{cluster="t",state="alive"} 1' in text, text
    assert 'sluice_cluster_nodes{cluster="t",state="dead"} 1' in text
    assert 'sluice_cluster_nodes{cluster="t",state="left"} 1' in text


def test_publish_and_subscribe_across_nodes_at_every_qos_with_wildcards(three):
    nodes, _ = three
    pub = Paho(nodes[0].addr, "pub-1")
    subs = [Paho(nodes[i].addr, f"sub-{i}") for i in (1, 2)]
    try:
        for s in subs:
            connected(nodes[0], None, pub, s)
        subs[0].subscribe("fleet/+/speed", 2)
        subs[1].subscribe("fleet/#", 1)
        local = Paho(nodes[0].addr, "sub-local")
        local.subscribe("fleet/#", 2)
        sent = []
        for i in range(30):
            qos = i % 3
            topic = f"fleet/car-{i % 4}/speed" if i % 5 else f"fleet/car-{i}/temp"
            pub.publish(topic, f"m{i}", qos=qos)
            sent.append((topic, f"m{i}", qos))
        # paho hands a QoS 2 message over at its PUBREL, so later QoS 0/1 ones may overtake it
        # in the client: order is checked over QoS 0/1, the set and QoS over all.
        def check(sub, want):
            got = [sub.message() for _ in want]
            assert sorted((m.topic, m.payload.decode(), m.qos) for m in got) == sorted(want)
            low = [(m.topic, m.payload.decode()) for m in got if m.qos < 2]
            assert low == [(t, p) for t, p, q in want if q < 2], "order per publisher kept"

        check(subs[0], [(t, p, q) for t, p, q in sent if t.endswith("/speed")])
        check(subs[1], [(t, p, min(q, 1)) for t, p, q in sent])
        # The publisher's own node delivers once, not again from Kafka.
        check(local, sent)
        local.no_message(timeout=1.0)
        subs[0].no_message(timeout=0.2)
        subs[1].no_message(timeout=0.2)
        local.close()
    finally:
        pub.close()
        for s in subs:
            s.close()


def test_mqtt5_properties_cross_nodes_and_cannot_be_used_to_choose_the_topic(three):
    nodes, _ = three
    pub = Paho(nodes[0].addr, "pub5", v5=True)
    sub = Paho(nodes[1].addr, "sub5", v5=True)
    try:
        connected(nodes[0], nodes[1], pub, sub)
        sub.subscribe("cmd/#", 1)
        props = Properties(PacketTypes.PUBLISH)
        props.ContentType = "application/json"
        props.ResponseTopic = "reply/here"
        props.CorrelationData = b"\x00\x01corr"
        props.PayloadFormatIndicator = 1
        # A user property named like a header sluice writes must not redirect the message.
        props.UserProperty = [("a", "1"), ("a", "2"), ("mqtt.topic", "secret/topic"), ("sluice.node", "n9")]
        pub.publish("cmd/car-1", b'{"x":1}', qos=1, props=props)
        m = sub.message()
        assert m.topic == "cmd/car-1"
        p = m.properties
        assert p.ContentType == "application/json"
        assert p.ResponseTopic == "reply/here"
        assert p.CorrelationData == b"\x00\x01corr"
        assert p.PayloadFormatIndicator == 1
        assert p.UserProperty == [("a", "1"), ("a", "2"), ("mqtt.topic", "secret/topic"), ("sluice.node", "n9")]
    finally:
        pub.close()
        sub.close()


def test_retained_messages_reach_new_subscribers_on_every_node_and_a_late_node(kafka, three):
    nodes, prefix = three
    pub = Paho(nodes[0].addr, "rpub")
    sub = Paho(nodes[1].addr, "rsub-live")
    try:
        connected(nodes[0], nodes[1], pub, sub)
        pub.publish("state/car-1", "on", qos=1, retain=True)
        pub.publish("state/car-2", "off", qos=1, retain=True)
        pub.publish("state/car-2", "", qos=1, retain=True)  # deleted
        pub.publish("state/car-3", "v1", qos=1, retain=True)
        pub.publish("state/car-3", "v2", qos=1, retain=True)

        def retained_on(b, cid):
            c = Paho(b.addr, cid)
            try:
                c.subscribe("state/#", 1)
                got = {}
                deadline = time.monotonic() + 2
                while time.monotonic() < deadline:
                    try:
                        m = c.message(timeout=0.3)
                        got[m.topic] = (m.payload.decode(), m.retain)
                    except Exception:
                        pass
                return got
            finally:
                c.close()

        want = {"state/car-1": ("on", True), "state/car-3": ("v2", True)}
        for i, b in enumerate(nodes):
            wait_for(lambda b=b, i=i: retained_on(b, f"r{i}-{time.monotonic_ns()}") == want, f"retained on node {i}")
        # A node that starts later reads the retained table from its beginning.
        late = start_node(kafka, "n4", prefix)
        try:
            wait_for(lambda: retained_on(late, f"late-{time.monotonic_ns()}") == want, "retained on a late node")
        finally:
            late.stop()
    finally:
        pub.close()
        sub.close()


def test_acknowledged_qos1_messages_reach_a_persistent_session_of_a_node_that_was_killed(kafka, three):
    """A persistent session on node 2; node 2 is killed; node 1 keeps publishing QoS 1 (each
    acknowledged once it is in Kafka); node 2 restarts on its data dir and replays from its
    stored consumer position: the session gets every message, in order."""
    nodes, prefix = three
    import shutil
    import tempfile
    data = tempfile.mkdtemp(prefix="sluice-node-")
    n5 = broker_with("--http", "127.0.0.1:0", config=node_config(kafka, "n5", prefix), data_dir=data)
    pub = Paho(nodes[0].addr, "kpub")
    try:
        sub = Paho(n5.addr, "ksub", clean=False)
        connected(nodes[0], n5, pub, sub)
        sub.subscribe("k/#", 1)
        pub.publish("k/0", "before", qos=1)
        assert sub.message().payload == b"before"
        # Let the consumer position pass "before" on disk: wait until a restart would not
        # replay it is not observable; the test accepts a replayed duplicate of it below.
        sub.c.loop_stop()
        n5.kill()
        for i in range(1, 21):
            pub.publish("k/1", f"m{i}", qos=1)
        n5 = broker_with("--http", "127.0.0.1:0", config=node_config(kafka, "n5", prefix), data_dir=data)
        sub = Paho(n5.addr, "ksub", clean=False)
        assert sub.flags.session_present
        got = []
        deadline = time.monotonic() + 30
        while len([g for g in got if g != "before"]) < 20:
            assert time.monotonic() < deadline, got
            try:
                got.append(sub.message(timeout=1).payload.decode())
            except Exception:
                pass
        assert [g for g in got if g != "before"] == [f"m{i}" for i in range(1, 21)]
        sub.close()
    finally:
        pub.close()
        n5.stop()
        shutil.rmtree(data, ignore_errors=True)
