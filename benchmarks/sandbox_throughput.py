"""Reward throughput: sandboxed programs per second and math verifications per second.

    python -m benchmarks.sandbox_throughput [--programs 120] [--workers 2] [--rounds 3] [--math-calls 400]

Code: a trivial program (`print(1)`) and a typical stdin/stdout task (read 2,000 integers, sort
them, print a checksum) through `code_sandbox.run_many` on a pool of `--workers`, in the warm
sandbox pool ("bwrap", the default) and, as the baseline measured in the same run, with bubblewrap
launched per program ("bwrap_per_run", the earlier default). The two alternate, `--rounds` times
each, so that a change of the machine's load affects both; each rate is over all its rounds, and
the load average is printed before and after.

Math: `MathVerifier` end to end (extraction, worker round trip, the strict judge) at `--workers`
processes; and the judge alone in this process against math-verify's plain `parse` + `verify`
(the earlier worker's judge) on the same answers, which isolates the cost of the strict rules.
"""

from __future__ import annotations

import argparse
import os
import random
import time
import warnings

TRIVIAL = "print(1)"
TASK = ("import sys\nnums = sorted(map(int, sys.stdin.read().split()))\n"
        "print(sum(n * i for i, n in enumerate(nums)) % 1000003)")


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def _rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def code_rows(programs: int, workers: int, rounds: int) -> list[tuple[str, float, float, float, float]]:
    """(program, pool programs/s, per-run programs/s, lowest and highest per-round ratio)."""
    from megatron_archer.rewards.code_sandbox import BWRAP, BWRAP_PER_RUN, configure_sandbox, run_many

    configure_sandbox(BWRAP, workers=workers)
    rng = random.Random(0)
    stdin = " ".join(str(rng.randrange(10**6)) for _ in range(2000))
    jobs = {"trivial": [(TRIVIAL, "")] * programs, "stdin/stdout task": [(TASK, stdin)] * programs}
    for batch in jobs.values():  # warm up: probe, page cache, the pool's servers
        for sandbox in (BWRAP, BWRAP_PER_RUN):
            assert all(r.status == "ok" for r in run_many(batch[: workers * 2], sandbox=sandbox))
    rows = []
    for name, batch in jobs.items():
        seconds = {BWRAP: [], BWRAP_PER_RUN: []}
        for _ in range(rounds):
            for sandbox, times in seconds.items():
                start = time.perf_counter()
                assert all(r.status == "ok" for r in run_many(batch, sandbox=sandbox))
                times.append(time.perf_counter() - start)
        ratios = [old / new for new, old in zip(seconds[BWRAP], seconds[BWRAP_PER_RUN])]
        pool, per_run = (programs * rounds / sum(seconds[s]) for s in (BWRAP, BWRAP_PER_RUN))
        rows.append((name, pool, per_run, min(ratios), max(ratios)))
    return rows


MATH_CASES = [
    (r"The answer is \boxed{\frac{1}{2}}.", "0.5"), (r"<think>hmm</think> \boxed{42}", "42"),
    (r"\boxed{x = 3}", "3"), (r"\boxed{2\sqrt{3}}", r"\sqrt{12}"), (r"\boxed{0.333333}", r"\frac13"),
    (r"\boxed{\{1, 2, 3\}}", r"\{3, 2, 1\}"), (r"\boxed{(x+1)^2}", "x^2+2x+1"), (r"\boxed{10\%}", "0.1"),
]  # fmt: skip


def math_rows(calls: int, workers: int) -> tuple[float, float, float]:
    from math_verify import parse, verify

    from megatron_archer.rewards.answer_extraction import extract_final_answer
    from megatron_archer.rewards.math_reward import MathVerifier
    from megatron_archer.rewards.math_worker import judge

    cases = [MATH_CASES[i % len(MATH_CASES)] for i in range(calls)]
    with MathVerifier(num_workers=workers) as verifier:
        verifier.score([r for r, _ in cases[:workers * 2]], [g for _, g in cases[:workers * 2]])  # start workers
        end_to_end = _rate(lambda: verifier.score([r for r, _ in cases], [g for _, g in cases]), calls)
    pairs = [(gold, extract_final_answer(response).text) for response, gold in cases]

    def plain():
        for gold, answer in pairs:
            verify(parse(f"\\boxed{{{gold}}}", parsing_timeout=None),
                   parse(f"\\boxed{{{answer}}}", parsing_timeout=None), timeout_seconds=None)

    def strict():
        for gold, answer in pairs:
            judge(gold, answer)

    plain()
    return end_to_end, _rate(strict, calls), _rate(plain, calls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--programs", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--math-calls", type=int, default=400)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    import logging

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print(f"load average (1, 5, 15 min) before: {_load()}")
    print(f"code sandbox, programs/s ({args.programs} programs x {args.rounds} rounds; pool of {args.workers} "
          "workers)")
    print("| program | warm pool (bwrap) | bwrap per run | x | x per round |")
    print("|---|---|---|---|---|")
    for name, pool, per_run, low, high in code_rows(args.programs, args.workers, args.rounds):
        print(f"| {name} | {pool:.1f} | {per_run:.1f} | {pool / per_run:.2f} | {low:.2f}-{high:.2f} |")
    print(f"load average after: {_load()}")
    end_to_end, strict, plain = math_rows(args.math_calls, args.workers)
    print(f"\nmath: MathVerifier at {args.workers} workers: {end_to_end:.0f} calls/s")
    print(f"math judge in one process: strict {strict:.0f} calls/s, math-verify parse+verify {plain:.0f} calls/s "
          f"(x {strict / plain:.2f})")


if __name__ == "__main__":
    main()
