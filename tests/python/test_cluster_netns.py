"""A cluster of sluice nodes, each in its own network namespace, with packet loss and a partition
between a node and Kafka (issue #17, the optional tests).

Layout (made by `Net`, all names carry this process's pid, all removed at teardown):

    root namespace                                  one namespace per node
    tansu on KAFKA.1 ── bridge "…bk" ── veth "…k<i>" ═══ "kafka"   (KAFKA.1x) ┐ sluice n<i>
    paho clients     ── bridge "…bc" ── veth "…c<i>" ═══ "clients" (CLIENTS.1x) ┘

A node reaches Kafka only through its `kafka` link and its clients only through its `clients`
link, so loss (iptables `statistic`, see `Net.impair`) or a cut (`ip link set … down`) on the
`kafka` link leaves the clients able to see what the node does about it (fence: 0x89, refused
CONNECTs). Nodes talk to each other only through Kafka. Every wait has a deadline; nothing sleeps to let things settle.
"""
import json
import os
import queue
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import conftest
from conftest import WAIT, Broker, Paho, Tansu, free_port, parse, sluice_bin
from test_cluster import connected, disconnect_reason, node_config, rc_value, wait_for

# The HTTP endpoint listens on a namespace address, not loopback: sluice then requires a token.
TOKEN = "netns-test"

NAME = re.compile(r"^sl(\d+)x(bk|bc|k\d+|c\d+|n\d+)$")


def sh(*args, check=True):
    r = subprocess.run(list(args), capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r


def pid_alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def api(b, path):
    """GET `path` on node b's HTTP endpoint (with the token): parsed JSON, None on 404."""
    req = urllib.request.Request(f"http://{b.http[0]}:{b.http[1]}{path}",
                                 headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def states(b):
    """test_cluster's `states`, through the token."""
    return {m["node"]: m["state"] for m in api(b, "/api/v1/cluster")["members"]}


def claim_of(b, client_id):
    """test_cluster's `claim_of`: "confirmed", "unconfirmed", or None when b does not serve it."""
    c = api(b, f"/api/v1/clients/{client_id}")
    return c.get("cluster_claim") if c else None


def sweep_stale():
    """Namespaces and links of earlier runs whose pytest was killed before its teardown: only our
    own names (`sl<pid>x…`), only when that pid is gone."""
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = NAME.match(name)
        if m and not pid_alive(int(m.group(1))):
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        m = NAME.match(name)
        if m and not pid_alive(int(m.group(1))):
            sh("ip", "link", "del", name, check=False)


def free_subnets():
    """Two /24s under 10.0.0.0/8 that no route and no address of this host already uses."""
    used = sh("ip", "-o", "route", "show", "table", "all", check=False).stdout + \
        sh("ip", "-o", "addr", "show", check=False).stdout
    start = os.getpid() % 200
    for i in range(200):
        b = 20 + (start + i) % 200
        nets = (f"10.231.{b}", f"10.232.{b}")
        if not any(n + "." in used for n in nets):
            return nets
    raise RuntimeError("no free 10.231.x/10.232.x subnet")


class Net:
    """Two bridges in the root namespace (Kafka side, clients side) and, per node, a namespace
    linked to both by a veth pair each. `close()` removes everything it made, whatever failed."""

    def __init__(self):
        self.tag = f"sl{os.getpid()}x"
        self.kafka_net, self.client_net = free_subnets()
        self.kafka_addr = f"{self.kafka_net}.1"
        self.namespaces, self.links = [], []
        try:
            for side, net in (("bk", self.kafka_net), ("bc", self.client_net)):
                br = self.tag + side
                sh("ip", "link", "add", br, "type", "bridge")
                self.links.append(br)
                sh("ip", "addr", "add", f"{net}.1/24", "dev", br)
                sh("ip", "link", "set", br, "up")
        except Exception:
            self.close()
            raise

    def node(self, i):
        """Makes node `i`'s (1..) namespace: returns its name and the node's clients address
        (`kafka_link(i)` is where it is cut)."""
        ns = f"{self.tag}n{i}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        for side, inner, net in (("k", "kafka", self.kafka_net), ("c", "clients", self.client_net)):
            outer = f"{self.tag}{side}{i}"
            sh("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns)
            self.links.append(outer)
            sh("ip", "link", "set", outer, "master", self.tag + "b" + side)
            sh("ip", "link", "set", outer, "up")
            sh("ip", "-n", ns, "addr", "add", f"{net}.{10 + i}/24", "dev", inner)
            sh("ip", "-n", ns, "link", "set", inner, "up")
        return ns, f"{self.client_net}.{10 + i}"

    def kafka_link(self, i):
        return f"{self.tag}k{i}"

    def impair(self, i, loss_pct, delay_ms=0):
        """Drops `loss_pct` % of the packets each way on node i's Kafka link: iptables' `statistic`
        match in the node's namespace (its INPUT from and OUTPUT to the `kafka` interface; the
        host's tables are not touched). `tc netem loss` would do the same, but this machine's
        kernel has no sch_netem (nor a tc action module for random drops); iptables works on any
        kernel with xt_statistic. A delay needs netem: added when the kernel has it; returns
        whether it was."""
        ns = f"{self.tag}n{i}"
        p = f"{loss_pct / 100:.4f}"
        for chain, way in (("INPUT", "-i"), ("OUTPUT", "-o")):
            sh("ip", "netns", "exec", ns, tool("iptables"), "-A", chain, way, "kafka", "-m", "statistic",
               "--mode", "random", "--probability", p, "-j", "DROP")
        if delay_ms and netem_available():
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "kafka", "root", "netem", "delay",
               f"{delay_ms}ms")
            return True
        return False

    def dropped(self, i):
        """Packets the loss rules dropped on node i's Kafka link, both directions."""
        out = sh("ip", "netns", "exec", f"{self.tag}n{i}", tool("iptables"), "-L", "-v", "-x", "-n").stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "statistic" in line)

    def cut(self, i, down=True):
        sh("ip", "link", "set", self.kafka_link(i), "down" if down else "up")

    def drop_nodes(self):
        """The per-test part: every namespace and its links (the bridges stay)."""
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)
        for link in [l for l in self.links if not l.endswith(("bk", "bc"))]:
            sh("ip", "link", "del", link, check=False)  # gone with its namespace, usually
        self.links = [l for l in self.links if l.endswith(("bk", "bc"))]
        self.namespaces = []

    def close(self):
        self.drop_nodes()
        for link in self.links:
            sh("ip", "link", "del", link, check=False)
        self.links = []


