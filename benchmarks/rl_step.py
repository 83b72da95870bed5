"""Seconds per RL step: Hugging Face TRL's ``GRPOTrainer`` and ``megatron-archer train`` at tensor
parallel 1 and 2, on identical work, in one invocation.

    python -m benchmarks.rl_step [--steps 12] [--warmup 2] [--runs 3] [--systems trl,tp1,tp2]
                                 [--threads N]

Needs the ``bench`` extra (``pip install -e .[bench]``: TRL, pinned). The work is the first quick
start's (one operation on 1-9, answered with ``\\boxed{N}`` alone): the quick start's tiny Qwen3
warm-started on it (built once under ``--work-dir``, ``--warm-start-steps`` supervised steps,
label smoothing 0.15), 16 prompts x 8 samples a step at T = 1, at most 10 new tokens, the prompt
template and arithmetic reward of ``benchmarks/rl_step.yaml``, 2 optimiser updates a step
(mini-batches of 8 prompts), old log-probs recomputed and a reference model for the KL term. Both
systems see the same prompts in the same order (no shuffling) and generate all 128 samples of a
step as one batch; every group is trained (ours: dynamic sampling off, so one generation round;
TRL has none). The algorithms' per-token arithmetic differs (ours: Archer; TRL: GRPO with
beta = 1e-3); the model work asked for (generation, three forward passes and one backward per
sequence) is the same. Ours skips two pieces of it exactly: the first update's old-policy
forward (on-policy: taken from its training forward, ``trainer.step.defers_old_forward``) and
the prefill of each prompt's repeats (once per prompt, ``rollout.local_engine``); TRL runs both.

Each run is a fresh process (TRL: one; ours at TP 1: one; ours at TP 2: ``torchrun`` with two,
one thread each), with torch's default thread count unless ``--threads`` sets OMP_NUM_THREADS
for all (our local engine generates on every core either way: its design, see
``rollout.local_engine``). The systems alternate run by run, and the first ``--warmup`` steps of
every run are dropped.
Per system: seconds per step over all kept steps of all runs (median, min, max), the median
phases, and the ratio of medians to TRL's. Phases: ``rollout`` is generation; ``train`` the
optimiser updates (forward, backward, step); ``other`` the rest of the step (rewards, old and
reference log-probs, weight sync to the engine, broadcasts). Ours: the step's ``time/*`` metrics
(``time/step`` is the whole step, logging excluded). TRL: the time between the end of every
second optimiser step, generation timed around ``_generate_single_turn`` and ``train`` as the
step time minus ``_generate_and_score_completions``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "rl_step.yaml"
SYSTEMS = ("trl", "tp1", "tp2")
PROMPTS, SAMPLES, NEW_TOKENS, MINI_BATCH, LR = 16, 8, 10, 8, 3e-4
SFT_PROBLEMS, RL_PROBLEMS = 4000, 1000  # one operation (+, -, *) on 1-9, the arithmetic reward


# ---------------------------------------------------------------------------- the work
def prepare(work_dir: Path, warm_start_steps: int) -> dict[str, str]:
    """The warm-start checkpoint and RL data under ``work_dir`` (built once, then reused)."""
    from megatron_archer.data.synthetic_export import write_arithmetic_jsonl
    from megatron_archer.quickstart.build import build_base_model
    from megatron_archer.quickstart.warm_start import warm_start
    from megatron_archer.trainer import load_config

    warm = work_dir / f"warm_start_{warm_start_steps}"
    data = work_dir / "data"
    if not (warm / "config.json").exists():
        base = build_base_model(work_dir / "base")
        sft = write_arithmetic_jsonl(data / "sft.jsonl", SFT_PROBLEMS, num_operations=1)
        write_arithmetic_jsonl(data / "rl.jsonl", RL_PROBLEMS, num_operations=1)
        sft_data = load_config(CONFIG, [f"data.path={sft}"]).data
        warm_start(base, warm, sft_data, steps=warm_start_steps, batch_size=64, lr=3e-3,
                   label_smoothing=0.15)
    return {"model": str(warm), "data": str(data / "rl.jsonl")}


def our_overrides(work: dict[str, str], tp: int, steps: int, run_dir: Path) -> list[str]:
    """``benchmarks/rl_step.yaml`` set to the benchmark's work (module docstring)."""
    return [f"model.path={work['model']}", f"data.path={work['data']}", "data.shuffle=false",
            f"parallel.tensor={tp}", f"rollout.prompts_per_step={PROMPTS}", f"rollout.n={SAMPLES}",
            f"rollout.max_new_tokens={NEW_TOKENS}", "algorithm.dynamic_sampling.enabled=false",
            f"train.mini_batch_size={MINI_BATCH}", "train.epochs=1", f"train.steps={steps}",
            f"actor.lr={LR}", f"logging.dir={run_dir}", "logging.tensorboard=false",
            "logging.progress=false", "checkpoint.interval=0"]


