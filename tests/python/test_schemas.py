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


# ---------------------------------------------------------------------------------------------
# A Confluent-compatible registry: rivven-schema (scripts/install-test-deps installs it).
# ---------------------------------------------------------------------------------------------

class Registry:
    def __init__(self):
        exe = shutil.which("rivven-schema") or str(Path.home() / ".cargo" / "bin" / "rivven-schema")
        assert Path(exe).exists(), "rivven-schema missing: scripts/install-test-deps installs it"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="rivven-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([exe, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        from confluent_kafka.schema_registry import SchemaRegistryClient
        self.client = SchemaRegistryClient({"url": self.url})
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, open(self.log.name).read()
            try:
                self.client.get_subjects()
                break
            except Exception:
                assert time.monotonic() < deadline, "rivven-schema did not come up"
                time.sleep(0.1)

    def register(self, subject, schema):
        from confluent_kafka.schema_registry import Schema
        return self.client.register_schema(subject, Schema(json.dumps(schema), "AVRO"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        self.stop()
        self.log.close()
        os.unlink(self.log.name)


@pytest.fixture
def registry():
    r = Registry()
    yield r
    r.close()


def avro_serde(registry, subject_schema=None, schema_id=None):
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
    client = SchemaRegistryClient({"url": registry.url})
    ser = None
    if subject_schema is not None:
        # The subject's latest version (this registry has no lookup of a schema by its text,
        # which pinning an id or using the given schema needs).
        ser = AvroSerializer(client, json.dumps(subject_schema), conf={"auto.register.schemas": False,
                                                                       "use.latest.version": True})
    return ser, AvroDeserializer(client)


def decoded(deser, topic, records):
    from confluent_kafka.serialization import MessageField, SerializationContext
    return [deser(m.value(), SerializationContext(topic, MessageField.VALUE)) for m in records]


V2 = {**TELEMETRY_AVRO, "fields": TELEMETRY_AVRO["fields"] + [{"name": "site", "type": "string", "default": "none"}]}
# rivven-schema 0.0.22 gives a schema already registered under another subject its old id without
# adding it as a version of the second subject: the Kafka → MQTT subject's v2 differs a little.
V2_DOWN = {**V2, "doc": "v2 of the commands"}


def registry_config(kafka, registry, up, down, extra=""):
    return f"""
[kafka]
spill_on_timeout = false

[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[schema_registries.confluent]
url = "{registry.url}"
refresh_ms = 300
timeout_ms = 1500

[[mqtt_to_kafka]]
name = "encode"
filters = ["enc/#"]
destinations = [{{ cluster = "default", topic = "{up}" }}]
registry = "confluent"
mode = "encode"

[[kafka_to_mqtt]]
name = "decode"
cluster = "default"
kafka_topics = ["{down}"]
mqtt_topics = ["dec/${{json./device}}"]
registry = "confluent"
mode = "decode"
subject = "{down}-value"
qos = 1
start = "earliest"
{extra}
"""


def test_encode_and_decode_against_a_registry_with_confluent_serdes_and_evolution(kafka, paho, registry):
    from confluent_kafka import Producer
    from confluent_kafka.serialization import MessageField, SerializationContext
    up, down = topic_name("enc"), topic_name("dec")
    kafka.create_topic(up, partitions=1)
    kafka.create_topic(down, partitions=1)
    v1_up = registry.register(f"{up}-value", TELEMETRY_AVRO)
    v1_down = registry.register(f"{down}-value", TELEMETRY_AVRO)
    b = broker_with("--http", "127.0.0.1:0", config=registry_config(kafka, registry, up, down))
    try:
        c = paho(b.shard(0), "enc-pub", v5=True)
        sub = paho(b.shard(1), "dec-sub", v5=True)
        sub.subscribe("dec/#", 1)
        # MQTT → Kafka: devices send JSON, Kafka gets Confluent wire-format Avro.
        assert puback(c, "enc/car-1", b'{"device":"car-1","temp":21.5}') == (0, None)
        code, why = puback(c, "enc/car-1", b'{"device":"car-1"}')
        assert code == PAYLOAD_FORMAT_INVALID, (code, why)
        assert why == f"subject `{up}-value` (registry `confluent`): $.temp: required field missing", why
        code, why = puback(c, "enc/car-1", b'{"device":"car-1","temp":"hot"}')
        assert code == PAYLOAD_FORMAT_INVALID and "$.temp: expected double" in why, why
        assert puback(c, "enc/car-1", b"not json")[0] == PAYLOAD_FORMAT_INVALID
        _, deser = avro_serde(registry)
        got = kafka.consume(up, 1)
        assert got[0].value()[:5] == b"\x00" + v1_up.to_bytes(4, "big")
        assert decoded(deser, up, got) == [{"device": "car-1", "temp": 21.5}]

        # Kafka → MQTT: records written by confluent-kafka's AvroSerializer reach devices as JSON.
        ser, _ = avro_serde(registry, TELEMETRY_AVRO, v1_down)
        p = Producer({"bootstrap.servers": kafka.bootstrap})
        ctx = SerializationContext(down, MessageField.VALUE)
        p.produce(down, key=b"car-2", value=ser({"device": "car-2", "temp": 3.0}, ctx))
        p.produce(down, key=b"bad", value=b"\x00\x00\x00\x27\x0fnope")  # an unknown id: skipped
        p.produce(down, key=b"car-3", value=ser({"device": "car-3", "temp": 4.0}, ctx)[:-2])  # truncated
        p.produce(down, key=b"car-4", value=ser({"device": "car-4", "temp": 5.0}, ctx))
        p.flush(WAIT)
        written_with_v1 = ser({"device": "car-5", "temp": 6.0}, ctx)
        assert written_with_v1[1:5] == v1_down.to_bytes(4, "big")
        m = sub.message()
        # Read with the subject's latest schema (v1 here).
        assert (m.topic, json.loads(m.payload)) == ("dec/car-2", {"device": "car-2", "temp": 3.0})
        m = sub.message()
        assert (m.topic, json.loads(m.payload)) == ("dec/car-4", {"device": "car-4", "temp": 5.0})

        # Evolution: v2 adds a field with a default, registered while sluice runs.
        v2_up = registry.register(f"{up}-value", V2)
        registry.register(f"{down}-value", V2_DOWN)
        assert v2_up != v1_up

        def encoded_with_v2():
            assert puback(c, "enc/car-1", b'{"device":"car-1","temp":1,"site":"lyon"}') == (0, None)
            last = kafka.consume(up, 100, timeout=2)[-1]
            return last.value()[1:5] == v2_up.to_bytes(4, "big")
        wait_for(encoded_with_v2, "the new version is picked up without a restart", timeout=20)
        # Old payloads (without the new field) flow too, with the default.
        assert puback(c, "enc/car-1", b'{"device":"car-1","temp":2}') == (0, None)
        last = kafka.consume(up, 100, timeout=2)[-1]
        assert decoded(deser, up, [last]) == [{"device": "car-1", "temp": 2.0, "site": "none"}]
        # Records written with v1 decode with the reader's v2 (Avro resolution fills the default).
        def read_with_v2():
            p.produce(down, key=b"car-5", value=written_with_v1)
            p.flush(WAIT)
            got = json.loads(sub.message().payload)
            assert got["device"] == "car-5" and got["temp"] == 6.0
            return got.get("site") == "none"
        wait_for(read_with_v2, "the reader's new version is picked up without a restart", timeout=20)

        # An incompatible v3 is refused by the registry; sluice keeps encoding with v2.
        bad = {**TELEMETRY_AVRO, "fields": [{"name": "device", "type": "int"}]}
        with pytest.raises(Exception):
            registry.register(f"{up}-value", bad)
        time.sleep(0.01)
        assert puback(c, "enc/car-1", b'{"device":"car-1","temp":3}') == (0, None)
        last = kafka.consume(up, 100, timeout=2)[-1]
        assert last.value()[1:5] == v2_up.to_bytes(4, "big")
        # Counted: the first record waited for its schema; two records from Kafka were skipped.
        import urllib.request
        with urllib.request.urlopen(f"http://{b.http[0]}:{b.http[1]}/metrics", timeout=WAIT) as r:
            text = r.read().decode()
        metric = lambda name: float(next(l.split()[-1] for l in text.splitlines() if l.startswith(name + " ")))
        assert metric("sluice_schema_registry_waits_total") >= 1, text
        assert metric("sluice_schema_registry_waiting") == 0
        assert metric("sluice_kafka_to_mqtt_schema_skipped_total") >= 2
        # The refused payloads, by cause: two that do not convert, one that is not JSON.
        def invalid(cause):
            return sum(float(l.split()[-1]) for l in text.splitlines()
                       if l.startswith("sluice_kafka_records_invalid_total{") and f'cause="{cause}"' in l)
        assert invalid("does_not_convert") == 2 and invalid("not_json") == 1, text
    finally:
        b.stop()


def test_a_registry_outage_keeps_cached_schemas_and_fails_unknown_ids_cleanly(kafka, paho, registry):
    import io
    from fastavro import schemaless_writer
    up, down, checked = topic_name("enc"), topic_name("dec"), topic_name("val")
    for t in (up, down, checked):
        kafka.create_topic(t, partitions=1)
    registry.register(f"{up}-value", TELEMETRY_AVRO)
    known = registry.register(f"{checked}-value", TELEMETRY_AVRO)
    extra = f"""
[[mqtt_to_kafka]]
name = "validate"
filters = ["val/#"]
destinations = [{{ cluster = "default", topic = "{checked}" }}]
registry = "confluent"
mode = "validate"
"""
    b = broker_with(config=registry_config(kafka, registry, up, down, extra))
    try:
        c = paho(b.shard(0), "outage-pub", v5=True)
        buf = io.BytesIO()
        schemaless_writer(buf, TELEMETRY_AVRO, {"device": "d", "temp": 1.0})
        framed = b"\x00" + known.to_bytes(4, "big") + buf.getvalue()
        unknown = b"\x00" + (known + 1000).to_bytes(4, "big") + buf.getvalue()
        # While the registry is up: both mappings learn their schemas; an unknown id is invalid.
        assert puback(c, "enc/x", b'{"device":"d","temp":1}') == (0, None)
        assert puback(c, "val/x", framed) == (0, None)
        code, why = puback(c, "val/x", unknown)
        assert code == PAYLOAD_FORMAT_INVALID and f"schema id {known + 1000}" in why, why
        # The registry goes away: what is cached keeps working on the shard that cached it…
        registry.stop()
        for _ in range(3):
            assert puback(c, "enc/x", b'{"device":"d","temp":2}') == (0, None)
            assert puback(c, "val/x", framed) == (0, None)
        # …past the refresh interval too (a failed refresh keeps the schema).
        time.sleep(0.5)
        assert puback(c, "enc/x", b'{"device":"d","temp":3}') == (0, None)
        # An id never seen fails cleanly, as a bridge error (0x83), after the registry time-out.
        t0 = time.monotonic()
        code, why = puback(c, "val/x", b"\x00" + (known + 2000).to_bytes(4, "big") + buf.getvalue())
        assert code == 0x83 and time.monotonic() - t0 < 5, code
        # And a shard that never fetched the schema fails its publishes cleanly, not forever.
        other = paho(b.shard(1), "outage-pub-2", v5=True)
        assert puback(other, "enc/y", b'{"device":"d","temp":1}')[0] == 0x83
        # The broker still serves plain MQTT.
        other.subscribe("plain/y", 0)
        other.publish("plain/y", b"ok", 0)
        assert other.message().payload == b"ok"
        assert len(kafka.consume(up, 5, timeout=10)) == 5
    finally:
        b.stop()


class AuthTlsFront:
    """HTTPS with basic auth in front of the registry, as Confluent Cloud serves one: requests
    without `user:password` get 401, the rest go to the registry as they are."""

    def __init__(self, backend_url, d, user="sluice", password="s3cret"):
        import base64
        import http.server
        import ssl
        import threading
        import urllib.request
        from test_kafka_tls import make_certs
        make_certs(d)
        self.ca = str(Path(d) / "ca.pem")
        want = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
        self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def forward(self):
                self.server.front.seen.append(self.headers.get("Authorization"))
                if self.headers.get("Authorization") != want:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else None
                req = urllib.request.Request(backend_url + self.path, data=body, method=self.command)
                for h in ("Content-Type", "Accept"):
                    if self.headers.get(h):
                        req.add_header(h, self.headers[h])
                try:
                    with urllib.request.urlopen(req, timeout=10) as r:
                        code, data, ctype = r.status, r.read(), r.headers.get("Content-Type", "application/json")
                except urllib.error.HTTPError as e:
                    code, data, ctype = e.code, e.read(), e.headers.get("Content-Type", "application/json")
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = forward

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(Path(d) / "server.pem"), str(Path(d) / "server.key"))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.httpd.front = self
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()


def test_a_registry_over_https_with_basic_auth_as_confluent_cloud_serves_one(kafka, paho, registry, tmp_path):
    up, down = topic_name("enc"), topic_name("dec")
    kafka.create_topic(up, partitions=1)
    kafka.create_topic(down, partitions=1)
    v1 = registry.register(f"{up}-value", TELEMETRY_AVRO)
    registry.register(f"{down}-value", TELEMETRY_AVRO)
    front = AuthTlsFront(registry.url, tmp_path)
    extra = f"""
[schema_registries.wrong_password]
url = "{front.url}"
tls = {{ ca_file = "{front.ca}" }}
username = "sluice"
password = "guess"
timeout_ms = 1500

[schema_registries.untrusted]
url = "{front.url}"
username = "sluice"
password = "s3cret"
timeout_ms = 1500

[[mqtt_to_kafka]]
name = "wrong-password"
filters = ["wp/#"]
destinations = [{{ cluster = "default", topic = "{up}" }}]
registry = "wrong_password"
mode = "encode"
subject = "{up}-value"

[[mqtt_to_kafka]]
name = "untrusted"
filters = ["ut/#"]
destinations = [{{ cluster = "default", topic = "{up}" }}]
registry = "untrusted"
mode = "encode"
subject = "{up}-value"
"""
    config = registry_config(kafka, registry, up, down, extra).replace(
        f'url = "{registry.url}"',
        f'url = "{front.url}"\ntls = {{ ca_file = "{front.ca}" }}\nusername = "sluice"\npassword = "s3cret"', 1)
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "tls-pub", v5=True)
        assert puback(c, "enc/car-1", b'{"device":"car-1","temp":21.5}') == (0, None)
        got = kafka.consume(up, 1)
        assert got[0].value()[:5] == b"\x00" + v1.to_bytes(4, "big")
        assert any(a and a.startswith("Basic ") for a in front.seen), front.seen
        # A wrong password and an untrusted certificate: the registry cannot answer, a bridge
        # error (0x83), and the broker goes on.
        assert puback(c, "wp/x", b'{"device":"d","temp":1}')[0] == 0x83
        assert puback(c, "ut/x", b'{"device":"d","temp":1}')[0] == 0x83
        assert puback(c, "enc/car-1", b'{"device":"car-1","temp":1}') == (0, None)
    finally:
        b.stop()
        front.close()
