"""A node of seed 000's distributed pytest network in the worker role, for tests, written
from the protocol (the seed document and the wire of the course group's implementation):
UDP datagrams of a 4-byte big-endian length then a JSON envelope
{"ip","port","cmd","data","timestamp"}, replies sent to the envelope's ip/port.

It joins through HOST (CONNECT, and takes the id CONNECT_REP gives), heartbeats its peers
every 3.5 s and sends a CACHE_UPDATE every 5 s; on PROJECT_ANNOUNCE it fetches
GET http://<ip>:<api_port>/file/<project_id> and unpacks it in its folder (as theirs, it
can run only projects announced to it); while idle it answers TASK_ANNOUNCE with
TASK_REQUEST; on TASK_SEND for a project it has, it confirms (TASK_CONFIRM), runs
`pytest <project>/tests/<module> --junitxml` and posts the counts of the first
<testsuite> to http://<ip>:<api_port>/task, as theirs.

Usage: worker.py HOST:PORT UDP_PORT FOLDER
Prints (flushed): JOINED <id>; FETCHED <project_id>; CONFIRMED <task_id>;
POSTED <task_id> <passed> <failed> <http status>.
"""
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import xml.etree.ElementTree as ElementTree
import zipfile


def say(*words):
    print(*words, flush=True)


class Worker:
    def __init__(self, host, udp_port, folder):
        self.host = (host.rsplit(":", 1)[0], int(host.rsplit(":", 1)[1]))
        self.udp_port = udp_port
        self.folder = folder
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", udp_port))
        self.id = None
        self.peers = {}
        self.working = False
        self.stats = {"failed": 0, "passed": 0, "projects": 0, "modules": 0,
                      "evaluations": [], "submitted_evaluation": []}
        self.lock = threading.Lock()

    def send(self, addr, cmd, data):
        body = json.dumps({"ip": "127.0.0.1", "port": self.udp_port, "cmd": cmd,
                           "data": data, "timestamp": time.time()}).encode()
        self.sock.sendto(struct.pack("!I", len(body)) + body, (addr[0], int(addr[1])))

    def receive(self, timeout):
        self.sock.settimeout(timeout)
        datagram, _ = self.sock.recvfrom(262144)
        (length,) = struct.unpack("!I", datagram[:4])
        return json.loads(datagram[4:4 + length].decode())

    def join(self):
        self.send(self.host, "CONNECT", {})
        deadline = time.time() + 5
        while time.time() < deadline:
            try:
                message = self.receive(deadline - time.time())
            except socket.timeout:
                break
            if message["cmd"] == "CONNECT_REP":
                self.id = message["data"]["given_id"]
                self.peers = {k: tuple(v) for k, v in message["data"]["peers"].items()}
                self.peers[message["data"]["id"]] = (message["ip"], message["port"])
                say("JOINED", self.id)
                return
        say("Connection timed out.")
        sys.exit(1)

    def fetch(self, message):
        data = message["data"]
        project_id = data["project_id"]
        url = "http://%s:%s/file/%s" % (message["ip"], data["api_port"], project_id)
        path = os.path.join(self.folder, project_id + ".zip")
        with urllib.request.urlopen(url, timeout=30) as answer, open(path, "wb") as out:
            out.write(answer.read())
        with zipfile.ZipFile(path) as archive:
            archive.extractall(self.folder)
        os.remove(path)
        say("FETCHED", project_id)

    def run(self, message, task_id, project_id, module):
        project = os.path.join(self.folder, project_id)
        report = os.path.join(project, "results_%s.xml" % module)
        subprocess.run([sys.executable, "-m", "pytest", os.path.join(project, "tests", module),
                        "--junitxml=" + report, "-p", "no:terminal", "-p", "no:cacheprovider"],
                       cwd=project, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=25)
        suite = ElementTree.parse(report).getroot().find("testsuite")
        tests, failures = int(suite.get("tests")), int(suite.get("failures"))
        errors, skipped = int(suite.get("errors")), int(suite.get("skipped"))
        passed, failed = tests - failures - errors - skipped, failures + errors
        body = json.dumps({"task_id": task_id, "passed": passed, "failed": failed,
                           "time": float(suite.get("time")), "project_id": project_id,
                           "module": module, "ip": "127.0.0.1",
                           "port": str(self.udp_port)}).encode()
        url = "http://%s:%s/task" % (message["ip"], message["data"]["info"]["api_port"])
        request = urllib.request.Request(url, data=body,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status = answer.status
        except urllib.error.HTTPError as error:
            status = error.code
        with self.lock:
            self.stats["passed"] += passed
            self.stats["failed"] += failed
            self.stats["modules"] += 1
            self.working = False
        say("POSTED", task_id, passed, failed, status)

    def handle(self, message):
        cmd, data = message["cmd"], message.get("data") or {}
        sender = (message["ip"], message["port"])
        if cmd == "HEARTBEAT":
            for peer_id, addr in data["peers"].items():
                if peer_id != self.id:
                    self.peers.setdefault(peer_id, tuple(addr))
            self.peers.setdefault(data["id"], sender)
        elif cmd == "PROJECT_ANNOUNCE":
            self.fetch(message)
        elif cmd == "TASK_ANNOUNCE":
            with self.lock:
                idle = not self.working
            if idle:
                self.send(sender, "TASK_REQUEST", {"id": self.id})
        elif cmd == "TASK_SEND":
            info = data["info"]
            project_id, module = info["project_id"], info["module"]
            with self.lock:
                if self.working or not os.path.isdir(os.path.join(self.folder, project_id)):
                    return
                self.working = True
            task_id = project_id + "::" + module
            self.send(sender, "TASK_CONFIRM", {"task_id": task_id})
            say("CONFIRMED", task_id)
            threading.Thread(target=self.run, args=(message, task_id, project_id, module),
                             daemon=True).start()

    def serve(self):
        beat = cache = 0.0
        while True:
            now = time.time()
            if now - beat >= 3.5:
                beat = now
                for addr in list(self.peers.values()):
                    self.send(addr, "HEARTBEAT", {"id": self.id, "peers": {
                        k: list(v) for k, v in self.peers.items()}})
            if now - cache >= 5:
                cache = now
                with self.lock:
                    stats = dict(self.stats)
                for addr in list(self.peers.values()):
                    self.send(addr, "CACHE_UPDATE", {
                        "addr": "127.0.0.1:%d" % self.udp_port,
                        "peers_ip": ["%s:%s" % a for a in self.peers.values()],
                        "evaluations": {}, "projects": {}, "stats": stats})
            try:
                self.handle(self.receive(0.2))
            except socket.timeout:
                pass


def main():
    worker = Worker(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    worker.join()
    worker.serve()


if __name__ == "__main__":
    main()
