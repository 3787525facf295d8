"""A real HTTP server on 127.0.0.1 for shard tests: serves a folder, and can misbehave on purpose.

``drops[name] = n`` makes the next n requests for ``name`` send the full Content-Length header
but only half the body, then close the connection (a connection dropped mid-shard).
``requests[name]`` counts the requests per file.
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    def do_GET(self):
        with self.server.lock:
            self.server.requests[self.path.lstrip("/")] += 1
        super().do_GET()

    def copyfile(self, source, outputfile):
        name = self.path.lstrip("/")
        server = self.server
        with server.lock:
            drop = server.drops.get(name, 0) > 0
            if drop:
                server.drops[name] -= 1
        if drop:
            data = source.read()
            outputfile.write(data[: len(data) // 2])
            self.close_connection = True
            return
        shutil.copyfileobj(source, outputfile)

    def log_message(self, format, *args):  # keep test output quiet
        pass


class ShardServer:
    def __init__(self, folder: Path):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
        self.httpd.lock = threading.Lock()
        self.httpd.requests = Counter()
        self.httpd.drops = {}
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    @property
    def requests(self) -> Counter:
        return self.httpd.requests

    @property
    def drops(self) -> dict:
        return self.httpd.drops

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
