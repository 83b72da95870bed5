"""Per-GPU memory of the actor's training step for layouts that need not be built: arithmetic.

    python tools/memory_estimate.py              # the layout-comparison table (markdown)

The memory model and every formula are ``megatron_archer.dryrun.memory`` (its docstring); the
models are the published config.json files under examples/scale/model_configs/. For a config
as it will run, ``megatron-archer plan CONFIG`` builds every rank and reports the same terms
from what it built; this table is for comparing layouts quickly (tests/test_scale_configs.py
holds both to exact agreement on the parameter, gradient and optimizer terms).
"""

from __future__ import annotations

import warnings
from pathlib import Path

# megatron-core's notices that Transformer Engine / Apex are absent, printed at import
warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")

from megatron_archer.dryrun.memory import GIB, Arch, Layout, estimate  # noqa: E402
from megatron_archer.models import ModelSpec  # noqa: E402

CONFIGS = Path(__file__).parents[1] / "examples" / "scale" / "model_configs"
MODELS = {
    name: Arch.from_spec(ModelSpec.from_pretrained(CONFIGS / directory), name)
    for name, directory in (("R1-Distill-Qwen-1.5B", "deepseek_r1_distill_qwen_1.5b"),
                            ("Qwen3-8B", "qwen3_8b_base"), ("Qwen3-14B", "qwen3_14b_base"),
                            ("Qwen3-32B", "qwen3_32b_base"), ("Qwen3-30B-A3B", "qwen3_30b_a3b"))
}

# Layouts of the examples/scale models; tokens = max prompt + max response
TABLE = [
    ("R1-Distill-Qwen-1.5B", Layout(tp=1, pp=1, dp=8, tokens=18432, chunk=4096)),
    ("R1-Distill-Qwen-1.5B", Layout(tp=1, pp=1, dp=8, tokens=18432)),
    ("Qwen3-8B", Layout(tp=4, pp=1, dp=4, tokens=24576, chunk=4096)),
    ("Qwen3-8B", Layout(tp=4, pp=1, dp=4, tokens=24576, chunk=4096, recompute=True)),
    ("Qwen3-14B", Layout(tp=8, pp=1, dp=2, tokens=24576, chunk=4096)),
    ("Qwen3-14B", Layout(tp=8, pp=1, dp=2, tokens=24576, chunk=4096, recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=2, tokens=24576, chunk=4096)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=2, tokens=24576, chunk=4096, recompute=True)),
    # long responses (docs/numerics.md §9): context parallel 2 on the same 32 GPUs, 20480-token
    # responses (tokens 24576) and 29k (tokens 32768); the config adds sequence parallelism
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, tokens=24576, chunk=4096, recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, tokens=32768, chunk=4096, recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=24576, chunk=4096,
                         recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=32768, chunk=4096,
                         recompute=True)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=24576, chunk=4096)),
    ("Qwen3-32B", Layout(tp=8, pp=2, dp=1, cp=2, sp=True, tokens=32768, chunk=4096)),
    # mixture of experts on 16 GPUs, experts over expert parallel 8: the config's layout (tp 2
    # with SP, pp 2: expert data 1), without recompute, and pp 1 (expert data 2) at tp 1 and 2
    ("Qwen3-30B-A3B", Layout(tp=2, pp=2, dp=4, sp=True, ep=8, etp=1, tokens=18432, chunk=4096,
                             recompute=True)),
    ("Qwen3-30B-A3B", Layout(tp=2, pp=2, dp=4, sp=True, ep=8, etp=1, tokens=18432, chunk=4096)),
    ("Qwen3-30B-A3B", Layout(tp=1, pp=1, dp=16, ep=8, tokens=18432, chunk=4096, recompute=True)),
    ("Qwen3-30B-A3B", Layout(tp=2, pp=1, dp=8, sp=True, ep=8, etp=1, tokens=18432, chunk=4096,
                             recompute=True)),
]


def markdown(rows=TABLE) -> str:
    head = ("| model | params | tp | pp | dp | cp | sp | ep x etp | tokens | recompute | chunk | weights | "
            "grads | optimizer | reference | activations | logits | log-prob work | total GiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, layout in rows:
        arch = MODELS[name]
        t = {k: v / GIB for k, v in estimate(arch, layout).items()}
        lines.append(
            f"| {name} | {arch.parameters() / 1e9:.2f}B | {layout.tp} | {layout.pp} | {layout.dp} "
            f"| {layout.cp} | {'yes' if layout.sp else 'no'} "
            f"| {f'{layout.ep} x {layout.expert_tensor}' if arch.experts else '-'} | {layout.tokens} "
            f"| {'yes' if layout.recompute else 'no'} | {layout.chunk or 'none'} "
            f"| {t['weights']:.1f} | {t['grads']:.1f} | {t['optimizer']:.1f} | {t['reference']:.1f} "
            f"| {t['activations']:.1f} | {t['logits']:.1f} | {t['logprob_work']:.1f} "
            f"| {t['total']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
