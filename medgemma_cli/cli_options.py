"""Options that several commands share, declared once (as huggingface_hub's CLI does): a flag means the same
thing, with the same default and help, wherever it appears. Defaults come from the library's own constants."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class VisionBackend(str, Enum):
    auto = "auto"
    onnx = "onnx"
    mtmd = "mtmd"


class UnitKind(str, Enum):
    series = "series"
    study = "study"
    file = "file"


class Magnification(str, Enum):
    x5 = "5x"
    x10 = "10x"
    x20 = "20x"


class RecordFormat(str, Enum):
    jsonl = "jsonl"
    csv = "csv"


class KvType(str, Enum):
    f16 = "f16"
    q8_0 = "q8_0"


class VisionOnnx(str, Enum):
    int8 = "int8"
    fp32 = "fp32"
    none = "none"


def flag(name: str, help: str) -> typer.models.OptionInfo:  # `help`: Typer's own parameter name
    """A boolean switch, shown without a `<bool>` placeholder."""
    return typer.Option(name, help=help, metavar="")


# the model
Model = Annotated[Path | None, typer.Option(
    "--model", "-m", help="Converted model folder or its name in the store \\[default: the newest].")]
Gguf = Annotated[Path | None, typer.Option(
    "--gguf", help="A text-model GGUF from elsewhere (with --mmproj for images).")]
Mmproj = Annotated[Path | None, typer.Option("--mmproj", help="The vision projector GGUF that goes with --gguf.")]
Threads = Annotated[int | None, typer.Option("--threads", "-t", help="CPU threads \\[default: physical cores].")]
GpuLayers = Annotated[int | None, typer.Option(
    "--gpu-layers", help="Layers offloaded to the GPU \\[default: all when the build supports it].")]
Backend = Annotated[VisionBackend, typer.Option(
    "--vision-backend", case_sensitive=False,
    help="auto: ONNX Runtime on CPU-only runs when vision.onnx exists, else libmtmd.")]
KvCache = Annotated[KvType, typer.Option(
    "--kv-type", case_sensitive=False,
    help="KV cache type: f16, or q8_0 for half its memory (with flash attention; logits change slightly).")]
NoMemoryCheck = Annotated[bool, flag(
    "--no-memory-check", "Go on even when the expected peak memory exceeds what this machine has available.")]

# the prompt and the answer
System = Annotated[str | None, typer.Option(
    "--system", help='System prompt, e.g. "You are an expert radiologist."')]
MaxTokens = Annotated[int | None, typer.Option(
    "--max-tokens", help="Longest answer (per question), in tokens \\[default: 512; with --think the recipe's 1500 "
                         "with images, 2000 text only].")]
Temperature = Annotated[float, typer.Option("--temperature", help="0 = greedy (as the reference evaluations).")]
Seed = Annotated[int, typer.Option("--seed", help="Sampling seed (with --temperature > 0).")]
MaxSlices = Annotated[int, typer.Option("--max-slices", help="Most slices sent from one series, sampled evenly.")]
SlideMagnification = Annotated[Magnification, typer.Option(
    "--magnification", case_sensitive=False,
    help="Whole slides: the pyramid level closest to this magnification (by pixel spacing, 10x ≈ 1 µm/px).")]
MaxPatches = Annotated[int, typer.Option(
    "--max-patches", min=1, help="Whole slides: most 896 px tissue patches sent, spread evenly in raster order.")]
WithMetadata = Annotated[bool, flag(
    "--with-metadata", "Add modality, body part, view, age and sex (never names, IDs or dates).")]
IncludePhi = Annotated[bool, flag(
    "--include-phi", "Leave the patient's name, IDs, birth date, physicians and institution in notes and SR text "
    "(otherwise [NAME], [ID], [DATE], [INSTITUTION]); batch: also in records, with DICOM UIDs as unit ids.")]

Think = Annotated[bool, flag(
    "--think", "MedGemma 1.5's thinking switch (the recipe's system sentence and token budgets); the trace is left "
    "out unless --show-thinking.")]
ShowThinking = Annotated[bool, flag("--show-thinking", "Keep the model's thinking trace in the output.")]
Schema = Annotated[Path | None, typer.Option(
    "--schema", help="A JSON Schema file: the answer is JSON valid under it (sampling constrained by a grammar).")]
Prior = Annotated[list[Path] | None, typer.Option(
    "--prior", help="A file or folder of an earlier study (repeatable): sent before the current one, for comparison.")]
LabelTimepoints = Annotated[bool, flag(
    "--label-timepoints", "Put 'Prior study:' and 'Current study:' before each study's images (none by default, "
    "as in Google's recipe).")]
# what is kept for later questions
NoCache = Annotated[bool, flag(
    "--no-cache", "Neither reuse nor keep image embeddings and prompt states (the store's cache folder).")]
CacheSize = Annotated[float, typer.Option(
    "--cache-size", metavar="GB", help="Most the cache folder may hold; least recently used entries go first.")]

# output
Json = Annotated[bool, flag("--json", "Print JSON.")]
