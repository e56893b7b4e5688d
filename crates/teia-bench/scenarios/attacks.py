#!/usr/bin/env python3
"""Attack scenarios against a `teia` binary, each printing the figure it measures.

    python3 crates/teia-bench/scenarios/attacks.py ./target/release/teia [SCENARIO ...]

Scenarios (all by default): redial (a --peer that accepts and closes at once, and a --peer
pointed at the rendezvous: dials per second and CPU), self (--peer at the node's own port:
CPU), peerlist (a plaintext peer claiming `teia` sends a PEER_LIST of 5 local ports:
connections made to each), memory (60 peers that never read, 30 KB PUBs for 15 s: peak RSS),
slots (256 silent connections, with and without an attacker reconnecting: time for a real
peer to link), course (50 SENDs and 10 PUBs to a client that keeps only the first line of each
read), killrecv (kill -9 of a receiver mid-burst, 7 runs: acknowledged messages never shown).
Only 127.0.0.1 is used; every process started is stopped at the end of its scenario. Run it
against an older build to compare.
"""
import json, os, socket, subprocess, sys, tempfile, threading, time

if len(sys.argv) < 2:
    raise SystemExit(__doc__)
TEIA = sys.argv[1]
WHICH = sys.argv[2:] or ["redial", "self", "peerlist", "memory", "slots", "course", "killrecv"]
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def cpu_percent(pid, seconds=10):
    """The CPU a process uses over the next `seconds`, in percent of one core."""
    before, start = cpu_seconds(pid), time.time()
    time.sleep(seconds)
    elapsed = time.time() - start
    return 100 * (cpu_seconds(pid) - before) / elapsed, elapsed


def hwm_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return 0


