"""A seed 001 course master, written from the seed's messages (as students' masters are):
answers DISCOVER_MASTER on UDP with MASTER_ANNOUNCE, and on TCP (one JSON object per
connection, no newline) REGISTER, HEARTBEAT, REQUEST_TASK (the ZIPs of tasks/, base64) and
SUBMIT_RESULT (written to results/). `--envelope typed` answers {"type":...,"data":{...}}.
Prints `result NAME` when a result arrives.
"""
import argparse, base64, json, os, socket, socketserver, sys, threading

parser = argparse.ArgumentParser()
parser.add_argument("--discovery-port", type=int, required=True)
parser.add_argument("--tasks", required=True)
parser.add_argument("--results", required=True)
parser.add_argument("--envelope", choices=["flat", "typed"], default="flat")
args = parser.parse_args()
os.makedirs(args.results, exist_ok=True)
pending = sorted(f for f in os.listdir(args.tasks) if f.endswith(".zip"))
lock = threading.Lock()


def answer(name, key="status", **fields):
    if args.envelope == "typed":
        return {"type": name, "data": fields}
    return dict({key: name}, **fields)


def unwrap(message):
    if "type" in message:
        return message["type"], message.get("data", {})
    return message.get("action"), message


class Handler(socketserver.BaseRequestHandler):
    def handle(self):
        data = b""
        while True:
            more = self.request.recv(65536)
            if not more:
                return
            data += more
            try:
                message = json.loads(data)
                break
            except ValueError:
                continue
        kind, fields = unwrap(message)
        if kind == "REGISTER":
            reply = answer("REGISTERED")
        elif kind == "HEARTBEAT":
            reply = answer("ALIVE")
        elif kind == "REQUEST_TASK":
            with lock:
                name = pending.pop(0) if pending else None
            if name is None:
                reply = answer("NO_TASKS", key="action")
            else:
                with open(os.path.join(args.tasks, name), "rb") as f:
                    data = base64.b64encode(f.read()).decode()
                reply = answer("TASK_PACKAGE", key="action", task_name=name, task_data=data)
        elif kind == "SUBMIT_RESULT":
            name = fields["result_name"]
            with open(os.path.join(args.results, "result_" + name), "wb") as f:
                f.write(base64.b64decode(fields["result_data"]))
            print("result", name, flush=True)
            reply = answer("OK")
        else:
            reply = answer("ERROR")
        self.request.sendall(json.dumps(reply).encode())


server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
port = server.server_address[1]
threading.Thread(target=server.serve_forever, daemon=True).start()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
udp.bind(("0.0.0.0", args.discovery_port))
print("master listening", port, flush=True)
while True:
    data, sender = udp.recvfrom(1024)
    try:
        kind, _ = unwrap(json.loads(data))
    except ValueError:
        continue
    if kind == "DISCOVER_MASTER":
        reply = answer("MASTER_ANNOUNCE", key="action", master_ip="127.0.0.1", master_port=port)
        udp.sendto(json.dumps(reply).encode(), sender)
