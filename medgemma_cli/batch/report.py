"""One self-contained HTML file for reviewing a batch: what the model saw for each unit, the answers, the errors."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.atomic import replace_text, replacing

THUMB = 160


def thumbnails_dir(results: Path) -> Path:
    return results.with_name(results.name + ".thumbs")


def save_thumbnail(results: Path, unit_id: str, images: list[np.ndarray], keep_aspect: bool = False) -> None:
    """Up to four of the images the model received (first, middle, last slices), side by side; with
    `keep_aspect`, whole pictures (a slide overview with its patches outlined) at their own proportions.

    JPEG: a preview for review, not a diagnostic image; it costs a tenth of a millisecond where PNG took three,
    and on a fast model that time competes with the model for the CPU."""
    from PIL import Image

    if not images:
        return
    picks = sorted({0, len(images) // 3, 2 * len(images) // 3, len(images) - 1})[:4]
    if keep_aspect:
        tiles = [Image.fromarray(images[i]) for i in picks]
    else:
        tiles = [Image.fromarray(images[i]).resize((THUMB, THUMB)) for i in picks]
    sheet = Image.new("RGB", (sum(t.width for t in tiles), max(t.height for t in tiles)), "white")
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width
    folder = thumbnails_dir(results)
    folder.mkdir(parents=True, exist_ok=True)
    name = _thumb_name(unit_id)
    with replacing(folder / name) as tmp:
        sheet.save(tmp, format="JPEG", quality=85)


def _thumb_name(unit_id: str) -> str:
    return base64.urlsafe_b64encode(unit_id.encode()).decode().rstrip("=")[:120] + ".jpg"


def _thumb_data(results: Path, unit_id: str) -> str | None:
    path = thumbnails_dir(results) / _thumb_name(unit_id)
    if not path.is_file():
        return None
    return "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()


def load_records(results: Path) -> list[dict[str, Any]]:
    if results.suffix.lower() == ".csv":
        import csv

        with open(results, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
        for r in rows:
            r["files"] = r["files"].split(";") if r.get("files") else []
            r["error"] = r.get("error") or None
            r["classify"] = json.loads(r["classify"]) if r.get("classify") else None
        return rows
    out = []
    for line in results.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _classification_table(cls: dict[str, Any]) -> str:
    e = html.escape
    several = cls.get("images", 1) > 1
    head = "<tr><th>MedSigLIP label</th><th>mean</th>" + ("<th>max</th>" if several else "") + "</tr>"
    rows = []
    for label, mean in sorted(cls["mean"].items(), key=lambda kv: -kv[1]):
        top = f"<td>{cls['max'][label]:.3f}</td>" if several else ""
        rows.append(f"<tr><td>{e(label)}</td><td>{mean:.3f}</td>{top}</tr>")
    note = f" over {cls['images']} images" if several else ""
    return (f'<table class="cls"><caption class="meta">zero-shot probabilities{note}</caption>'
            f'{head}{"".join(rows)}</table>')


def write_report(results: Path, report: Path, title: str = "MedGemma batch") -> Path:
    """Group records by unit; embed thumbnails as data URIs so the file opens anywhere, offline."""
    records = load_records(results)
    units: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        units.setdefault(r["unit"], []).append(r)
    failed = sum(1 for rs in units.values() if any(r.get("error") for r in rs))
    e = html.escape
    parts = [f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;color:#222}} .unit{{border:1px solid #ccc;border-radius:6px;
padding:1em;margin:1em 0}} .err{{border-color:#c33;background:#fff4f4}} .qa dt{{font-weight:600;margin-top:.6em}}
.qa dd{{margin:0 0 0 1em;white-space:pre-wrap}} .cls td,.cls th{{padding:0 .8em 0 0;text-align:left}}
.meta{{color:#666;font-size:12px}} img{{max-width:100%}}</style>
</head><body><h1>{e(title)}</h1><p class="meta">{_n(len(units), "unit")} ·
{_n(len(records), "answer")} · {failed} failed ·
source: {e(results.name)}.</p>"""]
    for uid, rs in units.items():
        first = rs[0]
        err = next((r.get("error") for r in rs if r.get("error")), None)
        thumb = _thumb_data(results, uid)
        parts.append(f'<section class="unit{" err" if err else ""}" id="{e(uid)}">'
                     f'<h2>{e(first.get("modality") or "image")} · {e(", ".join(first.get("files") or []))}</h2>'
                     f'<p class="meta">unit {e(uid)} · {e(str(first.get("images_sent", "")))} image(s) sent · '
                     f'model {e(str(first.get("model", "")))}</p>')
        if thumb:
            parts.append(f'<img alt="what the model saw" src="{thumb}">')
        if err:
            parts.append(f"<p><strong>Error:</strong> {e(str(err))}</p>")
        if cls := first.get("classify"):
            parts.append(_classification_table(cls))
        parts.append('<dl class="qa">')
        for r in rs:
            parts.append(f"<dt>{e(str(r.get('question', '')))}</dt><dd>{e(str(r.get('answer') or ''))}</dd>")
        parts.append("</dl></section>")
    parts.append("</body></html>\n")
    replace_text(report, "".join(parts))
    return report
