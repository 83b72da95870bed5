"""JSON over HTTP to inference servers: a timeout per try, retries with exponential backoff only
where repeating the call is safe, and errors that name the server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ServerError(RuntimeError):
    """A server refused a request, or could not be reached within the retries. ``status``: the
    HTTP status of a refusal (e.g. 400), None otherwise."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ServerUnreachable(ServerError):
    """No answer at all (refused or dropped connection, timeout, 5xx, exited process): the server
    may be dead, hung or overloaded, which only a health check tells apart."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per request, sleeping ``backoff_s * 2**k`` between them; each try waits
    at most ``timeout_s`` for the answer. ``idempotent=False`` (weight updates, memory release and
    resume) repeats a call only when its connection was refused, so the server never saw it: a
    second ``/update_weights_from_distributed`` would wait for a broadcast that never comes."""

    timeout_s: float = 600.0
    attempts: int = 3
    backoff_s: float = 0.5
    idempotent: bool = True

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be positive")
        if self.attempts < 1:
            raise ValueError(f"attempts={self.attempts} must be >= 1")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s={self.backoff_s} must be >= 0")


def _never_delivered(error: BaseException) -> bool:
    """True when the request cannot have reached the server (its connection was refused)."""
    return isinstance(getattr(error, "reason", error), ConnectionRefusedError)


def request_json(
    url: str,
    path: str,
    payload: dict[str, Any] | None,
    policy: RetryPolicy,
    *,
    method: str = "POST",
    is_alive: Callable[[], bool] | None = None,
) -> Any:
    """Send ``payload`` to ``url + path``; the decoded JSON answer (None for an empty or non-JSON
    body). 4xx answers raise ServerError at once; connection failures, timeouts and 5xx answers
    are retried (for a non-idempotent call only a refused connection) and then raise
    ServerUnreachable. ``is_alive`` (a launched server's process check) turns a dead server into
    an immediate ServerUnreachable."""
    target = url.rstrip("/") + path
    body = None if payload is None else json.dumps(payload).encode()
    last = ""
    for attempt in range(policy.attempts):
        if is_alive is not None and not is_alive():
            raise ServerUnreachable(f"{url}: the server process has exited ({path} not sent)")
        request = urllib.request.Request(
            target, data=body, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=policy.timeout_s) as response:
                text = response.read().decode()
            try:
                return json.loads(text) if text else None
            except json.JSONDecodeError:
                return None
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")[:500]
            if error.code < 500:
                raise ServerError(f"{target}: HTTP {error.code}: {detail}", error.code) from error
            last, retry = f"HTTP {error.code}: {detail}", policy.idempotent
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            retry = policy.idempotent or _never_delivered(error)
        if not retry:
            raise ServerUnreachable(f"{target}: no answer ({last}); not retried: the call is not "
                                    f"safe to repeat")
        if attempt + 1 < policy.attempts:
            time.sleep(policy.backoff_s * 2**attempt)
    raise ServerUnreachable(f"{target}: no answer after {policy.attempts} attempts, last: {last}")


def has_route(url: str, path: str, policy: RetryPolicy) -> bool:
    """Whether the server serves ``path`` (a POST route answers a GET with 405 Method Not Allowed,
    an unknown one with 404), probed with a GET that changes nothing."""
    try:
        request_json(url, path, None, policy, method="GET")
    except ServerError as error:
        if error.status == 404:
            return False
        if error.status is None:
            raise
    return True
