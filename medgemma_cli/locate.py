"""`medgemma locate`: where a finding is on a chest X-ray, as boxes on the image (MedGemma 1.5's localization recipe).

The image is zero-padded to a centred square (the recipe's preprocessing), and the model answers each finding's
query with reasoning, then `Final Answer: ```json[{"box_2d": [y0, x0, y1, x1], "label": …}]``` `, the
coordinates normalised to 0–1000 on that square. A grammar holds the answer to that shape (`llama.grammar`);
here the boxes are read back, mapped to the original pixel grid (and millimetres where the DICOM header gives
a pixel spacing) and drawn. A box that does not parse, is degenerate or lies in the padding is reported,
never invented or repaired.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.errors import InputError, MedgemmaError
from medgemma_cli.inputs.images import square_padding
from medgemma_cli.llama.grammar import THINK_CLOSE, max_chars, reasoned_answer

SCALE = 1000  # box_2d coordinates run 0..SCALE over the padded square
MAX_BOXES = 2  # per finding (a bilateral structure); the grammar allows no more, so the JSON stays short
LABEL_CHARS = 80
COLOURS = [(255, 64, 64), (64, 200, 255), (255, 200, 0), (80, 255, 120), (255, 120, 255), (255, 255, 255)]


def box_schema(finding: str) -> dict[str, Any]:
    """The JSON the recipe asks for: a list of {"box_2d": 4 integers in 0..1000, "label": the finding}."""
    return {"type": "array", "minItems": 0, "maxItems": MAX_BOXES,
            "items": {"type": "object", "additionalProperties": False, "required": ["box_2d", "label"],
                      "properties": {"box_2d": {"type": "array", "minItems": 4, "maxItems": 4,
                                                "items": {"type": "integer", "minimum": 0, "maximum": SCALE}},
                                     "label": {"const": finding[:LABEL_CHARS]}}}}


def answer_reserve(finding: str) -> int:
    """Tokens kept for the fenced JSON (a token is at least one character)."""
    return (max_chars(box_schema(finding)) or 0) + len('\nFinal Answer: ```json\n\n```') + 4


@dataclass(frozen=True)
class Geometry:
    """The image the boxes are about: the rendering's grid, its padding to a square, and the original grid."""
    height: int  # the rendering's size (what is drawn on)
    width: int
    original_height: int  # the stored image's size (DICOM Rows/Columns; a huge frame may render smaller)
    original_width: int
    spacing_mm: tuple[float, float] | None = None  # (row spacing, column spacing) of the original grid
    spacing_source: str | None = None  # PixelSpacing | ImagerPixelSpacing

    @property
    def padding(self) -> tuple[int, int, int]:
        return square_padding(self.height, self.width)


@dataclass
class Box:
    label: str
    box_2d: list[float]  # as the model wrote it: [y0, x0, y1, x1], 0..1000 on the padded square
    pixels: dict[str, float]  # x0, y0, x1, y1 in the original image's pixels (edges, x1/y1 exclusive)
    normalised: dict[str, float]  # the same over the original image's width and height, 0..1
    drawn: dict[str, int]  # x0, y0, x1, y1 on the rendering (what --out shows)
    size_mm: dict[str, float] | None = None  # width, height
    clipped: bool = False  # part of it lay in the padding and was cut at the image's edge


@dataclass
class FindingResult:
    finding: str
    boxes: list[Box] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # boxes not drawn, and why; or why nothing parsed
    answer: str = ""  # the model's text (reasoning and the final answer), thinking left out
    thinking: str | None = None
    stopped: str = ""
    closed_early: bool = False  # the reasoning was cut to leave room for the JSON


def strip_thinking(text: str) -> str:
    """What follows the last thinking marker (the recipe splits on <unused95>)."""
    return text.rsplit(THINK_CLOSE, 1)[-1]


def parse_answer(text: str) -> tuple[list[Any] | None, str | None]:
    """The JSON list of a localization answer, fenced (```json … ```) or not; (None, why) when there is none."""
    text = strip_thinking(text)
    start = text.find("```json")
    if start >= 0:
        body = text[start + len("```json"):]
        end = body.rfind("```")
        if end < 0:
            return None, "the ```json fence is never closed (answer cut short?)"
        body = body[:end]
    else:
        m = re.search(r"Final Answer:\s*", text)
        body = text[m.end():] if m else text
        starts = [i for i in (body.find("["), body.find("{")) if i >= 0]
        if not starts:
            return None, "no JSON list in the answer"
        first = min(starts)
        body = body[first:body.rfind("]" if body[first] == "[" else "}") + 1]
    try:
        data = json.loads(body)
    except json.JSONDecodeError as e:
        return None, f"the final answer is not JSON ({e.msg} at character {e.pos})"
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return None, f"the final answer is a JSON {type(data).__name__}, not a list of boxes"
    return data, None


