"""Math reward: final-answer extraction, math-verify equivalence on varied forms, the time limit."""

import time

import pytest

from megatron_archer.rewards.answer_extraction import (
    FinalAnswer,
    extract_final_answer,
    last_boxed,
)
from megatron_archer.rewards.math_reward import MathVerifier

# (response, reference, expected reward): fractions, decimals, LaTeX, sets, intervals, units,
# percentages, equations, symbolic forms, and responses with no boxed answer.
PAIRS = [
    # fractions and decimals
    (r"So $x = \boxed{\frac{1}{2}}$.", "1/2", 1),
    (r"\boxed{0.5}", r"\frac12", 1),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1),
    (r"\boxed{\tfrac{2}{6}}", r"\frac{1}{3}", 1),
    (r"\boxed{-\frac{7}{2}}", "-3.5", 1),
    (r"\boxed{0.3333}", r"\frac{1}{3}", 0),
    (r"\boxed{\frac{2}{3}}", r"\frac{3}{2}", 0),
    (r"\boxed{3.0}", "3", 1),
    (r"\boxed{1,000}", "1000", 1),
    (r"\boxed{0.25}", "1/4", 1),
    (r"\boxed{2.5}", "2.6", 0),
    # integers, signs, wrong answers
    (r"\boxed{42}", "42", 1),
    (r"\boxed{-1}", "-1", 1),
    (r"\boxed{41}", "42", 0),
    (r"\boxed{-5}", "5", 0),
    # radicals, pi, symbolic expressions
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2", 1),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", 1),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0),
    (r"\boxed{2\pi}", r"2\pi", 1),
    (r"\boxed{\pi r^2}", r"r^2\pi", 1),
    (r"\boxed{(x+1)^2}", "x^2+2x+1", 1),
    (r"\boxed{x^2-1}", "(x-1)(x+1)", 1),
    (r"\boxed{x^2+1}", "(x+1)^2", 0),
    (r"\boxed{\frac{a}{b}}", r"a/b", 1),
    (r"\boxed{2^{10}}", "1024", 1),
    (r"\boxed{\log_2 8}", "3", 1),
    (r"\boxed{\binom{5}{2}}", "10", 1),
    # equations
    (r"\boxed{x = 3}", "3", 1),
    (r"\boxed{3}", "x=3", 1),
    (r"\boxed{y = 2x + 1}", "y=2x+1", 1),
    # sets, tuples, intervals
    (r"\boxed{\{1, 2, 3\}}", r"\{3, 2, 1\}", 1),
    (r"\boxed{\{1, 2\}}", r"\{1, 2, 3\}", 0),
    (r"\boxed{[1, 2)}", "[1,2)", 1),
    (r"\boxed{(1, 2]}", "[1,2)", 0),
    (r"\boxed{(-\infty, 0)}", r"(-\infty,0)", 1),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", 1),
    (r"\boxed{(1, 2)}", "(1,2)", 1),
    # units, degrees, percentages, money
    (r"\boxed{5\text{ cm}}", "5", 1),
    (r"\boxed{12 \text{ meters}}", "12", 1),
    (r"\boxed{90^\circ}", "90", 1),
    (r"\boxed{10\%}", "0.1", 1),
    (r"\boxed{75\%}", r"\frac{3}{4}", 1),
    (r"\boxed{\$18}", "18", 1),
    (r"\boxed{7\text{ cm}}", "5", 0),
    # text answers
    (r"\boxed{\text{(B)}}", r"\text{(B)}", 1),
    # no boxed answer: the plain-text fallbacks
    ("Adding them gives 12. The answer is 12.", "12", 1),
    ("The final answer is $\\frac{3}{5}$.", "0.6", 1),
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72", 1),
    ("Work...\nAnswer: 3.5", r"\frac{7}{2}", 1),
    ("**Final Answer:** $x = 4$", "4", 1),
    ("The answer is 7.", "8", 0),
    ("I could not solve this problem.", "5", 0),
    # the last boxed answer wins; nested braces
    (r"First \boxed{3}, but correcting: \boxed{4}", "4", 1),
    (r"First \boxed{4}, but correcting: \boxed{3}", "4", 0),
    (r"\boxed{\frac{\sqrt{\frac{1}{4}}}{2}}", "1/4", 1),
    # the reference may itself be a boxed solution
    (r"\boxed{6}", r"so the total is \boxed{6}.", 1),
]

