"""The GGUF's chat template, rendered as llama.cpp's own server renders it only in part: one place for what the
local engine and `batch --server` (against llama.cpp's native endpoint) both send.

Like the Hugging Face processor, each image is surrounded by a blank line; libmtmd adds <start_of_image> …
<end_of_image> itself, so the template's image place becomes blank line, media marker, blank line."""

from __future__ import annotations

from typing import Any

from medgemma_cli.errors import MedgemmaError

IMAGE_PLACE = "<start_of_image>"


def compile_template(text: str) -> Any:
    """A sandboxed Jinja template (the template comes from a model file: untrusted)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise MedgemmaError(f"chat template: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text)


def render(template: Any, messages: list[dict[str, Any]], bos: str) -> str:
    return template.render(messages=messages, bos_token=bos, add_generation_prompt=True)


def with_media_markers(prompt: str, marker: str, n_images: int) -> str:
    """The rendered prompt with each image place turned into `marker` between blank lines."""
    if prompt.count(IMAGE_PLACE) != n_images:
        raise MedgemmaError(f"the prompt has {prompt.count(IMAGE_PLACE)} image places for {n_images} images")
    return prompt.replace(IMAGE_PLACE, "\n\n" + marker + "\n\n")
