"""MQTT → Kafka through a real Kafka-compatible broker (tansu), checked with confluent-kafka
(librdkafka), an independent Kafka client."""
import os
import time
import uuid

import paho.mqtt.client as mqtt
import pytest
from confluent_kafka import Producer
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import WAIT, Tansu, broker_with, free_port, wait_for
from test_http import metrics, total


def topic_name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def headers(m):
    return {k: v for k, v in (m.headers() or [])}


def librdkafka_partition(bootstrap, topic, key):
    """The partition librdkafka's murmur2_random partitioner (Java's default) picks for `key`."""
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    got = []
    p.produce(topic, key=key, value=b"probe", on_delivery=lambda err, msg: got.append(msg.partition()))
    p.flush(WAIT)
    return got[0]


def test_all_qos_from_both_shards_land_in_kafka_in_order(kafka, paho):
    topic = topic_name("iot-telemetry")
    kafka.create_topic(topic, partitions=3)
    b = broker_with("--kafka", kafka.bootstrap, "--map", f"devices/#={topic}")
    try:
        pubs = [paho(b.shard(i), f"dev-{i}", v5=(i == 1)) for i in range(2)]
        sent = {}
        for i, p in enumerate(pubs):
            for qos in (0, 1, 2):
                t = f"devices/car-{i}/q{qos}"
                sent[t] = [f"{i}:{qos}:{n}".encode() + bytes([0, 255]) for n in range(20)]
                for payload in sent[t]:
                    p.publish(t, payload, qos)
        total = sum(len(v) for v in sent.values())
        got = kafka.consume(topic, total)
        assert len(got) == total
        by_topic = {}
        for m in got:
            by_topic.setdefault(m.key().decode(), []).append(m)
        for t, payloads in sent.items():
            ms = by_topic[t]
            # Values byte-identical, per-topic order kept (Kafka keeps order within a partition).
            assert [m.value() for m in ms] == payloads, t
            assert len({m.partition() for m in ms}) == 1
            h = headers(ms[0])
            assert h["mqtt.topic"] == t.encode()
            assert h["mqtt.qos"] == t[-1].encode()
            assert h["mqtt.client_id"] in (b"dev-0", b"dev-1")
            assert h["mqtt.retain"] == b"false"
            # Same placement as librdkafka's murmur2_random for the same key.
            assert ms[0].partition() == librdkafka_partition(kafka.bootstrap, topic, t.encode()), t
    finally:
        b.stop()


def test_v5_properties_become_headers(kafka, paho):
    topic = topic_name("props")
    kafka.create_topic(topic, partitions=1)
    b = broker_with("--kafka", kafka.bootstrap, "--map", f"req/#={topic}")
    try:
        c = paho(b.shard(0), "props-client", v5=True)
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("tenant", "acme"), ("trace", "t-1")]
        props.ContentType = "application/json"
        props.ResponseTopic = "resp/1"
        props.CorrelationData = b"\x01\x02"
        c.publish("req/x", b'{"a":1}', 1, props=props)
        [m] = kafka.consume(topic, 1)
        h = headers(m)
        assert h["tenant"] == b"acme" and h["trace"] == b"t-1"
        assert h["content-type"] == b"application/json"
        assert h["mqtt.response_topic"] == b"resp/1"
        assert h["mqtt.correlation_data"] == b"\x01\x02"
        assert m.value() == b'{"a":1}'
    finally:
        b.stop()


