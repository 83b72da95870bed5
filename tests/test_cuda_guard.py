"""The CUDA data paths, run on CPU under tests/cuda_guard.py's fake CUDA device (issue: CPU tensors
in collectives of NCCL groups, CPU and CUDA tensors mixed in one op).

The guard itself is shown to catch the defects it exists for: the mixed-device patterns that
were in step_context and order_stats, and a CPU tensor in a collective of an NCCL-only group.
The real code (the actor's micro-batching, the step context with the global forking threshold,
the loss and entropy metrics, a trainer step's data path) then runs on 2 gloo ranks with every
tensor that lives on the GPU in a real run wrapped, and its results equal the plain CPU run's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_archer import distributed
from megatron_archer.actor import ActorConfig, SequenceBatch
from megatron_archer.actor.actor import ModelRunner
from megatron_archer.actor.packing import scatter_to_batch
from megatron_archer.algorithms import (
    SelectionConfig,
    build_step_context,
    config_from_dict,
    entropy_summary,
    preset,
    reduce_loss_metrics,
)
from megatron_archer.algorithms.order_stats import kth_largest
from megatron_archer.models import load_hf_model
from megatron_archer.trainer.step import MiniBatch, _loss_fn, _step_context
from tests.cuda_guard import (
    FAKE_DEVICE,
    CollectiveDeviceError,
    FakeCuda,
    MixedDeviceError,
    fake_cuda,
    served_devices,
)
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel


# ----------------------------------------------------------------- the guard catches the defects
def test_guard_computes_like_cuda_and_refuses_mixed_ops():
    with fake_cuda():
        x = torch.randn(5).to("cuda")
        assert isinstance(x, FakeCuda) and x.device == FAKE_DEVICE and x.is_cuda
        assert bool(torch.isfinite(x).all()) and math.isclose((x * 2).sum().item(),
                                                             2 * x.cpu().sum().item(), rel_tol=1e-6)
        assert (x + torch.tensor(1.0)).device == FAKE_DEVICE  # a 0-dim CPU tensor is a scalar
        assert torch.zeros(3, device=x.device).device == FAKE_DEVICE
        assert x[torch.tensor([0, 2])].device == FAKE_DEVICE  # torch moves CPU index tensors
        assert type(x.cpu()) is torch.Tensor
        with pytest.raises(MixedDeviceError):
            x + torch.zeros(5)
        with pytest.raises(TypeError, match="numpy"):
            x.numpy()


def test_guard_catches_the_old_step_context_accumulation():
    """step_context before the fix: a CPU float64 accumulator += a stack of CUDA sums."""
    with fake_cuda():
        entropy, mask = torch.rand(3, 4).cuda(), (torch.rand(3, 4) > 0.3).cuda()
        masses = torch.zeros(3, dtype=torch.float64)
        with pytest.raises(MixedDeviceError, match="shape \\(3,\\)"):
            masses += torch.stack([entropy.sum(), mask.sum(), entropy.max()]).double()
        masses += torch.stack([entropy.sum(), mask.sum(), entropy.max()]).double().cpu()  # fixed


def test_guard_catches_the_old_kth_largest_bisection():
    """order_stats before the fix: searchsorted of CUDA keys with a CPU ``mid``."""
    with fake_cuda():
        keys = torch.randint(-100, 100, (50,)).sort().values.cuda()
        mid = torch.tensor([3, 7], dtype=torch.int64)
        with pytest.raises(MixedDeviceError, match="searchsorted"):
            torch.searchsorted(keys, mid, right=False)


def test_served_devices_and_the_process_group_backend(monkeypatch):
    assert served_devices("nccl") == {"cuda"}
    assert served_devices(distributed.PROCESS_GROUP_BACKEND_CUDA) == {"cpu", "cuda"}
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("device", index)))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.append(backend))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "3")
    distributed.init_process_group()
    assert calls == [("device", 3), "cpu:gloo,cuda:nccl"]  # megatron's subgroups inherit it


# ----------------------------------------------------------------- real code on 2 gloo ranks
def _responses(rank: int, count: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed * 100 + rank)
    lengths = torch.randint(1, 9, (count,), generator=gen).tolist()
    entropy = [torch.rand(n, generator=gen) for n in lengths]
    for e in entropy[::3]:
        e[: len(e) // 2] = 0.25  # ties inside and across ranks
    return entropy


def _padded(entropy: list[torch.Tensor]):
    width = max(len(e) for e in entropy)
    values = torch.zeros(len(entropy), width)
    mask = torch.zeros(len(entropy), width, dtype=torch.bool)
    for i, e in enumerate(entropy):
        values[i, : len(e)], mask[i, : len(e)] = e, True
    return values, mask


def _runner(path, budget: int, device) -> ModelRunner:
    """A ModelRunner of the tiny model at ``path`` whose micro-batches go to ``device`` (what
    its constructor sets on CUDA)."""
    loaded = load_hf_model(path, params_dtype=torch.float32)
    runner = ModelRunner(loaded.model, loaded.spec,
                         ActorConfig(max_tokens_per_micro_batch=budget), loaded.backend)
    runner.device = device
    return runner


def _algorithm_results(rank: int, device):
    """Step contexts, k-th largest values and entropy metrics of this rank's micro-batches."""
    entropy = _responses(rank, 7)
    micro = [_padded(entropy[:4]), _padded(entropy[4:])]
    micro = [(e.to(device), m.to(device)) for e, m in micro] if device is not None else micro
    group = dist.group.WORLD
    out = {}
    for name, selection in [("forking", SelectionConfig("forking")), ("archer", SelectionConfig("archer")),
                            ("archer_soft", SelectionConfig("archer_soft"))]:
        ctx = build_step_context(micro, selection, group)
        out[name] = (ctx.num_tokens, ctx.num_selected, ctx.class_tokens, ctx.forking_threshold)
    out["kth"] = kth_largest([e[m] for e, m in micro], [1, 5, 17], group)
    out["entropy"] = entropy_summary(micro, group)
    return out


