#!/usr/bin/env bash
# Download the wheels of tools/gpu_wheels.txt for the GPU test machine (CPython 3.12, x86-64
# manylinux, no network there) into .whl/ at the repository root, ignored by git, and check that
# they stay under the 64 MiB a device call may carry (/work/.library/device/README.md).
# Run here (with network), then on the GPU machine, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   python3 tools/gpu_smoke.py --out "$OUT"
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl -r tools/gpu_wheels.txt
count=$(ls .whl/*.whl | wc -l)
expected=$(grep -cvE '^\s*(#|$)' tools/gpu_wheels.txt)
[ "$count" -eq "$expected" ] || { echo "expected $expected wheels, got $count" >&2; exit 1; }
size=$(du -sb .whl | cut -f1)
echo "$count wheels, $size bytes in .whl/"
[ "$size" -lt $((64 << 20)) ] || { echo ".whl/ is over 64 MiB" >&2; exit 1; }
