"""A local HTTP file server for download tests: Range support, scripted failures, slow and trickling answers."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """HTTP/1.0 server on 127.0.0.1 with Range support and scripted misbehaviour; records every request."""

    PIECE = 16 * 1024

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.fail_first = 0  # answer 500 to this many requests
        self.drop_first = 0  # send half the body to this many requests, then close the connection
        self.ignore_range = False  # answer 200 with the whole file even to a Range request
        self.delay = 0.0  # seconds to sleep per 16 KiB piece
        self.trickle = 0.0  # > 0: after `trickle_after` bytes of a response, send one byte every `trickle` s
        self.trickle_after = 0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, name: str = "cifar-10-python.tar.gz") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def gets(self) -> list[dict]:
        with self._lock:
            return list(self.requests)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep the test output quiet
                pass

            def do_GET(self) -> None:  # noqa: N802
                record = {"path": self.path, "range": self.headers.get("Range"), "status": None, "sent": 0}
                with server._lock:
                    server.requests.append(record)
                    n = len(server.requests)
                body = server.files.get(self.path.lstrip("/"))
                if body is None:
                    record["status"] = 404
                    self.send_error(404)
                    return
                if n <= server.fail_first:
                    record["status"] = 500
                    self.send_error(500)
                    return
                start, status = 0, 200
                rng = record["range"]
                if rng and not server.ignore_range:
                    start = int(rng.removeprefix("bytes=").rstrip("-"))
                    if start >= len(body):
                        record["status"] = 416
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    status = 206
                record["status"] = status
                self.send_response(status)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body) - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.end_headers()
                end = len(body)
                if n <= server.drop_first:
                    end = start + (len(body) - start) // 2
                try:
                    if server.trickle:
                        fast = min(end, start + server.trickle_after)
                        self.wfile.write(body[start:fast])
                        self.wfile.flush()
                        record["sent"] += fast - start
                        for i in range(fast, end):
                            time.sleep(server.trickle)
                            self.wfile.write(body[i : i + 1])
                            self.wfile.flush()
                            record["sent"] += 1
                    else:
                        for i in range(start, end, server.PIECE):
                            piece = body[i : min(i + server.PIECE, end)]
                            self.wfile.write(piece)
                            record["sent"] += len(piece)
                            if server.delay:
                                time.sleep(server.delay)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (Ctrl-C test)
                self.close_connection = True

        return Handler
