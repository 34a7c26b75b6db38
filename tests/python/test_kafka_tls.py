"""MQTT → Kafka over TLS with a custom CA. tansu 0.6.0 cannot serve TLS with a key, so a TLS
terminator (Python's ssl module) stands in front of it and tansu advertises the terminator's port:
every Kafka connection sluice makes — bootstrap, metadata, produce, topic creation — goes over TLS."""
import socket
import ssl
import subprocess
import tempfile
import threading
import uuid
from pathlib import Path

from conftest import WAIT, FrontedBridge


def make_certs(d):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=sluice-test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    Path(d, "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")


def make_client_cert(d):
    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=sluice")
    # Extensions make it an X.509 v3 certificate, which rustls (webpki) requires.
    Path(d, "client-ext.cnf").write_text("basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2", "-extfile", "client-ext.cnf")


class TlsTerminator:
    def __init__(self, port, backend_port, cert, key, client_ca=None):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        if client_ca:
            # Mutual TLS: only clients with a certificate from this CA get through.
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.backend = ("127.0.0.1", backend_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.handshakes = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(raw,), daemon=True).start()

    def handle(self, raw):
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError):
            raw.close()
            return
        self.handshakes += 1
        back = socket.create_connection(self.backend)

        def pump(src, dst):
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
            except OSError:
                pass
            finally:
                for s in (src, dst):
                    try:
                        s.close()
                    except OSError:
                        pass
        threading.Thread(target=pump, args=(back, tls), daemon=True).start()
        pump(tls, back)

    def close(self):
        self.sock.close()


def terminator(d, client_ca=None):
    return lambda port, backend: TlsTerminator(port, backend, f"{d}/server.pem", f"{d}/server.key", client_ca)


def test_bridge_over_tls_with_a_custom_ca(paho):
    d = tempfile.mkdtemp(prefix="sluice-tls-")
    make_certs(d)
    settings = f"""auto_create_topics = true
partitions = 1
tls = {{ ca_file = "{d}/ca.pem" }}"""
    with FrontedBridge(terminator(d), settings, topic=f"tls-{uuid.uuid4().hex[:8]}") as f:
        c = paho(f.broker.shard(0), "tls-pub", v5=True)
        assert c.publish_rc("s/x", b"over tls", timeout=30) == 0
        assert f.front.handshakes >= 1
        [m] = f.kafka.consume(f.topic, 1, bootstrap=f"127.0.0.1:{f.front_port}", security_protocol="SSL",
                              ssl_ca_location=f"{d}/ca.pem")
        assert m.value() == b"over tls"


def test_mutual_tls_with_a_client_certificate(paho):
    d = tempfile.mkdtemp(prefix="sluice-mtls-")
    make_certs(d)
    make_client_cert(d)
    settings = f"""auto_create_topics = true
partitions = 1
tls = {{ ca_file = "{d}/ca.pem", cert_file = "{d}/client.pem", key_file = "{d}/client.key" }}"""
    with FrontedBridge(terminator(d, client_ca=f"{d}/ca.pem"), settings, topic=f"mtls-{uuid.uuid4().hex[:8]}") as f:
        c = paho(f.broker.shard(1), "mtls-pub", v5=True)
        assert c.publish_rc("s/x", b"mutual", timeout=30) == 0
        assert f.front.handshakes >= 1


def test_untrusted_certificate_is_refused(paho):
    """The same terminator, but sluice trusts another CA: nothing is produced, the publisher hears
    0x80 after the delivery time-out, and the broker keeps running."""
    d, other = tempfile.mkdtemp(prefix="sluice-tls-"), tempfile.mkdtemp(prefix="sluice-tls-other-")
    make_certs(d)
    make_certs(other)
    settings = f"""delivery_timeout_ms = 2000
request_timeout_ms = 500
tls = {{ ca_file = "{other}/ca.pem" }}"""
    with FrontedBridge(terminator(d), settings) as f:
        c = paho(f.broker.shard(0), "tls-pub", v5=True)
        assert c.publish_rc("s/x", b"x", timeout=WAIT) == 0x80
        assert f.front.handshakes == 0, "a handshake with an untrusted certificate must not complete"
