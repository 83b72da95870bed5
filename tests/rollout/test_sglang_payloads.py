"""Every request body the SGLang adapter builds is accepted by SGLang's own request types at both
ends of the supported range, 0.5.5 (``requirements/sglang-cpu.txt``, in the venv) and the newest
0.5.x (``requirements/sglang-newest.txt``, in ``.venv/sglang-newest``): field names and pydantic
type validation, as its FastAPI server parses them, in a subprocess per version
(``sglang_validate.py``); skipped where that version is not installed. Weight buckets round-trip
through the tensor serialisation it uses."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_archer.buckets import bounded_buckets
from megatron_archer.rollout import sglang_payloads as payloads
from megatron_archer.rollout.engine import EntropyAwareDecoding, SamplingParams
from megatron_archer.rollout.weight_buckets import bucket_metadata, serialize_named_tensors

PARAMS = SamplingParams(max_new_tokens=8, n=2, temperature=0.7, top_p=0.9, top_k=20,
                        stop_token_ids=(3, 4), seed=1)  # fmt: skip
BUCKET = [("model.embed_tokens.weight", torch.randn(10, 4)),
          ("model.norm.weight", torch.randn(4).to(torch.bfloat16))]  # fmt: skip
VALIDATOR = Path(__file__).with_name("sglang_validate.py")
NEWEST = Path(sys.prefix) / "sglang-newest"
# the endpoints that read no body in 0.5.5 (their request types came later), and those it lacks
BODYLESS_IN_055 = {"PauseGenerationReqInput", "ContinueGenerationReqInput"}
ABSENT_IN_055 = {"BeginWeightUpdateReqInput", "EndWeightUpdateReqInput"}


def _cases() -> list[tuple[str, dict]]:
    """Every body the adapter sends, with the request type SGLang parses it into."""
    names, dtypes, shapes = bucket_metadata(BUCKET)
    serialized = serialize_named_tensors(BUCKET)
    greedy = payloads.sampling_params_payload(SamplingParams(max_new_tokens=2, temperature=0), None)
    return [
        ("GenerateReqInput", payloads.generate_payload([[1, 2], [3]], PARAMS, [1, 2])),
        ("GenerateReqInput", {**payloads.generate_payload([[1]], PARAMS, [None]),
                              "sampling_params": [greedy]}),
        ("UpdateWeightsFromTensorReqInput", payloads.update_from_tensor_payload([serialized] * 2, 3)),
        ("InitWeightsUpdateGroupReqInput", payloads.init_group_payload("127.0.0.1", 29500, 1, 3, "g")),
        ("UpdateWeightsFromDistributedReqInput",
         payloads.update_from_distributed_payload(names, dtypes, shapes, "g", 3)),
        ("UpdateWeightFromDiskReqInput", payloads.update_from_disk_payload("/ckpt", 3)),
        ("ReleaseMemoryOccupationReqInput", payloads.memory_payload(payloads.MEMORY_TAGS)),
        ("ResumeMemoryOccupationReqInput", payloads.memory_payload([payloads.WEIGHTS])),
        ("ResumeMemoryOccupationReqInput", payloads.memory_payload(["kv_cache", "cuda_graph"])),
        ("PauseGenerationReqInput", payloads.pause_payload()),
        ("PauseGenerationReqInput", payloads.pause_payload("retract")),  # rollout.async
        ("ContinueGenerationReqInput", payloads.continue_payload()),
        ("BeginWeightUpdateReqInput", payloads.weight_update_session_payload()),
        ("EndWeightUpdateReqInput", payloads.weight_update_session_payload()),
        ("InitWeightsUpdateGroupReqInput", payloads.init_group_payload("127.0.0.1", 29500, 1, 3, "g",
                                                                       "gloo")),
    ]  # fmt: skip


BROKEN = [  # guard: the same check must reject these
    ("UpdateWeightFromDiskReqInput", {"modelpath": "/x"}),
    ("InitWeightsUpdateGroupReqInput", payloads.init_group_payload("127.0.0.1", "not a port", 1, 3, "g")),
    ("PauseGenerationReqInput", {"mode": "stop"}),
]  # fmt: skip


# routing replay's request (``actor.routing_replay: rollout``): a field of later 0.5.x only
ROUTING = ("GenerateReqInput", payloads.generate_payload([[1, 2], [3]], PARAMS, [1, 2],
                                                         routing=True))


def _validate(cases, newest: bool, tmp_path) -> dict:
    """The validator's report for ``cases`` under one SGLang version."""
    env = dict(os.environ)
    if newest:
        if not (NEWEST / ".installed").exists():
            pytest.skip(f"the newest SGLang 0.5.x is not installed in {NEWEST} (make install)")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NEWEST), env.get("PYTHONPATH")]))
    elif importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang (requirements/sglang-cpu.txt) is not installed")
    path = tmp_path / "cases.json"
    path.write_text(json.dumps([{"cls": c, "body": b} for c, b in cases]))
    command = [sys.executable, str(VALIDATOR), str(path), *(["--inert"] if newest else [])]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300,
                          cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("newest", [False, True], ids=["sglang-0.5.5", "sglang-newest"])
def test_every_payload_is_a_valid_request_at_both_versions(newest, tmp_path):
    report = _validate(_cases() + BROKEN + [ROUTING], newest, tmp_path)
    assert report["version"] == ("0.5.23" if newest else "0.5.5"), report["file"]
    *results, routing = report["results"]
    if newest:
        assert routing["status"] == "ok", routing
    else:  # the engine refuses routing replay with 0.5.5 before sending it (test_sglang_versions)
        assert routing["status"] == "error" and "return_routed_experts" in routing["error"]
    good, broken = results[: len(results) - len(BROKEN)], results[len(results) - len(BROKEN):]
    for result in good:
        later = BODYLESS_IN_055 | ABSENT_IN_055
        allowed = {"ok", "absent"} if not newest and result["cls"] in later else {"ok"}
        assert result["status"] in allowed, result
    assert [r["status"] for r in good if r["status"] == "absent"] == (
        [] if newest else ["absent"] * 5)
    assert "no field ['modelpath']" in broken[0]["error"]
    assert "master_port" in broken[1]["error"]
    assert broken[2]["status"] == ("error" if newest else "absent")


def test_memory_tags_are_checked():
    with pytest.raises(ValueError, match="subset of"):
        payloads.memory_payload(["weights", "kv"])
    with pytest.raises(ValueError, match="non-empty"):
        payloads.memory_payload([])


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
