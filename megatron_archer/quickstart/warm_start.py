"""A short supervised warm start on an arithmetic task, so RL starts from non-trivial accuracy.

The prompts are the trainer's own (``load_prompt_set`` with the RL config's data settings, so the
same template and token ids); the target is a caller's text per record (the quick start and the
ablations: the step-by-step solution, ``stepwise_arithmetic.solution_target``; by default the
answer in the reward's format, ``\\boxed{N}``), then EOS. Loss on the target tokens only; AdamW,
full batches of right-padded sequences, on CPU in one process. Optional label smoothing (the
one-operation warm start of ``benchmarks.rl_step`` uses 0.15) keeps probability on every other
token: the model learns which answer is right but samples it unreliably at T = 1, like a base
model that knows more than it reliably says, which gives RL a signal to sharpen.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import transformers

from megatron_archer.data import DataConfig, PromptRecord, load_prompt_set


def target_text(answer: str) -> str:
    """What the warm start teaches the model to write after the prompt."""
    return f"\\boxed{{{answer}}}"


def warm_start(base: str | Path, out: str | Path, data: DataConfig, *, steps: int,
               batch_size: int = 64, lr: float = 3e-3, warmup: int = 10,
               label_smoothing: float = 0.0, seed: int = 0, log_every: int = 25,
               target: Callable[[PromptRecord], str] | None = None) -> dict[str, float]:
    """Fine-tune the HF checkpoint ``base`` on ``data`` (a jsonl of arithmetic problems) for
    ``steps`` AdamW steps (linear warmup, cosine decay to 10%); save model and tokenizer to ``out``.
    ``label_smoothing`` > 0 leaves probability on every other token at each answer position: the
    model learns the answers but samples them unreliably at T = 1 (see the module docstring).
    ``target`` gives each record's target text (default: ``target_text`` of its answer; the
    step-by-step task passes its full solutions). Returns {"loss": final smoothed loss,
    "seconds": ...}."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.train()
    prompts = load_prompt_set(replace(data, shuffle=False), tokenizer).prompts
    eos = tokenizer.eos_token_id
    sequences, starts = [], []
    for p in prompts:
        text = target(p.record) if target is not None else target_text(p.record.answer)
        target_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        sequences.append(list(p.input_ids) + target_ids + [eos])
        starts.append(len(p.input_ids))
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for i, (seq, s) in enumerate(zip(sequences, starts)):
        ids[i, :len(seq)] = torch.tensor(seq)
        labels[i, s:len(seq)] = torch.tensor(seq[s:])
        mask[i, :len(seq)] = 1
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(steps - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    order, position, smoothed = torch.randperm(len(ids), generator=generator), 0, None
    for step in range(steps):
        if position + batch_size > len(ids):
            order, position = torch.randperm(len(ids), generator=generator), 0
        rows = order[position:position + batch_size]
        position += batch_size
        used = int(mask[rows].sum(1).max())
        logits = model(input_ids=ids[rows, :used], attention_mask=mask[rows, :used]).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1), labels[rows, 1:used].flatten(), ignore_index=-100,
            label_smoothing=label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if log_every and ((step + 1) % log_every == 0 or step + 1 == steps):
            print(f"warm start step {step + 1}/{steps} | loss {smoothed:.3f} | "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    model.eval()
    Path(out).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"loss": float(smoothed), "seconds": time.perf_counter() - start}
