"""FP8 rollout end to end on a real SGLang server (needs sglang with its CUDA stack and an FP8
GPU, compute capability >= 8.9; skipped elsewhere): the server serves a block-FP8 checkpoint
(``write_fp8_checkpoint``), a colocated weight update with ``weight_dtype="fp8"`` sends the new
weights as e4m3 + ``weight_scale_inv``, and the returned log-probs are those of the new weights
(dequantised), not of the launch weights. Not yet run: no session had SGLang on a GPU."""

from __future__ import annotations

import socket

import pytest
import torch

pytest.importorskip("sglang.srt.entrypoints.http_server")
if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
    pytest.skip("SGLang's FP8 GEMMs need a CUDA GPU with compute capability >= 8.9",
                allow_module_level=True)

# every linear layer's output (q, k, v, gate, up: merged in SGLang) a multiple of the 128 block
DIMS = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _dequantised_model(path):
    """The HF model of an FP8 checkpoint with its weights dequantised to float32."""
    import transformers
    from safetensors.torch import load_file

    from megatron_archer.rollout.fp8_weights import dequantize_block_fp8

    tensors = load_file(path / "model.safetensors")
    state = {name: dequantize_block_fp8(t, tensors[name + "_scale_inv"])
             if t.dtype == torch.float8_e4m3fn else t.float()
             for name, t in tensors.items() if not name.endswith("_scale_inv")}
    config = transformers.AutoConfig.from_pretrained(path)
    config.quantization_config = None
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)  # tied
    if missing:
        model.tie_weights()
    return model.eval()


def test_fp8_weight_update_reaches_the_server(tmp_path):
    from safetensors.torch import load_file

    from megatron_archer.rollout.engine import SamplingParams
    from megatron_archer.rollout.fp8_weights import write_fp8_checkpoint
    from megatron_archer.rollout.sglang_engine import SGLangEngine
    from tests.models.checkpoints import write_checkpoint

    old = write_checkpoint(tmp_path / "old", "qwen2", dtype=torch.bfloat16, seed=1, **DIMS)
    new = write_checkpoint(tmp_path / "new", "qwen2", dtype=torch.bfloat16, seed=2, **DIMS)
    served = write_fp8_checkpoint(old, tmp_path / "old-fp8")
    engine = SGLangEngine.launch(
        served, base_port=_free_port(), weight_dtype="fp8",
        extra_args=["--skip-tokenizer-init", "--dtype", "bfloat16", "--mem-fraction-static", "0.3"],
    )  # fmt: skip
    try:
        buckets = [[(n, t.cuda()) for n, t in load_file(new / "model.safetensors").items()]]
        engine.update_weights(buckets, 1)
        prompts = [[1, 2, 3], [4, 5]]
        samples = engine.generate(prompts, SamplingParams(max_new_tokens=8, n=2, temperature=1.0))
        want = _dequantised_model(write_fp8_checkpoint(new, tmp_path / "new-fp8"))
        launch = _dequantised_model(served)
        gaps = {"new": [], "launch": []}
        for prompt, group in zip(prompts, samples):
            for s in group:
                ids = torch.tensor([prompt + s.token_ids])
                for key, model in (("new", want), ("launch", launch)):
                    with torch.no_grad():
                        logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1]
                    ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])
                    gaps[key].append((torch.tensor(s.logprobs) - ref.squeeze(-1)).abs().mean())
        new_gap, launch_gap = torch.stack(gaps["new"]).mean(), torch.stack(gaps["launch"]).mean()
        # FP8 activations and bf16 arithmetic leave a gap; the launch weights' is far larger
        assert new_gap < 0.2 and new_gap < launch_gap / 3, (new_gap, launch_gap)
        assert engine.health()
    finally:
        engine.shutdown()
