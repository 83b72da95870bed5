"""The SGLang adapter against fake servers that enforce the rules real SGLang versions follow at a
weight update (seen on real servers on CPU: tests/sglang_server, and in SGLang's sources):

- later 0.5.x refuse ``/update_weights_from_tensor`` and ``/update_weights_from_distributed``
  outside a ``/begin_weight_update`` ... ``/end_weight_update`` session, and a second begin while
  one is open; 0.5.5 has neither route;
- ``/flush_cache`` answers 400 and flushes nothing while requests run (200 only when it flushed);
- 0.5.5's ``/pause_generation`` ignores its mode and aborts every running request.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import torch

from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.http_client import ServerError
from megatron_archer.rollout.sglang_engine import SGLangEngine
from tests.rollout.fake_server import (
    ROUTING_SHAPE,
    FakeServer,
    fake_generate,
    fake_routing,
    fast_policies,
    ok_script,
)

BUCKETS = [[("w", torch.zeros(4))]]
SESSION_REFUSAL = "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"


class SessionServer:
    """Later 0.5.x: weight updates only inside a session, one session at a time."""

    def __init__(self, fail_update: bool = False):
        self.open, self.fail_update = False, fail_update

    def __call__(self, path, body):
        if path == "/begin_weight_update":
            if self.open:
                return 400, {"success": False, "message": "a weight-update session is already open"}
            self.open = True
        elif path == "/end_weight_update":
            if not self.open:
                return 400, {"success": False, "message": "no weight-update session is open"}
            self.open = False
        elif path == "/update_weights_from_tensor":
            if not self.open:
                return 400, {"success": False, "message": SESSION_REFUSAL}
            if self.fail_update:
                return 400, {"success": False, "message": "bad tensor"}
        return ok_script(path, body)


def test_tensor_updates_run_in_a_session_where_the_server_has_them():
    script = SessionServer()
    with FakeServer(script, version="0.5.23", sessions=True) as new, FakeServer(ok_script) as old:
        engine = SGLangEngine([new.url, old.url], policies=fast_policies())
        engine.update_weights(BUCKETS, 1)
        engine.update_weights(BUCKETS, 2)
    assert engine.weight_version == 2 and not script.open
    assert new.paths() == ["/pause_generation", "/begin_weight_update",
                           "/update_weights_from_tensor", "/end_weight_update", "/flush_cache",
                           "/continue_generation"] * 2  # fmt: skip
    assert old.paths() == ["/pause_generation", "/update_weights_from_tensor", "/flush_cache",
                           "/continue_generation"] * 2, "0.5.5: no session"  # fmt: skip
    assert [s.protocol.version for s in engine.servers] == ["0.5.23", "0.5.5"]


def test_a_failed_update_still_closes_its_session():
    script = SessionServer(fail_update=True)
    with FakeServer(script, version="0.5.23", sessions=True) as server:
        engine = SGLangEngine([server.url], policies=fast_policies())
        with pytest.raises(ServerError, match="bad tensor"):
            engine.update_weights(BUCKETS, 1)
        assert not script.open, "the next begin would be refused"
        script.fail_update = False
        engine.update_weights(BUCKETS, 2)
    assert engine.weight_version == 2


class BusyFlushServer:
    """``/flush_cache`` refused (400, nothing flushed) for the first ``busy`` calls, as while the
    requests an abort ended are still in the running batch."""

    def __init__(self, busy: int):
        self.busy, self.flushed = busy, False

    def __call__(self, path, body):
        if path == "/flush_cache":
            if self.busy > 0:
                self.busy -= 1
                return 400, "Cache flushed ... (When there are running or waiting requests, the operation will not be performed.)"  # noqa: E501
            self.flushed = True
        return ok_script(path, body)


def test_a_refused_flush_is_asked_again_until_it_happens():
    script = BusyFlushServer(busy=3)
    with FakeServer(script) as server:
        engine = SGLangEngine([server.url], policies=fast_policies())
        engine.update_weights(BUCKETS, 1)
    assert script.flushed and server.paths().count("/flush_cache") == 4
    assert engine.weight_version == 1


def test_an_update_whose_flush_never_happens_fails():
    script = BusyFlushServer(busy=10**6)
    with FakeServer(script) as server:
        engine = SGLangEngine([server.url], policies=replace(fast_policies(), flush_wait_s=0.5))
        with pytest.raises(ServerError, match="KV cache was not flushed"):
            engine.update_weights(BUCKETS, 1)
        assert server.paths()[-1] == "/continue_generation"
        with pytest.raises(RuntimeError, match="generate\\(\\) refuses"):
            engine.generate([[1]], SamplingParams(max_new_tokens=2))
    assert engine.weight_version is None


class AbortingPauseServer:
    """SGLang 0.5.5: ``/pause_generation`` (any mode) aborts every running request, which answers
    at once with finish_reason "abort" and the tokens it had; new requests wait for
    ``/continue_generation``. A request that runs to the end answers ``fake_generate``'s tokens
    plus the loaded version (no version spans in 0.5.5)."""

    def __init__(self):
        self.version, self.pauses, self.arrived = 0, 0, threading.Semaphore(0)
        self.unpaused, self.go = threading.Event(), threading.Event()
        self.unpaused.set()

    def __call__(self, path, body):
        if path == "/pause_generation":
            self.unpaused.clear()
            self.pauses += 1  # aborts the requests running now
        elif path == "/continue_generation":
            self.unpaused.set()
        elif path == "/update_weights_from_tensor":
            self.version = int(body["weight_version"])
        if path != "/generate":
            return ok_script(path, body)
        self.unpaused.wait(10)
        started = self.pauses
        self.arrived.release()
        while not self.go.wait(0.01):
            if self.pauses != started:
                answers = fake_generate(body)
                for answer in answers:
                    answer["output_ids"] = answer["output_ids"][:1]
                    answer["meta_info"].update(finish_reason={"type": "abort"},
                                               output_token_logprobs=[[-0.5, answer["output_ids"][0], None]])
                return 200, answers
        answers = fake_generate(body)
        for answer in answers:
            answer["output_ids"] = [t + self.version for t in answer["output_ids"]]
            answer["meta_info"]["output_token_logprobs"] = [[-0.5, t, None] for t in answer["output_ids"]]
        return 200, answers


def test_requests_aborted_by_an_update_pause_are_sent_again_on_the_new_weights():
    """rollout.async on SGLang 0.5.5: the update's pause aborts the two running requests; they are
    sent again after the update, whole, and their samples carry the new version."""
    script = AbortingPauseServer()
    with FakeServer(script) as server:
        engine = SGLangEngine([server.url], policies=fast_policies(timeout_s=20.0),
                              max_inflight=2, pause_mode="retract")
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            samples=engine.generate([[10], [20]], SamplingParams(max_new_tokens=2))))
        worker.start()
        assert script.arrived.acquire(timeout=10) and script.arrived.acquire(timeout=10)
        engine.update_weights(BUCKETS, 5)
        assert script.arrived.acquire(timeout=10) and script.arrived.acquire(timeout=10)
        script.go.set()
        worker.join(20)
    samples = result["samples"]
    assert [g[0].token_ids for g in samples] == [[16, 16], [26, 26]], "generated on version 5"
    assert [g[0].weight_version for g in samples] == [5, 5]
    assert server.paths().count("/generate") == 4
    assert engine.take_metrics()["rollout/requests_resubmitted"] == 2


def test_routing_is_asked_for_and_parsed_where_sglang_has_it():
    """``actor.routing_replay: rollout``: later 0.5.x return each sequence's routed experts when
    asked (``return_routed_experts``), base64 of an int32 [tokens - 1, layers, top_k] array; 0.5.5
    has no such field and is refused before any request; a server started without
    ``--enable-return-routed-experts`` answers without them."""
    params = SamplingParams(max_new_tokens=2, n=2, seed=1)
    with FakeServer(ok_script, version="0.5.23") as server:
        engine = SGLangEngine([server.url], policies=fast_policies(), routing=ROUTING_SHAPE)
        (group,) = engine.generate([[3, 4, 5]], params)
    ((path, body),) = server.requests
    assert path == "/generate" and body["return_routed_experts"] is True
    for sample in group:
        assert sample.routing.dtype == torch.int16 and sample.routing.shape == (4, 3, 2)
        assert torch.equal(sample.routing, fake_routing([3, 4, 5], sample.token_ids).short())
    with FakeServer(ok_script) as old:
        engine = SGLangEngine([old.url], policies=fast_policies(), routing=ROUTING_SHAPE)
        with pytest.raises(ValueError, match=r"^actor.routing_replay='rollout' needs /generate's "
                                             r"return_routed_experts, which SGLang 0\.5\.5 "):
            engine.generate([[3, 4, 5]], params)
    assert old.requests == []

    def without(path, body):
        status, answer = ok_script(path, body)
        for result in answer:
            del result["meta_info"]["routed_experts"]
        return status, answer

    with FakeServer(without, version="0.5.23") as server:
        engine = SGLangEngine([server.url], policies=fast_policies(), routing=ROUTING_SHAPE)
        with pytest.raises(RuntimeError, match="--enable-return-routed-experts"):
            engine.generate([[3, 4, 5]], params)
