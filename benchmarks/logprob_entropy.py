"""Wall time and peak memory of per-token log-prob + entropy: naive baseline vs our ops.

    python -m benchmarks.logprob_entropy [--tokens 2048] [--vocab 151936] [--hidden 256]
                                         [--chunk 256] [--device cpu|cuda] [--repeats 3]

Every variant runs forward and backward of sum(g * logp) with the entropy detached (training
without an entropy bonus), on bf16 inputs:

- naive: full fp32 log_softmax, then entropy, then gather (the baseline every ratio uses);
- chunked / unchunked: ``vocab_parallel_logprobs_and_entropy`` with and without ``--chunk``;
- matmul+naive: the LM-head matmul hidden @ W^T, then the naive baseline (on CPU the matmul
  runs on fp32 copies, as the fused op's torch path does: CPUs lack a fast bf16 matmul);
- fused: ``fused_lm_head_logprobs_and_entropy`` from hidden states (its matmuls included), also
  at a quarter of the vocabulary to show its memory does not grow with V beyond W and dW;
- matmul: the bare forward LM-head matmul, the floor for the fused op.

Peak memory is the extra memory a variant needs on top of its inputs. On CPU each variant runs
in a process of its own and the figure is peak resident memory (ru_maxrss) minus the resident
memory just before the first call; on CUDA it is max_memory_allocated minus the allocation
before the call.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

VARIANTS = ["naive", "chunked", "unchunked", "matmul+naive", "fused", "fused@V/4", "matmul"]
TEMPERATURE = 1.0


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def _naive(logits, labels, grad):
    logp_all = torch.log_softmax(logits.float() / TEMPERATURE, dim=-1)
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    (logp * grad).sum().backward()
    return entropy


def _build(variant: str, args, device: str):
    """Inputs and a closure running one forward + backward of ``variant``."""
    from megatron_archer.ops import (
        fused_lm_head_logprobs_and_entropy,
        vocab_parallel_logprobs_and_entropy,
    )

    gen = torch.Generator(device=device).manual_seed(0)
    vocab = args.vocab // 4 if variant == "fused@V/4" else args.vocab
    n, dtype = args.tokens, torch.bfloat16
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    grad = torch.randn(n, generator=gen, device=device)
    if variant in ("naive", "chunked", "unchunked"):
        logits = torch.randn(n, vocab, generator=gen, device=device, dtype=dtype).requires_grad_()

        def run():
            logits.grad = None
            if variant == "naive":
                return _naive(logits, labels, grad)
            chunk = args.chunk if variant == "chunked" else None
            logp, _ = vocab_parallel_logprobs_and_entropy(
                logits, labels, temperature=TEMPERATURE, chunk_size=chunk
            )
            (logp * grad).sum().backward()

        return run
    hidden = torch.randn(n, args.hidden, generator=gen, device=device, dtype=dtype).div_(4).requires_grad_()
    weight = torch.randn(vocab, args.hidden, generator=gen, device=device, dtype=dtype).div_(4).requires_grad_()

    def lm_head():
        # CPUs have no fast bf16 matmul: there the product runs on fp32 copies, as the fused op's
        # torch path does; on CUDA it is the bf16 matmul (fp32 accumulation) Megatron runs.
        if device == "cpu":
            return hidden.float() @ weight.float().T
        return hidden @ weight.T

    def run():
        hidden.grad = weight.grad = None
        if variant == "matmul":
            with torch.no_grad():
                return lm_head()
        if variant == "matmul+naive":
            return _naive(lm_head(), labels, grad)
        logp, _ = fused_lm_head_logprobs_and_entropy(
            hidden, weight, labels, temperature=TEMPERATURE, chunk_size=args.chunk
        )
        (logp * grad).sum().backward()

    return run


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(variant: str, args) -> dict:
    """Median seconds and peak extra bytes of one variant, in this process."""
    device = args.device
    # A tiny warm-up first, so one-off costs (thread pools, kernel loading) stay out of the peak.
    _build(variant, argparse.Namespace(**{**vars(args), "tokens": 8, "vocab": 64}), device)()
    run = _build(variant, args, device)
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _rss_bytes()
        if _max_rss_bytes() > before + 2**26:
            raise RuntimeError("building the inputs peaked above the resident memory: the "
                               "ru_maxrss figure would not be this variant's")
    times = []
    for _ in range(args.repeats + 1):  # the first full-size call is a warm-up
        start = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _max_rss_bytes() - before
    return {"variant": variant, "seconds": statistics.median(times[1:]), "peak_bytes": peak}


def _measure_in_subprocess(variant: str, argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.logprob_entropy", *argv, "--only", variant],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(results: dict, args) -> None:
    gib = 2**30
    base = results["naive"]
    print(f"\nlog-prob + entropy, forward + backward: {args.tokens} tokens, vocab {args.vocab}, "
          f"hidden {args.hidden}, bf16 inputs, chunk {args.chunk}, device {args.device}")
    print(f"{'variant':<14}{'seconds':>10}{'x naive':>10}{'peak extra GiB':>16}{'x naive':>10}")
    for name in VARIANTS:
        r = results[name]
        print(f"{name:<14}{r['seconds']:>10.3f}{r['seconds'] / base['seconds']:>10.2f}"
              f"{r['peak_bytes'] / gib:>16.3f}{r['peak_bytes'] / base['peak_bytes']:>10.3f}")
    chunked = results["chunked"]
    mem_ratio = chunked["peak_bytes"] / base["peak_bytes"]
    time_ratio = chunked["seconds"] / base["seconds"]
    # What the fused op needs beyond buffers the size of W and hidden: their fp32 gradient
    # accumulators (4 bytes) and bf16 gradients (2 bytes) scale with the weight, not the logits.
    weight_sized = lambda vocab: (vocab + args.tokens) * args.hidden * 6  # noqa: E731
    fused_full = results["fused"]["peak_bytes"] - weight_sized(args.vocab)
    fused_quarter = results["fused@V/4"]["peak_bytes"] - weight_sized(args.vocab // 4)
    logits_fp32 = args.tokens * args.vocab * 4
    floor = results["matmul"]["seconds"]
    print("\ntargets")
    print(f"  chunked peak extra memory / naive = {mem_ratio:.3f}  (target <= 0.25: "
          f"{'met' if mem_ratio <= 0.25 else 'MISSED'})")
    print(f"  chunked time / naive              = {time_ratio:.3f}  (target <= 1.2: "
          f"{'met' if time_ratio <= 1.2 else 'MISSED'})")
    print(f"  fused extra memory beyond W- and hidden-sized gradient buffers: vocab {args.vocab}: "
          f"{fused_full / gib:.3f} GiB, vocab {args.vocab // 4}: {fused_quarter / gib:.3f} GiB "
          f"(one fp32 copy of the logits would be {logits_fp32 / gib:.2f} GiB)")
    print(f"  fused forward+backward / bare forward matmul = {results['fused']['seconds'] / floor:.2f}"
          f"  (the GPU target, 1.25, is for the forward alone on CUDA)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--only", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return
    forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
    results = {}
    for name in VARIANTS:
        if args.device == "cpu":
            results[name] = _measure_in_subprocess(name, forwarded)
        else:
            results[name] = measure(name, args)
            torch.cuda.empty_cache()
        print(f"  measured {name}: {results[name]['seconds']:.3f} s", file=sys.stderr, flush=True)
    report(results, args)


if __name__ == "__main__":
    main()
