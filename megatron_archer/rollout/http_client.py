"""JSON over HTTP to inference servers, with a timeout, retries with exponential backoff, and
errors that name the server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ServerError(RuntimeError):
    """A server refused a request, or could not be reached within the retries."""


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries per request, sleeping ``backoff_s * 2**k`` between them; each try
    waits at most ``timeout_s`` for the answer."""

    timeout_s: float = 600.0
    attempts: int = 3
    backoff_s: float = 0.5

    def __post_init__(self):
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be positive")
        if self.attempts < 1:
            raise ValueError(f"attempts={self.attempts} must be >= 1")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s={self.backoff_s} must be >= 0")


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
    body). Connection failures, timeouts and 5xx answers are retried; 4xx answers are not.
    ``is_alive`` (a launched server's process check) turns a dead server into an immediate error.
    """
    target = url.rstrip("/") + path
    body = None if payload is None else json.dumps(payload).encode()
    last = ""
    for attempt in range(policy.attempts):
        if is_alive is not None and not is_alive():
            raise ServerError(f"{url}: the server process has exited ({path} not sent)")
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
                raise ServerError(f"{target}: HTTP {error.code}: {detail}") from error
            last = f"HTTP {error.code}: {detail}"
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
            last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        if attempt + 1 < policy.attempts:
            time.sleep(policy.backoff_s * 2**attempt)
    raise ServerError(f"{target}: no answer after {policy.attempts} attempts, last: {last}")
