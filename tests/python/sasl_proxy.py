"""A SASL front for tansu (whose own authentication could not be set up in tests): it answers
SaslHandshake and SaslAuthenticate itself — PLAIN and SCRAM-SHA-256/512 against one user — and
passes every other Kafka request through once the client authenticated. Kafka framing only as far
as needed: the request header's first fields are the same in every version."""
import base64
import hashlib
import hmac
import os
import socket
import struct
import threading

USER, PASSWORD = "sluice", "s3cret"


def uvarint(n):
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def read_uvarint(b, i):
    shift = v = 0
    while True:
        x = b[i]
        i += 1
        v |= (x & 0x7F) << shift
        if not x & 0x80:
            return v, i
        shift += 7


class Scram:
    def __init__(self, algo):
        self.algo = algo
        self.salt = os.urandom(16)
        self.iters = 4096
        self.salted = hashlib.pbkdf2_hmac(algo, PASSWORD.encode(), self.salt, self.iters)

    def first(self, msg):
        bare = msg.split(",", 2)[2]
        attrs = dict(kv.split("=", 1) for kv in bare.split(","))
        if attrs.get("n") != USER:
            return None
        self.client_first_bare = bare
        self.nonce = attrs["r"] + base64.b64encode(os.urandom(12)).decode()
        self.server_first = f"r={self.nonce},s={base64.b64encode(self.salt).decode()},i={self.iters}"
        return self.server_first

    def final(self, msg):
        without_proof, proof = msg.rsplit(",p=", 1)
        auth = f"{self.client_first_bare},{self.server_first},{without_proof}".encode()
        h = lambda k, m: hmac.new(k, m, self.algo).digest()
        client_key = h(self.salted, b"Client Key")
        stored = hashlib.new(self.algo, client_key).digest()
        sig = h(stored, auth)
        expected = bytes(a ^ b for a, b in zip(client_key, sig))
        if base64.b64decode(proof) != expected:
            return None
        server_sig = h(h(self.salted, b"Server Key"), auth)
        return "v=" + base64.b64encode(server_sig).decode()


class SaslProxy:
    def __init__(self, port, backend_port):
        self.backend = ("127.0.0.1", backend_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.succeeded, self.failed = [], []
        threading.Thread(target=self.serve, daemon=True).start()

    def close(self):
        self.sock.close()

    def serve(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.handle, args=(c,), daemon=True).start()

    @staticmethod
    def recv_frame(s):
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                return None
            head += chunk
        n = struct.unpack(">i", head)[0]
        body = b""
        while len(body) < n:
            chunk = s.recv(n - len(body))
            if not chunk:
                return None
            body += chunk
        return head + body

    def handle(self, c):
        back = socket.create_connection(self.backend)
        lock = threading.Lock()

        def pump_back():
            try:
                while data := back.recv(65536):
                    with lock:
                        c.sendall(data)
            except OSError:
                pass
        threading.Thread(target=pump_back, daemon=True).start()
        mech, scram, authed = None, None, False
        try:
            while (frame := self.recv_frame(c)) is not None:
                api, ver, corr = struct.unpack(">hhi", frame[4:12])
                if api == 17:  # SaslHandshake v1: pick the mechanism
                    i = 12
                    cid_len = struct.unpack(">h", frame[i:i + 2])[0]
                    i += 2 + max(cid_len, 0)
                    n = struct.unpack(">h", frame[i:i + 2])[0]
                    mech = frame[i + 2:i + 2 + n].decode()
                    if mech.startswith("SCRAM-SHA-"):
                        scram = Scram("sha256" if mech.endswith("256") else "sha512")
                    mechs = [b"PLAIN", b"SCRAM-SHA-256", b"SCRAM-SHA-512"]
                    body = struct.pack(">ih", corr, 0) + struct.pack(">i", len(mechs))
                    body += b"".join(struct.pack(">h", len(m)) + m for m in mechs)
                elif api == 36:  # SaslAuthenticate
                    i = 12
                    cid_len = struct.unpack(">h", frame[i:i + 2])[0]
                    i += 2 + max(cid_len, 0)
                    if ver >= 2:
                        tags, i = read_uvarint(frame, i)
                        n, i = read_uvarint(frame, i)
                        token = frame[i:i + n - 1]
                    else:
                        n = struct.unpack(">i", frame[i:i + 4])[0]
                        token = frame[i + 4:i + 4 + n]
                    reply, ok = b"", False
                    if mech == "PLAIN":
                        ok = token == f"\0{USER}\0{PASSWORD}".encode()
                        authed = ok
                    elif scram and not hasattr(scram, "server_first"):
                        r = scram.first(token.decode())
                        ok, reply = r is not None, (r or "").encode()
                    elif scram:
                        r = scram.final(token.decode())
                        ok, reply = r is not None, (r or "").encode()
                        authed = ok
                    (self.succeeded if ok and authed else self.failed if not ok else []).append(mech)
                    err = 0 if ok else 58  # SASL_AUTHENTICATION_FAILED
                    if ver >= 2:
                        body = struct.pack(">i", corr) + b"\x00" + struct.pack(">h", err) + b"\x00"
                        body += uvarint(len(reply) + 1) + reply + struct.pack(">q", 0) + b"\x00"
                    else:
                        body = struct.pack(">ihh", corr, err, -1) + struct.pack(">i", len(reply)) + reply
                        if ver >= 1:
                            body += struct.pack(">q", 0)
                else:
                    if not authed and api not in (18,):  # ApiVersions is allowed before auth
                        break
                    back.sendall(frame)
                    continue
                with lock:
                    c.sendall(struct.pack(">i", len(body)) + body)
        except OSError:
            pass
        finally:
            for s in (c, back):
                try:
                    s.close()
                except OSError:
                    pass
