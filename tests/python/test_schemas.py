"""Payload schemas on the bridge, end to end: local JSON Schema and Avro validation of MQTT →
Kafka publishes (MQTT 5 PUBACK 0x99 with a reason string, the 3.1.1 policies), and a real
Confluent-compatible registry (rivven-schema) with confluent-kafka's AvroSerializer and
AvroDeserializer as the independent encoder and decoder."""
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import WAIT, broker_with, free_port

PAYLOAD_FORMAT_INVALID = 0x99

TELEMETRY_JSON_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["device", "temp"],
    "properties": {"device": {"type": "string"}, "temp": {"type": "number"}},
}

TELEMETRY_AVRO = {
    "type": "record", "name": "Telemetry", "namespace": "iot",
    "fields": [{"name": "device", "type": "string"}, {"name": "temp", "type": "double"}],
}


def topic_name(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def headers(m):
    return {k: v for k, v in (m.headers() or [])}


def write(tmp, name, obj):
    p = Path(tmp) / name
    p.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return str(p)


def puback(client, topic, payload):
    """Publishes at QoS 1 (MQTT 5) and returns (reason code, reason string) of the PUBACK."""
    got = []
    previous = client.c.on_publish
    client.c.on_publish = lambda c, u, mid, rc, p: got.append((rc.value, getattr(p, "ReasonString", None)))
    try:
        client.c.publish(topic, payload, 1).wait_for_publish(WAIT)
        deadline = time.monotonic() + WAIT
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        client.c.on_publish = previous
    assert len(got) == 1, got
    return got[0]


def v311(addr, client_id):
    """A 3.1.1 client that does not reconnect; `gone` is set when the broker closes it."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    c.reconnect_delay_set(60, 60)
    c.gone = []
    c.on_disconnect = lambda *a: c.gone.append(True)
    c.connect(*addr)
    c.loop_start()
    return c


def broker_logging(config, log_path):
    """`broker_with(config=…)` whose log (stderr) goes to `log_path`."""
    saved = os.dup(2)
    with open(log_path, "w") as log:
        os.dup2(log.fileno(), 2)
        try:
            return broker_with(config=config)
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def wait_for(cond, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_local_json_schema_validates_publishes_with_0x99_and_the_311_policies(kafka, paho, tmp_path):
    topic, dlq, dropped, strict = (topic_name(p) for p in ("tele", "tele-dlq", "drop", "strict"))
    for t in (topic, dlq, dropped, strict):
        kafka.create_topic(t, partitions=1)
    schema = write(tmp_path, "telemetry.json", TELEMETRY_JSON_SCHEMA)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[schemas.telemetry]
kind = "json-schema"
file = "{schema}"

[[mqtt_to_kafka]]
name = "tele"
filters = ["tele/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
dead_letter = {{ cluster = "default", topic = "{dlq}" }}
schema = "telemetry"
on_invalid = "dead-letter"

[[mqtt_to_kafka]]
name = "dropper"
filters = ["drop/#"]
destinations = [{{ cluster = "default", topic = "{dropped}" }}]
schema = "telemetry"
on_invalid = "drop"

[[mqtt_to_kafka]]
name = "strict"
filters = ["strict/#"]
destinations = [{{ cluster = "default", topic = "{strict}" }}]
schema = "telemetry"
on_invalid = "disconnect"
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "v5-pub", v5=True)
        assert puback(c, "tele/car-1", b'{"device":"car-1","temp":21.5}') == (0, None)
        code, why = puback(c, "tele/car-1", b'{"device":"car-1"}')
        assert code == PAYLOAD_FORMAT_INVALID
        assert why.startswith("telemetry: ") and "\"temp\" is a required property" in why, why
        code, why = puback(c, "tele/car-1", b'{"device":"car-1","temp":"hot"}')
        assert code == PAYLOAD_FORMAT_INVALID and "not of type \"number\"" in why and "/temp" in why, why
        code, why = puback(c, "tele/car-1", b'{"device":')
        assert code == PAYLOAD_FORMAT_INVALID and why.startswith("telemetry: not JSON"), why
        huge = b'{"device":"' + b"x" * 200_000 + b'"}'
        assert puback(c, "tele/car-1", huge)[0] == PAYLOAD_FORMAT_INVALID
        assert puback(c, "tele/car-1", b'{"device":"car-1","temp":22}') == (0, None)
        # Only the valid ones reach the topic, in order.
        got = kafka.consume(topic, 2)
        assert [json.loads(m.value()) for m in got] == [{"device": "car-1", "temp": 21.5},
                                                        {"device": "car-1", "temp": 22}]

        # 3.1.1, dead-letter: acknowledged, and the payload is in the dead-letter topic with
        # headers naming the schema and the error.
        old = v311(b.shard(1), "v3-dead")
        info = old.publish("tele/car-2", b'{"temp":1}', 1)
        info.wait_for_publish(WAIT)
        assert info.is_published() and not old.gone
        dead = kafka.consume(dlq, 5, timeout=10)
        mine = [d for d in dead if headers(d).get("mqtt.client_id") == b"v3-dead"]
        assert len(mine) == 1, [headers(d) for d in dead]
        h = headers(mine[0])
        assert mine[0].value() == b'{"temp":1}'
        assert h["sluice.schema"] == b"telemetry" and b"\"device\" is a required property" in h["sluice.error"]
        assert h["sluice.topic"] == topic.encode()
        # MQTT 5 invalid payloads went there too (the mapping's policy), four of them.
        assert len(dead) == 5

        # drop: acknowledged and nothing reaches Kafka.
        info = old.publish("drop/car-2", b"[]", 1)
        info.wait_for_publish(WAIT)
        assert info.is_published() and not old.gone
        info = old.publish("drop/car-2", b'{"device":"d","temp":0}', 1)
        info.wait_for_publish(WAIT)
        [m] = kafka.consume(dropped, 1)
        assert m.value() == b'{"device":"d","temp":0}'

        # disconnect: the connection closes without an acknowledgement.
        info = old.publish("strict/car-2", b"{}", 1)
        wait_for(lambda: old.gone, "the strict mapping closes a 3.1.1 publisher of an invalid payload")
        assert not info.is_published()
        old.loop_stop()

        # Nobody else was disturbed.
        assert puback(c, "tele/car-1", b'{"device":"after","temp":0}') == (0, None)
        sub = paho(b.shard(1), "watcher")
        sub.subscribe("plain/x", 0)
        sub.publish("plain/x", b"still here", 0)
        assert sub.message().payload == b"still here"
    finally:
        b.stop()


def test_local_avro_schema_and_reload_keeps_the_old_schema_on_a_broken_file(kafka, paho, tmp_path):
    from fastavro import schemaless_writer
    import io
    topic = topic_name("avro")
    kafka.create_topic(topic, partitions=1)
    schema = write(tmp_path, "t.avsc", TELEMETRY_AVRO)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[schemas.t]
kind = "avro"
file = "{schema}"

[[mqtt_to_kafka]]
name = "avro"
filters = ["avro/#"]
destinations = [{{ cluster = "default", topic = "{topic}" }}]
schema = "t"
"""
    log = tmp_path / "sluice.log"
    b = broker_logging(config, log)
    try:
        buf = io.BytesIO()
        schemaless_writer(buf, TELEMETRY_AVRO, {"device": "car", "temp": 1.5})
        datum = buf.getvalue()
        c = paho(b.shard(0), "avro-pub", v5=True)
        assert puback(c, "avro/a", datum) == (0, None)
        code, why = puback(c, "avro/a", datum[:-3])
        assert code == PAYLOAD_FORMAT_INVALID and why.startswith("t: not an Avro datum"), why
        code, why = puback(c, "avro/a", datum + b"\x00")
        assert code == PAYLOAD_FORMAT_INVALID and "left after the datum" in why, why
        # A broken file on SIGHUP: the old schema stays, the log names the file.
        Path(schema).write_text("{broken")
        b.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "schema reload failed" in log.read_text(), "the failed reload is logged")
        assert f"schema `t` (file {schema})" in log.read_text()
        assert puback(c, "avro/a", datum) == (0, None)
        # A good file on SIGHUP: the new schema (a string only) is in force.
        Path(schema).write_text('"string"')
        b.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: puback(c, "avro/a", b"\x06abc")[0] == 0, "the new schema is in force")
        assert puback(c, "avro/a", datum)[0] == PAYLOAD_FORMAT_INVALID
    finally:
        b.stop()
