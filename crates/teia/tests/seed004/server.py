"""Seed 004's own index server, for tests: doJoin, doSearch and doUpdate as the seed's
document prints them (verbatim, nested where `self` is in scope, as the document's
signatures imply), inside the smallest server the document describes around them: a thread
per connection, each request read with one recv(1024), dispatched by its method. A request
it cannot read raises in its thread, which then ends without an answer, as the seed's does.

Usage: server.py PORT    (prints READY once it listens on 127.0.0.1:PORT)
"""
import json
import os
import socket
import sys
import threading


class Server:
    def __init__(self, port):
        self.port = port
        self.listOfPeers = {}

    def handle(self, c, addr):
        def doJoin(c, addr, data):
            ## Executa a lógica de JOIN
            files = data['data']['filePath']
            self.listOfPeers[addr[1]] = os.listdir(files)
            print("Peer {}:{} adicionado com os arquivos {}".format(addr[0], addr[1], os.listdir(files)))
            c.send(b'JOIN_OK')

        def doSearch(c, addr, data):
            ## Busca o arquivo na lista de peers pelo nome e reporta os peers que correspondem a pesquisa
            search = data['data']['query']
            result = []
            print(search)
            print("Peer {}:{} solicitou arquivo {}".format(addr[0], addr[1], search))
            for key, values in self.listOfPeers.items():
                if search in values:
                    result.append(key)
            c.sendall(str(result).encode())

        def doUpdate(c, addr, data):
            ## Recebe, executa o UPDATE e retorna a resposta ao peer
            if 'data' in data and 'files' in data['data']:
                files = data['data']['files']
                self.listOfPeers[addr[1]] = files
                c.sendall(b'UPDATE_OK')
            else:
                print("Json Inválido")

        while True:
            request = c.recv(1024)
            if not request:
                break
            data = json.loads(request.decode())
            if data['method'] == 'JOIN':
                doJoin(c, addr, data)
            elif data['method'] == 'SEARCH':
                doSearch(c, addr, data)
            elif data['method'] == 'UPDATE':
                doUpdate(c, addr, data)
            sys.stdout.flush()

    def serve(self):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self.port))
        s.listen(16)
        print("READY", flush=True)
        while True:
            c, addr = s.accept()
            threading.Thread(target=self.handle, args=(c, addr), daemon=True).start()


if __name__ == "__main__":
    Server(int(sys.argv[1])).serve()
