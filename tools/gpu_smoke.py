"""One command that proves the CUDA path on one GPU (an H200: under 8 minutes), or checks on a CPU
machine that it is ready to (``--dry-run``).

    python tools/gpu_smoke.py [--out DIR] [--stages abc]     # on the GPU machine
    python tools/gpu_smoke.py --dry-run                       # anywhere; CI runs it

Stages, each check reported pass/fail with its traceback, the next one run after a failure:

(a) the fused LM-head op (Triton) against its torch path in bf16, forward and backward, and its
    time against the bare LM-head matmul (target: forward within 1.25x) at 8192 tokens x
    151,936 vocabulary, hidden 4096;
(b) the actor under ``torchrun --nproc-per-node 1`` with ``distributed.init_process_group``
    (NCCL + gloo): packed log-probs and entropy against transformers (logits and fused paths),
    a bf16 train step with megatron's DistributedDataParallel and distributed optimizer, and a
    model checkpoint saved and loaded;
(c) ``megatron-archer train`` for 2 steps on the quick-start model architecture with the local
    engine on CUDA, then ``checkpoint.resume=true`` to step 3;
(d) when Transformer Engine is importable: under torchrun, one bf16 train step of the actor on
    the TE layer spec with fp8 on (``hybrid``, delayed scaling), its TE linears running fp8;
(e) when SGLang is importable: a launched SGLang server on this GPU takes tensor weight updates
    (CUDA IPC handles, ``weight_sync: tensor``): model B's weights change its greedy tokens, and
    model A's back restore them.

Stages (a)-(c) need neither Transformer Engine nor SGLang (the local layer spec, the local
engine); (d) and (e) report that they were skipped, and why, when theirs is not importable. What
the GPU machine lacks travels as wheels: ``tools/gpu_wheels.txt``, downloaded by
``tools/gpu_wheels.sh``. Results go to ``--out`` (default ``$OUT`` or ``runs/gpu_smoke``) as
``gpu_smoke.json`` (with device, date and versions for benchmarks/RESULTS.md) beside the stage
logs, 5 files; the exit status is 0 only when every check passed (or the dry run did).

The dry run checks the wheels list, imports every module the stages use, loads stage (c)'s
config, runs stage (a)'s inputs through the op's torch path on CPU at a small size, runs stage
(b)'s torchrun worker on CPU (gloo, the actor's CPU path) with only the CUDA-path assertions left
out, runs stage (d)'s torchrun worker up to its call that builds the TE model (which must refuse
with its no-CUDA error), and stage (e) up to the launch (models, command, the updates' buckets
serialised), whether or not TE and SGLang are installed here, so a renamed import, a bad path or a
bad config fails CI.

On the GPU machine, after ``tools/gpu_wheels.sh`` here, in one call that carries ``.whl``:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
    PYTHONUNBUFFERED=1 timeout 560 python3 tools/gpu_smoke.py --out "$OUT"
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

WHEELS = ROOT / "tools" / "gpu_wheels.txt"
QUICKSTART_CONFIG = ROOT / "examples" / "quickstart" / "archer.yaml"
# modules the stages import; the dry run imports each
MODULES = ("megatron.core", "math_verify", "transformers", "megatron_archer.actor",
           "megatron_archer.models", "megatron_archer.ops", "megatron_archer.trainer",
           "megatron_archer.cli", "megatron_archer.quickstart.build", "tests.actor.common",
           "tests.models.checkpoints")
TOKENS, VOCAB, HIDDEN = 8192, 151_936, 4096
FUSED_FORWARD_TARGET = 1.25


class Checks:
    """Named checks, each run in ``with checks("name"):``, recorded pass/fail with traceback."""

    def __init__(self, tag: str):
        self.tag, self.results = tag, []

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        record = {"check": f"{self.tag}: {name}", "ok": False, "details": {}}
        try:
            yield record["details"]
            record["ok"] = True
        except Exception:  # noqa: BLE001 - every failure is reported, then the next check runs
            record["traceback"] = traceback.format_exc()
        record["seconds"] = round(time.perf_counter() - start, 2)
        self.results.append(record)
        status = "PASS" if record["ok"] else "FAIL"
        print(f"[gpu_smoke] {status} {record['check']} ({record['seconds']} s) "
              f"{json.dumps(record['details'])}", flush=True)
        if not record["ok"]:
            print(record["traceback"], flush=True)

    def skip(self, name: str, reason: str) -> None:
        """Record ``name`` as skipped (not a failure), with the reason."""
        self.results.append({"check": f"{self.tag}: {name}", "ok": True, "skipped": reason,
                             "details": {}, "seconds": 0.0})
        print(f"[gpu_smoke] SKIP {self.tag}: {name}: {reason}", flush=True)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want|| in float64."""
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def require(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def import_problem(module: str) -> str | None:
    """None when ``module`` imports here, else why not (one line)."""
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - a broken install (OSError, ...) skips it too
        return f"{module} is not importable: {type(error).__name__}: {error}".splitlines()[0]
    return None


# ------------------------------------------------------------------------------ dry run
def read_wheels(path: Path = WHEELS) -> dict[str, str]:
    """``name==version`` lines of the wheels list (comments and blank lines skipped)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected name==version, got {line!r}")
        if name.strip() in pins:
            raise ValueError(f"{path}:{number}: {name.strip()} is listed twice")
        pins[name.strip()] = version.strip()
    return pins


def stage_c_overrides(model: Path, data: Path, run_dir: Path, steps: int, resume: bool) -> list[str]:
    """The quick-start config's overrides for stage (c): one process, small steps."""
    return [f"model.path={model}", f"data.path={data}", f"logging.dir={run_dir}",
            "parallel.tensor=1", "rollout.prompts_per_step=8", "rollout.n=4",
            "train.mini_batch_size=4", f"train.steps={steps}", "checkpoint.interval=1",
            "checkpoint.keep_last=2", f"checkpoint.resume={'true' if resume else 'false'}",
            "reward.function=tests.trainer.rewards:digit_share", "logging.tensorboard=false"]


def dry_run(checks: Checks) -> None:
    """What can be checked without a GPU: the wheels list, the imports, stage (c)'s config."""
    with checks("wheels list pins the versions installed here") as details:
        pins = read_wheels()
        installed = {name: importlib.metadata.version(name) for name in pins}
        details.update(pins)
        wrong = {n: (v, installed[n]) for n, v in pins.items() if installed[n] != v}
        require(not wrong, f"pinned vs installed: {wrong}")
    with checks("imports") as details:
        for module in MODULES:
            importlib.import_module(module)
        details["modules"] = len(MODULES)
    with checks("stage (c) config loads") as details:
        from megatron_archer.trainer import load_config

        config = load_config(QUICKSTART_CONFIG, stage_c_overrides(
            Path("model"), Path("data.jsonl"), Path("run"), steps=3, resume=True))
        details.update(steps=config.train.steps, backend=config.model.backend)


# ------------------------------------------------------------------------------ stage (a)
def _cuda_time(fn, repeats: int = 5) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, by CUDA events."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def stage_a(checks: Checks, dry_run: bool = False) -> None:
    """The Triton fused op vs its torch path in bf16, and its speed vs the bare matmul. The dry
    run builds the same inputs on CPU at a small size and runs the torch path only (Triton needs
    CUDA)."""
    from megatron_archer.ops import fused_lm_head_logprobs_and_entropy as fused

    device, (tokens, vocab, hidden_size) = ("cpu", (64, 1000, 32)) if dry_run else (
        "cuda", (TOKENS, VOCAB, HIDDEN))
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=gen).bfloat16()
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen) * 2
              / hidden_size**0.5).bfloat16()
    labels = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    g_logp = torch.randn(tokens, device=device, generator=gen)
    g_entropy = torch.randn(tokens, device=device, generator=gen)

    def run(implementation: str):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        logp, entropy = fused(h, w, labels, implementation=implementation, entropy_grad=True)
        torch.autograd.backward([logp, entropy], [g_logp, g_entropy])
        return logp.detach(), entropy.detach(), h.grad, w.grad

    if dry_run:
        with checks("stage (a) inputs and the fused op's torch path on CPU") as details:
            logp, entropy, d_hidden, d_weight = run("torch")
            require(all(bool(torch.isfinite(t).all()) for t in (logp, entropy, d_hidden, d_weight)),
                    "non-finite results")
            details.update(shape=f"{tokens}x{vocab}x{hidden_size} bf16", triton="needs CUDA")
        return
    with checks("fused op, Triton vs torch path, bf16 forward and backward") as details:
        triton_out, torch_out = run("triton"), run("torch")
        errors = {name: rel_err(a, b) for name, a, b in
                  zip(("logp", "entropy", "d_hidden", "d_weight"), triton_out, torch_out)}
        details.update({k: f"{v:.2e}" for k, v in errors.items()})
        # forward: the same fp32 accumulation of exact bf16 products; backward: G rounded to bf16
        require(errors["logp"] < 1e-4 and errors["entropy"] < 1e-4, f"forward {errors}")
        require(errors["d_hidden"] < 2e-2 and errors["d_weight"] < 2e-2, f"backward {errors}")
        del triton_out, torch_out
    with checks("fused op speed vs the bare LM-head matmul (reported, not asserted)") as details:
        with torch.no_grad():
            matmul = _cuda_time(lambda: hidden @ weight.T)
            forward = _cuda_time(lambda: fused(hidden, weight, labels, implementation="triton"))
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        grad_logits = torch.randn(TOKENS, VOCAB, device="cuda", dtype=torch.bfloat16, generator=gen)

        def matmul_step():
            (h @ w.T).backward(grad_logits)

        def fused_step():
            logp, _ = fused(h, w, labels, implementation="triton")
            logp.backward(g_logp)

        matmul_both, fused_both = _cuda_time(matmul_step), _cuda_time(fused_step)
        ratio = forward / matmul
        details.update(shape=f"{TOKENS}x{VOCAB}x{HIDDEN} bf16", matmul_s=round(matmul, 5),
                       fused_forward_s=round(forward, 5), forward_ratio=round(ratio, 3),
                       target=FUSED_FORWARD_TARGET, met=ratio <= FUSED_FORWARD_TARGET,
                       matmul_fwd_bwd_s=round(matmul_both, 5), fused_fwd_bwd_s=round(fused_both, 5))


