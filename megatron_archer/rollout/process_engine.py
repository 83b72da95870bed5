"""The local engine in a process of its own, so that generation truly overlaps training
(``rollout.async`` with the local engine: ``trainer.async_rollout``).

A spawned child builds a ``LocalEngine`` and serves one call at a time over a pipe; this object
is its ``RolloutEngine`` face in the trainer's process, and callers from several threads take
turns (a lock). ``update_weights`` streams the buckets one message each (tensors cloned into
torch.multiprocessing's shared memory, so the actor's own storage is never moved there), then an
end marker; the child's ``LocalEngine.update_weights`` stages them all before changing the model
(all or none), and a sender that fails mid-stream sends an abort marker instead, so the child
drops what it staged. An error in the child is raised here with its type and the child's
traceback as a note; a dead child is an error naming its exit code.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.multiprocessing as mp

from megatron_archer.rollout.engine import (
    MEMORY_PARTS,
    Bucket,
    MemoryPart,
    RolloutEngine,
    Sample,
    SamplingParams,
)

_END, _ABORT = "end", "abort"
START_TIMEOUT_S = 600.0


class ProcessEngine(RolloutEngine):
    """``LocalEngine(checkpoint_dir, device=, dtype=, threads=, record_routing=)`` in a spawned
    process."""

    def __init__(self, checkpoint_dir: str | Path, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, threads: int | None = None,
                 record_routing: bool = False):
        context = mp.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, daemon=True, name="local-engine",
                                        args=(child, str(checkpoint_dir), device, dtype, threads,
                                              record_routing))
        self._process.start()
        child.close()
        self._lock = threading.Lock()
        self._version: int | None = None
        if not self._conn.poll(START_TIMEOUT_S):
            self.shutdown()
            raise RuntimeError(f"the local engine process did not start in {START_TIMEOUT_S} s")
        self._reply()

    @property
    def weight_version(self) -> int | None:
        return self._version

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams
                 ) -> list[list[Sample]]:
        return self._call("generate", [list(p) for p in prompts], params)

    def update_weights(self, buckets: Iterable[Bucket], version: int) -> None:
        with self._lock:
            self._send(("update_weights", (version,)))
            try:
                for bucket in buckets:
                    self._send([(name, tensor.detach().clone()) for name, tensor in bucket])
            except BaseException:
                if self._process.is_alive():
                    self._send(_ABORT)
                    self._reply_quietly()
                raise
            self._send(_END)
            self._reply()
        self._version = version

    def release_memory(self) -> None:
        self._call("release_memory")

    def resume_memory(self, parts: Sequence[MemoryPart] = MEMORY_PARTS) -> None:
        self._call("resume_memory", list(parts))

    def health(self) -> bool:
        return self._process.is_alive() and self._call("health")

    def shutdown(self) -> None:
        """Stop the child (asked first, then terminated)."""
        if self._process.is_alive():
            try:
                with self._lock:
                    self._conn.send(("stop", ()))
            except (BrokenPipeError, OSError):
                pass
            self._process.join(30)
            if self._process.is_alive():
                self._process.terminate()
                self._process.join()
        self._conn.close()

    def _call(self, method: str, *args):
        with self._lock:
            self._send((method, args))
            return self._reply()

    def _send(self, message) -> None:
        try:
            self._conn.send(message)
        except (BrokenPipeError, ConnectionResetError):
            raise self._exited() from None

    def _exited(self) -> RuntimeError:
        self._process.join(5)
        return RuntimeError(f"the local engine process exited (exit code "
                            f"{self._process.exitcode})")

    def _reply(self):
        try:
            kind, value, trace = self._conn.recv()
        except EOFError:
            raise self._exited() from None
        if kind == "error":
            value.add_note(f"in the local engine process:\n{trace}")
            raise value
        return value

    def _reply_quietly(self) -> None:
        try:
            self._reply()
        except Exception:  # noqa: BLE001 - the sender's own error is the one raised
            pass


class _Stream:
    """The buckets of one update as the child receives them, up to the end (or abort) marker."""

    def __init__(self, conn):
        self.conn, self.finished = conn, False

    def __iter__(self):
        while True:
            message = self.conn.recv()
            if message in (_END, _ABORT):
                self.finished = True
                if message == _ABORT:
                    raise RuntimeError("the sender stopped mid-update; nothing was loaded")
                return
            yield message

    def drain(self) -> None:
        """Read what is left of the update (after the engine stopped reading it early)."""
        if not self.finished:
            for _ in self:
                pass


def _serve(conn, checkpoint_dir: str, device: str, dtype: torch.dtype, threads: int | None,
           record_routing: bool):
    """The child: build the engine, then answer calls until ``stop``."""
    from megatron_archer.rollout.local_engine import LocalEngine

    try:
        engine = LocalEngine(checkpoint_dir, device=device, dtype=dtype, threads=threads,
                             record_routing=record_routing)
        conn.send(("ok", None, None))
    except Exception as error:  # noqa: BLE001 - reported to the parent
        conn.send(("error", error, traceback.format_exc()))
        return
    while True:
        method, args = conn.recv()
        if method == "stop":
            return
        stream = _Stream(conn) if method == "update_weights" else None
        try:
            if stream is not None:
                value = engine.update_weights(stream, *args)
            else:
                value = getattr(engine, method)(*args)
            reply = ("ok", value, None)
        except Exception as error:  # noqa: BLE001 - reported to the parent
            reply = ("error", error, traceback.format_exc())
        if stream is not None:
            try:
                stream.drain()
            except RuntimeError:
                pass
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001 - an answer that does not pickle: its text instead
            error = RuntimeError(f"{type(reply[1]).__name__}: {reply[1]}")
            conn.send(("error", error, reply[2] or traceback.format_exc()))
