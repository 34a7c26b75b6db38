"""Authentication and authorization against the real binary: Mosquitto password files (written by
mosquitto_passwd and by `sluice passwd`), a Mosquitto ACL with per-device patterns, JWTs made by
PyJWT, reload on SIGHUP that fails closed, and a password-guessing storm beside a canary."""

import os
import signal
import subprocess
import threading
import time

import jwt
import pytest

from conftest import WAIT, Broker, Paho, sluice_bin
from rawmqtt import mqtt_str, packet

SECRET = "a-shared-secret-of-32-bytes-long!!"


@pytest.fixture
def auth_dir(tmp_path):
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "alice", "s3cret"], check=True)
    subprocess.run(["mosquitto_passwd", "-b", str(pw), "bob", "hunter2"], check=True)
    (tmp_path / "acl").write_text(
        "# each device its own tree\npattern readwrite devices/%c/#\nuser alice\ntopic readwrite canary/#\n")
    (tmp_path / "secret").write_text(SECRET)
    (tmp_path / "sluice.toml").write_text(f"""
[auth]
password_file = "{pw}"
acl_file = "{tmp_path / 'acl'}"
[auth.jwt]
algorithm = "HS256"
secret_file = "{tmp_path / 'secret'}"
""")
    return tmp_path


@pytest.fixture
def auth_broker(auth_dir):
    b = Broker("--config", str(auth_dir / "sluice.toml"))
    yield b
    b.stop()


def connect_rc(addr, client_id, user=None, password=None, v5=True):
    c = Paho(addr, client_id, v5=v5, user=user, password=password)
    rc = c.rc.value if hasattr(c.rc, "value") else c.rc
    c.close()
    return rc


def raw_311_return_code(addr, client_id, user=None, password=None):
    """The CONNACK return code a 3.1.1 CONNECT gets, read off the socket (paho maps them to MQTT 5)."""
    import socket
    flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if password is not None else 0)
    body = mqtt_str("MQTT") + bytes([4, flags]) + b"\x00\x00" + mqtt_str(client_id)
    body += (mqtt_str(user) if user is not None else b"") + (mqtt_str(password) if password is not None else b"")
    with socket.create_connection(addr, timeout=WAIT) as s:
        s.sendall(packet(0x10, body))
        ack = b""
        while len(ack) < 4:
            chunk = s.recv(4 - len(ack))
            assert chunk, "closed without a CONNACK"
            ack += chunk
    assert ack[:3] == b"\x20\x02\x00", ack
    return ack[3]


def test_clients_connect_only_with_a_password_of_the_file_or_a_valid_token(auth_broker):
    a = auth_broker.addr
    assert connect_rc(a, "car1", "alice", "s3cret") == 0
    assert connect_rc(a, "car1", "alice", "s3cret", v5=False) == 0
    # MQTT 5: 0x86 bad user name or password, 0x87 not authorized; 3.1.1: return codes 4 and 5.
    assert connect_rc(auth_broker.shard(0), "x1", "alice", "wrong") == 0x86
    assert raw_311_return_code(auth_broker.shard(1), "x2", "mallory", "x") == 4
    assert connect_rc(a, "x3") == 0x87
    assert raw_311_return_code(a, "x4") == 5
    now = int(time.time())
    good = jwt.encode({"sub": "carol", "exp": now + 60}, SECRET, algorithm="HS256")
    expired = jwt.encode({"sub": "carol", "exp": now - 120}, SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "carol", "exp": now + 60}, "another-secret-of-32-bytes-long!!!", algorithm="HS256")
    assert connect_rc(a, "car3", "carol", good) == 0
    assert connect_rc(a, "x5", "carol", expired) == 0x86
    assert connect_rc(a, "x6", "carol", forged) == 0x86


