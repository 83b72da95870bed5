"""SGLangEngine at scale, against fake servers on 127.0.0.1: one request per prompt with a bound on
those in flight, progress as prompts complete, a slow request retried alone, a launched server
that dies mid-rollout restarted with the current weights (nothing generated lost, the restart
counted), the child environment of launched servers, and a refused distributed update that is
not retried and raises on every rank (real gloo processes)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.distributed as dist

from megatron_archer.rollout import sglang_engine
from megatron_archer.rollout.engine import SamplingParams
from megatron_archer.rollout.http_client import ServerError
from megatron_archer.rollout.sglang_engine import SGLangEngine, child_environment
from megatron_archer.rollout.weight_buckets import (
    DeviceHandles,
    device_key,
    gather_device_handles,
)
from tests.distributed import run_distributed
from tests.rollout.fake_server import (
    FakeServer,
    fake_generate,
    fast_policies,
    ok_script,
    process_command,
    read_log,
)

PARAMS = SamplingParams(max_new_tokens=2, n=2, temperature=1.0, seed=0)
PROMPTS = [[10 * (i + 1)] for i in range(6)]
EXPECTED = [[[p[0] + 1] * 2] * 2 for p in PROMPTS]


def _tokens(samples):
    return [[s.token_ids for s in group] for group in samples]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_requests_in_flight_are_bounded_and_progress_follows_completions():
    lock, state, calls = threading.Lock(), {"now": 0, "peak": 0}, []

    def counting(path, body):
        if path != "/generate":
            return ok_script(path, body)
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.5 if body["input_ids"][0][0] == 10 else 0.05)  # the first prompt is slow
        with lock:
            state["now"] -= 1
        return 200, fake_generate(body)

    with FakeServer(counting) as a, FakeServer(counting) as b:
        engine = SGLangEngine([a.url, b.url], policies=fast_policies(), max_inflight=3,
                              on_progress=lambda done, total: calls.append((done, total)))
        assert _tokens(engine.generate(PROMPTS, PARAMS)) == EXPECTED
    assert state["peak"] == 3, "fanned out, never more than max_inflight"
    assert calls == [(2 * k, 12) for k in range(1, 7)]
    assert len(a.requests) + len(b.requests) == 6 and a.requests and b.requests


def test_a_request_past_its_timeout_is_retried_alone_on_another_server():
    slow_once = {"left": 1}

    def slow(path, body):
        if path == "/generate" and body["input_ids"][0][0] == 30 and slow_once["left"]:
            slow_once["left"] -= 1
            time.sleep(1.5)  # past the 0.5 s request timeout; the server stays healthy
        return ok_script(path, body)

    with FakeServer(slow) as a, FakeServer(slow) as b:
        engine = SGLangEngine([a.url, b.url], policies=fast_policies(timeout_s=0.5))
        start = time.monotonic()
        samples = engine.generate(PROMPTS, PARAMS)
        elapsed = time.monotonic() - start
    assert _tokens(samples) == EXPECTED
    generates = [(s, body["input_ids"][0][0]) for s in (a, b) for p, body in s.requests
                 if p == "/generate"]  # fmt: skip
    firsts = sorted(first for _, first in generates)
    assert firsts == [10, 20, 30, 30, 40, 50, 60], "only the timed-out request was sent again"
    slow_server = next(s for s, first in generates if first == 30 and "/health" in s.paths())
    retried_on = [s for s, first in generates if first == 30 and s is not slow_server]
    assert retried_on, "the retry went to the other server"
    assert engine.take_metrics() == {"rollout/requests_retried": 1.0}
    assert elapsed < 1.5, "the retry did not wait for the slow answer"


@pytest.mark.parametrize("weight_sync", ["disk", "tensor"])
def test_a_launched_server_that_dies_is_restarted_with_the_current_weights(weight_sync, tmp_path):
    from tests.rollout.test_sglang_http import _base_model

    port, log, marker = _free_port(), str(tmp_path / "server.log"), str(tmp_path / "died")
    command = process_command(port, log, die_after=2, die_once_file=marker)
    weights = [[("w", torch.full((4,), 3.0))]]
    options = dict(disk_dir=tmp_path / "disk", base_model_path=_base_model(tmp_path / "base")) \
        if weight_sync == "disk" else dict(weights_source=lambda: weights)
    process = sglang_engine._start_process(command)
    engine = SGLangEngine([f"http://127.0.0.1:{port}"], weight_sync=weight_sync, max_inflight=1,
                          policies=fast_policies(), processes=[process], commands=[command],
                          **options)  # fmt: skip
    try:
        engine._wait_healthy(engine.servers[0], 10.0)
        engine.update_weights(weights, version=5)
        samples = engine.generate(PROMPTS, PARAMS)
        assert engine.servers[0].process is not process and process.poll() is not None
    finally:
        engine.shutdown()
    assert _tokens(samples) == EXPECTED
    records = read_log(log)
    starts = [i for i, r in enumerate(records) if "start" in r]
    assert len(starts) == 2, "started, died, restarted once"
    before, after = records[starts[0] + 1:starts[1]], records[starts[1] + 1:]
    firsts = lambda rs: [r["body"]["input_ids"][0][0] for r in rs if r["path"] == "/generate"]  # noqa: E731
    assert firsts(before) == [10, 20, 30], "it died during the third request"
    assert firsts(after) == [30, 40, 50, 60], "only the unfinished request is sent again"
    restore = [r for r in after if r["path"] != "/health"][:2]
    path = "/update_weights_from_disk" if weight_sync == "disk" else "/update_weights_from_tensor"
    assert [r["path"] for r in restore] == [path, "/flush_cache"], "weights before generation"
    assert restore[0]["body"]["weight_version"] == "5"
    assert engine.take_metrics() == {"rollout/requests_retried": 1.0, "rollout/server_restarts": 1.0}


def test_a_launched_server_that_stops_answering_is_restarted(tmp_path):
    """Hung, not dead: its process lives but neither /generate nor /health answers."""
    port, log, marker = _free_port(), str(tmp_path / "server.log"), str(tmp_path / "hung")
    command = process_command(port, log, die_after=1, die_once_file=marker, hang=True)
    process = sglang_engine._start_process(command)
    engine = SGLangEngine([f"http://127.0.0.1:{port}"], max_inflight=1, processes=[process],
                          commands=[command], policies=fast_policies(timeout_s=0.5))
    try:
        engine._wait_healthy(engine.servers[0], 10.0)
        samples = engine.generate(PROMPTS[:3], PARAMS)
    finally:
        engine.shutdown()
    assert _tokens(samples) == EXPECTED[:3] and process.poll() is not None, "the hung one killed"
    assert engine.take_metrics() == {"rollout/requests_retried": 1.0, "rollout/server_restarts": 1.0}


def test_a_restart_without_a_way_to_restore_the_weights_names_the_server(tmp_path):
    port, log, marker = _free_port(), str(tmp_path / "server.log"), str(tmp_path / "died")
    command = process_command(port, log, die_after=0, die_once_file=marker)
    engine = SGLangEngine([f"http://127.0.0.1:{port}"], policies=fast_policies(),
                          processes=[sglang_engine._start_process(command)],
                          commands=[command])
    try:
        engine._wait_healthy(engine.servers[0], 10.0)
        engine.update_weights([[("w", torch.zeros(2))]], version=1)
        with pytest.raises(ServerError, match=rf"127.0.0.1:{port} was restarted but cannot be "
                                              rf"given weight version 1"):
            engine.generate([[1]], PARAMS)
    finally:
        engine.shutdown()


def test_launched_servers_get_a_clean_environment_and_are_stopped_on_failure(tmp_path, monkeypatch):
    for name, value in [("RANK", "3"), ("WORLD_SIZE", "8"), ("MASTER_ADDR", "10.0.0.1"),
                        ("MASTER_PORT", "29500"), ("LOCAL_RANK", "3"), ("OMP_NUM_THREADS", "1"),
                        ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("KEEP_ME", "1")]:
        monkeypatch.setenv(name, value)
    env = child_environment()
    assert env["KEEP_ME"] == "1" and env["PATH"]
    assert not any(sglang_engine.is_torchrun_variable(k) for k in env)
    assert child_environment({"RANK": "0", "TORCHELASTIC_RUN_ID": "x", "HF_HOME": "/h"}) == {
        "HF_HOME": "/h"}

    ports = [_free_port(), _free_port()]
    logs = [str(tmp_path / f"server{i}.log") for i in range(2)]
    monkeypatch.setattr(sglang_engine, "launch_command",
                        lambda model, port, *args: process_command(port, logs[ports.index(port)]))
    engine = SGLangEngine.launch("/model", num_servers=1, base_port=ports[0], policies=fast_policies(),
                                 startup_timeout_s=20.0)  # fmt: skip
    try:
        assert engine.health()
    finally:
        engine.shutdown()
    child = read_log(logs[0])[0]["start"]
    assert child["KEEP_ME"] == "1" and "RANK" not in child and "MASTER_PORT" not in child
    assert not any(sglang_engine.is_torchrun_variable(k) for k in child)
    assert engine.servers[0].process.poll() is not None, "stopped by shutdown"

    # a server that never comes up: the started ones are stopped, the error names it
    monkeypatch.setattr(sglang_engine, "launch_command", lambda model, port, *args: (
        process_command(port, logs[0]) if port == ports[0] else ["false"]))
    started = []
    real_popen = subprocess.Popen
    monkeypatch.setattr(sglang_engine.subprocess, "Popen",
                        lambda *a, **k: started.append(real_popen(*a, **k)) or started[-1])
    with pytest.raises(ServerError, match=rf"127.0.0.1:{ports[0] + 1}: the server process exited"):
        SGLangEngine.launch("/model", num_servers=2, base_port=ports[0], policies=fast_policies(),
                            startup_timeout_s=20.0)  # fmt: skip
    assert len(started) == 2 and all(p.poll() is not None for p in started)


def test_the_weight_group_rendezvous_runs_without_torchrun_variables(monkeypatch):
    seen = {}
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(sglang_engine, "weight_update_group", lambda *args: seen.update(
        zip(("backend", "init_method", "world_size", "group_name", "timeout"), args),
        agent_store=sglang_engine.os.environ.get("TORCHELASTIC_USE_AGENT_STORE")))
    with FakeServer(ok_script) as server:
        engine = SGLangEngine([server.url], weight_sync="distributed", policies=fast_policies())
        engine.init_weight_update_group("127.0.0.1", 29600)
    assert seen["agent_store"] is None and seen["init_method"] == "tcp://127.0.0.1:29600"
    assert seen["world_size"] == 2 and seen["timeout"].total_seconds() == 2.0
    assert sglang_engine.os.environ["TORCHELASTIC_USE_AGENT_STORE"] == "True", "restored"
    assert server.paths() == ["/init_weights_update_group"]


def refuse_distributed_update(path, body):
    """A server that refuses every distributed weight update (and answers the rest)."""
    if path == "/update_weights_from_distributed":
        return 400, {"success": False, "message": "shape mismatch"}
    return ok_script(path, body)


def _refused_distributed_update_worker(rank, world_size):
    from megatron_archer.trainer.rank_zero import (
        RankZeroError,
        destroy_control_group,
        init_control_group,
        on_rank_zero,
    )

    init_control_group(timeout_minutes=1.0)
    group = dist.new_group([0])  # this process's end of the weight group (a size-1 stand-in)
    server = FakeServer(refuse_distributed_update).__enter__() if rank == 0 else None
    url = [server.url if server else None]
    dist.broadcast_object_list(url, src=0)
    engine = SGLangEngine([url[0]], weight_sync="distributed", policies=fast_policies())
    engine._group = group if rank == 0 else None
    expected = ServerError if rank == 0 else RankZeroError
    with pytest.raises(expected, match=rf"{url[0]}/update_weights_from_distributed: "
                                       rf"HTTP 400.*shape mismatch"):
        on_rank_zero(lambda: engine.update_weights([[("w", torch.ones(3))]], 1), share=False)
    if rank == 0:
        server.__exit__(None, None, None)
        assert server.paths() == ["/pause_generation", "/update_weights_from_distributed",
                                  "/continue_generation"], "sent once, never retried"
        assert engine.weight_version is None
    destroy_control_group()


def _device_handles_worker(rank, world_size):
    from megatron_archer.trainer.rank_zero import (
        control_group,
        destroy_control_group,
        init_control_group,
    )
    from tests.rollout.test_sglang_payloads import _deserialize

    init_control_group(timeout_minutes=1.0)
    buckets = [[("a", torch.full((2,), float(rank)))], [("b", torch.full((3,), 10.0 + rank))]]
    got = list(gather_device_handles(buckets, device_key(rank), group=control_group()))
    if rank == 0:
        assert all(isinstance(h, DeviceHandles) and sorted(h.by_device) == ["cpu:0", "cpu:1"]
                   for h in got)
        for k, name in enumerate("ab"):
            for device in (0, 1):
                [(received, tensor)] = _deserialize(got[k].by_device[f"cpu:{device}"])
                assert received == name and torch.equal(tensor, buckets[k][0][1] * 0 + (
                    device if name == "a" else 10.0 + device)), (name, device)
        with FakeServer(ok_script) as a, FakeServer(ok_script) as b:
            engine = SGLangEngine([a.url, b.url], policies=fast_policies())
            engine.update_weights(got, version=1)
        for server, device in ((a, 0), (b, 1)):
            bodies = [body for path, body in server.requests if path == "/update_weights_from_tensor"]
            assert [body["serialized_named_tensors"] for body in bodies] == [
                [got[k].by_device[f"cpu:{device}"]] for k in (0, 1)], "its own GPU's copy"
    else:
        assert got == [None, None]
    dist.barrier()  # rank 1's tensors stay alive until rank 0 has read them
    destroy_control_group()


def _two_rank_worker(rank, world_size):
    _refused_distributed_update_worker(rank, world_size)
    _device_handles_worker(rank, world_size)


def test_refused_distributed_update_raises_on_every_rank_and_servers_get_their_gpus_handles():
    """One spawned job (2 gloo ranks, the trainer's control group): a refused distributed
    update is not retried and raises on every rank; each colocated server gets the handles
    serialised on its own GPU."""
    run_distributed(_two_rank_worker, 2)


def test_fp8_sync_passes_device_handles_quantised_by_their_senders():
    """Colocated fp8: each rank quantises before serialising (trainer.loop); the engine sends
    the handles as they are, and still quantises plain buckets."""
    handles = DeviceHandles({"cpu:0": "handles-of-gpu-0"})
    with FakeServer(ok_script) as server:
        engine = SGLangEngine([server.url], weight_dtype="fp8", policies=fast_policies())
        engine.update_weights([handles], version=1)
        engine.update_weights([[("model.layers.0.mlp.down_proj.weight", torch.randn(128, 128))]], 2)
    bodies = [body for path, body in server.requests if path == "/update_weights_from_tensor"]
    assert bodies[0]["serialized_named_tensors"] == ["handles-of-gpu-0"]
    from tests.rollout.test_sglang_payloads import _deserialize

    names = [name for name, _ in _deserialize(bodies[1]["serialized_named_tensors"][0])]
    assert names == ["model.layers.0.mlp.down_proj.weight",
                     "model.layers.0.mlp.down_proj.weight_scale_inv"]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_stopping_a_launched_server_stops_its_child_processes(tmp_path):
    """SGLang's server runs its scheduler and detokenizer as child processes: the whole group
    goes, even after the parent has exited."""
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    process = sglang_engine._start_process([sys.executable, "-c", script])
    deadline = time.monotonic() + 20
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert _running(child)
    sglang_engine._stop_process(process, timeout_s=10)
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _running(child) and process.poll() is not None


def test_no_restart_after_shutdown(tmp_path):
    """A generation thread that finds a dead server after the engine was shut down (the step
    failed elsewhere) does not start a process that nobody would stop."""
    port, log = _free_port(), str(tmp_path / "server.log")
    command = process_command(port, log)
    engine = SGLangEngine([f"http://127.0.0.1:{port}"], policies=fast_policies(),
                          processes=[sglang_engine._start_process(command)], commands=[command])
    engine._wait_healthy(engine.servers[0], 10.0)
    engine.shutdown()
    with pytest.raises(ServerError, match="not restarted, the engine was shut down"):
        engine._restart(engine.servers[0], ServerError("gone"))
    assert len([r for r in read_log(log) if "start" in r]) == 1


def test_no_broadcast_follows_a_refused_distributed_update(monkeypatch):
    """Issue 24.6: once a server has refused the update, the remaining tensors of the bucket are
    not broadcast (the refusing server joins none of them; each would wait for the group's
    timeout), and the server's error is what the caller gets."""
    sent = []

    def slow_broadcast(tensor, src, group):
        sent.append(tensor.numel())
        time.sleep(0.05)  # a broadcast the server side takes part in

    monkeypatch.setattr(sglang_engine.torch.distributed, "broadcast", slow_broadcast)
    bucket = [(f"w{i}", torch.ones(2)) for i in range(40)]
    with FakeServer(refuse_distributed_update) as server:
        engine = SGLangEngine([server.url], weight_sync="distributed", policies=fast_policies())
        engine._group = object()  # this process's end of the weight group (never used here)
        with pytest.raises(ServerError, match=r"HTTP 400.*shape mismatch"):
            engine.update_weights([bucket], 1)
    assert 0 < len(sent) < 20, f"{len(sent)} of 40 tensors broadcast after the refusal"


def test_servers_get_the_handles_of_their_gpus_by_uuid_in_their_own_numbering(monkeypatch):
    """Issue 24.5: the servers number their GPUs under their own CUDA_VISIBLE_DEVICES; the
    handles are keyed by GPU UUID, so a server whose device 0 is the trainer's device 2 still
    opens the copy on its own GPU, and one whose GPU sent nothing is named."""
    seen_env = []
    monkeypatch.setattr(sglang_engine, "visible_device_keys",
                        lambda env: seen_env.append(env) or ["GPU-c", "GPU-a", "GPU-b"])
    handles = DeviceHandles({"GPU-a": "on-a", "GPU-b": "on-b", "GPU-c": "on-c"})
    with FakeServer(ok_script) as first, FakeServer(ok_script) as second:
        engine = SGLangEngine([first.url, second.url], base_gpu_id=1, policies=fast_policies())
        engine.update_weights([handles], version=1)
        with pytest.raises(ServerError, match=rf"{second.url}: no weights were serialised on its "
                                              r"GPU\(s\) \['GPU-b'\]"):
            engine.update_weights([DeviceHandles({"GPU-a": "on-a", "GPU-c": "on-c"})], version=2)
    assert len(seen_env) == 1, "listed once per engine"
    assert not any(sglang_engine.is_torchrun_variable(k) for k in seen_env[0])
    for server, expected in ((first, "on-a"), (second, "on-b")):  # server GPUs 1 and 2
        bodies = [b for p, b in server.requests if p == "/update_weights_from_tensor"]
        assert bodies[0]["serialized_named_tensors"] == [expected]


def test_cuda_tensors_are_pickled_naming_their_gpu_by_uuid(monkeypatch):
    """The reduction SGLang's receiver expects: torch's reduce_tensor arguments with the device
    index (argument 6) replaced by the GPU's UUID; CPU tensors as torch pickles them."""
    from types import SimpleNamespace

    from megatron_archer.rollout import weight_buckets

    fake_args = ("cls", (2,), (1,), 0, "storage", "dtype", 3, b"handle", 8, 0, False)
    monkeypatch.setattr(weight_buckets.reductions, "reduce_tensor",
                        lambda tensor: ("rebuild_cuda_tensor", fake_args))
    monkeypatch.setattr(weight_buckets, "gpu_uuid", lambda index: f"uuid-of-{index}")
    rebuild, args = weight_buckets._reduce_naming_gpu_by_uuid(SimpleNamespace(is_cuda=True))
    assert rebuild == "rebuild_cuda_tensor"
    assert args == (*fake_args[:6], "uuid-of-3", *fake_args[7:])
    assert weight_buckets._reduce_naming_gpu_by_uuid(SimpleNamespace(is_cuda=False))[1] == fake_args
    monkeypatch.undo()
    calls = []
    real = weight_buckets._reduce_naming_gpu_by_uuid
    monkeypatch.setattr(weight_buckets, "_reduce_naming_gpu_by_uuid",
                        lambda tensor: calls.append(tensor.shape) or real(tensor))
    from tests.rollout.test_sglang_payloads import _deserialize

    [(name, tensor)] = _deserialize(weight_buckets.serialize_named_tensors([("w", torch.ones(2))]))
    assert calls == [torch.Size([2])] and name == "w" and torch.equal(tensor, torch.ones(2))


def test_servers_that_see_no_gpu_are_named_not_given_the_trainers_numbering(monkeypatch):
    """With CUDA here but no GPU visible to the servers' environment, the update is refused
    naming the server, instead of falling back to this process's device numbering."""
    monkeypatch.setattr(sglang_engine, "visible_device_keys", lambda env: [])
    with FakeServer(ok_script) as server:
        engine = SGLangEngine([server.url], policies=fast_policies())
        with pytest.raises(ServerError, match=rf"{server.url}: its GPU\(s\) \[0\] are not among "
                                              r"the 0 GPUs its environment makes visible"):
            engine.update_weights([DeviceHandles({"GPU-a": "on-a"})], version=1)


def test_plain_buckets_reach_each_server_rank_on_its_own_gpu(monkeypatch):
    """Issue 24.5 (plain buckets: non-colocated tensor sync, a restarted server's
    ``weights_source``): the tensors sit on this process's GPU ("GPU-a"). The server rank on that
    GPU gets their CUDA IPC handles; a rank on another GPU gets a host copy through shared memory,
    never handles on GPU-a (its process would open a CUDA context there and copy across
    devices). Server GPUs count in the servers' own numbering, by UUID; the host copy is made
    once per bucket, whatever the number of ranks on other GPUs."""
    monkeypatch.setattr(sglang_engine, "visible_device_keys",
                        lambda env: ["GPU-c", "GPU-a", "GPU-b", "GPU-d"])
    monkeypatch.setattr(sglang_engine, "bucket_device_key", lambda bucket: "GPU-a")
    host_copies = []
    monkeypatch.setattr(sglang_engine, "to_host", lambda bucket: host_copies.append(bucket) or
                        [(f"host:{name}", tensor) for name, tensor in bucket])
    monkeypatch.setattr(sglang_engine, "serialize_named_tensors",
                        lambda bucket: ",".join(name for name, _ in bucket))
    bucket = [("w0", torch.ones(2)), ("w1", torch.ones(3))]
    with FakeServer(ok_script) as first, FakeServer(ok_script) as second:
        # server 0: GPUs 0, 1 (GPU-c, GPU-a); server 1: GPUs 2, 3 (GPU-b, GPU-d)
        engine = SGLangEngine([first.url, second.url], tp_size=2, policies=fast_policies(),
                              weights_source=lambda: [bucket])
        engine.update_weights([bucket], version=1)
        engine._restore_weights(engine.servers[1])  # a restarted server: from weights_source
    assert len(host_copies) == 2, "one host copy per bucket sent"
    for server, expected in ((first, ["host:w0,host:w1", "w0,w1"]),
                             (second, ["host:w0,host:w1", "host:w0,host:w1"])):
        bodies = [b for p, b in server.requests if p == "/update_weights_from_tensor"]
        assert [b["serialized_named_tensors"] for b in bodies] == \
            [expected] * (1 if server is first else 2), server.url


def test_cpu_tensors_are_shared_by_name_with_processes_that_are_not_children():
    """A host copy reaches an SGLang server, a process this one did not start by
    multiprocessing: under torch's default file-descriptor strategy the descriptor travels
    through multiprocessing's resource sharer, which such a process cannot authenticate to
    ("digest sent was rejected"); serialised tensors are shared by file name instead."""
    from megatron_archer.rollout.weight_buckets import serialize_named_tensors

    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"
    tensor = torch.arange(6.0)
    serialized = serialize_named_tensors([("w", tensor)])
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor", "restored"
    code = ("import base64, sys, pickle, torch.multiprocessing.reductions as r; "
            "[(n, t)] = pickle.loads(base64.b64decode(sys.stdin.read())); print(n, t.tolist())")
    read = subprocess.run([sys.executable, "-c", code], input=serialized, text=True,
                          capture_output=True, timeout=120)
    assert read.returncode == 0, read.stderr[-2000:]
    assert read.stdout.split(maxsplit=1) == ["w", "[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]\n"]


def test_each_server_gets_its_own_serialisation_of_cpu_tensors():
    """torch's file-name sharing counts readers in the shared file: each serialisation adds one,
    each process that loads it takes one away. One serialisation read by two servers took one
    too many: after both had read and closed it the file was gone while this process still held
    the tensors, and the next update of the same tensors named a missing file (a real SGLang
    server died: "unable to open shared memory object"). Each server rank is sent its own."""
    code = ("import base64, gc, sys, pickle, torch.multiprocessing.reductions as r; "
            "[(n, t)] = pickle.loads(base64.b64decode(sys.stdin.read())); print(t.sum().item()); "
            "del t; gc.collect()")

    def load(serialized: str) -> str:  # a server: loads, then frees the tensor (as SGLang does)
        read = subprocess.run([sys.executable, "-c", code], input=serialized, text=True,
                              capture_output=True, timeout=120)
        assert read.returncode == 0, read.stderr[-2000:]
        return read.stdout.strip()

    tensor = torch.arange(6.0)
    with FakeServer(ok_script) as first, FakeServer(ok_script) as second:
        engine = SGLangEngine([first.url, second.url], policies=fast_policies())
        for version in (1, 2):  # the same tensors twice, as a trainer's weights between steps
            engine.update_weights([[("w", tensor)]], version=version)
            for server in (first, second):
                body = [b for p, b in server.requests if p == "/update_weights_from_tensor"][-1]
                assert [load(s) for s in body["serialized_named_tensors"]] == ["15.0"], version
