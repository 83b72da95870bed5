#!/usr/bin/env bash
# The package works from its declared dependencies alone (setup.py's install_requires, no extras,
# nothing the dev or SGLang environments happen to bring): a fresh venv, `pip install .`, then
# `megatron-archer train` on a tiny quick-start model for 2 steps with a checkpoint every step,
# and a resume to step 3. CI runs it after the test suite (`make test-install`).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=$(realpath -m "${INSTALL_CHECK_VENV:-.venv-install-check}")  # absolute: the run cds away
WORK=$(mktemp -d)
ROOT=$(pwd)
trap 'rm -rf "$WORK" "$ROOT/build" "$VENV"' EXIT   # pip builds . in ./build; the venv is 1.6 GB

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q torch==2.13.0   # first, so pip keeps the CPU build
"$VENV/bin/python" -m pip install -q .
cd "$WORK"   # the installed package, not the source tree, is imported from here on
"$VENV/bin/python" - <<'PY'
from megatron_archer.quickstart.build import build_base_model, write_datasets

build_base_model("model")
write_datasets("data", sft=8, rl=64, eval=8)
PY
CONFIG="$OLDPWD/examples/quickstart/archer.yaml"
for run in "2 false" "3 true"; do
    set -- $run
    "$VENV/bin/megatron-archer" train "$CONFIG" model.path=model data.path=data/rl.jsonl \
        logging.dir=run parallel.tensor=1 rollout.prompts_per_step=8 rollout.n=4 \
        train.mini_batch_size=4 "train.steps=$1" checkpoint.interval=1 checkpoint.keep_last=2 \
        "checkpoint.resume=$2" logging.tensorboard=false logging.progress=false
done
steps=$("$VENV/bin/python" -c "import json; print([json.loads(l)['step'] for l in open('run/metrics.jsonl')])")
[ "$steps" = "[1, 2, 3]" ] || { echo "install check: metrics.jsonl steps $steps, expected [1, 2, 3]"; exit 1; }
echo "install check: declared dependencies alone train, save and resume (steps $steps)"