def test_multicast_to_two_topics_on_two_clusters(kafka, paho):
    other = Tansu()
    try:
        t1, t2, t3 = topic_name("fire"), topic_name("copy"), topic_name("region")
        kafka.create_topic(t1)
        kafka.create_topic(t3)
        other.create_topic(t2)
        config = f"""
[kafka.clusters.a]
bootstrap = ["{kafka.bootstrap}"]
[kafka.clusters.b]
bootstrap = ["{other.bootstrap}"]

[[mqtt_to_kafka]]
name = "firehose"
filters = ["fleet/#"]
destinations = [{{ cluster = "a", topic = "{t1}" }}, {{ cluster = "b", topic = "{t2}" }}]
key = "client-id"

[[mqtt_to_kafka]]
name = "by-car"
filters = ["fleet/+/+/speed"]
destinations = [{{ cluster = "a", topic = "{t3}" }}]
key = "level:2"
headers = false
"""
        b = broker_with(config=config)
        try:
            c = paho(b.shard(1), "car-publisher")
            c.publish("fleet/eu/car-7/speed", b"88", 1)
            [m1] = kafka.consume(t1, 1)
            [m2] = other.consume(t2, 1)
            [m3] = kafka.consume(t3, 1)
            assert (m1.value(), m1.key()) == (b"88", b"car-publisher")
            assert (m2.value(), m2.key()) == (b"88", b"car-publisher")
            assert (m3.value(), m3.key(), m3.headers()) == (b"88", b"car-7", None)
        finally:
            b.stop()
    finally:
        other.stop()


def test_unknown_topic_is_reported_to_the_publisher(kafka, paho):
    missing, dlq = topic_name("missing"), topic_name("dlq")
    kafka.create_topic(dlq, partitions=1)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[mqtt_to_kafka]]
name = "nowhere"
filters = ["nowhere/#"]
destinations = [{{ cluster = "default", topic = "{missing}" }}]
dead_letter = {{ cluster = "default", topic = "{dlq}" }}
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "v5-pub", v5=True)
        acks = []
        c.c.on_publish = lambda cl, u, mid, rc, p: acks.append(rc)
        c.c.publish("nowhere/x", b"lost?", 1).wait_for_publish(WAIT)
        assert acks and acks[0].value == 0x90, acks  # Topic Name invalid: the Kafka topic is unknown
        [d] = kafka.consume(dlq, 1)
        assert (d.value(), headers(d)["sluice.error"], headers(d)["sluice.topic"]) == (
            b"lost?", b"unknown topic", missing.encode())
        # 3.1.1 has no negative PUBACK: the connection closes unacknowledged (the client resends).
        v3 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v3-pub")
        v3.reconnect_delay_set(60, 60)
        gone = []
        v3.on_disconnect = lambda *a: gone.append(True)
        v3.connect(*b.shard(1))
        v3.loop_start()
        info = v3.publish("nowhere/y", b"x", 1)
        deadline = time.monotonic() + WAIT
        while not gone and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone and not info.is_published()
        v3.loop_stop()
        # The broker keeps serving.
        ok = paho(b.shard(0), "after")
        ok.subscribe("still/here", 0)
        ok.publish("still/here", b"yes", 0)
        assert ok.message().payload == b"yes"
    finally:
        b.stop()


def test_auto_create_topic(kafka, paho):
    topic = topic_name("auto")
    b = broker_with("--kafka", kafka.bootstrap, "--kafka-auto-create", "--map", f"auto/#={topic}")
    try:
        paho(b.shard(0), "auto-pub").publish("auto/x", b"made it", 1)
        [m] = kafka.consume(topic, 1)
        assert m.value() == b"made it"
    finally:
        b.stop()


def test_puback_waits_for_kafka_through_a_pause(kafka, paho):
    topic = topic_name("paused")
    kafka.create_topic(topic, partitions=1)
    b = broker_with("--kafka", kafka.bootstrap, "--map", f"p/#={topic}")
    try:
        c = paho(b.shard(0), "pauser", v5=True)
        c.publish("p/warmup", b"w", 1)  # connection and metadata are warm
        kafka.pause()
        try:
            infos = [c.c.publish("p/x", f"m{i}".encode(), 1) for i in range(20)]
            time.sleep(0.5)
            assert not any(i.is_published() for i in infos), "PUBACK before Kafka acknowledged"
        finally:
            kafka.resume()
        for i in infos:
            i.wait_for_publish(30)
            assert i.is_published()
        got = kafka.consume(topic, 21)
        assert [m.value() for m in got] == [b"w"] + [f"m{i}".encode() for i in range(20)]
    finally:
        b.stop()


