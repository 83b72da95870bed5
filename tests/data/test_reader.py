"""Reading local jsonl and parquet files in the DAPO-Math-17k and generic schemas; malformed rows."""

import pytest

from megatron_archer.data import MalformedDataError, Message, read_records
from tests.data.files import DAPO_WRAPPER, dapo_row, write_lines, write_parquet

DAPO_ROWS = [dapo_row("Find $x$ if $2x = 6$.", "3", "a"), dapo_row("What is $7 \\cdot 6$?", "42", "b")]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_dapo_schema(tmp_path, suffix):
    path = tmp_path / f"dapo{suffix}"
    (write_lines if suffix == ".jsonl" else write_parquet)(path, DAPO_ROWS)
    result = read_records(path, cache_dir=str(tmp_path / "cache"))
    assert result.schema == "dapo" and result.rows == 2 and result.malformed == ()
    first, second = result.records
    # the bare question for the paper's template; the published messages for the chat template
    assert first.question == "Find $x$ if $2x = 6$."
    assert first.messages == (Message("user", DAPO_WRAPPER.format("Find $x$ if $2x = 6$.")),)
    assert (first.answer, first.data_source, first.reward_style, first.ability) == (
        "3", "math_dapo", "rule", "MATH")
    assert second.answer == "42"
    assert [r.location for r in result.records] == (
        ["line 1", "line 2"] if suffix == ".jsonl" else ["row 0", "row 1"])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_generic_schema(tmp_path, suffix):
    rows = [{"question": "What is 2 + 2?", "answer": "4", "data_source": "toy"},
            {"question": "What is 3 * 3?", "answer": "9", "data_source": "toy"}]
    path = tmp_path / f"generic{suffix}"
    (write_lines if suffix == ".jsonl" else write_parquet)(path, rows)
    result = read_records(path, cache_dir=str(tmp_path / "cache"))
    assert result.schema == "generic" and result.malformed == ()
    assert [(r.question, r.answer, r.data_source) for r in result.records] == [
        ("What is 2 + 2?", "4", "toy"), ("What is 3 * 3?", "9", "toy")]
    assert result.records[0].messages == (Message("user", "What is 2 + 2?"),)


def test_generic_question_fields_and_integer_answers(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [
        {"prompt": "p", "answer": 1}, {"question": "q", "answer": "2"}, {"problem": "r", "answer": -3},
        {"problem": "ignored", "prompt": "s", "answer": "4"},  # prompt comes first
    ])
    records = read_records(path).records
    assert [(r.question, r.answer, r.data_source) for r in records] == [
        ("p", "1", "generic"), ("q", "2", "generic"), ("r", "-3", "generic"), ("s", "4", "generic")]


def test_explicit_schema_overrides_detection(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", DAPO_ROWS)
    result = read_records(path, schema="generic")
    assert result.records == () and len(result.malformed) == 2
    # a DAPO row's "prompt" is a message list, not the generic schema's string
    assert str(result.malformed[0]) == "line 1: field 'prompt' must be a string; got array"


DAPO_WITH_BAD_LINES = [
    dapo_row("good one", "1"),                                   # line 1
    "",                                                          # line 2: blank, skipped silently
    '{"data_source": "math_dapo", "prompt": [',                  # line 3: invalid JSON
    {k: v for k, v in dapo_row("q", "1").items() if k != "reward_model"},  # line 4
    {**dapo_row("q", "1"), "reward_model": {"ground_truth": 34, "style": "rule"}},  # line 5
    {**dapo_row("q", "1"), "reward_model": {"ground_truth": "  ", "style": "rule"}},  # line 6
    {**dapo_row("q", "1"), "prompt": "not a list"},              # line 7
    dapo_row("good two", "2"),                                   # line 8
    "[1, 2]",                                                    # line 9: not an object
    {**dapo_row("q", "1"), "prompt": [{"role": "system", "content": "be brief"}]},  # line 10
]
EXPECTED_BAD = [
    ("line 3", "invalid JSON"),
    ("line 4", "missing field 'reward_model'"),
    ("line 5", "field 'reward_model.ground_truth' must be a string; got integer 34"),
    ("line 6", "field 'reward_model.ground_truth' is empty"),
    ("line 7", "field 'prompt' must be a non-empty list of chat messages"),
    ("line 9", "a row must be a JSON object; got array"),
    ("line 10", "field 'prompt' has no message with role 'user'"),
]


def test_malformed_jsonl_skipped_with_line_numbers(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", DAPO_WITH_BAD_LINES)
    result = read_records(path, on_malformed="skip")
    assert [r.location for r in result.records] == ["line 1", "line 8"]
    assert [r.question for r in result.records] == ["good one", "good two"]
    assert [m.location for m in result.malformed] == [where for where, _ in EXPECTED_BAD]
    for row, (_, reason) in zip(result.malformed, EXPECTED_BAD):
        assert reason in row.reason
    assert result.rows == 9  # non-blank lines


def test_malformed_jsonl_error_lists_every_bad_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", DAPO_WITH_BAD_LINES)
    with pytest.raises(MalformedDataError) as info:
        read_records(path, on_malformed="error")
    assert [m.location for m in info.value.rows] == [where for where, _ in EXPECTED_BAD]
    message = str(info.value)
    assert str(path) in message and "7 malformed row(s)" in message
    assert "line 3: invalid JSON" in message and "line 10: field 'prompt' has no message" in message


def test_generic_wrong_types_and_not_utf8(tmp_path):
    path = tmp_path / "g.jsonl"
    write_lines(path, [
        {"question": "ok", "answer": "1"},
        {"question": "q", "answer": True},
        {"question": ["q"], "answer": "1"},
        {"question": "q"},
        {"answer": "1"},
        {"question": "q", "answer": None},
    ])
    with open(path, "ab") as out:
        out.write(b'{"question": "caf\xe9", "answer": "1"}\n')
    result = read_records(path)
    assert [str(m) for m in result.malformed] == [
        "line 2: field 'answer' must be a string or an integer; got boolean True",
        "line 3: field 'question' must be a string; got array ['q']",
        "line 4: missing field 'answer'",
        "line 5: missing field: one of 'prompt', 'question', 'problem'",
        "line 6: field 'answer' must be a string or an integer; got null None",
        "line 7: not UTF-8 text (invalid continuation byte at byte offset 17)",
    ]


def test_malformed_parquet_rows_by_index(tmp_path):
    path = write_parquet(tmp_path / "g.parquet", [
        {"question": "ok", "answer": "1"}, {"question": "q", "answer": ""},
        {"question": None, "answer": "3"}])
    result = read_records(path, cache_dir=str(tmp_path / "cache"))
    assert [r.location for r in result.records] == ["row 0"]
    assert [str(m) for m in result.malformed] == [
        "row 1: field 'answer' is empty", "row 2: field 'question' must be a string; got null None"]


def test_missing_file_and_bad_suffix(tmp_path):
    missing = tmp_path / "nowhere" / "prompts.jsonl"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_records(missing)
    with pytest.raises(ValueError, match=r"prompts\.csv must end in \.jsonl or \.parquet"):
        read_records(tmp_path / "prompts.csv")
