"""The HTTP endpoint (`--http`): /metrics parsed by prometheus_client's parser while load runs,
/readyz following Kafka (tansu paused and resumed), every admin API route against real paho
clients, the OpenAPI file checked by schemathesis, and the dashboard in headless Chromium."""
import base64
import http.client
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, WAIT, Broker, Tansu, broker_with, wait_for

HTTP_ARGS = ("--http", "127.0.0.1:0")


def get(broker, path, method="GET", headers=None, timeout=WAIT):
    """(status, body bytes, headers) of one request to the broker's HTTP endpoint."""
    host, port = broker.http
    req = urllib.request.Request(f"http://{host}:{port}{path}", method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def get_json(broker, path, method="GET", expect=200, **kw):
    status, body, _ = get(broker, path, method, **kw)
    assert status == expect, (path, status, body)
    return json.loads(body)


def metrics(broker):
    status, body, headers = get(broker, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return list(text_string_to_metric_families(body.decode()))


def total(families, name, **labels):
    """Sum of the samples called `name` whose labels include `labels`."""
    s = 0
    for f in families:
        for smp in f.samples:
            if smp.name == name and all(smp.labels.get(k) == v for k, v in labels.items()):
                s += smp.value
    return s


@pytest.fixture
def hbroker():
    b = Broker(*HTTP_ARGS)
    yield b
    b.stop()


def test_metrics_grow_by_what_was_published_while_scraped(hbroker, paho):
    before = metrics(hbroker)
    base = {q: total(before, "sluice_messages_received_total", qos=str(q)) for q in range(3)}
    sent0 = total(before, "sluice_messages_sent_total")
    sub = paho(hbroker.shard(1), "m-sub")
    sub.subscribe("load/#", qos=1)
    pub0 = paho(hbroker.shard(0), "m-pub0")
    pub1 = paho(hbroker.shard(1), "m-pub1", v5=True)
    # A scraper runs the whole time: every scrape parses and counters never go back.
    stop, scrapes, errors = threading.Event(), [], []

    def scrape():
        last = -1
        while not stop.is_set():
            try:
                fam = metrics(hbroker)
                v = total(fam, "sluice_messages_received_total")
                assert v >= last, (v, last)
                last = v
                scrapes.append(v)
            except Exception as e:  # reported by the main thread
                errors.append(e)
                return

    t = threading.Thread(target=scrape)
    t.start()
    n1, n0 = 300, 200
    for i in range(n1):
        pub0.c.publish(f"load/a/{i}", b"x" * 10, qos=1)
    for i in range(n0):
        pub1.c.publish(f"load/b/{i}", b"y" * 10, qos=0)
    for _ in range(n1 + n0):
        sub.message()
    stop.set()
    t.join(WAIT)
    assert not errors, errors
    assert len(scrapes) >= 2, scrapes
    after = metrics(hbroker)
    assert total(after, "sluice_messages_received_total", qos="1") - base[1] == n1
    assert total(after, "sluice_messages_received_total", qos="0") - base[0] == n0
    assert total(after, "sluice_messages_received_total", qos="2") - base[2] == 0
    assert total(after, "sluice_messages_received_total", shard="0") >= n1
    assert total(after, "sluice_messages_sent_total") - sent0 == n1 + n0
    assert total(after, "sluice_clients_connected") == 3
    assert total(after, "sluice_subscriptions") == 1
    # Conventions: a prefix, counters' samples end in _total, one TYPE per family.
    names = [f.name for f in after]
    assert len(names) == len(set(names))
    for f in after:
        assert f.name.startswith("sluice_"), f.name
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name


def test_health_checks_need_no_credentials_the_rest_does(paho):
    config = '[http]\nlisten = "127.0.0.1:0"\ntoken = "s3cret"\nusername = "admin"\npassword = "pw"\n'
    b = broker_with(config=config)
    try:
        assert get(b, "/healthz")[0] == 200
        assert get(b, "/readyz")[0] == 200
        status, body, headers = get(b, "/metrics")
        assert status == 401 and headers["WWW-Authenticate"].startswith("Basic"), body
        assert get(b, "/api/v1/clients")[0] == 401
        assert get(b, "/metrics", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert get(b, "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        basic = lambda u, p: {"Authorization": "Basic " + base64.b64encode(f"{u}:{p}".encode()).decode()}
        assert get(b, "/api/v1/clients", headers=basic("admin", "pw"))[0] == 200
        assert get(b, "/api/v1/clients", headers=basic("admin", "nope"))[0] == 401
        # A browser cannot send a bearer token: the token works as a basic-auth password.
        assert get(b, "/", headers=basic("anyone", "s3cret"))[0] == 200
    finally:
        b.stop()


def test_https_with_the_configured_certificate(tmp_path):
    import ssl
    from test_kafka_tls import make_certs
    make_certs(tmp_path)
    config = (f'[http]\nlisten = "127.0.0.1:0"\ncert_file = "{tmp_path}/server.pem"\n'
              f'key_file = "{tmp_path}/server.key"\n')
    b = broker_with(config=config)
    try:
        host, port = b.http
        ctx = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
        with urllib.request.urlopen(f"https://{host}:{port}/healthz", context=ctx, timeout=WAIT) as r:
            assert r.status == 200 and r.read() == b"ok\n"
        with urllib.request.urlopen(f"https://{host}:{port}/metrics", context=ctx, timeout=WAIT) as r:
            assert any(f.name == "sluice_sessions" for f in text_string_to_metric_families(r.read().decode()))
        # Plain HTTP to the HTTPS port gets no HTTP answer.
        with pytest.raises((urllib.error.URLError, ConnectionError, http.client.HTTPException)):
            urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=WAIT).read()
    finally:
        b.stop()


def test_a_non_loopback_http_listener_needs_credentials(tmp_path):
    r = subprocess.run([str(ROOT / "target/debug/sluice"), "--http", "0.0.0.0:0", "--data-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=WAIT)
    assert r.returncode != 0
    assert "http.listen" in r.stderr and "token" in r.stderr, r.stderr


def test_admin_api_every_route(hbroker, paho):
    a = paho(hbroker.shard(0), "dev-a", v5=True)
    b = paho(hbroker.shard(1), "dev-b")
    c = paho(hbroker.shard(1), "other-c", v5=True, clean=False, props=session_expiry(300))
    a.subscribe("fleet/+/speed", qos=1)
    b.subscribe("fleet/+/speed", qos=0)
    c.subscribe("alerts/#", qos=2)

    page = get_json(hbroker, "/api/v1/clients")
    assert [x["client_id"] for x in page["items"]] == ["dev-a", "dev-b", "other-c"]
    assert page["total"] == 3 and page["next_after"] is None
    assert {x["client_id"]: x["shard"] for x in page["items"]} == {"dev-a": 0, "dev-b": 1, "other-c": 1}
    assert {x["client_id"]: x["protocol"] for x in page["items"]}["dev-b"] == "3.1.1"
    # Paging across shards: one at a time, in id order.
    p1 = get_json(hbroker, "/api/v1/clients?limit=1")
    assert [x["client_id"] for x in p1["items"]] == ["dev-a"] and p1["next_after"] == "dev-a"
    p2 = get_json(hbroker, "/api/v1/clients?limit=1&after=dev-a")
    assert [x["client_id"] for x in p2["items"]] == ["dev-b"]
    p3 = get_json(hbroker, "/api/v1/clients?limit=1&after=dev-b")
    assert [x["client_id"] for x in p3["items"]] == ["other-c"] and p3["next_after"] is None
    assert [x["client_id"] for x in get_json(hbroker, "/api/v1/clients?search=dev")["items"]] == ["dev-a", "dev-b"]

    d = get_json(hbroker, "/api/v1/clients/dev-a")
    assert d["subscriptions"] == [{"filter": "fleet/+/speed", "qos": 1}] and d["connected"]
    assert get_json(hbroker, "/api/v1/clients/nobody", expect=404)["error"]

    subs = get_json(hbroker, "/api/v1/subscriptions?filter=fleet/%2B/speed")
    assert [(s["client_id"], s["qos"]) for s in subs["items"]] == [("dev-a", 1), ("dev-b", 0)]
    assert get_json(hbroker, "/api/v1/subscriptions")["total"] == 3
    # Paging runs through one client's subscriptions too: (client id, filter) is the cursor.
    a.subscribe("fleet/+/rpm", qos=0)
    p1 = get_json(hbroker, "/api/v1/subscriptions?limit=1")
    assert [(s["client_id"], s["filter"]) for s in p1["items"]] == [("dev-a", "fleet/+/rpm")]
    p2 = get_json(hbroker, f"/api/v1/subscriptions?limit=2&after={p1['next_after']}&after_filter=fleet/%2B/rpm")
    assert [(s["client_id"], s["filter"]) for s in p2["items"]] == [("dev-a", "fleet/+/speed"), ("dev-b", "fleet/+/speed")]
    assert p2["next_after"] == "dev-b" and p2["next_after_filter"] == "fleet/+/speed"
    assert "not a valid topic filter" in get_json(hbroker, "/api/v1/subscriptions?filter=a/%23/b", expect=400)["error"]

    # Disconnect a real client: MQTT 5 hears 0x98 (administrative action).
    get_json(hbroker, "/api/v1/clients/dev-a", method="DELETE")
    ev = a.event("disconnect")
    assert ev[2].value == 0x98, ev
    wait_for(lambda: get_json(hbroker, "/api/v1/clients")["total"] == 2, "dev-a gone")
    assert get_json(hbroker, "/api/v1/clients/dev-a", method="DELETE", expect=404)["error"]
    # A persistent session stays after its client went: sessions lists it, clients does not.
    c.close()
    wait_for(lambda: [x["client_id"] for x in get_json(hbroker, "/api/v1/clients")["items"]] == ["dev-b"], "c offline")
    sessions = get_json(hbroker, "/api/v1/sessions")["items"]
    assert [(s["client_id"], s["connected"]) for s in sessions] == [("dev-b", True), ("other-c", False)]

    # Retained: get, delete, and a new subscriber then does not get it.
    b.publish("status/car-1", b"parked", qos=1, retain=True)
    b.publish("status/car-2", b"\xff\x00", qos=1, retain=True)
    r = wait_for(lambda: get_json(hbroker, "/api/v1/retained?filter=status/%23")["items"], "retained listed")
    assert [(m["topic"], m["payload"]) for m in r] == [("status/car-1", "parked"), ("status/car-2", None)]
    assert r[1]["payload_base64"] == base64.b64encode(b"\xff\x00").decode()
    one = get_json(hbroker, "/api/v1/retained/message?topic=status/car-1")
    assert one["payload"] == "parked" and one["qos"] == 1
    get_json(hbroker, "/api/v1/retained/message?topic=status/car-1", method="DELETE")
    assert get_json(hbroker, "/api/v1/retained/message?topic=status/car-1", expect=404)["error"]
    late = paho(hbroker.shard(0), "late")
    late.subscribe("status/#", qos=1)
    m = late.message()
    assert m.topic == "status/car-2"
    late.no_message()
    assert get_json(hbroker, "/api/v1/retained/message?topic=status/%2B", expect=400)["error"]

    assert get_json(hbroker, "/api/v1/mappings")["items"] == []
    assert get_json(hbroker, "/api/v1/clusters")["items"] == []
    spill = get_json(hbroker, "/api/v1/spill")
    assert [s["shard"] for s in spill["items"]] == [0, 1]
    ov = get_json(hbroker, "/api/v1/overview")
    assert ov["shards"] == 2 and ov["clients_connected"] == 2

    # Bad input: 4xx with a message.
    for path, code in [("/api/v1/clients?limit=100000", 400), ("/api/v1/clients?limit=abc", 400),
                       ("/api/v1/clients?limit=0", 400), ("/api/v1/clients?colour=red", 400),
                       ("/api/v1/retained/message", 400), ("/api/v1/nothing", 404),
                       ("/api/v1/live?filter=a/%23/b", 400)]:
        status, body, _ = get(hbroker, path)
        assert status == code and json.loads(body)["error"], (path, status, body)
    status, body, _ = get(hbroker, "/api/v1/clients", method="POST")
    assert status == 405, body


def session_expiry(secs):
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    p = Properties(PacketTypes.CONNECT)
    p.SessionExpiryInterval = secs
    return p


def read_events(resp, want, timeout=WAIT):
    """Server-Sent Events from `resp` until `want(events)` holds."""
    events, buf = [], b""
    deadline = time.monotonic() + timeout
    while not want(events):
        assert time.monotonic() < deadline, events
        chunk = resp.read1(65536)
        assert chunk, "stream ended"
        buf += chunk
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            kind, data = "message", None
            for line in raw.decode().splitlines():
                if line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
            events.append((kind, data))
    return events


def test_live_view_shows_published_messages_and_their_kafka_records(kafka, paho):
    kafka.create_topic("live-t", partitions=2)
    b = Broker(*HTTP_ARGS, "--kafka", kafka.bootstrap, "--map", "cars/#=live-t")
    try:
        # Ready: the probe has listed the cluster's topics (the live view places keyed records).
        wait_for(lambda: get(b, "/readyz")[0] == 200, "ready")
        host, port = b.http
        resp = urllib.request.urlopen(f"http://{host}:{port}/api/v1/live?filter=cars/%2B/speed", timeout=WAIT)
        assert resp.headers["Content-Type"] == "text/event-stream"
        read_events(resp, lambda ev: any(k == "open" for k, _ in ev))
        pub = paho(b.shard(1), "car-pub")
        samples = []

        def seen(ev):
            samples[:] = [d for k, d in ev if k == "message"]
            return any(s["topic"] == "cars/7/speed" for s in samples)

        stop = threading.Event()

        def publish():
            while not stop.is_set():
                pub.c.publish("cars/7/speed", b"88", qos=1)
                pub.c.publish("other/7", b"no", qos=0)
                time.sleep(0.05)

        t = threading.Thread(target=publish)
        t.start()
        try:
            read_events(resp, seen)
        finally:
            stop.set()
            t.join()
        s = next(s for s in samples if s["topic"] == "cars/7/speed")
        assert s["payload"] == "88" and s["qos"] == 1 and s["client_id"] == "car-pub" and s["shard"] == 1
        assert all(x["topic"].startswith("cars/") for x in samples)
        [rec] = s["kafka"]
        assert rec["topic"] == "live-t" and rec["cluster"] == "default" and rec["key"] == "cars/7/speed"
        # Placed by key as the producers place it: the record is in that partition in Kafka.
        assert rec["partition_by"] == "key" and rec["partition"] in (0, 1), rec
        got = kafka.consume("live-t", 1)
        assert got and got[0].key() == b"cars/7/speed" and got[0].partition() == rec["partition"]
        assert ["mqtt.topic", "cars/7/speed"] in rec["headers"]
        resp.close()
    finally:
        b.stop()


def test_kafka_metrics_and_readyz_follows_kafka(kafka, paho):
    kafka.create_topic("obs-ok", partitions=2)
    b = Broker(*HTTP_ARGS, "--kafka", kafka.bootstrap, "--map", "k/#=obs-ok")
    try:
        wait_for(lambda: get(b, "/readyz")[0] == 200, "ready with Kafka up")
        before = metrics(b)
        pub = paho(b.shard(0), "k-pub")
        n = 50
        for i in range(n):
            pub.publish(f"k/{i}", b"v", qos=1)  # acknowledged once Kafka took it
        fam = metrics(b)
        lab = {"mapping": "map-1", "cluster": "default"}
        grew = lambda name: total(fam, name, **lab) - total(before, name, **lab)
        assert grew("sluice_kafka_records_produced_total") == n
        assert grew("sluice_kafka_messages_total") == n
        assert grew("sluice_kafka_ack_latency_seconds_count") == n
        assert total(fam, "sluice_kafka_records_in_flight", **lab) == 0, "every record was answered"
        hist = next(f for f in fam if f.name == "sluice_kafka_ack_latency_seconds")
        assert hist.type == "histogram"
        buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
        assert buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == total(fam, "sluice_kafka_ack_latency_seconds_count")
        assert total(fam, "sluice_kafka_cluster_up", cluster="default") == 1
        # What the produce requests carried: every record, a retried one again, in at least one
        # request and batch.
        sent = lambda name: total(fam, name, cluster="default") - total(before, name, cluster="default")
        assert sent("sluice_kafka_produce_batch_records_total") == n + grew("sluice_kafka_records_retried_total")
        assert 1 <= sent("sluice_kafka_produce_requests_total") <= sent("sluice_kafka_produce_batches_total")
        assert sent("sluice_kafka_produce_batch_bytes_total") > n * len(b"v")
        m = get_json(b, "/api/v1/mappings")["items"][0]
        assert m["name"] == "map-1" and m["clusters"][0]["records_produced"] == n
        assert m["clusters"][0]["ack_latency_p99_seconds"] > 0

        kafka.pause()
        try:
            ready = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(get(b, "/readyz")), "unready", timeout=20)
            body = json.loads(ready[1])
            assert body["ready"] is False and body["kafka"][0]["connected"] is False and body["kafka"][0]["last_error"]
            assert total(metrics(b), "sluice_kafka_cluster_up", cluster="default") == 0
        finally:
            kafka.resume()
        wait_for(lambda: get(b, "/readyz")[0] == 200, "ready again", timeout=20)
    finally:
        b.stop()


def test_readyz_stays_ready_while_publishers_are_acknowledged_from_the_spill_log(kafka, paho):
    kafka.create_topic("obs-spill", partitions=1)
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]
delivery_timeout_ms = 1000

[[mqtt_to_kafka]]
name = "spilled"
filters = ["s/#"]
destinations = [{{ cluster = "default", topic = "obs-spill" }}]
"""
    b = broker_with(*HTTP_ARGS, config=config)
    try:
        wait_for(lambda: get(b, "/readyz")[0] == 200, "ready with Kafka up")
        pub = paho(b.shard(0), "s-pub")
        kafka.pause()
        try:
            wait_for(lambda: get(b, "/readyz")[0] == 503, "unready: Kafka gone, nothing spilled yet", timeout=20)
            # Kafka does not answer within the delivery time-out: the record goes to the spill
            # log and the publisher is acknowledged from disk.
            pub.publish("s/1", b"kept", qos=1)
            status, body, _ = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(get(b, "/readyz")), "ready again")
            assert json.loads(body)["spilling_within_limit"] is True
            # The log's figures reach the state machine each tick (100 ms).
            spill = wait_for(lambda: (lambda items: items if items[0]["records"] >= 1 else None)(
                get_json(b, "/api/v1/spill")["items"]), "the spilled record counted")
            assert spill[0]["spilling"] and spill[0]["disk_bytes"] > 0, spill
        finally:
            kafka.resume()
        assert [m.value() for m in kafka.consume("obs-spill", 1)] == [b"kept"]
    finally:
        b.stop()


def test_a_mapping_to_a_missing_topic_is_reported(kafka):
    b = Broker(*HTTP_ARGS, "--kafka", kafka.bootstrap, "--map", "devices/#=no-such-topic")
    try:
        body = wait_for(lambda: (lambda r: json.loads(r[1]) if json.loads(r[1])["missing_topics"] else None)(get(b, "/readyz")),
                        "missing topic on /readyz")
        assert body["missing_topics"] == [{"cluster": "default", "mapping": "map-1", "topic": "no-such-topic"}]
        assert get_json(b, "/api/v1/mappings")["items"][0]["missing_topics"] == ["no-such-topic"]
        assert total(metrics(b), "sluice_kafka_topic_missing", topic="no-such-topic") == 1
    finally:
        b.stop()


def test_missing_topics_are_said_once_and_plainly(kafka, capfd):
    config = f"""
[kafka.clusters.default]
bootstrap = ["{kafka.bootstrap}"]

[[kafka_to_mqtt]]
name = "cmds"
cluster = "default"
kafka_topics = ["no-such-in"]
mqtt_topics = ["c/${{key}}"]

[[mqtt_to_kafka]]
name = "tele"
filters = ["t/#"]
destinations = [{{ cluster = "default", topic = "no-such-out" }}]
"""
    b = broker_with(*HTTP_ARGS, config=config)
    try:
        cmds = lambda: next(m for m in get_json(b, "/api/v1/mappings")["items"] if m["name"] == "cmds")
        # Each shard's Kafka thread retries every second; three rounds each.
        wait_for(lambda: cmds()["missing_topic_attempts"] >= 6, "retries of the missing topic", timeout=30)
        assert cmds()["missing_topics"] == ["no-such-in"]
        err = capfd.readouterr().err
        # Logged once per shard's Kafka thread, not once per retry.
        assert err.count("kafka_to_mqtt: topic not available") == 2, err
        assert "mapping `tele` names Kafka topic `no-such-out`, which cluster `default` does not have" in err, err
        assert "auto_create_topics = true" in err
    finally:
        b.stop()


def test_openapi_file_matches_the_server(hbroker, paho, tmp_path):
    st = shutil.which("schemathesis") or pytest.fail("schemathesis missing: scripts/install-test-deps installs it")
    paho(hbroker.shard(0), "api-client").subscribe("x/#")
    host, port = hbroker.http
    r = subprocess.run(
        [st, "run", str(ROOT / "docs" / "openapi.yaml"), "--url", f"http://{host}:{port}",
         "--exclude-path", "/api/v1/live", "--max-examples", "20", "--checks", "all",
         "--exclude-checks", "positive_data_acceptance,unsupported_method",
         "--seed", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache stays out of the tree
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def test_dashboard_in_headless_chromium(kafka, paho, tmp_path):
    """Screenshots of each page go to a temporary directory; UPDATE_SCREENSHOTS=1 writes the
    ones the README shows (docs/dashboard-*.png) instead."""
    shots = ROOT / "docs" if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path
    browser_dir = ROOT / "tests" / "browser"
    node = shutil.which("node") or pytest.fail("node missing: scripts/install-test-deps installs it")
    assert Path("/usr/bin/chromium").exists(), "chromium missing: scripts/install-test-deps installs it"
    assert (browser_dir / "node_modules" / "playwright-core").exists(), "run npm ci in tests/browser"
    kafka.create_topic("dash-t", partitions=2)
    kafka.create_topic("dash-cmd", partitions=1)
    config = f"""
[[kafka_to_mqtt]]
name = "commands"
cluster = "default"
kafka_topics = ["dash-cmd"]
mqtt_topics = ["cmd/${{key}}"]
"""
    b = broker_with(*HTTP_ARGS, "--kafka", kafka.bootstrap, "--map", "dash/#=dash-t", config=config)
    try:
        target = paho(b.shard(1), "dash-victim", v5=True)
        target.subscribe("dash/#", qos=0)
        pub = paho(b.shard(0), "dash-load")
        stop = threading.Event()

        def load():
            i = 0
            while not stop.is_set():
                pub.c.publish(f"dash/car-{i % 5}/speed", str(i).encode(), qos=1)
                i += 1
                time.sleep(0.02)

        t = threading.Thread(target=load)
        t.start()
        try:
            host, port = b.http
            r = subprocess.run([node, str(browser_dir / "dashboard.mjs"), f"http://{host}:{port}", "dash-victim",
                                "dash/+/speed", str(shots)],
                               capture_output=True, text=True, timeout=120, cwd=browser_dir)
        finally:
            stop.set()
            t.join()
        assert r.returncode == 0, r.stdout + r.stderr
        seen = json.loads(r.stdout.strip().splitlines()[-1])
        assert seen["consoleErrors"] == [] and seen["disconnected"], seen
        assert "dash/" in seen["liveRow"] and "dash-t" in seen["liveRow"], seen
        assert seen["clusterState"] == "connected", seen
        # The page's Disconnect disconnected the real client: it heard 0x98.
        ev = target.event("disconnect")
        assert ev[2].value == 0x98, ev
    finally:
        b.stop()