def test_a_device_cannot_publish_to_or_read_another_devices_topics(auth_broker):
    car1 = Paho(auth_broker.shard(0), "car1", v5=True, user="alice", password="s3cret")
    car2 = Paho(auth_broker.shard(1), "car2", v5=True, user="bob", password="hunter2")
    _, _, rcs, _ = car1.subscribe([("devices/car1/#", 1), ("devices/car2/#", 1), ("#", 1)])
    assert [r.value for r in rcs] == [1, 0x87, 0x87]
    # car2 writes into car1's tree: refused (0x87) and delivered to nobody.
    assert car2.publish_rc("devices/car1/cmd", b"open the doors") == 0x87
    assert car2.publish_rc("devices/car2/speed", b"88") == 0
    assert car1.publish_rc("devices/car1/speed", b"42") == 0
    m = car1.message()
    assert (m.topic, m.payload) == ("devices/car1/speed", b"42"), "only its own message arrives"
    with pytest.raises(Exception):
        car1.message(timeout=0.3)
    # mosquitto_sub as bob cannot read car1's topics either.
    out = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(auth_broker.port), "-V", "mqttv5",
                          "-u", "bob", "-P", "hunter2", "-i", "car2b", "-t", "devices/car1/#", "-C", "1", "-W", "2"],
                         capture_output=True, text=True)
    assert "devices/car1" not in out.stdout
    car1.close()
    car2.close()


def test_a_reload_with_a_broken_acl_keeps_the_previous_rules_and_a_good_one_applies(auth_dir, auth_broker):
    car2 = Paho(auth_broker.addr, "car2", v5=True, user="bob", password="hunter2")
    assert car2.publish_rc("devices/car1/cmd", b"x") == 0x87
    (auth_dir / "acl").write_text("pattern readwrite devices/%c/#\nthis line is not an ACL rule\n")
    auth_broker.proc.send_signal(signal.SIGHUP)
    # Fail closed: the broken file changes nothing, for new and for connected clients.
    time.sleep(0.5)  # nothing to wait for: the reload is refused; a wrong reload would apply within a tick
    assert car2.publish_rc("devices/car1/cmd", b"x") == 0x87
    assert connect_rc(auth_broker.addr, "car9", "alice", "s3cret") == 0
    (auth_dir / "acl").write_text("pattern readwrite devices/%c/#\nuser bob\ntopic write devices/#\n")
    auth_broker.proc.send_signal(signal.SIGHUP)
    wait_until_allowed(car2, "devices/car1/cmd", "the good reload never applied")
    car2.close()


def wait_until_allowed(client, topic, why):
    """Publishes to `topic` until its PUBACK says 0 (a reload applied), or fails with `why`."""
    deadline = time.monotonic() + WAIT
    while client.publish_rc(topic, b"x") != 0:
        assert time.monotonic() < deadline, why
        time.sleep(0.05)


def test_sluice_passwd_writes_an_argon2id_entry_the_broker_accepts(auth_dir):
    pw = auth_dir / "passwd"
    subprocess.run([sluice_bin(), "passwd", str(pw), "erin"], input="correct horse\n", text=True, check=True)
    lines = pw.read_text().splitlines()
    assert any(l.startswith("erin:$argon2id$") for l in lines)
    assert sum(l.startswith("alice:$7$") for l in lines) == 1, "the other entries are kept"
    b = Broker("--config", str(auth_dir / "sluice.toml"))
    try:
        # argon2id is checked off the shard; the CONNECT waits for it.
        assert connect_rc(b.addr, "e1", "erin", "correct horse") == 0
        assert connect_rc(b.addr, "e2", "erin", "battery staple") == 0x86
        assert connect_rc(b.addr, "a1", "alice", "s3cret") == 0
    finally:
        b.stop()


