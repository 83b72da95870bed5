"""Model checkpoints are written by every data-parallel rank (megatron's fully parallel save), not
by data-parallel rank 0 alone, synchronously or as an async request, and load back exactly."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from megatron_archer import compat
from megatron_archer.models import load_hf_model
from megatron_archer.models.dist_checkpoint import load_model_checkpoint, save_model_checkpoint
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel


def _rank_bytes(weights: Path, world_size: int) -> list[int]:
    """Bytes of the .distcp files each rank wrote (torch_dist names them __<rank>_<i>.distcp)."""
    return [sum(f.stat().st_size for f in weights.glob(f"__{rank}_*.distcp"))
            for rank in range(world_size)]


def _worker(rank, world_size, source, root):
    with model_parallel(1):  # data parallel 2: every weight is replicated on both ranks
        loaded = load_hf_model(source, params_dtype=torch.float32)
        expected = {k: v.clone() for k, v in loaded.model.state_dict().items()
                    if isinstance(v, torch.Tensor)}
        for mode in ("sync", "async"):
            directory = root / mode
            request = save_model_checkpoint(loaded.model, loaded.spec, directory,
                                            hf_source=source, async_save=mode == "async")
            assert (request is None) == (mode == "sync")
            if request is not None:
                with compat.dist_checkpoint_save_on_cpu():
                    request.execute_sync()
            dist.barrier()
            written = _rank_bytes(directory / "weights", world_size)
            total = sum(v.numel() * v.element_size() for v in expected.values())
            assert min(written) > 0.3 * total, (mode, written, total)  # both ranks share it
            back = load_model_checkpoint(directory, backend="local")
            for key, value in back.model.state_dict().items():
                if key in expected:
                    assert torch.equal(value, expected[key]), (mode, key)


def test_saves_are_spread_over_data_parallel_ranks(tmp_path):
    source = write_checkpoint(tmp_path / "hf", "qwen3")
    run_distributed(_worker, 2, source, tmp_path)
