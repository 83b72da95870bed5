"""The RL loop: per step, rollout (rank 0) -> broadcast -> old/reference log-probs -> mini-batch
updates -> weight sync to the engine -> metrics -> checkpoint.

Placement. The rollout engine, the prompt sampler and the reward functions live on global rank
0; the generated groups stay there, and each data-parallel rank receives only its share of the
step's mini-batches as flat tensors (``rollout_share``; ``rollout/share_bytes`` in the metrics).
Colocated mode (``rollout.colocated``): the engine's memory is released after generation and
resumed before the weight sync, so training has the GPUs to itself; the reference model is
offloaded after use. Disaggregated mode: the engine keeps its memory (its own GPUs or nodes).

Weight sync: every rank walks ``models.hf_weight_buckets`` (it gathers tensor-parallel shards
and pipeline stages collectively); rank 0 hands the buckets to ``engine.update_weights`` with
version = the step number. Any rank-0 failure (engine, rewards, data) is raised on every rank
together (``rank_zero``), naming the engine and step for engine failures.

Asynchronous (``rollout.async``): rank 0 generates the next step's rollout in a worker thread
while this step trains (``async_rollout``: the order, the versions, the stale-sample drop, the
in-flight rollout in checkpoints); the other ranks see no difference.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_archer.actor import Actor, ReferenceModel
from megatron_archer.actor.routing import replay_fields
from megatron_archer.data import PromptSampler, load_prompt_set
from megatron_archer.models import (
    hf_weight_buckets,
    load_hf_model,
    require_hf_model_dir,
    require_tokenizer_dir,
)
from megatron_archer.models.dist_checkpoint import require_save_dependencies
from megatron_archer.rollout import RolloutEngine
from megatron_archer.rollout.fp8_weights import fp8_weight_buckets
from megatron_archer.rollout.weight_buckets import device_key, gather_device_handles
from megatron_archer.trainer import run_dir
from megatron_archer.trainer.async_rollout import RolloutsAhead, drop_stale
from megatron_archer.trainer.config import ExperimentConfig, resolved_yaml
from megatron_archer.trainer.engines import build_engine
from megatron_archer.trainer.metrics_logger import MetricsLogger, timed
from megatron_archer.trainer.rank_zero import control_barrier, control_group, on_rank_zero
from megatron_archer.trainer.reward_scoring import RewardScorer
from megatron_archer.trainer.rollout_phase import collect_rollouts
from megatron_archer.trainer.rollout_share import scatter_shares
from megatron_archer.trainer.sources import changed_sources, run_sources
from megatron_archer.trainer.step import (
    build_shares,
    compute_old_and_reference,
    needs_reference,
    rollout_batch_metrics,
    train_on_mini_batches,
)
from megatron_archer.trainer.stop_signals import StopSignals

logger = logging.getLogger(__name__)
RESOLVED_CONFIG = "config.yaml"


def load_tokenizer(config: ExperimentConfig):
    """The run's tokenizer (``model.tokenizer``, default ``model.path``); a directory without
    tokenizer files is an error naming the field."""
    from transformers import AutoTokenizer

    field = "model.tokenizer" if config.model.tokenizer else "model.path"
    return AutoTokenizer.from_pretrained(
        require_tokenizer_dir(config.model.tokenizer or config.model.path, field))


class Trainer:
    """One run of ``config``; needs torch.distributed and megatron's parallel state initialised
    (``launch.run_training`` does both). ``engine`` replaces the configured one (tests)."""

    def __init__(self, config: ExperimentConfig, engine: RolloutEngine | None = None):
        self.config = config
        if config.model.recompute != "none" and not torch.cuda.is_available():
            raise ValueError(f"model.recompute={config.model.recompute!r} needs CUDA (megatron's "
                             f"activation checkpointing saves CUDA RNG states); use 'none' on CPU")
        require_hf_model_dir(config.model.path, "model.path")
        self.tokenizer = load_tokenizer(config)
        self.rank0 = dist.get_rank() == 0
        self.run_dir = Path(config.logging.dir)
        self.lock: run_dir.RunLock | None = None
        self.ahead: RolloutsAhead | None = None
        self.engine, self._owns_engine = None, False
        on_rank_zero(self._claim_run_dir, share=False)  # before any work: an earlier run is kept
        try:
            self._build(engine)
        except BaseException:
            self.close()  # the lock too: a later run in this process may take the directory
            raise

    def _build(self, engine: RolloutEngine | None) -> None:
        config = self.config
        require_save_dependencies()  # every run saves at its last step
        # rank 0's data and rewards; a failure there is raised on every rank
        on_rank_zero(self._setup_rank_zero, share=False)
        self.sources = on_rank_zero(lambda: run_sources(
            config.model.path, config.model.tokenizer, str(config.data.path)))
        dtype = config.actor.torch_params_dtype
        # the reference gets the actor's numerics (fp8, sequence parallelism), so KL starts at 0
        overrides = {**config.model.megatron_overrides(), **config.parallel.megatron_overrides(),
                     **(replay_fields() if config.actor.routing_replay != "none" else {})}
        loaded = load_hf_model(config.model.path, backend=config.model.backend, params_dtype=dtype,
                               config_overrides=overrides)
        for field, value in (("model.router_aux_loss_coef", config.model.router_aux_loss_coef),
                             ("actor.routing_replay", config.actor.routing_replay)):
            if value not in (None, "none") and not loaded.spec.is_moe:
                raise ValueError(f"{field}={value!r}, but {config.model.path} is a dense model: "
                                 f"it has no router")
        self.model = loaded
        self.actor = Actor(loaded.model, loaded.spec, config.actor, loaded.backend)
        self.reference = None
        if needs_reference(config.algorithm):
            ref = load_hf_model(config.model.path, backend=config.model.backend, params_dtype=dtype,
                                config_overrides=overrides)
            self.reference = ReferenceModel(ref.model, ref.spec, config.actor, ref.backend)
        self.step = 0
        self.skipped_steps = 0
        self._start_engine(engine)
        on_rank_zero(self._start_rollouts_ahead, share=False)
        if config.checkpoint.resume:
            self._resume()
        on_rank_zero(self._open_run_dir, share=False)

    def _claim_run_dir(self) -> None:
        """Rank 0: lock the run directory for this run, then check it holds no earlier run."""
        config = self.config
        self.lock = run_dir.RunLock(self.run_dir)
        try:
            deleted = run_dir.claim(self.run_dir, config.checkpoint_root,
                                    resume=config.checkpoint.resume,
                                    overwrite=config.logging.overwrite)
        except BaseException:
            self.lock.release()
            raise
        if deleted:
            print(f"[megatron-archer] logging.overwrite: deleted the earlier run's "
                  f"{', '.join(str(p) for p in deleted)}", flush=True)

    def _setup_rank_zero(self) -> None:
        config = self.config
        self.prompt_set = load_prompt_set(config.data, self.tokenizer)
        self.sampler = PromptSampler(len(self.prompt_set), config.rollout.prompts_per_step,
                                     seed=config.data.seed, shuffle=config.data.shuffle)
        self.scorer = RewardScorer(config.reward, self.tokenizer)
        stop = [] if self.tokenizer.eos_token_id is None else [self.tokenizer.eos_token_id]
        seed = config.rollout.seed if config.rollout.seed is not None else config.train.seed
        self.params = config.rollout.sampling_params(stop, seed)

    def _start_engine(self, engine: RolloutEngine | None) -> None:
        """Rank 0's engine, once every rank has loaded its actor: colocated servers then size
        their memory (``rollout.sglang.mem_fraction_static``) around the trainer's. A server
        restarted mid-rollout can be given the weights by rank 0 alone when the model is not
        split (tensor = pipeline = 1). ``engine`` (tests) is used as given, and not stopped."""
        self.engine, self._owns_engine = engine, engine is None
        if self.config.rollout.colocated:
            control_barrier()
        parallel = self.config.parallel
        source = None
        if parallel.tensor == parallel.pipeline == 1:
            def source():
                return hf_weight_buckets(self.model.model, self.model.spec, self.model.backend)

        def start():
            if self.engine is None:
                self.engine = build_engine(self.config, weights_source=source)

        on_rank_zero(start, share=False)

    def _start_rollouts_ahead(self) -> None:
        """Rank 0, ``rollout.async``: the worker that generates one step ahead."""
        config = self.config
        if not config.rollout.async_:
            return

        def collect(step: int):
            return collect_rollouts(self.engine, self.prompt_set, self.sampler, self.params,
                                    self.scorer, config.algorithm, step, False)

        self.ahead = RolloutsAhead(collect, not self.engine.updates_during_generation)

    def close(self) -> None:
        """Stop the rollout worker, then the servers the engine launched (rank 0; attached
        servers keep running)."""
        if self.ahead is not None:
            self.ahead.close()
        if self.rank0 and self._owns_engine and self.engine is not None:
            self.engine.shutdown()
        if self.lock is not None:
            self.lock.release()

    def _open_run_dir(self) -> None:
        """Rank 0, once the start step is known: the resolved config (``config.yaml`` for a run
        from step 0; a resumed run adds ``config.resumed_step_<k>.yaml``, keeping the first) and
        the metrics logger, which drops records of steps after the start step (a crashed run's
        steps that will be run again)."""
        config = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        name = f"config.resumed_step_{self.step}.yaml" if self.step else RESOLVED_CONFIG
        (self.run_dir / name).write_text(resolved_yaml(config))
        self.logger = MetricsLogger(self.run_dir, tensorboard=config.logging.tensorboard,
                                    jsonl=config.logging.jsonl, total_steps=config.train.steps,
                                    start_step=self.step)

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """The steps up to ``train.steps``. SIGINT or SIGTERM on any rank stops every rank after
        the step in progress, once its checkpoint is saved: SystemExit(128 + signal number)."""
        stopped = 0
        try:
            with StopSignals() as signals:
                while self.step < self.config.train.steps:
                    self.step += 1
                    scalars, histograms = self.train_step(self.step)
                    if self.rank0:
                        self.logger.log(self.step, scalars, histograms)
                    saved = self.maybe_checkpoint()
                    stopped = signals.agreed(control_group())
                    if stopped:
                        if not saved:
                            self.save_checkpoint()
                        break
        finally:
            if self.rank0:
                self.logger.close()
            self.close()
        if self.rank0:
            name = f"interrupted by {signal.Signals(stopped).name}: " if stopped else ""
            print(f"[megatron-archer] {name}{self.where()}", flush=True)
        if stopped:
            raise SystemExit(128 + stopped)

    def where(self) -> str:
        """One line: the step reached and where its metrics, events and checkpoints are."""
        from megatron_archer.trainer.checkpoint import latest_checkpoint

        logging, run = self.config.logging, self.run_dir
        parts = [f"metrics {run / 'metrics.jsonl'}" if logging.jsonl else "",
                 f"TensorBoard {run / 'tensorboard'}" if logging.tensorboard else "",
                 f"last checkpoint {latest_checkpoint(self.config.checkpoint_root) or 'none'}"]
        return f"step {self.step}: " + "; ".join(p for p in parts if p)

    def train_step(self, step: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """One RL step on every rank; rank 0's scalars and histograms (others: their actor and
        log-prob metrics only)."""
        config, times = self.config, {}
        start = time.perf_counter()
        progress = config.logging.progress and self.rank0

        def rollout():
            if self.ahead is not None:
                return self._rollout_ahead(step)
            batch = collect_rollouts(self.engine, self.prompt_set, self.sampler, self.params,
                                     self.scorer, config.algorithm, step, progress)
            if config.rollout.colocated:
                self.engine.release_memory()
            return batch, {}

        dp = parallel_state.get_data_parallel_world_size()

        def rollout_and_shares():
            batch, stale = rollout()
            return batch, stale, build_shares(batch.groups, config.algorithm,
                                              config.train.mini_batch_size, dp)

        batch, stale, shares = on_rank_zero(rollout_and_shares, share=False) or (None,) * 3
        mini_batches, moved = scatter_shares(shares)
        scalars = {**batch.metrics(), **stale} if self.rank0 else {}
        scalars["rollout/share_bytes"] = float(moved)
        if not mini_batches:  # every rank gets none together
            self.skipped_steps += 1
            if self.rank0:
                logger.warning("step %d skipped: no group with reward signal after %d rounds",
                               step, batch.rounds)
            self._sync_weights(step)  # resumes a colocated engine; the version stays in step
            return {**scalars, "step/skipped": 1.0,
                    "step/skipped_total": float(self.skipped_steps)}, {}
        with timed(times, "time/logprob"):
            unusable = compute_old_and_reference(self.actor, self.reference, mini_batches,
                                                 offload_reference=config.rollout.colocated,
                                                 algorithm=config.algorithm, defer_first=True)
        with timed(times, "time/train"):
            train_metrics = train_on_mini_batches(
                self.actor, mini_batches, config.algorithm, config.train.epochs, progress,
                on_nonfinite=config.train.on_nonfinite, unusable=unusable,
                salts=(config.train.seed, step))
        # after training: the first mini-batch's old-policy results may come from its update
        batch_metrics, entropies = rollout_batch_metrics(mini_batches, unusable, config.algorithm)
        if config.rollout.async_:  # the rollout in flight first, timed apart from the sync
            on_rank_zero(lambda: self.ahead.before_update(), share=False)
        with timed(times, "time/weight_sync"):
            self._sync_weights(step)
        elapsed = time.perf_counter() - start
        if self.ahead is not None:
            times["time/rollout_wait"] = self.ahead.pop_wait()
        if not self.rank0:
            return {**batch_metrics, **train_metrics}, {}
        tokens = sum(len(g.prompt.input_ids) + len(s.token_ids)
                     for g in batch.groups for s in g.samples)
        scalars.update(batch_metrics)
        scalars.update(train_metrics)
        scalars.update(times)
        scalars.update({"time/step": elapsed, "perf/tokens_per_s": tokens / elapsed,
                        "step/skipped": 0.0, "step/skipped_total": float(self.skipped_steps)})
        rewards = torch.tensor([r for g in batch.all_groups for r in g.rewards])
        lengths = torch.tensor([len(s.token_ids) for g in batch.all_groups for s in g.samples])
        return scalars, {"entropy/tokens": entropies, "reward/values": rewards,
                         "response/lengths": lengths}

    def _rollout_ahead(self, step: int):
        """Rank 0, async: rollout ``step`` without its stale groups, and the next one started
        (after the last step only when it saves a checkpoint: ``async_rollout``)."""
        batch = self.ahead.take(step)
        if step < self.config.train.steps or self.config.checkpoint.interval:
            self.ahead.submit(step + 1)
        return drop_stale(batch, step - 1, self.config.rollout.max_staleness)

    def _sync_weights(self, version: int) -> None:
        """The actor's weights into the engine (module docstring); raises on every rank.
        Colocated: every rank first returns its allocator's cached blocks to the driver and
        waits for the others, then the engine takes back its weights' memory, loads the update,
        and only then its KV cache (and CUDA graphs); a resume without a release (a restored
        checkpoint) is a no-op in the engine."""
        colocated = self.config.rollout.colocated
        if colocated:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            control_barrier()
            on_rank_zero(lambda: self.engine.resume_memory(["weights"]), share=False)
        if self.config.rollout.async_:
            on_rank_zero(lambda: self.ahead.before_update(), share=False)
        buckets = self._weight_buckets()

        def push():
            try:
                self.engine.update_weights(buckets, version)
            finally:
                for _ in buckets:  # the other ranks are in the same collectives
                    pass

        if not self.rank0:
            for _ in buckets:
                pass
        on_rank_zero(push, share=False)
        if colocated:
            on_rank_zero(lambda: self.engine.resume_memory(["cache"]), share=False)

    def _weight_buckets(self):
        """``hf_weight_buckets`` of the actor (collective), at the engine's bucket size; for
        colocated SGLang with tensor sync, each bucket serialised on every rank's own GPU and
        gathered to rank 0 (``DeviceHandles``), so each server loads from the GPU it shares."""
        rollout = self.config.rollout
        sg = rollout.sglang if rollout.engine == "sglang" else None
        size = {} if sg is None else {"bucket_bytes": sg.bucket_bytes}
        buckets = hf_weight_buckets(self.model.model, self.model.spec, self.model.backend, **size)
        if sg is None or not rollout.colocated or sg.weight_sync != "tensor":
            return buckets
        if sg.weight_dtype == "fp8":  # quantised where the tensors are, before serialising
            buckets = fp8_weight_buckets(buckets)
        device = torch.cuda.current_device() if torch.cuda.is_available() else \
            int(os.environ.get("LOCAL_RANK", dist.get_rank()))
        return gather_device_handles(buckets, device_key(device), control_group())

    # ------------------------------------------------------------------ checkpoints
    def maybe_checkpoint(self) -> bool:
        """Every ``checkpoint.interval`` steps and at the last step (``trainer.checkpoint``);
        whether it saved."""
        interval = self.config.checkpoint.interval
        if not interval or (self.step % interval and self.step != self.config.train.steps):
            return False
        self.save_checkpoint()
        return True

    def save_checkpoint(self) -> None:
        """Every rank: the checkpoint of the step reached."""
        from megatron_archer.trainer.checkpoint import save_checkpoint

        extra, tensors = {"skipped_steps": self.skipped_steps}, {}
        if self.config.rollout.async_:  # first: it waits for the draws of the rollout in flight
            extra["rollout_ahead"], tensors = on_rank_zero(lambda: self.ahead.state_dict(),
                                                           share=False) or (None, {})
        sampler = on_rank_zero(lambda: self.sampler.state_dict())
        extra["sources"] = self.sources
        save_checkpoint(self.config.checkpoint_root, self.step, self.actor,
                        hf_source=self.config.model.path, sampler_state=sampler,
                        extra_state=extra, extra_tensors=tensors,
                        keep_last=self.config.checkpoint.keep_last, group=control_group())

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint under ``checkpoint_root`` (incomplete ones
        are ignored; none: start at step 1): actor, optimiser, RNG, sampler position, skipped
        steps; then the engine gets the restored weights. The reference model stays the initial
        policy (``model.path``). Rollouts are reproducible across the restart: each generation
        round's seed is a function of (seed, step, round) (``rollout_phase``); async, the
        recorded rollout in flight is put back (``async_rollout``)."""
        from megatron_archer.trainer.checkpoint import (
            CheckpointNotUsable,
            checkpoint_step,
            load_checkpoint,
            load_extra_tensors,
            scan_checkpoints,
        )

        root = self.config.checkpoint_root
        complete, unusable = scan_checkpoints(root)
        if self.rank0:
            for line in unusable:
                print(f"[megatron-archer] resume: skipped {line}", flush=True)
        if not complete:
            if self.rank0:
                print(f"[megatron-archer] checkpoint.resume is on but "
                      f"{root / 'checkpoints'} holds no complete "
                      f"checkpoint: starting at step 1", flush=True)
            return
        if checkpoint_step(complete[-1]) > self.config.train.steps:
            raise ValueError(f"train.steps={self.config.train.steps} is below the step of the "
                             f"checkpoint to resume, {complete[-1]}: raise train.steps to "
                             "continue it")
        for path in reversed(complete):  # newest first; a damaged one falls back to the next
            try:
                state = load_checkpoint(path, self.actor, group=control_group())
                break
            except CheckpointNotUsable as error:
                if self.rank0:
                    print(f"[megatron-archer] resume: skipped {path}: {error}", flush=True)
        else:
            raise CheckpointNotUsable(f"checkpoint.resume: no checkpoint under {root / 'checkpoints'}"
                                      " could be loaded (each is named above with its problem)")
        self._check_sources(state)
        self.step = state.step
        self.skipped_steps = int(state.extra_state.get("skipped_steps", 0))
        on_rank_zero(lambda: self.sampler.load_state_dict(state.sampler_state), share=False)
        if self.config.rollout.async_:
            on_rank_zero(lambda: self.ahead.load_state_dict(
                state.extra_state.get("rollout_ahead"), self.prompt_set,
                load_extra_tensors(state.path)), share=False)
        self._sync_weights(self.step)
        if self.rank0:
            print(f"[megatron-archer] resumed from {path} at step {self.step}", flush=True)

    def _check_sources(self, state) -> None:
        """Refuse a resume whose model or data differ from the checkpoint's (``trainer.sources``)
        unless ``checkpoint.allow_source_change``; say what changed either way."""
        saved = state.extra_state.get("sources")
        if saved is None:
            if self.rank0:
                print(f"[megatron-archer] resume: {state.path} records no sources (an earlier "
                      "version saved it): model and data not checked", flush=True)
            return
        changes = changed_sources(saved, self.sources)
        if changes and not self.config.checkpoint.allow_source_change:
            raise ValueError(
                f"checkpoint.resume: {state.path} was trained from other sources: "
                f"{'; '.join(changes)}. Resume with the model and data it was trained from, or "
                "set checkpoint.allow_source_change=true to continue its weights on the new ones")
        if self.rank0:
            for line in changes:
                print(f"[megatron-archer] resume: checkpoint.allow_source_change: {line}",
                      flush=True)
