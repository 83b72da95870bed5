"""The SGLang rollout engine: generation through SGLang servers' HTTP API, and weight sync.

Servers are launched here (``SGLangEngine.launch``, each with a clean environment:
``child_environment``) or attached to by URL. With a router, the generate requests go to
``router_url`` and the control requests (weights, memory, cache) to every ``server_urls`` entry.

Generation fans out one ``/generate`` request per prompt (its ``n`` samples, each with its own
seed), at most ``max_inflight`` at a time, each to the server with the fewest requests in flight
(or the router). Each request has its own timeout; a request that gets no answer is closed
(SGLang aborts a request whose client disconnected), the server is health-checked, and only that
request is sent again, to another server where there is one. A server that fails its health check
is restarted when it was launched here (its process stopped, started again with the same
arguments, given the current weights, ``rollout/server_restarts`` counted), or ends the generation
with an error naming its URL when attached. Answers already received are kept; ``on_progress``
sees each completed prompt's responses.

Weight sync, ``weight_sync``:

- ``"tensor"`` (same host): each size-bounded bucket is serialised as CUDA IPC handles
  (``weight_buckets.serialize_named_tensors``) and posted to ``/update_weights_from_tensor``;
  each server's tensor-parallel rank gets the copy on its own GPU (server k uses GPUs
  ``base_gpu_id + k * tp_size`` onwards; GPUs compared by UUID): from a ``DeviceHandles`` bucket
  (colocated: every trainer rank serialised its own GPU's copy), or from a plain bucket (the
  non-colocated sync, a restarted server's ``weights_source``) the handles of its tensors for
  the rank on their GPU and a host copy through shared memory (made once per bucket) for every
  other rank, which never opens a CUDA context on a GPU it does not use.
- ``"distributed"`` (separate GPUs): after ``init_weight_update_group``, each bucket's metadata is
  posted to ``/update_weights_from_distributed`` while this process (rank 0) broadcasts its
  tensors over NCCL (gloo for CPU servers). Never retried: a repeated call would wait for a broadcast that never comes;
  the group has the update timeout, so a server that refused does not hang the broadcast forever.
- ``"disk"``: buckets are saved as a Hugging Face checkpoint (``models.hf_save``: safetensors
  shards of at most ``bucket_bytes``, an index when there are several, the base model's config and
  tokenizer files) in ``disk_dir/version-N``, and the servers reload it with
  ``/update_weights_from_disk`` (its own timeout: a 32B model is about 65 GB). Pruning rule: after
  a successful update every other ``version-*`` directory in ``disk_dir`` is deleted (all servers
  now read the new one); after a failed one nothing is deleted, since a server that loaded or
  rolled back from the new directory may still refer to it. ``disk_dir`` thus holds the current
  version plus any failed attempts since.

Every update is wrapped in ``/pause_generation`` (``pause_mode``: ``abort``, or ``retract``
for asynchronous training, where generation runs while the trainer updates: the running
requests go back to the queue and continue on the new weights, none lost, and each sample's
``weight_version`` is the one its request started with), then ``/flush_cache`` and
``/continue_generation``; every server is sent ``/continue_generation`` even when the update
fails. SGLang versions differ here, and the engine asks each server once
(``ServerProtocol``): later 0.5.x refuse tensor and distributed updates outside a
``/begin_weight_update`` ... ``/end_weight_update`` session, which the engine opens on the
servers that have it (and always closes); SGLang 0.5.5 has no retract (its pause aborts every
running request), so a request that comes back aborted from an update's pause is sent again
once the update is over, whole (its tokens came from the old weights), tagged with the new
version (``rollout/requests_resubmitted``). ``/flush_cache`` answers 200 only when SGLang flushed
(400: requests still running or waiting); while requests finish their abort it is asked again
for up to ``CallPolicies.flush_wait_s``, then the update fails: a KV cache of the old weights is
never served as the new version's. (A retract pause lets the flush through: the retracted
requests hold no KV and recompute theirs on the new weights.) Weight-update and memory calls are
not idempotent and are never repeated blindly (``http_client.RetryPolicy.idempotent``). A failed
update leaves ``weight_version`` unchanged and raises an error naming each server that failed;
servers that accepted part of it may hold new weights, so ``generate`` refuses until a later
update succeeds.

Routing (``routing``: the model's (num_layers, top_k), for ``actor.routing_replay: rollout``):
every request asks for ``return_routed_experts`` and every sample carries its tokens' experts
(``sglang_payloads.parse_routing``); servers must run with ``--enable-return-routed-experts``, and
SGLang 0.5.5, which has no such request field, is refused at the first request.

Memory (colocated): ``release_memory`` releases weights, KV cache and CUDA graphs; ``resume_memory``
takes back only what each server has released (SGLang raises on a resume of a region that is not
released), ``weights`` and ``cache`` (KV cache and CUDA graphs) separately.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from megatron_archer.buckets import bounded_buckets
from megatron_archer.config_fields import choice, integer
from megatron_archer.rollout import fp8_weights
from megatron_archer.rollout import sglang_payloads as payloads
from megatron_archer.rollout.engine import (
    MEMORY_PARTS,
    Bucket,
    MemoryPart,
    RolloutEngine,
    Sample,
    SamplingParams,
    check_prompts,
)
from megatron_archer.rollout.http_client import (
    RetryPolicy,
    ServerError,
    ServerUnreachable,
    has_route,
    request_json,
)
from megatron_archer.rollout.weight_buckets import (
    DeviceHandles,
    bucket_device_key,
    bucket_metadata,
    device_key,
    serialize_named_tensors,
    to_host,
    visible_device_keys,
)

logger = logging.getLogger(__name__)
WeightSync = Literal["tensor", "distributed", "disk"]
WEIGHT_SYNCS: tuple[WeightSync, ...] = ("tensor", "distributed", "disk")


def check_engine_settings(*, weight_sync, tp_size, bucket_bytes, max_inflight,
                          weight_dtype) -> None:
    """The engine settings' rules, in one place: ``SGLangEngine`` and the trainer's
    ``SGLangConfig`` both call this."""
    choice("weight_sync", weight_sync, WEIGHT_SYNCS)
    integer("tp_size", tp_size, low=1)
    integer("bucket_bytes", bucket_bytes, low=1)
    integer("max_inflight", max_inflight, low=1)
    choice("weight_dtype", weight_dtype, fp8_weights.WEIGHT_DTYPES)
GROUP_NAME = "megatron_archer_weights"
_VERSION_DIR = re.compile(r"version-\d+")
_CACHE_TAGS = (payloads.KV_CACHE, payloads.CUDA_GRAPH)
_PART_TAGS = {"weights": (payloads.WEIGHTS,), "cache": _CACHE_TAGS}

# set by torchrun / torchelastic for its workers; a child that inherits them joins (or waits for)
# the trainer's rendezvous instead of creating its own
TORCHRUN_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
    "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "OMP_NUM_THREADS",
)  # fmt: skip
TORCHRUN_PREFIXES = ("TORCHELASTIC_", "TORCH_ELASTIC_")


def is_torchrun_variable(name: str) -> bool:
    return name in TORCHRUN_VARIABLES or name.startswith(TORCHRUN_PREFIXES)


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) without torchrun's variables: an SGLang server started
    from a torchrun worker would otherwise run its own c10d rendezvous against the trainer's
    store (``TORCHELASTIC_USE_AGENT_STORE``, ``MASTER_ADDR``/``PORT``) and hang at start."""
    base = os.environ if base is None else base
    return {k: v for k, v in base.items() if not is_torchrun_variable(k)}