# ---------------------------------------------------------------------------- ours
def run_ours(work: dict[str, str], tp: int, steps: int) -> list[dict[str, float]]:
    """One ``megatron-archer train`` run at tensor parallel ``tp``; per-step phases."""
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as tmp:
        run_dir = Path(tmp) / "run"
        train = ["-m", "megatron_archer.cli", "train", str(CONFIG),
                 *our_overrides(work, tp, steps, run_dir)]
        launcher = [sys.executable] if tp == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(tp),
            "--master-port", str(_free_port())]
        _run([*launcher, *train])
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = []
    for r in map(json.loads, lines):
        if r.get("step/skipped"):
            raise RuntimeError(f"step {r['step']} was skipped: the benchmark needs every step")
        rollout, train_s, step = r["time/rollout"], r["time/train"], r["time/step"]
        out.append({"step": step, "rollout": rollout, "train": train_s,
                    "other": step - rollout - train_s})
    return out


# ---------------------------------------------------------------------------- TRL
def run_trl(work: dict[str, str], steps: int) -> list[dict[str, float]]:
    """One TRL run in a fresh process (``--trl-worker``); per-step phases."""
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_trl_") as tmp:
        out = Path(tmp) / "steps.json"
        _run([sys.executable, "-m", "benchmarks.rl_step", "--trl-worker", str(out),
              "--steps", str(steps), "--model", work["model"], "--data", work["data"]])
        return json.loads(out.read_text())


def _trl_prompts(model: str, data: str):
    """The prompts as our trainer renders them, checked to tokenise to the same ids in TRL."""
    from transformers import AutoTokenizer

    from megatron_archer.data import load_prompt_set
    from megatron_archer.trainer import load_config

    tokenizer = AutoTokenizer.from_pretrained(model)
    config = load_config(CONFIG, [f"model.path={model}", f"data.path={data}"])
    prompts = load_prompt_set(config.data, tokenizer)
    ids = tokenizer([p.text for p in prompts])["input_ids"]  # as TRL tokenises
    if [tuple(i) for i in ids] != [p.input_ids for p in prompts]:
        raise RuntimeError("TRL would tokenise the prompts differently from our trainer")
    return tokenizer, [p.text for p in prompts], [p.record.answer for p in prompts]


