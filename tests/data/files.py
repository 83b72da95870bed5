"""Small prompt files written by the tests: jsonl (with malformed lines on purpose) and parquet."""

import json

import pyarrow as pa
import pyarrow.parquet as pq

# DAPO-Math-17k's wrapper around every problem, as published (written out here, not imported, so the
# tests check the loader's copy of it).
DAPO_WRAPPER = (
    "Solve the following math problem step by step. The last line of your response should be of the "
    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n{}\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)


def write_lines(path, lines):
    """Write jsonl lines verbatim: dicts as JSON, strings as they are (to make malformed lines)."""
    with open(path, "w", encoding="utf-8") as out:
        for line in lines:
            out.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def dapo_row(question, answer, index="0"):
    """A DAPO-Math-17k row as published."""
    return {
        "data_source": "math_dapo",
        "prompt": [{"role": "user", "content": DAPO_WRAPPER.format(question)}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index},
    }
