"""Checkpoint conversion HF <-> megatron distributed checkpoint (megatron_archer.models.convert).

One module fixture converts tiny checkpoints once: the CLI itself (one process) writes a
megatron checkpoint at TP 1, then two gloo ranks export it at TP 2, and convert a tied bf16
model (vocabulary 300: padded to 512 at TP 2, 384 at TP 1) to megatron at TP 2 and back at
PP 2 in 40 KB shards. The tests then check the outputs, the writer's atomicity and the errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file

from megatron_archer.data.tiny_tokenizer import build_tiny_tokenizer
from megatron_archer.models import CheckpointError, UnsupportedModelError, hf_save
from megatron_archer.models.convert import hf_to_megatron, main, megatron_to_hf
from megatron_archer.models.hf_import import SafetensorsCheckpoint
from megatron_archer.models.hf_save import parse_size, write_hf_checkpoint
from tests.distributed import run_distributed
from tests.models.checkpoints import hf_logits, write_checkpoint

REPO = Path(__file__).resolve().parents[2]
SHARD = 40_000  # below the 300 x 64 bf16 embedding (38.4 KB) plus any other tensor


def _convert_worker(rank: int, world_size: int, root: Path) -> None:
    megatron_to_hf(root / "qwen3_mg", root / "qwen3_hf", tensor_parallel=2)
    megatron_to_hf(root / "qwen3_mg", root / "qwen3_bf16", tensor_parallel=2, dtype=torch.bfloat16)
    hf_to_megatron(root / "tied", root / "tied_mg", tensor_parallel=2)
    megatron_to_hf(
        root / "tied_mg", root / "tied_hf", tensor_parallel=1, pipeline_parallel=2,
        max_shard_size=f"{SHARD}B",
    )  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    build_tiny_tokenizer().save_pretrained(write_checkpoint(root / "qwen3", "qwen3"))
    write_checkpoint(root / "tied", "qwen2_tied", dtype=torch.bfloat16, vocab_size=300)
    cli = [sys.executable, str(REPO / "tools" / "convert_checkpoint.py")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*cli, "hf-to-megatron", "--hf", root / "qwen3", "--out", root / "qwen3_mg"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    run_distributed(_convert_worker, 2, root)
    return root


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(directory)
    return {name: checkpoint.get(name) for name in checkpoint.names()}


def test_round_trip_through_tp1_and_tp2_is_byte_identical(root):
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        assert (root / "qwen3_hf" / name).read_bytes() == (root / "qwen3" / name).read_bytes()
    assert sorted(os.listdir(root / "qwen3_hf")) == sorted(os.listdir(root / "qwen3"))


def test_output_loads_in_transformers_with_equal_logits(root):
    for converted, original, vocab in (("qwen3_hf", "qwen3", 250), ("tied_hf", "tied", 300)):
        input_ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
        expected = hf_logits(root / original, input_ids)
        assert torch.equal(hf_logits(root / converted, input_ids), expected), converted


def test_tp2_to_pp2_sharded_output_has_a_correct_index(root):
    out = root / "tied_hf"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    original = load_file(root / "tied" / "model.safetensors")
    assert set(index["weight_map"]) == set(original)  # the tied lm_head is not written
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in out.glob("*.safetensors")) == files
    total = 0
    for file in files:
        with safe_open(out / file, framework="pt") as f:
            names = set(f.keys())
            assert names == {n for n, v in index["weight_map"].items() if v == file}
            sizes = [f.get_tensor(n).numel() * 2 for n in names]
        assert len(names) == 1 or sum(sizes) <= SHARD, file
        total += sum(sizes)
    assert index["metadata"]["total_size"] == total
    exported = _tensors(out)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name


def test_dtype_option_casts_tensors_and_config(root):
    original, exported = _tensors(root / "qwen3"), _tensors(root / "qwen3_bf16")
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor.to(torch.bfloat16)), name
    assert json.loads((root / "qwen3_bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((root / "qwen3" / "config.json").read_text())["dtype"] == "float32"


def test_tokenizer_files_are_carried_along(root):
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
    for copy in (root / "qwen3_mg" / "hf", root / "qwen3_hf"):
        for name in names:
            assert (copy / name).read_bytes() == (root / "qwen3" / name).read_bytes(), copy / name
    original, converted = (
        transformers.AutoTokenizer.from_pretrained(root / name) for name in ("qwen3", "qwen3_hf")
    )
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    text = converted.apply_chat_template(chat, tokenize=False)
    assert text == original.apply_chat_template(chat, tokenize=False)
    assert converted(text)["input_ids"] == original(text)["input_ids"]
    assert converted.eos_token == original.eos_token


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _buckets(directory: Path):
    tensors = load_file(directory / "model.safetensors")
    return [[(name, tensors[name])] for name in sorted(tensors)]


def test_crash_mid_write_leaves_no_output_and_the_source_untouched(root, tmp_path, monkeypatch):
    source = root / "qwen3_mg" / "hf"
    before = _snapshot(source)
    real_save_file, calls = hf_save.save_file, []

    def failing_save_file(*args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save_file(*args, **kwargs)

    monkeypatch.setattr(hf_save, "save_file", failing_save_file)
    buckets = _buckets(root / "qwen3")
    with pytest.raises(OSError, match="disk full"):
        write_hf_checkpoint(buckets, tmp_path / "out", metadata_dir=source, max_shard_bytes=100_000)
    assert os.listdir(tmp_path) == []  # neither the output nor its temporary sibling
    # with --force, the old output stays whole until the new one is complete
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        write_hf_checkpoint(buckets, tmp_path / "out", metadata_dir=source, max_shard_bytes=100_000,
                            force=True)  # fmt: skip
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["old.txt"]
    assert _snapshot(source) == before


def test_existing_output_is_replaced_only_with_force(root, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    source = root / "qwen3_mg" / "hf"
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        write_hf_checkpoint(_buckets(root / "qwen3"), out, metadata_dir=source)
    write_hf_checkpoint(_buckets(root / "qwen3"), out, metadata_dir=source, force=True)
    assert "old.txt" not in os.listdir(out)
    written = (out / "model.safetensors").read_bytes()
    assert written == (root / "qwen3" / "model.safetensors").read_bytes()
    assert os.listdir(tmp_path) == ["out"]


def test_errors_name_the_problem(root, tmp_path):
    """Checked from the files before any process group exists, so no ranks are needed."""
    hf, mg = root / "qwen3", root / "qwen3_mg"
    with pytest.raises(FileNotFoundError, match="missing: no such directory"):
        hf_to_megatron(tmp_path / "missing", tmp_path / "out")
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint: no config.json"):
        hf_to_megatron(root / "qwen3_mg", tmp_path / "out")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_bytes((hf / "config.json").read_bytes())
    with pytest.raises(CheckpointError, match="not a Hugging Face checkpoint: .*model.safetensors"):
        hf_to_megatron(tmp_path / "no_weights", tmp_path / "out")
    (tmp_path / "mistral").mkdir()
    config = json.loads((hf / "config.json").read_text())
    (tmp_path / "mistral" / "config.json").write_text(
        json.dumps({**config, "architectures": ["MistralForCausalLM"]})
    )
    with pytest.raises(UnsupportedModelError, match="architectures=\\['MistralForCausalLM'\\]"):
        hf_to_megatron(tmp_path / "mistral", tmp_path / "out")
    with pytest.raises(UnsupportedModelError, match="num_attention_heads=8 is not divisible .* 3"):
        hf_to_megatron(hf, tmp_path / "out", tensor_parallel=3)
    with pytest.raises(UnsupportedModelError, match="num_hidden_layers=2 is not divisible by pipe"):
        megatron_to_hf(mg, tmp_path / "out", pipeline_parallel=4)
    with pytest.raises(ValueError, match="world size 1 is not a multiple of .* 2 x 1"):
        megatron_to_hf(mg, tmp_path / "out", tensor_parallel=2)
    with pytest.raises(CheckpointError, match="not a megatron-archer model checkpoint"):
        megatron_to_hf(hf, tmp_path / "out")
    with pytest.raises(FileExistsError, match="qwen3_hf exists and is not empty"):
        megatron_to_hf(mg, root / "qwen3_hf")
    with pytest.raises(ValueError, match="size '5 GBs'"):
        megatron_to_hf(mg, tmp_path / "out", max_shard_size="5 GBs")
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors_with_status_2(root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["megatron-to-hf", "--megatron", str(root / "qwen3"), "--out", str(tmp_path / "o")])
    assert exit_info.value.code == 2
    assert "megatron-to-hf: error: " in capsys.readouterr().err


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("500MiB") == 500 * 2**20
    assert parse_size("40KB") == 40_000
    assert parse_size(123) == 123
    with pytest.raises(ValueError, match="must be positive"):
        parse_size("0")
