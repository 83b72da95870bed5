"""A math-verify worker process: reads JSON tasks on stdin, writes JSON verdicts on its own pipe.

Started by `math_reward.MathVerifier` as `python -m megatron_archer.rewards.math_worker MEMORY_BYTES`.
math-verify's own timeouts use `signal.alarm`, which only works in a main thread, so they are off
here (`timeout_seconds=None`): the parent enforces a wall-clock limit per answer and kills a worker
that overruns. The address-space limit stops a runaway expression (9^9^9^9) from eating the host's
memory while the parent waits. Stray prints go to stderr so they cannot corrupt the protocol.

Protocol, one JSON object per line: the worker first writes {"ready": true}; then for each task
{"id", "gold", "answer"} it writes {"id", "equal": bool | null, "error": str | null}.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

PR_SET_PDEATHSIG = 1


def judge(gold: str, answer: str) -> dict:
    """Whether `answer` is mathematically equivalent to `gold`, both LaTeX or plain text."""
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    if not gold_parsed:
        return {"equal": None, "error": "could not parse the reference"}
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not answer_parsed:
        return {"equal": None, "error": "could not parse the answer"}
    return {"equal": bool(verify(gold_parsed, answer_parsed, timeout_seconds=None)), "error": None}


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, so no busy orphan outlives a crash."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9)
    except (OSError, AttributeError):  # not Linux: the parent's close() and stdin EOF still end it
        pass


def main() -> None:
    memory_bytes = int(sys.argv[1])
    _die_with_parent()
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    judge("1", "\\frac{2}{2}")  # import and warm up the LaTeX parser before declaring readiness
    protocol.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        task = json.loads(line)
        try:
            verdict = judge(task["gold"], task["answer"])
        except Exception as error:  # noqa: BLE001 - MemoryError, RecursionError...: reported to the caller
            verdict = {"equal": None, "error": f"{type(error).__name__}: {error}"[:200]}
        protocol.write(json.dumps({"id": task["id"], **verdict}) + "\n")


if __name__ == "__main__":
    main()
