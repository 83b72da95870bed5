"""``megatron-archer plan``: the fake world builds what real processes build, megatron's buffers
keep their invariants, and the byte counts match the code that moves the bytes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from megatron_archer.actor import SequenceBatch
from megatron_archer.dryrun import memory, plan
from megatron_archer.dryrun.rank_build import BuildInputs, build_rank
from megatron_archer.models import ModelSpec, build_gpt_model, hf_weight_buckets, transformer_config
from megatron_archer.models.weight_map import global_named_parameters
from megatron_archer.rollout.fp8_weights import fp8_weight_buckets
from megatron_archer.trainer import load_config
from megatron_archer.trainer.config import ParallelConfig
from megatron_archer.trainer.rollout_share import pack_share
from megatron_archer.trainer.step import MiniBatch
from tests.distributed import run_distributed
from tests.models.checkpoints import hf_config
from tests.models.parallel import model_parallel

ROOT = Path(__file__).parents[2]
CPU_CONFIG = ROOT / "examples" / "configs" / "archer_arithmetic_cpu.yaml"
SCALE = ROOT / "examples" / "scale"


def _spec(case: str, **overrides) -> ModelSpec:
    config = hf_config(case, **overrides)
    config.architectures = [{"qwen3": "Qwen3ForCausalLM",
                             "qwen3_moe": "Qwen3MoeForCausalLM"}.get(case, "Qwen2ForCausalLM")]
    return ModelSpec.from_hf_config(config)


def _inputs(spec: ModelSpec, tp: int, pp: int, world: int, cp: int = 1, ep: int = 1) -> BuildInputs:
    parallel = ParallelConfig(tensor=tp, pipeline=pp, context=cp, expert=ep)
    return BuildInputs(spec=spec, parallel=parallel, world_size=world,
                       params_dtype=torch.float32, overrides={}, te=False, reference=False)


def _real_stages(rank: int, world: int, cases: list, out: str) -> None:
    """In a gloo process: each case's stage built as the job builds it (CPU tensors)."""
    result = {}
    for name, spec, tp, pp, ep in cases:
        with model_parallel(tp, pp, expert_parallel=ep):
            model = build_gpt_model(spec, backend="local", params_dtype=torch.float32,
                                    perform_initialization=False)
            result[name] = {n: p.numel() for n, p in global_named_parameters(model).items()}
    Path(out, f"{rank}.json").write_text(json.dumps(result))


def test_fake_world_builds_what_real_processes_build(tmp_path):
    cases = [("qwen3", _spec("qwen3", num_hidden_layers=4), 2, 2, 1),
             ("qwen2_tied", _spec("qwen2_tied", num_hidden_layers=4), 2, 2, 1),
             ("qwen3_moe", _spec("qwen3_moe", num_hidden_layers=4), 1, 2, 2)]
    run_distributed(_real_stages, 4, cases, str(tmp_path))
    for name, spec, tp, pp, ep in cases:
        for rank in range(4):
            real = json.loads((tmp_path / f"{rank}.json").read_text())[name]
            built = build_rank(_inputs(spec, tp, pp, 4, ep=ep), rank)
            assert built.parameters == real, (name, rank)
            assert built.layers == tuple(range(2 * built.pipeline, 2 * built.pipeline + 2))


def test_ddp_buffers_and_optimizer_shards():
    """megatron's invariants on a model whose q/k norms (32 elements) get padded: the buffer
    is a multiple of lcm(dp x cp, 128), and the data x context ranks' shards partition the
    stage's parameters."""
    spec = _spec("qwen3")
    tp, cp, world = 2, 2, 12  # data parallel 3
    dp_cp = 6
    builds = [build_rank(_inputs(spec, tp, 1, world, cp), rank) for rank in range(world)]
    for tensor in range(tp):
        mine = [b for b in builds if b.tensor == tensor]
        assert len(mine) == dp_cp
        params = sum(mine[0].parameters.values())
        (buffer,) = mine[0].buffers
        assert buffer.numel % math.lcm(dp_cp, 128) == 0 and buffer.numel > params
        assert sum(b.buffers[0].shard for b in mine) == params
        assert max(b.buffers[0].shard for b in mine) <= buffer.numel // dp_cp
        assert buffer.param_bytes == 4 * buffer.numel and buffer.grad_bytes == 4 * buffer.numel


