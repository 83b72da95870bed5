"""examples/scale: the configs validate and pass ``megatron-archer plan`` at their world size, the
launch scripts parse, the memory model counts parameters exactly and agrees exactly with what
``plan`` builds, docs/scaling.md shows ``plan``'s tables."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers

from megatron_archer import cli
from megatron_archer.dryrun import memory, plan
from megatron_archer.dryrun.memory import GIB, Arch, Layout, estimate
from megatron_archer.models.spec import ModelSpec
from megatron_archer.trainer import load_config
from tests.models.checkpoints import hf_config

ROOT = Path(__file__).parents[1]
SCALE = ROOT / "examples" / "scale"
_spec = importlib.util.spec_from_file_location("memory_estimate", ROOT / "tools" / "memory_estimate.py")
me = sys.modules["memory_estimate"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(me)
DENSE = [name for name, arch in me.MODELS.items() if not arch.experts]


def plan_command(path: Path) -> list[str]:
    """The ``megatron-archer plan`` command in the config's header comment."""
    text = path.read_text()
    match = re.search(r"^#\s+megatron-archer plan (.*?)\\\n#\s+(.*)$", text, re.MULTILINE)
    assert match, f"{path.name}: add the header lines '#   megatron-archer plan {path} ...' "
    return ["plan", *shlex.split(f"{match.group(1)} {match.group(2)}")]


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


@pytest.mark.parametrize("case", ["qwen3", "qwen2", "qwen2_tied", "llama3", "qwen3_moe"])
def test_parameter_count_matches_transformers(case):
    config = hf_config(case)
    model = transformers.AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    arch = Arch.from_spec(ModelSpec.from_hf_config(config))
    assert arch.parameters() == sum(p.numel() for p in model.parameters())


def test_published_sizes():
    sizes = {name: arch.parameters() / 1e9 for name, arch in me.MODELS.items()}
    assert sizes == pytest.approx({"R1-Distill-Qwen-1.5B": 1.78, "Qwen3-8B": 8.19,
                                   "Qwen3-14B": 14.77, "Qwen3-32B": 32.76,
                                   "Qwen3-30B-A3B": 30.53}, abs=0.01)


# Qwen3-30B-A3B's published shapes (Hugging Face config.json), written out here: no hub access
QWEN3_30B_A3B = dict(
    architectures=["Qwen3MoeForCausalLM"], hidden_size=2048, num_hidden_layers=48,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
    moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
    decoder_sparse_step=1, mlp_only_layers=[], vocab_size=151936, tie_word_embeddings=False,
    rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=40960, router_aux_loss_coef=0.001)


def test_qwen3_30b_a3b_published_totals():
    """30.5B parameters, 3.3B active (Qwen's model card), from the config's shapes; the count
    equals transformers' model of that config (built on the meta device) exactly, and the
    config.json shipped under examples/scale/model_configs has those shapes."""
    config = transformers.Qwen3MoeConfig(**QWEN3_30B_A3B)
    arch = Arch.from_spec(ModelSpec.from_hf_config(config))
    # 30.532B and 3.353B: the card truncates both to one decimal
    assert 30.5e9 <= arch.parameters() < 30.6e9
    assert 3.3e9 <= arch.parameters(active=True) < 3.4e9
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert arch.parameters() == sum(p.numel() for p in model.parameters())
    assert replace(me.MODELS["Qwen3-30B-A3B"], name="model") == arch


