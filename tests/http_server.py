"""A real HTTP server on 127.0.0.1 for download tests (no network needed): one payload, Range support,
and a scripted answer per request. Shared by the dataset and CLIP-weights download tests."""

import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FileServer:
    """Serves one payload at /<name>, with HTTP Range support; `plan` scripts each request's answer:
    "serve", "cut:N" (send N body bytes, then drop the connection), "full" (ignore Range), or a status code."""

    def __init__(self, payload: bytes, plan=()):
        self.payload, self.plan, self.requests = payload, list(plan), []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, "range": self.headers.get("Range")})
                action = server.plan.pop(0) if server.plan else "serve"
                if action.isdigit():
                    self.send_error(int(action))
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and action != "full":
                    start = int(match.group(1))
                    if start >= len(server.payload):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(server.payload)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(server.payload) - 1}/{len(server.payload)}")
                else:
                    self.send_response(200)
                body = server.payload[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if action.startswith("cut:"):
                    body = body[: int(action[4:])]
                self.wfile.write(body)
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def url(self, name="file.bin") -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
