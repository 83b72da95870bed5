"""The whole model under sequence parallelism on CPU, real gloo processes: megatron's GPTModel at
TP 2 with ``sequence_parallel`` (its sequence-sharded norms and residuals, gather / reduce-scatter
around every parallel linear, all through compat on CPU) on a packed row of unequal sequences
padded to a multiple of TP gives the logits of TP 2 without it and of the unsplit model; the
vocab-parallel op gets the whole row's vocab-sharded logits from the output layer, so log-probs
and entropy agree too; and after ``finalize_model_grads`` every parameter gradient equals TP 2's,
the norm weights' included (each TP rank sees only its own tokens' part of their gradient)."""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_archer.actor.cpu_ddp import finalize_model_grads_cpu
from megatron_archer.actor.packing import pack
from megatron_archer.ops import vocab_parallel_logprobs_and_entropy
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import gather_vocab, model_parallel


def _run(path, tp, mb, weight, sequence_parallel=False):
    """Full-vocabulary logits, log-probs, entropy and finalized gradients of sum(weight * logp)."""
    from megatron_archer.models import load_hf_model

    with model_parallel(tp):
        model = load_hf_model(path, params_dtype=torch.float32,
                              config_overrides={"sequence_parallel": sequence_parallel}).model
        assert model.config.sequence_parallel == sequence_parallel
        logits = model(mb.input_ids, mb.position_ids, attention_mask=None,
                       packed_seq_params=mb.packed_seq_params())
        logp, entropy = vocab_parallel_logprobs_and_entropy(
            logits[0, mb.label_positions], mb.labels,
            tp_group=parallel_state.get_tensor_model_parallel_group(), vocab_size=250)
        (logp * weight).sum().backward()
        finalize_model_grads_cpu([model])
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        return gather_vocab(logits.detach()), logp.detach(), entropy, grads


def _worker(rank, world_size, checkpoints):
    batch = make_batch(5, seed=19, min_len=3, max_len=29)
    assert sum(batch.lengths) % world_size  # the filler really pads the row
    mb = pack(batch, list(range(5)), multiple=world_size)
    weight = torch.randn(mb.labels.shape, generator=torch.Generator().manual_seed(3))
    failures = []
    for case, path in checkpoints.items():
        unsplit = _run(path, 1, mb, weight)
        tp2 = _run(path, world_size, mb, weight)
        sp = _run(path, world_size, mb, weight, sequence_parallel=True)
        for name, got, want in zip(("logits", "logp", "entropy"), sp, unsplit):
            diff = (got - want).abs().max().item()
            if rank == 0:
                print(f"{case}: TP 2 + SP {name} differ from the unsplit model by {diff:.2g}")
            if diff > 2e-5:
                failures.append(f"{case}: {name} vs unsplit {diff:.3g}")
        if not torch.equal(sp[0], tp2[0]):
            failures.append(f"{case}: logits differ from TP 2 without SP")
        worst = 0.0
        for name, want in tp2[3].items():
            diff = (sp[3][name] - want).abs().max().item() / (want.abs().max().item() + 1e-6)
            worst = max(worst, diff)
            if diff > 1e-5:
                failures.append(f"{case}: grad {name} {diff:.3g}")
        if rank == 0:
            print(f"{case}: TP 2 + SP gradients differ from TP 2 by {worst:.2g} (relative)")
    assert not failures, "; ".join(failures)


def test_model_at_tp2_with_sequence_parallel_equals_tp2_and_the_unsplit_model(tmp_path):
    cases = ("qwen3", "llama3")  # q/k norms and GQA 8:2; llama3 RoPE scaling
    run_distributed(_worker, 2, {c: write_checkpoint(tmp_path / c, c) for c in cases})
