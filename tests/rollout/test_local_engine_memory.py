"""LocalEngine's working set on large vocabularies: the model returns logits of the last position
only (prefill included), and rows are sampled in chunks with the same results."""

from __future__ import annotations

from megatron_archer.rollout import local_engine
from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.local_engine import LocalEngine
from tests.actor.common import sample_logprob_failures
from tests.models.checkpoints import write_checkpoint

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [42]]


def test_last_position_logits_only_and_chunked_rows_sample_alike(tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "qwen2", "qwen2")
    engine = LocalEngine(checkpoint)
    shapes = []
    forward = engine.model.forward

    def recording(*args, **kwargs):
        out = forward(*args, **kwargs)
        shapes.append((kwargs["input_ids"].shape[1], out.logits.shape[1]))
        return out

    monkeypatch.setattr(engine.model, "forward", recording)
    params = SamplingParams(n=3, temperature=0.0, max_new_tokens=4)
    whole = engine.generate(PROMPTS, params)
    assert shapes[0] == (6, 1) and all(kept == 1 for _, kept in shapes)  # prefill: 6 positions in
    vocab = engine.model.config.vocab_size
    monkeypatch.setattr(local_engine, "SAMPLE_CHUNK_ELEMENTS", 2 * vocab)  # 2 rows a chunk
    chunked = engine.generate(PROMPTS, params)
    assert [[s.token_ids for s in g] for g in chunked] == [[s.token_ids for s in g] for g in whole]
    assert not sample_logprob_failures(checkpoint, PROMPTS, chunked, whole, 1.0)
