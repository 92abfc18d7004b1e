"""medgemma-cli: MedGemma and MedSigLIP on your own machine — private, offline, fast.

The Python API does everything the command line does:

    from medgemma_cli import convert, ask, ask_many, open_session, run_batch, classify, embed, run_bench, list_models
    from medgemma_cli import run_doctor, cache_usage, clear_cache, extract_labs, lab_schema
"""

from __future__ import annotations

from pathlib import Path as _Path

from medgemma_cli.offline import disable_telemetry as _disable_telemetry

__version__ = "0.1.0"

_disable_telemetry()  # before anything of ours can create an ONNX Runtime environment

# Installed, converters/ and kernels/ live inside this package (medgemma_cli.converters, .kernels). In a
# source checkout they sit beside it; let the checkout import them under the same names.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "converters" / "__init__.py").is_file():
    __path__.append(str(_checkout))


def __getattr__(name: str):  # lazy, so `medgemma --help` does not load numpy, gguf or llama.cpp
    if name in ("convert", "ConvertResult"):
        import importlib

        _m = importlib.import_module("medgemma_cli.conversion")

        return getattr(_m, name)
    if name == "make_checkpoint":
        from medgemma_cli.synthetic import make_checkpoint

        return make_checkpoint
    if name in ("list_models", "home"):
        from medgemma_cli import store

        return getattr(store, name)
    lazy = {
        "run_demo": "medgemma_cli.demo", "ask": "medgemma_cli.answering", "ask_many": "medgemma_cli.answering",
        "open_session": "medgemma_cli.answering", "AskOptions": "medgemma_cli.answering",
        "classify": "medgemma_cli.siglip", "embed": "medgemma_cli.siglip", "run_bench": "medgemma_cli.bench",
        "run_batch": "medgemma_cli.batch",
        "ServerOptions": "medgemma_cli.batch", "ClassifyOptions": "medgemma_cli.batch",
        "write_report": "medgemma_cli.batch.report", "run_doctor": "medgemma_cli.doctor",
        "cache_usage": "medgemma_cli.llama.caches", "clear_cache": "medgemma_cli.llama.caches",
        "extract_labs": "medgemma_cli.labs", "LabReport": "medgemma_cli.labs", "lab_schema": "medgemma_cli.labs",
    }
    if name in lazy:
        import importlib

        return getattr(importlib.import_module(lazy[name]), name)
    raise AttributeError(name)