def to_box(item: Any, geo: Geometry) -> tuple[Box | None, str | None]:
    """One answer object → a box in the original pixels, or why it cannot be one."""
    if not isinstance(item, dict) or "box_2d" not in item:
        return None, f"an object without box_2d: {json.dumps(item)[:80]}"
    raw, label = item["box_2d"], str(item.get("label", ""))
    if (not isinstance(raw, list) or len(raw) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw)):
        return None, f"box_2d is not four numbers: {json.dumps(raw)[:80]}"
    y0, x0, y1, x1 = (float(v) for v in raw)
    if not all(0 <= v <= SCALE for v in (y0, x0, y1, x1)):
        return None, f"box_2d {raw} is outside 0..{SCALE}"
    if not (y0 < y1 and x0 < x1):
        return None, f"box_2d {raw} is degenerate (it needs y0 < y1 and x0 < x1)"
    side, top, left = geo.padding
    # on the rendering: the padded square's fraction, minus the padding, cut at the image's edges
    ry0, ry1 = (min(max(v / SCALE * side - top, 0.0), geo.height) for v in (y0, y1))
    rx0, rx1 = (min(max(v / SCALE * side - left, 0.0), geo.width) for v in (x0, x1))
    if not (ry0 < ry1 and rx0 < rx1):
        return None, f"box_2d {raw} lies in the padding, outside the image"
    clipped = (ry0, ry1, rx0, rx1) != (y0 / SCALE * side - top, y1 / SCALE * side - top,
                                       x0 / SCALE * side - left, x1 / SCALE * side - left)
    sy, sx = geo.original_height / geo.height, geo.original_width / geo.width
    px = {"x0": rx0 * sx, "y0": ry0 * sy, "x1": rx1 * sx, "y1": ry1 * sy}
    norm = {"x0": px["x0"] / geo.original_width, "y0": px["y0"] / geo.original_height,
            "x1": px["x1"] / geo.original_width, "y1": px["y1"] / geo.original_height}
    size = None
    if geo.spacing_mm is not None:
        size = {"width": round((px["x1"] - px["x0"]) * geo.spacing_mm[1], 2),
                "height": round((px["y1"] - px["y0"]) * geo.spacing_mm[0], 2)}
    drawn = {"x0": int(np.floor(rx0)), "y0": int(np.floor(ry0)), "x1": int(np.ceil(rx1)), "y1": int(np.ceil(ry1))}
    return Box(label, [float(v) if not float(v).is_integer() else int(v) for v in raw],
               {k: round(v, 2) for k, v in px.items()}, {k: round(v, 5) for k, v in norm.items()}, drawn,
               size, clipped), None


def read_boxes(finding: str, answer: str, geo: Geometry) -> FindingResult:
    result = FindingResult(finding, answer=answer)
    items, why = parse_answer(answer)
    if items is None:
        result.problems.append(why or "no answer")
        return result
    if not items:
        result.problems.append("the model gave no box (an empty list)")
    for item in items:
        box, problem = to_box(item, geo)
        if box is not None:
            result.boxes.append(box)
        else:
            result.problems.append(problem or "unusable box")
    return result


def geometry(header: Any, rendering: np.ndarray) -> Geometry:
    """The grids of one image; `header` is its DICOM dataset, or None for PNG/JPEG."""
    h, w = rendering.shape[:2]
    if header is None:
        return Geometry(h, w, h, w)
    from medgemma_cli.inputs.dicom import HeaderValueError, integer, numbers

    try:
        rows, cols = integer(header, "Rows") or h, integer(header, "Columns") or w
        spacing, source = None, None
        for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
            values = numbers(header, keyword, count=2)
            if values is not None and all(v > 0 for v in values):
                spacing, source = (float(values[0]), float(values[1])), keyword
                break
    except HeaderValueError:
        rows, cols, spacing, source = h, w, None, None
    return Geometry(h, w, rows, cols, spacing, source)


