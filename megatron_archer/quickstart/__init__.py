"""The CPU quick start (``make quickstart``): tiny Qwen3 model and tokenizer built locally, a short
supervised warm start on the step-by-step arithmetic task, held-out accuracy before, Archer RL
under torchrun (2 processes, tensor parallel 2, local engine), held-out accuracy after, a PNG of
the curves.

``python -m megatron_archer.quickstart [--out DIR] [sizes...]`` runs every stage (``pipeline.run``);
the stages are importable on their own: ``build`` (model, tokenizer, data), ``warm_start`` (SFT),
``plot`` (curves from metrics.jsonl).
"""

from megatron_archer.quickstart.build import QuickstartData, build_base_model, write_datasets
from megatron_archer.quickstart.plot import plot_curves
from megatron_archer.quickstart.warm_start import warm_start

__all__ = ["QuickstartData", "build_base_model", "plot_curves", "warm_start", "write_datasets"]
