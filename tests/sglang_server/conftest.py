"""Real SGLang servers on CPU for the tests of this folder: ``make test-sglang`` installs each
version of ``SGLANG_SERVER_VERSIONS`` (``tools/sglang_server_env.sh``) and runs them; elsewhere
they are skipped with the reason.

Per version, ``SGLangEngine.launch`` starts 2 servers (the version's own environment,
``.venv/sglang-server-V``) on two tiny random Qwen3 models made here in float32 (``models``: A
serves at launch, B is the update target); the transformers models in this process are the
reference. Each server keeps about 2 GB.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
VERSIONS = os.environ.get("SGLANG_SERVER_VERSIONS", "").split()
# SGLang on CPU (its CPU engine, pure-torch attention and sampling, no CUDA graphs or warm-up),
# float32 as the reference, a small KV cache; token ids in and out (no tokenizer)
CPU_ARGS = (
    "--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
    "--disable-overlap-schedule", "--max-total-tokens", "8192", "--max-running-requests", "16",
    "--mem-fraction-static", "0.05", "--skip-server-warmup", "--dtype", "float32",
    "--skip-tokenizer-init",
)  # fmt: skip
# SGLANG_CPU_NO_AMX: tools/sglang_server_env.sh (SGLang's AMX kernels have no float32)
SERVER_ENVIRONMENT = {"SGLANG_USE_CPU_ENGINE": "1", "SGLANG_CPU_NO_AMX": "1",
                      "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # fmt: skip


def thread_binding(version: str) -> dict[str, str]:
    """SGLANG_CPU_OMP_THREADS_BIND for 2 servers of one tensor-parallel rank each. Later 0.5.x
    bind server i ("GPU" i) to NUMA node i by default, and a 2-core machine has one node: one
    core each. 0.5.5 binds by tensor-parallel rank and wants one entry per rank: its default."""
    if version == "0.5.5":
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {"SGLANG_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[-1]}"}
VOCAB = 256


def pytest_configure(config):
    config.addinivalue_line("markers", "sglang_server: needs real SGLang servers (make test-sglang)")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.sglang_server)


def make_model(out: Path, seed: int) -> Path:
    """A random Qwen3 (2 layers, hidden 64) in float32 whose config both transformers 4.x
    (SGLang 0.5.5) and 5.x read alike; large initial weights make the greedy argmax clear-cut.
    No end-of-sequence token: every generation runs to ``max_new_tokens``."""
    import transformers

    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=False, initializer_range=0.2,
        bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    path = out / "config.json"
    data = json.loads(path.read_text())
    data.update(rope_theta=10000.0, torch_dtype="float32", dtype="float32")
    path.write_text(json.dumps(data, indent=1))
    return out


@dataclass
class Reference:
    """One model's transformers copies: float32 (the baseline) and float64 (the reference)."""

    path: Path
    f32: torch.nn.Module
    f64: torch.nn.Module
    greedy_cache: dict = field(default_factory=dict)

    def buckets(self, size: int = 4):
        """Its weights as buckets of ``(hf_name, tensor)``, ``size`` tensors each."""
        items = [(n, t.detach()) for n, t in self.f32.state_dict().items()]
        return [items[i:i + size] for i in range(0, len(items), size)]

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        """transformers' greedy continuation of ``prompt``, ``n`` tokens."""
        key = (tuple(prompt), n)
        if key not in self.greedy_cache:
            with torch.no_grad():
                out = self.f32.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                                        do_sample=False, pad_token_id=0)
            self.greedy_cache[key] = out[0, len(prompt):].tolist()
        return self.greedy_cache[key]

    def logits(self, prompt: list[int], tokens: list[int], dtype: torch.dtype) -> torch.Tensor:
        """The logits that predicted each of ``tokens`` after ``prompt``."""
        model = self.f32 if dtype == torch.float32 else self.f64
        with torch.no_grad():
            out = model(torch.tensor([prompt + tokens])).logits[0]
        return out[len(prompt) - 1:len(prompt) - 1 + len(tokens)]


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Reference]:
    import transformers

    refs = {}
    for name, seed in (("a", 0), ("b", 1)):
        path = make_model(tmp_path_factory.mktemp(f"model-{name}"), seed)
        f32 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        f64 = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        refs[name] = Reference(path, f32, f64)
    return refs


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free on 127.0.0.1."""
    for start in range(31000, 60000, 97):
        try:
            for port in range(start, start + count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return start
    raise RuntimeError("no free ports")


@dataclass
class Servers:
    """One SGLang version's launched servers: ``engine`` (launched, tensor sync, restarts them)
    and what other engines need to attach to them."""

    version: str
    engine: object
    urls: list[str]
    weights: dict = field(default_factory=dict)  # "current": the reference the servers hold


def server_python(version: str) -> Path:
    """The version's environment's Python, or a skip with the reason it is missing."""
    venv = ROOT / ".venv" / f"sglang-server-{version}"
    if (venv / "UNAVAILABLE").exists():
        pytest.skip(f"SGLang {version} on CPU: {(venv / 'UNAVAILABLE').read_text().strip()}")
    if not (venv / ".installed").exists():
        pytest.skip(f"SGLang {version} is not installed (make test-sglang, or "
                    f"tools/sglang_server_env.sh {version})")
    return venv / "bin" / "python"


@pytest.fixture(scope="module", params=VERSIONS or ["unset"])
def servers(request) -> Servers:
    """2 servers of one version, launched from model A, stopped after the module."""
    if not VERSIONS:
        pytest.skip("real SGLang servers run under make test-sglang (SGLANG_SERVER_VERSIONS unset)")
    from megatron_archer.rollout import SGLangEngine
    from tests.rollout.fake_server import fast_policies

    version = request.param
    python = server_python(version)
    models = request.getfixturevalue("models")
    environment = {**SERVER_ENVIRONMENT, **thread_binding(version)}
    saved = {k: os.environ.get(k) for k in environment}
    os.environ.update(environment)  # read by every (re)start: child_environment()
    weights = {"current": models["a"]}
    port = free_ports(2)
    engine = SGLangEngine.launch(
        models["a"].path, num_servers=2, base_port=port, python=python, memory_saver=False,
        extra_args=CPU_ARGS, startup_timeout_s=300.0, weight_sync="tensor",
        policies=fast_policies(timeout_s=120.0), max_inflight=4,
        weights_source=lambda: weights["current"].buckets())  # fmt: skip
    try:
        yield Servers(version, engine, list(engine.server_urls), weights)
    finally:
        engine.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
