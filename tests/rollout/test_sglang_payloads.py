"""Every request body the SGLang adapter builds is accepted by the installed SGLang's own request
types (field names and pydantic type validation, as its FastAPI server parses them; skipped
without sglang), and weight buckets round-trip through the tensor serialisation it uses."""

from __future__ import annotations

import base64
import dataclasses
import pickle

import pytest
import torch

from megatron_archer.rollout import sglang_payloads as payloads
from megatron_archer.rollout.engine import EntropyAwareDecoding, SamplingParams
from megatron_archer.buckets import bounded_buckets
from megatron_archer.rollout.weight_buckets import bucket_metadata, serialize_named_tensors

PARAMS = SamplingParams(max_new_tokens=8, n=2, temperature=0.7, top_p=0.9, top_k=20,
                        stop_token_ids=(3, 4), seed=1)  # fmt: skip
BUCKET = [("model.embed_tokens.weight", torch.randn(10, 4)),
          ("model.norm.weight", torch.randn(4).to(torch.bfloat16))]  # fmt: skip


def _validate(cls, payload: dict):
    """Construct ``cls`` the way SGLang's server does (pydantic over the dataclass), after
    checking that every field we send exists."""
    from pydantic import TypeAdapter

    unknown = set(payload) - {f.name for f in dataclasses.fields(cls)}
    assert not unknown, f"{cls.__name__} has no field {sorted(unknown)}"
    return TypeAdapter(cls).validate_python(payload)


@pytest.fixture(scope="module")
def io_struct():
    return pytest.importorskip("sglang.srt.managers.io_struct")


def test_generate_payload_is_a_valid_generate_request(io_struct):
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams

    body = payloads.generate_payload([[1, 2], [3]], PARAMS, [1, 2])
    request = _validate(io_struct.GenerateReqInput, body)
    request.normalize_batch_and_arguments()
    assert request.batch_size == 2 and request.return_logprob == [True, True]
    for sampling in body["sampling_params"]:
        SGLangSamplingParams(**sampling).verify(vocab_size=250)
    greedy = payloads.sampling_params_payload(SamplingParams(max_new_tokens=2, temperature=0), None)
    SGLangSamplingParams(**greedy).verify(vocab_size=250)


def test_weight_and_memory_payloads_are_valid_requests(io_struct):
    names, dtypes, shapes = bucket_metadata(BUCKET)
    cases = [
        (io_struct.UpdateWeightsFromTensorReqInput,
         payloads.update_from_tensor_payload(serialize_named_tensors(BUCKET), 2, 3)),
        (io_struct.InitWeightsUpdateGroupReqInput,
         payloads.init_group_payload("127.0.0.1", 29500, 1, 3, "g")),
        (io_struct.UpdateWeightsFromDistributedReqInput,
         payloads.update_from_distributed_payload(names, dtypes, shapes, "g", 3)),
        (io_struct.UpdateWeightFromDiskReqInput, payloads.update_from_disk_payload("/ckpt", 3)),
        (io_struct.ReleaseMemoryOccupationReqInput, payloads.memory_payload(None)),
        (io_struct.ResumeMemoryOccupationReqInput, payloads.memory_payload(["weights"])),
    ]  # fmt: skip
    for cls, body in cases:
        _validate(cls, body)
    assert [getattr(torch, d) for d in dtypes] == [torch.float32, torch.bfloat16]


def test_validation_can_fail(io_struct):
    """Guard: a misspelt field or a wrongly typed value is caught by the same check."""
    with pytest.raises(AssertionError, match="no field"):
        _validate(io_struct.UpdateWeightFromDiskReqInput, {"modelpath": "/x"})
    with pytest.raises(Exception, match="master_port"):
        _validate(io_struct.InitWeightsUpdateGroupReqInput, payloads.init_group_payload(
            "127.0.0.1", "not a port", 1, 3, "g"))  # fmt: skip


def _deserialize(serialized: str):
    """SGLang's own deserialiser (its restricted unpickler) when installed, else plain pickle."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError:
        return pickle.loads(base64.b64decode(serialized))
    return MultiprocessingSerializer.deserialize(serialized)


def test_weight_buckets_round_trip_through_the_serialisation():
    restored = _deserialize(serialize_named_tensors(BUCKET))
    assert [name for name, _ in restored] == [name for name, _ in BUCKET]
    for (_, got), (_, sent) in zip(restored, BUCKET):
        assert got.dtype == sent.dtype and torch.equal(got, sent)


def test_bounded_buckets_respect_the_size_and_order():
    tensors = [(f"t{i}", torch.zeros(i + 1)) for i in range(6)]  # 4..24 bytes
    buckets = list(bounded_buckets(tensors, max_bytes=24))
    assert [n for b in buckets for n, _ in b] == [n for n, _ in tensors]
    assert all(len(b) == 1 or sum(t.numel() * 4 for _, t in b) <= 24 for b in buckets)
    assert [[n for n, _ in b] for b in buckets] == [["t0", "t1", "t2"], ["t3"], ["t4"], ["t5"]]
    with pytest.raises(ValueError, match="max_bytes"):
        list(bounded_buckets(tensors, 0))


def test_parse_generate_result_and_unsupported_options():
    result = {"output_ids": [5, 6], "meta_info": {
        "finish_reason": {"type": "stop", "matched": 6},
        "output_token_logprobs": [[-0.1, 5, None], [-0.2, 6, None]]}}  # fmt: skip
    sample = payloads.parse_generate_result(result, PARAMS, "http://x")
    assert sample.token_ids == [5, 6] and sample.logprobs == [-0.1, -0.2]
    assert sample.finish_reason == "stop" and sample.temperatures == [0.7, 0.7]
    result["meta_info"]["finish_reason"] = {"type": "abort", "message": "oom"}
    with pytest.raises(RuntimeError, match=r"http://x: generation ended .*abort"):
        payloads.parse_generate_result(result, PARAMS, "http://x")
    rule = EntropyAwareDecoding(threshold=1.0, t_high=1.2, t_low=0.6)
    with pytest.raises(ValueError, match="entropy_aware"):
        payloads.sampling_params_payload(SamplingParams(max_new_tokens=2, entropy_aware=rule), None)
