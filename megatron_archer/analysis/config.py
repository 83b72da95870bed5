"""AnalysisConfig: what an entropy analysis measures (docs/numerics.md §6) and how, validated at construction.

Kept free of heavy imports so the CLI can build its options from it without loading models.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AnalysisConfig:
    """What to measure and how.

    ``checkpoint``: Hugging Face model directory (its tokenizer unless ``tokenizer`` is given);
    ``responses``: a saved responses.jsonl to measure, else ``prompts`` (a prompt set, first
    ``num_prompts`` of it, ``template`` applied) gets ``samples_per_prompt`` responses of at most
    ``max_new_tokens`` at ``temperature``; ``compare_checkpoint``: a second model scored on the
    same tokens (``rho`` for the overlap, ``num_bins`` percentile bins); ``min_count`` and
    ``top_tokens`` shape the token table; ``rendered_samples`` responses go to sample.html;
    ``sweep``: "threshold:t_high:t_low" settings (threshold may be ``p80``) evaluated on
    ``prompts`` with ``sweep_samples`` per problem and the ``reward`` function.
    """

    checkpoint: str
    output_dir: str
    prompts: str | None = None
    responses: str | None = None
    compare_checkpoint: str | None = None
    tokenizer: str | None = None
    template: str = "paper"
    num_prompts: int | None = None
    samples_per_prompt: int = 1
    max_new_tokens: int = 1024
    temperature: float = 1.0
    seed: int = 0
    min_count: int = 100
    top_tokens: int = 20
    rho: float = 0.2
    num_bins: int = 20
    rendered_samples: int = 4
    sweep: tuple[str, ...] = ()
    sweep_samples: int = 4
    reward: str = "math"
    max_tokens_per_micro_batch: int = 8192
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    bf16: bool = False

    def __post_init__(self):
        if self.prompts is None and self.responses is None:
            raise ValueError("give prompts (to generate responses) or responses (a saved jsonl)")
        if self.sweep and self.prompts is None:
            raise ValueError("sweep needs prompts (problems with reference answers)")
        if not 0 < self.rho <= 1:
            raise ValueError(f"rho={self.rho} must be in (0, 1]")
        for name in ("samples_per_prompt", "max_new_tokens", "min_count", "num_bins",
                     "sweep_samples", "tensor_parallel", "pipeline_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
