"""The whole model under sequence parallelism on CPU, real gloo processes: megatron's GPTModel at
TP 2 with ``sequence_parallel`` (its sequence-sharded norms and residuals, gather / reduce-scatter
around every parallel linear, all through compat on CPU) on a packed row of unequal sequences
padded to a multiple of TP gives the logits of TP 2 without it and of the unsplit model; the
vocab-parallel op gets the whole row's vocab-sharded logits from the output layer, so log-probs
and entropy agree too; and after ``finalize_model_grads`` every parameter gradient equals TP 2's,
the norm weights' included (each TP rank sees only its own tokens' part of their gradient).
With context parallelism too (TP 2 x CP 2, each sequence padded to 2 CP x TP), log-probs,
entropy and gradients equal TP 2's."""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.actor.context_parallel import split_for_context_parallel
from megatron_archer.actor.cpu_ddp import finalize_model_grads_cpu
from megatron_archer.actor.packing import pack
from megatron_archer.ops import vocab_parallel_logprobs_and_entropy
from tests.actor.common import make_batch
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import gather_vocab, model_parallel
from tests.numerics import accuracy_failure


def _batch():
    batch = make_batch(5, seed=19, min_len=3, max_len=29)
    assert sum(batch.lengths) % 2  # the filler really pads the row
    return batch


def _run(path, tp, mb, weight, sequence_parallel=False, cp=1, dtype=torch.float32):
    """Full-vocabulary logits, layout log-probs and entropy (summed over CP), and finalized
    gradients of sum(weight * logp); under CP ``mb`` is split here (2 CP x TP multiples)."""
    from megatron_archer.models import load_hf_model

    with model_parallel(tp, context_parallel=cp):
        model = load_hf_model(path, params_dtype=dtype,
                              config_overrides={"sequence_parallel": sequence_parallel}).model
        assert model.config.sequence_parallel == sequence_parallel
        if cp > 1:
            mb = split_for_context_parallel(mb, cp, parallel_state.get_context_parallel_rank(), tp)
        logits = model(mb.input_ids, mb.position_ids, attention_mask=None,
                       packed_seq_params=mb.packed_seq_params())
        logp, entropy = vocab_parallel_logprobs_and_entropy(
            logits[0, mb.label_positions], mb.labels,
            tp_group=parallel_state.get_tensor_model_parallel_group(), vocab_size=250)
        logp, entropy = mb.to_layout(logp), mb.to_layout(entropy)
        (logp * weight).sum().backward()
        finalize_model_grads_cpu([model])
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        logp, entropy = logp.detach().clone(), entropy.clone()
        if cp > 1:  # each token is scored on one CP rank
            for tensor in (logp, entropy):
                dist.all_reduce(tensor, group=parallel_state.get_context_parallel_group())
        return gather_vocab(logits.detach()), logp, entropy, grads


def _failures(what, tested, baseline, reference, names=("logits", "logp", "entropy"), grads=1.0):
    """``tested`` as accurate as ``baseline`` against the float64 ``reference`` (tests/numerics.py)
    for each named output (log-probs and entropy round at the logits' scale) and, unless ``grads``
    is None, every gradient (``tested``'s times ``grads``)."""
    scale = reference[0].abs().max().item()
    failures = [accuracy_failure(f"{what} {name}", got, base, want,
                                 scale=scale if name != "logits" else None)
                for name, got, base, want in zip(names, tested, baseline, reference)]
    if grads is not None:
        failures.extend(accuracy_failure(f"{what} grad {n}", tested[3][n] * grads, baseline[3][n], g)
                        for n, g in reference[3].items())
    return [f for f in failures if f]


def _worker(rank, world_size, checkpoints):
    batch = _batch()
    mb = pack(batch, list(range(5)), multiple=world_size)
    weight = torch.randn(mb.response_mask.shape, generator=torch.Generator().manual_seed(3))
    failures = []
    for case, path in checkpoints.items():
        unsplit = _run(path, 1, mb, weight)
        unsplit64 = _run(path, 1, mb, weight, dtype=torch.float64)
        tp2 = _run(path, world_size, mb, weight)
        tp2_64 = _run(path, world_size, mb, weight, dtype=torch.float64)
        sp = _run(path, world_size, mb, weight, sequence_parallel=True)
        # TP 2 + SP: outputs as accurate as the unsplit model's, gradients as TP 2's
        failures += _failures(f"{case} vs unsplit", sp, unsplit, unsplit64, grads=None)
        failures += _failures(f"{case} vs TP 2", sp, tp2, tp2_64, names=())
        # every GEMM sees the same shapes with and without SP (the row is gathered first), and a
        # sum of two partials rounds the same in either order
        if not torch.equal(sp[0], tp2[0]):
            failures.append(f"{case}: logits differ from TP 2 without SP")
    assert not failures, "; ".join(failures)


def test_model_at_tp2_with_sequence_parallel_equals_tp2_and_the_unsplit_model(tmp_path):
    cases = ("qwen3", "llama3")  # q/k norms and GQA 8:2; llama3 RoPE scaling
    run_distributed(_worker, 2, {c: write_checkpoint(tmp_path / c, c) for c in cases})


def _cp_worker(rank, world_size, path):
    batch = _batch()
    mb = pack(batch, list(range(5)))
    weight = torch.randn(mb.response_mask.shape, generator=torch.Generator().manual_seed(3))
    tp2 = _run(path, 2, pack(batch, list(range(5)), multiple=2), weight)  # DP 2 x TP 2
    tp2_64 = _run(path, 2, pack(batch, list(range(5)), multiple=2), weight, dtype=torch.float64)
    both = _run(path, 2, mb, weight, sequence_parallel=True, cp=2)  # TP 2 x CP 2
    # DDP averages over DP x CP: each of TP 2's two DP ranks holds the whole step's gradient, each
    # CP rank half of it summed (the actor's loss scale and megatron's x CP undo both)
    both = (tp2[0], *both[1:])  # the logits of a CP rank cover its chunks only; not compared
    failures = _failures("TP 2 x CP 2 + SP", both, tp2, tp2_64, grads=2.0)
    assert not failures, "; ".join(failures)


def test_sequence_and_context_parallel_together_equal_tp2(tmp_path):
    run_distributed(_cp_worker, 4, write_checkpoint(tmp_path / "qwen3", "qwen3"))
