"""FP8 rollout weights: block-wise e4m3 quantisation of the weights sent to SGLang, in the layout
SGLang loads for FP8 checkpoints (the DeepSeek-V3 convention, ``weight_block_size`` 128 x 128).

For an [N, K] linear weight W cut into 128 x 128 blocks B_ij (the last ones may be smaller):

    s_ij = max|B_ij| / 448           (float32; 1 for an all-zero block)
    q    = e4m3(clamp(W / s, -448, 448))    (round to nearest even)
    W   ~= q * s

``<prefix>.weight`` becomes the float8_e4m3fn ``q`` and ``<prefix>.weight_scale_inv``, the
float32 [ceil(N/128), ceil(K/128)] grid of s, follows it ("inv": the factor that dequantises,
the inverse of the quantisation scale), as SGLang's ``block_quant_dequant`` reads them. Per
element, with y = W / s: |W - q s| <= s * max(2^-4 |y|, 2^-10) (3 mantissa bits for normal
values, steps of 2^-9 below 2^-6). Quantised: the 2-D ``.weight`` of the decoder layers' linear
layers (``q/k/v/o_proj``, ``gate/up/down_proj``); embeddings, ``lm_head``, norms and biases keep
their dtype, as in the FP8 checkpoints SGLang serves (its FP8 method covers linear layers only).

The servers must run on such a checkpoint (``config.json`` with ``FP8_QUANTIZATION_CONFIG``):
``python -m megatron_archer.rollout.fp8_weights SRC_HF_DIR OUT_DIR`` writes one from the
trainer's checkpoint. nvidia-modelopt's ``FP8QTensor`` does the quantisation where it is
installed (same layout; the torch code here otherwise).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

from megatron_archer.buckets import Bucket

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                           "weight_block_size": [BLOCK, BLOCK]}
WEIGHT_DTYPES = ("bf16", "fp8")
_QUANTIZED = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight")


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """The tensor travels as FP8: a decoder layer's 2-D linear weight (module docstring)."""
    return tensor.dim() == 2 and _QUANTIZED.fullmatch(name) is not None


def _block_amax(weight: torch.Tensor, block: int) -> torch.Tensor:
    """[ceil(N/block), ceil(K/block)] max |w| per block (zero padding does not change a max)."""
    n, k = weight.shape
    padded = weight.new_zeros(-(-n // block) * block, -(-k // block) * block)
    padded[:n, :k] = weight.abs()
    return padded.unflatten(0, (-1, block)).unflatten(2, (-1, block)).amax(dim=(1, 3))


def _expand(scale: torch.Tensor, shape: torch.Size, block: int) -> torch.Tensor:
    """The per-block grid repeated over each block's elements, cropped to ``shape``."""
    full = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return full[: shape[0], : shape[1]]


def _modelopt_fp8():
    """modelopt's FP8QTensor where nvidia-modelopt is installed, else None."""
    if importlib.util.find_spec("modelopt") is None:
        return None
    from modelopt.torch.quantization.qtensor.fp8_tensor import FP8QTensor

    return FP8QTensor


def quantize_block_fp8(weight: torch.Tensor, block: int = BLOCK, *, name: str = "weight",
                       use_modelopt: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [N, K], weight_scale_inv float32 [ceil(N/block), ceil(K/block)]) of a 2-D
    weight, on its device; computed in float32. ``use_modelopt``: None = where installed.
    Raises ValueError naming ``name`` for a non-2-D or non-finite weight."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: block FP8 needs a 2-D weight, got shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} has non-finite values: it cannot be quantised to FP8")
    fp8 = _modelopt_fp8() if use_modelopt is not False else None
    if use_modelopt and fp8 is None:
        raise ValueError("use_modelopt=True but nvidia-modelopt is not installed")
    if fp8 is not None:
        packed, scale = fp8.quantize(w, block_sizes={-1: block, -2: block})
        q, scale = packed._quantized_data, scale.to(torch.float32)
        # modelopt 0.47 turns an all-zero block into NaN (0 / 0): zeros with scale 1, as below
        zero = _expand(scale == 0, w.shape, block)
        q = q.view(torch.uint8).masked_fill(zero, 0).view(torch.float8_e4m3fn)
        return q, torch.where(scale > 0, scale, torch.ones_like(scale))
    amax = _block_amax(w, block)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / _expand(scale, w.shape, block)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_block_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * weight_scale_inv per block, in ``dtype`` (what SGLang's block_quant_dequant computes)."""
    return (q.to(dtype) * _expand(scale_inv.to(dtype), q.shape, block)).to(dtype)


def fp8_weight_buckets(buckets: Iterable[Bucket], block: int = BLOCK) -> Iterator[Bucket]:
    """The same buckets with every quantised weight replaced by its FP8 tensor followed by its
    ``weight_scale_inv`` (same name with that suffix); lazily, one bucket at a time, so the weight
    sync streams as before (every sync mode re-buckets by bytes after this)."""
    for bucket in buckets:
        if not isinstance(bucket, list):
            raise TypeError(f"fp8_weight_buckets needs buckets of (name, tensor) pairs, got "
                            f"{type(bucket).__name__}: quantise before serialising them")
        out: Bucket = []
        for name, tensor in bucket:
            if is_quantized(name, tensor):
                q, scale = quantize_block_fp8(tensor, block, name=name)
                out += [(name, q), (name.removesuffix("weight") + "weight_scale_inv", scale)]
            else:
                out.append((name, tensor))
        yield out


def require_fp8_checkpoint(model_dir: str | Path) -> None:
    """The checkpoint the servers load is block FP8 in this layout (its ``config.json`` has
    ``FP8_QUANTIZATION_CONFIG``), else ValueError saying how to write one."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    quant = config.get("quantization_config") or {}
    if quant.get("quant_method") != "fp8" or list(quant.get("weight_block_size") or []) != [BLOCK, BLOCK]:
        raise ValueError(
            f"weight_dtype fp8: the SGLang servers must serve a block-FP8 checkpoint "
            f"(quantization_config {FP8_QUANTIZATION_CONFIG}); {path} has "
            f"{quant or 'no quantization_config'}. Write one with "
            f"`python -m megatron_archer.rollout.fp8_weights {model_dir} OUT_DIR`")


def write_fp8_checkpoint(src_dir: str | Path, out_dir: str | Path, *,
                         max_shard_bytes: int = 5 * 10**9) -> Path:
    """A block-FP8 copy of the HF checkpoint ``src_dir`` in ``out_dir`` (written atomically):
    its quantised weights as above, the rest unchanged, ``config.json`` with the
    ``quantization_config`` SGLang reads; for launching the servers of an FP8 rollout."""
    from safetensors import safe_open

    from megatron_archer.models.hf_save import write_hf_checkpoint

    src_dir, out_dir = Path(src_dir), Path(out_dir)
    files = sorted(src_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{src_dir} has no .safetensors weights")

    def tensors():
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    yield [(key, handle.get_tensor(key))]

    write_hf_checkpoint(fp8_weight_buckets(tensors()), out_dir, metadata_dir=src_dir,
                        max_shard_bytes=max_shard_bytes)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    partial = config_path.with_suffix(".json.partial")
    partial.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(partial, config_path)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=write_fp8_checkpoint.__doc__)
    parser.add_argument("src_dir")
    parser.add_argument("out_dir")
    args = parser.parse_args(argv)
    print(write_fp8_checkpoint(args.src_dir, args.out_dir))


if __name__ == "__main__":
    main()
