"""examples/scale: the configs validate, the launch scripts parse, tools/memory_estimate.py counts
parameters exactly and its table is consistent."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import transformers

from megatron_archer.models.spec import ModelSpec
from megatron_archer.trainer import load_config
from tests.models.checkpoints import hf_config

ROOT = Path(__file__).parents[1]
SCALE = ROOT / "examples" / "scale"
_spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "tools" / "memory_estimate.py")
me = sys.modules["memory_estimate"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(me)


@pytest.mark.parametrize("path", sorted(SCALE.glob("*.yaml")), ids=lambda p: p.name)
def test_scale_config_loads(path):
    config = load_config(path)
    assert config.rollout.engine == "sglang" and config.actor.lr == 1e-6
    if config.algorithm.selection.method == "forking":  # docs/numerics.md §4
        clip = config.algorithm.loss.clip
        assert (clip.eps_low, clip.eps_high, clip.kl_coef) == (0.2, 0.28, 0.0)
        assert config.algorithm.overlong.max_length == 20480
        assert (config.rollout.prompts_per_step, config.rollout.n) == (512, 16)
        assert config.rollout.prompts_per_step // config.train.mini_batch_size == 16
        assert not config.rollout.colocated and config.rollout.sglang.weight_sync == "disk"
    else:  # docs/numerics.md §5
        archer = config.algorithm.selection.archer
        assert (archer.reasoning.eps_high, archer.knowledge.eps_high) == (0.5, 0.2)
        assert archer.knowledge.kl_coef == 0.001 and config.algorithm.loss.dual_clip == 10.0
        assert (config.rollout.n, config.train.epochs) == (16, 3)
    assert config.algorithm.dynamic_sampling.enabled and config.algorithm.loss.entropy_coef == 0


@pytest.mark.parametrize("script", ["launch_multinode.sh", "slurm_disaggregated.sbatch"])
def test_launch_script_parses(script):
    subprocess.run(["bash", "-n", str(SCALE / script)], check=True)


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_launch_script_names_a_missing_variable():
    command = [str(SCALE / "launch_multinode.sh"), str(SCALE / "forking_80_20_qwen3_8b.yaml")]
    result = subprocess.run(command, capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 2 and "NNODES is not set" in result.stderr


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "qwen2_tied", "llama3"])
def test_parameter_count_matches_transformers(case):
    config = hf_config(case)
    model = transformers.AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    arch = me.Arch.from_spec(ModelSpec.from_hf_config(config))
    assert arch.parameters() == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    sizes = {name: arch.parameters() / 1e9 for name, arch in me.MODELS.items()}
    assert sizes == pytest.approx({"R1-Distill-Qwen-1.5B": 1.78, "Qwen3-8B": 8.19,
                                   "Qwen3-14B": 14.77, "Qwen3-32B": 32.76}, abs=0.01)


def test_memory_monotone_in_model_size():
    layout = me.Layout(tp=8, pp=1, dp=2, tokens=8192, chunk=1024)
    totals = [me.estimate(arch, layout) for arch in me.MODELS.values()]
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        values = [t[key] for t in totals]
        assert values == sorted(values), key


@pytest.mark.parametrize("name", list(me.MODELS))
def test_tensor_parallel_halves_weights(name):
    arch = me.MODELS[name]
    for tp in (1, 2, 4):
        small, big = (me.estimate(arch, me.Layout(tp=t, tokens=4096)) for t in (tp, 2 * tp))
        # up to vocabulary padding (to 128 x tp rows) and replicated norms
        assert big["weights"] == pytest.approx(small["weights"] / 2, rel=5e-3)
        assert big["logprob_work"] == pytest.approx(small["logprob_work"] / 2, rel=5e-3)


def test_memory_terms():
    arch, layout = me.MODELS["Qwen3-8B"], me.Layout(tp=4, dp=4, tokens=24576, chunk=4096)
    full = me.estimate(arch, replace(layout, chunk=None))
    chunked = me.estimate(arch, layout)
    assert full["logprob_work"] / chunked["logprob_work"] == pytest.approx(24576 / 4096)
    assert me.estimate(arch, replace(layout, dp=8))["optimizer"] == pytest.approx(chunked["optimizer"] / 2)
    assert me.estimate(arch, replace(layout, recompute=True))["activations"] < chunked["activations"] / 4
    assert me.estimate(arch, replace(layout, reference=True))["reference"] == pytest.approx(chunked["weights"])
    # pipeline parallel 2 halves the layers a stage holds, not the in-flight activations (1F1B)
    pp2 = me.estimate(arch, replace(layout, pp=2))
    assert pp2["weights"] < 0.6 * chunked["weights"]
    assert pp2["activations"] == pytest.approx(chunked["activations"])


def test_context_and_sequence_parallel_terms():
    arch, tokens = me.MODELS["Qwen3-32B"], 32768
    plain = me.Layout(tp=8, pp=2, dp=2, tokens=tokens, chunk=4096)
    base, cp2 = me.estimate(arch, plain), me.estimate(arch, replace(plain, dp=1, cp=2))
    # a CP rank holds half of every sequence; the distributed optimizer shards over dp x cp
    for key in ("activations", "logits"):
        assert cp2[key] == pytest.approx(base[key] / 2), key
    for key in ("weights", "grads", "optimizer", "logprob_work"):
        assert cp2[key] == pytest.approx(base[key]), key
    assert me.estimate(arch, replace(plain, cp=2))["optimizer"] == pytest.approx(base["optimizer"] / 2)
    # sequence parallelism splits the 4 h norm activations a token and layer over tp
    saved = (me.activation_bytes_per_token_layer(arch, 8)
             - me.activation_bytes_per_token_layer(arch, 8, sp=True))
    assert saved == pytest.approx(2 * 4 * arch.hidden * (1 - 1 / 8))
    sp = me.estimate(arch, replace(plain, sp=True))
    assert sp["activations"] == pytest.approx(base["activations"] - arch.layers * saved * tokens / me.GIB)
    # full recompute keeps each layer's input, 2 h bytes a token (2 h / tp under SP)
    for sp_on, split in ((False, 1), (True, 8)):
        kept = me.estimate(arch, replace(plain, recompute=True, sp=sp_on))["activations"]
        one_layer = me.activation_bytes_per_token_layer(arch, 8, sp=sp_on) * tokens / me.GIB
        assert kept - one_layer == pytest.approx(arch.layers * 2 * arch.hidden / split * tokens / me.GIB)
    with pytest.raises(ValueError, match="needs tp > 1"):
        me.estimate(arch, me.Layout(sp=True))
    # the 32B forking config's layout (CP 2, SP, recompute) is a row of the table
    config = load_config(SCALE / "forking_80_20_qwen3_32b.yaml")
    row = me.Layout(tp=config.parallel.tensor, pp=config.parallel.pipeline, dp=1,
                    cp=config.parallel.context, sp=config.parallel.sequence_parallel,
                    tokens=config.actor.max_tokens_per_micro_batch,
                    chunk=config.actor.logprob_chunk_size, recompute=config.model.recompute == "full")
    assert row.sp and ("Qwen3-32B", row) in me.TABLE and me.estimate(arch, row)["total"] < 30


def test_markdown_table_has_every_row():
    lines = me.markdown().splitlines()
    assert len(lines) == 2 + len(me.TABLE)
    assert all(line.count("|") == lines[0].count("|") for line in lines)
