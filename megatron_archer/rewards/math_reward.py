"""Math reward: 1 when the response's final answer is equivalent to the reference, else 0.

The final answer is extracted here (`answer_extraction`: after the last `</think>`, outside code
blocks); equivalence is decided by math-verify, made strict (`math_worker.judge`: relations are
not reduced to a side, decimals are exact unless a relative tolerance is asked for), in
a small pool of worker processes (`math_worker`), one answer at a time per worker, each under a
wall-clock limit. A worker that overruns is killed and replaced, and its answer scores 0 with a
"timed out" reason, so one pathological expression costs at most the limit and never blocks the
batch. The pool starts on first use, is reused across calls and is closed by `close()` (or at exit).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

from megatron_archer.rewards.answer_extraction import extract_final_answer, last_boxed
from megatron_archer.rewards.result import RewardResult, quote


class _Worker:
    """One `math_worker` process, the task it is on and when that task's time runs out."""

    def __init__(self, memory_bytes: int, options: dict) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_archer.rewards.math_worker", str(memory_bytes), json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.started = time.monotonic()
        self.ready = False
        self.task: int | None = None
        self.deadline = 0.0
        self._buffer = b""

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def send(self, task: int, gold: str, answer: str, timeout_s: float) -> None:
        self.task = task
        self.deadline = time.monotonic() + timeout_s
        try:
            self.proc.stdin.write((json.dumps({"id": task, "gold": gold, "answer": answer}) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError:  # it died: the next read sees end-of-file and replaces it
            pass

    def receive(self) -> list[dict] | None:
        """Messages now readable, or None when the worker has exited."""
        data = os.read(self.fileno(), 1 << 16)
        if not data:
            return None
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        return [json.loads(line) for line in lines]

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


class MathVerifier:
    """Scores responses against reference answers with math-verify in `num_workers` processes.

    `timeout_s` bounds the verification of each answer (parsing both sides and comparing);
    `memory_bytes` is each worker's address-space limit. What counts (each defaults to the strict
    choice):
    - `after_think`: only the text after the last `</think>` is searched for the answer (an
      unclosed `<think>` means no answer);
    - `skip_code_blocks`: boxes inside fenced code blocks are ignored;
    - `reduce_relations`: False keeps a chained equation or inequality (`5 = 7`) from matching
      the value on its last side (a reference that is itself a relation is compared as one;
      `x = 3` still matches 3);
    - `relative_tolerance`: None compares numbers exactly (0.75 matches 3/4; 0.333333 does not
      match 1/3, 3.141593 not pi); a value r also accepts |answer - gold| <= r |gold|, for
      datasets whose reference answers are themselves rounded.
    Thread-safe; use as a context manager or call `close()` to stop the workers.
    """

    def __init__(
        self,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        memory_bytes: int = 4 << 30,
        startup_timeout_s: float = 120.0,
        after_think: bool = True,
        skip_code_blocks: bool = True,
        reduce_relations: bool = False,
        relative_tolerance: float | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if relative_tolerance is not None and not 0 < relative_tolerance < 1:
            raise ValueError(f"relative_tolerance must be None or in (0, 1), got {relative_tolerance}")
        self.after_think, self.skip_code_blocks = after_think, skip_code_blocks
        self.options = {"reduce_relations": reduce_relations, "relative_tolerance": relative_tolerance}
        self.num_workers = num_workers
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def __call__(self, response: str, reference: str) -> RewardResult:
        return self.score([response], [reference])[0]

    def __enter__(self) -> MathVerifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def score(self, responses: Sequence[str], references: Sequence[str]) -> list[RewardResult]:
        """One RewardResult per (response, reference) pair, in order."""
        if len(responses) != len(references):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        results: list[RewardResult | None] = [None] * len(responses)
        tasks: deque[tuple[int, str, str, str]] = deque()
        for i, (response, reference) in enumerate(zip(responses, references)):
            final = extract_final_answer(response, self.after_think, self.skip_code_blocks)
            if final is None:
                results[i] = RewardResult(0.0, "no final answer found in the response")
            else:
                gold = last_boxed(reference) or reference.strip()
                tasks.append((i, gold, final.text, final.source))
        if tasks:
            with self._lock:
                self._run(tasks, results)
        return results  # type: ignore[return-value]  # every slot is filled

    def close(self) -> None:
        """Stop the workers; a later `score` starts new ones."""
        with self._lock:
            for worker in self._workers:
                worker.kill()
            self._workers.clear()

    def _run(self, tasks: deque[tuple[int, str, str, str]], results: list[RewardResult | None]) -> None:
        """Feed `tasks` to idle workers, collect verdicts, and kill workers past their deadline."""
        self._workers = [w for w in self._workers if w.proc.poll() is None]
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.memory_bytes, self.options))
        by_id = {task[0]: task for task in tasks}
        try:
            while tasks or any(w.task is not None for w in self._workers):
                self._step(tasks, results, by_id)
        except BaseException:  # leave no worker holding a task of an abandoned call
            for worker in self._workers:
                worker.kill()
            self._workers.clear()
            raise

    def _step(self, tasks: deque, results: list[RewardResult | None], by_id: dict) -> None:
        for worker in self._workers:
            if worker.ready and worker.task is None and tasks:
                i, gold, answer, _ = tasks.popleft()
                worker.send(i, gold, answer, self.timeout_s)
        wake = [w.deadline for w in self._workers if w.task is not None]
        wake += [w.started + self.startup_timeout_s for w in self._workers if not w.ready]
        readable, _, _ = select.select(self._workers, [], [], max(0.0, min(wake) - time.monotonic()))
        for worker in readable:
            messages = worker.receive()
            if messages is None:
                self._replace(worker, results, by_id, "the verifier process died")
                continue
            for message in messages:
                if message.get("ready"):
                    worker.ready = True
                else:
                    results[message["id"]] = _verdict(by_id[message["id"]], message)
                    worker.task = None
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.task is not None and now >= worker.deadline:
                self._replace(worker, results, by_id, f"timed out after {self.timeout_s:g} s")
            elif not worker.ready and now >= worker.started + self.startup_timeout_s:
                raise RuntimeError(
                    f"a math-verify worker did not start within {self.startup_timeout_s:g} s "
                    "(is math-verify[antlr4_13_2] installed in this Python?)"
                )

    def _replace(self, worker: _Worker, results: list[RewardResult | None], by_id: dict, why: str) -> None:
        """Kill `worker`, score its task 0 because of `why`, and start a fresh worker in its place."""
        if not worker.ready:
            raise RuntimeError(
                f"a math-verify worker exited during startup with code {worker.proc.poll()} "
                "(see its traceback above)"
            )
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.memory_bytes, self.options)
        if worker.task is not None:
            answer = by_id[worker.task][2]
            results[worker.task] = RewardResult(0.0, f"{why} verifying {quote(answer)}")


def _verdict(task: tuple[int, str, str, str], message: dict) -> RewardResult:
    _, gold, answer, source = task
    quoted = f"{quote(answer)} ({source})"
    if message["error"] is not None:
        return RewardResult(0.0, f"{message['error']}: {quoted} vs reference {quote(gold)}")
    why = f" ({message['why']})" if message.get("why") else ""
    if message["equal"]:
        return RewardResult(1.0, f"correct: {quoted} equals {quote(gold)}{why}")
    return RewardResult(0.0, f"wrong: {quoted} differs from {quote(gold)}{why}")


_default: MathVerifier | None = None
_default_lock = threading.Lock()


def math_reward(response: str, reference: str) -> RewardResult:
    """Score one response with a shared `MathVerifier` (2 workers, 5 s per answer), closed at exit."""
    global _default
    with _default_lock:
        if _default is None:
            _default = MathVerifier()
            atexit.register(_default.close)
    return _default(response, reference)
