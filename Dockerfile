# megatron-archer on GPUs: trainer and (colocated) SGLang servers in one image.
#   docker build -t megatron-archer:gpu .
# Not built in this project's CI (no Docker engine there): see docs/scaling.md.
#
# Base: NGC PyTorch 25.06 (Python 3.12, CUDA 12.9, PyTorch 2.8.0a0 NGC build, Transformer
# Engine 2.4, NCCL, cuDNN, apex), as NVIDIA's release notes for that tag list them; check a
# built image with `python tools/env_report.py`. Transformer Engine comes with the image.
FROM nvcr.io/nvidia/pytorch:25.06-py3

# Version coupling. sglang 0.5.5 pins torch==2.8.0, transformers==4.57.1, sgl-kernel and
# flashinfer builds made for that torch. A plain `pip install sglang` would replace NGC's torch
# (and break Transformer Engine, built against it). So sglang goes in with --no-deps, then its
# runtime dependencies except torch/torchvision/torchaudio, which the image keeps. NGC's torch
# is a 2.8.0 pre-release: sgl-kernel's compiled ops must load against it, which only a GPU node
# can check (docs/scaling.md: `python -c "import sgl_kernel, transformer_engine"`). If they do
# not on your tag, run the rollout nodes of a disaggregated job from SGLang's own image
# (lmsysorg/sglang:v0.5.5: same sglang, same HTTP API); colocated runs need SGLang in this image.
# sglang 0.5.5 is also the version whose request types the CPU tests validate payloads against
# (requirements/sglang-cpu.txt).
ARG MEGATRON_CORE_VERSION=0.16.1
ARG SGLANG_VERSION=0.5.5

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# Pin what must not move: pip may not upgrade the image's torch while resolving the rest.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /opt/torch-constraint.txt

RUN pip install -c /opt/torch-constraint.txt "megatron-core==${MEGATRON_CORE_VERSION}" \
 && pip install --no-deps "sglang==${SGLANG_VERSION}" "sgl-kernel==0.3.16.post5" \
        "flashinfer_python==0.5.0" "flashinfer_cubin==0.5.0" "torch_memory_saver==0.0.9" \
        "xgrammar==0.1.25" "torchao==0.9.0" \
 && pip install -c /opt/torch-constraint.txt \
        "transformers==4.57.1" "openai==2.6.1" "openai-harmony==0.0.4" "outlines==0.1.11" \
        "llguidance>=0.7.11,<0.8.0" "nvidia-cutlass-dsl==4.2.1" "timm==1.0.16" "blobfile==3.0.0" \
        "soundfile==0.13.1" "grpcio==1.75.1" "grpcio-tools==1.75.1" "grpcio-reflection==1.75.1" \
        "grpcio-health-checking==1.75.1" \
        aiohttp anthropic compressed-tensors cuda-python decord2 datasets einops fastapi gguf \
        hf_transfer huggingface_hub interegular modelscope msgspec ninja nvidia-ml-py orjson \
        packaging partial_json_parser pillow prometheus-client pybase64 pydantic \
        python-multipart "pyzmq>=25.1.2" requests scipy sentencepiece setproctitle tiktoken \
        uvicorn uvloop py-spy psutil tqdm "sglang-router==0.3.2"

WORKDIR /opt/megatron-archer
COPY setup.py pyproject.toml README.md ./
COPY megatron_archer ./megatron_archer
COPY tools ./tools
COPY examples ./examples
RUN pip install -c /opt/torch-constraint.txt -e . \
 && python -c "import megatron.core, sglang, megatron_archer" \
 && python tools/env_report.py

# Optional non-root user (uncomment; mount model/data/shared directories readable by uid 1000).
# RUN useradd --create-home --uid 1000 archer
# USER archer

CMD ["bash"]
