"""Per-claim verdicts of an ablation: a paper's claim is "``variant`` scores higher (or lower) held-out
avg@k than ``reference``". Each seed pairs the two runs (same warm-start evaluation, same prompts),
so the evidence is the per-seed difference d_s = variant_s - reference_s over the seeds where both
finished. With n differences, mean m and sample SD s:

- the 95% interval is m +- t_{0.975, n-1} s / sqrt(n) (Student's t, paired);
- the verdict is ``reproduced`` when the interval excludes 0 on the paper's side, ``contradicted``
  when it excludes 0 on the other side, ``identical`` when every difference is exactly 0 (the two
  variants ran the same computation, e.g. a clip range that never binds), else ``inconclusive``;
- the minimum detectable effect (two-sided alpha 0.05, power 0.8) is
  (t_{0.975, n-1} + t_{0.80, n-1}) s / sqrt(n): the smallest true difference this design would
  have found four times in five, given the observed spread (so an inconclusive verdict says how
  large an effect it rules out only loosely, not that there is none).

The t distribution is written out here (no scipy in the environment): its CDF for an integer
number of degrees of freedom has a finite closed form (Abramowitz & Stegun 26.7.3-4), and the
quantile is found by bisection on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

HIGHER, LOWER = "higher", "lower"
REPRODUCED, CONTRADICTED, INCONCLUSIVE, TOO_FEW, IDENTICAL = (
    "reproduced", "contradicted", "inconclusive", "too few seeds", "identical")


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` (an integer >= 1) degrees of freedom: with
    theta = atan(t / sqrt(df)), P(|T| <= t) is a finite series in cos(theta) (A&S 26.7.3-4)."""
    if not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an integer >= 1; got {df!r}")
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = math.cos(theta), 0.0
        if df > 1:
            series = term
            for j in range(1, (df - 1) // 2):
                term *= cos2 * (2 * j) / (2 * j + 1)
                series += term
        inside = 2.0 / math.pi * (theta + math.sin(theta) * series)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term = series = 1.0
        for j in range(1, df // 2):
            term *= cos2 * (2 * j - 1) / (2 * j)
            series += term
        inside = math.sin(theta) * series
    return 0.5 + math.copysign(0.5 * inside, t)


def t_quantile(p: float, df: int) -> float:
    """The t with t_cdf(t, df) = p, for 0 < p < 1, by bisection to float64 resolution."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1); got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while True:
        middle = 0.5 * (low + high)
        if middle in (low, high):
            return middle
        if t_cdf(middle, df) < p:
            low = middle
        else:
            high = middle


def paired_interval(differences: Sequence[float], level: float = 0.95,
                    power: float = 0.8) -> dict:
    """n, mean, sample SD, the two-sided ``level`` t-interval of the mean and the minimum
    detectable effect at ``power`` (two-sided alpha = 1 - level); the last three None below 2
    differences."""
    n = len(differences)
    mean = math.fsum(differences) / n if n else None
    result = {"n": n, "mean": mean, "sd": None, "low": None, "high": None, "mde": None}
    if n < 2:
        return result
    sd = math.sqrt(math.fsum((d - mean) ** 2 for d in differences) / (n - 1))
    critical = t_quantile(0.5 + level / 2, n - 1)
    half = critical * sd / math.sqrt(n)
    return {**result, "sd": sd, "low": mean - half, "high": mean + half,
            "mde": (critical + t_quantile(power, n - 1)) * sd / math.sqrt(n)}


def verdict(low: float | None, high: float | None, direction: str) -> str:
    """``reproduced`` when the interval [low, high] lies wholly on the claimed side of 0,
    ``contradicted`` when wholly on the other, else ``inconclusive`` (``too few seeds`` without an
    interval)."""
    if low is None or high is None:
        return TOO_FEW
    above, below = low > 0, high < 0
    if direction == LOWER:
        above, below = below, above
    return REPRODUCED if above else CONTRADICTED if below else INCONCLUSIVE


def claim_name(variant: str, direction: str, reference: str) -> str:
    return f"{variant} {'>' if direction == HIGHER else '<'} {reference}"


def claim_verdicts(claims: Sequence, values: Mapping[str, Mapping[str, float | None]]) -> list[dict]:
    """Per claim (``variant``, ``reference``, ``direction``, ``source``): the paired differences
    over the seeds both variants finished, their interval, minimum detectable effect and verdict.
    ``values``: variant -> seed -> the metric (a variant absent or a None value: not finished)."""
    rows = []
    for claim in claims:
        mine, theirs = values.get(claim.variant, {}), values.get(claim.reference, {})
        seeds = [s for s in mine if s in theirs and mine[s] is not None
                 and theirs[s] is not None]
        differences = {s: mine[s] - theirs[s] for s in seeds}
        stats = paired_interval(list(differences.values()))
        rows.append({"claim": claim_name(claim.variant, claim.direction, claim.reference),
                     "variant": claim.variant, "reference": claim.reference,
                     "direction": claim.direction, "source": claim.source,
                     "differences": differences, **stats,
                     "verdict": IDENTICAL if differences and not any(differences.values())
                     else verdict(stats["low"], stats["high"], claim.direction)})
    return rows
