"""Kafka → MQTT: records produced with confluent-kafka (librdkafka) reach MQTT subscribers
(paho-mqtt and mosquitto_sub) on both shards, transformed by the mapping."""
import json
import queue
import threading
import subprocess
import time
import uuid

from confluent_kafka import Producer

from conftest import WAIT, broker_with
from test_hostile_clients import Canary


def produce(bootstrap, topic, records):
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0})
    for key, value, headers in records:
        p.produce(topic, key=key, value=value, headers=headers)
    assert p.flush(WAIT) == 0


def test_commands_reach_devices_on_both_shards(kafka, paho):
    topic = f"commands-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=3)
    config = f"""
[[kafka_to_mqtt]]
name = "commands"
cluster = "default"
kafka_topics = ["{topic}"]
mqtt_topics = ["devices/${{key}}/commands"]
qos = 1
start = "earliest"
"""
    b = broker_with("--kafka", kafka.bootstrap, config=config)
    try:
        subs = {f"car-{i}": paho(b.shard(i % 2), f"car-{i}", v5=True) for i in range(4)}
        for dev, s in subs.items():
            s.subscribe(f"devices/{dev}/commands", 1)
        # mosquitto_sub on every device's topic; a retained marker tells us it is subscribed.
        subs["car-0"].publish("devices/marker/commands", b"ready", 1, retain=True)
        mosq = subprocess.Popen(["mosquitto_sub", "-h", b.shard(1)[0], "-p", str(b.shard(1)[1]), "-q", "1",
                                 "-t", "devices/+/commands", "-C", "21", "-V", "mqttv5", "-v"],
                                stdout=subprocess.PIPE, text=True)
        assert mosq.stdout.readline().split() == ["devices/marker/commands", "ready"]
        produce(kafka.bootstrap, topic, [
            (f"car-{n % 4}".encode(), f"cmd-{n}".encode(), [("trace", f"t{n}".encode())]) for n in range(20)
        ])
        for i, (dev, s) in enumerate(subs.items()):
            got = [s.message() for _ in range(5)]
            assert [m.payload.decode() for m in got] == [f"cmd-{n}" for n in range(20) if n % 4 == i], dev
            assert all(m.qos == 1 for m in got)
            assert got[0].properties.UserProperty == [("trace", f"t{i}")]
        out, _ = mosq.communicate(timeout=WAIT)
        car0 = [line.split()[1] for line in out.splitlines() if line.startswith("devices/car-0/")]
        assert car0 == [f"cmd-{n}" for n in range(20) if n % 4 == 0]
        assert len(out.splitlines()) == 20
    finally:
        b.stop()


def test_json_templates_multicast_retained_and_bad_records(kafka, paho):
    topic = f"cfg-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=1)
    config = f"""
[[kafka_to_mqtt]]
name = "config"
cluster = "default"
kafka_topics = ["{topic}"]
mqtt_topics = ["fleet/${{json./region}}/${{json./device}}/config", "audit/${{topic}}/${{partition}}"]
payload = "without:secret"
retain = true
start = "earliest"
"""
    b = broker_with("--kafka", kafka.bootstrap, "--sys-interval", "1", config=config)
    try:
        audit = paho(b.shard(0), "auditor")
        audit.subscribe("audit/#", 0)
        produce(kafka.bootstrap, topic, [
            (None, b"not json", []),
            (None, json.dumps({"region": "eu", "device": "d1", "speed": 80, "secret": "x"}).encode(), []),
            (None, json.dumps({"device": "no-region"}).encode(), []),
        ])
        m = audit.message()
        assert m.topic == f"audit/{topic}/0"
        assert json.loads(m.payload) == {"region": "eu", "device": "d1", "speed": 80}
        audit.no_message(0.5)  # the two bad records were skipped
        # Retained: a device that subscribes later still gets its configuration.
        late = paho(b.shard(1), "late-device")
        late.subscribe("fleet/eu/+/config", 0)
        m = late.message()
        assert (m.topic, m.retain) == ("fleet/eu/d1/config", True)
        # Skips are counted.
        watch = paho(b.shard(0), "skip-watch")
        watch.subscribe("$SYS/broker/shard/+/kafka_to_mqtt/config/records/skipped", 0)
        deadline = time.monotonic() + 10
        total = {}
        while sum(total.values()) < 2 and time.monotonic() < deadline:
            m = watch.message()
            total[m.topic] = int(m.payload)
        assert sum(total.values()) == 2, total
    finally:
        b.stop()