def test_expert_sharding():
    """Qwen3-30B-A3B's static terms at EP 1 and EP 8 (and ETP, PP, expert data parallel),
    against the counts written out from its shapes."""
    arch = me.MODELS["Qwen3-30B-A3B"]
    h, layers, experts, top_k, vocab = 2048, 48, 128, 8, 151936
    per_expert = 3 * h * 768                             # gate, up (768 x h), down (h x 768)
    attention = h * (32 * 128 + 2 * 4 * 128) + 32 * 128 * h
    dense_layer = attention + 2 * h + 2 * 128 + experts * h  # norms, q/k norms, router
    dense = layers * dense_layer + 2 * vocab * h + h     # vocab 151936 = 1187 x 128: no padding
    expert_total = layers * experts * per_expert
    assert dense + expert_total == arch.parameters()
    assert dense + layers * top_k * per_expert == arch.parameters(active=True)  # top_k experts
    base = Layout(tp=1, pp=1, dp=16, tokens=4096)
    ep1, ep8 = estimate(arch, base), estimate(arch, replace(base, ep=8))
    assert ep1["weights"] == 2 * (dense + expert_total)
    assert ep8["weights"] == 2 * (dense + expert_total // 8)
    assert (ep1["weights"] - 2 * dense) / (ep8["weights"] - 2 * dense) == 8
    assert ep8["grads"] == 4 * (dense + expert_total // 8)
    # the optimizer shards the dense buffer over dp x cp = 16 (padded to lcm(16, 128) = 128)
    # and the experts' over expert data = 16 / 8 = 2 (EP 1: over 16)
    dense_shard = -(-dense // 128) * 128 // 16
    assert ep8["optimizer"] == 12 * (dense_shard + expert_total // 8 // 2)
    assert ep1["optimizer"] == 12 * (dense_shard + expert_total // 16)
    # expert-tensor parallel 2 (tp 2 with SP) splits each expert: 1/16 of them a rank, and the
    # dense part over tp 2 but the router whole; pipeline 2 halves each stage's experts again
    tp2 = estimate(arch, replace(base, tp=2, sp=True, dp=8, ep=8))
    padded = 152064  # 151936 padded to a multiple of 128 x tp = 256
    dense_tp2 = layers * (attention // 2 + 2 * h + 2 * 128 + experts * h) + 2 * padded * h // 2 + h
    assert tp2["weights"] == 2 * (dense_tp2 + expert_total // 16)
    pp2 = estimate(arch, replace(base, pp=2, dp=8, ep=8))
    last_stage = layers // 2 * dense_layer + vocab * h + h
    assert pp2["weights"] == 2 * (last_stage + expert_total // 8 // 2)
    assert pp2["optimizer"] == 12 * (-(-last_stage // 128) * 128 // 8 + expert_total // 16)
    assert replace(base, pp=2, dp=8, ep=8).expert_data == 1
    with pytest.raises(ValueError, match="do not split over expert parallel 3"):
        estimate(arch, replace(base, ep=3))
    with pytest.raises(ValueError, match="expert-tensor 2 x expert 16 parallel does not divide"):
        estimate(arch, replace(base, ep=16, etp=2))
    with pytest.raises(ValueError, match="tensor parallel > 1 trains only with sequence parallel"):
        estimate(arch, replace(base, tp=2, dp=8))
    with pytest.raises(ValueError, match="Qwen3-8B has no experts"):
        estimate(me.MODELS["Qwen3-8B"], replace(base, ep=2))


def test_expert_activations():
    """A layer with experts stores the attention part, the router's 5 E bytes and, per routed
    copy (top_k x etp a token of the rank), fc1's input and output and the SwiGLU output; the
    dispatcher's two copies of the layer in flight count once."""
    arch = me.MODELS["Qwen3-30B-A3B"]
    h, f, experts, top_k, tokens = 2048, 768, 128, 8, 8192
    for tp, etp in ((1, 1), (2, 1), (2, 2)):
        s = tp  # sequence parallel at tp 2
        layout = Layout(tp=tp, sp=tp > 1, dp=16 // tp, ep=8, etp=etp, tokens=tokens)
        attention = 2 * (4 * h / s + (32 + 8) * 128 / tp + 32 * 128 / tp)
        routed = top_k * etp / s                         # copies a token of the micro-batch
        layer = attention + 5 * experts / s + 2 * routed * (h + 3 * f / etp)
        assert memory.activation_bytes_per_token_layer(arch, tp, tp > 1, True, etp) == \
            pytest.approx(layer, rel=1e-12)
        dispatch = 2 * top_k * h * (1 + etp) / s * tokens
        assert estimate(arch, layout)["activations"] == pytest.approx(
            48 * layer * tokens + dispatch, rel=1e-12)
        kept = estimate(arch, replace(layout, recompute=True))["activations"]
        assert kept == pytest.approx(48 * 2 * h / s * tokens + layer * tokens + dispatch, rel=1e-12)


def test_memory_monotone_in_model_size():
    layout = Layout(tp=8, pp=1, dp=2, tokens=8192, chunk=1024)
    totals = [estimate(me.MODELS[name], layout) for name in DENSE]
    for key in ("weights", "grads", "optimizer", "activations", "total"):
        values = [t[key] for t in totals]
        assert values == sorted(values), key


@pytest.mark.parametrize("name", DENSE)
def test_tensor_parallel_halves_weights(name):
    arch = me.MODELS[name]
    for tp in (1, 2, 4):
        small, big = (estimate(arch, Layout(tp=t, tokens=4096)) for t in (tp, 2 * tp))
        # up to vocabulary padding (to 128 x tp rows) and replicated norms
        assert big["weights"] == pytest.approx(small["weights"] / 2, rel=5e-3)
        assert big["logprob_work"] == pytest.approx(small["logprob_work"] / 2, rel=5e-3)


def test_memory_terms():
    arch, layout = me.MODELS["Qwen3-8B"], Layout(tp=4, dp=4, tokens=24576, chunk=4096)
    full = estimate(arch, replace(layout, chunk=None))
    chunked = estimate(arch, layout)
    assert full["logprob_work"] / chunked["logprob_work"] == pytest.approx(24576 / 4096)
    assert estimate(arch, replace(layout, dp=8))["optimizer"] == pytest.approx(chunked["optimizer"] / 2)
    assert estimate(arch, replace(layout, recompute=True))["activations"] < chunked["activations"] / 4
    assert estimate(arch, replace(layout, reference=True))["reference"] == chunked["weights"]
    # pipeline parallel 2 halves the layers a stage holds, not the in-flight activations (1F1B)
    pp2 = estimate(arch, replace(layout, pp=2))
    assert pp2["weights"] < 0.6 * chunked["weights"]
    assert pp2["activations"] == pytest.approx(chunked["activations"])
    # fp32 parameters are their own main copy: Adam's m and v only
    fp32 = estimate(arch, replace(layout, param_bytes=4))
    assert fp32["optimizer"] == pytest.approx(chunked["optimizer"] * 8 / 12)
    assert estimate(arch, replace(layout, fused_logprobs=True))["logits"] == 0


def test_largest_shard_is_megatrons():
    """A one-bucket buffer padded to lcm(dp_cp, 128), cut in dp_cp equal shards."""
    assert memory.largest_shard(1000, 1) == 1000
    assert memory.largest_shard(1024, 8) == 128
    assert memory.largest_shard(1000, 3) == 1152 // 3  # padded to 1152 = 3 x 384
    assert memory.largest_shard(100, 3) == 100  # padded to 384: the first shard holds all 100


def test_context_and_sequence_parallel_terms():
    arch, tokens = me.MODELS["Qwen3-32B"], 32768
    plain = Layout(tp=8, pp=2, dp=2, tokens=tokens, chunk=4096)
    base, cp2 = estimate(arch, plain), estimate(arch, replace(plain, dp=1, cp=2))
    # a CP rank holds half of every sequence; the distributed optimizer shards over dp x cp
    for key in ("activations", "logits"):
        assert cp2[key] == pytest.approx(base[key] / 2), key
    for key in ("weights", "grads", "optimizer", "logprob_work"):
        assert cp2[key] == pytest.approx(base[key]), key
    assert estimate(arch, replace(plain, cp=2))["optimizer"] == pytest.approx(base["optimizer"] / 2)
    # sequence parallelism splits the 4 h norm activations a token and layer over tp
    saved = (memory.activation_bytes_per_token_layer(arch, 8)
             - memory.activation_bytes_per_token_layer(arch, 8, sp=True))
    assert saved == pytest.approx(2 * 4 * arch.hidden * (1 - 1 / 8))
    sp = estimate(arch, replace(plain, sp=True))
    assert sp["activations"] == pytest.approx(base["activations"] - arch.layers * saved * tokens)
    # full recompute keeps each layer's input, 2 h bytes a token (2 h / tp under SP)
    for sp_on, split in ((False, 1), (True, 8)):
        kept = estimate(arch, replace(plain, recompute=True, sp=sp_on))["activations"]
        one_layer = memory.activation_bytes_per_token_layer(arch, 8, sp=sp_on) * tokens
        assert kept - one_layer == pytest.approx(arch.layers * 2 * arch.hidden / split * tokens)
    with pytest.raises(ValueError, match="needs tp > 1"):
        estimate(arch, Layout(sp=True))
    # the 32B forking config's layout (CP 2, SP, recompute) is a row of the table
    config = load_config(SCALE / "forking_80_20_qwen3_32b.yaml")
    row = Layout(tp=config.parallel.tensor, pp=config.parallel.pipeline, dp=1,
                 cp=config.parallel.context, sp=config.parallel.sequence_parallel,
                 tokens=config.actor.max_tokens_per_micro_batch,
                 chunk=config.actor.logprob_chunk_size, recompute=config.model.recompute == "full")
    assert row.sp and ("Qwen3-32B", row) in me.TABLE and estimate(arch, row)["total"] < 30 * GIB


def test_markdown_table_has_every_row():
    lines = me.markdown().splitlines()
    assert len(lines) == 2 + len(me.TABLE)
    assert all(line.count("|") == lines[0].count("|") for line in lines)


@pytest.mark.parametrize("path", sorted(SCALE.glob("*.yaml")), ids=lambda p: p.name)
def test_scale_config_passes_plan(path, tmp_path, capsys, monkeypatch):
    """The config's own plan command (its header) builds every rank at its world size, every
    rank fits 80 GiB, the memory model agrees exactly with what was built, and docs/scaling.md
    shows this table."""
    assert not dist.is_initialized()
    monkeypatch.chdir(ROOT)  # the command's paths are the repository's
    command = plan_command(path)
    out = tmp_path / "plan.json"
    assert cli.main([*command, "--out", str(out)]) == 0, capsys.readouterr()
    report = json.loads(out.read_text())
    config = load_config(path)
    layout = report["layout"]
    assert len(report["ranks"]) == report["world_size"] == (
        layout["tensor"] * layout["pipeline"] * layout["context"] * layout["data"])
    assert all(rank["fits"] for rank in report["ranks"])
    # every layer on exactly one stage; no padding in these models' buffers
    stages = {r["pipeline"]: tuple(r["layers"]) for r in report["ranks"]}
    assert sorted(stages) == list(range(layout["pipeline"]))
    bounds = [stages[stage] for stage in sorted(stages)]
    assert [first for first, _ in bounds] == [0] + [last + 1 for _, last in bounds[:-1]]
    assert bounds[-1][1] == report["model"]["layers"] - 1
    assert all(r["buffer_padding"] == 0 for r in report["ranks"])
    # the actor's DDP does not overlap the gradient reduce, so each buffer (the dense one, and
    # the experts' in a mixture of experts) is one bucket: the largest message of every rank is
    # the reduce-scatter of its whole dense fp32 gradient buffer (the MoE config's experts are
    # not reduced: expert data parallel 1)
    moe = report["model"]["experts"] > 0
    assert not moe or layout["expert_data"] == 1
    for rank in report["ranks"]:
        buckets = rank["grad_buckets"]
        assert len(buckets) == 1 + moe and sum(buckets) == rank["parameters"]
        assert rank["largest_collective"] == {"name": "gradient reduce-scatter",
                                              "group": "data x context",
                                              "bytes": 4 * buckets[0]}
    # the memory model from the published shapes against what plan built, in bytes
    spec = plan.model_spec(command[command.index("--model-config") + 1])
    model = Layout(tp=layout["tensor"], pp=layout["pipeline"], dp=layout["data"],
                   cp=layout["context"], sp=layout["sequence_parallel"],
                   tokens=config.actor.max_tokens_per_micro_batch,
                   recompute=config.model.recompute == "full",
                   chunk=config.actor.logprob_chunk_size,
                   reference=report["reference"]["resident"], ep=layout["expert"],
                   etp=layout["expert_tensor"])
    expected = estimate(Arch.from_spec(spec), model)
    for key in ("weights", "grads", "optimizer", "reference", "activations", "logits",
                "logprob_work"):
        assert max(r["bytes"][key] for r in report["ranks"]) == expected[key], key
    assert plan.format_markdown(report) in (ROOT / "docs" / "scaling.md").read_text(), (
        f"docs/scaling.md: paste the output of {' '.join(command)} --markdown")