class NsTansu(Tansu):
    """tansu listening on (and advertising) the Kafka bridge's address."""

    def __init__(self, host):
        self.port = free_port()
        self.bootstrap = f"{host}:{self.port}"
        url = f"tcp://{host}:{self.port}"
        self.log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [conftest.tansu_bin(), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", "memory://tansu/"],
            stdout=self.log, stderr=subprocess.STDOUT)
        self.wait_ready()

    def stop(self):
        super().stop()
        os.unlink(self.log.name)


class NsNode(Broker):
    """conftest's Broker, run by `ip netns exec` (which execs: the pid is sluice's) with every
    listener and the HTTP endpoint on the namespace's clients address."""

    def __init__(self, ns, host, config, cores=2):
        self.keep_data = False
        self.data_dir = tempfile.mkdtemp(prefix="sluice-netns-")
        self.config = Path(self.data_dir) / "node.toml"
        self.config.write_text(config + f'\n[http]\nlisten = "{host}:0"\ntoken = "{TOKEN}"\n')
        args = ["ip", "netns", "exec", ns, sluice_bin(), "--listen", f"{host}:0", "--cores", str(cores),
                "--print-listen", "--data-dir", str(Path(self.data_dir) / "data"), "--sys-interval", "0",
                "--config", str(self.config), "--allow-anonymous"]
        for _ in range(cores):
            args += ["--shard-listen", f"{host}:0"]
        env = dict(os.environ, SLUICE_LOG=os.environ.get("SLUICE_LOG", "warn"))
        self.log = Path(self.data_dir) / "stderr.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self.addr, self.http, self.shards, self.listeners = None, None, [None] * cores, {}
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in self.proc.stdout], daemon=True).start()
        try:
            deadline = time.monotonic() + WAIT
            while self.addr is None or self.http is None or None in self.shards:
                assert self.proc.poll() is None, f"sluice in {ns} exited {self.proc.returncode}: {self.log.read_text()}"
                try:
                    w = lines.get(timeout=max(0.01, min(0.5, deadline - time.monotonic()))).split()
                except queue.Empty:
                    assert time.monotonic() < deadline, f"sluice in {ns} did not print its listeners"
                    continue
                if w[:1] == ["listening"]:
                    self.addr = parse(w[1])
                elif w[:1] == ["http"]:
                    self.http = parse(w[1])
                elif w[:1] == ["shard"] and w[2] == "listening":
                    self.shards[int(w[1])] = parse(w[3])
        except BaseException:
            self.stop()  # the fixture never saw this node: kill it and remove its data dir here
            raise