# ------------------------------------------------------------------------------ stages (b), (d)
def _worker_setup(name: str):
    """A torchrun worker's start: the process group (NCCL + gloo, or gloo on CPU), megatron's
    parallel state (1 x 1) and seed, a tiny random Qwen3 checkpoint and a packed batch."""
    from megatron.core import parallel_state

    from megatron_archer import compat
    from megatron_archer.distributed import init_process_group
    from tests.actor.common import make_batch
    from tests.models.checkpoints import write_checkpoint

    init_process_group()
    parallel_state.initialize_model_parallel(1, 1)
    compat.model_parallel_seed(0)
    work = Path(tempfile.mkdtemp(prefix=f"gpu_smoke_{name}_"))
    return work, write_checkpoint(work / "hf", "qwen3"), make_batch(9, seed=5)


def _actor(path: Path, dtype: torch.dtype, overrides: dict, backend: str = "auto", **config):
    """The checkpoint's model (``load_hf_model`` with megatron ``overrides``) and its Actor."""
    from megatron_archer.actor import Actor, ActorConfig
    from megatron_archer.models import load_hf_model

    loaded = load_hf_model(path, backend=backend, params_dtype=dtype, config_overrides=overrides)
    return loaded, Actor(loaded.model, loaded.spec, ActorConfig(
        max_tokens_per_micro_batch=48, lr=1e-3, params_dtype=str(dtype).removeprefix("torch."),
        **config), loaded.backend)


