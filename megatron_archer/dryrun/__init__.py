"""``megatron-archer plan``: a training job built rank by rank on one CPU before any GPU is booked.

Modules: ``world`` (torch's fake process-group backend and megatron's parallel state at the
job's full world size, parameters on the meta device), ``rank_build`` (one rank's model,
reference, DDP buffers and optimizer shard through the job's own code), ``memory`` (the memory
model: exact static terms, estimated activations), ``plan`` (every rank, the weight-sync and
rollout-share plan, the collectives, the report), ``cli`` (the subcommand).
"""