def trl_worker(out: Path, steps: int, model: str, data: str) -> None:
    """``steps`` RL steps of TRL's GRPOTrainer on the benchmark's work; writes per-step phases."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_archer.rewards.synthetic import arithmetic_reward

    tokenizer, texts, answers = _trl_prompts(model, data)

    def reward(prompts, completions, answer, **_):
        return [arithmetic_reward(c, a).value for c, a in zip(completions, answer)]

    with tempfile.TemporaryDirectory(prefix="trl_out_") as tmp:
        args = GRPOConfig(
            output_dir=tmp, use_cpu=True, bf16=False, seed=0, report_to="none",
            save_strategy="no", logging_steps=10**6, disable_tqdm=True, shuffle_dataset=False,
            per_device_train_batch_size=MINI_BATCH * SAMPLES, gradient_accumulation_steps=1,
            steps_per_generation=PROMPTS // MINI_BATCH, num_generations=SAMPLES,
            num_iterations=1, max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0,
            top_k=0, beta=1e-3, learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, max_steps=steps * PROMPTS // MINI_BATCH,
            dataloader_num_workers=0, log_completions=False,
        )
        trainer = GRPOTrainer(
            model=model, reward_funcs=reward, args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_dict({"prompt": texts, "answer": answers}))
        phases = {"generate": 0.0, "score": 0.0}
        for name, key in (("_generate_single_turn", "generate"),
                          ("_generate_and_score_completions", "score")):
            setattr(trainer, name, _timed(getattr(trainer, name), phases, key))
        marks: list[tuple[float, dict]] = []

        class Marks(TrainerCallback):
            def on_train_begin(self, *_, **__):
                marks.append((time.perf_counter(), dict(phases)))

            def on_step_end(self, _args, state, *_, **__):
                if state.global_step % (PROMPTS // MINI_BATCH) == 0:
                    marks.append((time.perf_counter(), dict(phases)))

        trainer.add_callback(Marks())
        torch.manual_seed(0)
        trainer.train()
    records = []
    for (t0, p0), (t1, p1) in zip(marks, marks[1:]):
        step, rollout = t1 - t0, p1["generate"] - p0["generate"]
        score = p1["score"] - p0["score"]
        records.append({"step": step, "rollout": rollout, "train": step - score,
                        "other": score - rollout})
    Path(out).write_text(json.dumps(records))


def _timed(fn, phases: dict, key: str):
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            phases[key] += time.perf_counter() - start

    return wrapped


# ---------------------------------------------------------------------------- report
def summarise(results: dict[str, list[list[dict]]], warmup: int) -> dict[str, dict]:
    """Per system: kept steps' s/step median/min/max and median phases."""
    table = {}
    for system, runs in results.items():
        kept = [r for run in runs for r in run[warmup:]]
        if not kept:
            raise ValueError(f"--steps must exceed --warmup={warmup}: no step of {system} kept")
        steps = [r["step"] for r in kept]
        table[system] = {"median": statistics.median(steps), "min": min(steps),
                         "max": max(steps), "steps": len(steps),
                         **{k: statistics.median(r[k] for r in kept)
                            for k in ("rollout", "train", "other")}}
    return table


LABELS = {"trl": "TRL GRPOTrainer, 1 process", "tp1": "ours, 1 process, TP 1",
          "tp2": "ours, 2 processes, TP 2"}


def format_table(table: dict[str, dict]) -> str:
    lines = ["| system | s/step median | min | max | rollout s | train s | other s | x TRL |",
             "|---|---|---|---|---|---|---|---|"]
    base = table.get("trl", {}).get("median")
    for system, row in table.items():
        ratio = f"{row['median'] / base:.2f}" if base else "-"
        lines.append(f"| {LABELS[system]} | {row['median']:.3f} | {row['min']:.3f} | "
                     f"{row['max']:.3f} | {row['rollout']:.3f} | {row['train']:.3f} | "
                     f"{row['other']:.3f} | {ratio} |")
    return "\n".join(lines)


def _run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}):\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="RL steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each run dropped")
    parser.add_argument("--runs", type=int, default=3, help="runs per system, alternating")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench_rl_step"))
    parser.add_argument("--warm-start-steps", type=int, default=250,
                        help="supervised steps of the warm start (the first quick start's: 250)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for every process (default: each system's own; "
                        "1 is steadier on a shared machine)")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--trl-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trl_worker:
        trl_worker(Path(args.trl_worker), args.steps, args.model, args.data)
        return {}
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        parser.error(f"--systems={args.systems!r}: expected a subset of {','.join(SYSTEMS)}")
    if args.steps <= args.warmup or args.warmup < 0 or args.runs < 1:
        parser.error(f"need --steps > --warmup >= 0 and --runs >= 1, got --steps={args.steps} "
                     f"--warmup={args.warmup} --runs={args.runs}")
    if "trl" in systems and importlib.util.find_spec("trl") is None:
        parser.error("--systems includes trl but TRL is not installed: pip install -e '.[bench]'")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads={args.threads}: expected a positive integer")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the runs inherit it
    work = prepare(Path(args.work_dir), args.warm_start_steps)
    results: dict[str, list] = {s: [] for s in systems}
    for run in range(args.runs):
        for system in systems:
            start = time.perf_counter()
            steps = (run_trl(work, args.steps) if system == "trl"
                     else run_ours(work, int(system[2:]), args.steps))
            results[system].append(steps)
            print(f"[rl_step] run {run + 1}/{args.runs} {system}: "
                  f"{time.perf_counter() - start:.0f}s wall, steps "
                  + " ".join(f"{r['step']:.2f}" for r in steps), flush=True)
    table = summarise(results, args.warmup)
    print(f"\n{args.runs} runs x {args.steps} steps per system, steps {args.warmup + 1}-"
          f"{args.steps} of each run kept; os.cpu_count()={os.cpu_count()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print(format_table(table))
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
