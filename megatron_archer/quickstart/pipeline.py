"""The quick start end to end (``python -m megatron_archer.quickstart``, ``make quickstart``).

1. build: tiny Qwen3 (random, seeded) + the tiny tokenizer -> ``<out>/base``; step-by-step
   arithmetic data -> ``<out>/data`` (warm start, RL prompts, and evaluation on held-out
   expressions);
2. warm start: a short SFT on the full solutions -> ``<out>/warm_start`` (the RL starting
   checkpoint, HF format);
3. accuracy before: avg@k / pass@k on the held-out evaluation set and, for contrast, on as many
   RL prompts (``trainer.evaluate``, as ``eval``);
4. RL: ``torchrun --nproc-per-node 2 -m megatron_archer.cli train examples/quickstart/archer.yaml``
   (Archer, tensor parallel 2, local engine) -> ``<out>/rl`` (metrics.jsonl, tensorboard/,
   the last step's checkpoint), converted to HF -> ``<out>/final``; accuracy after, same sets;
5. ``<out>/curves.png`` (reward, accuracy, entropy per step) and ``<out>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "quickstart" / "archer.yaml"


@dataclass
class Settings:
    """Every size the quick start uses; the defaults are the documented run (README)."""

    out: str = "runs/quickstart"
    config: str = str(CONFIG)
    # model
    hidden: int = 128
    layers: int = 2
    intermediate: int = 384
    # task: the step-by-step arithmetic task (data.stepwise_arithmetic), min..max operations on
    # integers in [1, max_operand]; eval_fraction of the expression space (by a hash of the text)
    # is held out for evaluation, the rest is the warm-start and RL data
    min_operations: int = 2
    max_operations: int = 3
    max_operand: int = 9
    eval_fraction: float = 0.2
    sft_problems: int = 4000
    rl_problems: int = 1000
    eval_problems: int = 400  # held-out problems (and as many RL prompts, ``seen``)
    # warm start: supervised on the full solutions
    sft_steps: int = 300
    sft_batch: int = 64
    sft_lr: float = 3e-3
    sft_label_smoothing: float = 0.0
    # evaluation: k samples per problem at T = 1
    k: int = 8
    # RL: extra ``section.field=value`` overrides of the YAML (train.steps=2, ...)
    rl_overrides: list[str] = field(default_factory=list)
    nproc: int = 2
    # the RL run and the evaluation's sampling; the model, data and warm start (the starting
    # point, fixed across RL seeds as in the ablations) use base_seed
    seed: int = 0
    base_seed: int = 0


# what ``--help`` says of each option
HELP = {
    "out": "output directory; replaced on a rerun only if the quick start made it",
    "config": "the RL experiment YAML",
    "hidden": "model hidden size",
    "layers": "model layers",
    "intermediate": "model MLP size",
    "min_operations": "fewest operations in an expression",
    "max_operations": "most operations in an expression",
    "max_operand": "largest operand (integers from 1)",
    "eval_fraction": "share of the expression space held out for evaluation (by a hash of the text)",
    "sft_problems": "warm-start (supervised) problems",
    "rl_problems": "RL prompts",
    "eval_problems": "held-out evaluation problems (and as many seen RL prompts)",
    "sft_steps": "warm-start optimiser steps",
    "sft_batch": "warm-start batch size",
    "sft_lr": "warm-start learning rate",
    "sft_label_smoothing": "warm-start label smoothing",
    "k": "samples per problem at evaluation (avg@k, pass@k)",
    "nproc": "RL processes (torchrun --nproc-per-node)",
    "seed": "seed of the RL run (sampling, prompt order, training) and of the evaluation's "
            "sampling",
    "base_seed": "seed of the model's initialisation, the data and the warm start",
}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Clock:
    """Wall and CPU seconds per stage (CPU: this process and every finished child), each stage
    printed with ``tag``."""

    def __init__(self, tag: str = "quickstart"):
        self.tag = tag
        self.stages: dict[str, dict[str, float]] = {}
        self._wall, self._cpu = time.perf_counter(), _cpu_seconds()
        self._start = (self._wall, self._cpu)

    def stage(self, name: str) -> None:
        wall, cpu = time.perf_counter(), _cpu_seconds()
        self.stages[name] = {"wall_s": round(wall - self._wall, 1),
                             "cpu_s": round(cpu - self._cpu, 1)}
        self._wall, self._cpu = wall, cpu
        print(f"[{self.tag}] {name}: {self.stages[name]['wall_s']:.0f}s wall, "
              f"{self.stages[name]['cpu_s']:.0f}s CPU", flush=True)

    def total(self) -> dict[str, float]:
        return {"wall_s": round(time.perf_counter() - self._start[0], 1),
                "cpu_s": round(_cpu_seconds() - self._start[1], 1)}


def _banner(text: str) -> None:
    print(f"\n[quickstart] === {text} ===", flush=True)


def run_command(command: list[str], tag: str = "quickstart") -> None:
    """Print ``command``, run it, raise if it fails."""
    print(f"[{tag}] $ " + " ".join(command), flush=True)
    subprocess.run(command, check=True)


def torchrun_train(config: str | Path, overrides: list[str], nproc: int,
                   tag: str = "quickstart") -> None:
    """``megatron-archer train config overrides...`` under torchrun with ``nproc`` processes on
    this machine (a free rendezvous port each time)."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                "--master-port", str(free_port())]
    run_command([*torchrun, "-m", "megatron_archer.cli", "train", str(config), *overrides], tag)