def _loss_fn(mb, logp, entropy):
    weights = torch.linspace(-1.0, 1.0, logp.numel(), device=logp.device).view_as(logp)
    return (weights * logp * mb.response_mask).sum() / 50


def _train_steps(actor, batch, count: int, details: dict) -> list:
    """``count`` train steps: none skipped, the weights moved; losses and norms to ``details``."""
    from megatron_archer.actor.actor import unwrap_chunk

    before = {k: v.detach().clone() for k, v in unwrap_chunk(actor.chunks[0]).state_dict().items()
              if isinstance(v, torch.Tensor) and v.is_floating_point()}
    steps = [actor.train_step(batch, _loss_fn) for _ in range(count)]
    details.update(losses=[s.loss for s in steps], grad_norms=[s.grad_norm for s in steps])
    require(not any(s.skipped for s in steps), "a step was skipped")
    after = unwrap_chunk(actor.chunks[0]).state_dict()
    moved = max((after[k].float() - v.float()).abs().max().item() for k, v in before.items())
    details["max_weight_change"] = moved
    require(moved > 0, "the weights did not change")
    return steps


def actor_worker(out: Path, dry_run: bool = False) -> None:
    """Runs under torchrun (1 process): the actor's CUDA path; writes ``out``/actor.json. The dry
    run executes the same code on CPU (gloo, the actor's CPU path) and leaves out only what needs
    CUDA: the CUDA-path assertions and megatron's DDP, which the CPU path does not use."""
    from megatron_archer.actor.actor import unwrap_chunk
    from megatron_archer.models.dist_checkpoint import load_model_checkpoint, save_model_checkpoint
    from tests.actor.common import hf_logprobs

    checks = Checks("actor")
    torch.backends.cuda.matmul.allow_tf32 = False  # compare in real fp32
    work, path, batch = _worker_setup("actor")
    expected = hf_logprobs(path, batch)

    def actor(dtype: torch.dtype, **config):
        return _actor(path, dtype, {}, **config)

    norms = {}
    for impl in ("logits", "fused"):
        with checks(f"fp32 packed log-probs and entropy ({impl}) vs transformers") as details:
            _, runner = actor(torch.float32, logprob_impl=impl)
            require(runner.on_cuda or dry_run, "not on CUDA")
            require(len(runner.micro_batches(batch)) > 1, "one packed row only")
            result = runner.compute_logprobs_and_entropy(batch)
            worst = 0.0
            for i, (logp, entropy, _) in enumerate(expected):
                n = logp.numel()
                worst = max(worst, (result.logp[i, :n].cpu().double() - logp).abs().max().item(),
                            (result.entropy[i, :n].cpu().double() - entropy).abs().max().item())
            details["max_abs_err"] = f"{worst:.2e}"
            require(worst < 1e-3, f"max abs error {worst}")
            norms[impl] = runner.train_step(batch, _loss_fn).grad_norm
            details["fp32_grad_norm"] = norms[impl]
    with checks("bf16 train steps: megatron DDP + distributed optimizer") as details:
        loaded, bf16 = actor(torch.bfloat16)
        require(dry_run or type(bf16.chunks[0]).__name__ == "DistributedDataParallel",
                "no megatron DDP")
        steps = _train_steps(bf16, batch, 2, details)
        if "logits" in norms:
            gap = abs(steps[0].grad_norm - norms["logits"]) / norms["logits"]
            details["grad_norm_vs_fp32"] = f"{gap:.2e}"
            require(gap < 5e-2, f"bf16 grad norm {steps[0].grad_norm} vs fp32 {norms['logits']}")
    with checks("model checkpoint save (fully parallel) and load") as details:
        model = unwrap_chunk(bf16.chunks[0])
        save_model_checkpoint(model, loaded.spec, work / "ckpt", hf_source=path)
        back = load_model_checkpoint(work / "ckpt", backend="local").model
        mine = model.state_dict()
        diffs = [k for k, v in back.state_dict().items()
                 if isinstance(v, torch.Tensor) and k in mine
                 and not torch.equal(v.cpu(), mine[k].cpu())]
        details["tensors"] = len(mine)
        require(not diffs, f"differ after load: {diffs[:5]}")
    (out / "actor.json").write_text(json.dumps(checks.results, indent=1))
    torch.distributed.destroy_process_group()