@pytest.mark.parametrize("routing", [None, (3, 1), (2, 2)])  # (3, 1): an odd count of experts
def test_share_bytes_is_what_pack_share_packs(routing):
    prompt, response, sequences, count = 3, 5, 3, 2
    mini_batches = []
    for _ in range(count):
        ids = [torch.arange(prompt + response) for _ in range(sequences)]
        masks = [torch.cat([torch.zeros(prompt, dtype=torch.bool), torch.ones(response, dtype=torch.bool)])
                 for _ in range(sequences)]
        experts = None if routing is None else [
            torch.zeros(prompt + response - 1, *routing, dtype=torch.int16) for _ in range(sequences)]
        mini_batches.append(MiniBatch(SequenceBatch(ids, masks, experts), torch.zeros(sequences),
                                      torch.zeros(sequences, response)))
    ints, floats = pack_share(mini_batches)
    assert plan.share_bytes(count, sequences, prompt, response, routing) == \
        4 * (ints.numel() + floats.numel())


@pytest.mark.parametrize("name", ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"])
def test_fp8_bytes_is_what_fp8_weight_buckets_sends(name):
    shape = (300, 200) if "proj" in name else (200,)
    tensor = torch.randn(shape, dtype=torch.bfloat16)
    sent = sum(t.numel() * t.element_size() for bucket in fp8_weight_buckets([[(name, tensor)]])
               for _, t in bucket)
    assert plan.fp8_bytes(name, tensor.to("meta")) == sent


def _export_buckets(rank: int, world: int, spec: ModelSpec, limit: int, out: str) -> None:
    with model_parallel(1):
        model = build_gpt_model(spec, backend="local", params_dtype=torch.bfloat16)
        sizes = [sum(t.numel() * t.element_size() for _, t in bucket)
                 for bucket in hf_weight_buckets(model, spec, "local", bucket_bytes=limit)]
    Path(out).write_text(json.dumps(sizes))


@pytest.mark.parametrize("case", ["qwen3", "qwen3_moe"])
def test_weight_sync_buckets_are_hf_weight_buckets(case, tmp_path):
    spec = _spec(case)
    run_distributed(_export_buckets, 1, spec, 40_000, str(tmp_path / "sizes.json"))
    expected = json.loads((tmp_path / "sizes.json").read_text())
    assert len(expected) > 3
    assert plan.sync_bucket_bytes(plan.sync_tensors(spec, torch.bfloat16), 40_000) == expected


def test_parse_bytes():
    assert plan.parse_bytes("80GiB") == 80 << 30 and plan.parse_bytes("80GB") == 80 * 10**9
    assert plan.parse_bytes("1.5 mib") == 3 << 19
    with pytest.raises(ValueError, match="--gpu-memory '80': expected a number and a unit"):
        plan.parse_bytes("80")


def test_world_size():
    config = load_config(SCALE / "forking_80_20_qwen3_32b.yaml")
    assert plan.world_size_of(config, nodes=4) == 32 == plan.world_size_of(config, world_size=32)
    with pytest.raises(ValueError, match="the world size is not implied"):
        plan.world_size_of(config)
    with pytest.raises(ValueError, match=r"parallel.tensor \(8\) x .* must equal the world size 24"):
        plan.world_size_of(config, world_size=24)
    implied = load_config(SCALE / "forking_80_20_qwen3_32b.yaml", ["parallel.data=2"])
    assert plan.world_size_of(implied) == 64


def test_impossible_layout_is_refused_with_the_jobs_message():
    """R1-Distill-1.5B's 12 heads over tensor parallel 8 at world size 64: the message of
    ``ModelSpec.validate_parallelism``, which the job's model build raises."""
    assert not dist.is_initialized()
    command = [sys.executable, "-m", "megatron_archer.cli", "plan",
               str(SCALE / "archer_r1_distill_1.5b_math.yaml"), "parallel.tensor=8",
               "--model-config", str(SCALE / "model_configs" / "deepseek_r1_distill_qwen_1.5b"),
               "--world-size", "64", "--out", "/dev/null"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "megatron-archer plan: error: rank 0 of 64: num_attention_heads=12 is not divisible by "
        "tensor-parallel size 8")


def test_cli_table_json_and_fit(tmp_path):
    """The tiny CPU config at its 2 ranks: the table, the JSON, and exit status 1 when a rank
    does not fit the named memory."""
    out = tmp_path / "plan.json"
    base = [sys.executable, "-m", "megatron_archer.cli", "plan", str(CPU_CONFIG),
            f"model.path={tmp_path / 'absent'}", "--world-size", "2", "--out", str(out)]
    config_dir = tmp_path / "model"
    config_dir.mkdir()
    tiny = hf_config("qwen3", vocab_size=512)
    tiny.architectures = ["Qwen3ForCausalLM"]
    tiny.save_pretrained(config_dir)
    fits = subprocess.run([*base, "--model-config", str(config_dir), "--gpu-memory", "1GiB"],
                          capture_output=True, text=True, cwd=ROOT)
    assert fits.returncode == 0, fits.stderr
    assert "every rank fits" in fits.stdout
    report = json.loads(out.read_text())
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert report["ranks"][0]["parameters"] == report["ranks"][1]["parameters"]
    tight = subprocess.run([*base, "--model-config", str(config_dir / "config.json"),
                            "--gpu-memory", "1KiB"], capture_output=True, text=True, cwd=ROOT)
    assert tight.returncode == 1 and "ranks [0, 1] do not fit" in tight.stdout
    missing = subprocess.run(base, capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and "pass --model-config" in missing.stderr


def test_fp8_job_builds_the_same_shapes(monkeypatch):
    """With model.fp8 the job's Transformer Engine TransformerConfig (fp8 fields included) is
    constructed on every rank; the parameters are those of the bf16 job."""
    from megatron_archer.dryrun import rank_build

    made = []

    def recorded(*args, **kwargs):
        config = transformer_config(*args, **kwargs)
        made.append((kwargs["backend"], config.fp8, config.fp8_recipe))
        return config

    monkeypatch.setattr(rank_build, "transformer_config", recorded)
    path = SCALE / "forking_80_20_qwen3_8b.yaml"
    spec = plan.model_spec(SCALE / "model_configs" / "qwen3_8b_base")
    reports = [plan.plan(load_config(path, overrides), spec, 16)
               for overrides in ([], ["model.fp8=hybrid", "model.fp8_recipe=tensorwise"])]
    assert made == [("te", None, "delayed")] * 16 + [("te", "hybrid", "tensorwise")] * 16
    assert [r["bytes"] for r in reports[0]["ranks"]] == [r["bytes"] for r in reports[1]["ranks"]]


def test_each_rank_is_built_from_a_fresh_world():
    """A rank's build does not depend on the ranks built before it, and nothing is left
    initialised afterwards, after a refused layout too."""
    from megatron.core import parallel_state

    inputs = _inputs(_spec("qwen3", num_hidden_layers=4), 2, 2, 8)
    forward = [build_rank(inputs, rank) for rank in range(8)]
    backward = [build_rank(inputs, rank) for rank in reversed(range(8))][::-1]
    assert forward == backward
    assert [b.rank for b in forward] == list(range(8)) and len({b.pipeline for b in forward}) == 2
    config = load_config(SCALE / "archer_r1_distill_1.5b_math.yaml", ["parallel.tensor=8"])
    spec = plan.model_spec(SCALE / "model_configs" / "deepseek_r1_distill_qwen_1.5b")
    with pytest.raises(ValueError, match="rank 0 of 64: num_attention_heads=12 is not divisible"):
        plan.plan(config, spec, 64)
    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()


def test_mixture_of_experts_plan_is_the_memory_model():
    """A Qwen3-MoE job at EP 2 and TP 2 x EP 2 (sequence parallel, ETP 2 and 1): the experts are
    megatron's second DDP buffer, one expert-parallel rank's experts, sharded over the
    expert-data group, and the memory model's terms equal what was built, byte for byte; the
    dispatcher's all-to-all is among the collectives and the weight sync gathers experts over
    ETP and broadcasts them over EP; TP 2 without sequence parallelism is refused in one line,
    as the actor refuses it."""
    spec = _spec("qwen3_moe", head_dim=64)  # 2 layers of 4 experts (48 x 64), top-2; every
    # parameter a multiple of 64 elements, so megatron pads only the end of the dense buffer
    arch = memory.Arch.from_spec(spec)
    per_rank_experts = 2 * 2 * 3 * 64 * 48  # layers x experts a rank x (gate, up, down)
    sp = ["parallel.sequence_parallel=true", "parallel.expert=2"]  # tensor 2
    for overrides, world, etp in ((["parallel.tensor=1", "parallel.expert=2"], 4, 1), (sp, 4, 2),
                                  ([*sp, "parallel.expert_tensor=1"], 4, 1)):
        config = load_config(CPU_CONFIG, overrides)
        report = plan.plan(config, spec, world)
        layout = plan.memory_layout(config, world)
        expected = memory.estimate(arch, layout)
        assert layout.expert_tensor == etp and report["layout"]["expert_data"] == 4 // (2 * etp)
        for rank in report["ranks"]:
            dense, experts = rank["grad_buckets"]
            assert experts == per_rank_experts // etp
            # the dense buffer's end is padded to a multiple of lcm(dp x cp, 128) elements, which
            # weights and grads leave out (the optimizer's largest_shard counts it); fp32 here
            padding = rank["buffer_padding"]
            assert dense % 128 == 0 and padding < 128
            for key in ("weights", "grads"):
                assert rank["bytes"][key] == expected[key] + 4 * padding, (overrides, key)
            for key in ("activations", "logits"):
                assert rank["bytes"][key] == expected[key], (overrides, key)
            all_to_all = [c for c in rank["collectives"] if c["name"] == "expert all-to-all"]
            tokens = config.actor.max_tokens_per_micro_batch // config.parallel.tensor
            assert all_to_all == [{"name": "expert all-to-all", "group": "expert",
                                   "bytes": tokens * 2 * 64 * 4}]  # top-2 copies, fp32
        # weight sync (fp32): the other expert-parallel rank's 2 experts of each layer arrive by
        # broadcast; at TP 2 every split tensor is gathered whole: per layer q, k, v (64 x (512 + 2 x
        # 128)) and the output projection (512 x 64), embedding and output layer (256 padded rows
        # x 64); at ETP 2 this rank's 2 experts of 3 x 64 x 48 (router and norms: replicated)
        other_experts = 2 * 2 * 3 * 64 * 48 * 4
        tp = config.parallel.tensor
        gathered = (4 * (2 * (64 * 768 + 512 * 64) + 2 * 256 * 64) if tp > 1 else 0) + (
            4 * 2 * 2 * 3 * 64 * 48 if etp > 1 else 0)
        for rank in report["ranks"]:
            sync = rank["weight_sync"]
            assert sync["ep_broadcast_received_bytes"] == other_experts
            assert sync["pp_broadcast_received_bytes"] == 0
            assert sync["tp_all_gather_bytes"] == gathered
        # the largest shard (the last holds the padding): dense over data x context, experts
        # over the expert-data group (4 / (ep x etp))
        assert max(r["bytes"]["optimizer"] for r in report["ranks"]) == expected["optimizer"]
    assert report["model"]["parameters"] == arch.parameters()
    config = load_config(CPU_CONFIG, ["parallel.expert=2"])  # tensor 2, no sequence parallel
    with pytest.raises(ValueError, match=r"^a mixture-of-experts model at tensor parallel > 1 "
                                         r"trains only with sequence parallelism"):
        plan.plan(config, spec, 4)
    assert not dist.is_initialized()