def test_a_password_guessing_storm_is_slowed_and_does_not_disturb_a_canary(auth_broker):
    from test_hostile_clients import Canary

    canary = Canary(auth_broker.shard(0), auth_broker.shard(1), "canary", user="alice", password="s3cret")
    stop = threading.Event()
    results = []

    def guess():
        while not stop.is_set():
            t0 = time.monotonic()
            results.append((connect_rc(auth_broker.shard(0), "guess", "alice", "guess"), time.monotonic() - t0))

    threads = [threading.Thread(target=guess) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join(WAIT + 6)
    canary.check(max_gap=1.0)
    assert results and all(rc == 0x86 for rc, _ in results)
    assert max(d for _, d in results) >= 0.4, "repeated failures from one address are answered later and later"


def test_a_client_is_disconnected_when_its_token_expires(auth_broker):
    exp = int(time.time()) + 2
    token = jwt.encode({"sub": "carol", "exp": exp}, SECRET, algorithm="HS256")
    c = Paho(auth_broker.addr, "car3", v5=True, user="carol", password=token)
    assert c.rc.value == 0
    _, _, rc, _ = c.event("disconnect")
    # MQTT 5 0xA0: maximum connect time; it comes at the token's exp (checked every 0.5 s).
    assert rc.value == 0xA0, rc
    assert time.time() >= exp - 0.5
    c.close()


def test_records_from_kafka_reach_only_devices_that_may_read_them(kafka, paho, tmp_path):
    """A subscription granted under one ACL stops reading what a reloaded ACL denies, for
    messages that come from Kafka too: every delivery is checked when it is written."""
    import uuid
    from confluent_kafka import Producer
    topic = f"cmds-{uuid.uuid4().hex[:8]}"
    kafka.create_topic(topic, partitions=1)
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "alice", "s3cret"], check=True)
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read devices/#\n")
    config = tmp_path / "sluice.toml"
    config.write_text(f"""
[auth]
password_file = "{pw}"
acl_file = "{acl}"

[[kafka_to_mqtt]]
name = "commands"
cluster = "default"
kafka_topics = ["{topic}"]
mqtt_topics = ["devices/${{key}}/commands"]
qos = 1
start = "earliest"
""")
    b = Broker("--kafka", kafka.bootstrap, "--config", str(config))
    try:
        # Device and probe on one shard: each shard takes the reloaded rules in its own turn.
        dev = Paho(b.shard(0), "car-1", v5=True, user="alice", password="s3cret")
        _, _, rcs, _ = dev.subscribe("devices/#", 1)
        assert rcs[0].value == 1
        acl.write_text("pattern read devices/%c/#\n")
        b.proc.send_signal(signal.SIGHUP)
        # Wait until the new rules are in force, asking on another connection: `dev` itself sends
        # nothing after the reload, so only the delivery check can keep car-2's records from it.
        deadline = time.monotonic() + WAIT
        while True:
            probe = Paho(b.shard(0), "probe", v5=True, user="alice", password="s3cret")
            refused = probe.subscribe("devices/car-2/#", 1)[2][0].value == 0x87
            probe.close()
            if refused:
                break
            assert time.monotonic() < deadline, "the reload never applied"
            time.sleep(0.05)
        p = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 0})
        for key in ["car-2", "car-1", "car-2", "car-1"]:
            p.produce(topic, key=key.encode(), value=f"for {key}".encode())
        assert p.flush(WAIT) == 0
        got = [dev.message() for _ in range(2)]
        assert [(m.topic, m.payload) for m in got] == [("devices/car-1/commands", b"for car-1")] * 2
        dev.no_message(0.5)
        dev.close()
    finally:
        b.stop()


@pytest.mark.parametrize("alg,key", [("RS256", "rsa"), ("ES256", "ec")])
def test_tokens_signed_with_a_private_key_are_checked_against_the_public_key(tmp_path, alg, key):
    keys = os.path.join(os.path.dirname(__file__), "..", "..", "core", "src", "auth", "testdata")
    private = open(os.path.join(keys, f"{key}_private.pem")).read()
    (tmp_path / "sluice.toml").write_text(f"""
[auth.jwt]
algorithm = "{alg}"
public_key_file = "{os.path.join(keys, f'{key}_public.pem')}"
""")
    b = Broker("--config", str(tmp_path / "sluice.toml"))
    try:
        now = int(time.time())
        good = jwt.encode({"sub": "dev-7", "exp": now + 60}, private, algorithm=alg)
        other = open(os.path.join(keys, "rsa2_private.pem")).read()
        assert connect_rc(b.addr, "d1", "dev-7", good) == 0
        if alg == "RS256":
            forged = jwt.encode({"sub": "dev-7", "exp": now + 60}, other, algorithm=alg)
            assert connect_rc(b.addr, "d2", "dev-7", forged) == 0x86
        # A token naming another algorithm (the HS256-with-the-public-key trick) is refused.
        assert connect_rc(b.addr, "d3", "dev-7", jwt.encode({"sub": "x", "exp": now + 60}, "k" * 32,
                                                           algorithm="HS256")) == 0x86
    finally:
        b.stop()


