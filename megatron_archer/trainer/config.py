"""ExperimentConfig: one YAML file per experiment, ``a.b.c=value`` overrides, the resolved copy.

Sections: ``model``, ``parallel``, ``data`` (megatron_archer.data.DataConfig), ``rollout``,
``reward``, ``algorithm`` (megatron_archer.algorithms, with an optional ``preset`` key),
``actor`` (megatron_archer.actor.ActorConfig), ``train``, ``logging``, ``checkpoint``. Every
section is a frozen dataclass validated at construction: unknown keys and bad values raise
ValueError naming the dotted field and what it allows (``rollout.engine must be one of local,
sglang; got 'vllm'``). Paths are not checked here (a config can be validated anywhere); the run
checks them at start (``megatron_archer.trainer.launch``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_archer.actor import ActorConfig
from megatron_archer.algorithms import AlgorithmConfig, config_from_dict
from megatron_archer.config_fields import (
    boolean,
    choice,
    from_dict,
    instance,
    integer,
    merge,
    number,
    to_plain,
)
from megatron_archer.data import DataConfig
from megatron_archer.rewards.code_sandbox import SANDBOXES
from megatron_archer.rollout import SamplingParams
from megatron_archer.rollout.engine import check_sampling
from megatron_archer.rollout.sglang_engine import check_engine_settings

ENGINES = ("local", "sglang")
BACKENDS = ("auto", "te", "local")
RECOMPUTE = ("none", "selective", "full")
FP8_FORMATS = ("off", "hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("most_recent", "max")
ENGINE_DTYPES = ("float32", "bfloat16", "float16")
NONFINITE_POLICIES = ("skip", "error")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading that also reads ``1e-6`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)[eE][-+]?\d+$"),
    list("-+0123456789."))


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def read_yaml_file(path: Path):
    """The YAML document of ``path``; a syntax error is a ValueError naming the file, the line
    and the column (not the parser's '<unicode string>')."""
    try:
        return _yaml(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}:{where}: YAML syntax error: {problem}") from None


def _optional_str(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or null; got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The initial policy (a Hugging Face checkpoint directory) and how megatron builds it.

    ``tokenizer``: a directory with the tokenizer files (None: ``path``); ``backend``: megatron's
    layer implementation, ``te`` (Transformer Engine), ``local`` (portable) or ``auto``;
    ``recompute``: the actor's activation recompute, ``none``, ``selective`` (megatron's core
    attention) or ``full`` (every layer's input kept, the layer recomputed in backward:
    tools/memory_estimate.py's "with recompute"). Recompute needs CUDA: megatron's activation
    checkpointing saves and restores CUDA RNG states.

    ``fp8``: Transformer Engine fp8 GEMMs for the actor, ``off``, ``hybrid`` (e4m3 forward, e5m2
    gradients) or ``e4m3`` (``false`` means ``off``); needs ``backend: te``. Its scaling: ``fp8_recipe`` (``delayed``,
    ``tensorwise``, ``blockwise``, ``mxfp8`` on Blackwell), and for ``delayed`` ``fp8_margin``
    (scale = 2^-margin x the largest representable / amax), ``fp8_amax_history_len`` and
    ``fp8_amax_compute_algo`` (``most_recent`` or ``max`` over the history): megatron's
    TransformerConfig fields of the same names, its defaults. Packed rows are then padded to a
    multiple of 16 tokens (32 for ``mxfp8``; times the TP size under sequence parallelism) by a
    filler sequence that enters no loss or metric (actor.packing).

    ``router_aux_loss_coef``: a mixture-of-experts model's load-balancing loss coefficient
    (megatron's per-layer ``aux_loss``, docs/numerics.md §11); None: the checkpoint's
    ``router_aux_loss_coef``; 0 turns the loss off. Set for a dense model, it is an error.
    """

    path: str
    tokenizer: str | None = None
    backend: str = "auto"
    recompute: str = "none"
    fp8: str = "off"
    fp8_recipe: str = "delayed"
    fp8_margin: int = 0
    fp8_amax_history_len: int = 1
    fp8_amax_compute_algo: str = "most_recent"
    router_aux_loss_coef: float | None = None

    def __post_init__(self):
        if self.router_aux_loss_coef is not None:
            number("router_aux_loss_coef", self.router_aux_loss_coef, low=0.0)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path must be a checkpoint directory; got {self.path!r}")
        _optional_str("tokenizer", self.tokenizer)
        choice("backend", self.backend, BACKENDS)
        choice("recompute", self.recompute, RECOMPUTE)
        if self.fp8 is False:  # YAML 1.1 reads a bare ``off`` as false
            object.__setattr__(self, "fp8", "off")
        choice("fp8", self.fp8, FP8_FORMATS)
        choice("fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        integer("fp8_margin", self.fp8_margin, low=0)
        integer("fp8_amax_history_len", self.fp8_amax_history_len, low=1)
        choice("fp8_amax_compute_algo", self.fp8_amax_compute_algo, FP8_AMAX_ALGOS)
        if self.fp8 != "off" and self.backend != "te":
            raise ValueError(f"fp8={self.fp8!r} needs backend 'te' (Transformer Engine's fp8 "
                             f"GEMMs); got backend {self.backend!r}")

    def megatron_overrides(self) -> dict[str, Any]:
        """TransformerConfig fields for ``recompute`` and ``fp8`` (passed to
        ``models.load_hf_model``)."""
        fields: dict[str, Any] = {}
        if self.recompute == "selective":
            fields = {"recompute_granularity": "selective"}
        if self.recompute == "full":
            fields = {"recompute_granularity": "full", "recompute_method": "uniform",
                      "recompute_num_layers": 1}
        if self.fp8 != "off":
            fields.update(fp8=self.fp8, fp8_recipe=self.fp8_recipe, fp8_margin=self.fp8_margin,
                          fp8_amax_history_len=self.fp8_amax_history_len,
                          fp8_amax_compute_algo=self.fp8_amax_compute_algo)
        if self.router_aux_loss_coef is not None:
            fields["moe_aux_loss_coeff"] = float(self.router_aux_loss_coef)
        return fields


@dataclass(frozen=True)
class ParallelConfig:
    """Model-parallel layout; ``data`` None means world_size / (tensor * pipeline * context).
    Checked against the world size at start. ``context``: context-parallel size (docs/numerics.md §9; each
    sequence split in 2 x context chunks over as many ranks, per-response statistics exact).
    ``sequence_parallel``: megatron's sequence parallelism inside tensor parallelism (needs
    ``tensor`` > 1): norms and residuals hold 1/tensor of each packed row's tokens, which is padded
    to a multiple of ``tensor`` by a filler that enters no loss or metric (actor.packing).
    ``timeout_minutes``: the process group's collective timeout (NCCL's watchdog; torch's
    default is 10); ``rank_zero_timeout_minutes``: how long the other ranks wait
    for work done by rank 0 alone (rollout, rewards, weight pushes: ``trainer.rank_zero``), on a
    CPU group of its own, so no NCCL collective is left pending for a whole rollout.
    ``expert``: expert-parallel size of a mixture-of-experts model (its experts split over that
    many ranks of the data x tensor x context ranks of a pipeline stage, tokens exchanged by
    megatron's alltoall dispatcher); ``expert_tensor``: the experts' own tensor-parallel size
    (None: ``tensor``, as in megatron). ``expert_tensor x expert x pipeline`` must divide the
    world size; the model's expert counts are checked when it is built."""

    tensor: int = 1
    pipeline: int = 1
    context: int = 1
    sequence_parallel: bool = False
    data: int | None = None
    timeout_minutes: float = 30.0
    rank_zero_timeout_minutes: float = 720.0
    expert: int = 1
    expert_tensor: int | None = None

    def __post_init__(self):
        integer("tensor", self.tensor, low=1)
        integer("pipeline", self.pipeline, low=1)
        integer("context", self.context, low=1)
        integer("expert", self.expert, low=1)
        if self.expert_tensor is not None:
            integer("expert_tensor", self.expert_tensor, low=1)
        boolean("sequence_parallel", self.sequence_parallel)
        if self.sequence_parallel and self.tensor == 1:
            raise ValueError("sequence_parallel=true needs tensor parallelism: parallel.tensor is "
                             "1, set it > 1 or sequence_parallel to false")
        if self.data is not None:
            integer("data", self.data, low=1)
        number("timeout_minutes", self.timeout_minutes, low=0.0, low_open=True)
        number("rank_zero_timeout_minutes", self.rank_zero_timeout_minutes, low=0.0,
               low_open=True)

    def data_size(self, world_size: int) -> int:
        """The data-parallel size for ``world_size`` processes; raises when the layout does not fit."""
        model = self.tensor * self.pipeline * self.context
        data = self.data if self.data is not None else world_size // model
        if model * data != world_size:
            raise ValueError(
                f"parallel.tensor ({self.tensor}) x parallel.pipeline ({self.pipeline}) x "
                f"parallel.context ({self.context}) x "
                f"parallel.data ({self.data if self.data is not None else 'auto'}) must equal the "
                f"world size {world_size}")
        experts = self.expert_tensor_size * self.expert * self.pipeline
        if world_size % experts:
            raise ValueError(
                f"parallel.expert_tensor ({self.expert_tensor_size}) x parallel.expert "
                f"({self.expert}) x parallel.pipeline ({self.pipeline}) must divide the world "
                f"size {world_size}")
        return data

    @property
    def expert_tensor_size(self) -> int:
        """The experts' tensor-parallel size: ``expert_tensor``, by default ``tensor``."""
        return self.tensor if self.expert_tensor is None else self.expert_tensor

    def megatron_overrides(self) -> dict[str, Any]:
        """TransformerConfig fields for ``sequence_parallel`` (passed to ``models.load_hf_model``)."""
        return {"sequence_parallel": True} if self.sequence_parallel else {}


@dataclass(frozen=True)
class SGLangConfig:
    """SGLang servers: attach to ``server_urls`` (and an optional ``router_url``) or, with
    ``launch``, start ``num_servers`` of ``tp_size`` GPUs each (``extra_args`` passed through).
    ``weight_sync``: ``tensor`` (colocated, CUDA IPC), ``distributed`` (NCCL broadcast to engines
    on their own GPUs) or ``disk`` (``disk_dir``). ``distributed`` needs the rendezvous of the
    weight-update group (trainer rank 0 + every server rank): ``master_address``, an address of
    the trainer's rank-0 host that the servers reach, and a free ``master_port`` there.

    Scale (``rollout.sglang_engine``): one ``/generate`` request per prompt, at most
    ``max_inflight`` in flight, each waiting ``request_timeout_s`` and tried ``request_attempts``
    times (a failed request alone is sent again, after a health check of its server that waits
    ``health_timeout_s``). Control calls (pause, continue, cache flush) wait
    ``control_timeout_s``; tensor and distributed weight updates and memory calls
    ``update_timeout_s``, disk updates ``disk_update_timeout_s``, all never retried blindly.
    Launched servers: ``startup_timeout_s`` to come up, at most ``max_restarts`` restarts in a run
    when one dies, ``mem_fraction_static`` (SGLang's weights + KV-cache share of each GPU;
    required for colocated launched servers, which share the GPU with the trainer);
    ``base_gpu_id``, the first GPU of this node they use (server i from ``base_gpu_id + i x
    tp_size``; None: 0 when colocated, else the GPUs after the trainer's, ``LOCAL_WORLD_SIZE``).

    ``weight_dtype``: the weights sent at each sync, ``bf16`` as trained or ``fp8`` (block-wise
    e4m3 with ``weight_scale_inv``, ``rollout.fp8_weights``; every sync mode). ``model_path``: the
    checkpoint the servers serve (launched here on it) and whose config and tokenizer files the
    disk sync copies; default ``model.path``. ``fp8`` needs it: a block-FP8 copy of the trainer's
    checkpoint (``python -m megatron_archer.rollout.fp8_weights MODEL OUT``), checked when the
    engine is built."""

    server_urls: tuple[str, ...] = ()
    router_url: str | None = None
    launch: bool = False
    num_servers: int = 1
    base_port: int = 30000
    tp_size: int = 1
    base_gpu_id: int | None = None
    extra_args: tuple[str, ...] = ()
    weight_sync: str = "tensor"
    bucket_bytes: int = 512 << 20
    disk_dir: str | None = None
    master_address: str | None = None
    master_port: int | None = None
    request_timeout_s: float = 3600.0
    request_attempts: int = 3
    max_inflight: int = 256
    health_timeout_s: float = 30.0
    control_timeout_s: float = 600.0
    update_timeout_s: float = 600.0
    disk_update_timeout_s: float = 3600.0
    startup_timeout_s: float = 900.0
    max_restarts: int = 4
    mem_fraction_static: float | None = None
    weight_dtype: str = "bf16"
    model_path: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "server_urls", tuple(self.server_urls))
        object.__setattr__(self, "extra_args", tuple(self.extra_args))
        _optional_str("router_url", self.router_url)
        boolean("launch", self.launch)
        integer("num_servers", self.num_servers, low=1)
        integer("base_port", self.base_port, low=1)
        if self.base_gpu_id is not None:
            integer("base_gpu_id", self.base_gpu_id, low=0)
        check_engine_settings(weight_sync=self.weight_sync, tp_size=self.tp_size,
                              bucket_bytes=self.bucket_bytes, max_inflight=self.max_inflight,
                              weight_dtype=self.weight_dtype)
        _optional_str("disk_dir", self.disk_dir)
        _optional_str("master_address", self.master_address)
        if self.master_port is not None:
            integer("master_port", self.master_port, low=1)
            if self.master_port > 65535:
                raise ValueError(f"master_port must be a TCP port <= 65535; got {self.master_port}")
        for name in ("request_timeout_s", "health_timeout_s", "control_timeout_s",
                     "update_timeout_s", "disk_update_timeout_s", "startup_timeout_s"):
            number(name, getattr(self, name), low=0.0, low_open=True)
        integer("request_attempts", self.request_attempts, low=1)
        integer("max_restarts", self.max_restarts, low=0)
        if self.mem_fraction_static is not None:
            number("mem_fraction_static", self.mem_fraction_static, low=0.0, high=1.0,
                   low_open=True, high_open=True)
            if "--mem-fraction-static" in self.extra_args:
                raise ValueError("mem_fraction_static is set and extra_args has "
                                 "--mem-fraction-static too: keep one")
        _optional_str("model_path", self.model_path)
        if self.weight_dtype == "fp8" and self.model_path is None:
            raise ValueError("model_path is required with weight_dtype 'fp8': the block-FP8 "
                             "checkpoint the servers serve (python -m "
                             "megatron_archer.rollout.fp8_weights MODEL OUT writes one)")
        if not self.launch and not self.server_urls:
            raise ValueError("server_urls must list at least one server unless launch is true")
        if self.weight_sync == "disk" and self.disk_dir is None:
            raise ValueError("weight_sync 'disk' needs disk_dir")
        if self.weight_sync == "distributed":
            for name in ("master_address", "master_port"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name} is required with weight_sync 'distributed' (the "
                                     "rendezvous of the NCCL weight-update group)")


@dataclass(frozen=True)
class RolloutConfig:
    """Generation: ``prompts_per_step`` groups of ``n`` responses each, at most ``max_new_tokens``.

    ``engine``: ``local`` (transformers, in the process of global rank 0) or ``sglang``.
    ``colocated``: the engine shares the actor's GPUs, so its memory is released during training
    and resumed for weight sync and generation; false for engines on their own GPUs or nodes.
    ``stop_token_ids`` are added to the tokenizer's EOS. ``dtype``: the local engine's weights;
    ``threads``: its torch threads on CPU (None: every core of its process, or half of them
    with ``async``, where training runs meanwhile).

    ``async`` (``async_`` in Python): one-step-asynchronous training (``trainer.async_rollout``):
    the rollout of step k + 1 runs while step k trains, so its samples are one weight version
    old; a group with a sample more than ``max_staleness`` versions behind the trainer is dropped
    and counted. Needs ``colocated: false`` (the engine keeps its memory while training runs).
    """

    engine: str = "local"
    prompts_per_step: int = 8
    n: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    colocated: bool = True
    dtype: str = "float32"
    sglang: SGLangConfig | None = None
    threads: int | None = None
    async_: bool = False
    max_staleness: int = 1

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        choice("engine", self.engine, ENGINES)
        integer("prompts_per_step", self.prompts_per_step, low=1)
        check_sampling(max_new_tokens=self.max_new_tokens, n=self.n,
                       temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        number("temperature", self.temperature, low=0.0, low_open=True)  # RL samples: no greedy
        if self.seed is not None:
            integer("seed", self.seed, low=0)
        boolean("colocated", self.colocated)
        choice("dtype", self.dtype, ENGINE_DTYPES)
        if self.threads is not None:
            integer("threads", self.threads, low=1)
        boolean("async", self.async_)
        integer("max_staleness", self.max_staleness, low=1)
        if self.async_ and self.colocated:
            raise ValueError("async needs colocated: false: a colocated engine gives its memory "
                             "to training, so it cannot generate meanwhile")
        if isinstance(self.sglang, Mapping):
            object.__setattr__(self, "sglang", from_dict(SGLangConfig, self.sglang, "sglang."))
        if self.engine == "sglang":
            instance("sglang", self.sglang, SGLangConfig)
            sg = self.sglang
            if self.colocated and sg.weight_sync == "distributed":
                raise ValueError("sglang.weight_sync 'distributed' needs colocated: false: its NCCL "
                                 "group joins trainer rank 0 and the servers, and NCCL refuses two "
                                 "of its ranks on one GPU; colocated servers take weight_sync "
                                 "'tensor'")
            if self.colocated and sg.launch and sg.mem_fraction_static is None \
                    and "--mem-fraction-static" not in sg.extra_args:
                raise ValueError("sglang.mem_fraction_static is required for colocated launched "
                                 "servers (they share each GPU with the trainer, which is loaded "
                                 "first); e.g. 0.6")

    def sampling_params(self, stop_token_ids: Sequence[int], seed: int | None) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, n=self.n, temperature=self.temperature,
            top_p=self.top_p, top_k=self.top_k,
            stop_token_ids=tuple(dict.fromkeys((*stop_token_ids, *self.stop_token_ids))),
            seed=seed)


@dataclass(frozen=True)
class RewardConfig:
    """Reward functions (``megatron_archer.rewards.load_reward_fn`` specs): ``function`` for every
    prompt, or the one ``by_data_source`` names for the prompt's ``data_source``; scored by
    ``workers`` threads. ``sandbox``: where the code reward runs programs, ``bwrap`` (kernel
    namespaces, a fresh set per program built by a warm server per worker; refuses to run when
    bubblewrap cannot), ``bwrap_per_run`` (the same sandbox, bubblewrap launched per program) or
    ``in_process`` (the weaker Python-level guard, with a warning at start)."""

    function: str = "math"
    by_data_source: Mapping[str, str] = field(default_factory=dict)
    workers: int = 4
    sandbox: str = "bwrap"

    def __post_init__(self):
        if not isinstance(self.function, str) or not self.function:
            raise ValueError(f"function must be a reward name or dotted path; got {self.function!r}")
        instance("by_data_source", self.by_data_source, Mapping)
        integer("workers", self.workers, low=1)
        choice("sandbox", self.sandbox, SANDBOXES)


@dataclass(frozen=True)
class TrainConfig:
    """``steps`` RL steps; each step trains on ``prompts_per_step`` groups in
    mini-batches of ``mini_batch_size`` prompts (prompts_per_step / mini_batch_size updates),
    ``epochs`` passes over the batch (Archer: 3). ``seed`` seeds sampling and the engine.
    ``on_nonfinite``: what a NaN or inf in the logits, log-probs, loss or gradient norm of an
    update does on any rank: ``skip`` the update on every rank (weights and optimizer state
    untouched; counted in ``actor/skipped_updates`` and ``actor/nonfinite/<tensor>``) or
    ``error`` (stop on every rank, naming the tensor and the rank that found it)."""

    steps: int = 1
    mini_batch_size: int = 8
    epochs: int = 1
    seed: int = 0
    on_nonfinite: str = "skip"

    def __post_init__(self):
        integer("steps", self.steps, low=1)
        integer("mini_batch_size", self.mini_batch_size, low=1)
        integer("epochs", self.epochs, low=1)
        integer("seed", self.seed, low=0)
        choice("on_nonfinite", self.on_nonfinite, NONFINITE_POLICIES)


@dataclass(frozen=True)
class LoggingConfig:
    """Run directory (resolved config, metrics.jsonl, TensorBoard events); ``progress`` bars.
    A new run refuses a directory that holds an earlier run (``trainer.run_dir``) unless
    ``overwrite`` (deletes that run's config, metrics, events and checkpoints)."""

    dir: str = "runs/experiment"
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool = True
    overwrite: bool = False

    def __post_init__(self):
        if not isinstance(self.dir, str) or not self.dir:
            raise ValueError(f"dir must be a directory path; got {self.dir!r}")
        for name in ("tensorboard", "jsonl", "progress", "overwrite"):
            boolean(name, getattr(self, name))


@dataclass(frozen=True)
class CheckpointConfig:
    """Every ``interval`` steps (0: never) and at the last step a checkpoint goes to
    ``<dir>/checkpoints/step_<n>`` (``dir`` None: ``logging.dir``); the ``keep_last`` newest are
    kept. ``resume``: continue from the newest complete checkpoint there; incomplete ones (no
    manifest: a save that did not finish) are ignored, and with none the run starts at step 1
    (a warning says so). A resumed run appends to the run directory's logs from the next step
    and saves its resolved config as ``config.resumed_step_<k>.yaml`` next to ``config.yaml``.
    A checkpoint that cannot be read (a truncated file) is skipped, said so, for the next newest.
    Each checkpoint records fingerprints of ``model.path``, ``model.tokenizer`` and ``data.path``
    (``trainer.sources``); a resume whose sources differ is refused unless
    ``allow_source_change`` (then it continues the checkpoint's weights, with the new model as
    the reference policy and the new prompt set, and says what changed)."""

    dir: str | None = None
    interval: int = 0
    keep_last: int = 2
    resume: bool = False
    allow_source_change: bool = False

    def __post_init__(self):
        _optional_str("dir", self.dir)
        boolean("resume", self.resume)
        boolean("allow_source_change", self.allow_source_change)
        integer("interval", self.interval, low=0)
        integer("keep_last", self.keep_last, low=1)


@dataclass(frozen=True)
class ExperimentConfig:
    """A whole run; see the module docstring for the sections."""

    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    actor: ActorConfig = field(default_factory=ActorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self):
        if self.model.backend == "te" and self.actor.params_dtype == "float32":
            raise ValueError(
                "model.backend='te' with actor.params_dtype='float32': Transformer Engine has no "
                "attention backend for packed (thd) batches in float32 (flash and fused attention "
                "need bf16/fp16, unfused attention rejects thd); use actor.params_dtype="
                "'bfloat16' or model.backend='local' ('auto' picks local for float32)")
        if self.actor.routing_replay == "old" and self.algorithm.old_logprobs == "rollout" \
                and not self.algorithm.selection.uses_entropy:
            raise ValueError(
                "actor.routing_replay='old' with algorithm.old_logprobs='rollout' and a selection "
                "that needs no entropy: no old-policy forward runs, so no routing is recorded to "
                "replay; use algorithm.old_logprobs='recompute' or actor.routing_replay='none'")
        if self.parallel.sequence_parallel and self.actor.logprob_impl == "fused":
            raise ValueError(
                "actor.logprob_impl='fused' with parallel.sequence_parallel=true: the fused LM-head "
                "op takes the whole row's hidden states, which sequence parallelism shards; use "
                "actor.logprob_impl='logits'")
        if self.rollout.prompts_per_step % self.train.mini_batch_size:
            raise ValueError(
                f"train.mini_batch_size ({self.train.mini_batch_size}) must divide "
                f"rollout.prompts_per_step ({self.rollout.prompts_per_step})")
        if self.actor.temperature != self.rollout.temperature:
            raise ValueError(
                f"actor.temperature ({self.actor.temperature}) must equal rollout.temperature "
                f"({self.rollout.temperature}): log-probs are of softmax(z / T) at the sampling T")
        longest = self.data.max_prompt_length + self.rollout.max_new_tokens
        if longest > self.actor.max_tokens_per_micro_batch:
            raise ValueError(
                f"actor.max_tokens_per_micro_batch ({self.actor.max_tokens_per_micro_batch}) must "
                f"hold the longest sequence, data.max_prompt_length + rollout.max_new_tokens "
                f"({longest})")
        overlong = self.algorithm.overlong
        if overlong.enabled and overlong.max_length > self.rollout.max_new_tokens:
            raise ValueError(
                f"algorithm.overlong.max_length ({overlong.max_length}) must be <= "
                f"rollout.max_new_tokens ({self.rollout.max_new_tokens})")

    @property
    def checkpoint_root(self) -> Path:
        return Path(self.checkpoint.dir or self.logging.dir)


def parse_overrides(overrides: Sequence[str]) -> dict:
    """``["a.b.c=value", ...]`` -> nested dict; each value is parsed as YAML (``1e-6``, ``[1, 2]``,
    ``null``, ``true``)."""
    nested: dict = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ValueError(f"override {item!r} must look like section.field=value")
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r} conflicts with an earlier override of {part}")
        node[leaf] = _yaml(text) if text else None
    return nested


