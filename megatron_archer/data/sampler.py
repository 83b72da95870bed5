"""A deterministic, resumable stream of prompt batches over epochs.

Epoch e visits every prompt once, in an order that depends only on (seed, e), so any machine and
Python version sees the same batches. Batches run on across epoch boundaries (each is full, none is
dropped); the state is (epoch, position), so a run resumed from `state_dict` draws exactly the
batches the uninterrupted run would have drawn.
"""

from __future__ import annotations

import random
from typing import Any

from megatron_archer.config_fields import boolean, integer


class PromptSampler:
    """Batches of `batch_size` prompt indices in [0, num_prompts), reshuffled every epoch."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        integer("num_prompts", num_prompts, low=1)
        integer("batch_size", batch_size, low=1)
        integer("seed", seed, low=0)
        boolean("shuffle", shuffle)
        self.num_prompts, self.batch_size, self.seed, self.shuffle = num_prompts, batch_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def next_batch(self, size: int | None = None) -> list[int]:
        """The next `size` (default `batch_size`) indices, e.g. more than one batch for DAPO top-ups."""
        size = self.batch_size if size is None else size
        integer("size", size, low=1)
        batch = []
        while len(batch) < size:
            if self.position == self.num_prompts:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            take = min(size - len(batch), self.num_prompts - self.position)
            batch.extend(self._order[self.position:self.position + take])
            self.position += take
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is, and what it was built from (checked on load)."""
        return {"epoch": self.epoch, "position": self.position, "num_prompts": self.num_prompts,
                "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; it must come from a sampler over the same prompts, seed and shuffle."""
        for name in ("num_prompts", "seed", "shuffle"):
            if state.get(name) != getattr(self, name):
                raise ValueError(f"sampler state has {name}={state.get(name)!r}, this sampler "
                                 f"{getattr(self, name)!r}: it belongs to another prompt set or seed")
        integer("epoch", state.get("epoch"), low=0)
        integer("position", state.get("position"), low=0)
        if state["position"] > self.num_prompts:
            raise ValueError(f"sampler state position must be <= num_prompts ({self.num_prompts}); "
                             f"got {state['position']}")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        if self.shuffle:
            random.Random(f"prompt-sampler:{self.seed}:{epoch}").shuffle(order)
        return order