def _eval(settings: Settings, data_path: Path, model: Path) -> dict:
    from megatron_archer.trainer import load_config
    from megatron_archer.trainer.evaluate import evaluate

    # the problems in engine batches of 100; mini_batch_size only has to divide it
    config = load_config(settings.config, [
        f"model.path={model}", f"data.path={data_path}", "logging.progress=false",
        "rollout.prompts_per_step=100", "train.mini_batch_size=1", f"train.seed={settings.seed}"])
    return evaluate(config, k=settings.k)


# written into every --out the quick start makes: only such a directory is replaced by a rerun
MARKER = ".megatron-archer-quickstart"


def prepare_out_dir(out: Path) -> Path:
    """An empty ``out`` for a new quick start: a directory an earlier quick start made (it holds
    MARKER) is replaced, since the RL run would append to its metrics and resume its checkpoints;
    any other non-empty path is refused, so no file of the user's is ever deleted."""
    if out.exists():
        if not out.is_dir():
            raise ValueError(f"--out {out} is a file, not a directory")
        if any(out.iterdir()) and not (out / MARKER).is_file():
            raise ValueError(f"--out {out} is not empty and was not made by the quick start; "
                             f"choose another --out or empty it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("made by python -m megatron_archer.quickstart; a rerun replaces "
                              "this directory\n")
    return out