def test_restart_resumes_from_the_stored_position(kafka, paho):
    import queue
    import tempfile
    topic = f"resume-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=2)
    config = f"""
[[kafka_to_mqtt]]
name = "resume"
cluster = "default"
kafka_topics = ["{topic}"]
mqtt_topics = ["r/${{key}}"]
retain = true
start = "earliest"
"""
    data_dir = tempfile.mkdtemp(prefix="sluice-resume-")

    def collect(b, want):
        s = paho(b.shard(0), f"resume-sub-{uuid.uuid4().hex[:6]}")
        s.subscribe("r/#", 0)
        got = set()
        while not want <= got:
            got.add(s.message().payload)
        extra = set()
        try:
            while True:
                extra.add(s.message(timeout=1.0).payload)
        except queue.Empty:
            pass
        return got | extra

    b1 = broker_with("--kafka", kafka.bootstrap, config=config, data_dir=data_dir)
    first = {f"a{i}".encode() for i in range(3)}
    try:
        produce(kafka.bootstrap, topic, [(f"k{i}".encode(), f"a{i}".encode(), []) for i in range(3)])
        assert collect(b1, first) == first
    finally:
        b1.stop()  # SIGTERM: positions are stored on the way out
    second = {f"b{i}".encode() for i in range(3)}
    produce(kafka.bootstrap, topic, [(f"n{i}".encode(), f"b{i}".encode(), []) for i in range(3)])
    b2 = broker_with("--kafka", kafka.bootstrap, "--sys-interval", "1", config=config, data_dir=data_dir)
    try:
        # Retained messages survive restarts too, so the first three are still there; the
        # consumer itself must have read exactly the three records produced while it was down.
        assert collect(b2, first | second) == first | second
        watch = paho(b2.shard(0), "resume-watch")
        watch.subscribe("$SYS/broker/shard/+/kafka_to_mqtt/resume/records/received", 0)
        counts = {}
        deadline = time.monotonic() + 10
        while (len(counts) < 2 or sum(counts.values()) < 3) and time.monotonic() < deadline:
            m = watch.message()
            counts[m.topic] = int(m.payload)
        assert sorted(counts) == [f"$SYS/broker/shard/{i}/kafka_to_mqtt/resume/records/received" for i in (0, 1)]
        assert sum(counts.values()) == 3, f"replayed or skipped: {counts}"
    finally:
        b2.stop()


def test_request_response_through_kafka(kafka, paho):
    """An MQTT 5 requester asks a Kafka service: response topic and correlation data travel as
    Kafka headers one way and come back as MQTT 5 properties the other way."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    requests, replies = f"req-{uuid.uuid4().hex[:8]}", f"rep-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(requests, partitions=1)
    kafka.create_topic(replies, partitions=1)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[mqtt_to_kafka]]
name = "requests"
filters = ["svc/price"]
destinations = [{{ cluster = "default", topic = "{requests}" }}]

[[kafka_to_mqtt]]
name = "replies"
cluster = "default"
kafka_topics = ["{replies}"]
mqtt_topics = ["${{header.mqtt.response_topic}}"]
qos = 1
start = "earliest"
"""
    b = broker_with(config=config)
    try:
        client = paho(b.shard(1), "requester", v5=True)
        client.subscribe("replies/requester", 1)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/requester"
        props.CorrelationData = b"req-42"
        client.publish("svc/price", b"BTC", 1, props=props)
        # The "service": reads the request from Kafka, answers on the reply topic with the headers.
        [req] = kafka.consume(requests, 1)
        h = dict(req.headers())
        assert h["mqtt.response_topic"] == b"replies/requester" and h["mqtt.correlation_data"] == b"req-42"
        produce(kafka.bootstrap, replies, [(None, b"42000", [("mqtt.response_topic", h["mqtt.response_topic"]),
                                                           ("mqtt.correlation_data", h["mqtt.correlation_data"])])])
        m = client.message()
        assert (m.topic, m.payload, m.properties.CorrelationData) == ("replies/requester", b"42000", b"req-42")
    finally:
        b.stop()