def test_kafka_unreachable_at_start_then_appears(paho):
    port = free_port()
    config = f"""
[kafka.clusters.default]
bootstrap = ["127.0.0.1:{port}"]
delivery_timeout_ms = 60000
auto_create_topics = true
partitions = 1

[[mqtt_to_kafka]]
name = "late"
filters = ["late/#"]
destinations = [{{ cluster = "default", topic = "late-topic" }}]
"""
    b = broker_with(config=config)
    late = None
    try:
        c = paho(b.shard(1), "early-bird", v5=True)
        info = c.c.publish("late/x", b"waited", 1)
        time.sleep(0.3)
        assert not info.is_published()
        late = Tansu(port=port)
        info.wait_for_publish(60)
        assert info.is_published()
        [m] = late.consume("late-topic", 1)
        assert m.value() == b"waited"
    finally:
        b.stop()
        if late:
            late.stop()


def test_hanging_kafka_times_out_instead_of_wedging(paho):
    """A 'Kafka' that accepts connections and never answers: the publisher gets a failure after
    the delivery time-out, and the broker keeps serving."""
    import socket
    import threading
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept_and_ignore():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                pass
    threading.Thread(target=accept_and_ignore, daemon=True).start()
    config = f"""
[kafka.clusters.default]
bootstrap = ["127.0.0.1:{port}"]
delivery_timeout_ms = 2000
request_timeout_ms = 500

[kafka]
spill_on_timeout = false

[[mqtt_to_kafka]]
name = "hang"
filters = ["hang/#"]
destinations = [{{ cluster = "default", topic = "never" }}]
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "hang-pub", v5=True)
        acks = []
        c.c.on_publish = lambda cl, u, mid, rc, p: acks.append(rc)
        start = time.monotonic()
        c.c.publish("hang/x", b"?", 1).wait_for_publish(WAIT)
        assert acks and acks[0].value == 0x80, acks  # unspecified error: Kafka did not answer in time
        assert time.monotonic() - start >= 1.5
        assert held, "sluice never connected to the hanging Kafka"
        c.subscribe("alive", 0)
        c.publish("alive", b"yes", 0)
        assert c.message().payload == b"yes"
    finally:
        stop.set()
        b.stop()
        listener.close()
        for s in held:
            s.close()


def test_oversized_record_fails_alone_and_goes_to_the_dead_letter_topic(kafka, paho):
    topic, dlq = topic_name("big"), topic_name("dlq")
    kafka.create_topic(topic, partitions=1)
    kafka.create_topic(dlq, partitions=1)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]
max_record_bytes = 65536
linger_ms = 50

[[mqtt_to_kafka]]
name = "big"
filters = ["big/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
dead_letter = {{ cluster = "default", topic = "{dlq}" }}
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "big-pub", v5=True)
        acks = []
        c.c.on_publish = lambda cl, u, mid, rc, p: acks.append(rc.value)
        infos = [c.c.publish("big/a", b"small-1", 1), c.c.publish("big/a", b"x" * 100_000, 1),
                 c.c.publish("big/a", b"small-2", 1)]
        for i in infos:
            i.wait_for_publish(30)
        assert acks == [0x00, 0x97, 0x00], acks  # quota exceeded: the closest PUBACK code to "too large"
        got = kafka.consume(topic, 2)
        assert [m.value() for m in got] == [b"small-1", b"small-2"]
        [d] = kafka.consume(dlq, 1)
        h = headers(d)
        assert h["sluice.error"] == b"record too large"
        assert h["sluice.topic"] == topic.encode()
        assert h["mqtt.topic"] == b"big/a" and d.key() == b"big/a"
    finally:
        b.stop()


def test_bridge_metrics_in_sys_topics(kafka, paho):
    topic = topic_name("metrics")
    kafka.create_topic(topic, partitions=2)
    b = broker_with("--kafka", kafka.bootstrap, "--map", f"m/#={topic}", "--sys-interval", "1")
    try:
        c = paho(b.shard(0), "metrics-pub")
        for i in range(10):
            c.publish(f"m/{i}", b"x" * 10, 1)
        watch = paho(b.shard(0), "metrics-watch")
        watch.subscribe("$SYS/broker/shard/0/kafka/#", 0)
        seen = {}
        base = "$SYS/broker/shard/0/kafka/map-1/default/"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            m = watch.message()
            seen[m.topic] = m.payload.decode()
            # The pending count is published last in each round.
            if m.topic.endswith("/kafka/pending") and seen.get(base + "records/produced") == "10":
                break
        assert seen[base + "records/produced"] == "10", seen
        assert seen[base + "messages/received"] == "10"
        assert seen[base + "bytes/received"] == "100"
        assert seen[base + "records/failed"] == "0"
        assert int(seen[base + "latency_us/max"]) > 0
        assert seen["$SYS/broker/shard/0/kafka/pending"] == "0"
    finally:
        b.stop()


@pytest.mark.parametrize("compression", ["gzip", "lz4", "snappy", "zstd"])
def test_compressed_batches_read_back_by_librdkafka(kafka, paho, compression):
    topic = topic_name(f"z-{compression}")
    kafka.create_topic(topic, partitions=1)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]
compression = "{compression}"
linger_ms = 20

[[mqtt_to_kafka]]
name = "z"
filters = ["z/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "zipper")
        sent = [f"{compression}-{i}-".encode() * 20 for i in range(50)]
        infos = [c.c.publish("z/x", v, 1) for v in sent]
        for i in infos:
            i.wait_for_publish(WAIT)
        assert [m.value() for m in kafka.consume(topic, 50)] == sent
    finally:
        b.stop()


def test_explicit_partition(kafka, paho):
    topic = topic_name("pinned")
    kafka.create_topic(topic, partitions=3)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[mqtt_to_kafka]]
name = "pinned"
filters = ["pin/#"]
destinations = [{{ cluster = "default", topic = "{topic}", partition = 2 }}]
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(1), "pinner")
        for i in range(12):
            c.publish(f"pin/{i}", b"x", 1)  # 12 different keys, one partition
        got = kafka.consume(topic, 12)
        assert len(got) == 12 and {m.partition() for m in got} == {2}
    finally:
        b.stop()


def test_new_partitions_are_used_after_metadata_refresh(paho):
    """tansu cannot add partitions to a topic, so the topic is recreated with more partitions on a
    new tansu at the same address: sluice must notice (metadata_max_age_ms) and place keys over
    all of them, the way Kafka's partitioner would."""
    from conftest import Tansu
    k1 = Tansu()
    port = k1.port
    topic = topic_name("grow")
    k1.create_topic(topic, partitions=1)
    config = f"""
[kafka.clusters.default]
bootstrap = ["127.0.0.1:{port}"]
metadata_max_age_ms = 300
delivery_timeout_ms = 60000

[[mqtt_to_kafka]]
name = "grow"
filters = ["g/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
    b = broker_with(config=config)
    k2 = None
    try:
        c = paho(b.shard(0), "grower", v5=True)
        c.publish("g/first", b"1", 1)
        assert {m.partition() for m in k1.consume(topic, 1)} == {0}
        k1.stop()
        k2 = Tansu(port=port)
        k2.create_topic(topic, partitions=4)
        keys = [f"g/{i}" for i in range(40)]
        for t in keys:
            c.publish(t, b"x", 1)
        got = k2.consume(topic, len(keys))
        assert len(got) == len(keys)
        for m in got:
            assert m.partition() == librdkafka_partition(k2.bootstrap, topic, m.key()), m.key()
        assert len({m.partition() for m in got}) > 1
    finally:
        b.stop()
        if k2:
            k2.stop()


def threads(pid):
    """{thread name: [(tid, allowed CPUs, CPU ticks)]} of a process, from /proc."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            name = open(f"{base}/comm").read().strip()
            cpus = next(l.split(":", 1)[1].strip() for l in open(f"{base}/status") if l.startswith("Cpus_allowed_list"))
            stat = open(f"{base}/stat").read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.setdefault(name, []).append((int(tid), cpus, int(stat[11]) + int(stat[12])))
    return out


