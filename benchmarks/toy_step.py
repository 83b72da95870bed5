"""Seconds per RL step of the toy sweep, before and after a change, in one invocation.

    python -m benchmarks.toy_step [--baseline main] [--runs 4] [--steps 8] [--warmup 2]
                                  [--out runs/sweep] [--variant dapo_lr3e-5]
                                  [--after-override rollout.threads=1 ...]

The work is one run of the toy sweep (``examples/ablations/sweep.yaml``, issue 29): its tiny
Qwen3 (0.43M parameters) from the sweep's warm start, 8 prompts x 8 responses of at most 48
tokens a step, one update a step, tensor parallel 1 in one process, the variant ``--variant``
at seed 0. The sweep's prepared start (``<out>/prepare``: data and warm start) is reused, or
made as ``megatron-archer ablate`` makes it.

BEFORE is ``megatron_archer`` as of the git revision ``--baseline``, exported with ``git
archive`` into a temporary directory and put first on PYTHONPATH; AFTER is this tree, with the
experiment overrides ``--after-override`` (none by default: the same settings). Each run is
a fresh ``megatron-archer train`` process of ``--steps`` steps (checkpoints off), under the
sweep's thread settings (OMP_NUM_THREADS=1, OMP_WAIT_POLICY=PASSIVE, unless already set). The
two alternate run by run (ABBA: before, after, after, before, ...), so a change of the machine's
load hits both alike, and the first ``--warmup`` steps of every run are dropped.

Per side: seconds per step over the kept steps of all runs (``time/step`` of the trainer's
metrics: the whole step, logging excluded; median, min, max), the median rollout seconds
(``time/rollout``: generation), and the CPU seconds per kept step of each run (the process's,
all threads, from /proc; unlike wall time, barely inflated by other jobs on the machine). The
ratios are of the medians, after / before. The same seed gives both sides the same rollouts when
the change keeps the engine's samples (the per-step mean response length and reward are compared
and the result printed). The 1-minute load average is sampled before every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "examples" / "ablations" / "sweep.yaml"
SIDES = ("before", "after")
SAME = ("response/length_mean", "reward/mean")  # equal per step when the rollouts are


def experiment_yaml(out: str, variant: str) -> str:
    """The resolved experiment of ``variant`` at seed 0 of the sweep on ``out`` (its prepared
    start made first if missing)."""
    from megatron_archer.ablation.config import load_ablation_config, select_variants
    from megatron_archer.ablation.plan import run_specs
    from megatron_archer.ablation.prepare import prepare
    from megatron_archer.trainer.config import resolved_yaml

    config = select_variants(load_ablation_config(SWEEP, [f"out={out}", "seeds=[0]"]), [variant])
    prepare(config)
    (spec,) = [s for s in run_specs(config) if s.experiment is not None]
    return resolved_yaml(spec.experiment)


def export_revision(revision: str, into: Path) -> Path:
    """``megatron_archer`` as of ``revision`` under ``into`` (a PYTHONPATH entry)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision, "megatron_archer"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def check_import(python_path: Path, cwd: Path) -> None:
    """Refuse a PYTHONPATH under which ``megatron_archer`` is imported from elsewhere (the
    working directory or an installed copy shadowing it)."""
    found = subprocess.run(
        [sys.executable, "-c", "import megatron_archer; print(megatron_archer.__file__)"],
        cwd=cwd, env={**os.environ, "PYTHONPATH": str(python_path)}, capture_output=True,
        text=True, check=True).stdout.strip()
    if not Path(found).resolve().is_relative_to(python_path.resolve()):
        raise RuntimeError(f"with PYTHONPATH={python_path} megatron_archer comes from {found}")


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system, all threads) of a running process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_once(experiment: Path, python_path: Path, steps: int, warmup: int, run_dir: Path,
             overrides: list[str]) -> dict:
    """One training run: per-step metrics and the CPU seconds of its steps after the warm-up
    (read from /proc when the metrics file gains its line of step ``warmup`` and of the last
    step, polled every 10 ms). It runs in the directory above ``run_dir`` (``python -m`` puts
    the working directory first on sys.path)."""
    env = {**os.environ, "PYTHONPATH": str(python_path)}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    command = [sys.executable, "-m", "megatron_archer.cli", "train", str(experiment),
               f"train.steps={steps}", f"logging.dir={run_dir}", "logging.overwrite=true",
               "checkpoint.interval=0", *overrides]
    metrics = run_dir / "metrics.jsonl"
    marks: dict[int, float] = {}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(command, cwd=run_dir.parent, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, text=True)
        while process.poll() is None:
            lines = metrics.read_text().count("\n") if metrics.exists() else 0
            if lines in (warmup, steps) and lines not in marks:
                try:
                    marks[lines] = process_cpu(process.pid)
                except (FileNotFoundError, ProcessLookupError):
                    break
            time.sleep(0.01)
        if process.wait():
            log.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}):\n"
                               f"{log.read()[-3000:]}")
    if set(marks) != {warmup, steps}:
        raise RuntimeError(f"the run ended before its CPU time was read (steps {sorted(marks)})")
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {"steps": records, "cpu": (marks[steps] - marks[warmup]) / (steps - warmup)}


