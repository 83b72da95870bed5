"""Prompt templates: the forking-token paper's raw-text template (base models) or the chat template.

``paper``: "Beyond the 80/20 Rule" (arXiv 2506.01939) trains Qwen3 base models with
``User:\\n[question]\\nPlease reason step by step, and put your final answer within \\boxed{}.\\n\\nAssistant:\\n``
and ``<|endoftext|>`` as EOS; ``[question]`` is the bare problem (`PromptRecord.question`).
``chat``: the tokenizer's own chat template over the record's messages, with the generation prompt
appended, for instruct models (DAPO-Math-17k's messages keep DAPO's "Answer:" instructions).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from megatron_archer.data.records import PromptRecord

PAPER_TEMPLATE = (
    "User:\n{question}\nPlease reason step by step, and put your final answer within \\boxed{{}}.\n\n"
    "Assistant:\n"
)
TEMPLATES = ("paper", "chat")


def format_prompt(
    record: PromptRecord, template: str, tokenizer: Any = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The prompt text a rollout continues: `template` ``paper`` or ``chat`` (which needs `tokenizer`)."""
    if template == "paper":
        return PAPER_TEMPLATE.format(question=record.question)
    if template == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("template 'chat' needs a tokenizer that has a chat_template")
        return tokenizer.apply_chat_template(
            [message.as_dict() for message in record.messages], tokenize=False,
            add_generation_prompt=True, **(chat_template_kwargs or {}),
        )
    raise ValueError(f"template must be one of {', '.join(TEMPLATES)}; got {template!r}")
