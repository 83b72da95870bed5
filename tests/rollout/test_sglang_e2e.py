"""End to end on a real SGLang server (needs sglang with its CUDA stack and a GPU; skipped
elsewhere): generate with log-probs, then a colocated weight update from the actor's buckets
makes the returned log-probs those of the new weights (the server runs in float32)."""

from __future__ import annotations

import socket

import pytest
import torch

from megatron_archer.rollout.engine import SamplingParams

pytest.importorskip("sglang.srt.entrypoints.http_server")
if not torch.cuda.is_available():
    pytest.skip("SGLang needs a CUDA GPU", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sglang_generates_and_takes_a_colocated_weight_update(tmp_path):
    import transformers
    from safetensors.torch import load_file

    from megatron_archer.rollout.sglang_engine import SGLangEngine
    from tests.models.checkpoints import write_checkpoint

    old = write_checkpoint(tmp_path / "old", "qwen2", seed=1)
    new = write_checkpoint(tmp_path / "new", "qwen2", seed=2)
    engine = SGLangEngine.launch(
        old, base_port=_free_port(),
        extra_args=["--skip-tokenizer-init", "--dtype", "float32", "--mem-fraction-static", "0.3"],
    )  # fmt: skip
    try:
        params = SamplingParams(max_new_tokens=8, n=2, temperature=0.8)
        prompts = [[1, 2, 3], [4, 5]]
        engine.update_weights([[(n, t.cuda()) for n, t in load_file(new / "model.safetensors").items()]], 1)
        samples = engine.generate(prompts, params)
        model = transformers.AutoModelForCausalLM.from_pretrained(new, dtype=torch.float32)
        for prompt, group in zip(prompts, samples):
            for s in group:
                assert len(s.token_ids) == len(s.logprobs) > 0
                ids = torch.tensor([prompt + s.token_ids])
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1] / 0.8
                expected = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompt):, None])
                assert torch.allclose(torch.tensor(s.logprobs), expected.squeeze(-1), atol=2e-2)
        assert engine.health()
    finally:
        engine.shutdown()
