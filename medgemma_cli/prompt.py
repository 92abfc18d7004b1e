"""The user turn MedGemma gets: notes as context, then the images (slices labelled), then the question."""

from __future__ import annotations

from typing import Any

from medgemma_cli.inputs.collect import Collected

NOTE_TRUNCATED = "[… note truncated to fit the context: {n} characters left out]"


def metadata_line(metadata: list[dict[str, str]]) -> str:
    """Only the non-identifying fields (modality, body part, view, age, sex)."""
    rows = ["; ".join(f"{k}: {v}" for k, v in m.items()) for m in metadata if m]
    return "Image metadata: " + " | ".join(rows) if rows else ""


def build_messages(question: str, inputs: Collected, system: str | None = None, with_metadata: bool = False,
                   notes_text: list[tuple[str, str]] | None = None) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = []
    for name, text in notes_text if notes_text is not None else inputs.notes:
        content.append({"type": "text", "text": f"Clinical note ({name}):\n{text}"})
    for image in inputs.images:
        if image.heading:
            content.append({"type": "text", "text": image.heading})
        content.append({"type": "image"})
        if image.label:
            content.append({"type": "text", "text": image.label})
    if with_metadata and (line := metadata_line(inputs.metadata)):
        content.append({"type": "text", "text": line})
    content.append({"type": "text", "text": question})
    messages: list[dict[str, Any]] = []
    if system:
        messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
    messages.append({"role": "user", "content": content})
    return messages


def truncate_notes(notes: list[tuple[str, str]], keep_chars: int) -> tuple[list[tuple[str, str]], int]:
    """Keep the first `keep_chars` characters of the notes (in order); say visibly what was cut."""
    out, cut = [], 0
    budget = keep_chars
    for name, text in notes:
        if len(text) <= budget:
            out.append((name, text))
            budget -= len(text)
        else:
            cut += len(text) - max(budget, 0)
            kept = text[: max(budget, 0)]
            out.append((name, kept + "\n" + NOTE_TRUNCATED.format(n=len(text) - len(kept))))
            budget = 0
    return out, cut