# Gaming attempts that math-verify's defaults accept, and their honest neighbours (issue 12).
GAMING = [
    # a chained equation or inequality is not reduced to its last side (the reference is a value)
    (r"\boxed{5 = 7}", "7", 0),
    (r"\boxed{x = 5 = 7}", "7", 0),
    (r"\boxed{2 + 3 = 5}", "5", 0),
    (r"\boxed{3 < 7}", "7", 0),
    (r"\boxed{x = 7}", "7", 1),  # a single assignment still counts as its value
    (r"\boxed{x = 7}", "x = 7", 1),  # a relation reference is compared as a relation
    # decimals are exact: rounded non-terminating values do not match
    (r"\boxed{0.333333}", r"\frac{1}{3}", 0),
    (r"\boxed{3.141593}", r"\pi", 0),
    (r"\boxed{1.414214}", r"\sqrt{2}", 0),
    (r"\boxed{0.75}", r"\frac{3}{4}", 1),
    (r"\boxed{0.125}", "1/8", 1),
    (r"\boxed{\{0.5, 2\}}", r"\{\frac{1}{2}, 2\}", 1),
    # only the final answer, after the last </think>, counts
    (r"<think>it is \boxed{7}</think> The answer is \boxed{8}.", "7", 0),
    (r"<think>maybe \boxed{8}?</think> So \boxed{7}.", "7", 1),
    (r"<think>it is \boxed{7}</think> I am not sure.", "7", 0),
    (r"<think>still thinking, \boxed{7}", "7", 0),  # thinking never closed: no final answer
    # a box inside a code block after the real answer does not count
    ("The answer is \\boxed{7}.\n```python\nprint(r'\\boxed{8}')\n```\n", "7", 1),
    ("The answer is \\boxed{7}.\n```python\nprint(r'\\boxed{8}')\n```\n", "8", 0),
    ("```\n\\boxed{8}\n```", "8", 0),
]


@pytest.fixture(scope="module")
def verifier():
    with MathVerifier(num_workers=2, timeout_s=3.0) as v:
        yield v


def test_at_least_50_varied_pairs_score_as_expected(verifier):
    assert len(PAIRS) >= 50
    results = verifier.score([p[0] for p in PAIRS], [p[1] for p in PAIRS])
    wrong = [
        (response, reference, expected, result)
        for (response, reference, expected), result in zip(PAIRS, results)
        if result.value != expected
    ]
    assert not wrong, "\n".join(map(str, wrong))
    assert sum(r.value for r in results) >= 35 and sum(1 - r.value for r in results) >= 10


def test_gaming_attempts_score_zero_and_honest_forms_one(verifier):
    results = verifier.score([p[0] for p in GAMING], [p[1] for p in GAMING])
    wrong = [(g, r) for g, r in zip(GAMING, results) if r.value != g[2]]
    assert not wrong, "\n".join(map(str, wrong))
    assert "chained equation or inequality" in results[0].reason


def test_relative_tolerance_is_an_opt_in_relative_to_the_reference():
    with MathVerifier(num_workers=1, timeout_s=10.0, relative_tolerance=1e-4) as tolerant:
        responses = [r"\boxed{\pi}", r"\boxed{3.1416}", r"\boxed{3.15}", r"\boxed{0.33333}", r"\boxed{0.333}",
                     r"\boxed{5 = 7}", r"\boxed{1000.05}", r"\boxed{1000.5}"]
        references = ["3.14159", r"\pi", r"\pi", r"\frac{1}{3}", r"\frac{1}{3}", "7", "1000", "1000"]
        values = [r.value for r in tolerant.score(responses, references)]
        # |a - g| <= 1e-4 |g|: 8e-7, 2e-6, 3e-3, 1e-5, 1e-3 relative; relations stay refused; 5e-5, 5e-4
        assert values == [1, 1, 0, 1, 0, 0, 1, 0]
        assert "within relative tolerance 0.0001" in tolerant(r"\boxed{\pi}", "3.14159").reason
    with pytest.raises(ValueError, match="relative_tolerance"):
        MathVerifier(relative_tolerance=0)


def test_relation_reduction_is_an_option():
    with MathVerifier(num_workers=1, timeout_s=10.0, reduce_relations=True) as lenient:
        assert lenient(r"\boxed{5 = 7}", "7").value == 1  # math-verify's own behaviour


