"""local-durable delivery: acknowledged once on local disk, delivered to Kafka through outages and
crashes (the per-shard spill log)."""
import tempfile
import time
import uuid

import paho.mqtt.client as mqtt

from conftest import WAIT, broker_with


def topic_name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


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
