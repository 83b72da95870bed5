"""DataConfig: which prompt file, how it is read and formatted, validated at construction.

Bad values raise ValueError naming the field, like the algorithm configs (`algorithms.config`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_archer.config_fields import boolean, choice, integer
from megatron_archer.data.reader import ON_MALFORMED, SUFFIXES
from megatron_archer.data.records import SCHEMAS
from megatron_archer.data.templates import TEMPLATES


@dataclass(frozen=True)
class DataConfig:
    """A prompt set and its preparation.

    ``path``: a local .jsonl or .parquet file; ``schema``: ``dapo``, ``generic`` or ``auto``;
    ``template``: ``paper`` (the forking-token paper's base-model template) or ``chat`` (the
    tokenizer's), with ``chat_template_kwargs`` passed to ``apply_chat_template`` (e.g.
    ``{"enable_thinking": False}`` for Qwen3); prompts longer than ``max_prompt_length`` tokens are
    dropped and counted; ``on_malformed``: ``skip`` (count and list) or ``error``; ``shuffle`` and
    ``seed`` drive the prompt sampler; ``cache_dir``: `datasets`' cache for parquet (None: its default).
    """

    path: str | os.PathLike
    schema: str = "auto"
    template: str = "paper"
    max_prompt_length: int = 2048
    on_malformed: str = "skip"
    shuffle: bool = True
    seed: int = 0
    chat_template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)) or not str(self.path):
            raise ValueError(f"path must be a file path; got {self.path!r}")
        if Path(self.path).suffix not in SUFFIXES:
            raise ValueError(f"path must end in {' or '.join(SUFFIXES)}; got {str(self.path)!r}")
        choice("schema", self.schema, SCHEMAS)
        choice("template", self.template, TEMPLATES)
        integer("max_prompt_length", self.max_prompt_length, low=1)
        choice("on_malformed", self.on_malformed, ON_MALFORMED)
        boolean("shuffle", self.shuffle)
        integer("seed", self.seed, low=0)
        if not isinstance(self.chat_template_kwargs, Mapping):
            raise ValueError(f"chat_template_kwargs must be a mapping; got {self.chat_template_kwargs!r}")
        if self.chat_template_kwargs and self.template != "chat":
            raise ValueError("chat_template_kwargs is only used by template 'chat'")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ValueError(f"cache_dir must be a directory path or None; got {self.cache_dir!r}")
