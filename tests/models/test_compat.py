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


def _schedule_worker(rank: int, world_size: int) -> None:
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func, p2p_communication, schedules
    from megatron.core.transformer.transformer_config import TransformerConfig

    original = (torch.zeros, torch.cuda.current_device, torch.cuda.synchronize)
    compat.apply_cpu_patches()
    compat.apply_cpu_patches()  # idempotent
    seen = []

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1)
            self.model_type = ModelType.encoder_or_decoder
            self.weight = torch.nn.Parameter(torch.ones(3))

        def set_input_tensor(self, tensor):
            pass

    def forward_step(data, model):
        seen.append((torch.zeros, torch.cuda.current_device, torch.cuda.synchronize))
        out = model.weight * next(data)
        return out, lambda output: (output.sum(), {"sum": output.sum().detach()})

    with model_parallel(1):
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([torch.ones(3), torch.ones(3)]),
            model=Tiny(), num_microbatches=2, seq_length=3, micro_batch_size=1,
            forward_only=True)
    assert [float(o["sum"]) for o in outputs] == [3.0, 3.0]
    # the model's forward (and everything outside megatron's two schedule modules) sees torch
    assert seen == [original, original]
    assert (torch.zeros, torch.cuda.current_device, torch.cuda.synchronize) == original
    from megatron.core import tensor_parallel, utils
    from megatron.core.tensor_parallel import layers, mappings

    # the sequence-parallel communication's modules are served the same way
    for module in (schedules, p2p_communication, mappings, layers, utils):
        shim = module.torch
        assert shim.zeros([], device="cuda").device.type == "cpu"
        assert shim.cuda.current_device() == torch.device("cpu") and shim.cuda.synchronize() is None
        assert shim.Tensor is torch.Tensor and shim.distributed is torch.distributed
        assert shim.cuda.is_available is torch.cuda.is_available
    with tensor_parallel.get_cuda_rng_tracker().fork():  # no CUDA generator: a no-op on CPU
        pass


def test_schedule_cuda_requests_are_served_on_cpu_in_megatrons_modules_only():
    """The schedules run on CPU; no torch function is swapped during the call (patched once, in
    megatron's schedules, p2p, tensor-parallel mappings / layers and utils modules only)."""
    run_distributed(_schedule_worker, 1)
