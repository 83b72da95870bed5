"""The step-by-step task's reward: the boxed integer only."""

from megatron_archer.data.stepwise_arithmetic import stepwise_problems
from megatron_archer.rewards import load_reward_fn
from megatron_archer.rewards.stepwise_arithmetic import stepwise_arithmetic_reward


def test_reference_solutions_score_one_and_altered_ones_zero():
    reward = load_reward_fn("stepwise_arithmetic")
    for problem in stepwise_problems(200, "eval", seed=11, max_operations=5, max_operand=30):
        assert reward(problem.solution, problem.answer).value == 1.0
        wrong = str(int(problem.answer) + 1)
        assert reward(problem.solution.rsplit("{", 1)[0] + f"{{{wrong}}}", problem.answer).value == 0.0


def test_only_a_boxed_answer_counts():
    answer = "6"
    cut = "4*2=8\n3+8=11\n11-5=6\n"  # cut off before the box: its last number is right
    assert stepwise_arithmetic_reward(cut, answer).value == 0.0
    assert stepwise_arithmetic_reward("the answer is 6", answer).value == 0.0
    assert stepwise_arithmetic_reward(cut + "\\boxed{6}", answer).value == 1.0
    assert stepwise_arithmetic_reward(cut + "\\boxed{6", answer).value == 0.0  # unclosed
    assert stepwise_arithmetic_reward("\\boxed{5} no, \\boxed{6}", answer).value == 1.0
    assert stepwise_arithmetic_reward("\\boxed{6} no, \\boxed{5}", answer).value == 0.0
    assert stepwise_arithmetic_reward("\\boxed{-11}", "-11").value == 1.0
    assert stepwise_arithmetic_reward("\\boxed{11}", "-11").value == 0.0
    assert stepwise_arithmetic_reward("\\boxed{x}", answer).value == 0.0
    result = stepwise_arithmetic_reward("\\boxed{}", answer)
    assert result.value == 0.0 and "no \\boxed{}" in result.reason
