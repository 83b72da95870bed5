"""Make the package index's torchvision (built for CUDA only) importable beside CPU torch, for an
SGLang server on CPU (tools/sglang_server_env.sh).

Its C extension links CUDA libraries, so it does not load, and ``import torchvision`` then fails
while registering meta kernels for its missing operators ("operator torchvision::nms does not
exist"). SGLang imports ``torchvision.transforms`` at start and never runs those operators on
CPU, so the two registration imports are made conditional on the extension having loaded.
Run by the environment's Python; idempotent.
"""

import importlib.util
import pathlib
import re

REGISTRATIONS = ("_autograd_registrations", "_meta_registrations")
GUARD = "if extension._has_ops():  # CPU torch: the CUDA-built operators did not load\n"


def main() -> None:
    init = pathlib.Path(importlib.util.find_spec("torchvision").origin)
    text = init.read_text()
    if GUARD in text:
        return
    for name in REGISTRATIONS:
        text, count = re.subn(rf"^\s+{name},\n", "", text, count=1, flags=re.M)
        if count != 1:
            raise SystemExit(f"{init}: no '{name},' line in its first import; torchvision's layout "
                             f"changed: adapt tools/sglang_torchvision_cpu.py")
    anchor = "from torchvision import ("
    if anchor not in text:
        raise SystemExit(f"{init}: no '{anchor}'; adapt tools/sglang_torchvision_cpu.py")
    guarded = GUARD + f"    from torchvision import {', '.join(REGISTRATIONS)}  # noqa: F401\n"
    init.write_text(text.replace(anchor, guarded + anchor, 1))


if __name__ == "__main__":
    main()
