"""A full disk under the session and retained stores: what sluice acknowledges survives SIGKILL,
what it cannot store is refused (MQTT 5 0x97, 3.1.1 no PUBACK / SUBACK 0x80), nothing crashes,
and acknowledgements come back once space returns. The data directory is a real small tmpfs."""

import errno
import os
import subprocess
import tempfile
import time
from contextlib import contextmanager

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.properties import Properties
from paho.mqtt.packettypes import PacketTypes

from conftest import WAIT, Broker, Paho
from test_hostile_clients import Canary


@contextmanager
def tmpfs(size):
    mount = tempfile.mkdtemp(prefix="sluice-full-")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mount], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {r.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", mount])


def grow(mount, size):
    subprocess.run(["mount", "-o", f"remount,size={size}", mount], check=True)


def publish_all(client, items, qos=1, retain=False):
    """Publishes (topic, payload) pairs; returns the reason code of each, in order."""
    codes = {}
    client.c.on_publish = lambda c, u, mid, rc, p: codes.__setitem__(mid, rc.value)
    mids = [client.c.publish(t, p, qos, retain).mid for t, p in items]
    deadline = time.monotonic() + 120
    while len(codes) < len(mids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(codes) == len(mids), f"{len(codes)} of {len(mids)} answered"
    return [codes[m] for m in mids]


def session_props(expiry):
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = expiry
    return p


def test_retained_messages_acknowledged_on_a_full_disk_survive_sigkill():
    """20 MiB: one 16 MiB store segment fits, not two. 3,000 retained QoS 1 publishes of 10 KiB over
    both shards: those acknowledged 0x00 are all there after SIGKILL and a restart, the rest were
    refused with 0x97; once space returns, retained publishes are accepted again."""
    with tmpfs("20m") as mount:
        b = Broker(data_dir=mount)
        try:
            canary = Canary(b.shard(1), b.shard(0), "full-ret")
            c = Paho(b.shard(0), "ret-filler", v5=True)
            # One store takes its segment first (two preallocating at once could both fail).
            assert publish_all(c, [("ret/warm", b"w")], retain=True) == [0]
            items = [(f"ret/{i}", (b"%05d" % i) * 2048) for i in range(3000)]
            codes = publish_all(c, items, retain=True)
            accepted = {t: p for (t, p), rc in zip(items, codes) if rc == 0}
            accepted["ret/warm"] = b"w"
            refused = sum(1 for rc in codes if rc == 0x97)
            print(f"accepted {len(accepted)}, refused {refused} (0x97)")
            assert len(accepted) - 1 + refused == 3000, sorted(set(codes))
            assert refused > 0, "the disk never filled"
            assert len(accepted) > 500, "the store that had room refused too"
            assert b.proc.poll() is None, "the broker died on a full disk"
            canary.check(max_gap=3.0)
            c.close()
        finally:
            b.kill()
        b = Broker(data_dir=mount)
        try:
            s = Paho(b.shard(1), "ret-reader", v5=True)
            # Asked for 100 topics at a time: each answer fits the subscriber's output buffer.
            got = {}
            topics = ["ret/warm"] + [t for t, _ in items]
            for i in range(0, len(topics), 100):
                batch = topics[i:i + 100]
                s.subscribe([(t, 0) for t in batch])
                want = [t for t in batch if t in accepted]
                deadline = time.monotonic() + 15
                while not set(want) <= got.keys() and time.monotonic() < deadline:
                    try:
                        m = s.message(timeout=1)
                    except Exception:
                        continue
                    got[m.topic] = m.payload
                s.c.unsubscribe(batch)  # stays under max_subscriptions_per_session
                lost = [t for t in want if t not in got]
                assert not lost, f"acknowledged retained messages lost: {lost[:5]} ({len(lost)} of {len(want)})"
            missing = [t for t in accepted if got.get(t) != accepted[t]]
            assert not missing, f"{len(missing)} acknowledged retained messages lost, e.g. {missing[:3]}"
            s.close()
            # Space returns: retained publishes are acknowledged again.
            grow(mount, "200m")
            c = Paho(b.shard(0), "ret-again", v5=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if publish_all(c, [("ret/again", b"space")], retain=True) == [0]:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("retained publishes still refused after space returned")
            c.close()
        finally:
            b.kill()


def fill(mount):
    """Takes all the space left on the tmpfs: unbuffered writes until the disk says it is full (a
    buffered file raised ENOSPC again when it was closed, flushing what the failed write left)."""
    try:
        fd = os.open(os.path.join(mount, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError as e:
        # The broker's own writes may have taken the last block already: full is the goal.
        assert e.errno == errno.ENOSPC, e
        return
    chunk = b"\0" * (1 << 20)
    try:
        while True:
            try:
                if os.write(fd, chunk) == 0:
                    break
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]  # the last blocks
    finally:
        os.close(fd)


def test_persistent_session_on_a_full_disk_refuses_what_it_cannot_keep():
    """A persistent subscriber's session is stored, then the disk is filled. Queued QoS 1 messages
    for it grow its stored record until the store needs a new segment and cannot have one: from
    then on publishes are refused with 0x97 (3.1.1: no PUBACK, the connection closes), a new
    persistent SUBSCRIBE gets 0x97 (3.1.1: 0x80). After SIGKILL and a restart every message that was
    acknowledged is delivered."""
    with tmpfs("40m") as mount:
        b = Broker(data_dir=mount)
        try:
            sub = Paho(b.shard(1), "keeper", v5=True, clean=False, props=session_props(600))
            assert [r.value for r in sub.subscribe("keep/#", 1)[2]] == [1]
            sub.close()
            fill(mount)
            canary = Canary(b.shard(0), b.shard(1), "full-sess")
            pub = Paho(b.shard(0), "keep-pub", v5=True)
            items = [("keep/x", (b"%03d" % i) * 70_000) for i in range(60)]
            codes = publish_all(pub, items)
            accepted = [p for (_, p), rc in zip(items, codes) if rc == 0]
            print(f"accepted {len(accepted)}, refused {codes.count(0x97)}")
            assert codes.count(0x97) > 0 and len(accepted) > 0, codes
            assert set(codes) <= {0, 0x97}, set(codes)
            # A persistent SUBSCRIBE cannot be stored now either.
            late = Paho(b.shard(1), "late", v5=True, clean=False, props=session_props(600))
            assert [r.value for r in late.subscribe("late/#", 1)[2]] == [0x97]
            late.close()
            late311 = Paho(b.shard(0), "late311", clean=False)
            assert late311.subscribe("late/#", 1)[2][0].value == 0x80
            late311.close()
            # 3.1.1: no PUBACK for what cannot be stored; the connection closes instead.
            p311 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="keep-311", protocol=mqtt.MQTTv311)
            gone = []
            p311.on_disconnect = lambda *a: gone.append(1)
            p311.reconnect_delay_set(60, 60)
            p311.connect(*b.shard(0))
            p311.loop_start()
            info = p311.publish("keep/x", b"311" * 70_000, 1)
            deadline = time.monotonic() + WAIT
            while not gone and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone and not info.is_published(), "3.1.1 publish acknowledged on a full disk"
            p311.loop_stop()
            assert b.proc.poll() is None
            canary.check(max_gap=3.0)
            pub.close()
        finally:
            b.kill()
        os.remove(os.path.join(mount, "filler"))
        b = Broker(data_dir=mount)
        try:
            sub = Paho(b.shard(1), "keeper", v5=True, clean=False, props=session_props(600))
            assert sub.flags.session_present
            got = []
            deadline = time.monotonic() + 30
            while len(got) < len(accepted) and time.monotonic() < deadline:
                try:
                    got.append(sub.message(timeout=1).payload)
                except Exception:
                    continue
            missing = [p[:3] for p in accepted if p not in got]
            assert not missing, f"acknowledged messages lost after SIGKILL: {missing}"
            sub.close()
        finally:
            b.kill()
