"""A math-verify worker process: reads JSON tasks on stdin, writes JSON verdicts on its own pipe.

Started by `math_reward.MathVerifier` as `python -m megatron_archer.rewards.math_worker MEMORY_BYTES
OPTIONS_JSON` (the comparison options: `reduce_relations`, `relative_tolerance`; see `judge`).
math-verify's own timeouts use `signal.alarm`, which only works in a main thread, so they are off
here (`timeout_seconds=None`): the parent enforces a wall-clock limit per answer and kills a worker
that overruns. The address-space limit stops a runaway expression (9^9^9^9) from eating the host's
memory while the parent waits. Stray prints go to stderr so they cannot corrupt the protocol.

Protocol, one JSON object per line: the worker first writes {"ready": true}; then for each task
{"id", "gold", "answer"} it writes {"id", "equal": bool | null, "error": str | null, "why": str | null}.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys

PR_SET_PDEATHSIG = 1


def judge(gold: str, answer: str, reduce_relations: bool = False, relative_tolerance: float | None = None) -> dict:
    """Whether `answer` is mathematically equivalent to `gold`, both LaTeX or plain text.

    Stricter than math-verify's defaults, which a policy can game:
    - a relation in the answer (`5 = 7`, `x = 5 = 7`, `3 < 5`) is not reduced to its last side
      unless the reference is itself a relation or `reduce_relations`; a single assignment to a
      variable (`x = 3`) still counts as its value;
    - decimals are exact: each decimal literal becomes the rational it spells (0.75 -> 3/4), so a
      rounded value of 1/3, pi or sqrt 2 is not equal to it; with `relative_tolerance` r, two
      numbers also match when |answer - gold| <= r |gold| (for references that are themselves rounded).
    """
    from math_verify import parse, verify

    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
    if not gold_parsed:
        return {"equal": None, "error": "could not parse the reference", "why": None}
    answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not answer_parsed:
        return {"equal": None, "error": "could not parse the answer", "why": None}
    if not reduce_relations and not any(map(_is_relation, gold_parsed)):
        if any(_is_relation(a) and not _is_assignment(a) for a in answer_parsed):
            return {"equal": False, "error": None, "why": "a chained equation or inequality, the reference is a value"}
    gold_exact, answer_exact = [_exact(g) for g in gold_parsed], [_exact(a) for a in answer_parsed]
    if verify(gold_exact, answer_exact, timeout_seconds=None):
        return {"equal": True, "error": None, "why": None}
    if relative_tolerance is not None and _close(gold_exact, answer_exact, relative_tolerance):
        return {"equal": True, "error": None, "why": f"within relative tolerance {relative_tolerance:g}"}
    return {"equal": False, "error": None, "why": None}


def _is_relation(expr) -> bool:
    """An equation or inequality, or a chain of them (sympy And of relations)."""
    from sympy import And
    from sympy.core.relational import Relational

    if isinstance(expr, Relational):
        return True
    return isinstance(expr, And) and all(isinstance(arg, Relational) for arg in expr.args)


def _is_assignment(expr) -> bool:
    """`name = value` with a single variable on the left and no further relation."""
    from sympy import Eq, Symbol

    return isinstance(expr, Eq) and isinstance(expr.lhs, Symbol) and not _is_relation(expr.rhs)


def _exact(expr):
    """`expr` with every decimal (sympy Float) replaced by the exact rational it spells."""
    from sympy import Float, Rational
    from sympy.core.basic import Basic
    from sympy.matrices import MatrixBase

    if not isinstance(expr, (Basic, MatrixBase)):
        return expr
    return expr.xreplace({f: Rational(str(f)) for f in expr.atoms(Float)})


def _close(golds: list, answers: list, tolerance: float) -> bool:
    """Whether some numeric gold and answer differ by at most `tolerance` relative to the gold."""
    from sympy.core.basic import Basic

    def numbers(items: list) -> list:
        return [x for x in items if isinstance(x, Basic) and x.is_number and not _is_relation(x)]

    for g in numbers(golds):
        g_value = complex(g.evalf())
        for a in numbers(answers):
            if abs(complex(a.evalf()) - g_value) <= tolerance * abs(g_value):
                return True
    return False


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this worker when its parent dies, so no busy orphan outlives a crash."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, 9)
    except (OSError, AttributeError):  # not Linux: the parent's close() and stdin EOF still end it
        pass


def main() -> None:
    memory_bytes, options = int(sys.argv[1]), json.loads(sys.argv[2])
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
            verdict = judge(task["gold"], task["answer"], **options)
        except Exception as error:  # noqa: BLE001 - MemoryError, RecursionError...: reported to the caller
            verdict = {"equal": None, "error": f"{type(error).__name__}: {error}"[:200], "why": None}
        protocol.write(json.dumps({"id": task["id"], **verdict}) + "\n")


if __name__ == "__main__":
    main()
