"""A checkpoint that does not match its config is refused, naming the tensor; sharded
checkpoints (model.safetensors.index.json) read like single-file ones."""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megatron_archer.models import CheckpointError, ModelSpec
from megatron_archer.models.hf_import import SafetensorsCheckpoint, check_checkpoint
from tests.models.checkpoints import hf_config, randomize_, write_checkpoint


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "qwen3", "qwen3")


def _edited(src, dst, edit):
    """A copy of checkpoint ``src`` whose tensors dict went through ``edit``."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _check(path):
    check_checkpoint(SafetensorsCheckpoint(path), ModelSpec.from_pretrained(path), "local")


def test_valid_checkpoint_passes(qwen3):
    _check(qwen3)


def test_missing_tensor(qwen3, tmp_path):
    path = _edited(qwen3, tmp_path / "c", lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.1\.self_attn\.k_norm"):
        _check(path)


def test_wrong_shape(qwen3, tmp_path):
    def shrink(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)

    path = _edited(qwen3, tmp_path / "c", shrink)
    with pytest.raises(
        CheckpointError,
        match=r"model\.layers\.0\.self_attn\.k_proj\.weight: checkpoint has shape \[32, 64\], "
        r"the config implies \[64, 64\]",
    ):
        _check(path)


def test_unexpected_tensor(qwen3, tmp_path):
    def add(tensors):
        tensors["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)

    path = _edited(qwen3, tmp_path / "c", add)
    with pytest.raises(CheckpointError, match=r"not used by Qwen3ForCausalLM: .*o_proj\.bias"):
        _check(path)


def test_no_safetensors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_sharded_checkpoint_reads_like_a_single_file(qwen3, tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(hf_config("qwen3"))
    randomize_(model, seed=0)
    model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    sharded, single = SafetensorsCheckpoint(tmp_path), SafetensorsCheckpoint(qwen3)
    assert sharded.names() == single.names()
    for name in single.names():
        assert torch.equal(sharded.get(name), single.get(name)), name
    _check(tmp_path)


def test_a_missing_save_dependency_is_named_before_the_save(monkeypatch):
    """Without psutil megatron's file-writer workers raise before they report and the save waits
    forever: the trainer calls this check before any work."""
    import sys

    from megatron_archer.models.dist_checkpoint import require_save_dependencies

    require_save_dependencies()
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    with pytest.raises(RuntimeError, match="^saving checkpoints needs psutil .*pip install psutil$"):
        require_save_dependencies()


@pytest.mark.parametrize("damage", ["truncated", "empty", "random"])
def test_a_damaged_safetensors_file_is_named(qwen3, tmp_path, damage):
    bad = tmp_path / damage
    shutil.copytree(qwen3, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                         "random": bytes(range(256)) * 8}[damage])
    with pytest.raises(CheckpointError, match=rf"{weights}.*(truncated|damaged)"):
        _check(bad)


def test_a_damaged_config_json_is_named(qwen3, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(qwen3, bad)
    (bad / "config.json").write_text("{trunc")
    with pytest.raises(ValueError, match=rf"^{bad / 'config.json'} is not valid JSON"):
        ModelSpec.from_pretrained(bad)
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        ModelSpec.from_pretrained(bad)