def tool(name):
    """An administration tool's path (/usr/sbin may not be on a non-root PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin") or name


_netem = None


def netem_available():
    global _netem
    if _netem is None:
        _netem = probe_ns(lambda ns: sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "va", "root",
                                        "netem", "delay", "1ms", check=False)).returncode == 0
    return _netem


def probe_ns(check):
    """Runs `check(ns)` in a throwaway namespace holding a veth pair va/vb; returns its result."""
    ns = f"sl{os.getpid()}xn0"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "-n", ns, "link", "add", "name", "va", "type", "veth", "peer", "name", "vb")
        return check(ns)
    finally:
        sh("ip", "netns", "del", ns, check=False)


def netns_unavailable():
    """Why this module cannot run here, or None."""
    if not shutil.which(tool("ip")) or not shutil.which(tool("iptables")):
        return "iproute2 (ip) or iptables is not installed (scripts/install-test-deps installs them)"
    try:
        r = probe_ns(lambda ns: sh("ip", "netns", "exec", ns, tool("iptables"), "-A", "OUTPUT", "-o", "va", "-m",
                                   "statistic", "--mode", "random", "--probability", "0.5", "-j", "DROP",
                                   check=False))
    except RuntimeError as e:
        return f"network namespaces with veth pairs are not permitted here (needs root / CAP_NET_ADMIN): {e}"
    if r.returncode != 0:
        return f"iptables' statistic match does not work in a namespace here: {r.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def net():
    why = netns_unavailable()
    if why:
        pytest.skip(why)
    sweep_stale()
    n = Net()
    try:
        yield n
    finally:
        n.close()


@pytest.fixture(scope="module")
def kafka(net):
    t = NsTansu(net.kafka_addr)
    yield t
    t.stop()


@pytest.fixture
def cluster(net, kafka):
    """`start(count, **node_config kw)` → nodes n1..n<count>, each in its namespace; stopped and
    their namespaces removed at the end of the test, even when it fails."""
    nodes = []

    def start(count, **kw):
        prefix = f"ns{time.monotonic_ns()}"
        for i in range(1, count + 1):
            ns, host = net.node(i)
            nodes.append(NsNode(ns, host, node_config(kafka, f"n{i}", prefix, **kw)))
        names = {f"n{i}": "alive" for i in range(1, count + 1)}
        for b in nodes:
            wait_for(lambda b=b: states(b) == names, f"{count} alive nodes")
        return nodes

    try:
        yield start
    finally:
        for b in nodes:
            if b.proc.poll() is None:
                b.proc.terminate()
            try:
                b.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                b.proc.kill()
                b.proc.wait()
            # Shown by pytest only when the test failed: what each node logged (warnings up).
            print(f"--- {b.log}:\n" + "\n".join(b.log.read_text().splitlines()[-30:]))
            b.stop()
        net.drop_nodes()


def first_occurrences(msgs):
    seen, out = set(), []
    for m in msgs:
        if m not in seen:
            seen.add(m)
            out.append(m)
    return out


def test_qos1_messages_across_nodes_all_arrive_in_order_with_loss_on_a_nodes_link_to_kafka(net, cluster):
    """15 % loss each way on n1's link to Kafka (and 5 ms delay where the kernel has netem). A publisher on n1 (its records
    cross the lossy link) and one on n2 send QoS 1, 20 in flight each; subscribers on all three
    nodes (n1's reads cross the lossy link) get every acknowledged message, in each publisher's
    order (at least once: a produce retried after a lost response may repeat a record).
    dead_after_ms is 10 s so that TCP's retransmission back-off under this loss (seconds at
    worst) does not fence n1: this test is about loss, the partition test about fencing."""
    nodes = cluster(3, dead_after_ms=10000, heartbeat_ms=300)
    pubs = [Paho(nodes[0].addr, "loss-pub-a"), Paho(nodes[1].addr, "loss-pub-b")]
    subs = [Paho(nodes[i].addr, f"loss-sub-{i}") for i in range(3)]
    try:
        connected(nodes[0], nodes[1], pubs[0], subs[1])
        connected(nodes[0], nodes[2], pubs[0], subs[2])
        connected(nodes[1], nodes[0], pubs[1], subs[0])
        for s in subs:
            s.subscribe("loss/#", 1)
        delayed = net.impair(1, 15, delay_ms=5)
        print(f"15 % loss on n1's Kafka link, 5 ms delay: {delayed}")
        n = 150
        sent = {"a": [f"a{i}" for i in range(n)], "b": [f"b{i}" for i in range(n)]}

        def publish(p, tag):
            infos = [p.c.publish(f"loss/{tag}", m, 1) for m in sent[tag]]
            for info in infos:
                info.wait_for_publish(60)
                assert info.is_published(), f"{tag}: not acknowledged in 60 s"

        ts = [threading.Thread(target=publish, args=(p, t)) for p, t in zip(pubs, "ab")]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        for i, s in enumerate(subs):
            got = []
            deadline = time.monotonic() + 60
            want = set(sent["a"]) | set(sent["b"])
            # Only this test's messages count (a late probe from setting up may arrive too).
            while not want <= set(got):
                assert time.monotonic() < deadline, f"sub on n{i + 1}: {len(want & set(got))} of {2 * n}"
                try:
                    got.append(s.message(timeout=1).payload.decode())
                except Exception:
                    pass
            for tag in "ab":
                mine = first_occurrences(g for g in got if g.startswith(tag))
                assert mine == sent[tag], f"sub on n{i + 1}, publisher {tag}: order"
            print(f"n{i + 1}: {len(got) - 2 * n} duplicates")
        dropped = net.dropped(1)
        print(f"dropped {dropped} packets on n1's Kafka link")
        assert dropped > 0, "the loss was not applied"
        for c in pubs + subs:
            assert c.c.is_connected(), "nobody fenced or closed"
        assert states(nodes[1]) == {"n1": "alive", "n2": "alive", "n3": "alive"}
    finally:
        for c in pubs + subs:
            c.close()


def test_a_node_cut_off_from_kafka_fences_the_others_publish_its_wills_once_and_it_comes_back(net, cluster):
    """n3's link to Kafka goes down (its clients' link stays up) for well over dead_after_ms:
    - n3 fences: its clients get 0x89 (MQTT 5) or are closed (3.1.1), within about
      dead_after_ms of the cut, so a device that moved to n1 meanwhile is served by two nodes for
      no longer than that; a new CONNECT to n3 is refused (0x88);
    - n1 and n2 declare n3 dead and publish the will of n3's device once (each subscriber gets it
      once);
    - the device reconnects to n1 and is served there;
    - the link comes back: n3 is alive again for everybody and takes clients, no will goes out a
      second time, and the device's client id is served by n1 alone."""
    dead_after_ms = 3000
    nodes = cluster(3, dead_after_ms=dead_after_ms, heartbeat_ms=300)
    n1, n2, n3 = nodes
    watchers = [Paho(b.addr, f"part-watch-{i}") for i, b in enumerate((n1, n2))]
    probe = Paho(n3.addr, "part-probe")
    clients = []
    try:
        for w in watchers:
            connected(n3, w, probe, w)
        probe.close()
        for w in watchers:
            w.subscribe("wills/#", 1)
        dev = Paho(n3.addr, "part-dev", will=("wills/part-dev", b"lost", 1, False))
        mover = Paho(n3.addr, "part-mover", v5=True)
        local = Paho(n3.addr, "part-local", v5=True)
        clients += [dev, mover, local]
        for cid in ("part-dev", "part-mover", "part-local"):
            wait_for(lambda cid=cid: claim_of(n3, cid) == "confirmed", f"{cid} claimed on n3")
        # The survivors read part-dev's claim (its will) from Kafka too: they have dead_after_ms
        # before n3 can count as dead, as in test_cluster's SIGKILL test.
        net.cut(3)
        cut_at = time.monotonic()
        # The device moves to n1 while n3 still serves it: n3 cannot read n1's claim.
        moved = Paho(n1.addr, "part-mover", v5=True)
        clients.append(moved)
        assert rc_value(moved.rc) == 0
        assert disconnect_reason(mover) == 0x89  # within conftest's WAIT (10 s)
        both_for = time.monotonic() - cut_at
        print(f"n3 fenced {both_for:.2f} s after the cut")
        assert disconnect_reason(local) == 0x89
        dev.event("disconnect")  # 3.1.1: closed, no reason code
        assert both_for < 2 * dead_after_ms / 1000, "served by two nodes for longer than stated"
        refused = Paho(n3.addr, "part-new", v5=True)
        clients.append(refused)
        assert rc_value(refused.rc) == 0x88, refused.rc
        for b in (n1, n2):
            wait_for(lambda b=b: states(b).get("n3") == "dead", "n3 dead on the survivors")
        for w in watchers:
            m = w.message(timeout=30)
            assert (m.topic, m.payload) == ("wills/part-dev", b"lost")
        # The device reconnects to a survivor and is served there.
        dev2 = Paho(n1.addr, "part-dev", will=("wills/part-dev", b"lost", 1, False))
        clients.append(dev2)
        wait_for(lambda: claim_of(n1, "part-dev") == "confirmed", "part-dev claimed on n1")
        dev2.subscribe("part/echo", 1)
        dev2.publish("part/echo", "here", qos=1)
        assert dev2.message().payload == b"here"
        # The link comes back.
        net.cut(3, down=False)
        for b in nodes:
            wait_for(lambda b=b: states(b) == {"n1": "alive", "n2": "alive", "n3": "alive"}, "n3 alive again")

        def takes_clients():
            c = Paho(n3.addr, f"part-after-{time.monotonic_ns()}", v5=True)
            c.close()
            return rc_value(c.rc) == 0

        wait_for(takes_clients, "n3 takes clients again")
        # n3 serves a client again (its claims are confirmed), the moved ones stay where they went.
        back = Paho(n3.addr, "part-back", v5=True)
        clients.append(back)
        wait_for(lambda: claim_of(n3, "part-back") == "confirmed", "n3 claims again")
        for cid in ("part-dev", "part-mover"):
            assert claim_of(n1, cid) == "confirmed", cid
            assert claim_of(n2, cid) is None and claim_of(n3, cid) is None, cid
        assert dev2.c.is_connected() and moved.c.is_connected()
        for w in watchers:
            w.no_message(timeout=2.0)  # the will once, not again when n3 came back
    finally:
        for c in clients + watchers:
            c.close()


