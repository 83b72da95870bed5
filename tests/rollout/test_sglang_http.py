"""SGLangEngine's HTTP behaviour against fake servers on 127.0.0.1: batching across servers and
a router, the update sequence (pause, buckets, flush, continue), retries with backoff, timeouts,
and errors that name the server."""

from __future__ import annotations

import time

import pytest
import torch

from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.http_client import RetryPolicy, ServerError
from megatron_archer.rollout.sglang_engine import SGLangEngine
from tests.rollout.fake_server import FakeServer, fake_generate, ok_script

FAST = RetryPolicy(timeout_s=2.0, attempts=3, backoff_s=0.05)
PARAMS = SamplingParams(max_new_tokens=2, n=2, temperature=0.8, seed=7)
PROMPTS = [[10], [20], [30]]


def test_generate_spreads_rows_over_servers_and_keeps_order():
    with FakeServer(ok_script) as a, FakeServer(ok_script) as b:
        engine = SGLangEngine([a.url, b.url], policy=FAST)
        samples = engine.generate(PROMPTS, PARAMS)
    assert [[s.token_ids for s in g] for g in samples] == [[[11, 11]] * 2, [[21, 21]] * 2, [[31, 31]] * 2]
    assert samples[0][0].logprobs == [-0.5, -0.5] and samples[0][0].temperatures == [0.8, 0.8]
    assert a.paths() == ["/generate"] and b.paths() == ["/generate"]
    seeds = [sp["sampling_seed"] for s in (a, b) for sp in s.requests[0][1]["sampling_params"]]
    assert sorted(seeds) == list(range(7, 13)), "each of the 6 samples has its own seed"


def test_router_takes_generation_and_servers_take_weight_updates():
    with FakeServer(ok_script) as router, FakeServer(ok_script) as w1, FakeServer(ok_script) as w2:
        engine = SGLangEngine([w1.url, w2.url], router_url=router.url, policy=FAST, bucket_bytes=300)
        engine.generate(PROMPTS, PARAMS)
        buckets = [[("a", torch.zeros(50)), ("b", torch.zeros(50))], [("c", torch.zeros(10))]]
        engine.update_weights(buckets, version=4)
    assert router.paths() == ["/generate"]
    expected = ["/pause_generation"] + ["/update_weights_from_tensor"] * 2 + [
        "/flush_cache", "/continue_generation"]  # [a] and [b, c]: 200, 200 + 40 bytes in 300-byte buckets
    assert w1.paths() == expected and w2.paths() == expected
    assert engine.weight_version == 4
    assert w1.requests[1][1]["weight_version"] == "4"


def test_transient_failures_are_retried_with_backoff():
    calls = []

    def flaky(path, body):
        calls.append(time.monotonic())
        return (503, {"error": "busy"}) if len(calls) < 3 else (200, fake_generate(body))

    with FakeServer(flaky) as server:
        samples = SGLangEngine([server.url], policy=FAST).generate([[1]], SamplingParams(max_new_tokens=2))
    assert samples[0][0].token_ids == [2, 2] and len(calls) == 3
    assert calls[2] - calls[1] >= 0.09, "the second wait doubles the first (0.05 s, 0.1 s)"


def test_client_errors_are_not_retried_and_name_the_server():
    with FakeServer(lambda path, body: (400, {"message": "bad field"})) as server:
        with pytest.raises(ServerError, match=rf"{server.url}/generate: HTTP 400: .*bad field"):
            SGLangEngine([server.url], policy=FAST).generate([[1]], PARAMS)
    assert len(server.requests) == 1


def test_a_server_that_dies_mid_request_is_a_clear_error():
    with FakeServer(lambda path, body: "drop") as server:
        with pytest.raises(ServerError, match=rf"{server.url}/generate: no answer after 3 attempts"):
            SGLangEngine([server.url], policy=FAST).generate([[1]], PARAMS)
    assert len(server.requests) == 3


def test_a_slow_server_times_out():
    with FakeServer(ok_script, delay_s=1.0) as server:
        policy = RetryPolicy(timeout_s=0.3, attempts=2, backoff_s=0.0)
        start = time.monotonic()
        with pytest.raises(ServerError, match=rf"{server.url}/generate: no answer.*timed out"):
            SGLangEngine([server.url], policy=policy).generate([[1]], PARAMS)
        assert time.monotonic() - start < 1.5


def test_update_failure_still_resumes_generation_and_keeps_the_version():
    def refuse_update(path, body):
        if path == "/update_weights_from_tensor":
            return 400, {"success": False, "message": "shape mismatch for model.norm.weight"}
        return ok_script(path, body)

    with FakeServer(refuse_update) as server:
        engine = SGLangEngine([server.url], policy=FAST)
        with pytest.raises(ServerError, match="model.norm.weight"):
            engine.update_weights([[("model.norm.weight", torch.ones(3))]], version=2)
    assert server.paths()[-1] == "/continue_generation" and engine.weight_version is None


def test_health_and_memory_endpoints(tmp_path):
    with FakeServer(ok_script) as server:
        engine = SGLangEngine([server.url], policy=FAST)
        assert engine.health()
        engine.release_memory()
        engine.resume_memory()
    assert server.paths() == ["/health", "/release_memory_occupation", "/resume_memory_occupation"]
    assert not SGLangEngine([server.url], policy=FAST).health(), "a stopped server is unhealthy"