# the message of ``models.layer_spec.select_backend`` where the TE model cannot be built
TE_NEEDS_CUDA = "backend='te' needs CUDA and transformer_engine installed"


def te_worker(out: Path, dry_run: bool = False) -> None:
    """Runs under torchrun (1 process): a bf16 actor on the Transformer Engine layer spec with fp8
    on, configured as the trainer does (``ModelConfig.megatron_overrides``), takes one train step;
    writes ``out``/te.json. The dry run executes the same code up to building the TE model, which
    on CPU must refuse with ``TE_NEEDS_CUDA`` (any other error, e.g. a renamed argument, fails)."""
    from megatron_archer.trainer.config import ModelConfig

    checks = Checks("te")
    work, path, batch = _worker_setup("te")
    with checks("TE layer spec, fp8 hybrid (delayed scaling): one bf16 train step") as details:
        model_config = ModelConfig(path=str(path), backend="te", fp8="hybrid")
        overrides = model_config.megatron_overrides()
        details.update(fp8=overrides["fp8"], fp8_recipe=overrides["fp8_recipe"])
        try:
            loaded, actor = _actor(path, torch.bfloat16, overrides, backend="te")
        except RuntimeError as error:
            if not dry_run or TE_NEEDS_CUDA not in str(error):
                raise
            details["stopped_at"] = f"load_hf_model: {error}"
        else:
            require(loaded.backend == "te", f"backend {loaded.backend}")
            require(actor.pack_multiple % 16 == 0, f"rows padded to {actor.pack_multiple}")
            _train_steps(actor, batch, 1, details)
            # TE's modules record whether their last forward ran under fp8
            fp8_linears = [n for n, m in loaded.model.named_modules() if getattr(m, "fp8", False)]
            details["fp8_modules"] = len(fp8_linears)
            require(fp8_linears, "no Transformer Engine module ran in fp8")
    (out / "te.json").write_text(json.dumps(checks.results, indent=1))
    torch.distributed.destroy_process_group()