def run(settings: Settings, out: Path | None = None) -> dict:
    """Every stage; returns (and writes to ``<out>/summary.json``) the numbers and paths. ``out``:
    the directory ``prepare_out_dir`` already made for ``settings.out`` (``main`` makes it first,
    to refuse a bad ``--out`` before any work); None: made here."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_archer.data.stepwise_arithmetic import solution_target
    from megatron_archer.quickstart.build import build_base_model, overlap, write_datasets
    from megatron_archer.quickstart.plot import plot_curves
    from megatron_archer.quickstart.warm_start import warm_start
    from megatron_archer.trainer import load_config

    out = out or prepare_out_dir(Path(settings.out).resolve())
    torch.set_num_threads(max(os.cpu_count() or 1, 1))
    clock = Clock()

    _banner("1/5 build: tiny Qwen3 model, tiny tokenizer, step-by-step arithmetic data")
    base = build_base_model(out / "base", hidden=settings.hidden, layers=settings.layers,
                            intermediate=settings.intermediate, seed=settings.base_seed)
    data = write_datasets(out / "data", sft=settings.sft_problems, rl=settings.rl_problems,
                          eval=settings.eval_problems, min_operations=settings.min_operations,
                          max_operations=settings.max_operations, max_operand=settings.max_operand,
                          eval_fraction=settings.eval_fraction, seed=settings.base_seed)
    params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(base).parameters())
    print(f"[quickstart] model: {params / 1e6:.2f}M parameters -> {base}", flush=True)
    clock.stage("build")

    _banner("2/5 warm start (supervised on the step-by-step solutions, one process)")
    warm = out / "warm_start"
    sft_data = load_config(settings.config, [f"data.path={data.sft}"]).data
    sft = warm_start(base, warm, sft_data, steps=settings.sft_steps,
                     batch_size=settings.sft_batch, lr=settings.sft_lr,
                     label_smoothing=settings.sft_label_smoothing, seed=settings.base_seed,
                     target=solution_target)
    clock.stage("warm_start")

    _banner(f"3/5 accuracy before RL ({settings.eval_problems} held-out problems and as many RL "
            f"prompts, k={settings.k}, T=1)")
    before, seen_before = _eval(settings, data.eval, warm), _eval(settings, data.seen, warm)
    print(f"[quickstart] before: held out {json.dumps(before)}, seen {json.dumps(seen_before)}",
          flush=True)
    clock.stage("eval_before")

    _banner(f"4/5 Archer RL: torchrun, {settings.nproc} processes, tensor parallel 2")
    run_dir = out / "rl"
    seeds = [f"{name}.seed={settings.seed}" for name in ("train", "rollout", "data")]
    overrides = [f"model.path={warm}", f"data.path={data.rl}", f"logging.dir={run_dir}", *seeds,
                 *settings.rl_overrides]
    steps = load_config(settings.config, overrides).train.steps
    overrides += [f"checkpoint.interval={steps}", "checkpoint.keep_last=1"]
    torchrun_train(settings.config, overrides, settings.nproc)
    clock.stage("rl")
    final = out / "final"
    checkpoint = run_dir / "checkpoints" / f"step_{steps:08d}" / "model"
    run_command([sys.executable, "-m", "megatron_archer.cli", "convert", "megatron-to-hf",
          "--megatron", str(checkpoint), "--out", str(final), "--tp", "1"])
    clock.stage("convert")
    after, seen_after = _eval(settings, data.eval, final), _eval(settings, data.seen, final)
    print(f"[quickstart] after: held out {json.dumps(after)}, seen {json.dumps(seen_after)}",
          flush=True)
    clock.stage("eval_after")

    _banner("5/5 curves")
    key = f"avg@{settings.k}"
    png = plot_curves(run_dir / "metrics.jsonl", out / "curves.png",
                      before=before[key], after=after[key])
    clock.stage("plot")

    summary = {
        "accuracy_before": before, "accuracy_after": after,
        "seen_accuracy_before": seen_before, "seen_accuracy_after": seen_after,
        "eval_overlap_with_training_data": round(overlap(data), 3),
        "warm_start": sft, "rl_steps": steps, "time": {**clock.stages, "total": clock.total()},
        "settings": asdict(settings),
        "outputs": {"base_model": str(base), "warm_start": str(warm), "data": str(data.sft.parent),
                    "rl_run": str(run_dir), "metrics": str(run_dir / "metrics.jsonl"),
                    "tensorboard": str(run_dir / "tensorboard"), "final_model": str(final),
                    "curves": str(png)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    total = summary["time"]["total"]
    print(f"\n[quickstart] accuracy before {100 * before[key]:.1f}% -> after "
          f"{100 * after[key]:.1f}% ({key} at T=1 on {before['problems']} held-out problems; pass@"
          f"{settings.k} {100 * before[f'pass@{settings.k}']:.1f}% -> "
          f"{100 * after[f'pass@{settings.k}']:.1f}%); on RL prompts {100 * seen_before[key]:.1f}%"
          f" -> {100 * seen_after[key]:.1f}%")
    print(f"[quickstart] total {total['wall_s']:.0f}s wall, {total['cpu_s']:.0f}s CPU")
    print(f"[quickstart] outputs in {out}: curves.png, summary.json, rl/metrics.jsonl, "
          f"rl/tensorboard (tensorboard --logdir {run_dir / 'tensorboard'}), final/ (HF model)",
          flush=True)
    return summary


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None) -> Settings:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="python -m megatron_archer.quickstart",
                                     description=__doc__.split("\n\n")[0])
    for name, value in asdict(defaults).items():
        if name == "rl_overrides":
            parser.add_argument("rl_overrides", nargs="*",
                                help="section.field=value overrides of the RL config")
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                            help=f"{HELP[name]} (default {value})")
    return Settings(**vars(parser.parse_args(argv)))


def main(argv=None) -> int:
    settings = parse_args(argv)
    try:
        out = prepare_out_dir(Path(settings.out).resolve())
    except ValueError as error:  # before any work: one line, the user's files untouched
        print(f"python -m megatron_archer.quickstart: error: {error}", file=sys.stderr)
        return 2
    run(settings, out)
    return 0
