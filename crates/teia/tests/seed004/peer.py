"""A course peer of seed 004 (Napster), written from the seed's messages, for tests.

It speaks as the seed's code does: one JSON object per send, no newline, answers read
with recv. Modes:

  join INDEX_HOST INDEX_PORT PORT FOLDER QUERY...
      listens on PORT, joins the index from PORT with FOLDER (seed's JOIN filePath),
      then for each QUERY prints the index's SEARCH answer; "UPDATE:a,b" sends an UPDATE
      and "RAW:text" sends text as is; prints "READY" and serves downloads until killed.
  download HOST PORT FILENAME OUTDIR
      asks HOST:PORT for FILENAME (DOWNLOAD_REQUEST) and saves it in OUTDIR; prints the
      statuses, then "SAVED n" with the bytes saved.
"""
import json
import os
import socket
import sys
import threading


def serve(listener, folder):
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=upload, args=(conn, folder), daemon=True).start()


def upload(conn, folder):
    # callUpload, approving every request ("SIM").
    try:
        request = json.loads(conn.recv(1024).decode())
        filename = request["data"]["filename"]
        if filename in os.listdir(folder):
            path = os.path.join(folder, filename)
            conn.send(json.dumps({"status": "OK", "fileSize": os.path.getsize(path)}).encode())
            import time
            time.sleep(0.1)
            conn.send(json.dumps({"status": "downloadAccepted"}).encode())
            time.sleep(0.1)
            with open(path, "rb") as f:
                while True:
                    data = f.read(65536)
                    if not data:
                        break
                    conn.sendall(data)
        else:
            conn.send(json.dumps({"status": "fileNotFound"}).encode())
    finally:
        conn.close()


def join(index_host, index_port, port, folder, queries):
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen()
    threading.Thread(target=serve, args=(listener, folder), daemon=True).start()
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    server.bind(("127.0.0.1", port))
    server.connect((index_host, index_port))
    server.sendall(json.dumps({"method": "JOIN", "data": {"filePath": folder}}).encode())
    print("JOIN", server.recv(1024).decode(), flush=True)
    for query in queries:
        if query.startswith("UPDATE:"):
            files = query[len("UPDATE:"):].split(",")
            server.sendall(json.dumps({"method": "UPDATE", "data": {"files": files}}).encode())
            print("UPDATE", server.recv(1024).decode(), flush=True)
        elif query.startswith("RAW:"):
            server.sendall(query[len("RAW:"):].encode())
            print("RAW", server.recv(1024).decode(), flush=True)
        else:
            message = '{"method":"SEARCH","data":{"query":"%s"}}' % query
            server.sendall(message.encode())
            print("SEARCH", query, server.recv(1024).decode(), flush=True)
    print("READY", flush=True)
    threading.Event().wait()


def download(host, port, filename, outdir):
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    peer.connect((host, port))
    message = json.dumps({"method": "DOWNLOAD_REQUEST", "data": {"filename": filename, "port": port}})
    peer.sendall(message.encode())
    data = json.loads(peer.recv(1024).decode())
    print("STATUS", data["status"], flush=True)
    if data["status"] != "OK":
        return
    size = data["fileSize"]
    decision = json.loads(peer.recv(1024).decode())
    print("DECISION", decision["status"], flush=True)
    if decision["status"] != "downloadAccepted":
        return
    received = 0
    with open(os.path.join(outdir, os.path.basename(filename)), "wb") as f:
        while received < size:
            chunk = peer.recv(min(1 << 20, size - received))
            if not chunk:
                break
            f.write(chunk)
            received += len(chunk)
    print("SAVED", received, flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "join":
        join(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6:])
    elif mode == "download":
        download(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