def _torchrun(args: list[str], log: Path) -> int:
    """``python -m torch.distributed.run --nproc-per-node 1 ARGS``, output to ``log`` and stdout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
               "--master-port", str(_free_port()), *args]
    print("[gpu_smoke] $ " + " ".join(command), flush=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sink.write(line)
            print("    " + line, end="", flush=True)
        return proc.wait()


def _free_port() -> int:
    from megatron_archer.quickstart.pipeline import free_port

    return free_port()


def run_worker(checks: Checks, worker: str, out: Path, log: str, dry_run: bool = False) -> None:
    """``worker`` under torchrun; its checks (``out``/<worker>.json) joined to ``checks``."""
    rc = _torchrun([__file__, "--worker", worker, "--out", str(out),
                    *(["--dry-run"] if dry_run else [])], out / log)
    results = out / f"{worker}.json"
    if results.is_file():
        checks.results.extend(json.loads(results.read_text()))
    with checks(f"{worker} worker exited cleanly") as details:
        details["returncode"] = rc
        require(rc == 0 and results.is_file(), f"torchrun returned {rc}; see {log}")


def stage_b(checks: Checks, out: Path, dry_run: bool = False) -> None:
    run_worker(checks, "actor", out, "stage_b.log", dry_run)


def stage_d(checks: Checks, out: Path, dry_run: bool = False) -> None:
    """Stage (d) where Transformer Engine imports; the dry run runs its worker regardless."""
    problem = import_problem("transformer_engine.pytorch")
    if problem and not dry_run:
        checks.skip("TE layer spec with fp8", problem)
        return
    run_worker(checks, "te", out, "stage_d.log", dry_run)


# ------------------------------------------------------------------------------ stage (e)
# SGLang serving the tiny float32 model: token ids in and out, no CUDA graphs or warm-up
SGLANG_ARGS = ("--attention-backend", "torch_native", "--sampling-backend", "pytorch",
               "--disable-cuda-graph", "--skip-server-warmup", "--skip-tokenizer-init",
               "--dtype", "float32", "--max-total-tokens", "4096", "--max-running-requests", "8")
SGLANG_MEMORY_FRACTION = 0.2
PROMPTS = [[5, 17, 42, 99], [200, 3, 3, 8, 150], [77]]


def stage_e(checks: Checks, out: Path, dry_run: bool = False) -> None:
    """A launched SGLang server (tensor weight sync) on this process's GPU serves model A; model
    B's weights, CUDA tensors here, go to it as IPC handles and change its greedy tokens; A's
    weights back restore them. The dry run makes both models, the launch command and the
    updates' serialised buckets (CPU tensors), and stops before the launch."""
    from safetensors.torch import load_file

    from megatron_archer.rollout import SGLangEngine
    from megatron_archer.rollout.engine import SamplingParams
    from megatron_archer.rollout.sglang_engine import launch_command
    from megatron_archer.rollout.weight_buckets import serialize_named_tensors
    from tests.models.checkpoints import write_checkpoint

    problem = import_problem("sglang")
    if problem and not dry_run:
        checks.skip("SGLang server with a tensor weight update", problem)
        return
    device = "cpu" if dry_run else "cuda"
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_sglang_"))
    paths = {name: write_checkpoint(work / name, "qwen3", seed=seed)
             for name, seed in (("a", 0), ("b", 1))}
    weights = {name: sorted(load_file(path / "model.safetensors", device=device).items())
               for name, path in paths.items()}
    port = _free_port()
    if dry_run:
        with checks("stage (e) models, launch command and update buckets") as details:
            command = launch_command(paths["a"], port, 1, 0, SGLANG_MEMORY_FRACTION, SGLANG_ARGS,
                                     memory_saver=False)
            sizes = [len(serialize_named_tensors(bucket)) for bucket in weights.values()]
            details.update(command=" ".join(command[1:4]), serialized_bytes=sizes,
                           sglang=problem or "importable", launch="needs a GPU")
        return
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    engine = None
    try:
        with checks("SGLang server launched on this GPU"):
            engine = SGLangEngine.launch(
                paths["a"], num_servers=1, base_port=port, tp_size=1, base_gpu_id=0,
                mem_fraction_static=SGLANG_MEMORY_FRACTION, extra_args=SGLANG_ARGS,
                memory_saver=False, startup_timeout_s=300.0, weight_sync="tensor")

        def tokens():
            return [s[0].tokens for s in engine.generate(PROMPTS, greedy)]

        with checks("tensor weight updates (CUDA IPC) change and restore the tokens") as details:
            served_a = tokens()
            engine.update_weights([weights["b"]], version=1)
            served_b = tokens()
            engine.update_weights([weights["a"]], version=2)
            served_a_again = tokens()
            details.update(weight_version=engine.weight_version, a=served_a, b=served_b)
            require(served_b != served_a, "model B's weights left the greedy tokens unchanged")
            require(served_a_again == served_a, f"A's weights back gave {served_a_again}")
            require(engine.weight_version == 2, f"weight_version {engine.weight_version}")
    finally:
        if engine is not None:
            engine.shutdown()


