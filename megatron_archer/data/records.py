"""Prompt-set schemas: one row of DAPO-Math-17k or of the generic schema -> a typed PromptRecord.

``dapo`` is DAPO-Math-17k as published (verl's RL parquet layout)::

    {"data_source": "math_dapo", "ability": "MATH",
     "prompt": [{"role": "user", "content": "Solve the following math problem step by step. ..."}],
     "reward_model": {"ground_truth": "34", "style": "rule"}, "extra_info": {"index": "..."}}

``data_source``, ``prompt`` (a non-empty list of {role, content} messages, at least one from the
user) and ``reward_model.ground_truth`` are required; ``ability``, ``reward_model.style`` and
``extra_info`` are optional. DAPO wraps each problem in its own "Answer:" instructions; the bare
problem, which the paper's template needs, is the last user message with that wrapper removed.

``generic``: ``{"prompt" | "question" | "problem": str, "answer": str | int}`` (the first of the three
present is the question), with an optional ``data_source``. Its chat messages are one user turn.
A row that breaks its schema raises `RowError`, whose message names the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

SCHEMAS = ("auto", "dapo", "generic")
GENERIC_QUESTION_FIELDS = ("prompt", "question", "problem")
GENERIC_DATA_SOURCE = "generic"
DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'


class RowError(ValueError):
    """A row that does not fit its schema; the message says which field and why."""


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class PromptRecord:
    """One prompt of a prompt set.

    ``question``: the bare problem (for the paper's template); ``messages``: the chat turns (for the
    tokenizer's chat template); ``answer``: the ground truth the reward checks; ``data_source`` and
    ``reward_style`` tell the trainer which reward applies; ``location``: where the row is in its
    file, "line N" (1-based) for jsonl or "row N" (0-based) for parquet.
    """

    question: str
    messages: tuple[Message, ...]
    answer: str
    data_source: str
    reward_style: str
    ability: str
    location: str


def detect_schema(fields: Mapping[str, Any] | list[str]) -> str:
    """``dapo`` when the row (or column list) has DAPO's ``reward_model``, else ``generic``."""
    return "dapo" if "reward_model" in fields else "generic"


def parse_row(row: Any, schema: str, location: str) -> PromptRecord:
    """The record of one row under `schema` (``dapo`` or ``generic``); RowError if it does not fit."""
    if not isinstance(row, Mapping):
        raise RowError(f"a row must be a JSON object; got {_kind(row)}")
    if schema == "dapo":
        return _dapo(row, location)
    if schema == "generic":
        return _generic(row, location)
    raise ValueError(f"schema must be dapo or generic to parse a row; got {schema!r}")


def _dapo(row: Mapping[str, Any], location: str) -> PromptRecord:
    data_source = _text(row, "data_source")
    messages = _messages(_field(row, "prompt"))
    reward_model = _field(row, "reward_model")
    if not isinstance(reward_model, Mapping):
        raise RowError(f"field 'reward_model' must be an object; got {_kind(reward_model)}")
    answer = _text(reward_model, "ground_truth", "reward_model.")
    style = _optional_text(reward_model, "style", "rule", "reward_model.")
    ability = _optional_text(row, "ability", "")
    user = [m.content for m in messages if m.role == "user"]
    if not user:
        raise RowError("field 'prompt' has no message with role 'user'")
    question = user[-1]
    if question.startswith(DAPO_PREFIX) and question.endswith(DAPO_SUFFIX):
        question = question[len(DAPO_PREFIX):-len(DAPO_SUFFIX)]
    return PromptRecord(question, messages, answer, data_source, style, ability, location)


def _generic(row: Mapping[str, Any], location: str) -> PromptRecord:
    name = next((f for f in GENERIC_QUESTION_FIELDS if f in row), None)
    if name is None:
        raise RowError(f"missing field: one of {', '.join(map(repr, GENERIC_QUESTION_FIELDS))}")
    question = _text(row, name)
    answer = _field(row, "answer")
    if isinstance(answer, int) and not isinstance(answer, bool):
        answer = str(answer)
    elif not isinstance(answer, str):
        raise RowError(f"field 'answer' must be a string or an integer; got {_kind(answer)}")
    if not answer.strip():
        raise RowError("field 'answer' is empty")
    data_source = _optional_text(row, "data_source", GENERIC_DATA_SOURCE) or GENERIC_DATA_SOURCE
    return PromptRecord(question, (Message("user", question),), answer, data_source, "rule", "", location)


def _messages(value: Any) -> tuple[Message, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise RowError(f"field 'prompt' must be a non-empty list of chat messages; got {_kind(value)}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowError(f"field 'prompt[{i}]' must be an object with role and content; "
                           f"got {_kind(message)}")
        prefix = f"prompt[{i}]."
        messages.append(Message(_text(message, "role", prefix), _text(message, "content", prefix)))
    return tuple(messages)


def _field(row: Mapping[str, Any], name: str, prefix: str = "") -> Any:
    if name not in row:
        raise RowError(f"missing field '{prefix}{name}'")
    return row[name]


def _text(row: Mapping[str, Any], name: str, prefix: str = "") -> str:
    """A required non-empty string field."""
    value = _field(row, name, prefix)
    if not isinstance(value, str):
        raise RowError(f"field '{prefix}{name}' must be a string; got {_kind(value)}")
    if not value.strip():
        raise RowError(f"field '{prefix}{name}' is empty")
    return value


def _optional_text(row: Mapping[str, Any], name: str, default: str, prefix: str = "") -> str:
    """An optional string field: `default` when absent or null."""
    value = row.get(name)
    if value is None:
        return default
    if not isinstance(value, str):
        raise RowError(f"field '{prefix}{name}' must be a string; got {_kind(value)}")
    return value


def _kind(value: Any) -> str:
    """How a wrong value is named in errors: its JSON type, and the value itself when short."""
    names = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
             list: "array", tuple: "array", dict: "object"}
    kind = names.get(type(value), type(value).__name__)
    shown = repr(value)
    return f"{kind} {shown}" if len(shown) <= 40 else kind
