"""A scripted stand-in for SGLang's HTTP server on 127.0.0.1, in a thread, recording requests."""

from __future__ import annotations

import base64
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# a route's script: (path, body) -> (status, JSON answer); "drop" closes the connection unanswered
Script = Callable[[str, object], "tuple[int, object] | str"]


# the fake model's (num_hidden_layers, top_k), for routed experts
ROUTING_SHAPE = (3, 2)


def fake_routing(row: list[int], tokens: list[int]):
    """The experts the fake routes a sequence's tokens to: [len(row) + len(tokens) - 1 (every
    token but the last), layers, top_k] int32, distinct per token, layer and slot."""
    import torch

    count = len(row) + len(tokens) - 1
    return (torch.arange(count * ROUTING_SHAPE[0] * ROUTING_SHAPE[1], dtype=torch.int32)
            + row[0]).remainder(128).view(count, *ROUTING_SHAPE)


def fake_generate(body) -> list[dict]:
    """SGLang's /generate answer shape: each row generates its first prompt token + 1, twice;
    with ``return_routed_experts`` (later 0.5.x) ``meta_info.routed_experts`` as SGLang's
    tokenizer manager encodes it: base64 of the int32 array's bytes (``fake_routing``)."""
    out = []
    for row in body["input_ids"]:
        tokens = [row[0] + 1, row[0] + 1]
        meta = {"finish_reason": {"type": "length"},
                "output_token_logprobs": [[-0.5, t, None] for t in tokens]}
        if body.get("return_routed_experts"):
            data = fake_routing(row, tokens).numpy().tobytes()
            meta["routed_experts"] = base64.b64encode(data).decode("utf-8")
        out.append({"output_ids": tokens, "meta_info": meta})
    return out


class FakeServer:
    """``version``: what ``/get_server_info`` names; ``sessions``: whether it has the
    ``/begin_weight_update`` and ``/end_weight_update`` routes (a GET answers 405; 404 without),
    as later 0.5.x do. The engine's one-time protocol probe (these GETs) is answered here and not
    recorded; every other request goes to ``script``."""

    def __init__(self, script: Script, delay_s: float = 0.0, version: str = "0.5.5",
                 sessions: bool = False):
        self.requests: list[tuple[str, object]] = []
        server = self
        probes = {"/get_server_info": (200, {"version": version})}
        for route in ("/begin_weight_update", "/end_weight_update"):
            probes[route] = (405, {"detail": "Method Not Allowed"}) if sessions else (404, {})

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                if self.command == "GET" and self.path in probes:
                    return self._send(*probes[self.path])
                server.requests.append((self.path, body))
                time.sleep(delay_s)
                reply = script(self.path, body)
                if reply == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                self._send(*reply)

            def _send(self, status, answer):
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


def fast_policies(timeout_s: float = 2.0, attempts: int = 3, backoff_s: float = 0.05):
    """The engine's call policies with short timeouts, for fake servers on loopback."""
    from megatron_archer.rollout.http_client import RetryPolicy
    from megatron_archer.rollout.sglang_engine import CallPolicies

    retried = RetryPolicy(timeout_s=timeout_s, attempts=attempts, backoff_s=backoff_s)
    once = RetryPolicy(timeout_s=timeout_s, attempts=1, backoff_s=backoff_s, idempotent=False)
    return CallPolicies(generate=retried, control=retried, update=once, disk_update=once,
                        health=RetryPolicy(timeout_s=timeout_s, attempts=1))


def process_command(port: int, log: str, *, die_after: int | None = None,
                    die_once_file: str | None = None, hang: bool = False) -> list[str]:
    """A command line running this file as a server process on ``port`` (see ``main``)."""
    command = [sys.executable, os.path.abspath(__file__), "--port", str(port), "--log", log]
    if die_after is not None:
        command += ["--die-after", str(die_after), "--die-once-file", die_once_file]
    return command + (["--hang"] if hang else [])


def read_log(log: str) -> list[dict]:
    """The records a server process wrote: {"start": environ} once per start, then
    {"path": ..., "body": ...} per request."""
    with open(log) as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv=None) -> None:
    """A fake SGLang server in its own process (a stand-in for ``sglang.launch_server`` that a
    launched engine can restart): answers like ``ok_script``, appends its environment at start
    and every request to ``--log``; with ``--die-after N`` the process exits in the middle of
    its (N+1)-th ``/generate`` (the connection is dropped), once: ``--die-once-file`` marks it;
    with ``--hang`` as well it stops answering instead (every request from then on, ``/health``
    included, waits forever while the process lives on)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--die-after", type=int)
    parser.add_argument("--die-once-file")
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args(argv)
    lock, generates, hung = threading.Lock(), [0], threading.Event()
    dies = args.die_after is not None and not os.path.exists(args.die_once_file)

    def record(entry):
        with lock, open(args.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def script(path, body):
        record({"path": path, "body": body})
        if path == "/generate":
            with lock:
                generates[0] += 1
                dying = dies and generates[0] > args.die_after
            if dying:
                open(args.die_once_file, "w").close()
                if not args.hang:
                    os._exit(1)
                hung.set()
        if hung.is_set():
            threading.Event().wait()
        return ok_script(path, body)

    record({"start": dict(os.environ)})
    server = FakeServer(script)
    server.httpd.server_close()
    server.httpd = ThreadingHTTPServer(("127.0.0.1", args.port), server.httpd.RequestHandlerClass)
    server.httpd.serve_forever(poll_interval=0.05)


if __name__ == "__main__":
    main()
