"""local-durable delivery: acknowledged once on local disk, delivered to Kafka through outages and
crashes (the per-shard spill log)."""
import tempfile
import time
import uuid

import paho.mqtt.client as mqtt
import pytest

from conftest import WAIT, broker_with


def topic_name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def consume_distinct(kafka, topic, distinct):
    """Reads `topic` until `distinct` different values were seen (at-least-once: duplicates of
    records Kafka took before a crash or through a pause may come first); returns every record."""
    n = distinct
    while True:
        got = kafka.consume(topic, n, timeout=60 if n == distinct else 10)
        if len({m.value() for m in got}) >= distinct or len(got) < n:
            return got
        n += distinct


def test_acknowledged_while_kafka_is_paused_then_delivered(kafka, paho):
    topic = topic_name("durable")
    kafka.create_topic(topic, partitions=2)
    b = broker_with("--kafka", kafka.bootstrap, "--map", f"d/#={topic}", "--delivery", "local-durable")
    try:
        c = paho(b.shard(0), "durable-pub", v5=True)
        c.publish("d/warm", b"w", 1)
        kafka.pause()
        try:
            infos = [c.c.publish(f"d/{i % 3}", f"m{i}".encode(), 1 + i % 2) for i in range(50)]
            for i in infos:
                i.wait_for_publish(WAIT)  # acknowledged from the spill log, Kafka still paused
                assert i.is_published()
        finally:
            kafka.resume()
        got = kafka.consume(topic, 51)
        assert sorted(m.value() for m in got) == sorted([b"w"] + [f"m{i}".encode() for i in range(50)])
        for t in range(3):
            per_topic = [m.value() for m in got if m.key() == f"d/{t}".encode()]
            assert per_topic == [f"m{i}".encode() for i in range(50) if i % 3 == t], "order per MQTT topic"
    finally:
        b.stop()


def test_acknowledged_messages_survive_sigkill_and_replay(kafka, paho):
    topic = topic_name("crash")
    kafka.create_topic(topic, partitions=1)
    data_dir = tempfile.mkdtemp(prefix="sluice-crash-")
    args = ("--kafka", kafka.bootstrap, "--map", f"c/#={topic}", "--delivery", "local-durable")
    b = broker_with(*args, data_dir=data_dir)
    kafka.pause()
    try:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="crash-pub", protocol=mqtt.MQTTv311)
        c.connect(*b.shard(1))
        c.loop_start()
        acked = []
        for i in range(40):
            info = c.publish("c/x", f"k{i}".encode(), 1)
            info.wait_for_publish(WAIT)
            assert info.is_published()
            acked.append(f"k{i}".encode())
        c.loop_stop()
        b.kill()  # SIGKILL with every record still waiting for Kafka
    finally:
        kafka.resume()
    b2 = broker_with(*args, data_dir=data_dir)
    try:
        got = [m.value() for m in kafka.consume(topic, len(acked))]
        if set(got) != set(acked):  # duplicates took some of the first places: read on
            got = [m.value() for m in kafka.consume(topic, 2 * len(acked), timeout=10)]
        # At-least-once: a record Kafka took just before the kill may come again after replay.
        first_seen = list(dict.fromkeys(got))
        assert first_seen == acked, "every acknowledged message, in order, after the restart"
    finally:
        b2.stop()


def test_outage_longer_than_memory_spills_to_disk_and_drains(kafka, paho):
    """Kafka paused while 4 publishers send QoS 1 flat out; with room for only 200 records in
    flight per shard the rest waits on disk. After the pause every acknowledged message is in
    Kafka, in order per topic, and the spill backlog returns to zero."""
    import threading
    topic = topic_name("outage")
    kafka.create_topic(topic, partitions=4)
    config = f"""
[kafka]
delivery = "local-durable"
max_pending_records_per_shard = 200

[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[mqtt_to_kafka]]
name = "outage"
filters = ["o/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
    b = broker_with("--sys-interval", "1", config=config)
    try:
        pubs = [paho(b.shard(i % 2), f"outage-{i}") for i in range(4)]
        pubs[0].publish("o/warm", b"w", 1)
        acked = {i: [] for i in range(4)}
        stop = threading.Event()

        def run(i):
            n = 0
            while not stop.is_set():
                info = pubs[i].c.publish(f"o/{i}", f"{i}:{n}".encode(), 1)
                info.wait_for_publish(WAIT)
                assert info.is_published()
                acked[i].append(f"{i}:{n}".encode())
                n += 1
        kafka.pause()
        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 30
            while sum(len(v) for v in acked.values()) < 2000 and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            for t in threads:
                t.join()
            kafka.resume()
        total = sum(len(v) for v in acked.values())
        assert total >= 2000, f"only {total} acknowledged while Kafka was paused"
        got = kafka.consume(topic, total + 1, timeout=60)
        for i in range(4):
            per_topic = [m.value() for m in got if m.key() == f"o/{i}".encode()]
            assert list(dict.fromkeys(per_topic)) == acked[i], f"publisher {i}: order or loss"
        watch = paho(b.shard(0), "spill-watch")
        for shard in (0, 1):
            watch.subscribe(f"$SYS/broker/shard/{shard}/spill/records", 0)
        zero = set()
        deadline = time.monotonic() + 20
        while zero != {0, 1} and time.monotonic() < deadline:
            m = watch.message()
            if m.payload == b"0":
                zero.add(int(m.topic.split("/")[3]))
        assert zero == {0, 1}, "spill backlog did not return to zero"
    finally:
        b.stop()


def test_full_spill_log_refuses_with_0x97_and_recovers(kafka, paho):
    topic = topic_name("full")
    kafka.create_topic(topic, partitions=1)
    config = f"""
