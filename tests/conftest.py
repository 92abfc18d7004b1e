"""Shared fixtures: a tiny random MedGemma checkpoint, its conversions, and transformers as the oracle.

Everything is generated here; nothing is downloaded. MEDGEMMA_HOME points at a temporary folder so the
tests never touch the user's store.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ["MEDGEMMA_HOME"] = tempfile.mkdtemp(prefix="medgemma-test-home-")
# One extra-buffer verdict for the whole run, shared by the commands the tests start with homes of their own
# (the probe runs once, not per test); the probe's own tests point elsewhere.
os.environ["MEDGEMMA_VERDICT_FILE"] = os.path.join(os.environ["MEDGEMMA_HOME"], "extra-buffers.json")
os.environ.pop("MEDGEMMA_EXTRA_BUFFERS", None)
os.environ.pop("MEDGEMMA_TEST_CRASH", None)

# --- offline, checked in every test ------------------------------------------------------------------------
# Any socket made while our own code is on the stack fails the test, unless it is marked `uses_network`
# (batch --server and its HTTP client talk to servers the tests start on 127.0.0.1). Sockets made by the
# reference oracles (transformers, torch) or by test code itself are not ours and are not counted.
_socket_use: list[str] = []
_watching = [False]


def _our_roots() -> tuple[str, ...]:
    import medgemma_cli
    import medgemma_cli.converters
    import medgemma_cli.kernels

    return tuple(str(Path(m.__file__).parent) + os.sep for m in (medgemma_cli, medgemma_cli.converters,
                                                                  medgemma_cli.kernels))


_ROOTS = _our_roots()


def _audit(event: str, args: tuple) -> None:
    if not _watching[0] or event not in ("socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo",
                                         "socket.sendto", "socket.gethostbyname"):
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_ROOTS):
            _socket_use.append(f"{event} {args[1:] if event == 'socket.__new__' else args[-1]!r} from "
                               f"{frame.f_code.co_filename}:{frame.f_lineno}")
            return
        frame = frame.f_back


sys.addaudithook(_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from _watched(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _watched(item))


def _watched(item):
    _socket_use.clear()
    _watching[0] = item.get_closest_marker("uses_network") is None
    try:
        result = yield
    finally:
        _watching[0] = False
    if _socket_use:
        pytest.fail("our offline code made a socket:\n" + "\n".join(_socket_use[:5]), pytrace=False)
    return result


CHAT = [
    {"role": "system", "content": "You are an expert radiologist."},
    {"role": "user", "content": "Describe the findings on this chest radiograph: bilateral pleural effusion, "
                                "1234 mg daily, consolidation in the right lower lobe? Is there evidence of "
                                "pneumothorax or cardiomegaly? Explain why."},
    {"role": "assistant", "content": "No pneumothorax. The heart size is normal."},
    {"role": "user", "content": "What about the mediastinum, and would you recommend follow up computed tomography?"},
]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medgemma_cli.synthetic import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-medgemma", "tiny")


@pytest.fixture(scope="session")
def convert_tiny(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """convert_tiny(preset, mmproj) → output folder; each combination is converted once per session."""
    from medgemma_cli.conversion import convert

    cache: dict[tuple[str, str], Path] = {}
    root = tmp_path_factory.mktemp("converted")

    def run(preset: str, mmproj: str = "F16", vision_onnx: str = "int8") -> Path:
        key = (preset, mmproj, vision_onnx)
        if key not in cache:
            cache[key] = convert(tiny_ckpt, root / f"{preset}-{mmproj}-{vision_onnx}", preset=preset,
                                 mmproj_type=mmproj, vision_onnx=vision_onnx).path
        return cache[key]

    return run


@pytest.fixture(scope="session")
def hf_tiny(tiny_ckpt: Path):
    """The reference: transformers' Gemma3ForConditionalGeneration in fp32 with eager attention."""
    torch = pytest.importorskip("torch")
    from transformers import Gemma3ForConditionalGeneration

    model, info = Gemma3ForConditionalGeneration.from_pretrained(
        tiny_ckpt, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


@pytest.fixture(scope="session")
def hf_tokenizer(tiny_ckpt: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_ckpt)


@pytest.fixture(scope="session")
def chat_prompt(hf_tokenizer) -> tuple[str, list[int]]:
    text = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 64
    return text, ids


@pytest.fixture(scope="session")
def siglip_ckpt(tmp_path_factory) -> Path:
    """A tiny random SiglipModel (transformers) with a SentencePiece vocabulary: MedSigLIP's architecture."""
    torch = pytest.importorskip("torch")
    import numpy as np
    from transformers import SiglipConfig, SiglipModel

    from medgemma_cli.synthetic import SIGLIP_SHAPES, train_siglip_tokenizer

    folder = tmp_path_factory.mktemp("siglip") / "tiny-medsiglip"
    cfg = SiglipConfig(**SIGLIP_SHAPES["tiny"])
    torch.manual_seed(0)
    model = SiglipModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name == "logit_scale":
                p.fill_(np.log(10.0))
            elif name == "logit_bias":
                p.fill_(-2.0)
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    train_siglip_tokenizer(folder / "spiece.model")
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
         "size": {"height": 32, "width": 32}, "resample": 2, "rescale_factor": 1 / 255}))
    return folder
