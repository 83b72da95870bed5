"""The CPU compat layer's seeding: a randomly initialised model (no checkpoint) is the same
model at tensor parallel 1 and 2 after ``model_parallel_seed``, on every rank.

(The RoPE and tied-embedding patches are exercised by test_parity and test_export.)
"""

from __future__ import annotations

import torch

from megatron_archer import compat
from megatron_archer.models import ModelSpec, build_gpt_model, hf_weight_buckets
from tests.distributed import run_distributed
from tests.models.checkpoints import hf_config
from tests.models.parallel import model_parallel


def _init_worker(rank: int, world_size: int) -> None:
    spec = ModelSpec.from_hf_config(hf_config("qwen2", architectures=["Qwen2ForCausalLM"]))
    weights = {}
    for tp in (1, 2):
        with model_parallel(tp):
            compat.model_parallel_seed(7)
            model = build_gpt_model(spec, backend="local", params_dtype=torch.float32)
            buckets = hf_weight_buckets(model, spec, "local")
            weights[tp] = dict(pair for bucket in buckets for pair in bucket)
    assert weights[1].keys() == weights[2].keys()
    for name, tensor in weights[1].items():
        assert torch.equal(tensor, weights[2][name]), name
    assert weights[1]["model.layers.0.self_attn.q_proj.weight"].std() > 0.01  # really random


def test_seeded_cpu_init_is_independent_of_tensor_parallel_size():
    run_distributed(_init_worker, 2)