def _trainer_data_path(rank: int, runner: ModelRunner, algorithm):
    """A trainer step's data path without the model: a mini-batch as the trainer holds it (on the
    CPU), the actor's micro-batching, the step context as train_on_mini_batches builds it, the
    loss closure with its gradient, and the loss metrics."""
    gen = torch.Generator().manual_seed(7 + rank)
    ids, masks = [], []
    for _ in range(5):
        prompt, response = int(torch.randint(1, 4, (1,), generator=gen)), \
            int(torch.randint(1, 6, (1,), generator=gen))
        ids.append(torch.randint(3, 20, (prompt + response,), generator=gen))
        masks.append(torch.arange(prompt + response) >= prompt)
    batch = SequenceBatch(ids, masks)
    rows, width = batch.response_layout_mask().shape
    mini = MiniBatch(batch, torch.randn(rows, generator=gen), -torch.rand(rows, width, generator=gen),
                     old_logp=-torch.rand(rows, width, generator=gen),
                     old_entropy=torch.rand(rows, width, generator=gen),
                     ref_logp=-torch.rand(rows, width, generator=gen))
    device = runner.device
    micro = runner.micro_batches(mini.batch)
    ctx = _step_context(micro, mini, algorithm, dist.group.WORLD, (3, 1))
    loss_fn = _loss_fn(mini, algorithm, ctx, device, (3, 1))
    # the actor's per-label results -> response layout -> the batch layout (compute_logprobs_...)
    per_label = [torch.arange(m.labels.numel(), dtype=torch.float32) for m in micro]
    laid_out = [m.to_layout(v.to(m.labels.device)) for m, v in zip(micro, per_label)]
    scattered = scatter_to_batch(rows, micro, laid_out, width).cpu()
    losses, grads, sums = [scattered], [], []
    for m in micro:
        logp = (m.gather(mini.old_logp) + 0.1).to(m.response_mask.device).requires_grad_(True)
        entropy = m.gather(mini.old_entropy).to(m.response_mask.device)
        loss, metric_sums = loss_fn(m, logp, entropy)
        loss.backward()
        losses.append(torch.tensor(loss.item()))
        grads.append(logp.grad.cpu())
        sums.append(metric_sums)
    return losses, grads, reduce_loss_metrics(sums, dist.group.WORLD)


def _worker(rank: int, world_size: int, path):
    with model_parallel(1):
        plain = _algorithm_results(rank, None)
        # Archer, and Clip-Cov / KL-Cov (docs/numerics.md §10: hashes, exact means, thresholds)
        for algorithm in (preset("archer"), *(
                config_from_dict({"preset": "dapo", "selection": selection}) for selection in (
                    {"method": "clip_cov", "clip_cov": {"ratio": 0.2, "lb": -10.0, "ub": 10.0}},
                    {"method": "kl_cov", "kl_cov": {"ratio": 0.2}}))):
            runner = _runner(path, 12, None)
            plain_step = _trainer_data_path(rank, runner, algorithm)
            with fake_cuda():
                runner.device = FAKE_DEVICE
                wrapped_step = _trainer_data_path(rank, runner, algorithm)
            assert all(torch.equal(a, b) for a, b in zip(wrapped_step[0], plain_step[0]))
            assert wrapped_step[2] == plain_step[2]
            assert all(torch.equal(a, b) for a, b in zip(wrapped_step[1], plain_step[1]))
            if algorithm.selection.method != "archer":
                assert 0 < plain_step[2]["high/token_share"] < 1  # the selection is reached
        with fake_cuda():
            wrapped = _algorithm_results(rank, FAKE_DEVICE)
        assert wrapped == plain
        # the same micro-batching with an NCCL-only group: its CPU token count is refused
        batch = SequenceBatch([torch.arange(5)], [torch.arange(5) > 2])
        with fake_cuda(backend="nccl"):
            with pytest.raises(CollectiveDeviceError, match="device type cpu"):
                runner.micro_batches(batch)
        # a collective whose tensor is on CUDA on one rank and on the CPU on the other
        with fake_cuda():
            value = torch.ones(2).cuda() if rank == 0 else torch.ones(2)
            with pytest.raises(CollectiveDeviceError, match="CUDA on some ranks"):
                distributed.all_reduce_(value, dist.group.WORLD)
        # a sequence over the token budget on rank 1 only raises on both ranks
        length = 12 if rank == 1 else 4
        batch = SequenceBatch([torch.arange(length)], [torch.arange(length) > 1])
        small = _runner(path, 8, FAKE_DEVICE)
        with fake_cuda():
            with pytest.raises(ValueError, match="max_tokens_per_micro_batch"):
                small.micro_batches(batch)


def test_cuda_data_paths_on_two_ranks_equal_the_cpu_run(tmp_path):
    """Also: a collective on different devices on different ranks, and a too-long sequence on
    one rank, raise on every rank (no rank is left waiting in a collective)."""
    run_distributed(_worker, 2, write_checkpoint(tmp_path / "qwen3", "qwen3"))