def test_each_shard_produces_on_a_kafka_thread_of_its_own_pinned_to_its_cpu(kafka, paho):
    """Nothing of the produce path is shared between shards: each shard has one Kafka thread,
    on the shard's CPU and only there, and each of them does the Kafka work of its shard."""
    topic = topic_name("per-core")
    kafka.create_topic(topic, partitions=4)
    b = broker_with("--kafka", kafka.bootstrap, "--map", f"pc/#={topic}", "--cpuset", "0,1")
    try:
        def pinned():
            t = threads(b.proc.pid)
            ours = (n for n in t if n.startswith("sluice-shard-") or n.startswith("sluice-kafka-"))
            return all(c in ("0", "1") for n in ours for _, c, _ in t[n])

        # A thread pins itself once it runs: on a loaded machine the first look may come before.
        wait_for(pinned, "every shard and Kafka thread pinned to one CPU")
        before = threads(b.proc.pid)
        kafka_threads = sorted(n for n in before if "kafka" in n or n.startswith("tokio"))
        assert kafka_threads == ["sluice-kafka-0", "sluice-kafka-1"], before.keys()
        for i in range(2):
            [(_, kcpus, _)] = before[f"sluice-kafka-{i}"]
            shard_cpus = {c for n, ts in before.items() if n.startswith(f"sluice-shard-{i}") for _, c, _ in ts}
            assert shard_cpus == {str(i)} and kcpus == str(i), (i, kcpus, shard_cpus)
        n = 3000
        pubs = [paho(b.shard(i), f"pc-{i}") for i in range(2)]
        for i, p in enumerate(pubs):
            for k in range(n):
                p.c.publish(f"pc/{i}/{k % 16}", b"x" * 100, 1)
        got = kafka.consume(topic, 2 * n, timeout=120)
        assert len(got) == 2 * n
        after = threads(b.proc.pid)
        for i in range(2):
            [(_, _, t0)] = before[f"sluice-kafka-{i}"]
            [(_, _, t1)] = after[f"sluice-kafka-{i}"]
            assert t1 > t0, f"sluice-kafka-{i} did no work for shard {i}'s {n} records"
    finally:
        b.kill()




