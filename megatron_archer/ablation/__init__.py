"""The papers' ablations as one command (``megatron-archer ablate CONFIG``): algorithm variants x
seeds from one warm start on the step-by-step arithmetic task, each for the same steps and
rollout budget, evaluated on held-out problems, reported with mean +- std over seeds and, per
claim, a paired interval and verdict.

Modules, one concept each: ``config`` (``AblationConfig``, validated), ``plan`` (output layout,
every run's experiment config, the equal-budget rule), ``records`` (resumable JSON records with
fingerprints), ``prepare`` (model, data, warm start, its entropy report), ``runs`` (one variant x
seed), ``claims`` (paired intervals, verdicts), ``report`` (table, curves, claims, summary),
``ablate`` (the pipeline) and ``cli``.
"""
