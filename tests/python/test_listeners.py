"""TLS, WebSocket and WebSocket-over-TLS listeners, with real clients (paho-mqtt, mosquitto_pub/
sub, openssl s_client) and certificates made by openssl here: a CA, a server certificate, client
certificates (good, expired, from a second CA). Each refusal is checked for being clear and for
leaving a canary on a plain listener undisturbed."""

import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

import paho.mqtt.client as mqtt
import pytest

from conftest import WAIT, broker_with
from test_hostile_clients import Canary

CONNECT_TIMEOUT_MS = 1500


def run(*args, cwd):
    subprocess.run(args, cwd=cwd, check=True, capture_output=True)


class Certs:
    """openssl-made PKI in a temporary directory."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="sluice-certs-")
        d = self.dir
        for ca in ("ca", "ca2"):
            run("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "30", "-subj", f"/CN=sluice test {ca}", cwd=d)
        self.ca, self.ca2 = self.path("ca.pem"), self.path("ca2.pem")
        self.server = self.leaf("server", "ca", "localhost", "serverAuth")
        self.server2 = self.leaf("server2", "ca", "localhost-reloaded", "serverAuth")
        self.client = self.leaf("client", "ca", "device-1", "clientAuth")
        self.untrusted = self.leaf("untrusted", "ca2", "device-2", "clientAuth")
        self.expired = self.expired_leaf("expired", "device-3")

    def path(self, name):
        return os.path.join(self.dir, name)

    def csr(self, name, cn):
        run("openssl", "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=self.dir)

    def leaf(self, name, ca, cn, usage):
        self.csr(name, cn)
        with open(self.path(f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=DNS:{cn},DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        run("openssl", "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
            "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=self.dir)
        return self.path(f"{name}.pem"), self.path(f"{name}.key")

    def expired_leaf(self, name, cn):
        """Valid in January 2020 only (`openssl ca` takes explicit dates; `x509 -req` does not)."""
        self.csr(name, cn)
        d = self.dir
        open(os.path.join(d, "index.txt"), "w").close()
        with open(os.path.join(d, "serial"), "w") as f:
            f.write("1000\n")
        with open(os.path.join(d, "ca.cnf"), "w") as f:
            f.write("[ca]\ndefault_ca = d\n[d]\ndir = .\ndatabase = index.txt\nnew_certs_dir = .\n"
                    "certificate = ca.pem\nprivate_key = ca.key\nserial = serial\ndefault_md = sha256\n"
                    "policy = p\nx509_extensions = e\n[p]\ncommonName = supplied\n"
                    "[e]\nextendedKeyUsage = clientAuth\n")
        run("openssl", "ca", "-batch", "-config", "ca.cnf", "-startdate", "20200101000000Z", "-enddate",
            "20200201000000Z", "-in", f"{name}.csr", "-out", f"{name}.pem", "-notext", cwd=d)
        return self.path(f"{name}.pem"), self.path(f"{name}.key")


@pytest.fixture(scope="module")
def certs():
    c = Certs()
    yield c
    shutil.rmtree(c.dir, ignore_errors=True)


def listeners_config(certs, server=None):
    cert, key = server or certs.server
    return f"""
[limits]
connect_timeout_ms = {CONNECT_TIMEOUT_MS}

[[listeners]]
address = "127.0.0.1:0"
kind = "tls"
cert_file = "{cert}"
key_file = "{key}"

[[listeners]]
address = "127.0.0.1:0"
kind = "tls"
cert_file = "{cert}"
key_file = "{key}"
client_ca_file = "{certs.ca}"
require_client_certificate = true
use_identity_as_username = true

[[listeners]]
address = "127.0.0.1:0"
kind = "ws"

