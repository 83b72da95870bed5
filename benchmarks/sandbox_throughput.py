"""Reward throughput: sandboxed programs per second and math verifications per second.

    python -m benchmarks.sandbox_throughput [--programs 120] [--workers 2] [--math-calls 400]

Code: a trivial program (`print(1)`) and a typical stdin/stdout task (read 2,000 integers, sort
them, print a checksum) through `code_sandbox.run_many` on a pool of `--workers`, in the bwrap
sandbox and, as the baseline measured in the same run, today's launcher (`in_process`, the
earlier design) on the same pool and one run at a time (as `run_cases` ran its cases before).

Math: `MathVerifier` end to end (extraction, worker round trip, the strict judge) at `--workers`
processes; and the judge alone in this process against math-verify's plain `parse` + `verify`
(the earlier worker's judge) on the same answers, which isolates the cost of the strict rules.
"""

from __future__ import annotations

import argparse
import random
import time
import warnings

TRIVIAL = "print(1)"
TASK = ("import sys\nnums = sorted(map(int, sys.stdin.read().split()))\n"
        "print(sum(n * i for i, n in enumerate(nums)) % 1000003)")


def _rate(fn, count: int) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def code_rows(programs: int, workers: int) -> list[tuple[str, float, float]]:
    from megatron_archer.rewards.code_sandbox import configure_sandbox, run_many

    configure_sandbox("bwrap", workers=workers)
    rng = random.Random(0)
    stdin = " ".join(str(rng.randrange(10**6)) for _ in range(2000))
    jobs = {"trivial": [(TRIVIAL, "")] * programs, "stdin/stdout task": [(TASK, stdin)] * programs}
    for batch in jobs.values():  # warm up: probe, page cache
        assert all(r.status == "ok" for r in run_many(batch[:4], sandbox="bwrap"))
        assert all(r.status == "ok" for r in run_many(batch[:4], sandbox="in_process"))
    rows = []
    for name, batch in jobs.items():
        new = _rate(lambda batch=batch: run_many(batch, sandbox="bwrap"), programs)
        old_pool = _rate(lambda batch=batch: run_many(batch, sandbox="in_process"), programs)
        configure_sandbox("bwrap", workers=1)
        old_serial = _rate(lambda batch=batch: run_many(batch, sandbox="in_process"), programs)
        configure_sandbox("bwrap", workers=workers)
        rows.append((name, new, old_pool, old_serial))
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
    parser.add_argument("--math-calls", type=int, default=400)
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # the in_process baseline's warning
    import logging

    logging.getLogger("megatron_archer.rewards.code_sandbox").setLevel(logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    print(f"code sandbox, programs/s ({args.programs} programs; pool of {args.workers} workers unless noted)")
    print("| program | bwrap | in_process, same pool | x | in_process, one at a time | x |")
    print("|---|---|---|---|---|---|")
    for name, new, old_pool, old_serial in code_rows(args.programs, args.workers):
        print(f"| {name} | {new:.1f} | {old_pool:.1f} | {new / old_pool:.2f} | {old_serial:.1f} "
              f"| {new / old_serial:.2f} |")
    end_to_end, strict, plain = math_rows(args.math_calls, args.workers)
    print(f"\nmath: MathVerifier at {args.workers} workers: {end_to_end:.0f} calls/s")
    print(f"math judge in one process: strict {strict:.0f} calls/s, math-verify parse+verify {plain:.0f} calls/s "
          f"(x {strict / plain:.2f})")


if __name__ == "__main__":
    main()
