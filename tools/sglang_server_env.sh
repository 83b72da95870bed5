#!/usr/bin/env bash
# An environment running SGLang VERSION's server on CPU, for the real-server tests
# (make test-sglang): .venv/sglang-server-VERSION with Python 3.11, torch 2.13.0 CPU, sglang
# --no-deps and requirements/sglang-VERSION-server.txt, torchvision made importable beside CPU
# torch, and SGLang's CPU kernels (sgl_kernel) from a wheel cache keyed on the kernel sources,
# Python, torch and the CPU's instruction set.
#
#   tools/sglang_server_env.sh VERSION
#
# SGLANG_CPU_MATERIAL: a folder with sgl-kernel-cpu-src.tar.gz (SGLang's CPU kernel sources) and
# wheels/ (kernel wheels built from them; used only where built for this torch and an AVX-512
# CPU). Without a usable wheel the kernels are built from the sources (cmake, gcc, libnuma; about
# 6 minutes on 2 cores). When neither works the environment gets an UNAVAILABLE file holding the
# one-line reason, which the tests give as their skip reason, and the script exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${1:?usage: tools/sglang_server_env.sh VERSION}
REQUIREMENTS=requirements/sglang-$VERSION-server.txt
[ -f "$REQUIREMENTS" ] || { echo "no $REQUIREMENTS: SGLang $VERSION is not a tested version" >&2; exit 2; }
PYTHON=${PYTHON:-python3.11}
TORCH=2.13.0
MATERIAL=${SGLANG_CPU_MATERIAL:-}
ROOT=$(pwd)
VENV=$ROOT/.venv/sglang-server-$VERSION
BASE=$VENV/.base-installed   # everything but the kernels
STAMP=$VENV/.installed
start=$(date +%s)
say() { echo "[sglang $VERSION, $(( $(date +%s) - start )) s] $*"; }
unavailable() { echo "$1" > "$VENV/UNAVAILABLE"; echo "SGLang $VERSION unavailable: $1" >&2; exit 0; }

[ -f "$STAMP" ] && [ "$STAMP" -nt "$REQUIREMENTS" ] && [ "$STAMP" -nt "$0" ] && exit 0
if ! { [ -f "$BASE" ] && [ "$BASE" -nt "$REQUIREMENTS" ] && [ "$BASE" -nt "$0" ]; }; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
fi
rm -f "$VENV/UNAVAILABLE"
PIP=("$VENV/bin/python" -m pip install -q)
CONSTRAINTS=$VENV/constraints.txt
if [ ! -f "$BASE" ]; then
    echo "torch==$TORCH" > "$CONSTRAINTS"   # no dependency may replace the CPU torch
    say "torch $TORCH (CPU build)"
    "${PIP[@]}" "torch==$TORCH"
    say "sglang==$VERSION without its dependencies, then $REQUIREMENTS"
    "${PIP[@]}" --no-deps "sglang==$VERSION"
    "${PIP[@]}" -c "$CONSTRAINTS" -r "$REQUIREMENTS"
    say "torchvision (imported by SGLang at start; only CUDA builds exist: its ops are skipped)"
    "${PIP[@]}" --no-deps "torchvision==0.28.0"
    "$VENV/bin/python" tools/sglang_torchvision_cpu.py
    # SGLANG_CPU_NO_AMX=1 (set by the tests) hides AMX from this environment's processes: SGLang
    # then runs its portable torch paths, as on a CPU without AMX; its AMX kernels have no float32
    # (rmsnorm_cpu: "not implemented for 'Float'"), and the tests compare float32 with transformers
    site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo 'import os; os.environ.get("SGLANG_CPU_NO_AMX") == "1" and setattr(__import__("torch").cpu, "_is_amx_tile_supported", lambda: False)' \
        > "$site/sglang_cpu_no_amx.pth"
    touch "$BASE"
fi

# the kernel wheel: cached per (kernel sources, Python, torch, instruction set)
flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
isa=avx512   # x86-64-v4's AVX-512 subsets
for f in avx512f avx512bw avx512vl avx512dq; do [[ " $flags " == *" $f "* ]] || isa=noavx512; done
py_tag=$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info.major}{sys.version_info.minor}")')
torch_version=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
sources=${MATERIAL:+$MATERIAL/sgl-kernel-cpu-src.tar.gz}
[ -n "$sources" ] && [ -f "$sources" ] || sources=""
sources_id=$( [ -n "$sources" ] && sha256sum "$sources" | cut -c1-12 || echo none)
CACHE=$ROOT/.venv/sglang-kernels/$sources_id-$py_tag-torch$torch_version-$isa
wheel=$(ls "$CACHE"/*.whl 2>/dev/null | head -1 || true)
if [ -z "$wheel" ] && [ "$isa" = avx512 ] && [ "$torch_version" = "$TORCH+cpu" ] && [ -n "$MATERIAL" ]; then
    # the material's wheels were built for torch 2.13.0 CPU with -march=x86-64-v4 (AVX-512)
    prebuilt=$(ls "$MATERIAL"/wheels/sglang_kernel_cpu-*-"$py_tag"-"$py_tag"-linux_x86_64.whl 2>/dev/null | head -1 || true)
    [ -n "$prebuilt" ] && mkdir -p "$CACHE" && cp "$prebuilt" "$CACHE/" && wheel=$CACHE/$(basename "$prebuilt") \
        && say "kernel wheel from $MATERIAL"
fi
if [ -z "$wheel" ]; then
    [ -n "$sources" ] || unavailable "no CPU kernel wheel for $py_tag/torch $torch_version/$isa and no kernel sources (set SGLANG_CPU_MATERIAL to the folder holding sgl-kernel-cpu-src.tar.gz)"
    [ "$isa" = avx512 ] || unavailable "SGLang's CPU kernels need AVX-512 (they are compiled for x86-64-v4); this CPU has none"
    say "building the CPU kernels from $sources (several minutes)"
    if ! command -v cmake >/dev/null || [ ! -f /usr/include/numa.h ]; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake libnuma-dev >/dev/null; } \
            || unavailable "building the CPU kernels needs cmake and libnuma-dev, which could not be installed"
    fi
    "${PIP[@]}" -c "$CONSTRAINTS" scikit-build-core wheel
    mkdir -p "$CACHE"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    tar xzf "$sources" -C "$work"
    cp "$work/aot/pyproject_cpu.toml" "$work/aot/pyproject.toml"
    # against this torch (its pyproject pins another), 2 jobs
    (cd "$work/aot" && CMAKE_BUILD_PARALLEL_LEVEL=2 MAX_JOBS=2 "$VENV/bin/python" -m pip wheel -q \
        --no-build-isolation --no-deps -w "$CACHE" .) > "$VENV/kernel-build.log" 2>&1 \
        || unavailable "building the CPU kernels failed: see $VENV/kernel-build.log"
    wheel=$(ls "$CACHE"/*.whl | head -1)
fi
"${PIP[@]}" --no-deps "$wheel"
"$VENV/bin/python" -c 'import sgl_kernel, sglang' \
    || unavailable "sgl_kernel or sglang does not import in $VENV (see the traceback above)"
touch "$STAMP"
say "ready: $(du -sh "$VENV" | cut -f1) in $VENV"
