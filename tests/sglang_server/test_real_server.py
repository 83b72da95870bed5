"""The SGLang adapter (``SGLangEngine``) against real SGLang servers on CPU, per version (see
conftest.py): generation and its log-probs against transformers, each weight-sync mode the CPU can
serve checked by the next generation equalling the new weights' reference, colocated
release/resume around a sync, an update landing mid-generation (``rollout.async``), a request
timeout and its re-send, a SIGKILLed server restarted with the current weights, and the fan-out
over 2 servers.

Log-probs follow tests/numerics.py: SGLang's float32 values are as accurate against the float64
reference as transformers' float32 ones; a log-prob rounds at the scale of the logits."""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import replace

import pytest
import torch

from megatron_archer.rollout import SGLangEngine
from megatron_archer.rollout import sglang_payloads as payloads
from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.http_client import RetryPolicy, request_json
from tests.numerics import accuracy_failure
from tests.rollout.fake_server import fast_policies

PROMPTS = [[5, 17, 42, 99], [200, 3, 3, 8, 150], [77]]
GREEDY = SamplingParams(max_new_tokens=24, temperature=0)
CONTROL = RetryPolicy(timeout_s=60.0, attempts=1)
CUDA_ONLY = ("CUDA IPC handles (weight_sync 'tensor' from GPU memory, DeviceHandles) and NCCL "
             "groups need GPUs: a CPU server cannot open them")


def check_samples(samples, prompts, ref, params: SamplingParams, *, greedy=True):
    """Each sample's tokens are transformers' greedy ones (when ``greedy``), and its log-probs
    (log softmax(z / T) at each token, T = 1 when greedy) are as accurate as transformers'."""
    temperature = 1.0 if params.greedy else params.temperature
    for prompt, group in zip(prompts, samples):
        assert len(group) == params.n
        for sample in group:
            tokens = sample.token_ids
            assert len(tokens) == params.max_new_tokens
            if greedy:
                assert tokens == ref.greedy(prompt, params.max_new_tokens), f"prompt {prompt}"
            logits32 = ref.logits(prompt, tokens, torch.float32)
            logits64 = ref.logits(prompt, tokens, torch.float64)
            index = torch.tensor(tokens)[:, None]
            baseline = torch.log_softmax(logits32 / temperature, -1).gather(1, index)[:, 0]
            reference = torch.log_softmax(logits64 / temperature, -1).gather(1, index)[:, 0]
            tested = torch.tensor(sample.logprobs, dtype=torch.float32)
            failure = accuracy_failure(f"log-probs of prompt {prompt}", tested, baseline,
                                       reference, dtype=torch.float32,
                                       scale=(logits64 / temperature).abs().max().item())
            # the error at each position tells a precision loss (even) from a position one (RoPE)
            errors = " ".join(f"{e:.1e}" for e in (tested.double() - reference).abs().tolist())
            assert failure is None, f"{failure}; error by position: {errors}"


def serve(servers, models, engine, name: str, version: int) -> None:
    """``engine`` loads model ``name``'s weights as ``version``; every server then holds it."""
    engine.update_weights(models[name].buckets(), version)
    servers.weights["current"] = models[name]
    assert engine.weight_version == version


def check_serving(servers, ref, engine=None) -> None:
    """Every server generates ``ref``'s greedy tokens (one request per prompt, both servers)."""
    engine = engine or servers.engine
    check_samples(engine.generate(PROMPTS * 2, GREEDY), PROMPTS * 2, ref, GREEDY)


def attached(servers, **kwargs) -> SGLangEngine:
    """Another engine on the same servers (its own weight sync and policies)."""
    kwargs.setdefault("policies", fast_policies(timeout_s=120.0))
    return SGLangEngine(servers.urls, **kwargs)


def test_generate_equals_transformers_with_its_log_probs(servers, models):
    engine = servers.engine
    if servers.weights["current"] is not models["a"]:
        serve(servers, models, engine, "a", 100)
    check_serving(servers, models["a"])
    sampled = SamplingParams(max_new_tokens=12, n=2, temperature=0.8, seed=3)
    check_samples(engine.generate(PROMPTS, sampled), PROMPTS, models["a"], sampled, greedy=False)


def test_disk_sync(servers, models, tmp_path):
    engine = attached(servers, weight_sync="disk", disk_dir=tmp_path,
                      base_model_path=models["a"].path)
    serve(servers, models, engine, "b", 1)
    check_serving(servers, models["b"])
    serve(servers, models, engine, "a", 2)
    check_serving(servers, models["a"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version-2"]


def test_tensor_sync_from_cpu_tensors(servers, models):
    engine = servers.engine
    serve(servers, models, engine, "b", 3)
    check_serving(servers, models["b"])
    serve(servers, models, engine, "a", 4)
    check_serving(servers, models["a"])


def test_tensor_sync_by_cuda_ipc_needs_gpus():
    pytest.skip(CUDA_ONLY)


def test_distributed_sync_over_gloo(servers, models):
    if servers.version == "0.5.5":
        pytest.skip("SGLang 0.5.5's /init_weights_update_group fails on torch >= 2.10 "
                    "(_new_process_group_helper's pg_options), and its pinned torch 2.8 has no "
                    "CPU build here")
    from tests.sglang_server.conftest import free_ports

    engine = attached(servers, weight_sync="distributed")
    engine.init_weight_update_group("127.0.0.1", free_ports(1), backend="gloo")
    try:
        serve(servers, models, engine, "b", 1)
        check_serving(servers, models["b"])
        serve(servers, models, engine, "a", 2)
        check_serving(servers, models["a"])
    finally:
        engine.shutdown()


def test_release_and_resume_around_a_sync(servers, models):
    if servers.version == "0.5.5":
        pytest.skip("SGLang 0.5.5's /release_memory_occupation kills its scheduler on CPU "
                    "(torch.cuda.synchronize: 'Torch not compiled with CUDA enabled')")
    engine = servers.engine  # colocated: release, take the weights back, update, then the cache
    engine.release_memory()
    engine.resume_memory(["weights"])
    serve(servers, models, engine, "b", 5)
    engine.resume_memory(["cache"])
    check_serving(servers, models["b"])
    engine.release_memory()
    engine.resume_memory()
    check_serving(servers, models["b"])
    serve(servers, models, engine, "a", 6)


def seconds_per_token(engine, prompt) -> float:
    """The servers' pace now (the machine may be busy): a short greedy generation, timed."""
    start = time.monotonic()
    engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0))
    return (time.monotonic() - start) / 30