def config_from_mapping(data: Any) -> ExperimentConfig:
    """An ExperimentConfig from plain dicts; errors name the dotted field."""
    if not isinstance(data, Mapping):
        raise ValueError(f"config must be a mapping of sections; got {data!r}")
    data = dict(data)
    missing = [name for name in ("model", "data") if name not in data]
    if missing:
        raise ValueError(f"{missing[0]} is required (a section); sections: "
                         f"{', '.join(f.name for f in dataclasses.fields(ExperimentConfig))}")
    if "algorithm" in data:
        try:
            data["algorithm"] = config_from_dict(data["algorithm"] or {})
        except ValueError as error:
            raise ValueError(f"algorithm.{error}") from None
    return from_dict(ExperimentConfig, data)


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """The experiment of the YAML file ``path`` with ``overrides`` (``a.b.c=value``) applied."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    data = read_yaml_file(path) or {}
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: the top level must be a mapping of sections")
    return config_from_mapping(merge(data, parse_overrides(overrides)))


def resolved_yaml(config: ExperimentConfig) -> str:
    """The config with every default and preset filled in, as YAML that ``load_config`` reads back."""
    def plain(value):
        if isinstance(value, Mapping):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        return value
    return yaml.safe_dump(plain(to_plain(config)), sort_keys=False)
