"""The step-by-step arithmetic task: correct solutions, a hash split that keeps evaluation
expressions out of the training ones, deterministic streams, and tokens the tiny tokenizer has."""

import random

import pytest

from megatron_archer.data import DataConfig, build_tiny_tokenizer, load_prompt_set
from megatron_archer.data.splits import split_of
from megatron_archer.data.stepwise_arithmetic import (
    STEPWISE_DATA_SOURCE,
    StepwiseProblem,
    expression_of,
    solution_target,
    solution_text,
    solve,
    stepwise_problems,
    write_stepwise_jsonl,
)


def _check_solution(problem: StepwiseProblem) -> None:
    """Every line is a true equation, products come first, the chain ends in the box."""
    expected = eval(problem.expression)  # noqa: S307 - our own digits and + - *, Python precedence
    *steps, box = problem.solution.split("\n")
    assert box == f"\\boxed{{{expected}}}" and problem.answer == str(expected)
    assert len(steps) == sum(problem.expression.count(f" {op} ") for op in "+-*")
    kinds = []
    for line in steps:
        left, result = line.split("=")
        assert eval(left.replace("--", "+")) == int(result), line  # noqa: S307
        kinds.append("*" in left)
    assert kinds == sorted(kinds, reverse=True), "a sum before a product"
    assert steps[-1].endswith(f"={expected}")


def test_solutions_are_correct_on_fresh_random_problems():
    for split in ("train", "eval"):
        for low, high, operand in [(1, 1, 9), (2, 3, 9), (4, 6, 99), (1, 6, 1)]:
            for problem in stepwise_problems(300, split, seed=random.randrange(10**6),
                                             min_operations=low, max_operations=high,
                                             max_operand=operand):
                _check_solution(problem)
                count = len(problem.solution.split("\n")) - 1
                assert low <= count <= high
                assert problem.expression in problem.prompt and "\\boxed{}" in problem.prompt


def test_solve_by_hand():
    assert solve("3 + 4 * 2 - 5") == (["4*2=8", "3+8=11", "11-5=6"], 6)
    assert solution_text("3 + 4 * 2 - 5") == "4*2=8\n3+8=11\n11-5=6\n\\boxed{6}"
    assert solve("2 - 9 * 3 * 2") == (["9*3=27", "27*2=54", "2-54=-52"], -52)
    assert solve("1 - 5 - 7") == (["1-5=-4", "-4-7=-11"], -11)
    for bad in ("3 +", "3 / 4", "3  + 4", "3 + 4 4"):
        with pytest.raises(ValueError, match="not 'a op b"):
            solve(bad)


def test_split_is_a_fixed_partition_and_the_sets_are_disjoint():
    eval_set = {p.expression for s in range(3)
                for p in stepwise_problems(400, "eval", seed=s, eval_fraction=0.2)}
    train_set = {p.expression for s in range(3)
                 for p in stepwise_problems(2000, "train", seed=s, eval_fraction=0.2)}
    assert eval_set.isdisjoint(train_set) and len(eval_set) > 300
    assert all(split_of(e, 0.2) == "eval" for e in eval_set)
    assert all(split_of(e, 0.2) == "train" for e in train_set)
    # the partition is of the expression space: about eval_fraction of uniform draws
    rng = random.Random(5)
    drawn = [" ".join(str(rng.randint(1, 9)) if i % 2 == 0 else rng.choice("+-*")
                      for i in range(5)) for _ in range(20000)]
    share = sum(split_of(e, 0.2) == "eval" for e in drawn) / len(drawn)
    assert abs(share - 0.2) < 0.015
    # a larger eval fraction only moves expressions from train to eval
    assert all(split_of(e, 0.3) == "eval" for e in eval_set)


def test_streams_are_deterministic_prefix_stable_and_pinned():
    assert stepwise_problems(30, "train", seed=1) == stepwise_problems(30, "train", seed=1)
    assert stepwise_problems(50, "train", seed=1)[:30] == stepwise_problems(30, "train", seed=1)
    assert stepwise_problems(30, "train", seed=1) != stepwise_problems(30, "train", seed=2)
    assert stepwise_problems(1, "train", seed=0)[0] == StepwiseProblem(
        "Compute 4 + 1 * 9 - 1. Show your steps, then put the final answer in \\boxed{}.",
        "4 + 1 * 9 - 1", "12", "1*9=9\n4+9=13\n13-1=12\n\\boxed{12}")


@pytest.mark.parametrize("kwargs, message", [
    ({"split": "test"}, "split must be one of train, eval"),
    ({"n": -1}, "n must be non-negative"),
    ({"min_operations": 3, "max_operations": 2}, "min_operations <= max_operations"),
    ({"min_operations": 0}, "min_operations <= max_operations"),
    ({"max_operand": 0}, "max_operand must be at least 1"),
    ({"eval_fraction": 1.0}, "eval_fraction must be in"),
])
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"n": 1, "split": "train", **kwargs}
    with pytest.raises(ValueError, match=message):
        stepwise_problems(**arguments)


def test_written_set_round_trips_and_tokenizes_exactly(tmp_path):
    problems = stepwise_problems(40, "eval", seed=3, max_operand=20)
    path = write_stepwise_jsonl(tmp_path / "eval.jsonl", problems)
    tokenizer = build_tiny_tokenizer()
    prompts = load_prompt_set(DataConfig(path=str(path), shuffle=False), tokenizer).prompts
    assert len(prompts) == 40
    for prompt, problem in zip(prompts, problems):
        assert prompt.record.data_source == STEPWISE_DATA_SOURCE
        assert prompt.record.answer == problem.answer
        assert expression_of(prompt.record.question) == problem.expression
        assert solution_target(prompt.record) == problem.solution
        ids = tokenizer(problem.solution, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == problem.solution
    with pytest.raises(ValueError, match="not a stepwise arithmetic prompt"):
        expression_of("What is 2 + 2?")
