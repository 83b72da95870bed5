"""A prompt set ready for rollout: records read, formatted with the template, tokenised, length-filtered.

`load_prompt_set(config, tokenizer)` keeps the prompts of at most ``max_prompt_length`` tokens and
reports what it dropped (malformed rows with their positions, over-long prompts) in a PromptSetReport,
which is also logged, so a run never trains on a silently shrunken set. Prompts are tokenised without
adding special tokens: the template text carries every token the model should see.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from megatron_archer.data.config import DataConfig
from megatron_archer.data.reader import MalformedRow, read_records
from megatron_archer.data.records import PromptRecord
from megatron_archer.data.templates import format_prompt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """One prompt: its record, the formatted text and its token ids."""

    record: PromptRecord
    text: str
    input_ids: tuple[int, ...]


@dataclass(frozen=True)
class PromptSetReport:
    """What loading did: rows read, prompts kept, malformed rows and over-long prompts (by location)."""

    path: str
    schema: str
    rows: int
    kept: int
    malformed: tuple[MalformedRow, ...]
    too_long: tuple[str, ...]

    def summary(self) -> str:
        return (f"{self.path} ({self.schema} schema): {self.rows} rows, {self.kept} prompts kept, "
                f"{len(self.malformed)} malformed, {len(self.too_long)} longer than max_prompt_length")


@dataclass(frozen=True)
class PromptSet:
    """The kept prompts, in file order, and the loading report."""

    prompts: tuple[Prompt, ...]
    report: PromptSetReport

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> Prompt:
        return self.prompts[index]


def load_prompt_set(config: DataConfig, tokenizer: Any) -> PromptSet:
    """The prompts of ``config.path``; raises if none is left (the report says why)."""
    records = read_records(config.path, config.schema, config.on_malformed, config.cache_dir)
    texts = [format_prompt(record, config.template, tokenizer, config.chat_template_kwargs)
             for record in records.records]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    prompts, too_long = [], []
    for record, text, input_ids in zip(records.records, texts, ids):
        if len(input_ids) > config.max_prompt_length:
            too_long.append(record.location)
        else:
            prompts.append(Prompt(record, text, tuple(input_ids)))
    report = PromptSetReport(str(config.path), records.schema, records.rows, len(prompts),
                             records.malformed, tuple(too_long))
    if not prompts:
        raise ValueError(f"no usable prompts: {report.summary()}")
    if report.malformed or report.too_long:
        logger.warning("%s; first malformed: %s", report.summary(),
                       "; ".join(map(str, report.malformed[:5])) or "none")
    else:
        logger.info(report.summary())
    return PromptSet(tuple(prompts), report)