def test_one_client_id_connecting_to_two_nodes_alternately_under_loss_is_kept_by_exactly_one(net, cluster):
    """15 % loss each way on n2's link to Kafka (its claims are written and read
    late, out of step with n1's). Per round, one client id connects to n1, n2, n1, n2, … (each
    waits only for its CONNACK; earlier connections stay open): in the end exactly one of them is
    connected, that node alone has a confirmed claim, every other one was told 0x8E, and the
    survivor works."""
    nodes = cluster(2, dead_after_ms=10000, heartbeat_ms=300)
    p, s = Paho(nodes[0].addr, "alt-probe-p"), Paho(nodes[1].addr, "alt-probe-s")
    connected(nodes[0], nodes[1], p, s)
    connected(nodes[1], nodes[0], s, p)
    p.close()
    s.close()
    net.impair(2, 15, delay_ms=5)
    for round_ in range(4):
        cid = f"alt-{round_}"
        made = []
        try:
            for k in range(6):
                c = Paho(nodes[k % 2].addr, cid, v5=True)
                c.node, c.reasons = k % 2, []
                made.append(c)
                assert rc_value(c.rc) == 0, (round_, k, c.rc)

            last = {}

            def settled():
                for c in made:  # paho's is_connected() stays true after a server's DISCONNECT
                    while not c.events.empty():
                        ev = c.events.get()
                        if ev[0] == "disconnect":
                            c.reasons.append(rc_value(ev[2]))
                claims = [claim_of(b, cid) for b in nodes]
                open_ = [c for c in made if not c.reasons]
                last.update(claims=claims, open=[(made.index(c), c.node) for c in open_],
                            reasons=[c.reasons for c in made])
                ok = len(open_) == 1 and sorted(map(str, claims)) == ["None", "confirmed"]
                return (claims, open_) if ok else None

            try:
                claims, open_ = wait_for(settled, f"round {round_}: one connection and one claim left", timeout=60)
            except AssertionError as e:
                raise AssertionError(f"{e}: claims on n1, n2 {last['claims']}; connected (index, node) "
                                     f"{last['open']}; reasons {last['reasons']}") from None
            winner = open_[0]
            assert claims[winner.node] == "confirmed", (round_, claims, winner.node)
            for c in made:
                if c is not winner:
                    assert c.reasons == [0x8E], (round_, made.index(c), c.reasons)
            winner.c.subscribe(f"{cid}/t", 1)  # not Paho.subscribe: it drops the events it skips
            winner.publish(f"{cid}/t", "ok", qos=1)
            assert winner.message(timeout=30).payload == b"ok"
            assert settled() is not None, f"round {round_}: the winner was closed too, or a claim changed"
            print(f"round {round_}: connection {made.index(winner)} (n{winner.node + 1}) kept")
        finally:
            for c in made:
                c.close()
    assert net.dropped(2) > 0, "the loss was not applied"