@pytest.mark.parametrize(
    "text, after_think, skip_code, expected",
    [
        (r"<think>\boxed{1}</think>\boxed{2}", True, True, "2"),
        (r"<think>\boxed{1}</think>no box", True, True, None),
        (r"<think>\boxed{1}", True, True, None),
        (r"<think>\boxed{1}", False, True, "1"),
        (r"a </think> b </think> \boxed{3}", True, True, "3"),
        ("\\boxed{1}\n~~~\n\\boxed{2}\n~~~", True, True, "1"),
        ("\\boxed{1}\n```\n\\boxed{2}\n```", True, False, "2"),
        ("\\boxed{1}\n```py\n\\boxed{2}", True, True, "1"),  # unclosed fence: code to the end
        ("Answer: `42`", True, True, "42"),  # inline code is not a code block
    ],
)
def test_final_part_options(text, after_think, skip_code, expected):
    final = extract_final_answer(text, after_think=after_think, skip_code_blocks=skip_code)
    assert (final.text if final else None) == expected


def test_reasons_name_the_verdict(verifier):
    correct, wrong, missing = verifier.score([r"\boxed{2}", r"\boxed{3}", "no idea"], ["2", "2", "2"])
    assert correct.value == 1 and correct.reason.startswith("correct: '2' (boxed)")
    assert wrong.value == 0 and wrong.reason.startswith("wrong: '3' (boxed)")
    assert missing.value == 0 and "no final answer" in missing.reason


def test_pathological_expression_times_out_promptly_and_the_pool_recovers(verifier):
    start = time.monotonic()
    results = verifier.score([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{2}"], ["1", "2"])
    elapsed = time.monotonic() - start
    assert results[0].value == 0 and "timed out after 3 s" in results[0].reason, results[0]
    assert results[1].value == 1  # the other worker went on with the batch
    assert elapsed < 3.0 + 5.0, elapsed  # the limit plus generous slack, not the minutes sympy would take
    start = time.monotonic()
    assert verifier(r"\boxed{\frac{1}{3}}", "1/3").value == 1  # the killed worker was replaced
    assert time.monotonic() - start < 30


def test_unparseable_answer_scores_zero_with_reason(verifier):
    result = verifier(r"\boxed{\frac{1}{}}", "1")
    assert result.value == 0 and result.reason.startswith(("could not parse", "wrong"))


def test_mismatched_lengths_and_bad_settings_raise():
    with pytest.raises(ValueError, match="2 responses but 1 references"):
        MathVerifier().score(["a", "b"], ["c"])
    with pytest.raises(ValueError, match="num_workers"):
        MathVerifier(num_workers=0)
    with pytest.raises(ValueError, match="timeout_s"):
        MathVerifier(timeout_s=0)


def test_close_stops_the_workers_and_a_later_call_restarts_them():
    v = MathVerifier(num_workers=1, timeout_s=10.0)
    assert v(r"\boxed{1}", "1").value == 1
    (worker,) = v._workers
    v.close()
    assert worker.proc.poll() is not None
    assert v(r"\boxed{2}", "2").value == 1
    v.close()


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"\boxed{\frac{1}{2}}", FinalAnswer(r"\frac{1}{2}", "boxed")),
        (r"\boxed{1} then \boxed{ \{a, b\} }", FinalAnswer(r"\{a, b\}", "boxed")),
        (r"\fbox{7}", FinalAnswer("7", "boxed")),
        (r"complete \boxed{2} then cut off \boxed{\frac{3", FinalAnswer("2", "boxed")),
        ("The answer is 3.5. Next we check.", FinalAnswer("3.5", "the answer is")),
        ("the final answer is: $x^2$.", FinalAnswer("x^2", "the answer is")),
        ("#### 1,234", FinalAnswer("1,234", "####")),
        ("Answer: 12\nThe answer is 13.", FinalAnswer("13", "the answer is")),
        ("The answer is 13.\nAnswer: 12", FinalAnswer("12", "Answer:")),
        ("> **Answer:** \\(\\sqrt{2}\\)", FinalAnswer(r"\sqrt{2}", "Answer:")),
        ("no answer here", None),
        (r"\boxed{}", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_last_boxed_skips_escaped_braces():
    assert last_boxed(r"\boxed{\}}") == r"\}"
    assert last_boxed("nothing") is None
