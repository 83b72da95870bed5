"""Prompt data: local jsonl/parquet prompt sets (DAPO-Math-17k or generic), templates, sampling,
and the tiny offline tokenizer and synthetic data of the CPU quick start."""

from megatron_archer.data.config import DataConfig
from megatron_archer.data.prompt_set import Prompt, PromptSet, PromptSetReport, load_prompt_set
from megatron_archer.data.reader import MalformedDataError, MalformedRow, RecordSet, read_records
from megatron_archer.data.records import Message, PromptRecord, RowError, parse_row
from megatron_archer.data.sampler import PromptSampler
from megatron_archer.data.synthetic_export import write_arithmetic_jsonl
from megatron_archer.data.templates import PAPER_TEMPLATE, format_prompt
from megatron_archer.data.tiny_tokenizer import build_tiny_tokenizer

__all__ = [
    "DataConfig",
    "MalformedDataError",
    "MalformedRow",
    "Message",
    "PAPER_TEMPLATE",
    "Prompt",
    "PromptRecord",
    "PromptSampler",
    "PromptSet",
    "PromptSetReport",
    "RecordSet",
    "RowError",
    "build_tiny_tokenizer",
    "format_prompt",
    "load_prompt_set",
    "parse_row",
    "read_records",
    "write_arithmetic_jsonl",
]