def test_topic_pattern_includes_topics_created_later_and_message_expiry(kafka, paho):
    """kafka_topic_pattern: every topic whose whole name matches is consumed, including one
    created after the broker started (picked up on the next metadata refresh). The
    `mqtt.message_expiry` header becomes the MQTT 5 Message Expiry Interval."""
    run = uuid.uuid4().hex[:8]
    first, later, other = f"tele-{run}-a", f"tele-{run}-b", f"nottele-{run}"
    kafka.create_topic(first, partitions=2)
    kafka.create_topic(other, partitions=1)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]
metadata_max_age_ms = 1000

[[kafka_to_mqtt]]
name = "tele"
cluster = "default"
kafka_topic_pattern = "tele-{run}-.*"
mqtt_topics = ["fleet/${{topic}}/${{key}}"]
qos = 1
start = "earliest"
"""
    b = broker_with(config=config)
    try:
        s = paho(b.shard(0), "tele-watch", v5=True)
        s.subscribe("fleet/#", 1)
        produce(kafka.bootstrap, first, [(b"car-1", b"one", [("mqtt.message_expiry", b"60")])])
        produce(kafka.bootstrap, other, [(b"car-1", b"not matched", [])])
        m = s.message()
        assert (m.topic, m.payload) == (f"fleet/{first}/car-1", b"one")
        assert 0 < m.properties.MessageExpiryInterval <= 60
        kafka.create_topic(later, partitions=1)
        produce(kafka.bootstrap, later, [(b"car-2", b"two", [])])
        m = s.message(timeout=30)
        assert (m.topic, m.payload) == (f"fleet/{later}/car-2", b"two")
        assert not hasattr(m.properties, "MessageExpiryInterval")
        s.no_message(1.5)  # nothing from the topic that does not match
    finally:
        b.stop()


# ---------------------------------------------------------------------------------------------
# Bursts many times larger than a session queue: the consumers pause instead of queues dropping.
# ---------------------------------------------------------------------------------------------

QUEUE = 100
BURST = 10 * QUEUE
KEYS = 50


def burst_broker(kafka, topic, max_wait_ms=60_000, data_dir=None):
    """Kafka → MQTT at QoS 1 with session queues of QUEUE messages. The long max wait keeps a
    slow (loaded) subscriber from being skipped: every drop would be the defect under test."""
    config = f"""
[kafka]
kafka_to_mqtt_max_wait_ms = {max_wait_ms}

[[kafka_to_mqtt]]
name = "burst"
cluster = "default"
kafka_topics = ["{topic}"]
mqtt_topics = ["devices/${{key}}/commands"]
qos = 1
start = "earliest"
"""
    return broker_with("--kafka", kafka.bootstrap, "--max-queued-messages", str(QUEUE), "--sys-interval", "1",
                       config=config, data_dir=data_dir)


def produce_burst(kafka, topic):
    """BURST records in one go, KEYS keys; the value is the record's number."""
    produce(kafka.bootstrap, topic, [(f"k{n % KEYS}".encode(), str(n).encode(), []) for n in range(BURST)])


def produce_burst_one_batch_each(kafka, topic):
    """produce_burst, each record in a Kafka batch of its own: tansu 0.6 answers a fetch that
    starts inside a record batch with nothing (Kafka returns the batch), so a stored position
    must be a batch boundary there."""
    p = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 0})
    for n in range(BURST):
        p.produce(topic, key=f"k{n % KEYS}".encode(), value=str(n).encode())
        assert p.flush(WAIT) == 0


def expected(keys):
    return {k: [n for n in range(BURST) if n % KEYS == k] for k in keys}


def by_key(pairs):
    """(topic, payload) pairs → {key number: [record numbers in arrival order]}."""
    got = {}
    for topic, payload in pairs:
        got.setdefault(int(topic.split("/")[1][1:]), []).append(int(payload))
    return got


