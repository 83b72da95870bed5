"""LocalEngine: seeded reproducibility, finish reasons, n samples, greedy, entropy-aware
temperatures, update_weights checks (a failed update changes nothing), and log-probs equal to
the megatron actor's after a weight update from its exported buckets (fp32, 1 gloo rank)."""

from __future__ import annotations

import pytest
import torch
import transformers

from megatron_archer.models.hf_import import SafetensorsCheckpoint
from megatron_archer.rollout.engine import EntropyAwareDecoding, SamplingParams
from megatron_archer.rollout.local_engine import LocalEngine
from megatron_archer.rollout.metrics import logprob_gap
from megatron_archer.rollout.sampling import token_entropy
from tests.actor.common import sample_logprob_failures
from tests.distributed import run_distributed
from tests.models.checkpoints import write_checkpoint
from tests.models.parallel import model_parallel

PROMPTS = [[1, 2, 3], [7, 8, 9, 10, 11, 12], [42]]
# fp32 on CPU: a left-padded, KV-cached batch against one unpadded full forward (megatron or HF)
# differs by summation order only, ~1e-6 here
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("rollout") / "qwen2", "qwen2")


@pytest.fixture(scope="module")
def engine(checkpoint):
    return LocalEngine(checkpoint)


def _tokens(samples):
    return [[s.token_ids for s in group] for group in samples]


def test_seed_reproduces_samples_and_another_seed_differs(engine):
    params = SamplingParams(max_new_tokens=6, n=2, temperature=1.0, top_p=0.95, seed=11)
    first = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    assert _tokens(first) == _tokens(again)
    assert [[s.logprobs for s in g] for g in first] == [[s.logprobs for s in g] for g in again]
    other = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, n=2, top_p=0.95, seed=12))
    assert _tokens(first) != _tokens(other)
    assert [len(g) for g in first] == [2, 2, 2], "n samples per prompt, in prompt order"
    assert first[0][0].token_ids != first[0][1].token_ids, "the n samples are distinct draws"


def test_stop_token_ids_and_max_new_tokens_give_finish_reasons(engine):
    base = SamplingParams(max_new_tokens=8, n=2, seed=5)
    original = engine.generate(PROMPTS, base)
    for group in original:
        for s in group:
            assert len(s.token_ids) == 8 and s.finish_reason == "length"
    stop_id = original[0][0].token_ids[2]
    stopped = engine.generate(PROMPTS, SamplingParams(**{**base.__dict__, "stop_token_ids": (stop_id,)}))
    reasons = []
    for group, ref_group in zip(stopped, original):
        for s, ref in zip(group, ref_group):
            expected_end = ref.token_ids.index(stop_id) + 1 if stop_id in ref.token_ids else 8
            assert s.token_ids == ref.token_ids[:expected_end]
            assert s.finish_reason == ("stop" if stop_id in ref.token_ids else "length")
            assert s.logprobs == pytest.approx(ref.logprobs[:expected_end], abs=TOLERANCE)
            reasons.append(s.finish_reason)
    assert stopped[0][0].finish_reason == "stop" and len(stopped[0][0].token_ids) <= 3
    assert "length" in reasons, "rows without the stop token run to max_new_tokens"


def test_top_k_one_equals_greedy(engine):
    greedy = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0))
    for seed in (1, 2):
        top1 = engine.generate(
            PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.3, top_k=1, seed=seed)
        )
        assert _tokens(top1) == _tokens(greedy)
    sampled = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=1.3, seed=1))
    assert _tokens(sampled) != _tokens(greedy), "guard: sampling at T=1.3 is not greedy here"


