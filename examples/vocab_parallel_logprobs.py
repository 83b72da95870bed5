"""Log-probs and entropy on vocabulary-sharded logits, as a tensor-parallel rank sees them.

    python examples/vocab_parallel_logprobs.py                          # one process
    torchrun --nproc-per-node 2 examples/vocab_parallel_logprobs.py     # tensor parallel 2 (gloo)

Every rank holds a contiguous quarter/half/... of a padded vocabulary; the op returns the exact
full-vocabulary results on every rank without gathering the vocabulary, and each rank's
gradient lands on its own shard.
"""

import os

import torch
import torch.distributed as dist

from megatron_archer.ops import vocab_parallel_logprobs_and_entropy


def main() -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    group = None
    if world > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    rank = dist.get_rank() if group else 0

    vocab_size, padded, tokens = 1000, 1024, 6  # Megatron pads the vocabulary to a multiple of 128 x tp
    torch.manual_seed(0)  # the same full tensors on every rank, for the comparison below
    full_logits = torch.randn(tokens, padded, dtype=torch.bfloat16) * 4
    labels = torch.randint(0, vocab_size, (tokens,))
    local = padded // world
    shard = full_logits[:, rank * local : (rank + 1) * local].clone().requires_grad_()

    logp, entropy = vocab_parallel_logprobs_and_entropy(
        shard, labels, temperature=0.7, tp_group=group, vocab_size=vocab_size, chunk_size=4
    )
    logp.sum().backward()  # shard.grad: this rank's part of d(sum logp)/d logits

    ref = torch.log_softmax(full_logits[:, :vocab_size].double() / 0.7, dim=-1)
    ref_logp = ref.gather(-1, labels[:, None]).squeeze(-1)
    ref_entropy = -(ref.exp() * ref).sum(-1)
    # torch's own float32 log_softmax: the rounding a float32 computation of this maths shows
    plain = torch.log_softmax(full_logits[:, :vocab_size].float() / 0.7, dim=-1)
    plain_logp, plain_entropy = plain.gather(-1, labels[:, None]).squeeze(-1), -(plain.exp() * plain).sum(-1)
    if rank == 0:
        print(f"tensor-parallel size {world}: V_local = {local}, true vocabulary {vocab_size}")
        print("logp     ", [round(v, 4) for v in logp.tolist()])
        print("entropy  ", [round(v, 4) for v in entropy.tolist()])
        print(f"max |logp - float64 reference|    = {(logp.double() - ref_logp).abs().max():.2e}")
        print(f"max |entropy - float64 reference| = {(entropy.double() - ref_entropy).abs().max():.2e}")
        print(f"(torch float32 log_softmax: logp {(plain_logp.double() - ref_logp).abs().max():.2e}, "
              f"entropy {(plain_entropy.double() - ref_entropy).abs().max():.2e})")
    if group:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
