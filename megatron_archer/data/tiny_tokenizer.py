"""A tiny Qwen-style tokenizer built offline, for the CPU quick start and tests.

Real runs use the model's own tokenizer; the quick start and the tests must not download one. This
tokenizer is a `WordLevel` model over every printable ASCII character, tab and newline, plus the
words of the synthetic arithmetic prompt and of the prompt templates as whole tokens, plus
``\\boxed``. A regex pre-tokenizer cuts the text into those words (whole words only) and otherwise
into single characters (so numbers are split into digits), and the `Fuse` decoder joins tokens
without separators: any ASCII text encodes without unknown tokens and decodes back exactly. Special
tokens follow Qwen: ``<|endoftext|>`` (the EOS of base models and of the paper's template),
``<|im_start|>`` and ``<|im_end|>`` (chat turns), plus ``<|pad|>`` and ``<|unk|>`` (for non-ASCII
characters). The chat template is Qwen's ChatML without a default system prompt.
"""

from __future__ import annotations

import re
import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from megatron_archer.data.templates import PAPER_TEMPLATE
from megatron_archer.rewards.synthetic import PROMPT as ARITHMETIC_PROMPT

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
UNK_TOKEN = "<|unk|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
SPECIAL_TOKENS = (EOS_TOKEN, *CHAT_TOKENS, PAD_TOKEN, UNK_TOKEN)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CHARACTERS = tuple(string.printable)  # digits, letters, punctuation, whitespace
_ROLES = ("system", "user", "assistant")


def _words() -> tuple[str, ...]:
    """The multi-character words of the arithmetic prompt, the templates and the chat roles."""
    text = ARITHMETIC_PROMPT + PAPER_TEMPLATE + " ".join(_ROLES)
    return tuple(dict.fromkeys(w for w in re.findall(r"[A-Za-z]{2,}", text) if w != "boxed"))


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer (same vocabulary and ids on every call); `save_pretrained` it for a model dir."""
    words = _words()
    vocab = {token: i for i, token in enumerate((*_CHARACTERS, *words, "\\boxed", *SPECIAL_TOKENS))}
    # Longest words first, so a word is never cut by a shorter one that is its prefix.
    alternatives = [re.escape("\\boxed")] + [rf"\b{w}\b" for w in sorted(words, key=len, reverse=True)]
    pattern = "|".join(alternatives) + r"|[\s\S]"
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=list(CHAT_TOKENS),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
