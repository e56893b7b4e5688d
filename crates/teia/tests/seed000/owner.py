"""A node of seed 000's distributed pytest network in the owner role, for tests, written
from the protocol (the seed document and the wire of the course group's implementation):
UDP datagrams of a 4-byte big-endian length then a JSON envelope
{"ip","port","cmd","data","timestamp"}, replies sent to the envelope's ip/port; projects and
results over HTTP (GET /file/<project_id>, a ZIP of the folder <project_id>/; POST /task).

It answers CONNECT with CONNECT_REP (a new 21-digit id, kept for the same ip:port),
heartbeats its peers every 3.5 s, and once a peer has joined it submits the project: one
task per file of tests/, a PROJECT_ANNOUNCE to every peer, TASK_ANNOUNCE every 3 s while
tasks wait, TASK_SEND on TASK_REQUEST, and a module counts only when TASK_CONFIRM came
from the node it was sent to (a task not confirmed in 5 s, or not finished 40 s after its
confirm, or whose worker is silent for 21 s, waits again). It runs no module itself.

Usage: owner.py UDP_PORT HTTP_PORT PROJECT_DIR [FAILURE_AFTER]
(FAILURE_AFTER: seconds of silence after which a node is failed; 21 by default, as theirs.)
Prints (flushed): READY; CONNECT <addr> <id>; CONFIRM <task_id> <addr>;
RESULT <task_id> <passed> <failed>; REFUSED <task_id>; CACHE <addr> <passed> <failed>;
REQUEUED <task_id>; DONE <passed> <failed>.
"""
import http.server
import io
import json
import os
import random
import socket
import struct
import sys
import threading
import time
import zipfile

HEARTBEAT_INTERVAL = 3.5
FAILURE_AFTER = float(sys.argv[4]) if len(sys.argv) > 4 else 21
ANNOUNCE_EVERY = 3
CONFIRM_WAIT = 5
TASK_TIMEOUT = 40

lock = threading.RLock()


def say(*words):
    print(*words, flush=True)


def new_id():
    return str(int(time.time() * 1e6)) + str(random.randint(10000, 99999))