def test_allow_anonymous_on_one_listener_lets_clients_without_credentials_in_there_only(auth_dir):
    config = (auth_dir / "sluice.toml").read_text() + """
[[listeners]]
address = "127.0.0.1:0"
kind = "tcp"
allow_anonymous = true

[[listeners]]
address = "127.0.0.1:0"
kind = "tcp"
"""
    (auth_dir / "two.toml").write_text(config)
    b = Broker("--config", str(auth_dir / "two.toml"))
    try:
        # Listener 0 is the harness's --listen; 1 takes anonymous clients, 2 does not.
        open_one, closed_one = b.listeners[1][1], b.listeners[2][1]
        assert connect_rc(open_one, "local-1") == 0
        assert connect_rc(closed_one, "local-2") == 0x87
        assert connect_rc(b.addr, "local-3") == 0x87
        assert connect_rc(closed_one, "car1", "alice", "s3cret") == 0
    finally:
        b.stop()


@pytest.fixture
def two_auth_dir(tmp_path):
    """A device listener (alice; each device its own tree) and a back-end listener (bob; ops/#
    and reading devices), each with its own [listeners.auth], and no global [auth]."""
    for name, user, password in [("devices", "alice", "s3cret"), ("backend", "bob", "hunter2")]:
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / f"{name}.passwd"), user, password],
                       check=True)
    (tmp_path / "devices.acl").write_text("pattern readwrite devices/%c/#\n")
    (tmp_path / "backend.acl").write_text("user bob\ntopic readwrite ops/#\ntopic read devices/#\n")
    (tmp_path / "sluice.toml").write_text(f"""
[[listeners]]
address = "127.0.0.1:0"
[listeners.auth]
password_file = "{tmp_path / 'devices.passwd'}"
acl_file = "{tmp_path / 'devices.acl'}"

[[listeners]]
address = "127.0.0.1:0"
[listeners.auth]
password_file = "{tmp_path / 'backend.passwd'}"
acl_file = "{tmp_path / 'backend.acl'}"
""")
    return tmp_path


# Listener indices: 0 is the harness's --listen, then the config's in order.
DEVICES, BACKEND = 1, 2


def test_each_listener_authenticates_and_authorizes_with_its_own_files(two_auth_dir):
    b = Broker("--config", str(two_auth_dir / "sluice.toml"))
    try:
        dev, back = b.listeners[DEVICES][1], b.listeners[BACKEND][1]
        # A user of one listener cannot log in on the other.
        assert connect_rc(dev, "car1", "alice", "s3cret") == 0
        assert connect_rc(back, "car1", "alice", "s3cret") == 0x86
        assert connect_rc(back, "svc", "bob", "hunter2") == 0
        assert connect_rc(dev, "svc", "bob", "hunter2") == 0x86
        assert raw_311_return_code(dev, "x1", "bob", "hunter2") == 4
        assert connect_rc(dev, "anon") == 0x87
        # The harness's listener has no auth section: open, as without [auth].
        assert connect_rc(b.addr, "anon") == 0
        # The same client id has the rights of the listener it came by.
        on_dev = Paho(dev, "car1", v5=True, user="alice", password="s3cret")
        assert on_dev.publish_rc("devices/car1/speed", b"1") == 0
        assert on_dev.publish_rc("ops/deploy", b"1") == 0x87
        on_dev.close()
        on_back = Paho(back, "car1", v5=True, user="bob", password="hunter2")
        assert on_back.publish_rc("devices/car1/speed", b"1") == 0x87
        assert on_back.publish_rc("ops/deploy", b"1") == 0
        _, _, rcs, _ = on_back.subscribe([("devices/#", 1), ("ops/#", 1), ("#", 1)])
        assert [r.value for r in rcs] == [1, 1, 0x87]
        # A device's message reaches the back end, which may read every device's tree.
        car2 = Paho(dev, "car2", v5=True, user="alice", password="s3cret")
        _, _, rcs, _ = car2.subscribe([("devices/car2/#", 1), ("ops/#", 1)])
        assert [r.value for r in rcs] == [1, 0x87]
        assert car2.publish_rc("devices/car2/speed", b"88") == 0
        m = on_back.message()
        assert (m.topic, m.payload) == ("devices/car2/speed", b"88")
        on_back.close()
        car2.close()
    finally:
        b.stop()


