"""Held-out splits of a synthetic task's problem space by a hash of the problem text.

``split_of`` assigns every expression to ``train`` or ``eval`` by its SHA-256, so an evaluation
set is made of different expressions from the warm-start and RL sets by construction (not a
separate draw of the same ones), identically for every seed and on every machine. The step-by-step
task (``stepwise_arithmetic``, which the quick start and the ablations use) splits this way.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "eval")


def split_of(expression: str, eval_fraction: float) -> str:
    """``eval`` for the expressions whose SHA-256 maps below ``eval_fraction`` in [0, 1), else
    ``train``: a fixed partition of the expression space, independent of any seed."""
    digest = hashlib.sha256(expression.encode("utf-8")).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction else "train"
