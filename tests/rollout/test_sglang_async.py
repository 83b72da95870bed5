"""SGLangEngine under asynchronous training (``pause_mode="retract"``), against a fake server on
127.0.0.1 that models SGLang's pause: while paused a request makes no progress and resumes
after ``/continue_generation`` on the new weights, its answer carrying the version spans of
later SGLang 0.5.x (``meta_info.weight_versions``). A weight update from the trainer's thread
while ``generate`` runs in another: every request is answered (none lost or resent), each
sample's ``weight_version`` is the one its request started with, and the update is the usual
pause (mode ``retract``), buckets, flush, continue."""

from __future__ import annotations

import threading

import torch

from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.sglang_engine import SGLangEngine
from megatron_archer.rollout.sglang_payloads import parse_generate_result
from tests.rollout.fake_server import FakeServer, fake_generate, fast_policies, ok_script

PARAMS = SamplingParams(max_new_tokens=2, n=2, temperature=0.8, seed=7)


class PausingServer:
    """The script: ``/generate`` waits for ``go``; a request that saw a pause gets spans of its
    start version then the one loaded meanwhile."""

    def __init__(self):
        self.lock, self.version = threading.Lock(), "0"
        self.running, self.go, self.unpaused = 0, threading.Event(), threading.Event()
        self.unpaused.set()
        self.arrived = threading.Semaphore(0)

    def __call__(self, path, body):
        if path == "/pause_generation":
            self.unpaused.clear()
        elif path == "/continue_generation":
            self.unpaused.set()
        elif path == "/update_weights_from_tensor":
            self.version = body["weight_version"]
        if path != "/generate":
            return ok_script(path, body)
        start = self.version
        self.arrived.release()
        self.go.wait(10)
        self.unpaused.wait(10)
        answers = fake_generate(body)
        spans = [{"version": start, "start": 0, "end": 1}, {"version": self.version, "start": 1,
                                                            "end": 2}]
        for answer in answers:
            answer["meta_info"]["weight_versions"] = spans if start != self.version else \
                [{"version": start, "start": 0, "end": 2}]
        return 200, answers


def test_an_update_mid_generation_loses_no_request_and_versions_are_the_starting_ones():
    script = PausingServer()
    with FakeServer(script) as server:
        engine = SGLangEngine([server.url], policies=fast_policies(timeout_s=20.0),
                              max_inflight=2, pause_mode="retract")
        assert engine.updates_during_generation
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            samples=engine.generate([[10], [20], [30], [40]], PARAMS)))
        worker.start()
        script.arrived.acquire(timeout=10), script.arrived.acquire(timeout=10)  # 2 in flight
        updater = threading.Thread(target=engine.update_weights,
                                   args=([[("w", torch.zeros(4))]], 1))
        updater.start()
        while "/pause_generation" not in server.paths():
            threading.Event().wait(0.01)
        script.go.set()  # the two running requests go on only after continue
        updater.join(10), worker.join(20)
    samples = result["samples"]
    assert [[s.token_ids for s in g] for g in samples] == [[[t + 1] * 2] * 2 for t in
                                                           (10, 20, 30, 40)]
    assert [g[0].weight_version for g in samples] == [0, 0, 1, 1], \
        "the first two started on version 0 (and finished on 1), the next two on 1"
    assert engine.weight_version == 1
    pause = [body for path, body in server.requests if path == "/pause_generation"]
    assert pause == [{"mode": "retract"}]
    assert server.paths().count("/generate") == 4, "no request resent"
    control = [p for p in server.paths() if p != "/generate"]
    assert control == ["/pause_generation", "/update_weights_from_tensor", "/flush_cache",
                       "/continue_generation"]


def test_a_version_is_read_from_the_spans_or_left_to_the_trainer():
    def result(meta):
        return {"output_ids": [5], "meta_info": {"finish_reason": {"type": "stop"},
                                                 "output_token_logprobs": [[-0.1, 5, None]],
                                                 **meta}}

    spans = [{"version": "3", "start": 0, "end": 1}, {"version": "4", "start": 1, "end": 1}]
    assert parse_generate_result(result({"weight_versions": spans}), PARAMS, "u").weight_version == 3
    for meta in ({}, {"weight_version": "default"},
                 {"weight_versions": [{"version": "default", "start": 0, "end": 1}]}):
        assert parse_generate_result(result(meta), PARAMS, "u").weight_version is None
