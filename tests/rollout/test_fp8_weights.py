"""Block-wise FP8 rollout weights (rollout.fp8_weights): quantise-dequantise error within the
e4m3 bound in every 128 x 128 block against a float64 dequantisation, the layout SGLang reads
(``weight_scale_inv`` grid, which tensors), nvidia-modelopt's quantiser where installed giving
the same bits, the bucket stream, the FP8 checkpoint writer, the SGLang engine's sync in fp8,
the request bodies against SGLang's request types, and the config checks."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from megatron_archer.rollout import fp8_weights
from megatron_archer.rollout.fp8_weights import (
    FP8_QUANTIZATION_CONFIG,
    dequantize_block_fp8,
    fp8_weight_buckets,
    quantize_block_fp8,
    require_fp8_checkpoint,
    write_fp8_checkpoint,
)
from tests.models.checkpoints import write_checkpoint


def _nasty_weights():
    """Shapes not multiples of 128, bf16 and float32, an all-zero block, a lone outlier block
    (the rest of it underflows to subnormals and zero), tiny and huge magnitudes."""
    g = torch.Generator().manual_seed(0)
    out = []
    for shape in [(200, 300), (128, 128), (1, 5), (257, 129), (384, 130)]:
        out.append(torch.randn(shape, generator=g))
    w = torch.randn(300, 260, generator=g) * 0.02
    w[:128, :128] = 0.0  # all-zero block
    w[130, 140] = 1e3  # outlier: its block's other values fall to e4m3 subnormals or zero
    w[260:, 200:] *= 1e-30  # tiny block, float32-normal
    w[200:256, :128] *= 1e4
    out += [w, w.to(torch.bfloat16), (torch.randn(150, 140, generator=g) * 3).to(torch.bfloat16)]
    return out


def _blocks(shape, block=128):
    for i in range(0, shape[0], block):
        for j in range(0, shape[1], block):
            yield i // block, j // block, slice(i, i + block), slice(j, j + block)


@pytest.mark.parametrize("index", range(8))
def test_quantise_dequantise_error_per_block_is_within_the_e4m3_bound(index):
    weight = _nasty_weights()[index]
    q, scale = quantize_block_fp8(weight, use_modelopt=False)
    n, k = weight.shape
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale.dtype == torch.float32 and scale.shape == (math.ceil(n / 128), math.ceil(k / 128))
    x = weight.double().numpy()
    qv = q.to(torch.float64).numpy()
    s = scale.double().numpy()
    worst = 0.0
    for bi, bj, rows, cols in _blocks(weight.shape):
        block, qb, sb = x[rows, cols], qv[rows, cols], s[bi, bj]
        amax = np.abs(block).max()
        if amax == 0:
            assert sb == 1.0 and not qb.any()
            continue
        assert sb == pytest.approx(amax / 448.0, rel=2e-7)  # float32 amax / 448
        assert np.abs(qb).max() == 448.0  # the block's largest element maps to the e4m3 maximum
        error = np.abs(block - qb * sb)  # float64 dequantisation
        bound = sb * np.maximum(2.0**-4 * np.abs(block) / sb, 2.0**-10) * (1 + 1e-6)
        assert (error <= bound).all(), (bi, bj, (error / bound).max())
        worst = max(worst, (error / bound).max())
    assert worst > 0.5  # the bound is nearly reached: the check is sharp
    # the library's dequantisation (SGLang's block_quant_dequant semantics) equals the float64 one
    deq = dequantize_block_fp8(q, scale, dtype=torch.float64).numpy()
    want = qv * np.repeat(np.repeat(s, 128, 0), 128, 1)[:n, :k]
    np.testing.assert_array_equal(deq, want)


def test_non_finite_or_non_matrix_weights_are_refused_naming_the_tensor():
    w = torch.randn(4, 4)
    w[1, 1] = float("inf")
    with pytest.raises(ValueError, match="model.layers.0.mlp.up_proj.weight has non-finite"):
        quantize_block_fp8(w, name="model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ValueError, match="needs a 2-D weight"):
        quantize_block_fp8(torch.ones(3))


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is None, reason="nvidia-modelopt not installed")
def test_modelopt_quantiser_gives_the_same_bits():
    for weight in _nasty_weights():
        q_mo, s_mo = quantize_block_fp8(weight, use_modelopt=True)
        q, s = quantize_block_fp8(weight, use_modelopt=False)
        assert torch.equal(q_mo.view(torch.uint8), q.view(torch.uint8))
        torch.testing.assert_close(s_mo, s, rtol=0, atol=0)


def _bucket():
    g = torch.Generator().manual_seed(1)
    return [("model.embed_tokens.weight", torch.randn(300, 64, generator=g).bfloat16()),
            ("model.layers.0.self_attn.q_proj.weight", torch.randn(64, 64, generator=g).bfloat16()),
            ("model.layers.0.self_attn.q_proj.bias", torch.randn(64, generator=g).bfloat16()),
            ("model.layers.0.mlp.down_proj.weight", torch.randn(64, 200, generator=g).bfloat16()),
            ("model.layers.0.input_layernorm.weight", torch.ones(64).bfloat16()),
            ("lm_head.weight", torch.randn(300, 64, generator=g).bfloat16())]


def test_bucket_stream_quantises_linear_weights_only_and_adds_their_scales():
    bucket = _bucket()
    stream = fp8_weight_buckets(iter([bucket[:3], bucket[3:]]))
    assert not isinstance(stream, list)  # lazy: one bucket at a time
    out = list(stream)
    names = [n for b in out for n, _ in b]
    assert names == ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                     "model.layers.0.self_attn.q_proj.weight_scale_inv",
                     "model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.down_proj.weight",
                     "model.layers.0.mlp.down_proj.weight_scale_inv",
                     "model.layers.0.input_layernorm.weight", "lm_head.weight"]
    sent = dict(p for b in out for p in b)
    for name, tensor in bucket:
        if name.endswith("proj.weight"):
            q, s = quantize_block_fp8(tensor)
            assert torch.equal(sent[name].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(sent[name + "_scale_inv"], s)
        else:
            assert sent[name] is tensor  # passed through untouched
    with pytest.raises(TypeError, match="quantise before serialising"):
        list(fp8_weight_buckets([object()]))


def test_fp8_checkpoint_writer(tmp_path):
    src = write_checkpoint(tmp_path / "qwen3", "qwen3")
    out = write_fp8_checkpoint(src, tmp_path / "fp8")
    require_fp8_checkpoint(out)
    with pytest.raises(ValueError, match="must serve a block-FP8 checkpoint"):
        require_fp8_checkpoint(src)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == FP8_QUANTIZATION_CONFIG
    assert config.get("dtype", config.get("torch_dtype")) == json.loads(
        (src / "config.json").read_text()).get("dtype", config.get("torch_dtype"))
    original = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    written = {k: v for f in out.glob("*.safetensors") for k, v in load_file(f).items()}
    quantised = [k for k in original if fp8_weights.is_quantized(k, original[k])]
    assert quantised and set(written) == set(original) | {k + "_scale_inv" for k in quantised}
    for name, tensor in original.items():
        if name in quantised:
            assert written[name].dtype == torch.float8_e4m3fn
            deq = dequantize_block_fp8(written[name], written[name + "_scale_inv"])
            assert (deq - tensor.float()).abs().max() <= tensor.abs().max() / 16
        else:
            assert torch.equal(written[name], tensor)


def test_config_fields_are_validated_and_the_engine_checks_the_served_checkpoint(tmp_path):
    from megatron_archer.rollout import SGLangEngine
    from megatron_archer.trainer.config import SGLangConfig

    with pytest.raises(ValueError, match="weight_dtype must be one of bf16, fp8; got 'fp16'"):
        SGLangConfig(server_urls=("http://x",), weight_dtype="fp16")
    with pytest.raises(ValueError, match="model_path is required with weight_dtype 'fp8'"):
        SGLangConfig(server_urls=("http://x",), weight_dtype="fp8")
    assert SGLangConfig(server_urls=("http://x",), weight_dtype="fp8", model_path="/m").model_path == "/m"
    src = write_checkpoint(tmp_path / "qwen3", "qwen3")
    with pytest.raises(ValueError, match="must serve a block-FP8 checkpoint"):
        SGLangEngine(["http://x"], weight_dtype="fp8", base_model_path=src)
    with pytest.raises(ValueError, match="^weight_dtype must be one of bf16, fp8; got 'int8'$"):
        SGLangEngine(["http://x"], weight_dtype="int8")
    engine = SGLangEngine(["http://x"], weight_dtype="fp8", base_model_path=write_fp8_checkpoint(
        src, tmp_path / "fp8"))
    sent = [p for b in engine._as_sent([_bucket()]) for p in b]
    assert sent[1][1].dtype == torch.float8_e4m3fn and sent[2][0].endswith("weight_scale_inv")
    assert SGLangEngine(["http://x"])._as_sent is not None


def test_fp8_request_bodies_are_valid_sglang_requests(tmp_path):
    """The tensor and distributed sync bodies with FP8 buckets parse as SGLang 0.5.5's request
    types, SGLang's own deserialiser restores the float8 tensors bit for bit, and the dtype
    names the distributed sync announces are torch attributes (SGLang does getattr(torch, d))."""
    from megatron_archer.rollout import sglang_payloads as payloads
    from megatron_archer.rollout.weight_buckets import bucket_metadata, serialize_named_tensors
    from tests.rollout.test_sglang_payloads import _deserialize, _validate

    bucket = next(fp8_weight_buckets([_bucket()]))
    names, dtypes, shapes = bucket_metadata(bucket)
    assert "float8_e4m3fn" in dtypes and all(isinstance(getattr(torch, d), torch.dtype) for d in dtypes)
    serialized = serialize_named_tensors(bucket)
    restored = _deserialize(serialized)
    for (name, got), (_, sent) in zip(restored, bucket):
        assert got.dtype == sent.dtype and torch.equal(got.view(torch.uint8) if got.dtype ==
                                                       torch.float8_e4m3fn else got,
                                                       sent.view(torch.uint8) if sent.dtype ==
                                                       torch.float8_e4m3fn else sent), name
    cases = [("UpdateWeightsFromTensorReqInput", payloads.update_from_tensor_payload([serialized], 3)),
             ("UpdateWeightsFromDistributedReqInput",
              payloads.update_from_distributed_payload(names, dtypes, shapes, "g", 3))]
    report = _validate(cases, False, tmp_path)
    assert [r["status"] for r in report["results"]] == ["ok", "ok"], report


def test_the_fp8_rollout_example_config_loads_with_the_correction_on():
    from pathlib import Path

    from megatron_archer.trainer.config import load_config

    config = load_config(Path(__file__).parents[2] / "examples" / "scale" /
                         "archer_r1_distill_1.5b_math_fp8_rollout.yaml")
    assert config.rollout.sglang.weight_dtype == "fp8" and config.rollout.sglang.model_path
    correction = config.algorithm.rollout_correction
    assert (correction.enabled, correction.level, correction.mode, correction.threshold) == (
        True, "token", "truncate", 2.0)
    assert config.algorithm.old_logprobs == "recompute"
