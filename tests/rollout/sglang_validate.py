"""Validate request bodies against one installed SGLang's own request types, in a process of its
own (so two SGLang versions can be checked from one test run: ``PYTHONPATH`` selects which).

Usage: ``python sglang_validate.py CASES.json [--inert]`` prints a JSON report. Each case is
``{"cls": io_struct class name, "body": {...}}``; the body is parsed the way SGLang's FastAPI
server parses it (pydantic over the dataclass, 0.5.5; over the msgspec Struct, later 0.5.x),
after checking that every field sent exists (later versions ignore unknown fields silently).
``GenerateReqInput`` is also normalised and each of its ``sampling_params`` verified.

Later 0.5.x import a few packages at module level that only their model and kernel code uses and
that have no CPU wheel here (torchvision, tvm_ffi) or are not installed (compressed_tensors,
gguf); with ``--inert`` those named in ``INERT`` that are missing are replaced by inert modules,
which no request type touches (0.5.5 needs none and probes some optional packages itself).
"""

from __future__ import annotations

import dataclasses
import importlib.abc
import importlib.machinery
import json
import sys
import types

INERT = ("torchvision", "tvm_ffi", "compressed_tensors", "gguf")


class _Anything(type):
    """A class whose every attribute, call and subscript is another such class."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args, **kwargs):
        return _Anything("value", (), {})

    def __getitem__(cls, key):
        return cls


class _InertFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``INERT`` packages (missing ones only) as modules of ``_Anything``."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] not in INERT:
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0"
        module.__getattr__ = lambda name: _Anything(name, (), {})
        return module

    def exec_module(self, module):
        pass


def field_names(cls) -> set[str]:
    if dataclasses.is_dataclass(cls):
        return {f.name for f in dataclasses.fields(cls)}
    import msgspec

    return {f.name for f in msgspec.structs.fields(cls)}


def validate(io_struct, name: str, body: dict):
    """The parsed request; raises on an unknown field or a bad value."""
    from pydantic import TypeAdapter

    cls = getattr(io_struct, name)
    unknown = set(body) - field_names(cls)
    if unknown:
        raise ValueError(f"{name} has no field {sorted(unknown)}")
    request = TypeAdapter(cls).validate_python(body)
    if name == "GenerateReqInput":
        from sglang.srt.sampling.sampling_params import SamplingParams

        request.normalize_batch_and_arguments()
        if request.batch_size != len(body["input_ids"]):
            raise ValueError(f"batch_size {request.batch_size} for {len(body['input_ids'])} rows")
        for sampling in body["sampling_params"]:
            SamplingParams(**sampling).verify(vocab_size=250)
    return request


def main(path: str, inert: bool) -> None:
    if inert:
        sys.meta_path.append(_InertFinder())  # after the real finders: only missing packages
    import sglang
    from sglang.srt.managers import io_struct

    results = []
    for case in json.load(open(path)):
        if not hasattr(io_struct, case["cls"]):
            results.append({"cls": case["cls"], "status": "absent"})
            continue
        try:
            validate(io_struct, case["cls"], case["body"])
            results.append({"cls": case["cls"], "status": "ok"})
        except Exception as error:  # noqa: BLE001 - reported to the test
            results.append({"cls": case["cls"], "status": "error",
                            "error": f"{type(error).__name__}: {error}"[:2000]})
    print(json.dumps({"version": sglang.__version__, "file": sglang.__file__, "results": results}))


if __name__ == "__main__":
    main(sys.argv[1], "--inert" in sys.argv[2:])