def _reference(checkpoint, prompt, tokens):
    """Full-vocabulary logits at each response position, from one unpadded HF forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0]
    return logits[len(prompt) - 1 : -1]


def test_entropy_aware_decoding_uses_t_high_above_threshold(engine, checkpoint):
    probe = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=3))
    entropies = torch.cat([
        token_entropy(_reference(checkpoint, p, g[0].token_ids)) for p, g in zip(PROMPTS, probe)
    ]).sort().values  # fmt: skip
    k = len(entropies) // 2
    threshold = (entropies[k - 1] + entropies[k]).item() / 2
    rule = EntropyAwareDecoding(threshold=threshold, t_high=1.7, t_low=0.4)
    samples = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, seed=4, entropy_aware=rule))
    used = set()
    for prompt, group in zip(PROMPTS, samples):
        s = group[0]
        logits = _reference(checkpoint, prompt, s.token_ids)
        entropy = token_entropy(logits)
        expected_t = torch.where(entropy > threshold, 1.7, 0.4)
        clear = (entropy - threshold).abs() > 1e-4
        assert torch.equal(torch.tensor(s.temperatures)[clear], expected_t[clear])
        logp = torch.log_softmax(logits / torch.tensor(s.temperatures)[:, None], -1)
        expected = logp.gather(-1, torch.tensor(s.token_ids)[:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.logprobs), expected, atol=TOLERANCE)
        used.update(round(t, 5) for t in s.temperatures)
    assert used == {1.7, 0.4}, f"the threshold should split the tokens, saw {used}"


def test_update_weights_checks_names_shapes_and_tracks_version(checkpoint):
    engine = LocalEngine(checkpoint)
    assert engine.weight_version is None and engine.health()
    norm = engine.model.get_parameter("model.norm.weight")
    with pytest.raises(KeyError, match="model.nrom.weight"):
        engine.update_weights([[("model.nrom.weight", torch.ones(64))]], version=1)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has shape \[63\]"):
        engine.update_weights([[("model.norm.weight", torch.ones(63))]], version=1)
    assert engine.weight_version is None
    engine.update_weights([[("model.norm.weight", torch.full((64,), 2.0))]], version=3)
    assert engine.weight_version == 3 and torch.equal(norm, torch.full((64,), 2.0))
    engine.release_memory()
    assert not engine.health()
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))
    engine.resume_memory()
    assert engine.health() and engine.generate(PROMPTS, SamplingParams(max_new_tokens=2))


def test_a_failed_update_changes_nothing_and_a_later_one_applies(checkpoint):
    engine = LocalEngine(checkpoint)
    engine.update_weights([[("model.norm.weight", torch.full((64,), 1.5))]], version=1)
    greedy = SamplingParams(max_new_tokens=4, temperature=0)
    before = engine.generate(PROMPTS, greedy)
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    embed = torch.randn(engine.model.get_input_embeddings().weight.shape)

    def buckets(second):  # the first bucket is good, the second fails on its last tensor
        yield [("model.embed_tokens.weight", embed)]
        yield [("model.norm.weight", torch.ones(64)), second]

    for bad in [
        ("model.nrom.weight", torch.ones(64)),  # unknown name
        ("model.norm.weight", torch.ones(63)),  # wrong shape
        ("model.norm.weight", torch.full((64,), float("nan"))),
        ("model.norm.weight", torch.full((64,), 1e39, dtype=torch.float64)),  # inf in float32
    ]:  # fmt: skip
        with pytest.raises((KeyError, ValueError), match=rf"version 2\): {bad[0]}"):
            engine.update_weights(buckets(bad), version=2)
        assert engine.weight_version == 1
        assert all(torch.equal(v, state[k]) for k, v in engine.model.state_dict().items()), bad[0]
        assert engine.generate(PROMPTS, greedy) == before, "generation exactly as before"
    engine.update_weights(buckets(("model.layers.0.input_layernorm.weight", torch.ones(64))), 2)
    assert engine.weight_version == 2
    assert torch.equal(engine.model.get_input_embeddings().weight, embed)
    assert engine.generate(PROMPTS, greedy) != before, "the new weights are in use"


def _actor_logprobs(loaded, prompt, sample, temperature):
    from megatron_archer.ops import vocab_parallel_logprobs_and_entropy

    ids = torch.tensor([prompt + sample.token_ids])
    with torch.no_grad():
        logits = loaded.model(ids, torch.arange(ids.shape[1])[None], None)[0]
    logp, _ = vocab_parallel_logprobs_and_entropy(
        logits[len(prompt) - 1 : -1], torch.tensor(sample.token_ids),
        temperature=temperature, vocab_size=loaded.spec.vocab_size,
    )  # fmt: skip
    return logp


def _gap(engine, loaded, params):
    samples = engine.generate(PROMPTS, params)
    rollout, train = [], []
    for prompt, group in zip(PROMPTS, samples):
        for s in group:
            rollout.append(torch.tensor(s.logprobs))
            train.append(_actor_logprobs(loaded, prompt, s, params.temperature))
    rollout, train = torch.cat(rollout), torch.cat(train)
    return logprob_gap(rollout, train, torch.ones_like(rollout, dtype=torch.bool))


def _gap_worker(rank: int, world_size: int, engine_checkpoint, actor_checkpoint) -> None:
    from megatron_archer.models import hf_weight_buckets, load_hf_model

    with model_parallel(1):
        loaded = load_hf_model(actor_checkpoint, params_dtype=torch.float32)
        loaded.model.eval()
        engine = LocalEngine(engine_checkpoint)
        params = SamplingParams(max_new_tokens=10, n=2, temperature=0.7, top_p=0.9, top_k=50, seed=0)
        before = _gap(engine, loaded, params)
        assert before["rollout/logprob_abs_diff_max"] > 0.1, f"guard: different weights {before}"
        buckets = hf_weight_buckets(loaded.model, loaded.spec, loaded.backend, 40_000)
        engine.update_weights(buckets, version=1)
        after = _gap(engine, loaded, params)
        assert engine.weight_version == 1
        assert after["rollout/logprob_abs_diff_max"] < TOLERANCE, after


def test_logprobs_match_the_actor_after_a_weight_update(tmp_path):
    engine_checkpoint = write_checkpoint(tmp_path / "engine", "qwen2_tied", seed=1)
    actor_checkpoint = write_checkpoint(tmp_path / "actor", "qwen2_tied", seed=2)
    run_distributed(_gap_worker, 1, engine_checkpoint, actor_checkpoint)


def test_generation_uses_every_core_and_restores_the_thread_count(checkpoint, monkeypatch):
    """On CPU generation runs on every core (``cpu_cores``) whatever the thread count outside,
    which is restored after; the samples equal a one-thread engine's (tokens exactly, log-probs
    up to float rounding)."""
    from megatron_archer.rollout import local_engine

    monkeypatch.setattr(local_engine, "cpu_cores", lambda: 3)
    every, single = LocalEngine(checkpoint), LocalEngine(checkpoint, threads=1)
    seen = []
    forward = every.model.forward
    monkeypatch.setattr(every.model, "forward", lambda *a, **k: (
        seen.append(torch.get_num_threads()), forward(*a, **k))[1])
    params = SamplingParams(max_new_tokens=5, n=3, temperature=1.0, seed=4)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        got = every.generate(PROMPTS, params)
        assert torch.get_num_threads() == 1
        want = single.generate(PROMPTS, params)
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {3}
    assert _tokens(got) == _tokens(want)
    assert not sample_logprob_failures(checkpoint, PROMPTS, got, want, 1.0)
    with pytest.raises(ValueError, match="LocalEngine threads=0"):
        LocalEngine(checkpoint, threads=0)


def test_each_prompt_is_prefilled_once_for_its_n_rows(engine, checkpoint, monkeypatch):
    """The prefill runs on the distinct prompts only; its cache and logits serve each prompt's
    n rows: the samples equal those of every row prefilled on its own (the prompts repeated,
    n = 1: the same rows in the same order, so the same draws), tokens exactly, log-probs up to
    float rounding (the matmuls see fewer rows)."""
    prompts = [[5, 6, 7, 8, 9], [3], [11, 12]]  # prompts of different lengths: left padding
    batches = []
    forward = engine.model.forward
    monkeypatch.setattr(engine.model, "forward", lambda *a, **k: (
        batches.append(tuple(k["input_ids"].shape)), forward(*a, **k))[1])
    params = SamplingParams(max_new_tokens=7, n=4, temperature=1.2, seed=9)
    got = engine.generate(prompts, params)
    assert batches[0] == (3, 5) and set(batches[1:]) == {(12, 1)}
    rows = engine.generate([p for p in prompts for _ in range(4)],
                           SamplingParams(**{**params.__dict__, "n": 1}))
    assert (12, 5) in batches  # the reference prefilled every row
    want = [[g[0] for g in rows[i:i + 4]] for i in range(0, 12, 4)]
    assert _tokens(got) == _tokens(want)
    assert len({tuple(s.token_ids) for g in got for s in g}) > 3, "guard: the rows differ"
    for group, ref in zip(got, want):
        for s, r in zip(group, ref):
            assert s.finish_reason == r.finish_reason
    assert not sample_logprob_failures(checkpoint, prompts, got, want, 1.2)


def test_decode_steps_hand_transformers_its_own_mask_exactly(engine, monkeypatch):
    """Decode steps pass the padding mask as the 4D boolean mask transformers would build (None
    where nothing is padded), so transformers builds a mask for the prefill only; the samples are
    bitwise those of the 2D mask that transformers turns into the same mask: left-padded and
    unpadded prompts, rows stopping at different steps (their later keys masked)."""
    import transformers.masking_utils as masking_utils

    from megatron_archer.rollout.local_engine import _full_sdpa_attention

    assert engine._prepared_mask, "guard: the test checkpoint takes the prepared-mask path"
    built = []
    sdpa_mask = masking_utils.sdpa_mask
    monkeypatch.setitem(masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "sdpa",
                        lambda *a, **k: (built.append(k["attention_mask"] is not None), sdpa_mask(*a, **k))[1])
    base = SamplingParams(max_new_tokens=9, n=3, temperature=1.0, seed=3)
    stop_id = engine.generate(PROMPTS, base)[1][0].token_ids[2]
    for prompts in (PROMPTS, [[4, 5, 6], [9, 8, 7]]):
        params = SamplingParams(**{**base.__dict__, "stop_token_ids": (stop_id,)})
        built.clear()
        fast = engine.generate(prompts, params)
        assert sum(built) == 1, "transformers built a mask for the prefill only"
        monkeypatch.setattr(engine, "_prepared_mask", False)
        built.clear()
        slow = engine.generate(prompts, params)
        assert len(built) > 1, "guard: the 2D path lets transformers handle every step's mask"
        monkeypatch.setattr(engine, "_prepared_mask", True)
        assert [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in fast] == \
            [[(s.token_ids, s.logprobs, s.finish_reason) for s in g] for g in slow]
    assert {s.finish_reason for g in fast for s in g} == {"stop", "length"}, "guard: rows stop"
    sliding = transformers.Qwen2Config(use_sliding_window=True, sliding_window=4,
                                       max_window_layers=0, num_hidden_layers=2)
    sliding._attn_implementation = "sdpa"
    assert not _full_sdpa_attention(sliding), "a sliding-window model keeps the 2D mask"
    eager = transformers.Qwen2Config(num_hidden_layers=2)
    eager._attn_implementation = "eager"
    assert not _full_sdpa_attention(eager)


def test_per_expert_buckets_update_a_moe_engine_exactly(tmp_path):
    """Buckets name each expert's matrix as checkpoints do on disk; transformers stacks them in
    memory ([gate; up] per expert): after an update from another checkpoint's on-disk tensors
    the engine's model is that checkpoint's model exactly."""
    engine = LocalEngine(write_checkpoint(tmp_path / "a", "qwen3_moe", seed=0))
    other = write_checkpoint(tmp_path / "b", "qwen3_moe", seed=1)
    on_disk = SafetensorsCheckpoint(other)
    bucket = [(name, on_disk.get(name)) for name in sorted(on_disk.names())]
    assert "model.layers.0.mlp.experts.2.up_proj.weight" in dict(bucket)
    engine.update_weights([bucket], version=1)
    expected = transformers.AutoModelForCausalLM.from_pretrained(other).state_dict()
    got = engine.model.state_dict()
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name
    with pytest.raises(KeyError, match="experts.4.gate_proj.weight is not a parameter"):
        engine.update_weights([[("model.layers.0.mlp.experts.4.gate_proj.weight",
                                 torch.zeros(48, 64))]], version=2)
