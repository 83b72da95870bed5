"""A Qwen3-MoE checkpoint as a megatron model: logits equal transformers' at tensor, expert and
expert-tensor parallel layouts (real gloo processes), and the Hugging Face export gives back the
checkpoint's tensors bit for bit. Equal means as accurate against transformers in float64 as
transformers in float32 is (tests/numerics.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_archer.models import hf_weight_buckets, load_hf_model
from megatron_archer.models.convert import hf_to_megatron, main, megatron_to_hf
from megatron_archer.models.hf_import import SafetensorsCheckpoint
from tests.distributed import run_distributed
from tests.models.checkpoints import hf_logits, write_checkpoint
from tests.models.parallel import gather_vocab, model_parallel
from tests.numerics import accuracy_failure

# (tensor, expert, expert-tensor) parallel sizes on 2 ranks
LAYOUTS = ((1, 1, 1), (1, 2, 1), (2, 1, 2), (2, 2, 1))


def _logits_worker(rank: int, world_size: int, checkpoint) -> None:
    input_ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(24).expand(2, 24)
    reference = hf_logits(checkpoint, input_ids), hf_logits(checkpoint, input_ids, torch.float64)
    failures = []
    for tp, ep, etp in LAYOUTS:
        with model_parallel(tp, expert_parallel=ep, expert_tensor_parallel=etp):
            loaded = load_hf_model(checkpoint, params_dtype=torch.float32)
            loaded.model.eval()
            with torch.no_grad():
                logits = gather_vocab(loaded.model(input_ids, position_ids, None))
            failures.append(accuracy_failure(f"tp={tp} ep={ep} etp={etp} logits",
                                             logits[..., :250], *reference))
    failures = [f for f in failures if f]
    assert not failures, "; ".join(failures)


def test_moe_logits_match_transformers(tmp_path):
    checkpoint = write_checkpoint(tmp_path / "moe", "qwen3_moe")
    run_distributed(_logits_worker, 2, checkpoint)


def _export_worker(rank: int, world_size: int, checkpoint, root) -> None:
    original = SafetensorsCheckpoint(checkpoint)
    # (tensor, expert, expert-tensor, pipeline): at PP 2 each stage broadcasts its layer's experts
    for tp, ep, etp, pp in (*((*layout, 1) for layout in LAYOUTS), (1, 1, 1, 2)):
        with model_parallel(tp, pp, expert_parallel=ep, expert_tensor_parallel=etp):
            loaded = load_hf_model(checkpoint, params_dtype=torch.float32)
            exported = {name: tensor for bucket in hf_weight_buckets(
                loaded.model, loaded.spec, loaded.backend, bucket_bytes=50_000)
                for name, tensor in bucket}
        where = f"tp={tp} ep={ep} etp={etp} pp={pp}"
        assert set(exported) == original.names(), f"{where}: names differ"
        differ = [n for n, t in exported.items() if not torch.equal(t, original.get(n))]
        assert not differ, f"{where}: {differ} differ"
    hf_to_megatron(checkpoint, root / "mg_ep2", tensor_parallel=1, expert_parallel=2)
    megatron_to_hf(root / "mg_ep2", root / "hf_tp2_etp2", tensor_parallel=2)
    megatron_to_hf(root / "mg_ep2", root / "hf_tp2_ep2", tensor_parallel=2, expert_parallel=2,
                   expert_tensor_parallel=1)


def test_moe_export_and_conversion_round_trip_are_bit_exact(tmp_path):
    """Every rank's weight buckets hold the checkpoint's on-disk per-expert tensors bit for bit
    at each layout; HF -> megatron at EP 2 -> HF at TP 2 (experts split by ETP 2) and at
    TP 2 x EP 2 gives back the same model.safetensors, byte for byte."""
    checkpoint = write_checkpoint(tmp_path / "moe", "qwen3_moe")
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in SafetensorsCheckpoint(checkpoint).names()
    run_distributed(_export_worker, 2, checkpoint, tmp_path)
    for out in ("hf_tp2_etp2", "hf_tp2_ep2"):
        for name in ("model.safetensors", "config.json"):
            assert (tmp_path / out / name).read_bytes() == (checkpoint / name).read_bytes(), out


def test_convert_cli_takes_expert_sizes_and_checks_them(tmp_path, capsys):
    """``--ep`` / ``--etp`` reach the layout check: on one process EP 2 does not fit, and EP 3
    does not divide the 4 experts; each is one line naming the sizes."""
    checkpoint = write_checkpoint(tmp_path / "moe", "qwen3_moe")
    for args, message in (
            (["--ep", "2"], "world size 1 is not a multiple of expert-tensor x expert x pipeline "
                            "parallel 1 x 2 x 1"),
            (["--ep", "3"], "num_experts=4 is not divisible by expert-parallel size 3")):
        with pytest.raises(SystemExit) as exit_:
            main(["hf-to-megatron", "--hf", str(checkpoint), "--out", str(tmp_path / "out"),
                  *args])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err