class Counter:
    """A listener that accepts, counts and closes at once."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        self.count = 0
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.count += 1
            c.close()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def node(name, *extra, data=None):
    data = data or tempfile.mkdtemp()
    p = subprocess.Popen(
        [TEIA, "node", "--json", "--name", name, "--namespace", "UnB", "--listen-ip", "127.0.0.1",
         "--data-dir", data, *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready = json.loads(p.stdout.readline())
    port = int(ready["listen"].rsplit(":", 1)[1]) if ready.get("listen") else 0
    events = []
    def pump():
        for line in p.stdout:
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    p.reader = reader
    return p, port, events


def stop(p):
    p.kill()
    p.wait()


def rendezvous():
    port = free_port()
    p = subprocess.Popen([TEIA, "rendezvous", "--listen", f"127.0.0.1:{port}", "--data-dir",
                          tempfile.mkdtemp()], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return p, port
        except OSError:
            time.sleep(0.05)
    raise SystemExit("no rendezvous")


def redial():
    rdv, rport = rendezvous()
    bad = Counter()
    p, _, events = node("alice", "--rendezvous", f"127.0.0.1:{rport}", "--peer", f"127.0.0.1:{bad.port}")
    time.sleep(2)
    n0 = bad.count
    cpu, dt = cpu_percent(p.pid)
    print(f"redial: peer that closes at once: {(bad.count - n0) / dt:.1f} dials/s, "
          f"{cpu:.1f} % CPU over {dt:.0f} s (total dials {bad.count}); "
          f"gave up events {sum(1 for e in events if e.get('event') == 'dial_gave_up')}")
    stop(p)
    p, _, events = node("bob", "--rendezvous", f"127.0.0.1:{rport}", "--peer", f"127.0.0.1:{rport}")
    time.sleep(2)
    cpu, dt = cpu_percent(p.pid)
    print(f"redial: --peer at the rendezvous: {cpu:.1f} % CPU over {dt:.0f} s")
    stop(p)
    stop(rdv)


def own():
    port = free_port()
    p = subprocess.Popen([TEIA, "node", "--json", "--name", "me", "--namespace", "UnB", "--listen-ip",
                          "127.0.0.1", "--port", str(port), "--peer", f"127.0.0.1:{port}",
                          "--data-dir", tempfile.mkdtemp()],
                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(3)
    cpu, dt = cpu_percent(p.pid)
    print(f"self: --peer its own address: {cpu:.1f} % CPU over {dt:.0f} s")
    stop(p)


def peerlist():
    rdv, rport = rendezvous()
    p, port, _ = node("alice", "--rendezvous", f"127.0.0.1:{rport}")
    targets = [Counter() for _ in range(5)]
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b'{"type":"HELLO","peer_id":"evil@UnB","version":"1.0","features":["ack","relay","who_has","metrics","teia"],"ttl":1}\n')
    time.sleep(0.5)
    peers = [{"peer_id": f"v{i}@UnB", "ip": "127.0.0.1", "port": t.port} for i, t in enumerate(targets)]
    s.sendall((json.dumps({"type": "PEER_LIST", "peers": peers, "ttl": 1}) + "\n").encode())
    time.sleep(15)
    print(f"peerlist: 5 ports from a plaintext 'teia' peer: {[t.count for t in targets]} connections each in 15 s")
    stop(p)
    stop(rdv)


def memory():
    rdv, rport = rendezvous()
    p, port, _ = node("alice", "--rendezvous", f"127.0.0.1:{rport}")
    base = hwm_mb(p.pid)
    clients = []
    for i in range(60):
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.sendall((json.dumps({"type": "HELLO", "peer_id": f"slow{i}@UnB", "features": ["ack"], "ttl": 1}) + "\n").encode())
        clients.append(c)
    time.sleep(1)
    text = "x" * 30000
    start = time.time()
    sent = 0
    while time.time() - start < 15:
        p.stdin.write(f"/pub #UnB {text}\n")
        sent += 1
        if sent % 20 == 0:
            p.stdin.flush()
            time.sleep(0.1)
    p.stdin.flush()
    time.sleep(2)
    peak = hwm_mb(p.pid)
    for c in clients:
        c.close()
    time.sleep(3)
    with open(f"/proc/{p.pid}/status") as f:
        rss = [l for l in f if l.startswith("VmRSS")][0].split()[1]
    print(f"memory: 60 non-reading peers, {sent} PUBs of 30 KB in 15 s: RSS peak {peak:.0f} MB "
          f"(from {base:.0f} MB), {int(rss) / 1024:.0f} MB after they left")
    stop(p)
    stop(rdv)


def slots():
    for churn in (False, True):
        rdv, rport = rendezvous()
        p, port, events = node("alice", "--rendezvous", f"127.0.0.1:{rport}")
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(256)]
        time.sleep(1)
        stop_flag = []
        def attack():
            while not stop_flag:
                try:
                    silent.append(socket.create_connection(("127.0.0.1", port), timeout=1))
                    if len(silent) > 300:
                        silent.pop(0).close()
                except OSError:
                    time.sleep(0.01)
        if churn:
            threading.Thread(target=attack, daemon=True).start()
        q, _, qevents = node("bob", "--rendezvous", f"127.0.0.1:{rport}", "--peer", f"127.0.0.1:{port}")
        t0 = time.time()
        while time.time() - t0 < 15 and not any(e.get("event") == "link_up" for e in qevents):
            time.sleep(0.05)
        up = any(e.get("event") == "link_up" for e in qevents)
        print(f"slots: 256 silent connections{', attacker reconnecting' if churn else ''}: real peer "
              f"{'linked in %.2f s' % (time.time() - t0) if up else 'locked out for 15 s'}")
        stop_flag.append(1)
        for c in silent:
            c.close()
        stop(q)
        stop(p)
        stop(rdv)


def course():
    rdv, rport = rendezvous()
    p, port, events = node("teia", "--rendezvous", f"127.0.0.1:{rport}", "--send-deadline", "20")
    c = socket.create_connection(("127.0.0.1", port))
    c.sendall(b'{"type":"HELLO","peer_id":"course@UnB","features":["ack"],"ttl":1}\n')
    c.recv(4096)
    shown_send, shown_pub, showings = set(), set(), 0
    def client():
        nonlocal showings
        c.settimeout(1)
        while True:
            try:
                data = c.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            first = data.split(b"\n")[0]
            try:
                m = json.loads(first)
            except ValueError:
                continue
            if m.get("type") == "SEND":
                showings += 1
                shown_send.add(m["msg_id"])
                c.sendall((json.dumps({"type": "ACK", "msg_id": m["msg_id"]}) + "\n").encode())
            elif m.get("type") == "PUB":
                shown_pub.add(m["payload"])
    threading.Thread(target=client, daemon=True).start()
    for i in range(50):
        p.stdin.write(f"/msg @course@UnB m{i}\n")
    for i in range(10):
        p.stdin.write(f"/pub #UnB p{i}\n")
    p.stdin.flush()
    time.sleep(1.5)
    first = len(shown_send)
    time.sleep(21)
    acked = sum(1 for e in events if e.get("event") == "ack")
    print(f"course: 50 SENDs + 10 PUBs to a first-line-only client: {first} shown before the first "
          f"retransmission, {len(shown_send)} distinct shown ({showings} showings), {acked} acked "
          f"by the deadline; {len(shown_pub)} of 10 PUBs shown")
    stop(p)
    stop(rdv)




def killrecv(runs=7):
    lost_runs = 0
    for run in range(runs):
        rdv, rport = rendezvous()
        adata, bdata = tempfile.mkdtemp(), tempfile.mkdtemp()
        a, aport, aev = node("alice", "--rendezvous", f"127.0.0.1:{rport}", data=adata)
        b, _, bev = node("bob", "--rendezvous", f"127.0.0.1:{rport}", "--peer", f"127.0.0.1:{aport}", data=bdata)
        t0 = time.time()
        while not any(e.get("event") == "link_up" for e in aev) and time.time() - t0 < 10:
            time.sleep(0.02)
        time.sleep(0.3)
        for i in range(60):
            a.stdin.write(f"/msg @bob@UnB m{i}\n")
        a.stdin.flush()
        while sum(1 for e in bev if e.get("event") == "message") < 5 and time.time() - t0 < 20:
            time.sleep(0.001)
        b.kill(); b.wait(); b.reader.join(5)
        shown = {e["msg_id"] for e in bev if e.get("event") == "message"}
        b2, _, bev2 = node("bob", "--rendezvous", f"127.0.0.1:{rport}", "--peer", f"127.0.0.1:{aport}", data=bdata)
        t1 = time.time()
        while time.time() - t1 < 25:
            acked = {e["msg_id"] for e in aev if e.get("event") == "ack"}
            if len(acked) >= 60:
                break
            time.sleep(0.2)
        time.sleep(1)
        acked = {e["msg_id"] for e in aev if e.get("event") == "ack"}
        shown |= {e["msg_id"] for e in bev2 if e.get("event") == "message"}
        lost = acked - shown
        if lost:
            lost_runs += 1
        print(f"  run {run}: {len(acked)} acked, {len(shown)} shown, {len(lost)} acknowledged but never shown")
        stop(b2); stop(a); stop(rdv)
    print(f"killrecv: {lost_runs} of {runs} runs lost an acknowledged message")


SCENARIOS = {"redial": redial, "self": own, "peerlist": peerlist, "memory": memory,
             "slots": slots, "course": course, "killrecv": killrecv}
for name in WHICH:
    SCENARIOS[name]()
