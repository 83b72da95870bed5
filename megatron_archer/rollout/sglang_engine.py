"""The SGLang rollout engine: generation through SGLang servers' HTTP API, and weight sync.

Servers are launched here (``SGLangEngine.launch``) or attached to by URL. With a router, the
generate requests go to ``router_url`` and the control requests (weights, memory, cache) to every
``server_urls`` entry. Weight sync, ``weight_sync``:

- ``"tensor"`` (colocated, same host): each size-bounded bucket is serialised as CUDA IPC handles
  (``weight_buckets.serialize_named_tensors``) and posted to ``/update_weights_from_tensor``.
- ``"distributed"`` (separate GPUs): after ``init_weight_update_group``, each bucket's metadata is
  posted to ``/update_weights_from_distributed`` while this process (rank 0) broadcasts its
  tensors over NCCL.
- ``"disk"``: buckets are saved as a Hugging Face checkpoint (``models.hf_save``: safetensors
  shards of at most ``bucket_bytes``, an index when there are several, the base model's config and
  tokenizer files) in ``disk_dir/version-N``, and the servers reload it with
  ``/update_weights_from_disk``. Pruning rule: after a successful update every other
  ``version-*`` directory in ``disk_dir`` is deleted (all servers now read the new one); after a
  failed one nothing is deleted, since a server that loaded or rolled back from the new directory
  may still refer to it. ``disk_dir`` thus holds the current version plus any failed attempts
  since.

Every update is wrapped in ``/pause_generation``, then ``/flush_cache`` and
``/continue_generation``; every server is sent ``/continue_generation`` even when the update
fails. A failed update leaves ``weight_version`` unchanged and raises an error naming each server
that failed; servers that accepted part of it may hold new weights, so ``generate`` refuses until
a later update succeeds.
"""

from __future__ import annotations

import itertools
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import torch

from megatron_archer.rollout import sglang_payloads as payloads
from megatron_archer.rollout.engine import (
    Bucket,
    RolloutEngine,
    Sample,
    SamplingParams,
    check_prompts,
)
from megatron_archer.rollout.http_client import RetryPolicy, ServerError, request_json
from megatron_archer.buckets import bounded_buckets
from megatron_archer.rollout.weight_buckets import bucket_metadata, serialize_named_tensors

WeightSync = Literal["tensor", "distributed", "disk"]
GROUP_NAME = "megatron_archer_weights"
_VERSION_DIR = re.compile(r"version-\d+")