# ------------------------------------------------------------------------------ stage (c)
def _metric_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def stage_c(checks: Checks, out: Path) -> None:
    from megatron_archer.quickstart.build import build_base_model, write_datasets

    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_train_"))
    model = build_base_model(work / "model")
    data = write_datasets(work / "data", sft=8, rl=64, eval=8)
    run_dir = work / "run"
    for name, steps, resume in (("2 steps", 2, False), ("resume to step 3", 3, True)):
        with checks(f"megatron-archer train, local engine on CUDA: {name}") as details:
            overrides = stage_c_overrides(model, data.rl, run_dir, steps, resume)
            rc = _torchrun(["-m", "megatron_archer.cli", "train", str(QUICKSTART_CONFIG),
                            *overrides], out / f"stage_c_{steps}.log")
            require(rc == 0, f"train returned {rc}; see stage_c_{steps}.log")
            logged = _metric_steps(run_dir)
            details["logged_steps"] = logged
            require(logged == list(range(1, steps + 1)), f"metrics.jsonl steps {logged}")


# ------------------------------------------------------------------------------ main
def environment() -> dict:
    versions = {}
    for name in ("torch", "triton", "transformers", "megatron-core", "math-verify",
                 "transformer-engine", "sglang"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cuda": torch.version.cuda, **versions}


def run_stage(checks: Checks, tag: str, stage) -> None:
    """``stage(its own Checks)``, a failure outside its checks reported too; results to ``checks``."""
    stage_checks = Checks(tag)
    with stage_checks("stage completed"):
        stage(stage_checks)
    checks.results.extend(stage_checks.results)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: wheels, imports, and each stage's code on CPU")
    parser.add_argument("--stages", default="abcde",
                        help="which of a-e to run (default all; d and e skip without TE, SGLang)")
    parser.add_argument("--out", type=Path,
                        default=Path(os.environ.get("OUT") or ROOT / "runs" / "gpu_smoke"))
    parser.add_argument("--worker", choices=["actor", "te"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.worker:
        {"actor": actor_worker, "te": te_worker}[args.worker](args.out, args.dry_run)
        return 0
    info = environment()
    print(f"[gpu_smoke] {json.dumps(info)}", flush=True)
    checks = Checks("dry-run" if args.dry_run else "smoke")
    if args.dry_run:
        dry_run(checks)
        run_stage(checks, "dry-run a", lambda c: stage_a(c, dry_run=True))
        run_stage(checks, "dry-run b", lambda c: stage_b(c, args.out, dry_run=True))
        run_stage(checks, "dry-run d", lambda c: stage_d(c, args.out, dry_run=True))
        run_stage(checks, "dry-run e", lambda c: stage_e(c, args.out, dry_run=True))
    elif not torch.cuda.is_available():
        print("[gpu_smoke] no GPU: CUDA is not available here; run with --dry-run", flush=True)
        return 2
    else:
        start = time.perf_counter()
        stages = {"a": lambda c: stage_a(c), "b": lambda c: stage_b(c, args.out),
                  "c": lambda c: stage_c(c, args.out), "d": lambda c: stage_d(c, args.out),
                  "e": lambda c: stage_e(c, args.out)}
        for name in sorted(set(args.stages) & set(stages)):
            run_stage(checks, name, stages[name])
            torch.cuda.empty_cache()
        info["seconds"] = round(time.perf_counter() - start, 1)
    ok = all(r["ok"] for r in checks.results)
    (args.out / "gpu_smoke.json").write_text(json.dumps({**info, "ok": ok,
                                                         "checks": checks.results}, indent=1))
    passed = sum(r["ok"] for r in checks.results)
    print(f"[gpu_smoke] {passed}/{len(checks.results)} checks passed; results in "
          f"{args.out / 'gpu_smoke.json'}", flush=True)
    if args.dry_run:
        print("[gpu_smoke] no GPU used: dry run only (wheels list, imports, stage (c) config, "
              "stage (a)'s torch path, stage (b)'s worker on CPU, stage (d)'s worker up to the TE "
              "model, stage (e) up to the server launch); the Triton kernel, the actor's CUDA "
              "path, stage (c), TE fp8 and the SGLang server need CUDA", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
