"""MQTT → Kafka with SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (sluice's rskafka client against
a SASL front in `sasl_proxy.py`, tansu behind it), and a wrong password refused."""
import uuid

import pytest

from conftest import WAIT, Tansu, broker_with, free_port
from sasl_proxy import SaslProxy


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_bridge_with_sasl(paho, mechanism):
    front, plain_port = free_port(), free_port()
    proxy = SaslProxy(front, plain_port)
    kafka = Tansu(port=plain_port, advertised_port=front)
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    config = f"""
[kafka.clusters.secure]
bootstrap = ["127.0.0.1:{front}"]
auto_create_topics = true
partitions = 1
sasl = {{ mechanism = "{mechanism}", username = "sluice", password = "s3cret" }}

[[mqtt_to_kafka]]
name = "secure"
filters = ["s/#"]
destinations = [{{ cluster = "secure", topic = "{topic}" }}]
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "sasl-pub", v5=True)
        assert c.publish_rc("s/x", b"authenticated", timeout=30) == 0
        assert mechanism in proxy.succeeded and not proxy.failed, (proxy.succeeded, proxy.failed)
        # Read back through the front as well, with librdkafka's own SASL PLAIN.
        [m] = kafka.consume(topic, 1, bootstrap=f"127.0.0.1:{front}", security_protocol="SASL_PLAINTEXT",
                            sasl_mechanism="PLAIN", sasl_username="sluice", sasl_password="s3cret")
        assert m.value() == b"authenticated"
    finally:
        b.stop()
        kafka.stop()
        proxy.close()


def test_wrong_password_is_refused(paho):
    front, plain_port = free_port(), free_port()
    proxy = SaslProxy(front, plain_port)
    kafka = Tansu(port=plain_port, advertised_port=front)
    config = f"""
[kafka.clusters.secure]
bootstrap = ["127.0.0.1:{front}"]
delivery_timeout_ms = 2000
request_timeout_ms = 500
sasl = {{ mechanism = "SCRAM-SHA-256", username = "sluice", password = "wrong" }}

[[mqtt_to_kafka]]
name = "secure"
filters = ["s/#"]
destinations = [{{ cluster = "secure", topic = "never" }}]
"""
    b = broker_with(config=config)
    try:
        c = paho(b.shard(0), "sasl-pub", v5=True)
        assert c.publish_rc("s/x", b"x", timeout=WAIT) == 0x80
        assert proxy.failed and not proxy.succeeded
    finally:
        b.stop()
        kafka.stop()
        proxy.close()