def test_a_burst_beyond_one_requests_bound_goes_in_several_requests_and_lands_in_order(kafka, paho):
    """Kafka paused while 4.8 MB of QoS 0 messages arrive, so that four partitions' full batches
    (1 MiB each) are ready at once when it answers: they go in requests of at most 1 MiB of
    batches each, not in one, and every record lands, in order per key."""
    topic = topic_name("burst")
    kafka.create_topic(topic, partitions=4)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]
request_timeout_ms = 30000

[[mqtt_to_kafka]]
name = "burst"
filters = ["b/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
    b = broker_with("--http", "127.0.0.1:0", config=config, cores=1)
    try:
        pub = paho(b.shard(0), "burst-pub")
        n, size = 48, 100_000  # over 8 keys, so over the 4 partitions: 1.2 MB each
        keys = [f"b/k{i}" for i in range(8)]
        sent = {k: [] for k in keys}
        kafka.pause()
        try:
            for i in range(n):
                k = keys[i % len(keys)]
                payload = f"{k}:{i}:".encode().ljust(size, b".")
                sent[k].append(payload)
                pub.publish(k, payload, 0)
            # Every message routed to the mapping, none answered: they wait for Kafka's metadata.
            wait_for(lambda: total(metrics(b), "sluice_kafka_messages_total") == n, "every message routed")
        finally:
            kafka.resume()
        got = kafka.consume(topic, n)
        assert len(got) == n
        by_key = {}
        for m in got:
            by_key.setdefault(m.key().decode(), []).append(m.value())
        assert by_key == sent, "every record, in order per key"
        fam = wait_for(lambda: (lambda f: f if total(f, "sluice_kafka_produce_batch_records_total") == n else None)(
            metrics(b)), "every record counted as sent")
        requests = total(fam, "sluice_kafka_produce_requests_total")
        sent_bytes = total(fam, "sluice_kafka_produce_batch_bytes_total")
        c = (requests, sent_bytes)
        assert sent_bytes > n * size
        # At most one full batch (ten records) per request: 4.8 MB take five requests at least.
        assert requests >= 5 and sent_bytes / requests <= (1 << 20) + 4096, c
    finally:
        b.stop()
