"""The tiny offline tokenizer: exact round trips of the synthetic task, special tokens, save and load."""

from transformers import AutoTokenizer

from megatron_archer.data import (
    DataConfig,
    Message,
    PromptRecord,
    build_tiny_tokenizer,
    format_prompt,
    load_prompt_set,
    write_arithmetic_jsonl,
)
from megatron_archer.rewards.synthetic import arithmetic_problems, arithmetic_reward

DIFFICULTIES = [(1, 9), (2, 9), (3, 20), (5, 99), (8, 1000)]


def user_record(question):
    return PromptRecord(question, (Message("user", question),), "0", "arithmetic", "rule", "", "line 1")


def round_trips(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == text


def test_arithmetic_prompts_and_answers_round_trip(tiny_tokenizer):
    for num_operations, max_operand in DIFFICULTIES:
        problems = arithmetic_problems(100, seed=5, num_operations=num_operations, max_operand=max_operand)
        for problem in problems:
            for text in (problem.prompt, f"\\boxed{{{problem.answer}}}",
                         f"{problem.expression} = {problem.answer}, so the final answer is "
                         f"\\boxed{{{problem.answer}}}.<|endoftext|>"):
                assert round_trips(tiny_tokenizer, text), text


def test_templates_round_trip(tiny_tokenizer):
    for problem in arithmetic_problems(20, seed=1):
        record = user_record(problem.prompt)
        assert round_trips(tiny_tokenizer, format_prompt(record, "paper"))
        assert round_trips(tiny_tokenizer, format_prompt(record, "chat", tiny_tokenizer))


def test_token_granularity(tiny_tokenizer):
    tokens = tiny_tokenizer.tokenize("Compute 12 * (3 - 4). \\boxed{-7}")
    assert tokens == ["Compute", " ", "1", "2", " ", "*", " ", "(", "3", " ", "-", " ", "4", ")", ".", " ",
                      "\\boxed", "{", "-", "7", "}"]
    assert tiny_tokenizer.tokenize("Computer") == list("Computer")  # words match whole words only
    assert tiny_tokenizer("é")["input_ids"] == [tiny_tokenizer.unk_token_id]  # ASCII only


def test_special_tokens(tiny_tokenizer):
    assert tiny_tokenizer.eos_token == "<|endoftext|>" and tiny_tokenizer.pad_token == "<|pad|>"
    assert tiny_tokenizer.pad_token_id != tiny_tokenizer.eos_token_id
    for token in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert tiny_tokenizer.tokenize(f"a{token}b") == ["a", token, "b"]
    ids = tiny_tokenizer("\\boxed{3}<|im_end|>")["input_ids"]
    assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == "\\boxed{3}"


def test_built_identically_and_saved_and_loaded(tmp_path, tiny_tokenizer):
    assert build_tiny_tokenizer().get_vocab() == tiny_tokenizer.get_vocab()
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok", local_files_only=True)
    assert loaded.get_vocab() == tiny_tokenizer.get_vocab()
    assert loaded.eos_token_id == tiny_tokenizer.eos_token_id
    assert loaded.pad_token_id == tiny_tokenizer.pad_token_id
    record = user_record(arithmetic_problems(1)[0].prompt)
    text = format_prompt(record, "chat", loaded)
    assert text == format_prompt(record, "chat", tiny_tokenizer)
    assert loaded(text)["input_ids"] == tiny_tokenizer(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text


def test_synthetic_task_through_the_loader(tmp_path, tiny_tokenizer):
    path = write_arithmetic_jsonl(tmp_path / "arith" / "train.jsonl", 50, seed=2, num_operations=3)
    prompt_set = load_prompt_set(DataConfig(path, template="chat"), tiny_tokenizer)
    problems = arithmetic_problems(50, seed=2, num_operations=3)
    assert prompt_set.report.schema == "generic" and len(prompt_set) == 50
    for prompt, problem in zip(prompt_set.prompts, problems):
        assert (prompt.record.question, prompt.record.answer) == (problem.prompt, problem.answer)
        assert prompt.record.data_source == "arithmetic"
        assert arithmetic_reward(f"\\boxed{{{prompt.record.answer}}}", prompt.record.answer).value == 1.0
        assert tiny_tokenizer.unk_token_id not in prompt.input_ids
