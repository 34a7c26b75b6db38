"""MQTT behaviour seen through paho-mqtt (an independent client), 3.1.1 and 5.0, across shards."""
import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions


def test_v311_all_qos_cross_shard_in_order(broker, paho):
    sub = paho(broker.shard(1), "sub311")
    sub.subscribe("fleet/+/speed", 2)
    pub = paho(broker.shard(0), "pub311")
    for qos in (0, 1, 2):
        for i in range(50):
            pub.publish("fleet/car-1/speed", f"{qos}:{i}", qos)
    got = [sub.message() for _ in range(150)]
    assert [m.payload.decode() for m in got] == [f"{q}:{i}" for q in (0, 1, 2) for i in range(50)]
    assert [m.qos for m in got] == [q for q in (0, 1, 2) for _ in range(50)]


def test_v5_properties_pass_through_unchanged(broker, paho):
    sub = paho(broker.shard(0), "sub5", v5=True)
    sub.subscribe("req/#", 1)
    pub = paho(broker.shard(1), "pub5", v5=True)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "resp/42"
    props.CorrelationData = b"\x00\x01corr"
    props.UserProperty = [("a", "1"), ("b", "2"), ("a", "3")]
    props.ContentType = "text/plain"
    props.PayloadFormatIndicator = 1
    pub.publish("req/x", "ping", 1, props=props)
    m = sub.message()
    p = m.properties
    assert m.payload == b"ping"
    assert p.ResponseTopic == "resp/42"
    assert p.CorrelationData == b"\x00\x01corr"
    assert p.UserProperty == [("a", "1"), ("b", "2"), ("a", "3")]
    assert p.ContentType == "text/plain"
    assert p.PayloadFormatIndicator == 1


def test_v5_request_response_round_trip(broker, paho):
    responder = paho(broker.shard(0), "responder", v5=True)
    responder.subscribe("svc/echo", 1)
    requester = paho(broker.shard(1), "requester", v5=True)
    requester.subscribe("svc/reply/requester", 1)
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = "svc/reply/requester"
    props.CorrelationData = b"id-7"
    requester.publish("svc/echo", "hello", 1, props=props)
    req = responder.message()
    reply = Properties(PacketTypes.PUBLISH)
    reply.CorrelationData = req.properties.CorrelationData
    responder.publish(req.properties.ResponseTopic, b"echo:" + req.payload, 1, props=reply)
    m = requester.message()
    assert (m.payload, m.properties.CorrelationData) == (b"echo:hello", b"id-7")


def test_retained_and_clear(broker, paho):
    pub = paho(broker.shard(0), "rpub")
    pub.publish("status/dev1", "online", 1, retain=True)
    s1 = paho(broker.shard(1), "rs1")
    s1.subscribe("status/#", 1)
    m = s1.message()
    assert (m.topic, m.payload, m.retain) == ("status/dev1", b"online", True)
    pub.publish("status/dev1", "", 1, retain=True)
    pub.publish("status/marker", "m", 1)
    assert s1.message().payload == b""  # the clear is delivered live
    assert s1.message().topic == "status/marker"
    s2 = paho(broker.shard(1), "rs2")
    s2.subscribe("status/#", 1)
    pub.publish("status/marker", "m2", 1)
    assert s2.message().payload == b"m2", "a cleared retained message must not be delivered"


def test_persistent_session_v311_offline_queue(broker, paho):
    s = paho(broker.shard(0), "offline311", clean=False)
    s.subscribe("cmd/#", 1)
    s.close()
    pub = paho(broker.shard(1), "opub")
    for i in range(20):
        pub.publish("cmd/x", str(i), 1)
    s = paho(broker.shard(1), "offline311", clean=False)
    assert s.flags.session_present
    assert [s.message().payload.decode() for _ in range(20)] == [str(i) for i in range(20)]


def test_v5_shared_subscription_each_message_once(broker, paho):
    members = [paho(broker.shard(i % 2), f"worker{i}", v5=True) for i in range(3)]
    for m in members:
        m.subscribe("$share/workers/tasks/#", 1)
    pub = paho(broker.shard(0), "tasks", v5=True)
    for i in range(30):
        pub.publish("tasks/t", str(i), 1)
    seen = []
    for m in members:
        while True:
            try:
                seen.append(int(m.message(timeout=0.5).payload))
            except Exception:
                break
    assert sorted(seen) == list(range(30))


def test_v5_takeover_reason_code(broker, paho):
    first = paho(broker.shard(0), "dup-id", v5=True)
    paho(broker.shard(1), "dup-id", v5=True)
    ev = first.event("disconnect")
    assert ev[2] == 0x8E


def test_v5_subscription_options(broker, paho):
    c = paho(broker.shard(0), "opts", v5=True)
    c.subscribe([("loop/#", SubscribeOptions(qos=1, noLocal=True))])
    c.publish("loop/me", "mine", 1)
    other = paho(broker.shard(1), "other", v5=True)
    other.publish("loop/them", "theirs", 1)
    assert c.message().payload == b"theirs"
    c.no_message()


def test_v5_will_with_properties(broker, paho):
    watcher = paho(broker.shard(1), "watcher", v5=True)
    watcher.subscribe("lwt/#", 1)
    import socket
    # A paho client whose socket dies: the broker must publish its will.
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="doomed", protocol=mqtt.MQTTv5)
    wp = Properties(PacketTypes.WILLMESSAGE)
    wp.UserProperty = [("why", "crash")]
    c.will_set("lwt/doomed", "gone", 1, properties=wp)
    c.connect(*broker.shard(0))
    c.loop_start()
    c.socket().shutdown(socket.SHUT_RDWR)
    m = watcher.message()
    assert (m.topic, m.payload) == ("lwt/doomed", b"gone")
    assert m.properties.UserProperty == [("why", "crash")]
    c.loop_stop()
