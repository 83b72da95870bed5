"""Find the final answer a response commits to.

Only the response's final part is searched (each rule an option of `extract_final_answer`):

- `after_think`: with a reasoning block (R1-Distill style `<think>...</think>`), only the text
  after the last `</think>`; a response whose `<think>` never closes has no final answer (an
  answer inside the thinking does not count);
- `skip_code_blocks`: fenced code blocks (``` or ~~~, an unclosed one to the end) are removed, so
  a `\\boxed{}` printed or written inside code after the real answer does not count.

In what remains, the last complete `\\boxed{...}` (or `\\fbox{...}`) wins, nested braces included.
Without one, the latest of the common plain-text forms is taken: "the (final) answer is X", a
GSM8K-style "#### X", or a line "Answer: X" / "Final answer: X". Extraction is plain string work,
kept apart from the (slow, sandboxed) equivalence check so it is fast and testable on its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
_FALLBACKS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("the answer is", re.compile(r"(?:final answer|the answer)\s+is\s*:?\s*([^\n]+)", re.IGNORECASE)),
    ("####", re.compile(r"####\s*([^\n]+)")),
    (
        "Answer:",
        re.compile(r"^[ \t>*#]*(?:final\s+)?answer\s*\**\s*:\s*\**\s*([^\n]+)$", re.IGNORECASE | re.MULTILINE),
    ),
)
# A sentence ends at a period not inside a number ("3.5" is kept whole) followed by a space or the end.
_SENTENCE_END = re.compile(r"(?<!\d)\.(?=\s|$)|\.(?=\s+[A-Z])")
_CODE_BLOCK = re.compile(r"^[ \t]*(```|~~~).*?(?:^[ \t]*\1[^\n]*$|\Z)", re.DOTALL | re.MULTILINE)
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_WRAPPERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"), ("`", "`"))


@dataclass(frozen=True)
class FinalAnswer:
    """The answer text and which form it was found in ("boxed", "the answer is", "####", "Answer:")."""

    text: str
    source: str


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` whose braces close, or None. `\\{` and `\\}` are literals."""
    for match in reversed(list(_BOX_OPEN.finditer(text))):
        content = _balanced(text, match.end())
        if content is not None:
            return content.strip()
    return None


def final_part(response: str, after_think: bool = True, skip_code_blocks: bool = True) -> str:
    """The part of `response` that may hold its final answer (see the module docstring)."""
    if after_think:
        if _THINK_CLOSE in response:
            response = response.rsplit(_THINK_CLOSE, 1)[1]
        elif _THINK_OPEN in response:
            return ""
    if skip_code_blocks:
        response = _CODE_BLOCK.sub("", response)
    return response


def extract_final_answer(response: str, after_think: bool = True, skip_code_blocks: bool = True) -> FinalAnswer | None:
    """The answer `response` commits to, or None when it states none."""
    response = final_part(response, after_think, skip_code_blocks)
    boxed = last_boxed(response)
    if boxed:
        return FinalAnswer(boxed, "boxed")
    best: tuple[int, str, str] | None = None
    for source, pattern in _FALLBACKS:
        for match in pattern.finditer(response):
            answer = _clean(match.group(1))
            if answer and (best is None or match.start() >= best[0]):
                best = (match.start(), answer, source)
    return FinalAnswer(best[1], best[2]) if best else None


def _balanced(text: str, start: int) -> str | None:
    """Text from `start` up to the brace closing the one just before it, or None if it never closes."""
    depth = 1
    i = start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
        i += 1
    return None


def _clean(answer: str) -> str:
    """Trim a plain-text answer to its first sentence, without math delimiters or markdown."""
    end = _SENTENCE_END.search(answer)
    if end:
        answer = answer[: end.start()]
    answer = answer.strip().rstrip(".").strip()
    changed = True
    while changed:
        changed = False
        for left, right in _WRAPPERS:
            if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
                answer = answer[len(left) : len(answer) - len(right)].strip()
                changed = True
    return answer.rstrip(".").strip()
