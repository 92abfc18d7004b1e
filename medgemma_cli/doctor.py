"""`medgemma doctor`: what this machine will do, and why, on one screen."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from medgemma_cli import machine, store
from medgemma_cli.llama import loader as llama_loader


@dataclass
class DoctorReport:
    cpu: dict[str, Any]
    memory_bytes: int
    threads: int  # what ask/chat/batch use unless --threads says otherwise
    llama_cpp: dict[str, Any]
    extra_buffers: dict[str, Any]
    onnxruntime: dict[str, Any]
    store: dict[str, Any]
    python: str = field(default_factory=lambda: f"{platform.python_version()} ({sys.executable})")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _onnxruntime() -> dict[str, Any]:
    try:
        import onnxruntime as ort
    except ImportError as e:
        return {"version": None, "error": str(e)}
    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}


def _llama_cpp() -> dict[str, Any]:
    import llama_cpp

    build = llama_loader.llama_build()
    features = [part.split("=")[0].split(":")[-1].strip() for part in build["system_info"].split("|")
                if part.strip().endswith("= 1")]
    return {"version": build["version"], "features": features, "system_info": build["system_info"],
            "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload())}


def run_doctor(probe: bool = True, reprobe: bool = False) -> DoctorReport:
    """Gather the report; runs the extra-buffer probe when this machine has no verdict yet (or `reprobe`)."""
    if reprobe:
        llama_loader.forget()
        key = llama_loader.machine_key()
        v = llama_loader.run_probe(key)
        if v.cacheable:
            llama_loader.remember(key, v)
    else:
        v = llama_loader.verdict(probe=probe)
    models = [{"name": m.name, "kind": m.kind, "bytes": m.size} for m in store.list_models()]
    return DoctorReport(
        cpu={"model": machine.cpu_model(), "logical_cores": os.cpu_count() or 1,
             "physical_cores": machine.physical_cores(), "architecture": platform.machine(),
             "features": machine.cpu_features()},
        memory_bytes=machine.total_memory_bytes(),
        threads=machine.physical_cores(),
        llama_cpp=_llama_cpp(),
        extra_buffers={**{k: val for k, val in v.as_dict().items() if k != "cacheable"},
                       "verdict_file": str(llama_loader.verdict_file())},
        onnxruntime=_onnxruntime(),
        store={"home": str(store.home()), "models": models},
    )