@contextmanager
def without_torchrun_environment():
    """``os.environ`` without torchrun's variables for the duration (this process's own
    rendezvous of SGLang's weight-update group), restored afterwards."""
    saved = {k: v for k, v in os.environ.items() if is_torchrun_variable(k)}
    for name in saved:
        del os.environ[name]
    try:
        yield
    finally:
        os.environ.update(saved)


@dataclass(frozen=True)
class CallPolicies:
    """Timeout and retries for each kind of call. ``generate``: per request (its ``attempts``
    count tries of one prompt's request, each possibly on another server); ``control``: pause,
    continue, cache flush; ``update``: tensor and distributed weight updates, the update group,
    memory release/resume (not idempotent); ``disk_update``: ``/update_weights_from_disk``;
    ``health``: one ``/health`` probe (and the one-time protocol probe). ``flush_wait_s``: how
    long a ``/flush_cache`` refused because requests still run (an abort's last steps) is asked
    again."""

    generate: RetryPolicy = RetryPolicy(timeout_s=3600.0, attempts=3)
    control: RetryPolicy = RetryPolicy(timeout_s=600.0, attempts=3)
    update: RetryPolicy = RetryPolicy(timeout_s=600.0, attempts=1, idempotent=False)
    disk_update: RetryPolicy = RetryPolicy(timeout_s=3600.0, attempts=1, idempotent=False)
    health: RetryPolicy = RetryPolicy(timeout_s=30.0, attempts=1)
    flush_wait_s: float = 60.0

    def __post_init__(self):
        for name in ("update", "disk_update"):
            if getattr(self, name).idempotent:
                raise ValueError(f"{name} calls are not idempotent: use idempotent=False")


@dataclass(frozen=True)
class ServerProtocol:
    """What one server's SGLang version asks of a weight update: its ``version``
    (``/get_server_info``; None when it names none), and ``update_session``: tensor and
    distributed updates only between ``/begin_weight_update`` and ``/end_weight_update`` (later
    0.5.x; detected by the route, which 0.5.5 lacks)."""

    version: str | None
    update_session: bool


@dataclass
class _Server:
    """One server: its URL, the process and command when launched here, its GPUs, the requests
    in flight, the memory regions it has released, a restart count (``epoch``), and its
    ``protocol`` (asked once)."""

    url: str
    gpu_ids: tuple[int, ...]
    process: subprocess.Popen | None = None
    command: list[str] | None = None
    inflight: int = 0
    released: set[str] = field(default_factory=set)
    epoch: int = 0
    protocol: ServerProtocol | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alive(self) -> bool:
        return self.process is None or self.process.poll() is None