def test_a_broken_acl_of_one_listener_keeps_its_rules_and_the_other_reloads(two_auth_dir):
    # One shard, so that when the back end's new rules are seen, so are the device listener's.
    b = Broker("--config", str(two_auth_dir / "sluice.toml"), cores=1)
    try:
        dev, back = b.listeners[DEVICES][1], b.listeners[BACKEND][1]
        car1 = Paho(dev, "car1", v5=True, user="alice", password="s3cret")
        svc = Paho(back, "svc", v5=True, user="bob", password="hunter2")
        assert car1.publish_rc("ops/deploy", b"x") == 0x87
        assert svc.publish_rc("devices/car1/cmd", b"x") == 0x87
        # In one SIGHUP: the device listener's ACL breaks, the back end's grants a new right.
        (two_auth_dir / "devices.acl").write_text("pattern readwrite devices/%c/#\nthis line is not an ACL rule\n")
        (two_auth_dir / "backend.acl").write_text("user bob\ntopic readwrite ops/#\ntopic readwrite devices/#\n")
        b.proc.send_signal(signal.SIGHUP)
        wait_until_allowed(svc, "devices/car1/cmd", "the back end's good reload never applied")
        # The device listener fails closed on its previous rules, for connected and new clients.
        assert car1.publish_rc("ops/deploy", b"x") == 0x87
        assert car1.publish_rc("devices/car1/speed", b"x") == 0
        car9 = Paho(dev, "car9", v5=True, user="alice", password="s3cret")
        assert car9.publish_rc("devices/car1/speed", b"x") == 0x87
        assert car9.publish_rc("devices/car9/speed", b"x") == 0
        assert connect_rc(dev, "svc2", "bob", "hunter2") == 0x86
        close_all = [car1, svc, car9]
        for c in close_all:
            c.close()
    finally:
        b.stop()


@pytest.mark.parametrize("section,want", [
    ('[listeners.auth]\npassword_fil = "/p"\n', "listeners[1].auth.password_fil"),
    ('[listeners.auth.jwt]\nalgorithm = "HS256"\npublic_key_file = "/k"\n', "listeners[1].auth.jwt.secret_file"),
    ('[listeners.auth]\npassword_file = "/nonexistent/passwd"\n', "listeners[1].auth.password_file /nonexistent/passwd"),
    ('[listeners.auth]\nacl_file = "BROKEN"\n', "listeners[1].auth.acl_file"),
])
def test_listener_auth_errors_name_the_key(tmp_path, section, want):
    (tmp_path / "broken.acl").write_text("this line is not an ACL rule\n")
    section = section.replace("BROKEN", str(tmp_path / "broken.acl"))
    (tmp_path / "sluice.toml").write_text(
        f'[[listeners]]\naddress = "127.0.0.1:0"\n[[listeners]]\naddress = "127.0.0.1:0"\n{section}')
    r = subprocess.run([sluice_bin(), "--config", str(tmp_path / "sluice.toml"), "--cores", "1",
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=WAIT)
    assert r.returncode != 0 and want in r.stderr, r.stderr
