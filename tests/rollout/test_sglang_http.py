"""SGLangEngine's HTTP behaviour against fake servers on 127.0.0.1: batching across servers and
a router, the update sequence (pause, buckets, flush, continue), retries with backoff, timeouts,
errors that name the server, failed updates (every server continues, generation refused until
an update succeeds), and disk weight sync (the checkpoint written, loaded, pruned)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.http_client import ServerError
from megatron_archer.rollout.sglang_engine import SGLangEngine
from tests.rollout.fake_server import FakeServer, fake_generate, fast_policies, ok_script

FAST = fast_policies()
PARAMS = SamplingParams(max_new_tokens=2, n=2, temperature=0.8, seed=7)
PROMPTS = [[10], [20], [30]]


def test_generate_spreads_prompts_over_servers_and_keeps_order():
    with FakeServer(ok_script) as a, FakeServer(ok_script) as b:
        engine = SGLangEngine([a.url, b.url], policies=FAST)
        samples = engine.generate(PROMPTS, PARAMS)
    assert [[s.token_ids for s in g] for g in samples] == [[[11, 11]] * 2, [[21, 21]] * 2, [[31, 31]] * 2]
    assert samples[0][0].logprobs == [-0.5, -0.5] and samples[0][0].temperatures == [0.8, 0.8]
    requests = a.requests + b.requests
    assert a.paths() and b.paths() and set(a.paths() + b.paths()) == {"/generate"}
    assert sorted(len(body["input_ids"]) for _, body in requests) == [2, 2, 2], "one per prompt"
    seeds = {body["input_ids"][0][0]: [sp["sampling_seed"] for sp in body["sampling_params"]]
             for _, body in requests}
    assert seeds == {10: [7, 8], 20: [9, 10], 30: [11, 12]}, "each of the 6 samples has its seed"


def test_router_takes_generation_and_servers_take_weight_updates():
    with FakeServer(ok_script) as router, FakeServer(ok_script) as w1, FakeServer(ok_script) as w2:
        engine = SGLangEngine([w1.url, w2.url], router_url=router.url, policies=FAST, bucket_bytes=300)
        engine.generate(PROMPTS, PARAMS)
        buckets = [[("a", torch.zeros(50)), ("b", torch.zeros(50))], [("c", torch.zeros(10))]]
        engine.update_weights(buckets, version=4)
    assert router.paths() == ["/generate"] * 3 and "/generate" not in w1.paths() + w2.paths()
    expected = ["/pause_generation"] + ["/update_weights_from_tensor"] * 2 + [
        "/flush_cache", "/continue_generation"]  # [a] and [b, c]: 200, 200 + 40 bytes in 300-byte buckets
    assert w1.paths() == expected and w2.paths() == expected
    assert engine.weight_version == 4
    assert w1.requests[1][1]["weight_version"] == "4"


def test_transient_failures_are_retried_with_backoff():
    calls = []

    def flaky(path, body):
        if path != "/generate":
            return ok_script(path, body)
        calls.append(time.monotonic())
        return (503, {"error": "busy"}) if len(calls) < 3 else (200, fake_generate(body))

    with FakeServer(flaky) as server:
        engine = SGLangEngine([server.url], policies=FAST)
        samples = engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert samples[0][0].token_ids == [2, 2] and len(calls) == 3
    assert calls[2] - calls[1] >= 0.09, "the second wait doubles the first (0.05 s, 0.1 s)"
    assert server.paths() == ["/generate", "/health"] * 2 + ["/generate"], "a health check each"
    assert engine.take_metrics() == {"rollout/requests_retried": 2.0}


def test_client_errors_are_not_retried_and_name_the_server():
    with FakeServer(lambda path, body: (400, {"message": "bad field"})) as server:
        with pytest.raises(ServerError, match=rf"{server.url}/generate: HTTP 400: .*bad field"):
            SGLangEngine([server.url], policies=FAST).generate([[1]], PARAMS)
    assert len(server.requests) == 1


def test_an_attached_server_that_dies_is_a_clear_error_naming_it():
    with FakeServer(lambda path, body: "drop") as server:
        with pytest.raises(ServerError, match=rf"{server.url} stopped answering mid-rollout and "
                                              rf"fails its health check.*not restarted"):
            SGLangEngine([server.url], policies=FAST).generate([[1]], PARAMS)
    assert server.paths() == ["/generate", "/health"]


def test_update_failure_still_resumes_generation_and_keeps_the_version():
    def refuse_update(path, body):
        if path == "/update_weights_from_tensor":
            return 400, {"success": False, "message": "shape mismatch for model.norm.weight"}
        return ok_script(path, body)

    with FakeServer(refuse_update) as server:
        engine = SGLangEngine([server.url], policies=FAST)
        with pytest.raises(ServerError, match="model.norm.weight"):
            engine.update_weights([[("model.norm.weight", torch.ones(3))]], version=2)
    assert server.paths()[-1] == "/continue_generation" and engine.weight_version is None


def test_health_and_memory_endpoints(tmp_path):
    with FakeServer(ok_script) as server:
        engine = SGLangEngine([server.url], policies=FAST)
        assert engine.health()
        engine.resume_memory()  # nothing released: nothing sent (SGLang would raise)
        engine.release_memory()
        engine.release_memory()  # released already
        engine.resume_memory(["weights"])
        engine.resume_memory()  # the cache only
        engine.resume_memory()
    assert server.paths() == ["/health", "/release_memory_occupation"] + [
        "/resume_memory_occupation"] * 2
    tags = [body["tags"] for path, body in server.requests if path.endswith("_occupation")]
    assert tags == [["weights", "kv_cache", "cuda_graph"], ["weights"], ["kv_cache", "cuda_graph"]]
    assert not SGLangEngine([server.url], policies=FAST).health(), "a stopped server is unhealthy"


def _refusing(path_to_refuse, after=0):
    """ok_script, but ``path_to_refuse`` is answered 400 after ``after`` successful calls, while
    ``refuse["on"]`` holds."""
    refuse, calls = {"on": True}, []

    def script(path, body):
        if path == path_to_refuse and refuse["on"]:
            calls.append(path)
            if len(calls) > after:
                return 400, {"success": False, "message": f"refused {path}"}
        return ok_script(path, body)

    return script, refuse


@pytest.mark.parametrize("failing_path, after", [
    ("/pause_generation", 0), ("/update_weights_from_tensor", 1), ("/flush_cache", 0),
])  # fmt: skip
def test_one_server_failing_mid_update_is_named_and_every_server_continues(failing_path, after):
    script, refuse = _refusing(failing_path, after)
    with FakeServer(ok_script) as a, FakeServer(script) as b:
        engine = SGLangEngine([a.url, b.url], policies=FAST, bucket_bytes=300)
        buckets = [[("a", torch.zeros(50)), ("b", torch.zeros(50))], [("c", torch.zeros(10))]]
        with pytest.raises(ServerError, match=rf"{b.url}{failing_path}: HTTP 400") as error:
            engine.update_weights(buckets, version=1)
        assert a.url not in str(error.value), "only the failing server is named"
        assert a.paths()[-1] == b.paths()[-1] == "/continue_generation"
        assert engine.weight_version is None
        with pytest.raises(RuntimeError, match="update to version 1 failed.*refuses"):
            engine.generate(PROMPTS, PARAMS)
        assert "/generate" not in a.paths() + b.paths()
        refuse["on"] = False
        engine.update_weights(buckets, version=2)
        assert engine.weight_version == 2 and engine.generate(PROMPTS, PARAMS)


def test_every_failing_server_is_named():
    refuse_all = lambda path, body: (400, {"message": "no"})  # noqa: E731
    with FakeServer(refuse_all) as a, FakeServer(refuse_all) as b:
        with pytest.raises(ServerError, match=rf"{a.url}/pause_generation.*; {b.url}/pause"):
            SGLangEngine([a.url, b.url], policies=FAST).update_weights([[("a", torch.zeros(1))]], 1)
    assert a.paths() == b.paths() == ["/pause_generation", "/continue_generation"]


def _base_model(directory):
    """A base model directory: config, tokenizer and generation files, and its own weights."""
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "qwen2", "dtype": "float32"}')
    (directory / "tokenizer.json").write_text('{"version": "1.0"}')
    (directory / "generation_config.json").write_text('{"do_sample": true}')
    save_file({"base": torch.zeros(1)}, directory / "model.safetensors")
    return directory


def _loaded(checkpoint):
    """Every tensor of a sharded safetensors checkpoint, through its index."""
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(checkpoint / shard))
    assert sorted(tensors) == sorted(index["weight_map"])
    return tensors


def _disk_request(server, version):
    """The checkpoint path of the last disk update (its body is validated against SGLang's types
    in test_sglang_payloads)."""
    body = [b for p, b in server.requests if p == "/update_weights_from_disk"][-1]
    assert body == {"model_path": body["model_path"], "weight_version": str(version)}
    return Path(body["model_path"])


def test_disk_sync_writes_a_loadable_checkpoint_and_prunes_old_versions(tmp_path):
    base, disk = _base_model(tmp_path / "base"), tmp_path / "disk"
    (disk / "notes").mkdir(parents=True)  # not a version directory: never pruned
    torch.manual_seed(0)
    buckets = [[("a", torch.randn(50)), ("b", torch.randn(50))], [("c", torch.randn(10))]]
    with FakeServer(ok_script) as server:
        engine = SGLangEngine([server.url], weight_sync="disk", disk_dir=disk,
                              base_model_path=base, bucket_bytes=300, policies=FAST)  # fmt: skip
        engine.update_weights(buckets, version=1)
        assert server.paths() == ["/pause_generation", "/update_weights_from_disk",
                                  "/flush_cache", "/continue_generation"]  # fmt: skip
        checkpoint = _disk_request(server, 1)
        assert checkpoint == (disk / "version-1").resolve() and checkpoint.is_absolute()
        assert sorted(p.name for p in checkpoint.glob("*.safetensors")) == [
            "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # [a], [b, c]
        tensors = _loaded(checkpoint)
        assert sorted(tensors) == ["a", "b", "c"], "the base model's weights are not copied"
        for name, tensor in (pair for bucket in buckets for pair in bucket):
            assert torch.equal(tensors[name], tensor), name
        for name in ("tokenizer.json", "generation_config.json"):
            assert (checkpoint / name).read_bytes() == (base / name).read_bytes()
        assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "qwen2"
        assert engine.weight_version == 1

        engine.update_weights([[("a", torch.ones(50))]], version=2)
        assert _disk_request(server, 2) == (disk / "version-2").resolve()
        assert sorted(p.name for p in disk.iterdir()) == ["notes", "version-2"]
        assert torch.equal(load_file(disk / "version-2" / "model.safetensors")["a"], torch.ones(50))


def test_disk_sync_refused_by_one_server_keeps_the_version_and_the_checkpoints(tmp_path):
    script, refuse = _refusing("/update_weights_from_disk", after=1)
    with FakeServer(ok_script) as a, FakeServer(script) as b:
        engine = SGLangEngine([a.url, b.url], weight_sync="disk", disk_dir=tmp_path / "disk",
                              base_model_path=_base_model(tmp_path / "base"),
                              policies=FAST)  # fmt: skip
        engine.update_weights([[("a", torch.zeros(4))]], version=1)
        with pytest.raises(ServerError, match=rf"{b.url}/update_weights_from_disk: HTTP 400"):
            engine.update_weights([[("a", torch.ones(4))]], version=2)
        assert engine.weight_version == 1
        assert a.paths()[-1] == b.paths()[-1] == "/continue_generation"
        assert _disk_request(a, 2) == (tmp_path / "disk" / "version-2").resolve()
        names = sorted(p.name for p in (tmp_path / "disk").iterdir())
        assert names == ["version-1", "version-2"], "a failed update prunes nothing"
        refuse["on"] = False
        engine.update_weights([[("a", torch.full((4,), 3.0))]], version=3)
        assert engine.weight_version == 3
        assert [p.name for p in (tmp_path / "disk").iterdir()] == ["version-3"]


def test_a_call_that_is_not_idempotent_is_repeated_only_when_never_delivered():
    from megatron_archer.rollout.http_client import RetryPolicy, ServerUnreachable, request_json

    once = RetryPolicy(timeout_s=1.0, attempts=3, backoff_s=0.0, idempotent=False)
    again = RetryPolicy(timeout_s=1.0, attempts=3, backoff_s=0.0)
    with FakeServer(lambda path, body: "drop") as server:
        with pytest.raises(ServerUnreachable, match="not retried: the call is not safe to repeat"):
            request_json(server.url, "/update_weights_from_tensor", {}, once)
        assert len(server.requests) == 1
        with pytest.raises(ServerUnreachable, match="no answer after 3 attempts"):
            request_json(server.url, "/flush_cache", None, again)
        assert len(server.requests) == 4
    with socket.socket() as sock:  # a port nobody listens on: refused, so safe to repeat
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ServerUnreachable, match="no answer after 3 attempts.*refused"):
        request_json(url, "/update_weights_from_tensor", {}, once)


def test_a_request_that_never_gets_an_answer_fails_after_its_attempts():
    def busy(path, body):
        return (503, {"error": "busy"}) if path == "/generate" else ok_script(path, body)

    with FakeServer(busy) as server:
        engine = SGLangEngine([server.url], policies=FAST)
        with pytest.raises(ServerError, match="/generate of one prompt failed 3 times, last: .*503"):
            engine.generate([[1]], PARAMS)
    assert server.paths().count("/generate") == 3
    assert engine.take_metrics() == {"rollout/requests_retried": 2.0}


def test_servers_take_turns_when_each_request_finishes_before_the_next():
    """One request at a time (max_inflight 1): every pick sees both servers idle, and the ties
    go round, so both servers serve (the first server took all three before)."""
    with FakeServer(ok_script) as a, FakeServer(ok_script) as b:
        engine = SGLangEngine([a.url, b.url], policies=FAST, max_inflight=1)
        engine.generate(PROMPTS, PARAMS)
    assert (len(a.paths()), len(b.paths())) == (2, 1)
