"""A tiny run directory for trainer tests: Qwen3 checkpoint with the tiny tokenizer, arithmetic data."""

from __future__ import annotations

from pathlib import Path

from megatron_archer.data import build_tiny_tokenizer, write_arithmetic_jsonl
from tests.models.checkpoints import write_checkpoint

CPU_CONFIG = Path(__file__).parents[2] / "examples" / "configs" / "archer_arithmetic_cpu.yaml"


def tiny_run(tmp_path: Path, prompts: int = 32) -> list[str]:
    """Write the model and data under ``tmp_path``; the overrides pointing the CPU config at them."""
    tokenizer = build_tiny_tokenizer()
    model = write_checkpoint(tmp_path / "model", "qwen3", vocab_size=len(tokenizer))
    tokenizer.save_pretrained(model)
    data = write_arithmetic_jsonl(tmp_path / "arithmetic.jsonl", prompts)
    return [f"model.path={model}", f"data.path={data}", f"logging.dir={tmp_path / 'run'}",
            "logging.progress=false"]
