"""Scoring responses with the configured reward functions (megatron_archer.rewards)."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from megatron_archer.data import Prompt
from megatron_archer.rewards import RewardResult, configure_sandbox, load_reward_fn
from megatron_archer.trainer.config import RewardConfig


class RewardScorer:
    """``RewardConfig.function`` for every prompt, or the one ``by_data_source`` names; the
    response text is decoded without special tokens. Functions are loaded once, at construction,
    so a bad spec fails before any generation. ``config.sandbox`` is where code rewards run
    programs; with the built-in ``code`` reward configured, a machine that cannot build the
    bwrap sandbox fails here too, saying how to fix it."""

    def __init__(self, config: RewardConfig, tokenizer):
        configure_sandbox(config.sandbox, check="code" in {config.function, *config.by_data_source.values()})
        self.tokenizer = tokenizer
        self.default = load_reward_fn(config.function)
        self.by_source = {source: load_reward_fn(spec) for source, spec in config.by_data_source.items()}
        self.pool = ThreadPoolExecutor(config.workers)

    def score(self, prompts: Sequence[Prompt], responses: Sequence[Sequence[int]]) -> list[RewardResult]:
        """One RewardResult per (prompt, response token ids) pair; a failing reward function
        raises naming the prompt's location."""
        texts = self.tokenizer.batch_decode(list(responses), skip_special_tokens=True)

        def one(args):
            prompt, text = args
            fn = self.by_source.get(prompt.record.data_source, self.default)
            try:
                return fn(text, prompt.record.answer)
            except Exception as error:
                raise RuntimeError(f"reward function failed on the prompt at "
                                   f"{prompt.record.location}: {error}") from error

        return list(self.pool.map(one, zip(prompts, texts)))