def _start_process(command: Sequence[str]) -> subprocess.Popen:
    """``command`` with ``child_environment()``, in a session of its own: its process group
    (SGLang's scheduler and detokenizer processes included) is stopped as one."""
    process = subprocess.Popen(list(command), env=child_environment(), start_new_session=True)
    process.own_group = True
    return process


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    """``sig`` to the group ``process`` leads (``_start_process``; the group outlives a leader
    that exited first), or to the process alone."""
    if getattr(process, "own_group", False):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass  # every member has exited
    elif process.poll() is None:
        process.send_signal(sig)


def _stop_process(process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM to the process's group, then SIGKILL after ``timeout_s``."""
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _signal_group(process, signal.SIGKILL)
        process.wait()


class SGLangEngine(RolloutEngine):
    """SGLang servers behind one ``RolloutEngine``; see the module docstring.

    ``weights_source`` (optional) returns the current weights as buckets of full tensors on this
    process: a server restarted mid-rollout under ``weight_sync='tensor'`` gets them (disk sync
    reloads the current checkpoint directory; without either the restart is an error naming
    the server, since it would serve the launch weights). Server k uses the GPUs from
    ``base_gpu_id + k * tp_size`` in its environment's numbering (``launch`` sets both)."""

    def __init__(
        self,
        server_urls: Sequence[str],
        *,
        router_url: str | None = None,
        weight_sync: WeightSync = "tensor",
        tp_size: int = 1,
        bucket_bytes: int = 512 << 20,
        disk_dir: str | Path | None = None,
        base_model_path: str | Path | None = None,
        policies: CallPolicies = CallPolicies(),
        max_inflight: int = 256,
        max_restarts: int = 4,
        startup_timeout_s: float = 900.0,
        on_progress: Callable[[int, int], None] | None = None,
        weights_source: Callable[[], Iterable[Bucket]] | None = None,
        processes: Sequence[subprocess.Popen] = (),
        commands: Sequence[list[str]] = (),
        weight_dtype: str = "bf16",
        pause_mode: str = "abort",
        base_gpu_id: int = 0,
        routing: tuple[int, int] | None = None,
    ):
        if not server_urls:
            raise ValueError("server_urls is empty")
        check_engine_settings(weight_sync=weight_sync, tp_size=tp_size, bucket_bytes=bucket_bytes,
                              max_inflight=max_inflight, weight_dtype=weight_dtype)
        if weight_sync == "disk" and (disk_dir is None or base_model_path is None):
            raise ValueError("weight_sync='disk' needs disk_dir and base_model_path")
        if weight_dtype == "fp8" and base_model_path is not None:
            fp8_weights.require_fp8_checkpoint(base_model_path)
        self.weight_dtype = weight_dtype  # fp8: every sync sends fp8_weights.fp8_weight_buckets
        self.routing = routing  # (num_layers, top_k): samples carry their routing
        self.pause = payloads.pause_payload(pause_mode)  # checks the mode
        self.updates_during_generation = pause_mode == "retract"
        urls = [u.rstrip("/") for u in server_urls]
        self.servers = [
            _Server(url, tuple(range(base_gpu_id + k * tp_size, base_gpu_id + (k + 1) * tp_size)),
                    processes[k] if k < len(processes) else None,
                    list(commands[k]) if k < len(commands) else None)
            for k, url in enumerate(urls)
        ]  # fmt: skip
        self.server_urls = urls
        self.router = _Server(router_url.rstrip("/"), ()) if router_url else None
        self.weight_sync, self.tp_size, self.bucket_bytes = weight_sync, tp_size, bucket_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.base_model_path = Path(base_model_path) if base_model_path is not None else None
        self.policies, self.max_inflight = policies, max_inflight
        self.restarts_left, self.startup_timeout_s = max_restarts, startup_timeout_s
        self.on_progress, self.weights_source = on_progress, weights_source
        self._version: int | None = None
        self._failed_update: str | None = None
        self._group = None
        self._broadcast_device: str | None = None  # of the weight-update group's backend
        self._update_epoch = 0  # updates begun; a request aborted by one is sent again
        self._no_update = threading.Event()
        self._no_update.set()
        self._pick_lock = threading.Lock()
        self._rotation = 0
        self._closed = False
        self._metrics: Counter[str] = Counter()

    # -- servers -------------------------------------------------------------------------------
    @classmethod
    def launch(
        cls,
        model_path: str | Path,
        *,
        num_servers: int = 1,
        base_port: int = 30000,
        tp_size: int = 1,
        base_gpu_id: int = 0,
        mem_fraction_static: float | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 900.0,
        python: str | Path = sys.executable,
        memory_saver: bool = True,
        **engine_kwargs,
    ) -> SGLangEngine:
        """Start ``num_servers`` ``sglang.launch_server`` processes on 127.0.0.1 (server i on the
        GPUs from ``base_gpu_id + i * tp_size``; ``--mem-fraction-static`` when given: colocated
        servers must leave the trainer its memory), each with ``child_environment()``; wait for
        each to answer ``/health``. Servers already started are stopped when one fails to come
        up. ``python``: the interpreter whose SGLang serves (SGLang in an environment of its
        own); ``memory_saver``: ``--enable-memory-saver`` (GPU servers: the colocated release of
        weights and KV cache needs it; CPU servers cannot start with it)."""
        commands = [
            launch_command(model_path, base_port + i, tp_size, base_gpu_id + i * tp_size,
                           mem_fraction_static, extra_args, python, memory_saver)
            for i in range(num_servers)
        ]  # fmt: skip
        processes = []
        try:
            for command in commands:
                processes.append(_start_process(command))
            engine = cls([f"http://127.0.0.1:{base_port + i}" for i in range(num_servers)],
                         tp_size=tp_size, base_gpu_id=base_gpu_id, processes=processes,
                         commands=commands,
                         startup_timeout_s=startup_timeout_s, **engine_kwargs)  # fmt: skip
            for server in engine.servers:
                engine._wait_healthy(server, startup_timeout_s)
        except BaseException:
            for process in processes:
                _stop_process(process)
            raise
        return engine

    def _wait_healthy(self, server: _Server, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._healthy(server):
            if self._closed:
                raise ServerError(f"{server.url}: the engine was shut down while it started")
            if not server.alive():
                raise ServerError(f"{server.url}: the server process exited with code "
                                  f"{server.process.returncode} while starting")
            if time.monotonic() > deadline:
                raise ServerError(f"{server.url}: no healthy answer within {timeout_s} s of start")
            time.sleep(min(2.0, timeout_s / 10))

    def _healthy(self, server: _Server) -> bool:
        try:
            request_json(server.url, "/health", None, self.policies.health, method="GET",
                         is_alive=server.alive)  # fmt: skip
        except ServerError:
            return False
        return True

    def health(self) -> bool:
        return all(self._healthy(s) for s in [*self.servers, *filter(None, [self.router])])

    def shutdown(self) -> None:
        """Stop the servers this engine launched (SIGTERM, SIGKILL after 60 s); attached servers
        are left running. A restart still under way in a generation thread stops its new
        process itself."""
        self._closed = True
        if self._group is not None:
            torch.distributed.destroy_process_group(self._group)
            self._group = None
        for server in self.servers:
            if server.process is not None:
                _stop_process(server.process)

    def _count(self, name: str) -> None:
        with self._pick_lock:
            self._metrics[name] += 1

    def take_metrics(self) -> dict[str, float]:
        with self._pick_lock:
            metrics = {f"rollout/{k}": float(v) for k, v in self._metrics.items()}
            self._metrics.clear()
        return metrics

    def _post(self, server: _Server, path: str, payload: dict | None, policy: RetryPolicy):
        return request_json(server.url, path, payload, policy, is_alive=server.alive)

    def _post_each(self, path: str, body: Callable[[_Server], dict | None], policy: RetryPolicy,
                   servers: Sequence[_Server] | None = None) -> list:
        """``path`` to every server (or ``servers``) in parallel, each with ``body(server)``, all
        of them even when some fail; the answers, or an error naming every server that failed."""
        return self._each(lambda s: self._post(s, path, body(s), policy), servers)

    def _each(self, call: Callable[[_Server], object],
              servers: Sequence[_Server] | None = None) -> list:
        """``call(server)`` for every server (or ``servers``) in parallel, all of them even when
        some fail; the results, or an error naming every server that failed."""
        servers = self.servers if servers is None else servers
        with ThreadPoolExecutor(len(servers)) as pool:
            futures = [pool.submit(call, s) for s in servers]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ServerError("; ".join(map(str, errors))) from errors[0]
        return [f.result() for f in futures]

    def _post_all(self, path: str, payload: dict | None, policy: RetryPolicy,
                  servers: Sequence[_Server] | None = None) -> list:
        return self._post_each(path, lambda _: payload, policy, servers)

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        if self._failed_update is not None:
            raise RuntimeError(self._failed_update)
        check_prompts(prompts)
        n, total = params.n, len(prompts) * params.n
        seeds = [None if params.seed is None else params.seed + i for i in range(total)]
        results: list[list[Sample] | None] = [None] * len(prompts)
        pool = ThreadPoolExecutor(min(self.max_inflight, len(prompts)))
        try:
            pending = {pool.submit(self._generate_one, [list(p)] * n, seeds[i * n:(i + 1) * n],
                                   params): i for i, p in enumerate(prompts)}  # fmt: skip
            done_responses = 0
            while pending:
                finished, _ = wait(pending, return_when=FIRST_EXCEPTION)
                for future in finished:
                    results[pending.pop(future)] = future.result()  # raises a fatal error
                    done_responses += n
                    if self.on_progress is not None:
                        self.on_progress(done_responses, total)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return results

    def _generate_one(self, rows: list[list[int]], seeds: list[int | None],
                      params: SamplingParams) -> list[Sample]:
        """One prompt's request: tried up to ``policies.generate.attempts`` times, each failure
        followed by a health check (and a restart of a dead launched server)."""
        body = payloads.generate_payload(rows, params, seeds, routing=self.routing is not None)
        shape = None if self.routing is None else (len(rows[0]), *self.routing)
        policy = replace(self.policies.generate, attempts=1)
        avoid, last, attempt, resent_at = None, None, 0, None
        while attempt < self.policies.generate.attempts:
            server = self._acquire(avoid)
            epoch, update_epoch = server.epoch, self._update_epoch
            try:
                self._check_routing(server)
                results = self._post(server, "/generate", body, policy)
            except ServerUnreachable as error:
                last, avoid = error, server
                self._recover(server, epoch, error)
                attempt += 1
                if attempt < self.policies.generate.attempts:
                    self._count("requests_retried")
                    time.sleep(self.policies.generate.backoff_s * 2 ** (attempt - 1))
                continue
            finally:
                with self._pick_lock:
                    server.inflight -= 1
            if not isinstance(results, list) or len(results) != len(rows):
                raise ServerError(f"{server.url}/generate: expected {len(rows)} results, got "
                                  f"{results!r:.200}")
            if self._aborted_by_update(results, update_epoch):
                resent_at = self._after_update()
                continue
            samples = [payloads.parse_generate_result(r, params, server.url, shape)
                       for r in results]
            if resent_at is not None:  # it ran on the version loaded before it was sent again
                samples = [s if s.weight_version is not None else replace(s, weight_version=resent_at)
                           for s in samples]  # fmt: skip
            return samples
        raise ServerError(f"/generate of one prompt failed {self.policies.generate.attempts} "
                          f"times, last: {last}")

    def _check_routing(self, server: _Server) -> None:
        """A server asked for routing must have it (``payloads.has_routed_experts``)."""
        if self.routing is None:
            return
        version = self._protocol(server).version
        if not payloads.has_routed_experts(version):
            raise ValueError(f"actor.routing_replay='rollout' needs /generate's "
                             f"return_routed_experts, which SGLang {version} ({server.url}) "
                             f"lacks: use a later SGLang 0.5.x or rollout.engine='local'")

    def _acquire(self, avoid: _Server | None) -> _Server:
        """The router, or the server with the fewest requests in flight (not ``avoid`` when
        another exists; among equals, each in turn: requests that finish before the next is sent
        would otherwise all go to the first server); its in-flight count is taken."""
        with self._pick_lock:
            if self.router is not None:
                server = self.router
            else:
                choices = [s for s in self.servers if s is not avoid] or self.servers
                start = self._rotation % len(choices)  # ties: round robin, not always the first
                self._rotation += 1
                server = min(choices[start:] + choices[:start], key=lambda s: s.inflight)
            server.inflight += 1
            return server

    def _aborted_by_update(self, results: list, update_epoch: int) -> bool:
        """Whether an update's pause aborted this answer (SGLang without retract, 0.5.5): one of
        its samples ended "abort" while an update ran or after one began since it was sent."""
        if not any(payloads.finish_kind(r) == "abort" for r in results):
            return False
        return not self._no_update.is_set() or self._update_epoch != update_epoch

    def _after_update(self) -> int | None:
        """Wait for the update under way to end; the version then served (the one a request sent
        again runs on), or an error when the update failed."""
        self._no_update.wait()
        if self._failed_update is not None:
            raise RuntimeError(self._failed_update)
        self._count("requests_resubmitted")
        return self._version

    def _recover(self, server: _Server, epoch: int, error: ServerError) -> None:
        """After ``error`` from ``server``: nothing if it answers ``/health`` (slow, not dead) or
        was restarted since; a restart when launched here; otherwise an error naming it."""
        with server.lock:
            if server.epoch != epoch or self._healthy(server):
                return
            if server.command is None:
                raise ServerError(
                    f"{server.url} stopped answering mid-rollout and fails its health check "
                    f"(after: {error}); attached servers are not restarted: restart it, or use "
                    f"rollout.sglang.launch: true") from error  # fmt: skip
            self._restart(server, error)

    def _restart(self, server: _Server, error: ServerError) -> None:
        """Stop ``server``'s process, start it again, give it the current weights."""
        with self._pick_lock:
            if self.restarts_left < 1:
                raise ServerError(f"{server.url} failed again and no restarts are left "
                                  f"(rollout.sglang.max_restarts); last error: {error}") from error
            self.restarts_left -= 1
        logger.warning("SGLang server %s is not healthy (%s): restarting it", server.url, error)
        _stop_process(server.process, timeout_s=30.0)
        if self._closed:
            raise ServerError(f"{server.url}: not restarted, the engine was shut down") from error
        server.process = _start_process(server.command)
        if self._closed:  # shutdown() ran between the check and the start
            _stop_process(server.process)
        server.released.clear()
        self._wait_healthy(server, self.startup_timeout_s)
        self._restore_weights(server)
        server.epoch += 1
        self._count("server_restarts")

    def _restore_weights(self, server: _Server) -> None:
        """A restarted server gets weight version ``weight_version`` (it starts with the launch
        checkpoint, which is version None)."""
        if self._version is None:
            return
        if self.weight_sync == "disk":
            body = payloads.update_from_disk_payload(str(self._checkpoint_dir(self._version)),
                                                     self._version)
            self._post(server, "/update_weights_from_disk", body, self.policies.disk_update)
        elif self.weight_sync == "tensor" and self.weights_source is not None:
            self._load_tensor(self._as_sent(self.weights_source()), self._version, [server])
        else:
            raise ServerError(
                f"{server.url} was restarted but cannot be given weight version {self._version} "
                f"mid-rollout with weight_sync {self.weight_sync!r} (no weights source); it would "
                f"serve the launch weights")  # fmt: skip
        self._flush([server])

    # -- weights -------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int | None:
        return self._version

    def update_weights(self, buckets: Iterable[Bucket | DeviceHandles], version: int) -> None:
        """Pause, load (``weight_sync``), flush, continue: see the module docstring."""
        error = None
        with self._pick_lock:
            self._update_epoch += 1
            self._no_update.clear()
        try:
            self._post_all("/pause_generation", self.pause, self.policies.control)
            self._load(buckets, version)
            self._flush()
        except BaseException as caught:
            error = caught
        try:
            self._post_all("/continue_generation", payloads.continue_payload(),
                           self.policies.control)
        except BaseException as caught:
            if error is None:
                error = caught
            else:
                error.add_note(f"/continue_generation failed too: {caught}")
        if error is not None:
            self._failed_update = (
                f"the weight update to version {version} failed ({error}); the servers may hold "
                f"a mix of versions: generate() refuses until an update succeeds"
            )
            self._no_update.set()
            raise error
        self._version, self._failed_update = version, None
        self._no_update.set()
        if self.weight_sync == "disk":
            self._prune_checkpoints(keep=self._checkpoint_dir(version))

    def _flush(self, servers: Sequence[_Server] | None = None) -> None:
        """``/flush_cache`` on every server (or ``servers``). SGLang answers 200 only when it
        flushed, 400 when requests still run or wait; refusals are asked again for up to
        ``policies.flush_wait_s`` (aborted requests take a step to leave), then raise."""
        def flush(server):
            deadline, delay = time.monotonic() + self.policies.flush_wait_s, 0.05
            while True:
                try:
                    return self._post(server, "/flush_cache", None, self.policies.control)
                except ServerError as error:
                    if error.status != 400 or time.monotonic() + delay > deadline:
                        raise ServerError(f"{server.url}: the KV cache was not flushed after the "
                                          f"weight update ({error})", error.status) from error
                time.sleep(delay)
                delay = min(2 * delay, 1.0)

        self._each(flush, servers)

    def _protocol(self, server: _Server) -> ServerProtocol:
        """``server``'s ``ServerProtocol``, asked once (a restart keeps its command, so its
        version)."""
        if server.protocol is None:
            policy = self.policies.health
            info = request_json(server.url, "/get_server_info", None, policy, method="GET",
                                is_alive=server.alive)  # fmt: skip
            server.protocol = ServerProtocol(
                version=payloads.server_version(info),
                update_session=has_route(server.url, "/begin_weight_update", policy))  # fmt: skip
            logger.info("%s: SGLang %s%s", server.url, server.protocol.version,
                        ", weight-update sessions" if server.protocol.update_session else "")
        return server.protocol

    @contextmanager
    def _update_session(self, servers: Sequence[_Server]):
        """``/begin_weight_update`` on the ``servers`` whose SGLang needs it; after the body,
        ``/end_weight_update`` on each that began, even when the body or another begin failed
        (a session left open refuses the next begin)."""
        body = payloads.weight_update_session_payload()
        began, error = [], None
        try:
            for server in servers:
                if self._protocol(server).update_session:
                    self._post(server, "/begin_weight_update", body, self.policies.update)
                    began.append(server)
            yield
        except BaseException as caught:
            error = caught
        if began:
            try:
                self._post_all("/end_weight_update", body, self.policies.update, began)
            except BaseException as caught:
                if error is None:
                    raise
                error.add_note(f"/end_weight_update failed too: {caught}")
        if error is not None:
            raise error

    def _load(self, buckets: Iterable[Bucket | DeviceHandles], version: int) -> None:
        buckets = self._as_sent(buckets)
        if self.weight_sync == "tensor":
            self._load_tensor(buckets, version, self.servers)
        elif self.weight_sync == "distributed":
            self._update_distributed(buckets, version)
        else:
            path = self._save_checkpoint(buckets, version)
            body = payloads.update_from_disk_payload(str(path), version)
            self._post_all("/update_weights_from_disk", body, self.policies.disk_update)

    def _as_sent(self, buckets: Iterable[Bucket | DeviceHandles]) -> Iterable[Bucket | DeviceHandles]:
        """The buckets in ``weight_dtype``: fp8 quantises plain buckets and adds each
        ``weight_scale_inv``; ``DeviceHandles`` were quantised by their senders before
        serialising (``trainer.loop``) and pass as they are."""
        if self.weight_dtype != "fp8":
            return buckets
        first, buckets = _peek(buckets)
        return buckets if isinstance(first, DeviceHandles) else fp8_weights.fp8_weight_buckets(buckets)

    def _load_tensor(self, buckets: Iterable[Bucket | DeviceHandles], version: int,
                     servers: Sequence[_Server]) -> None:
        """Each bucket to each server: from ``DeviceHandles``, each tensor-parallel rank its own
        GPU's handles; plain buckets are re-bucketed to ``bucket_bytes`` and serialised here
        (``_plain_handles``)."""
        with self._update_session(servers):
            for bucket in self._tensor_buckets(buckets):
                # a plain bucket's tensors and host copy stay referenced until every server
                # has loaded them (``bucket``, ``host``)
                handles, host = (bucket, None) if isinstance(bucket, DeviceHandles) else \
                    self._plain_handles(bucket, servers)

                def body(server, handles=handles):
                    return payloads.update_from_tensor_payload(
                        self._handles_for(server, handles), version)

                self._post_each("/update_weights_from_tensor", body, self.policies.update, servers)

    def _tensor_buckets(self, buckets: Iterable[Bucket | DeviceHandles]):
        """``DeviceHandles`` as they come (bucketed by their senders); plain buckets re-bucketed."""
        first, buckets = _peek(buckets)
        if isinstance(first, DeviceHandles):
            yield from buckets
        else:
            yield from bounded_buckets(itertools.chain.from_iterable(buckets), self.bucket_bytes)

    def _plain_handles(self, bucket: Bucket, servers: Sequence[_Server]
                       ) -> tuple[DeviceHandles, Bucket | None]:
        """A plain bucket serialised for each GPU of ``servers`` (one server rank each): its CUDA
        tensors' IPC handles for the GPU that holds them, one host copy (returned too: it must
        outlive the posts) for every other GPU; CPU tensors as they are. Every rank gets a
        serialisation of its own: torch counts a shared tensor's readers per serialisation (each
        adds one, each rank that loads it takes one away), so one serialisation read by two
        ranks would free the shared memory while this process still holds the tensors."""
        keys = {key for server in servers for key in self._device_keys(server)}
        gpu = bucket_device_key(bucket)
        host = None if gpu is None or not keys - {gpu} else to_host(bucket)
        by_device = {key: serialize_named_tensors(bucket if key == gpu or gpu is None else host)
                     for key in keys}
        return DeviceHandles(by_device), host

    def _handles_for(self, server: _Server, bucket: DeviceHandles) -> list[str]:
        keys = self._device_keys(server)
        missing = [k for k in keys if k not in bucket.by_device]
        if missing:
            raise ServerError(f"{server.url}: no weights were serialised on its GPU(s) {missing} "
                              f"(got GPUs {sorted(bucket.by_device)})")
        return [bucket.by_device[k] for k in keys]

    @functools.cached_property
    def _visible_keys(self) -> list[str] | None:
        """The servers' GPU numbering, by UUID (None: no CUDA here), listed at the first use."""
        return visible_device_keys(child_environment())

    def _device_keys(self, server: _Server) -> list[str]:
        """The UUIDs of ``server``'s GPUs: its ``gpu_ids`` count in the numbering of the servers'
        environment (``child_environment()``), which may differ from any trainer rank's (per-task
        GPU binding gives every rank device 0)."""
        if self._visible_keys is None:  # no CUDA here: the stand-in keys name the indices
            return [device_key(g) for g in server.gpu_ids]
        outside = [g for g in server.gpu_ids if g >= len(self._visible_keys)]
        if outside:
            raise ServerError(f"{server.url}: its GPU(s) {outside} are not among the "
                              f"{len(self._visible_keys)} GPUs its environment makes visible")
        return [self._visible_keys[g] for g in server.gpu_ids]

    def init_weight_update_group(self, master_address: str, master_port: int,
                                 backend: str = "nccl") -> None:
        """Create the group {this process (rank 0), every server rank} for
        ``weight_sync='distributed'``: ``backend`` nccl (GPU servers; needs CUDA here) or gloo
        (CPU servers). This process's side of the rendezvous runs without torchrun's variables,
        which would make it wait for a store that nobody hosts; the group's timeout is the update
        timeout."""
        from datetime import timedelta

        world_size = 1 + self.tp_size * len(self.servers)
        with ThreadPoolExecutor(len(self.servers)) as pool:
            pending = [
                pool.submit(self._post, s, "/init_weights_update_group", payloads.init_group_payload(
                    master_address, master_port, 1 + k * self.tp_size, world_size, GROUP_NAME,
                    backend), self.policies.update)
                for k, s in enumerate(self.servers)
            ]  # fmt: skip
            with without_torchrun_environment():
                self._group = weight_update_group(
                    backend, f"tcp://{master_address}:{master_port}", world_size, GROUP_NAME,
                    timedelta(seconds=self.policies.update.timeout_s))  # fmt: skip
            for future in pending:
                future.result()
        self._broadcast_device = "cpu" if backend == "gloo" else "cuda"

    def _update_distributed(self, buckets: Iterable[Bucket], version: int) -> None:
        """Per bucket: the metadata to every server (once: never retried), this process's
        broadcast, then every answer; the first failure ends the update, naming the servers. Once
        a server has refused, no further tensor is broadcast: a broadcast it never joins would
        wait for the group's timeout and end in NCCL's watchdog abort, not in this error."""
        if self._group is None:
            raise RuntimeError("weight_sync='distributed': call init_weight_update_group() first")
        device = self._broadcast_device or ("cuda" if torch.cuda.is_available() else "cpu")
        with self._update_session(self.servers):
            self._broadcast_buckets(buckets, version, device)

    def _broadcast_buckets(self, buckets: Iterable[Bucket], version: int, device: str) -> None:
        for bucket in bounded_buckets(itertools.chain.from_iterable(buckets), self.bucket_bytes):
            body = payloads.update_from_distributed_payload(*bucket_metadata(bucket), GROUP_NAME,
                                                            version)
            with ThreadPoolExecutor(len(self.servers)) as pool:
                pending = [pool.submit(self._post, s, "/update_weights_from_distributed", body,
                                       self.policies.update) for s in self.servers]  # fmt: skip
                failures = []
                try:
                    for _, tensor in bucket:
                        if any(f.done() and f.exception() is not None for f in pending):
                            break  # a server refused: it joins no broadcast, which would hang
                        torch.distributed.broadcast(tensor.to(device).contiguous(), src=0,
                                                    group=self._group)
                except Exception as error:  # noqa: BLE001 - named with the servers' errors
                    failures.append(f"the broadcast failed: {type(error).__name__}: {error}")
                failures[:0] = [str(e) for e in (f.exception() for f in pending) if e is not None]
            if failures:
                raise ServerError("; ".join(failures))

    def _checkpoint_dir(self, version: int) -> Path:
        return (self.disk_dir / f"version-{version}").resolve()

    def _save_checkpoint(self, buckets: Iterable[Bucket], version: int) -> Path:
        """The buckets as an HF checkpoint in ``disk_dir/version-N`` (replaced if present),
        written atomically; its absolute path."""
        from megatron_archer.models.hf_save import write_hf_checkpoint

        path = self._checkpoint_dir(version)
        write_hf_checkpoint(
            buckets, path, metadata_dir=self.base_model_path, max_shard_bytes=self.bucket_bytes,
            force=True,
        )  # fmt: skip
        return path

    def _prune_checkpoints(self, keep: Path) -> None:
        """Delete the ``version-N`` directories of ``disk_dir`` other than ``keep``."""
        for item in self.disk_dir.iterdir():
            if item.is_dir() and _VERSION_DIR.fullmatch(item.name) and item.resolve() != keep:
                shutil.rmtree(item)

    # -- memory --------------------------------------------------------------------------------
    def release_memory(self) -> None:
        """Weights, KV cache and CUDA graphs of every server (what each still holds)."""
        self._change_memory("/release_memory_occupation", payloads.MEMORY_TAGS, release=True)

    def resume_memory(self, parts: Sequence[MemoryPart] = MEMORY_PARTS) -> None:
        tags = tuple(t for part in parts for t in _PART_TAGS[part])
        self._change_memory("/resume_memory_occupation", tags, release=False)

    def _change_memory(self, path: str, tags: Sequence[str], release: bool) -> None:
        """``path`` to each server for the ``tags`` it has (release) or has not (resume) yet
        released; the record is updated per server that answered."""
        def todo(server):
            return [t for t in tags if (t in server.released) != release]

        servers = [s for s in self.servers if todo(s)]
        if not servers:
            return
        plans = {s.url: todo(s) for s in servers}
        with ThreadPoolExecutor(len(servers)) as pool:
            futures = {s.url: pool.submit(self._post, s, path, payloads.memory_payload(plans[s.url]),
                                          self.policies.update) for s in servers}  # fmt: skip
        errors = []
        for server in servers:
            error = futures[server.url].exception()
            if error is not None:
                errors.append(error)
            elif release:
                server.released.update(plans[server.url])
            else:
                server.released.difference_update(plans[server.url])
        if errors:
            raise ServerError("; ".join(map(str, errors))) from errors[0]


def _peek(items: Iterable) -> tuple[object, Iterable]:
    """The first item (None when empty) and an iterable of all of them, that first included."""
    items = iter(items)
    first = next(items, None)
    return first, (itertools.chain([first], items) if first is not None else ())


def weight_update_group(backend: str, init_method: str, world_size: int, group_name: str,
                        timeout) -> torch.distributed.ProcessGroup:
    """Rank 0 (this process, which hosts the TCP store) of the process group that SGLang's
    ``/init_weights_update_group`` joins: the same rendezvous (``init_method``, keys under
    ``group_name``), a group of its own beside any default group. torch names the options
    argument of its group helper ``pg_options`` before 2.6, ``backend_options`` since."""
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(c10d.rendezvous(init_method, 0, world_size, timeout=timeout))
    store.set_timeout(timeout)
    options = ("backend_options" if "backend_options" in
               inspect.signature(c10d._new_process_group_helper).parameters else "pg_options")
    group, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout, **{options: None})  # fmt: skip
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def launch_command(model_path: str | Path, port: int, tp_size: int, base_gpu_id: int,
                   mem_fraction_static: float | None, extra_args: Sequence[str],
                   python: str | Path = sys.executable, memory_saver: bool = True) -> list[str]:
    """The ``sglang.launch_server`` command line of one server."""
    command = [
        str(python), "-m", "sglang.launch_server", "--model-path", str(model_path),
        "--host", "127.0.0.1", "--port", str(port), "--tp-size", str(tp_size),
        "--base-gpu-id", str(base_gpu_id), *(["--enable-memory-saver"] if memory_saver else []),
    ]  # fmt: skip
    if mem_fraction_static is not None:
        command += ["--mem-fraction-static", str(mem_fraction_static)]
    return command + list(extra_args)
