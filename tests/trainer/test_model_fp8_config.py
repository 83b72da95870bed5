"""model.fp8 (with its recipe and scaling settings), actor.logprob_impl and the Transformer Engine
+ float32 combination are validated at config load, with errors naming the fields; fp8 reaches
megatron's TransformerConfig, and only with the Transformer Engine backend."""

from __future__ import annotations

import pytest
import torch

from megatron_archer.models.builder import transformer_config
from megatron_archer.models.layer_spec import select_backend
from megatron_archer.models.spec import ModelSpec
from megatron_archer.trainer import load_config
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel
from tests.trainer.common import CPU_CONFIG

TE_BF16 = ["model.backend=te", "actor.params_dtype=bfloat16"]


@pytest.mark.parametrize("overrides, message", [
    (["model.fp8=e5m2"], "model.fp8 must be one of off, hybrid, e4m3; got 'e5m2'"),
    (["model.fp8=true"], "model.fp8 must be one of off, hybrid, e4m3; got True"),
    (["model.fp8=hybrid"], "model.fp8='hybrid' needs backend 'te'"),
    ([*TE_BF16, "model.fp8=hybrid", "model.fp8_recipe=current"],
     "model.fp8_recipe must be one of delayed, tensorwise, blockwise, mxfp8; got 'current'"),
    ([*TE_BF16, "model.fp8_margin=-1"], "model.fp8_margin must be an integer >= 0; got -1"),
    ([*TE_BF16, "model.fp8_amax_history_len=0"],
     "model.fp8_amax_history_len must be an integer >= 1; got 0"),
    ([*TE_BF16, "model.fp8_amax_compute_algo=mean"],
     "model.fp8_amax_compute_algo must be one of most_recent, max; got 'mean'"),
    (["model.backend=te", "actor.params_dtype=float32"],
     "model.backend='te' with actor.params_dtype='float32'"),
    (["actor.logprob_impl=vocab"], "actor.logprob_impl must be one of logits, fused; got 'vocab'"),
])
def test_bad_values_name_the_field(overrides, message):
    with pytest.raises(ValueError) as error:
        load_config(CPU_CONFIG, overrides)
    assert message in str(error.value)


def test_fp8_settings_become_megatron_fields():
    config = load_config(CPU_CONFIG, [*TE_BF16, "model.fp8=hybrid", "model.fp8_margin=1",
                                      "model.fp8_amax_history_len=1024",
                                      "model.fp8_amax_compute_algo=max", "model.recompute=full",
                                      "actor.logprob_impl=fused"])
    assert config.actor.logprob_impl == "fused"
    overrides = config.model.megatron_overrides()
    assert overrides["recompute_granularity"] == "full"
    assert {k: overrides[k] for k in ("fp8", "fp8_recipe", "fp8_margin", "fp8_amax_history_len",
                                      "fp8_amax_compute_algo")} == dict(
        fp8="hybrid", fp8_recipe="delayed", fp8_margin=1, fp8_amax_history_len=1024,
        fp8_amax_compute_algo="max")
    assert "fp8" not in load_config(CPU_CONFIG).model.megatron_overrides()
    assert load_config(CPU_CONFIG, ["model.fp8=off"]).model.fp8 == "off"  # YAML's false


def test_auto_backend_never_picks_te_for_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("megatron_archer.models.layer_spec.transformer_engine_available", lambda: True)
    assert select_backend("auto", torch.float32) == "local"
    assert select_backend("auto", torch.bfloat16) == "te"


def _builder_worker(rank, world_size, path):
    spec = ModelSpec.from_pretrained(path)
    overrides = dict(fp8="e4m3", fp8_recipe="delayed", fp8_margin=2, fp8_amax_history_len=16,
                     fp8_amax_compute_algo="max")
    with model_parallel(1):
        config = transformer_config(spec, backend="te", params_dtype=torch.bfloat16,
                                    overrides=overrides)
        assert (config.fp8, config.fp8_margin, config.fp8_amax_history_len) == ("e4m3", 2, 16)
        with pytest.raises(ValueError, match="fp8='e4m3' needs the Transformer Engine backend"):
            transformer_config(spec, backend="local", params_dtype=torch.bfloat16,
                               overrides=overrides)


def test_fp8_overrides_reach_transformer_config_only_with_te(tmp_path):
    run_distributed(_builder_worker, 1, write_checkpoint(tmp_path / "qwen3", "qwen3"))