def collect(next_pair, want, stall=20.0):
    """Reads (topic, payload) pairs until `want` arrived; gives up when nothing came for `stall`
    seconds (what the old code did: the rest had been dropped)."""
    got = []
    while len(got) < want:
        try:
            got.append(next_pair(stall))
        except queue.Empty:
            break
    return got


def sys_values(b, paho, pattern, count=2):
    """`$SYS` values (topic → int) of `count` topics matching `pattern`, each from a
    publication made after the call (not the retained copy, which may predate what the test did)."""
    w = paho(b.shard(0), f"sys-{uuid.uuid4().hex[:6]}")
    w.subscribe(pattern, 0)
    fresh = {}
    while len(fresh) < count:
        m = w.message()
        if not m.retain:
            fresh[m.topic] = int(m.payload)
    return fresh


def dropped(b, paho):
    """Messages dropped, per shard."""
    return sys_values(b, paho, "$SYS/broker/shard/+/messages/dropped")


def test_a_burst_of_ten_queues_reaches_one_qos1_subscriber_without_drops(kafka, paho):
    topic = f"burst1-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=3)
    b = burst_broker(kafka, topic)
    try:
        marker = paho(b.shard(0), "marker")
        marker.publish("devices/marker/commands", b"0", 1, retain=True)
        mosq = subprocess.Popen(["mosquitto_sub", "-h", b.shard(1)[0], "-p", str(b.shard(1)[1]), "-q", "1",
                                 "-t", "devices/+/commands", "-v"], stdout=subprocess.PIPE, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l.split()) for l in mosq.stdout], daemon=True).start()
        assert lines.get(timeout=WAIT) == ["devices/marker/commands", "0"]  # subscribed
        produce_burst(kafka, topic)
        got = collect(lambda t: tuple(lines.get(timeout=t)), BURST)
        mosq.kill()
        drops = dropped(b, paho)
        assert len(got) == BURST and sum(drops.values()) == 0, f"got {len(got)} of {BURST}, dropped {drops}"
        assert by_key(got) == expected(range(KEYS)), "every record once, in order per key"
    finally:
        b.stop()


def test_a_burst_reaches_many_subscribers_on_both_shards_without_drops(kafka, paho):
    topic = f"burst5-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=3)
    b = burst_broker(kafka, topic)
    try:
        # (shard, keys): two see every key, three only some (disjoint and overlapping sets).
        plan = [(0, range(KEYS)), (1, range(KEYS)), (0, range(0, 10)), (1, range(10, 30)), (1, range(5, 50, 5))]
        subs = []
        for i, (shard, keys) in enumerate(plan):
            s = paho(b.shard(shard), f"burst-sub-{i}")
            if len(keys) == KEYS:
                s.subscribe("devices/+/commands", 1)
            else:
                s.subscribe([(f"devices/k{k}/commands", 1) for k in keys])
            subs.append(s)
        canary = Canary(b.shard(0), b.shard(1), "burst5")
        produce_burst(kafka, topic)
        for i, (s, (shard, keys)) in enumerate(zip(subs, plan)):
            want = len(keys) * BURST // KEYS
            got = collect(lambda t: (lambda m: (m.topic, m.payload))(s.message(timeout=t)), want)
            assert len(got) == want, f"subscriber {i} (shard {shard}) got {len(got)} of {want}"
            assert by_key(got) == expected(keys), f"subscriber {i}: every record once, in order per key"
        assert sum(dropped(b, paho).values()) == 0
        canary.check(max_gap=3.0)
    finally:
        b.stop()