def summarise(results: dict[str, list[dict]], warmup: int) -> dict[str, dict]:
    """Per side: kept steps' s/step median/min/max, median rollout s, CPU s/step per run."""
    table = {}
    for side, runs in results.items():
        kept = [r for run in runs for r in run["steps"][warmup:]]
        if not kept:
            raise ValueError(f"--steps must exceed --warmup={warmup}: no step of {side} kept")
        steps = [r["time/step"] for r in kept]
        cpu = [run["cpu"] for run in runs]
        table[side] = {"median": statistics.median(steps), "min": min(steps), "max": max(steps),
                       "steps": len(steps),
                       "rollout": statistics.median(r["time/rollout"] for r in kept),
                       "cpu_median": statistics.median(cpu), "cpu_min": min(cpu),
                       "cpu_max": max(cpu)}
    return table


def same_rollouts(results: dict[str, list[dict]]) -> bool:
    """Whether every run of both sides logged the same per-step length and reward."""
    def key(run):
        return [[r.get(name) for name in SAME] for r in run["steps"]]

    first = key(results["before"][0])
    return all(key(run) == first for runs in results.values() for run in runs)


def format_table(table: dict[str, dict]) -> str:
    lines = ["| side | s/step median | min | max | rollout s (median) | CPU s/step (median of "
             "runs, min-max) |", "|---|---|---|---|---|---|"]
    for side, row in table.items():
        lines.append(f"| {side} | {row['median']:.3f} | {row['min']:.3f} | {row['max']:.3f} | "
                     f"{row['rollout']:.3f} | {row['cpu_median']:.3f} ({row['cpu_min']:.3f}-"
                     f"{row['cpu_max']:.3f}) |")
    before, after = table["before"], table["after"]
    lines.append(f"\nafter / before: s/step {after['median'] / before['median']:.2f}, rollout "
                 f"{after['rollout'] / before['rollout']:.2f}, CPU s/step "
                 f"{after['cpu_median'] / before['cpu_median']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", default="main", help="git revision measured as BEFORE")
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run dropped")
    parser.add_argument("--runs", type=int, default=4, help="runs per side, alternating")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sweep"),
                        help="the sweep's out directory (its prepare/ is reused or made)")
    parser.add_argument("--variant", default="dapo_lr3e-5", help="the sweep variant run")
    parser.add_argument("--after-override", action="append", default=[], metavar="KEY=VALUE",
                        help="an experiment override for the AFTER runs only (repeatable)")
    parser.add_argument("--json", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        parser.error(f"--warmup {args.warmup} must be at least 1 (the CPU time is read from the "
                     f"end of step --warmup) and below --steps {args.steps}")

    results: dict[str, list[dict]] = {side: [] for side in SIDES}
    loads = []
    with tempfile.TemporaryDirectory(prefix="bench_toy_step_") as tmp:
        tmp = Path(tmp)
        experiment = tmp / "experiment.yaml"
        experiment.write_text(experiment_yaml(args.out, args.variant))
        (tmp / "before").mkdir()
        paths = {"before": export_revision(args.baseline, tmp / "before"), "after": ROOT}
        overrides = {"before": [], "after": args.after_override}
        for path in paths.values():
            check_import(path, tmp)
        start = time.perf_counter()
        for index in range(args.runs):
            for side in SIDES if index % 2 == 0 else SIDES[::-1]:
                loads.append(os.getloadavg()[0])
                run = run_once(experiment, paths[side], args.steps, args.warmup,
                               tmp / f"{side}_{index}", overrides[side])
                results[side].append(run)
                print(f"run {index + 1}/{args.runs} {side}: "
                      f"{[round(r['time/step'], 3) for r in run['steps']]} s/step, "
                      f"{run['cpu']:.3f} CPU s/step, load {loads[-1]:.1f}", flush=True)
        loads.append(os.getloadavg()[0])
    table = summarise(results, args.warmup)
    same = same_rollouts(results)
    print(f"\nbaseline {args.baseline}, variant {args.variant}, after-overrides "
          f"{args.after_override or 'none'}, {args.steps} steps a run "
          f"({args.warmup} dropped), {args.runs} runs a side, {time.perf_counter() - start:.0f} "
          f"s in all; 1-minute load average {min(loads):.1f}-{max(loads):.1f}; same rollouts on "
          f"both sides: {'yes' if same else 'NO'}\n")
    print(format_table(table))
    report = {"table": table, "load": [min(loads), max(loads)], "same_rollouts": same,
              "baseline": args.baseline, "variant": args.variant,
              "after_overrides": args.after_override}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
