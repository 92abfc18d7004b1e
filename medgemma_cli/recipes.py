"""The wording of MedGemma 1.5's task recipes, in one readable place, each with where it comes from.

Google's reference notebooks (github.com/google-health/medgemma, notebooks/ at commit ca63390, January 2026)
and the MedGemma 1.5 technical report (arXiv 2604.05081) give these prompts; the model was trained and
evaluated with them, so they are used verbatim. A user may replace any of them: a file
`<MEDGEMMA_HOME>/prompts/<name>.txt` (or in the folder $MEDGEMMA_PROMPTS names) is used instead of the text
here, with the same {placeholders}. `medgemma prompts` lists them and where each one is read from.

Standard library only (and our errors): the CLI reads the names and budgets without loading numpy or a model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medgemma_cli.errors import InputError


@dataclass(frozen=True)
class Template:
    text: str
    source: str  # where the wording comes from
    placeholders: tuple[str, ...] = ()


TEMPLATES: dict[str, Template] = {
    # notebooks/quick_start_with_model_garden.ipynb and the technical report's appendix B: the thinking switch is
    # this sentence at the start of the system text (prepended to the user turn by the Gemma 3 chat template)
    "think": Template(
        "SYSTEM INSTRUCTION: think silently if needed.",
        "quick_start_with_model_garden.ipynb (thinking variants); MedGemma 1.5 technical report, appendix B"),
    # notebooks/cxr_anatomy_localization_with_hugging_face.ipynb: the prompt after the image, word for word
    # (the notebook's doubled braces are Python format escapes; here they are single)
    "locate": Template(
        "Instructions:\n"
        "The following user query will require outputting bounding boxes. The format of bounding boxes coordinates "
        "is [y0, x0, y1, x1] where (y0, x0) must be top-left corner and (y1, x1) the bottom-right corner. This "
        "implies that x0 < x1 and y0 < y1. Always normalize the x and y coordinates the range [0, 1000], meaning "
        "that a bounding box starting at 15% of the image width would be associated with an x coordinate of 150. "
        "You MUST output a single parseable json list of objects enclosed into ```json...``` brackets, for "
        'instance ```json[{"box_2d": [800, 3, 840, 471], "label": "car"}, {"box_2d": [400, 22, 600, 73], '
        '"label": "dog"}]``` is a valid output. Now answer to the user query.\n\n'
        'Remember "left" refers to the patient\'s left side where the heart is and sometimes underneath an L in '
        "the upper right corner of the image.\n\n"
        "Query:\n"
        "Where is the {finding}? Don't give a final answer without reasoning. Output the final answer in the "
        'format "Final Answer: X" where X is a JSON list of objects. The object needs a "box_2d" and "label" key. '
        "Answer:",
        "cxr_anatomy_localization_with_hugging_face.ipynb (added 2ef1539, 2026-01-09)", ("finding",)),
    # notebooks/cxr_longitudinal_comparison_with_hugging_face.ipynb: prior image, current image, this text
    # (the notebook's line breaks kept); `medgemma ask "$(medgemma prompts compare)" NEW --prior OLD` asks it
    "compare": Template(
        "Provide a comparison of these two images and include details from\nthe image which students should take "
        "note of when reading longitudinal CXR\n",
        "cxr_longitudinal_comparison_with_hugging_face.ipynb (prompt of b60f06b)"),
    # MedGemma 1.5 technical report (arXiv 2604.05081), table 11: the lab-report extraction prompt, the same for all
    # four evaluation sets, sent after one page image (`medgemma extract labs`). The table shows three lines; whether
    # the prompt had newlines or spaces there is not stated, so the lines are kept
    "labs": Template(
        "You are a Clinical Data Extraction Specialist. Your job is to parse lab reports with high precision.\n"
        "From the given lab report, extract all lab tests into a JSON list.\n"
        "Each test object in the list must include: name, result, unit, range, panel, method, specimen, "
        "sample_collection_time (formatted as DD-MM-YYYY HH:MM:SS)",
        "MedGemma 1.5 technical report (arXiv 2604.05081), table 11 (document understanding)"),
    # Not in Google's material (the notebook puts nothing between the images; the report does not say): the
    # labels `--label-timepoints` adds before each image, our own wording
    "prior-label": Template("Prior study:", "medgemma-cli (no reference wording exists)"),
    "current-label": Template("Current study:", "medgemma-cli (no reference wording exists)"),
}

# Token budgets (max_tokens) of the thinking recipe: quick_start_with_model_garden.ipynb sets 1500 for image
# tasks and 2000 for text-only ones when thinking is on (500 and 1000 without)
THINK_TOKENS_IMAGES = 1500
THINK_TOKENS_TEXT = 2000
LOCATE_TOKENS = 1000  # cxr_anatomy_localization_with_hugging_face.ipynb: max_new_tokens=1000, greedy
# The report gives no budget for lab reports; the notebooks use 2000 (HF) or 500 (Model Garden). A dense page of
# 40-50 tests takes ~3000 tokens of JSON, and a cut answer loses the whole page, so the budget errs on the large side
LABS_TOKENS = 4096
PROMPTS_ENV = "MEDGEMMA_PROMPTS"


def prompts_dir() -> Path:
    """Where the user's replacements are looked for."""
    if env := os.environ.get(PROMPTS_ENV):
        return Path(env)
    from medgemma_cli.store import home

    return home() / "prompts"


def override_path(name: str) -> Path:
    return prompts_dir() / f"{name}.txt"


def template(name: str) -> str:
    """The wording to use: the user's file if there is one (checked for its placeholders), else the recipe's."""
    t = TEMPLATES[name]
    path = override_path(name)
    if not path.is_file():
        return t.text
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(path, f"cannot read this prompt template ({e})") from None
    for p in t.placeholders:
        if "{" + p + "}" not in text:
            raise InputError(path, f"the {name!r} template must contain {{{p}}}")
    return text


def describe() -> list[dict[str, Any]]:
    """Every template: its name, where its wording comes from, its placeholders, and the user's file if any."""
    return [{"name": name, "source": t.source, "placeholders": list(t.placeholders), "file": str(override_path(name)),
             "replaced": override_path(name).is_file()} for name, t in TEMPLATES.items()]


def fill(name: str, **values: str) -> str:
    """A template with its placeholders filled (only those: other braces in the text stay as written)."""
    text = template(name)
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


def with_thinking(system: str | None) -> str:
    """The system text with the thinking switch in front (the recipe's sentence, then the user's own)."""
    switch = template("think").strip()
    return f"{switch} {system.strip()}" if system and system.strip() else switch


def token_budget(max_tokens: int | None, think: bool, images: bool, default: int) -> int:
    """--max-tokens if given; else the thinking recipe's larger budget with --think, else `default`."""
    if max_tokens is not None:
        return max_tokens
    if think:
        return THINK_TOKENS_IMAGES if images else THINK_TOKENS_TEXT
    return default