def test_a_subscriber_that_never_acknowledges_is_skipped_after_the_max_wait(kafka, paho):
    """It holds the records back for kafka_to_mqtt_max_wait_ms; then the others get everything
    and its own queue follows queue_full_policy (counted), instead of stalling them forever."""
    topic = f"stuck-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=1)
    b = burst_broker(kafka, topic, max_wait_ms=1000)
    try:
        stuck = paho(b.shard(1), "stuck")
        stuck.c.manual_ack_set(True)  # takes PUBLISHes, never acknowledges them
        stuck.subscribe("devices/+/commands", 1)
        live = paho(b.shard(0), "live")
        live.subscribe("devices/+/commands", 1)
        canary = Canary(b.shard(1), b.shard(0), "stuck")
        started = time.monotonic()
        produce_burst(kafka, topic)
        got = collect(lambda t: (lambda m: (m.topic, m.payload))(live.message(timeout=t)), BURST)
        assert len(got) == BURST, f"got {len(got)} of {BURST}"
        assert by_key(got) == expected(range(KEYS))
        assert time.monotonic() - started >= 1.0, "the stuck subscriber held the records back first"
        drops = dropped(b, paho)
        assert drops["$SYS/broker/shard/1/messages/dropped"] > 0 and drops["$SYS/broker/shard/0/messages/dropped"] == 0
        skipped = sys_values(b, paho, "$SYS/broker/shard/+/kafka_to_mqtt/receivers_skipped")
        assert skipped == {f"$SYS/broker/shard/{i}/kafka_to_mqtt/receivers_skipped": i for i in (0, 1)}
        canary.check(max_gap=3.0)
    finally:
        b.stop()


def wait_until_records_wait(b, paho):
    """Until a shard reports consumed records waiting for room (the feed paused)."""
    watch = paho(b.shard(0), f"wait-watch-{uuid.uuid4().hex[:6]}")
    watch.subscribe("$SYS/broker/shard/+/kafka_to_mqtt/records_waiting", 0)
    while True:  # watch.message() has a deadline
        m = watch.message()
        if not m.retain and int(m.payload) > 0:
            return


def test_an_offline_persistent_subscriber_gets_a_whole_burst_when_it_returns(kafka, paho):
    """Its queue holds a tenth of the burst: the rest waits in Kafka (the feed pauses) until the
    device is back and takes its queue, then follows, in order."""
    topic = f"offline-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=1)
    b = burst_broker(kafka, topic)
    try:
        dev = paho(b.shard(1), "offline-dev", clean=False)
        dev.subscribe("devices/+/commands", 1)
        dev.close()
        produce_burst(kafka, topic)
        wait_until_records_wait(b, paho)
        dev = paho(b.shard(1), "offline-dev", clean=False)
        got = collect(lambda t: (lambda m: (m.topic, m.payload))(dev.message(timeout=t)), BURST)
        assert len(got) == BURST, f"got {len(got)} of {BURST}"
        assert by_key(got) == expected(range(KEYS))
        assert sum(dropped(b, paho).values()) == 0
    finally:
        b.stop()


def test_a_restart_while_a_burst_waits_replays_from_the_stored_position(kafka, paho):
    """Stopped while most of the burst waits in Kafka for an offline device: after the restart
    the consumer resumes from the stored position (the last slice every shard finished), so the
    device gets every record — some twice (at-least-once), none missing, in order per key."""
    import tempfile
    topic = f"restart-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=1)
    data_dir = tempfile.mkdtemp(prefix="sluice-burst-restart-")
    b1 = burst_broker(kafka, topic, data_dir=data_dir)
    try:
        dev = paho(b1.shard(1), "restart-dev", clean=False)
        dev.subscribe("devices/+/commands", 1)
        dev.close()
        produce_burst_one_batch_each(kafka, topic)
        wait_until_records_wait(b1, paho)
    finally:
        b1.stop()
    b2 = burst_broker(kafka, topic, data_dir=data_dir)
    try:
        dev = paho(b2.shard(1), "restart-dev", clean=False)
        got, seen = [], set()
        while len(seen) < BURST:
            try:
                m = dev.message(timeout=20.0)
            except queue.Empty:
                break
            got.append((m.topic, m.payload))
            seen.add(m.payload)
        assert len(seen) == BURST, f"got {len(seen)} of {BURST} records"
        # Per key: what was delivered before the stop, then the replay from the stored position,
        # which is at or before where the delivery had got to.
        want = expected(range(KEYS))
        for k, seq in by_key(got).items():
            back = next((i for i in range(1, len(seq)) if seq[i] <= seq[i - 1]), len(seq))
            if back < len(seq):
                j = want[k].index(seq[back])
                assert j <= back and seq == want[k][:back] + want[k][j:], (k, seq)
            else:
                assert seq == want[k], (k, seq)
        print(f"{len(got) - BURST} records delivered twice")
        assert sum(dropped(b2, paho).values()) == 0
    finally:
        b2.stop()
