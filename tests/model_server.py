"""A model download server on 127.0.0.1 for tests: serves bytes by path, honours Range
requests, can cut a transfer short, send slowly or answer 404, and records every request."""

from __future__ import annotations

import http.server
import threading


class ModelServer:
    """``files``: {"/name.pth": bytes}. ``cut_after``: close the connection after this many
    bytes of the next transfer (once). ``hits``: (path, Range header or None) per request."""

    def __init__(self, files: dict | None = None, ranges: bool = True, delay_s: float = 0.0):
        self.files = dict(files or {})
        self.ranges = ranges
        self.delay_s = delay_s  # pause after each KiB sent (a slow network)
        self.cut_after: int | None = None
        self.hits: list = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):  # noqa: N802 (http.server API)
                path = self.path.split("?")[0]
                rng = self.headers.get("Range")
                server.hits.append((path, rng))
                body = server.files.get(path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                if rng and server.ranges:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                part = body[start:]
                self.send_header("Content-Length", str(len(part)))
                self.end_headers()
                cut, server.cut_after = server.cut_after, None
                if cut is not None:
                    self.wfile.write(part[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                if not server.delay_s:
                    self.wfile.write(part)
                    return
                import time

                for i in range(0, len(part), 1024):
                    try:
                        self.wfile.write(part[i:i + 1024])
                        self.wfile.flush()
                    except OSError:  # the client went away (a cancelled download)
                        return
                    time.sleep(server.delay_s)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
