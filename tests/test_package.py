"""The console script and the README's runnable example work as documented."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import megatron_archer
from megatron_archer.cli import main
from tests.numerics import FACTOR, FLOOR_ULPS, eps

ROOT = Path(__file__).resolve().parents[1]


def test_cli_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert megatron_archer.__version__ in capsys.readouterr().out


def test_readme_example_single_process_and_tensor_parallel_2():
    example = str(ROOT / "examples" / "vocab_parallel_logprobs.py")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    single = subprocess.run([sys.executable, example], capture_output=True, text=True, env=env, check=True)
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    parallel = subprocess.run(
        [torchrun, "--nproc-per-node", "2", example], capture_output=True, text=True, env=env, check=True
    )
    assert "tensor-parallel size 1" in single.stdout and "tensor-parallel size 2" in parallel.stdout
    # The printed log-probs and entropies are the same whatever the sharding.
    assert single.stdout.splitlines()[1:3] == parallel.stdout.splitlines()[1:3]
    # the op is as accurate as torch's float32 log_softmax of the same logits (tests/numerics.py:
    # 4x its error plus 8 ulps of the logits' scale, |z / T| < 4 x 5 / 0.7 here)
    for out in (single.stdout, parallel.stdout):
        errors = [float(line.split("=")[1]) for line in out.splitlines() if "reference|" in line]
        plain = re.search(r"log_softmax: logp (\S+), entropy (\S+)\)", out)
        assert len(errors) == 2 and plain, out
        floor = FLOOR_ULPS * eps(torch.float32) * 4 * 5 / 0.7
        for error, base in zip(errors, map(float, plain.groups())):
            assert error <= FACTOR * base + floor, (error, base, floor)