class Owner:
    def __init__(self, udp_port, http_port, project_dir):
        self.udp_port = udp_port
        self.http_port = http_port
        self.project_dir = project_dir
        self.id = new_id()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", udp_port))
        self.peers = {}  # id -> (ip, port)
        self.heard = {}  # id -> time
        self.project_id = None
        self.queue = []
        self.expecting_confirm = {}  # task_id -> (time, addr)
        self.responsible = {}  # task_id -> (addr, time)
        self.results = {}  # module -> (passed, failed)
        self.modules = sorted(
            f for f in os.listdir(os.path.join(project_dir, "tests"))
            if f.startswith("test_") and f.endswith(".py"))
        self.cache = {}

    def send(self, addr, cmd, data):
        body = json.dumps({"ip": "127.0.0.1", "port": self.udp_port, "cmd": cmd,
                           "data": data, "timestamp": time.time()}).encode()
        self.sock.sendto(struct.pack("!I", len(body)) + body, (addr[0], int(addr[1])))

    def submit(self):
        self.project_id = str(time.time()) + self.id
        self.queue = [(self.project_id, m) for m in self.modules]
        announce = {"project_id": self.project_id, "api_port": str(self.http_port),
                    "project_name": "calc", "eval_id": self.id + "1", "url": None,
                    "token": None, "type": 0}
        for addr in list(self.peers.values()):
            self.send(addr, "PROJECT_ANNOUNCE", announce)

    def handle(self, message):
        cmd = message["cmd"]
        data = message.get("data") or {}
        addr = (message["ip"], message["port"])
        if cmd == "CONNECT":
            given = next((i for i, a in self.peers.items() if tuple(a) == addr), None)
            if given is None:
                given = new_id()
            self.send(addr, "CONNECT_REP", {"peers": dict(self.peers), "id": self.id,
                                             "given_id": given})
            self.peers[given] = addr
            self.heard[given] = time.time()
            say("CONNECT", "%s:%s" % addr, given)
        elif cmd == "HEARTBEAT":
            self.heard[data["id"]] = time.time()
            self.peers.setdefault(data["id"], addr)
            if self.project_id is None:
                self.submit()
        elif cmd == "CACHE_UPDATE":
            stats = data["stats"]
            seen = (stats["passed"], stats["failed"])
            if self.cache.get(data["addr"]) != seen:
                self.cache[data["addr"]] = seen
                say("CACHE", data["addr"], stats["passed"], stats["failed"])
        elif cmd == "TASK_REQUEST":
            if self.queue:
                project_id, module = self.queue.pop(0)
                task_id = project_id + "::" + module
                self.expecting_confirm[task_id] = (time.time(), addr)
                self.send(addr, "TASK_SEND", {"id": self.id, "info": {
                    "project_id": project_id, "module": module, "project_name": "calc",
                    "api_port": str(self.http_port), "eval_id": self.id + "1",
                    "url": None, "token": None, "type": "zip"}})
        elif cmd == "TASK_CONFIRM":
            task_id = data["task_id"]
            sent = self.expecting_confirm.pop(task_id, None)
            if sent is not None and tuple(sent[1]) == addr:
                self.responsible[task_id] = (addr, time.time())
                say("CONFIRM", task_id, "%s:%s" % addr)

    def result(self, body):
        task_id = body["task_id"]
        with lock:
            if task_id not in self.responsible:
                say("REFUSED", task_id)
                return False
            del self.responsible[task_id]
            module = task_id.split("::")[1]
            self.results[module] = (int(body["passed"]), int(body["failed"]))
            say("RESULT", task_id, body["passed"], body["failed"])
            if len(self.results) == len(self.modules):
                say("DONE", sum(p for p, _ in self.results.values()),
                    sum(f for _, f in self.results.values()))
            return True

    def tick(self, state):
        now = time.time()
        if now - state["beat"] >= HEARTBEAT_INTERVAL:
            state["beat"] = now
            for addr in list(self.peers.values()):
                self.send(addr, "HEARTBEAT", {"id": self.id, "peers": dict(self.peers)})
        if self.queue and now - state["announce"] >= ANNOUNCE_EVERY:
            state["announce"] = now
            for addr in list(self.peers.values()):
                self.send(addr, "TASK_ANNOUNCE", {"id": self.id})
        for task_id, (sent, _) in list(self.expecting_confirm.items()):
            if now - sent > CONFIRM_WAIT:
                del self.expecting_confirm[task_id]
                self.requeue(task_id)
        for task_id, (addr, confirmed) in list(self.responsible.items()):
            silent = [i for i, a in self.peers.items()
                      if tuple(a) == tuple(addr) and now - self.heard.get(i, now) > FAILURE_AFTER]
            if now - confirmed > TASK_TIMEOUT or silent:
                del self.responsible[task_id]
                self.requeue(task_id)
        for peer_id in [i for i, t in self.heard.items() if now - t > FAILURE_AFTER]:
            self.peers.pop(peer_id, None)
            self.heard.pop(peer_id, None)

    def requeue(self, task_id):
        project_id, module = task_id.split("::")
        self.queue.insert(0, (project_id, module))
        say("REQUEUED", task_id)

    def serve_udp(self):
        self.sock.settimeout(0.2)
        state = {"beat": 0.0, "announce": 0.0}
        while True:
            try:
                datagram, _ = self.sock.recvfrom(262144)
                (length,) = struct.unpack("!I", datagram[:4])
                message = json.loads(datagram[4:4 + length].decode())
                with lock:
                    self.handle(message)
            except socket.timeout:
                pass
            with lock:
                self.tick(state)

    def zip_project(self, project_id):
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
            for root, dirs, files in os.walk(self.project_dir):
                dirs[:] = [d for d in dirs if "cache" not in d.lower()]
                for name in files:
                    if "cache" in name.lower():
                        continue
                    path = os.path.join(root, name)
                    relative = os.path.relpath(path, self.project_dir)
                    archive.write(path, os.path.join(project_id, relative))
        return out.getvalue()


def http_handler(owner):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body, content_type="application/json"):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/file/" + str(owner.project_id):
                data = owner.zip_project(owner.project_id)
                self.reply(200, data, "application/zip")
            else:
                self.reply(404, b'{"error": "File not found"}')

        def do_POST(self):
            if self.path != "/task" or self.headers.get("Content-Type") != "application/json":
                self.reply(400, b'{"error": "Invalid content type"}')
                return
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if owner.result(body):
                self.reply(200, b'{"status": "success"}')
            else:
                self.reply(500, json.dumps({"error": repr(body["task_id"])}).encode())

    return Handler


def main():
    udp_port, http_port, project_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    owner = Owner(udp_port, http_port, project_dir)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", http_port), http_handler(owner))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say("READY")
    owner.serve_udp()


if __name__ == "__main__":
    main()