[[listeners]]
address = "127.0.0.1:0"
kind = "wss"
path = "/mqtt"
cert_file = "{cert}"
key_file = "{key}"
"""


# Listener indices: 0 is --listen (plain TCP, from the harness), then the config's in order.
TLS, MTLS, WS, WSS = 1, 2, 3, 4


@pytest.fixture(scope="module")
def broker(certs):
    b = broker_with(config=listeners_config(certs))
    yield b
    b.stop()


def addr(broker, index, kind):
    k, a = broker.listeners[index]
    assert k == kind, broker.listeners
    return a


def client(a, cid, v5=False, tls=None, transport="tcp", ws_path="/mqtt"):
    """A connected paho client (loop running) and its message queue; raises on a refused CONNECT."""
    import queue
    proto = mqtt.MQTTv5 if v5 else mqtt.MQTTv311
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid, protocol=proto, transport=transport)
    if transport == "websockets":
        c.ws_set_options(path=ws_path)
    if tls:
        c.tls_set(**tls)
    got, events = queue.Queue(), queue.Queue()
    c.on_message = lambda c_, u, m: got.put(m)
    c.on_connect = lambda c_, u, f, rc, p: events.put(("connect", rc))
    c.on_subscribe = lambda c_, u, mid, rcs, p: events.put(("subscribe", rcs))
    c.reconnect_delay_set(60, 60)
    c.connect(a[0], a[1], 30)
    c.loop_start()
    kind, rc = events.get(timeout=WAIT)
    assert kind == "connect" and not rc.is_failure, rc
    c.messages, c.events = got, events
    return c


def round_trip(pub, sub, topic, payload=b"hello"):
    sub.subscribe(topic, 1)
    assert sub.events.get(timeout=WAIT)[0] == "subscribe"
    pub.publish(topic, payload, 1).wait_for_publish(WAIT)
    m = sub.messages.get(timeout=WAIT)
    assert (m.topic, m.payload) == (topic, payload)


def close(*clients):
    for c in clients:
        c.disconnect()
        c.loop_stop()


def tls_opts(certs, cert=None):
    opts = {"ca_certs": certs.ca}
    if cert:
        opts["certfile"], opts["keyfile"] = cert
    return opts


@pytest.mark.parametrize("v5", [False, True])
def test_paho_over_tls_reaches_plain_subscribers_and_back(broker, certs, v5):
    """paho 3.1.1 and 5 over TLS (hostname checked against the server certificate): a TLS
    publisher reaches a plain-TCP subscriber on the other shard and the other way round."""
    tls = client(addr(broker, TLS, "tls"), f"tls-{v5}", v5=v5, tls=tls_opts(certs))
    plain = client(broker.shard(1), f"plain-{v5}", v5=v5)
    round_trip(tls, plain, f"t/tls/{v5}/a")
    round_trip(plain, tls, f"t/tls/{v5}/b", b"x" * 100_000)  # many TLS records
    close(tls, plain)


@pytest.mark.parametrize("kind", ["ws", "wss"])
def test_paho_websockets_over_ws_and_wss(broker, certs, kind):
    index = WS if kind == "ws" else WSS
    tls = tls_opts(certs) if kind == "wss" else None
    ws = client(addr(broker, index, kind), f"{kind}-1", v5=True, tls=tls, transport="websockets")
    plain = client(broker.shard(0), f"{kind}-plain", v5=True)
    round_trip(ws, plain, f"t/{kind}/a")
    # Larger than one frame and than paho's read size: one MQTT packet over many reads.
    round_trip(plain, ws, f"t/{kind}/b", os.urandom(200_000))
    close(ws, plain)


def test_mutual_tls_accepts_a_ca_signed_client_and_refuses_the_rest(broker, certs):
    a = addr(broker, MTLS, "tls")
    ok = client(a, "mtls-ok", tls=tls_opts(certs, certs.client))
    plain = client(broker.shard(1), "mtls-plain")
    round_trip(ok, plain, "t/mtls")
    close(ok, plain)
    for name, cert in [("no certificate", None), ("untrusted CA", certs.untrusted), ("expired", certs.expired)]:
        ctx = ssl.create_default_context(cafile=certs.ca)
        if cert:
            ctx.load_cert_chain(*cert)
        with socket.create_connection(a, timeout=WAIT) as s:
            with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)) as e:
                with ctx.wrap_socket(s, server_hostname="localhost") as t:
                    # TLS 1.3: the client's certificate is judged after the client finished;
                    # the alert arrives on the first read.
                    t.sendall(b"\x10\x00")
                    t.recv(16)
            print(name, "->", e.value)
            assert "alert" in str(e.value) or isinstance(e.value, ConnectionResetError), (name, e.value)


def test_mosquitto_clients_with_cafile_cert_and_key(broker, certs):
    host, port = addr(broker, MTLS, "tls")
    cert, key = certs.client
    common = ["-h", "localhost", "-p", str(port), "--cafile", certs.ca, "--cert", cert, "--key", key]
    sub = subprocess.Popen(["mosquitto_sub", *common, "-t", "t/mosq", "-C", "1", "-q", "1", "-i", "mosq-sub"],
                           stdout=subprocess.PIPE, text=True)
    # The subscription is in place once a retained probe comes back... keep it simple: publish
    # retained, so the order of subscribe and publish does not matter.
    subprocess.run(["mosquitto_pub", *common, "-t", "t/mosq", "-m", "over-mtls", "-q", "1", "-r", "-i", "mosq-pub"],
                   check=True, timeout=WAIT)
    out, _ = sub.communicate(timeout=WAIT)
    assert out.strip() == "over-mtls"
    # Without a client certificate the same listener refuses.
    r = subprocess.run(["mosquitto_pub", "-h", "localhost", "-p", str(port), "--cafile", certs.ca, "-t", "t/x",
                        "-m", "x", "-i", "mosq-nocert"], capture_output=True, text=True, timeout=WAIT)
    assert r.returncode != 0, r


def test_openssl_s_client_negotiates_alpn_mqtt(broker, certs):
    host, port = addr(broker, TLS, "tls")
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-alpn", "mqtt", "-CAfile", certs.ca,
                        "-servername", "localhost"], input=b"", capture_output=True, timeout=WAIT)
    out = r.stdout.decode()
    assert "ALPN protocol: mqtt" in out, out
    assert "Verify return code: 0 (ok)" in out, out
    for version in ("-tls1_2", "-tls1_3"):
        r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version, "-CAfile", certs.ca],
                           input=b"", capture_output=True, timeout=WAIT)
        assert "Verify return code: 0 (ok)" in r.stdout.decode(), (version, r.stdout.decode())


def read_all(s, deadline):
    """Everything the peer sends until it closes (b"" read), or None at the deadline; a reset
    counts as a close."""
    got = b""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = s.recv(65536)
        except socket.timeout:
            return None
        except ConnectionResetError:
            return got
        if not data:
            return got
        got += data
    return None


CONNECT_311 = bytes([0x10, 0x10, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x3C, 0x00, 0x04]) + b"test"


def test_wrong_protocols_are_refused_clearly_and_the_canary_goes_on(broker, certs):
    canary = Canary(broker.shard(0), broker.shard(1), "listeners")
    deadline = lambda: time.monotonic() + WAIT
    # Plaintext MQTT to the TLS port: a TLS alert (rustls answers a non-TLS record), then the end.
    with socket.create_connection(addr(broker, TLS, "tls"), timeout=WAIT) as s:
        s.sendall(CONNECT_311)
        got = read_all(s, deadline())
        assert got is not None and got[:1] == b"\x15", got  # content type 21: alert
    # TLS to the plain port: the broker reads a malformed CONNECT and closes, no CONNACK.
    with socket.create_connection(broker.shard(0), timeout=WAIT) as s:
        ctx = ssl.create_default_context(cafile=certs.ca)
        with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
            ctx.wrap_socket(s, server_hostname="localhost")
    # A WebSocket upgrade without the mqtt subprotocol, and one too large.
    ws = addr(broker, WS, "ws")
    key = base64.b64encode(os.urandom(16)).decode()
    upgrade = (f"GET /mqtt HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
    with socket.create_connection(ws, timeout=WAIT) as s:
        s.sendall((upgrade + "Sec-WebSocket-Protocol: chat\r\n\r\n").encode())
        got = read_all(s, deadline())
        assert got.startswith(b"HTTP/1.1 400 ") and b"Sec-WebSocket-Protocol must offer mqtt" in got, got
    with socket.create_connection(ws, timeout=WAIT) as s:
        s.sendall((upgrade + "X-Pad: " + "a" * 10_000 + "\r\n\r\n").encode())
        got = read_all(s, deadline())
        assert got.startswith(b"HTTP/1.1 431 "), got
    with socket.create_connection(ws, timeout=WAIT) as s:
        s.sendall((upgrade + "Sec-WebSocket-Protocol: mqtt\r\n\r\n").replace("/mqtt", "/other").encode())
        assert read_all(s, deadline()).startswith(b"HTTP/1.1 404 ")
    # The right upgrade works on the same listener.
    with socket.create_connection(ws, timeout=WAIT) as s:
        s.sendall((upgrade + "Sec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
        s.settimeout(WAIT)
        assert s.recv(4096).startswith(b"HTTP/1.1 101 ")
    canary.check(max_gap=2.0)


def test_handshakes_that_never_finish_are_closed_at_the_connect_deadline(broker, certs):
    """TCP opened to the TLS, wss and ws ports and nothing sent, half a ClientHello, half an
    upgrade: each is closed by the CONNECT deadline, which counts from accept."""
    canary = Canary(broker.shard(0), broker.shard(1), "deadline")
    # Half of a real ClientHello, taken from a TLS client writing into a socket pair.
    a, b = socket.socketpair()
    ctx = ssl.create_default_context(cafile=certs.ca)
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    hello = out.read()
    a.close(), b.close()
    cases = [(TLS, "tls", b""), (TLS, "tls", hello[: len(hello) // 2]), (WSS, "wss", b""),
             (WS, "ws", b""), (WS, "ws", b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")]
    socks = []
    t0 = time.monotonic()
    for index, kind, data in cases:
        s = socket.create_connection(addr(broker, index, kind), timeout=WAIT)
        if data:
            s.sendall(data)
        socks.append(s)
    for s, case in zip(socks, cases):
        got = read_all(s, time.monotonic() + WAIT)
        elapsed = time.monotonic() - t0
        assert got is not None, f"{case[1]} {len(case[2])} bytes: still open after {elapsed:.1f} s"
        assert elapsed >= CONNECT_TIMEOUT_MS / 1000 - 0.1, (case[1], elapsed)
        s.close()
    print(f"closed after {time.monotonic() - t0:.2f} s (deadline {CONNECT_TIMEOUT_MS} ms)")
    canary.check(max_gap=2.0)


def served_certificate(a, certs):
    ctx = ssl.create_default_context(cafile=certs.ca)
    with socket.create_connection(a, timeout=WAIT) as s, ctx.wrap_socket(s, server_hostname="localhost") as t:
        return dict(x[0] for x in t.getpeercert()["subject"])["commonName"]


def test_sighup_reloads_the_certificate_and_a_broken_key_keeps_the_old_one(certs):
    d = tempfile.mkdtemp(prefix="sluice-reload-")
    cert, key = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
    shutil.copy(certs.server[0], cert)
    shutil.copy(certs.server[1], key)
    b = broker_with(config=listeners_config(certs, (cert, key)))
    try:
        a = addr(b, TLS, "tls")
        assert served_certificate(a, certs) == "localhost"
        before = client(a, "reload-before", tls=tls_opts(certs))
        plain = client(b.shard(1), "reload-plain")
        round_trip(before, plain, "t/reload/1")
        # New certificate: new handshakes see it, the open connection goes on.
        shutil.copy(certs.server2[0], cert)
        shutil.copy(certs.server2[1], key)
        b.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + WAIT
        while served_certificate(a, certs) != "localhost-reloaded":
            assert time.monotonic() < deadline, "the new certificate was not served"
            time.sleep(0.05)
        round_trip(plain, before, "t/reload/2")
        # A broken key: the reload fails, the previous certificate stays, the broker runs on.
        with open(key, "w") as f:
            f.write("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        b.proc.send_signal(signal.SIGHUP)
        # No event says "the reload failed" to a client: what it can check is that handshakes
        # keep being served the previous certificate, a while after the signal.
        t_end = time.monotonic() + 1.0
        while time.monotonic() < t_end:
            assert served_certificate(a, certs) == "localhost-reloaded"
        assert b.proc.poll() is None
        round_trip(plain, before, "t/reload/3")
        close(before, plain)
    finally:
        b.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_a_non_loopback_listener_needs_allow_anonymous(certs):
    """Nothing authenticates yet: 0.0.0.0 without allow_anonymous does not start, and says why."""
    from conftest import sluice_bin
    data = tempfile.mkdtemp(prefix="sluice-anon-")
    try:
        r = subprocess.run([sluice_bin(), "--listen", "0.0.0.0:0", "--cores", "1", "--data-dir", data],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 2 and "--allow-anonymous" in r.stderr, r.stderr
        cfg = os.path.join(data, "c.toml")
        with open(cfg, "w") as f:
            f.write('[[listeners]]\naddress = "0.0.0.0:0"\nkind = "ws"\n')
        r = subprocess.run([sluice_bin(), "--config", cfg, "--cores", "1", "--data-dir", data],
                           capture_output=True, text=True, timeout=WAIT)
        assert r.returncode == 2 and "listeners[0].allow_anonymous" in r.stderr, r.stderr
    finally:
        shutil.rmtree(data, ignore_errors=True)


def test_a_verified_client_certificate_names_the_user_and_the_acl_follows_it(certs, tmp_path):
    """mTLS with use_identity_as_username and [auth]: the certificate's CN (device-1) is the user,
    no password needed; its ACL lets it write fleet/device-1/# only. On the plain listener the
    same client without credentials is refused."""
    (tmp_path / "passwd").write_text("")
    (tmp_path / "acl").write_text("user device-1\ntopic readwrite fleet/device-1/#\n")
    config = listeners_config(certs) + f"""
[auth]
password_file = "{tmp_path / 'passwd'}"
acl_file = "{tmp_path / 'acl'}"
"""
    b = broker_with(config=config)
    try:
        dev = client(addr(b, MTLS, "tls"), "device-1", v5=True, tls=tls_opts(certs, certs.client))
        codes = []
        dev.on_publish = lambda c, u, mid, rc, p: codes.append(rc.value)
        dev.publish("fleet/device-1/speed", b"1", 1).wait_for_publish(WAIT)
        dev.publish("fleet/device-2/speed", b"1", 1).wait_for_publish(WAIT)
        assert codes == [0, 0x87], codes
        close(dev)
        with pytest.raises(AssertionError):
            client(b.addr, "device-1", v5=True)
    finally:
        b.stop()
