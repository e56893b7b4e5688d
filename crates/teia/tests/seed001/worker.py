"""A seed 001 course worker, written from the seed's messages (as students' workers are):
discovers the master by UDP broadcast, registers, heartbeats, pulls ZIP tasks, runs
`main.py input.csv` in work/<task>/, and submits stdout.txt and stderr.txt zipped.

Each request is one JSON object on a new TCP connection, no newline. `--envelope typed`
wraps messages as {"type": ..., "data": {...}} instead of {"action": ..., ...}.
"""
import argparse, base64, io, json, os, socket, subprocess, sys, threading, time, uuid, zipfile

parser = argparse.ArgumentParser()
parser.add_argument("--discovery-port", type=int, required=True)
parser.add_argument("--broadcast", default="127.255.255.255")
parser.add_argument("--envelope", choices=["flat", "typed"], default="flat")
parser.add_argument("--work", required=True)
parser.add_argument("--idle-exit", type=int, default=10, help="NO_TASKS in a row before leaving")
parser.add_argument("--die-with-task", action="store_true", help="exit at once on the first task")
args = parser.parse_args()
peer_id = str(uuid.uuid4())


def wrap(action, **fields):
    if args.envelope == "typed":
        return {"type": action, "data": fields}
    return dict(action=action, **fields)


def unwrap(message):
    if "type" in message:
        return message["type"], message.get("data", {})
    return message.get("action") or message.get("status"), message


def discover():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    udp.settimeout(0.5)
    for _ in range(60):
        ask = wrap("DISCOVER_MASTER", peer_id=peer_id, port_tcp=0)
        udp.sendto(json.dumps(ask).encode(), (args.broadcast, args.discovery_port))
        try:
            data, _ = udp.recvfrom(1024)
        except socket.timeout:
            continue
        kind, fields = unwrap(json.loads(data))
        if kind == "MASTER_ANNOUNCE":
            return fields["master_ip"], fields["master_port"]
    sys.exit("no master answered")


def request(master, message):
    with socket.create_connection(master, timeout=30) as tcp:
        tcp.sendall(json.dumps(message).encode())
        data = b""
        while True:
            if data:
                try:
                    return json.loads(data)
                except ValueError:
                    pass
            more = tcp.recv(65536)
            if not more:
                return json.loads(data)
            data += more


def heartbeat(master):
    while True:
        time.sleep(1)
        try:
            request(master, wrap("HEARTBEAT", peer_id=peer_id))
        except OSError:
            pass


master = discover()
kind, _ = unwrap(request(master, wrap("REGISTER", peer_id=peer_id, addr=["127.0.0.1", 0])))
assert kind == "REGISTERED", kind
threading.Thread(target=heartbeat, args=(master,), daemon=True).start()
idle = 0
while idle < args.idle_exit:
    kind, fields = unwrap(request(master, wrap("REQUEST_TASK", peer_id=peer_id)))
    if kind != "TASK_PACKAGE":
        idle += 1
        time.sleep(0.3)
        continue
    idle = 0
    if args.die_with_task:
        os._exit(0)
    name = fields["task_name"]
    folder = os.path.join(args.work, name)
    os.makedirs(folder, exist_ok=True)
    zipfile.ZipFile(io.BytesIO(base64.b64decode(fields["task_data"]))).extractall(folder)
    run = subprocess.run([sys.executable, "main.py", "input.csv"], cwd=folder, capture_output=True)
    result = io.BytesIO()
    with zipfile.ZipFile(result, "w") as z:
        z.writestr("stdout.txt", run.stdout)
        z.writestr("stderr.txt", run.stderr)
    answer = request(master, wrap("SUBMIT_RESULT", peer_id=peer_id, result_name=name,
                                  result_data=base64.b64encode(result.getvalue()).decode()))
    assert unwrap(answer)[0] == "OK", answer
    print("done", name, flush=True)
