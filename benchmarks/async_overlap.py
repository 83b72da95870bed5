"""Seconds per RL step with one-step-asynchronous rollout (``rollout.async``) against the
synchronous loop, on identical work, in one invocation; and both runs' reward curves.

    python -m benchmarks.async_overlap [--steps 8] [--warmup 2] [--runs 2] [--new-tokens 48]
                                       [--learning-steps 30]

The work is ``benchmarks.rl_step``'s (the quick start's tiny Qwen3 on one-operation prompts, 16 x
8 samples a step at T = 1, 2 updates a step, dynamic sampling off), on one process (tensor
parallel 1), the local engine not colocated in both modes; async runs it in its own process
(half the cores), sync in the trainer's (every core); ``--threads`` sets the trainer's
OMP_NUM_THREADS and ``rollout.threads``, the engine's, in both modes (equal engines; a
multi-threaded process suffers most on a loaded machine). Two parts:

- overlap: the quick start's *base* model (before its warm start: it rarely stops, so every
  response has ``--new-tokens`` tokens and the rollout weighs more: about a quarter of a
  synchronous step at 48, against under a tenth for the warm start, which answers in ~6
  tokens), ``--runs`` runs per mode, alternating, the first ``--warmup`` steps of each dropped;
- learning: the warm start at the quick start's 10 new tokens, ``--learning-steps`` steps per
  mode and seed (``--seeds``: ``train.seed`` and ``rollout.seed``): the reward curves and the
  same timing table; a third mode is async with token-level truncated importance sampling at
  C = 2 (``algorithm.rollout_correction``), which corrects for the stale samples too.

Per mode, the medians over kept steps: ``step`` (``time/step``), ``rollout`` (generation and
rewards: ``time/rollout + time/reward``; async: in the worker, hidden behind training),
``train side`` (``time/logprob + time/train + time/weight_sync``), and async's
``time/rollout_wait`` (the rollout the trainer waited for). The overlap shows as an async step
near max(rollout, train side) rather than their sum, which is the synchronous step. Staleness:
async's ``async/staleness_max`` and dropped groups. Reward curve: ``reward/accuracy`` per window
of steps, each mode (the async run trains on samples one version old).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.rl_step import CONFIG, ROOT, our_overrides, prepare

MODES = {"sync": ["rollout.colocated=false"],
         "async": ["rollout.colocated=false", "rollout.async=true"]}
TIS = ["algorithm.rollout_correction.enabled=true", "algorithm.rollout_correction.level=token",
       "algorithm.rollout_correction.mode=truncate", "algorithm.rollout_correction.threshold=2.0"]
LEARNING_MODES = {**MODES, "async+tis": [*MODES["async"], *TIS]}
WINDOW = 5


def run(work: dict[str, str], mode: str, steps: int, new_tokens: int, threads: int | None,
        seed: int = 0) -> list[dict]:
    """One single-process ``megatron-archer train`` run in ``mode``; its metrics records."""
    env = dict(os.environ, **({} if threads is None else {"OMP_NUM_THREADS": str(threads)}))
    extra = [f"train.seed={seed}", f"rollout.seed={seed}"]
    extra += [] if threads is None else [f"rollout.threads={threads}"]
    with tempfile.TemporaryDirectory(prefix="bench_async_") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = [*our_overrides(work, 1, steps, run_dir), *LEARNING_MODES[mode], *extra,
                     f"rollout.max_new_tokens={new_tokens}",
                     f"actor.max_tokens_per_micro_batch={max(1024, 80 + new_tokens)}"]
        done = subprocess.run([sys.executable, "-m", "megatron_archer.cli", "train", str(CONFIG),
                               *overrides], capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"{mode} run failed:\n{done.stderr[-3000:]}")
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def phases(record: dict) -> dict[str, float]:
    """A step's phases (module docstring)."""
    out = {"step": record["time/step"],
           "rollout": record["time/rollout"] + record["time/reward"],
           "train side": record["time/logprob"] + record["time/train"]
           + record["time/weight_sync"]}
    if "time/rollout_wait" in record:
        out["rollout wait"] = record["time/rollout_wait"]
    return out


def summarise(records: list[list[dict]], warmup: int) -> dict[str, float]:
    kept = [phases(r) for run_records in records for r in run_records[warmup:]]
    table = {k: statistics.median(p[k] for p in kept) for k in kept[0]}
    table["sum"] = table["rollout"] + table["train side"]
    table["max"] = max(table["rollout"], table["train side"])
    return table


def compare(work: dict[str, str], steps: int, new_tokens: int, runs: int, warmup: int,
            threads: int | None, title: str, modes=tuple(MODES), seed: int = 0
            ) -> dict[str, list[list[dict]]]:
    """``runs`` runs per mode, alternating; prints the timing table; the records."""
    results = {mode: [] for mode in modes}
    for _ in range(runs):
        for mode in modes:
            results[mode].append(run(work, mode, steps, new_tokens, threads, seed))
            print(f"{title}: {mode} run done", flush=True)
    tables = {mode: summarise(records, warmup) for mode, records in results.items()}
    print(f"\n{title}: median seconds per step ({steps} steps, first {warmup} dropped, {runs} "
          f"run(s) per mode, at most {new_tokens} new tokens)")
    columns = ["step", "rollout", "train side", "sum", "max", "rollout wait"]
    print(f"{'mode':<10}" + "".join(f"{c:>14}" for c in columns))
    for mode, table in tables.items():
        print(f"{mode:<10}" + "".join(f"{table[c]:>14.3f}" if c in table else f"{'-':>14}"
                                     for c in columns))
    sync, asynchronous = tables["sync"], tables["async"]
    print(f"async / sync step: {asynchronous['step'] / sync['step']:.2f}; async step / its own "
          f"max(rollout, train side): {asynchronous['step'] / asynchronous['max']:.2f}, "
          f"/ its sum: {asynchronous['step'] / asynchronous['sum']:.2f}")
    records = [r for run_records in results["async"] for r in run_records]
    print(f"async staleness per step {sorted({r['async/staleness_max'] for r in records})}, "
          f"dropped groups {sum(r['async/dropped_groups'] for r in records):.0f}")
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--learning-steps", type=int, default=30, help="0: skip that part")
    parser.add_argument("--seeds", default="0", help="learning part: comma-separated seeds")
    parser.add_argument("--skip-overlap", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for the trainer (the engine sets its own)")
    parser.add_argument("--warm-start-steps", type=int, default=250)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench_rl_step")
    args = parser.parse_args(argv)
    work = prepare(args.work_dir, args.warm_start_steps)
    base = {**work, "model": str(args.work_dir / "base")}
    if not args.skip_overlap:
        compare(base, args.steps, args.new_tokens, args.runs, args.warmup, args.threads,
                "overlap")
    for seed in map(int, args.seeds.split(",")) if args.learning_steps else ():
        results = compare(work, args.learning_steps, 10, 1, args.warmup, args.threads,
                          f"learning, seed {seed}", tuple(LEARNING_MODES), seed)
        print(f"\nlearning, seed {seed}: reward/accuracy, mean of each {WINDOW}-step window")
        for mode, runs in results.items():
            acc = [r["reward/accuracy"] for r in runs[0]]
            windows = [statistics.mean(acc[i:i + WINDOW]) for i in range(0, len(acc), WINDOW)]
            print(f"{mode:<10}" + " ".join(f"{a:.3f}" for a in windows))


if __name__ == "__main__":
    main()
