"""The synthetic arithmetic task: deterministic, correct, adjustable, and its reward."""

import pytest

from megatron_archer.rewards.synthetic import ArithmeticProblem, arithmetic_problems, arithmetic_reward


def test_answers_are_the_value_of_the_expression():
    for num_operations, max_operand in [(1, 9), (3, 20), (6, 99)]:
        problems = arithmetic_problems(300, seed=7, num_operations=num_operations, max_operand=max_operand)
        for p in problems:
            assert eval(p.expression) == int(p.answer), p  # noqa: S307 - our own digits and + - * ( )
            assert p.expression in p.prompt and "\\boxed{}" in p.prompt
            assert sum(p.expression.count(op) for op in "+-*") == num_operations
            operands = [int(t) for t in p.expression.replace("(", " ").replace(")", " ").split() if t.isdigit()]
            assert all(1 <= x <= max_operand for x in operands)


def test_seeded_deterministic_and_prefix_stable():
    assert arithmetic_problems(20, seed=1) == arithmetic_problems(20, seed=1)
    assert arithmetic_problems(50, seed=1)[:20] == arithmetic_problems(20, seed=1)
    assert arithmetic_problems(20, seed=1) != arithmetic_problems(20, seed=2)
    assert len({p.expression for p in arithmetic_problems(200, seed=0, num_operations=3)}) > 150
    # Pinned: the same problems on every machine and Python version (string seeds hash with SHA-512).
    assert arithmetic_problems(2, seed=0) == [
        ArithmeticProblem(
            "Compute 3 + 9 + 2. Show your steps, then put the final answer in \\boxed{}.", "3 + 9 + 2", "14"
        ),
        ArithmeticProblem(
            "Compute 2 * 8 * 6. Show your steps, then put the final answer in \\boxed{}.", "2 * 8 * 6", "96"
        ),
    ]


def test_difficulty_changes_the_problems():
    easy = arithmetic_problems(100, seed=0, num_operations=1, max_operand=5)
    hard = arithmetic_problems(100, seed=0, num_operations=5, max_operand=50)
    assert max(abs(int(p.answer)) for p in easy) <= 25
    assert max(abs(int(p.answer)) for p in hard) > 10_000


@pytest.mark.parametrize(
    "response, value, reason",
    [
        (r"3 + 9 = 12, 12 + 2 = 14, so \boxed{14}", 1.0, "correct: '14' (boxed)"),
        ("The answer is 14.", 1.0, "correct: '14' (the answer is)"),
        (r"\boxed{14.0}", 1.0, "correct: '14.0' (boxed)"),
        (r"\boxed{13}", 0.0, "wrong: '13' (boxed), expected 14"),
        (r"\boxed{14.5}", 0.0, "final answer '14.5' is not an integer"),
        ("fourteen", 0.0, "no final answer found in the response"),
    ],
)
def test_reward(response, value, reason):
    result = arithmetic_reward(response, "14")
    assert (result.value, result.reason) == (value, reason)


def test_negative_answers_and_bad_arguments():
    assert arithmetic_reward(r"\boxed{-7}", "-7").value == 1.0
    with pytest.raises(ValueError, match="num_operations"):
        arithmetic_problems(1, num_operations=0)
    with pytest.raises(ValueError, match="max_operand"):
        arithmetic_problems(1, max_operand=0)