def test_update_mid_generation_in_async_mode(servers, models):
    """``rollout.async``: an update lands while a greedy generation runs. A retracting version
    resumes it on the new weights after a flush: its tokens are A's greedy ones up to some k, then
    B's greedy continuation of the prompt and those k tokens computed afresh (a KV cache of the
    old weights would change them). SGLang 0.5.5 aborts it at the pause: the engine sends it again
    after the update and it is B's greedy generation. The update is timed to land after about a
    third of the tokens; a try where it missed (the request had not started or had finished) is
    still checked, and repeated."""
    engine = attached(servers, weight_sync="tensor", pause_mode="retract",
                      policies=fast_policies(timeout_s=600.0))
    prompt, length = [9, 8, 7], 240
    params = SamplingParams(max_new_tokens=length, temperature=0)
    landed = False
    for attempt in range(3):
        first = 10 * attempt + 1
        serve(servers, models, engine, "a", first)
        delay = seconds_per_token(engine, prompt) * length / 3
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=engine.generate([prompt], params)))
        worker.start()
        time.sleep(delay)
        serve(servers, models, engine, "b", first + 1)
        worker.join(600)
        sample = result["out"][0][0]
        tokens = sample.token_ids
        resent = engine.take_metrics().get("rollout/requests_resubmitted", 0)
        if servers.version == "0.5.5":
            assert tokens in (models["a"].greedy(prompt, length), models["b"].greedy(prompt, length))
            if resent:
                assert resent == 1 and tokens == models["b"].greedy(prompt, length)
                assert sample.weight_version == first + 1, "sent again on the new version"
            landed = landed or resent == 1
        else:
            assert resent == 0, "retracted, not aborted"
            old = models["a"].greedy(prompt, length)
            k = next((i for i, (x, y) in enumerate(zip(tokens, old)) if x != y), length)
            assert tokens[k:] == models["b"].greedy(prompt + tokens[:k], length - k)
            if 0 < k < length:
                assert sample.weight_version == first, "the version the request started with"
                landed = True
        if landed:
            break
    assert landed, "in 3 tries the update never landed mid-generation"


def test_timed_out_request_is_sent_again(servers, models):
    """A server that does not answer within the request timeout (paused here for 5 s): the
    request is closed (SGLang drops a request whose client left), the server answers its health
    check (0.5.5's runs a generation, which waits for the pause's end), and the request is sent
    again; its answer is the right one."""
    url = servers.urls[0]
    policies = fast_policies(timeout_s=3.0, attempts=3)
    engine = SGLangEngine([url], policies=replace(policies, health=RetryPolicy(timeout_s=30.0,
                                                                               attempts=1)))
    request_json(url, "/pause_generation", payloads.pause_payload("abort"), CONTROL)
    resume = threading.Timer(5.0, request_json, (url, "/continue_generation", {}, CONTROL))
    resume.start()
    try:
        samples = engine.generate(PROMPTS[:1], GREEDY)
    finally:
        resume.join()
    check_samples(samples, PROMPTS[:1], servers.weights["current"], GREEDY)
    assert engine.take_metrics()["rollout/requests_retried"] >= 1


def test_killed_server_is_restarted_with_the_current_weights(servers, models):
    """SIGKILL to one server (its whole process group) while 4 requests run on the 2 servers:
    its requests go to the other one, it is restarted and given the current weights (B)."""
    engine = servers.engine
    serve(servers, models, engine, "b", 7)
    victim = engine.servers[0]
    prompts, length = [[i + 1, 2 * i + 3] for i in range(4)], 150
    params = SamplingParams(max_new_tokens=length, temperature=0)
    delay = seconds_per_token(engine, prompts[0]) * length / 4

    def kill():
        time.sleep(delay)
        os.killpg(victim.process.pid, signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    samples = engine.generate(prompts, params)
    killer.join()
    check_samples(samples, prompts, models["b"], params)
    assert engine.take_metrics().get("rollout/server_restarts") == 1
    assert victim.alive()
    check_serving(servers, models["b"])  # the restarted server holds B
    serve(servers, models, engine, "a", 8)


def test_fan_out_over_two_servers(servers, models):
    engine = attached(servers, max_inflight=4)
    seen = []
    post = engine._post

    def recording(server, path, payload, policy):
        if path == "/generate":
            seen.append(server.url)
        return post(server, path, payload, policy)

    engine._post = recording
    prompts = [[i + 1, i + 2] for i in range(12)]
    check_samples(engine.generate(prompts, GREEDY), prompts, servers.weights["current"], GREEDY)
    assert sorted(set(seen)) == sorted(servers.urls) and len(seen) == 12