class SGLangEngine(RolloutEngine):
    """SGLang servers behind one ``RolloutEngine``; see the module docstring."""

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
        policy: RetryPolicy = RetryPolicy(),
        processes: Sequence[subprocess.Popen] = (),
    ):
        if not server_urls:
            raise ValueError("server_urls is empty")
        if weight_sync not in ("tensor", "distributed", "disk"):
            raise ValueError(f"weight_sync={weight_sync!r} must be tensor, distributed or disk")
        if weight_sync == "disk" and (disk_dir is None or base_model_path is None):
            raise ValueError("weight_sync='disk' needs disk_dir and base_model_path")
        if tp_size < 1 or bucket_bytes <= 0:
            raise ValueError(f"tp_size={tp_size} and bucket_bytes={bucket_bytes} must be positive")
        self.server_urls = [u.rstrip("/") for u in server_urls]
        self.router_url = router_url
        self.weight_sync, self.tp_size, self.bucket_bytes = weight_sync, tp_size, bucket_bytes
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.base_model_path = Path(base_model_path) if base_model_path is not None else None
        self.policy = policy
        self.processes = dict(zip(self.server_urls, processes))
        self._version: int | None = None
        self._failed_update: str | None = None
        self._group = None

    # -- servers -------------------------------------------------------------------------------
    @classmethod
    def launch(
        cls,
        model_path: str | Path,
        *,
        num_servers: int = 1,
        base_port: int = 30000,
        tp_size: int = 1,
        extra_args: Sequence[str] = (),
        startup_timeout_s: float = 900.0,
        **engine_kwargs,
    ) -> SGLangEngine:
        """Start ``num_servers`` ``sglang.launch_server`` processes on 127.0.0.1 (GPU ids
        ``i * tp_size`` on), wait for each to answer ``/health``."""
        processes, urls = [], []
        for i in range(num_servers):
            port = base_port + i
            command = [
                sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
                "--host", "127.0.0.1", "--port", str(port), "--tp-size", str(tp_size),
                "--base-gpu-id", str(i * tp_size), "--enable-memory-saver", *extra_args,
            ]  # fmt: skip
            processes.append(subprocess.Popen(command))
            urls.append(f"http://127.0.0.1:{port}")
        engine = cls(urls, tp_size=tp_size, processes=processes, **engine_kwargs)
        try:
            for url in urls:
                engine._wait_healthy(url, startup_timeout_s)
        except BaseException:
            engine.shutdown()
            raise
        return engine

    def _wait_healthy(self, url: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        probe = RetryPolicy(timeout_s=10.0, attempts=1)
        while True:
            try:
                request_json(url, "/health", None, probe, method="GET", is_alive=self._alive(url))
                return
            except ServerError:
                if not self._alive(url)() or time.monotonic() > deadline:
                    raise
            time.sleep(2.0)

    def _alive(self, url: str) -> Callable[[], bool]:
        process = self.processes.get(url)
        return (lambda: True) if process is None else (lambda: process.poll() is None)

    def shutdown(self) -> None:
        """Stop the servers this engine launched."""
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            process.wait(timeout=60)

    def _post(self, url: str, path: str, payload: dict | None = None):
        return request_json(url, path, payload, self.policy, is_alive=self._alive(url))

    def _post_all(self, path: str, payload: dict | None = None) -> list:
        """``path`` to every server in parallel, all of them even when some fail; the answers, or
        an error naming every server that failed."""
        with ThreadPoolExecutor(len(self.server_urls)) as pool:
            futures = [pool.submit(self._post, url, path, payload) for url in self.server_urls]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise ServerError("; ".join(map(str, errors))) from errors[0]
        return [f.result() for f in futures]

    def health(self) -> bool:
        probe = RetryPolicy(timeout_s=10.0, attempts=1)
        try:
            for url in self.server_urls:
                request_json(url, "/health", None, probe, method="GET", is_alive=self._alive(url))
        except ServerError:
            return False
        return True

    # -- generation ----------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams
    ) -> list[list[Sample]]:
        if self._failed_update is not None:
            raise RuntimeError(self._failed_update)
        check_prompts(prompts)
        rows = [list(p) for p in prompts for _ in range(params.n)]
        seeds = [None if params.seed is None else params.seed + i for i in range(len(rows))]
        targets = [self.router_url] if self.router_url else self.server_urls
        chunks = [(targets[k], range(k, len(rows), len(targets))) for k in range(len(targets))]
        chunks = [(url, idx) for url, idx in chunks if len(idx)]

        def run(chunk):
            url, idx = chunk
            body = payloads.generate_payload([rows[i] for i in idx], params, [seeds[i] for i in idx])
            results = self._post(url, "/generate", body)
            if not isinstance(results, list) or len(results) != len(idx):
                raise ServerError(f"{url}/generate: expected {len(idx)} results, got {results!r:.200}")
            return [payloads.parse_generate_result(r, params, url) for r in results]

        samples: list[Sample | None] = [None] * len(rows)
        with ThreadPoolExecutor(len(chunks)) as pool:
            for (_, idx), results in zip(chunks, pool.map(run, chunks)):
                for i, sample in zip(idx, results):
                    samples[i] = sample
        return [samples[i : i + params.n] for i in range(0, len(rows), params.n)]

    # -- weights -------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int | None:
        return self._version

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        """Pause, load (``weight_sync``), flush, continue: see the module docstring."""
        error = None
        try:
            self._post_all("/pause_generation")
            self._load(buckets, version)
            self._post_all("/flush_cache")
        except BaseException as caught:
            error = caught
        try:
            self._post_all("/continue_generation")
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
            raise error
        self._version, self._failed_update = version, None
        if self.weight_sync == "disk":
            self._prune_checkpoints(keep=self._checkpoint_dir(version))

    def _load(self, buckets: Iterable[Bucket], version: int) -> None:
        if self.weight_sync == "tensor":
            for bucket in bounded_buckets(itertools.chain.from_iterable(buckets), self.bucket_bytes):
                body = payloads.update_from_tensor_payload(
                    serialize_named_tensors(bucket), self.tp_size, version
                )
                self._post_all("/update_weights_from_tensor", body)
        elif self.weight_sync == "distributed":
            self._update_distributed(buckets, version)
        else:
            path = self._save_checkpoint(buckets, version)
            body = payloads.update_from_disk_payload(str(path), version)
            self._post_all("/update_weights_from_disk", body)

    def init_weight_update_group(self, master_address: str, master_port: int) -> None:
        """Create the NCCL group {this process (rank 0), every server rank} for
        ``weight_sync='distributed'`` (needs CUDA and SGLang's process-group helper here)."""
        from sglang.srt.utils import init_custom_process_group

        world_size = 1 + self.tp_size * len(self.server_urls)
        with ThreadPoolExecutor(len(self.server_urls)) as pool:
            pending = [
                pool.submit(self._post, url, "/init_weights_update_group", payloads.init_group_payload(
                    master_address, master_port, 1 + k * self.tp_size, world_size, GROUP_NAME))
                for k, url in enumerate(self.server_urls)
            ]  # fmt: skip
            self._group = init_custom_process_group(
                backend="nccl", init_method=f"tcp://{master_address}:{master_port}",
                world_size=world_size, rank=0, group_name=GROUP_NAME,
            )  # fmt: skip
            for future in pending:
                future.result()

    def _update_distributed(self, buckets: Iterable[Bucket], version: int) -> None:
        if self._group is None:
            raise RuntimeError("weight_sync='distributed': call init_weight_update_group() first")
        for bucket in bounded_buckets(itertools.chain.from_iterable(buckets), self.bucket_bytes):
            body = payloads.update_from_distributed_payload(*bucket_metadata(bucket), GROUP_NAME, version)
            with ThreadPoolExecutor(len(self.server_urls)) as pool:
                pending = [pool.submit(self._post, u, "/update_weights_from_distributed", body)
                           for u in self.server_urls]  # fmt: skip
                for _, tensor in bucket:
                    torch.distributed.broadcast(tensor.cuda().contiguous(), src=0, group=self._group)
                for future in pending:
                    future.result()

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
        self._post_all("/release_memory_occupation", payloads.memory_payload(None))

    def resume_memory(self) -> None:
        self._post_all("/resume_memory_occupation", payloads.memory_payload(None))