[kafka]
delivery = "local-durable"
spill_segment_bytes = 4096
spill_max_bytes_per_shard = 8192

[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[mqtt_to_kafka]]
name = "full"
filters = ["f/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "filler", v5=True)
        acks = []
        c.c.on_publish = lambda cl, u, mid, rc, p: acks.append(rc.value)
        c.publish("f/warm", b"w", 1)
        kafka.pause()
        try:
            n = 0
            while 0x97 not in acks and n < 500:
                c.c.publish("f/x", b"y" * 200, 1).wait_for_publish(WAIT)
                n += 1
            assert 0x97 in acks, "the spill log never filled"
            accepted = acks.count(0) - 1  # minus the warm-up
            assert accepted > 10
        finally:
            kafka.resume()
        # Kafka drains the log; space returns and publishes are accepted again.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            acks.clear()
            c.c.publish("f/x", b"again", 1).wait_for_publish(WAIT)
            if acks == [0]:
                break
            time.sleep(0.2)
        assert acks == [0], acks
        got = [m.value() for m in kafka.consume(topic, accepted + 2)]
        assert got.count(b"y" * 200) == accepted and got[-1] == b"again"
    finally:
        b.stop()


def test_kafka_ack_spills_what_times_out_and_replays_it_in_order(kafka, paho):
    """kafka-ack through an outage longer than the delivery time-out: the records in flight wait
    that long, then go to the spill log and are acknowledged with success; later ones are
    acknowledged from disk while Kafka is still down. After the outage everything is in Kafka in
    order per topic, the log drains, and acknowledgements wait for Kafka again."""
    topic = topic_name("kafka-ack-outage")
    kafka.create_topic(topic, partitions=2)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]
delivery_timeout_ms = 1500
request_timeout_ms = 500

