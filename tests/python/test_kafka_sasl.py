"""MQTT → Kafka with SASL PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 (sluice's rskafka client against
a SASL front in `sasl_proxy.py`, tansu behind it), and a wrong password refused."""
import uuid

import pytest

from conftest import WAIT, FrontedBridge
from sasl_proxy import SaslProxy


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_bridge_with_sasl(paho, mechanism):
    settings = f"""auto_create_topics = true
partitions = 1
sasl = {{ mechanism = "{mechanism}", username = "sluice", password = "s3cret" }}"""
    with FrontedBridge(SaslProxy, settings, topic=f"sasl-{uuid.uuid4().hex[:8]}") as f:
        c = paho(f.broker.shard(0), "sasl-pub", v5=True)
        assert c.publish_rc("s/x", b"authenticated", timeout=30) == 0
        assert mechanism in f.front.succeeded and not f.front.failed, (f.front.succeeded, f.front.failed)
        # Read back through the front as well, with librdkafka's own SASL PLAIN.
        [m] = f.kafka.consume(f.topic, 1, bootstrap=f"127.0.0.1:{f.front_port}", security_protocol="SASL_PLAINTEXT",
                              sasl_mechanism="PLAIN", sasl_username="sluice", sasl_password="s3cret")
        assert m.value() == b"authenticated"


def test_wrong_password_is_refused(paho):
    settings = """delivery_timeout_ms = 2000
request_timeout_ms = 500
sasl = { mechanism = "SCRAM-SHA-256", username = "sluice", password = "wrong" }"""
    with FrontedBridge(SaslProxy, settings) as f:
        c = paho(f.broker.shard(0), "sasl-pub", v5=True)
        assert c.publish_rc("s/x", b"x", timeout=WAIT) == 0x80
        assert f.front.failed and not f.front.succeeded
