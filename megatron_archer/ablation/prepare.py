"""The shared start of every run, made once: a tiny Qwen3 model, the step-by-step arithmetic
sets (warm start, RL prompts, held-out evaluation), the supervised warm start on the solutions,
and the warm start's entropy report (``analysis.analyze_entropy``: share of tokens below 0.01,
the 80th percentile, the highest-entropy tokens; its responses are the tokens every final
checkpoint is compared on)."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

from megatron_archer.ablation.config import AblationConfig
from megatron_archer.ablation.plan import Layout, evaluation_config
from megatron_archer.ablation.records import fingerprint, read_record, write_record
from megatron_archer.data.stepwise_arithmetic import solution_target

RECORD = "prepared.json"


def prepare_fingerprint(config: AblationConfig) -> str:
    """What the prepared files depend on: task, model, warm start, the entropy responses and the
    experiment's data and sampling settings (prompt template, length limits)."""
    shared = evaluation_config(config, 0)
    return fingerprint(asdict(config.task), asdict(config.model), asdict(config.warm_start),
                       asdict(config.entropy), shared.data.template, shared.data.max_prompt_length,
                       shared.rollout.max_new_tokens)


def _write_data(config: AblationConfig, layout: Layout) -> dict[str, int]:
    from megatron_archer.quickstart.build import file_expressions, write_datasets

    task = config.task
    data = write_datasets(layout.data("sft").parent, sft=task.sft_problems, rl=task.rl_problems,
                          eval=task.eval_problems, min_operations=task.min_operations,
                          max_operations=task.max_operations, max_operand=task.max_operand,
                          eval_fraction=task.eval_fraction, seed=task.seed)
    train = set(file_expressions(data.sft)) | set(file_expressions(data.rl))
    return {"distinct_train_expressions": len(train),
            "distinct_eval_expressions": len(set(file_expressions(data.eval)))}


def prepare(config: AblationConfig) -> dict:
    """Make (or find, made with the same settings) ``<out>/prepare``; returns its record."""
    from megatron_archer.analysis import AnalysisConfig, analyze_entropy
    from megatron_archer.quickstart import build_base_model, warm_start

    layout = Layout(Path(config.out))
    expected = prepare_fingerprint(config)
    record = read_record(layout.prepared, expected, "the prepared warm start")
    if record is not None:
        return record
    if layout.prepare.exists():  # an earlier attempt that did not finish
        shutil.rmtree(layout.prepare)
    start = time.perf_counter()
    sizes = asdict(config.model)
    build_base_model(layout.base_model, **sizes)
    counts = _write_data(config, layout)
    shared = evaluation_config(config, 0)
    sft_data = replace(shared.data, path=str(layout.data("sft")))
    ws = config.warm_start
    warm = warm_start(layout.base_model, layout.warm_start, sft_data, steps=ws.steps,
                      batch_size=ws.batch_size, lr=ws.lr, label_smoothing=ws.label_smoothing,
                      seed=ws.seed, target=solution_target)
    entropy = analyze_entropy(AnalysisConfig(
        checkpoint=str(layout.warm_start), output_dir=str(layout.warm_entropy),
        prompts=str(layout.data("eval")), template=shared.data.template,
        num_prompts=config.entropy.prompts, samples_per_prompt=config.entropy.samples_per_prompt,
        max_new_tokens=shared.rollout.max_new_tokens, seed=config.task.seed,
        min_count=config.entropy.min_count, rho=config.entropy.rho))
    record = {"fingerprint": expected, "data": counts, "warm_start": warm,
              "entropy": entropy["distribution"], "seconds": time.perf_counter() - start}
    write_record(layout.prepared, record)
    return record
