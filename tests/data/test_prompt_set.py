"""Templates, tokenisation, the over-long filter and DataConfig validation."""

import pytest

from megatron_archer.data import DataConfig, Message, PromptRecord, format_prompt, load_prompt_set
from tests.data.files import DAPO_WRAPPER, dapo_row, write_lines

RECORD = PromptRecord("What is 2 + 2?", (Message("user", "What is 2 + 2?"),), "4", "toy", "rule", "",
                      "line 1")


def test_paper_template_text():
    # "Beyond the 80/20 Rule" (arXiv 2506.01939), Qwen3 base models, written out here on purpose
    assert format_prompt(RECORD, "paper") == (
        "User:\nWhat is 2 + 2?\nPlease reason step by step, and put your final answer within \\boxed{}.\n\n"
        "Assistant:\n")


def test_chat_template_through_the_tokenizer(tiny_tokenizer):
    assert format_prompt(RECORD, "chat", tiny_tokenizer) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
    messages = (Message("system", "Be brief."), Message("user", "q"))
    two_turns = PromptRecord("q", messages, "1", "t", "rule", "", "line 1")
    assert format_prompt(two_turns, "chat", tiny_tokenizer) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_needs_a_tokenizer_with_one(tiny_tokenizer):
    with pytest.raises(ValueError, match="template 'chat' needs a tokenizer"):
        format_prompt(RECORD, "chat")
    with pytest.raises(ValueError, match="template must be one of paper, chat; got 'raw'"):
        format_prompt(RECORD, "raw", tiny_tokenizer)


def test_dapo_rows_in_both_templates(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "dapo.jsonl", [dapo_row("Find 6 * 7.", "42")])
    paper = load_prompt_set(DataConfig(path, template="paper"), tiny_tokenizer)[0]
    assert paper.text.startswith("User:\nFind 6 * 7.\nPlease reason step by step")
    chat = load_prompt_set(DataConfig(path, template="chat"), tiny_tokenizer)[0]
    wrapped = DAPO_WRAPPER.format("Find 6 * 7.")
    assert chat.text == f"<|im_start|>user\n{wrapped}<|im_end|>\n<|im_start|>assistant\n"
    assert list(chat.input_ids) == tiny_tokenizer(chat.text, add_special_tokens=False)["input_ids"]
    assert chat.input_ids[0] == tiny_tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_over_long_prompts_are_dropped_and_counted(tmp_path, tiny_tokenizer):
    questions = ["Compute 1 + 2.", "Compute 11111 + 22222 + 33333.", "Compute 3 + 4.",
                 "Compute 9 * 99999999."]
    path = write_lines(tmp_path / "g.jsonl", [{"question": q, "answer": "1"} for q in questions])
    limit = len(tiny_tokenizer(format_prompt(RECORD, "paper").replace("What is 2 + 2?", questions[0]),
                               add_special_tokens=False)["input_ids"])
    prompt_set = load_prompt_set(DataConfig(path, max_prompt_length=limit), tiny_tokenizer)
    assert [p.record.question for p in prompt_set.prompts] == ["Compute 1 + 2.", "Compute 3 + 4."]
    assert len(prompt_set[0].input_ids) == limit  # a prompt of exactly max_prompt_length tokens is kept
    report = prompt_set.report
    assert report.too_long == ("line 2", "line 4") and (report.rows, report.kept) == (4, 2)
    assert report.summary().endswith("4 rows, 2 prompts kept, 0 malformed, 2 longer than max_prompt_length")
    with pytest.raises(ValueError, match="no usable prompts: .* 4 longer than max_prompt_length"):
        load_prompt_set(DataConfig(path, max_prompt_length=limit - 10), tiny_tokenizer)


def test_report_carries_malformed_rows(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "g.jsonl", [{"question": "q", "answer": "1"}, "{oops", {"question": "q"}])
    report = load_prompt_set(DataConfig(path), tiny_tokenizer).report
    assert [m.location for m in report.malformed] == ["line 2", "line 3"] and report.kept == 1


@pytest.mark.parametrize("field, value, message", [
    ("path", "prompts.csv", "path must end in .jsonl or .parquet; got 'prompts.csv'"),
    ("path", 3, "path must be a file path; got 3"),
    ("schema", "alpaca", "schema must be one of auto, dapo, generic; got 'alpaca'"),
    ("template", "raw", "template must be one of paper, chat; got 'raw'"),
    ("max_prompt_length", 0, "max_prompt_length must be an integer >= 1; got 0"),
    ("on_malformed", "ignore", "on_malformed must be one of skip, error; got 'ignore'"),
    ("shuffle", "yes", "shuffle must be true or false; got 'yes'"),
    ("seed", -1, "seed must be an integer >= 0; got -1"),
    ("chat_template_kwargs", {"enable_thinking": False},
     "chat_template_kwargs is only used by template 'chat'"),
    ("cache_dir", 5, "cache_dir must be a directory path or None; got 5"),
])
def test_config_errors_name_the_field(field, value, message):
    kwargs = {"path": "prompts.jsonl", field: value}
    with pytest.raises(ValueError) as info:
        DataConfig(**kwargs)
    assert str(info.value) == message


def test_config_defaults():
    config = DataConfig("prompts.parquet", template="chat", chat_template_kwargs={"enable_thinking": False})
    assert (config.schema, config.max_prompt_length, config.on_malformed, config.shuffle, config.seed) == (
        "auto", 2048, "skip", True, 0)
