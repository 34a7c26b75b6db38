"""RecordBatches written by sluice's own encoder (kafka/src/batch.rs), produced into a real
Kafka-compatible broker (tansu) with a hand-made ProduceRequest v3 and read back with librdkafka
(confluent-kafka), CRCs checked: every codec, keys, empty values, headers in the given order,
timestamps. The batch comes from `kafka/examples/encode_batch.rs`."""
import socket
import struct
import subprocess

import pytest

from conftest import ROOT, WAIT

N = 300


def encode_batch_bin():
    # Built here because scripts/test builds only the broker and perf binaries; a no-op when fresh.
    subprocess.run(["cargo", "build", "-q", "-p", "sluice-kafka", "--example", "encode_batch"],
                   cwd=ROOT, check=True)
    return str(ROOT / "target" / "debug" / "examples" / "encode_batch")


def expected(i):
    """What `record(i)` in encode_batch.rs makes."""
    key = None if i % 5 == 4 else f"key-{i}".encode()
    value = b"" if i % 7 == 3 else (f"value-{i}-" * (i % 13 + 1)).encode()
    headers = [("mqtt.topic", f"t/{i}".encode()), ("mqtt.qos", b"1"), ("z", b""), ("a", str(i).encode())]
    return key, value, headers, 1_764_000_000_000 + 3 * i - i % 4


def kstr(s):
    b = s.encode()
    return struct.pack(">h", len(b)) + b


def recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, "broker closed the connection"
        buf += chunk
    return buf


def produce(bootstrap, topic, batch):
    """ProduceRequest v3 (the first with RecordBatch v2) of `batch` to partition 0, acks=all;
    returns the partition's error code."""
    header = struct.pack(">hhi", 0, 3, 7) + kstr("sluice-batch-test")
    body = (struct.pack(">hhi", -1, -1, int(WAIT * 1000))  # no transactional id, acks, time-out
            + struct.pack(">i", 1) + kstr(topic)
            + struct.pack(">i", 1) + struct.pack(">i", 0) + struct.pack(">i", len(batch)) + batch)
    req = header + body
    host, port = bootstrap.split(":")
    with socket.create_connection((host, int(port)), timeout=WAIT) as s:
        s.sendall(struct.pack(">i", len(req)) + req)
        (size,) = struct.unpack(">i", recv_exact(s, 4))
        resp = recv_exact(s, size)
    (correlation, topics) = struct.unpack(">ii", resp[:8])
    assert (correlation, topics) == (7, 1)
    (name_len,) = struct.unpack(">h", resp[8:10])
    at = 10 + name_len
    (parts, partition, error) = struct.unpack(">iih", resp[at:at + 10])
    assert (parts, partition) == (1, 0)
    return error


@pytest.mark.parametrize("codec", ["none", "gzip", "snappy", "lz4", "zstd"])
def test_encoded_batches_read_back_with_librdkafka(kafka, codec):
    batch = subprocess.run([encode_batch_bin(), codec, str(N)], capture_output=True, check=True).stdout
    topic = f"batch-{codec}"
    kafka.create_topic(topic, partitions=1)
    assert produce(kafka.bootstrap, topic, batch) == 0
    got = kafka.consume(topic, N, check_crcs=True)
    assert len(got) == N
    for i, m in enumerate(got):
        key, value, headers, ts = expected(i)
        assert m.offset() == i
        assert m.key() == key, i
        assert (m.value() or b"") == value, i
        assert [(k, v or b"") for k, v in m.headers()] == headers, i
        assert m.timestamp() == (1, ts), i  # 1: TIMESTAMP_CREATE_TIME
