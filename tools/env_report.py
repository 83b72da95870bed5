"""Print what megatron-archer will find in this environment (attach it to bug reports).

    python tools/env_report.py

The optional packages (Transformer Engine, apex, nvidia-modelopt, triton, SGLang) are used when
present and never needed on CPU.
"""

import importlib.metadata
import platform

PACKAGES = [
    "megatron-archer", "torch", "megatron-core", "transformer-engine", "apex",
    "nvidia-modelopt", "triton", "transformers", "sglang",
]


def main() -> None:
    print(f"python {platform.python_version()} on {platform.machine()}")
    for name in PACKAGES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "not installed"
        print(f"{name:<20}{version}")
    import torch

    cuda = torch.cuda.is_available()
    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    print(f"{'cuda':<20}{torch.version.cuda if cuda else 'not available'} {devices}")


if __name__ == "__main__":
    main()
