"""A scripted stand-in for SGLang's HTTP server on 127.0.0.1, in a thread, recording requests."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# a route's script: (path, body) -> (status, JSON answer); "drop" closes the connection unanswered
Script = Callable[[str, object], "tuple[int, object] | str"]


def fake_generate(body) -> list[dict]:
    """SGLang's /generate answer shape: each row generates its first prompt token + 1, twice."""
    out = []
    for row in body["input_ids"]:
        tokens = [row[0] + 1, row[0] + 1]
        out.append({
            "output_ids": tokens,
            "meta_info": {
                "finish_reason": {"type": "length"},
                "output_token_logprobs": [[-0.5, t, None] for t in tokens],
            },
        })  # fmt: skip
    return out


class FakeServer:
    def __init__(self, script: Script, delay_s: float = 0.0):
        self.requests: list[tuple[str, object]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                server.requests.append((self.path, body))
                time.sleep(delay_s)
                reply = script(self.path, body)
                if reply == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                status, answer = reply
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def ok_script(path, body):
    if path == "/generate":
        return 200, fake_generate(body)
    return 200, {"success": True, "message": "ok"}