[[mqtt_to_kafka]]
name = "outage"
filters = ["k/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
    b = broker_with("--sys-interval", "1", config=config)
    try:
        c = paho(b.shard(0), "ka-pub", v5=True)
        codes = []
        c.c.on_publish = lambda cl, u, mid, rc, p: codes.append(rc.value)
        c.publish("k/warm", b"w", 1)
        kafka.pause()
        try:
            first = [c.c.publish(f"k/{i % 2}", f"m{i}".encode(), 1) for i in range(20)]
            for i in first:
                i.wait_for_publish(WAIT)  # after the time-out, from the spill log
            later = [c.c.publish(f"k/{i % 2}", f"m{i}".encode(), 1) for i in range(20, 40)]
            for i in later:
                i.wait_for_publish(WAIT)
            assert all(i.is_published() for i in first + later)
            assert codes == [0] * 41, codes
        finally:
            kafka.resume()
        # At-least-once: a request Kafka held through the pause may land besides the replay.
        got = consume_distinct(kafka, topic, 41)
        for t in range(2):
            per_topic = [m.value() for m in got if m.key() == f"k/{t}".encode()]
            want = [f"m{i}".encode() for i in range(40) if i % 2 == t]
            assert list(dict.fromkeys(per_topic)) == want, "order per MQTT topic"
        watch = paho(b.shard(0), "ka-watch")
        watch.subscribe("$SYS/broker/shard/0/spill/records", 0)
        deadline = time.monotonic() + 20
        while watch.message().payload != b"0":
            assert time.monotonic() < deadline, "spill backlog did not return to zero"
        # Drained: back to acknowledging after Kafka.
        kafka.pause()
        try:
            info = c.c.publish("k/0", b"after", 1)
            time.sleep(0.5)
            assert not info.is_published(), "acknowledged before Kafka after the log drained"
        finally:
            kafka.resume()
        info.wait_for_publish(WAIT)
        assert info.is_published() and codes[-1] == 0
    finally:
        b.stop()


def test_disk_full_from_the_os_is_refused_with_0x97_and_survived(kafka, paho):
    """ENOSPC, not the configured limit: the data directory is a 640 KiB tmpfs while the limit
    allows 64 MiB. Publishes are refused with 0x97 once the disk is full, nothing crashes, and
    once Kafka drained the log the space returns and publishes are accepted again."""
    import subprocess
    mount = tempfile.mkdtemp(prefix="sluice-enospc-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", mount], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        topic = topic_name("enospc")
        kafka.create_topic(topic, partitions=1)
        config = f"""
[kafka]
delivery = "local-durable"
spill_segment_bytes = 262144
spill_max_bytes_per_shard = 67108864

[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[mqtt_to_kafka]]
name = "enospc"
filters = ["e/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
        b = broker_with(config=config, data_dir=mount)
        try:
            c = paho(b.shard(0), "disk-filler", v5=True)
            acks = []
            c.c.on_publish = lambda cl, u, mid, rc, p: acks.append(rc.value)
            c.publish("e/warm", b"w", 1)
            kafka.pause()
            try:
                n = 0
                while 0x97 not in acks and n < 400:
                    c.c.publish("e/x", b"z" * 4000, 1).wait_for_publish(WAIT)
                    n += 1
                assert 0x97 in acks, "the disk never filled"
                accepted = acks.count(0) - 1
                assert 0 < accepted < 200, accepted  # well below the configured limit
                assert b.proc.poll() is None, "the broker died on a full disk"
            finally:
                kafka.resume()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                acks.clear()
                c.c.publish("e/x", b"space again", 1).wait_for_publish(WAIT)
                if acks == [0]:
                    break
                time.sleep(0.2)
            assert acks == [0], acks
            got = [m.value() for m in kafka.consume(topic, accepted + 2)]
            assert got.count(b"z" * 4000) == accepted and got[-1] == b"space again"
        finally:
            b.stop()
    finally:
        subprocess.run(["umount", mount])


def test_spill_log_of_a_removed_shard_is_replayed_after_restarting_with_fewer_cores(kafka, paho):
    topic = topic_name("fewer-cores")
    kafka.create_topic(topic, partitions=1)
    data_dir = tempfile.mkdtemp(prefix="sluice-fewer-")
    args = ("--kafka", kafka.bootstrap, "--map", f"s/#={topic}", "--delivery", "local-durable")
    b = broker_with(*args, data_dir=data_dir)
    kafka.pause()
    try:
        c = paho(b.shard(1), "shard-one-pub", v5=True)  # records land in shard 1's spill log
        for i in range(30):
            c.publish("s/x", f"r{i}".encode(), 1)
        b.kill()
    finally:
        kafka.resume()
    b2 = broker_with(*args, data_dir=data_dir, cores=1)
    try:
        want = [f"r{i}".encode() for i in range(30)]
        got = [m.value() for m in consume_distinct(kafka, topic, 30)]
        assert list(dict.fromkeys(got)) == want
    finally:
        b2.stop()



@pytest.mark.parametrize("policy", ["drop-newest", "drop-oldest"])
def test_qos0_policy_when_the_kafka_backlog_is_full(kafka, paho, policy):
    """With room for 50 records per shard and Kafka paused, QoS 0 records beyond 50 in flight
    and 50 waiting are dropped — the newest or the oldest waiting — and counted; the shard keeps
    reading, so QoS 1 publishes still reach the spill log and are acknowledged."""
    topic = topic_name("qos0")
    kafka.create_topic(topic, partitions=1)
    config = f"""
[kafka]
delivery = "local-durable"
max_pending_records_per_shard = 50
qos0_when_backlogged = "{policy}"

[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[mqtt_to_kafka]]
name = "telemetry"
filters = ["q/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
"""
    b = broker_with("--sys-interval", "1", config=config)
    try:
        c = paho(b.shard(0), "qos0-pub", v5=True)
        c.publish("q/warm", b"warm", 1)
        kafka.pause()
        try:
            for i in range(500):
                c.c.publish("q/t", f"m{i}".encode(), 0)
            # Same connection, so handled after every QoS 0 message above: acknowledged from disk.
            c.publish("q/t", b"qos1", 1)
        finally:
            kafka.resume()
        if policy == "drop-newest":
            kept = list(range(100))
        else:
            kept = list(range(50)) + list(range(450, 500))
        want = [b"warm"] + [f"m{i}".encode() for i in kept]
        got = [m.value() for m in kafka.consume(topic, len(want) + 1, timeout=30)]
        assert sorted(got) == sorted(want + [b"qos1"])
        # In flight first (in order), then the waiting ones (in order); the QoS 1 record took
        # the spill log's own path.
        assert [v for v in got if v != b"qos1"] == want
        watch = paho(b.shard(0), "qos0-watch")
        watch.subscribe("$SYS/broker/shard/0/kafka/telemetry/default/records/dropped", 0)
        deadline = time.monotonic() + 10
        while watch.message().payload != b"400":
            assert time.monotonic() < deadline, "dropped records not counted"
    finally:
        b.stop()
