"""Prompt data: local jsonl/parquet prompt sets (DAPO-Math-17k or generic), templates, sampling,
and the tiny offline tokenizer and synthetic data of the CPU quick start."""

from megatron_archer.data.reader import MalformedDataError, MalformedRow, RecordSet, read_records
from megatron_archer.data.records import Message, PromptRecord, RowError, parse_row

__all__ = [
    "MalformedDataError",
    "MalformedRow",
    "Message",
    "PromptRecord",
    "RecordSet",
    "RowError",
    "parse_row",
    "read_records",
]