def draw(rendering: np.ndarray, findings: list[FindingResult], path: Path) -> None:
    """The rendering with each finding's boxes outlined and labelled; written whole or not at all."""
    from PIL import Image, ImageDraw, ImageFont

    from medgemma_cli.atomic import replacing, write_errors

    im = Image.fromarray(np.ascontiguousarray(rendering, dtype=np.uint8), "RGB")
    pen = ImageDraw.Draw(im)
    pen.fontmode = "1"  # labels in the box's own colour, no blended edge pixels over the image
    h, w = rendering.shape[:2]
    width = max(2, round(max(h, w) / 300))
    font = ImageFont.load_default(size=max(12, round(max(h, w) / 40)))
    for i, f in enumerate(findings):
        colour = COLOURS[i % len(COLOURS)]
        for b in f.boxes:
            d = b.drawn
            pen.rectangle([d["x0"], d["y0"], d["x1"] - 1, d["y1"] - 1], outline=colour, width=width)
            pen.text((d["x0"] + width + 1, d["y0"] + width + 1), b.label, fill=colour, font=font)
    with write_errors(path), replacing(path) as tmp:
        im.save(tmp, format="PNG")


@dataclass
class LocateResult:
    image: str
    geometry: dict[str, Any]
    findings: list[FindingResult]
    model: dict[str, Any]
    warnings: list[str]
    drawn: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def boxes(self) -> int:
        return sum(len(f.boxes) for f in self.findings)


def locate(findings: list[str], image: Path, *, model: Path | None = None, gguf: Path | None = None,
           mmproj: Path | None = None, options: Any = None, out: Path | None = None,
           on_text: Callable[[str, str], None] | None = None) -> LocateResult:
    """Boxes for each finding on one image (DICOM, PNG or JPEG): the image is encoded once, each finding is its
    own query. `on_text(finding, piece)` streams the answers."""
    from medgemma_cli.answering import AskOptions, open_session
    from medgemma_cli.recipes import LOCATE_TOKENS, fill, token_budget

    findings = [f.strip() for f in findings if f.strip()]
    if not findings:
        raise MedgemmaError("name at least one finding to locate, e.g. \"right clavicle\"")
    opts = AskOptions(**{**(options or AskOptions()).__dict__, "pad_square": True})
    opts.max_tokens = token_budget(opts.max_tokens, opts.think, True, LOCATE_TOKENS)
    if out is not None and out.suffix.lower() != ".png":
        raise InputError(out, "--out writes a PNG; name it .png")
    questions = [fill("locate", finding=f) for f in findings]
    conversation = open_session(max(questions, key=len), [image], model=model, gguf=gguf, mmproj=mmproj,
                                options=opts)
    try:
        session = conversation.session
        inputs = session.inputs
        if len(inputs.images) != 1 or inputs.notes:
            raise InputError(image, f"locate takes one 2-D image; this gives {len(inputs.images)} image(s)"
                                    + (" and text" if inputs.notes else ""))
        rendering = inputs.images[0].full
        assert rendering is not None  # pad_square keeps the rendering
        header = inputs.volumes[0].slices[0].ds if inputs.volumes else None
        geo = geometry(header, rendering)
        results = []
        for finding, question in zip(findings, questions, strict=True):
            constraint = reasoned_answer(box_schema(finding), answer_reserve(finding))
            stream = (lambda piece, f=finding: on_text(f, piece)) if on_text else None
            turn = session.ask(question, conversation.max_tokens, opts.temperature, opts.seed, opts.show_thinking,
                               stream, constraint=constraint)
            r = read_boxes(finding, turn.answer, geo)
            r.thinking = turn.thinking if opts.show_thinking else None
            r.stopped, r.closed_early = turn.stopped, turn.closed_early
            results.append(r)
        warnings = list(inputs.warnings) + conversation.warnings
        if any(r.closed_early for r in results):
            warnings.append("the reasoning was cut short to leave room for the boxes within --max-tokens")
        if out is not None:
            draw(rendering, results, out)
        engine = session.engine
        return LocateResult(
            str(image), {**asdict(geo), "padded_side": geo.padding[0], "pad_top": geo.padding[1],
                         "pad_left": geo.padding[2]},
            results, {"name": conversation.model.name, "n_ctx": engine.n_ctx, "vision_backend": engine.vision_backend},
            warnings, str(out) if out is not None else None)
    finally:
        conversation.close()
