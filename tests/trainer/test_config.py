"""Experiment configs: YAML + overrides, presets, errors naming the field, the resolved copy,
and the example configs (structure only: their paths need not exist)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_archer.models import ModelSpec
from megatron_archer.rollout import SGLangEngine, sglang_engine
from megatron_archer.trainer import load_config, parse_overrides, resolved_yaml
from megatron_archer.trainer.config import ModelConfig, ParallelConfig
from megatron_archer.trainer.engines import build_engine, launch_base_gpu
from tests.trainer.common import CPU_CONFIG, tiny_run

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "configs").glob("*.yaml"))


def test_overrides_parse_values_as_yaml():
    assert parse_overrides(["a.b=1e-6", "a.c=[1, 2]", "d=null", "a.e=true", "f=text"]) == {
        "a": {"b": 1e-6, "c": [1, 2], "e": True}, "d": None, "f": "text"}
    with pytest.raises(ValueError, match="section.field=value"):
        parse_overrides(["rollout.n"])


def test_load_with_overrides_on_the_preset():
    config = load_config(CPU_CONFIG, ["rollout.n=8", "algorithm.preset=forking_80_20",
                                      "algorithm.selection.forking.rho=0.5", "actor.lr=1e-6",
                                      "algorithm.overlong.max_length=24",
                                      "algorithm.overlong.cache_length=8"])
    assert config.rollout.n == 8 and config.actor.lr == 1e-6
    assert config.algorithm.selection.method == "forking"
    assert config.algorithm.selection.forking.rho == 0.5
    assert config.algorithm.loss.clip.eps_high == 0.28  # the rest of the preset stays


@pytest.mark.parametrize("override, message", [
    ("rollout.engine=vllm", "rollout.engine must be one of local, sglang; got 'vllm'"),
    ("rollout.n=0", "rollout.n must be an integer >= 1; got 0"),
    ("rollout.bogus=1", "rollout.bogus is not a field; allowed: engine, prompts_per_step"),
    ("algorithm.preset=ppo", "algorithm.preset must be one of grpo, dapo, forking_80_20, archer"),
    ("algorithm.selection.forking.rho=1.5", r"algorithm.selection.forking.rho must be in \(0.0, 1.0\]"),
    ("actor.lr=-1", r"actor.lr must be in \(0.0, inf\]; got -1"),
    ("data.on_malformed=ignore", "data.on_malformed must be one of skip, error"),
    ("train.mini_batch_size=3", r"train.mini_batch_size \(3\) must divide rollout.prompts_per_step"),
    ("rollout.temperature=0.6", r"actor.temperature \(1.0\) must equal rollout.temperature"),
    ("rollout.engine=sglang", "rollout.sglang must be a SGLangConfig; got None"),
    ("rollout.sglang.weight_sync=nccl", "rollout.sglang.weight_sync must be one of tensor"),
    ("logging.tensorboard=maybe", "logging.tensorboard must be true or false; got 'maybe'"),
])
def test_bad_values_name_the_field_and_allowed_values(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(CPU_CONFIG, [override])


DISTRIBUTED = ["rollout.engine=sglang", "rollout.sglang.server_urls=[http://10.0.0.2:30000]",
               "rollout.colocated=false", "rollout.sglang.weight_sync=distributed"]


@pytest.mark.parametrize("overrides, message", [
    ([], "rollout.sglang.master_address is required with weight_sync 'distributed'"),
    (["rollout.sglang.master_address=10.0.0.1"],
     "rollout.sglang.master_port is required with weight_sync 'distributed'"),
    (["rollout.sglang.master_address=10.0.0.1", "rollout.sglang.master_port=70000"],
     "rollout.sglang.master_port must be a TCP port <= 65535; got 70000"),
])
def test_distributed_weight_sync_needs_the_group_rendezvous(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(CPU_CONFIG, [*DISTRIBUTED, *overrides])


def test_distributed_weight_sync_joins_the_engine_to_the_update_group(monkeypatch):
    """The servers join the NCCL group when the engine is built, before any weight sync (the
    group itself needs CUDA and SGLang servers: here the call is recorded)."""
    calls = []
    monkeypatch.setattr(SGLangEngine, "init_weight_update_group",
                        lambda self, address, port: calls.append((self.server_urls, address, port)))
    config = load_config(CPU_CONFIG, [*DISTRIBUTED, "rollout.sglang.master_address=10.0.0.1",
                                      "rollout.sglang.master_port=29600"])
    engine = build_engine(config)
    assert engine.weight_sync == "distributed"
    assert calls == [(["http://10.0.0.2:30000"], "10.0.0.1", 29600)]
    assert build_engine(load_config(CPU_CONFIG, DISTRIBUTED[:3])).weight_sync == "tensor"
    assert len(calls) == 1  # only for weight_sync 'distributed'


def test_sglang_routing_shape_is_the_models_layers_and_top_k(tmp_path):
    """With rollout routing replay the engine asks the servers for routing shaped (layers,
    top_k) of model.path: the tiny Qwen3-MoE has 2 layers and top-2."""
    overrides = [*tiny_run(tmp_path, prompts=4, case="qwen3_moe"), *DISTRIBUTED[:3],
                 "actor.routing_replay=rollout"]
    engine = build_engine(load_config(CPU_CONFIG, overrides))
    spec = ModelSpec.from_pretrained(tmp_path / "model")
    assert engine.routing == (spec.num_layers, spec.moe_top_k) == (2, 2)


def test_distributed_weight_sync_never_puts_a_server_on_a_trainer_gpu(monkeypatch):
    """NCCL refuses a group with two ranks on one GPU: distributed sync with colocated servers
    is refused at load; launched servers start after the trainer's GPUs unless told, and a
    base_gpu_id among them is refused under distributed sync."""
    with pytest.raises(ValueError, match="^rollout.sglang.weight_sync 'distributed' needs colocated: "
                                         "false"):
        load_config(CPU_CONFIG, [*DISTRIBUTED[:2], *DISTRIBUTED[3:], "rollout.sglang."
                                 "master_address=10.0.0.1", "rollout.sglang.master_port=29600"])
    with pytest.raises(ValueError, match="base_gpu_id must be an integer >= 0"):
        load_config(CPU_CONFIG, [*DISTRIBUTED[:3], "rollout.sglang.base_gpu_id=-1"])
    assert launch_base_gpu(None, colocated=True, weight_sync="tensor", trainer_gpus=8) == 0
    assert launch_base_gpu(None, colocated=False, weight_sync="distributed", trainer_gpus=4) == 4
    assert launch_base_gpu(2, colocated=False, weight_sync="disk", trainer_gpus=4) == 2
    with pytest.raises(ValueError, match="base_gpu_id 2 is a GPU of the trainer .* >= 4"):
        launch_base_gpu(2, colocated=False, weight_sync="distributed", trainer_gpus=4)

    # build_engine hands the base to the launch: server i on base + i x tp_size
    commands = []
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(sglang_engine, "launch_command", lambda *args: commands.append(args) or
                        ["false"])
    config = load_config(CPU_CONFIG, ["rollout.engine=sglang", "rollout.colocated=false",
                                      "rollout.sglang.launch=true", "rollout.sglang.num_servers=2",
                                      "rollout.sglang.tp_size=2",
                                      "rollout.sglang.startup_timeout_s=5"])
    with pytest.raises(sglang_engine.ServerError, match="the server process exited"):
        build_engine(config)  # "false" exits at once, after both commands were made
    assert [args[3] for args in commands] == [4, 6]


def test_missing_sections_and_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "c.yaml"
    path.write_text("model: {path: m}\n")
    with pytest.raises(ValueError, match="data is required"):
        load_config(path)


def test_parallel_layout_is_checked_against_the_world_size():
    assert ParallelConfig(tensor=2).data_size(4) == 2
    with pytest.raises(ValueError, match=r"parallel.tensor \(2\) x parallel.pipeline \(1\) x "
                                         r"parallel.context \(1\) x "
                                         r"parallel.data \(2\) must equal the world size 2"):
        ParallelConfig(tensor=2, data=2).data_size(2)
    assert ParallelConfig(tensor=2, context=2).data_size(8) == 2
    with pytest.raises(ValueError, match=r"parallel.context \(2\) x parallel.data \(auto\) "
                                         r"must equal the world size 6"):
        ParallelConfig(tensor=2, context=2).data_size(6)
    with pytest.raises(ValueError, match="context must be"):
        ParallelConfig(context=0)


def test_expert_parallel_sizes_are_checked_against_the_world_size():
    assert ParallelConfig(tensor=2, expert=2, expert_tensor=1).data_size(2) == 1
    assert ParallelConfig(expert=4).data_size(8) == 8
    assert ParallelConfig(tensor=2, expert=2).expert_tensor_size == 2
    with pytest.raises(ValueError, match=r"parallel.expert_tensor \(2\) x parallel.expert \(2\) "
                                         r"x parallel.pipeline \(1\) must divide the world size 2"):
        ParallelConfig(tensor=2, expert=2).data_size(2)
    with pytest.raises(ValueError, match=r"parallel.expert_tensor \(1\) x parallel.expert \(3\)"):
        ParallelConfig(expert=3).data_size(4)
    for field, value in (("expert", 0), ("expert_tensor", 0)):
        with pytest.raises(ValueError, match=f"{field} must be"):
            ParallelConfig(**{field: value})


def test_router_aux_loss_coefficient_reaches_megatron_and_is_checked():
    assert "moe_aux_loss_coeff" not in ModelConfig(path="m").megatron_overrides()
    assert ModelConfig(path="m", router_aux_loss_coef=0).megatron_overrides()[
        "moe_aux_loss_coeff"] == 0.0
    with pytest.raises(ValueError, match=r"router_aux_loss_coef must be in \[0.0"):
        ModelConfig(path="m", router_aux_loss_coef=-1e-3)


def test_sequence_parallel_is_checked_at_load():
    config = load_config(CPU_CONFIG, ["parallel.sequence_parallel=true"])  # tensor 2
    assert config.parallel.megatron_overrides() == {"sequence_parallel": True}
    assert load_config(CPU_CONFIG).parallel.megatron_overrides() == {}
    for overrides, message in [
        (["parallel.tensor=1", "parallel.sequence_parallel=true"],
         "parallel.sequence_parallel=true needs tensor parallelism: parallel.tensor is 1"),
        (["parallel.sequence_parallel=yes please"],
         "parallel.sequence_parallel must be true or false; got 'yes please'"),
        (["parallel.sequence_parallel=true", "actor.logprob_impl=fused"],
         "actor.logprob_impl='fused' with parallel.sequence_parallel=true"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(CPU_CONFIG, overrides)


def test_resolved_config_reloads_to_the_same_config(tmp_path):
    config = load_config(CPU_CONFIG, ["rollout.stop_token_ids=[3]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(resolved_yaml(config))
    assert load_config(path) == config


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid(path):
    load_config(path)


def test_recompute_maps_to_megatron_and_is_refused_on_cpu(tmp_path):
    from megatron.core.transformer import TransformerConfig

    from megatron_archer.trainer import Trainer

    with pytest.raises(ValueError, match="model.recompute must be one of none, selective, full"):
        load_config(CPU_CONFIG, ["model.recompute=partial"])
    for mode, granularity in [("selective", "selective"), ("full", "full")]:
        overrides = load_config(CPU_CONFIG, [f"model.recompute={mode}"]).model.megatron_overrides()
        # megatron's own config accepts the combination (it validates method and layer count)
        megatron = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, **overrides)
        assert megatron.recompute_granularity == granularity
    assert load_config(CPU_CONFIG).model.megatron_overrides() == {}
    if not torch.cuda.is_available():
        config = load_config(CPU_CONFIG, [f"model.path={tmp_path}", "model.recompute=full"])
        with pytest.raises(ValueError, match="model.recompute='full' needs CUDA"):
            Trainer(config)


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  path: x\n bad: [1,\n")
    with pytest.raises(ValueError, match=rf"^{bad}: line 3, column 2: YAML syntax error: expected "):
        load_config(bad)


def test_routing_replay_needs_an_old_policy_forward():
    overrides = ["actor.routing_replay=old", "algorithm.old_logprobs=rollout",
                 "algorithm.selection.method=none"]
    with pytest.raises(ValueError, match="actor.routing_replay='old' with "
                                         "algorithm.old_logprobs='rollout'"):
        load_config(CPU_CONFIG, overrides)
    assert load_config(CPU_CONFIG, overrides[:1]).actor.routing_replay == "old"
