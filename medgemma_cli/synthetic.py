"""Complete Hugging Face-format MedGemma checkpoints with random weights, for tests, the demo and benchmarks.

Real weights are gated; these have the exact architecture, file layout, tokenizer files and processor
configs of google/medgemma-*, so everything downstream runs as it would on the real thing. Values are
random (with visible variance everywhere, norms and projector included, so mapping mistakes show).
"""

from __future__ import annotations

import io
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medgemma_cli.converters import gemma3
from medgemma_cli.converters.safetensors_io import float32_to_bf16_bits, write_file


@dataclass(frozen=True)
class Shape:
    name: str
    text: dict[str, Any]
    vision: dict[str, Any]
    image_tokens: int
    sp_pieces: int  # pieces of the trained SentencePiece model; the vocabulary is padded up to vocab_size


# The real shapes (from the published configs) and a tiny one that llama.cpp accepts with real K-quants.
SHAPES: dict[str, Shape] = {
    "tiny": Shape(
        "tiny",
        text=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64,
                  sliding_window=16, max_position_embeddings=4096),
        vision=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                    image_size=32, patch_size=4),
        image_tokens=4, sp_pieces=1000),
    "4b": Shape(
        "4b",
        text=dict(vocab_size=262208, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                  sliding_window=1024, max_position_embeddings=131072),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14),
        image_tokens=256, sp_pieces=1000),
    "27b": Shape(
        "27b",
        text=dict(vocab_size=262208, hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                  num_attention_heads=32, num_key_value_heads=16, head_dim=128, query_pre_attn_scalar=168,
                  sliding_window=1024, max_position_embeddings=131072),
        vision=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                    image_size=896, patch_size=14),
        image_tokens=256, sp_pieces=1000),
}

# MedSigLIP's towers as transformers' SiglipConfig(text_config=…, vision_config=…) takes them: the 448 px vision
# tower of google/medsiglip-448 (with a small text tower: only image embedding is benchmarked) and a tiny one for
# the tests and smoke runs. Data only: the checkpoints are made by transformers, a test-only oracle.
SIGLIP_SHAPES: dict[str, dict[str, dict[str, int]]] = {
    "448": {"vision_config": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                  num_attention_heads=16, image_size=448, patch_size=14),
            "text_config": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                                vocab_size=256, max_position_embeddings=64)},
    "tiny": {"vision_config": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=32, patch_size=8),
             "text_config": dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64)},
}

# Prefixes of the key layouts seen in the wild (see converters/gemma3.py KEY_LAYOUTS).
LAYOUTS: dict[str, dict[str, str]] = {
    "hf4": {"text": "language_model.model.", "vision": "vision_tower.vision_model.",
            "projector": "multi_modal_projector."},
    "hf5": {"text": "model.language_model.", "vision": "model.vision_tower.vision_model.",
            "projector": "model.multi_modal_projector."},
    "hf5-flat": {"text": "model.language_model.", "vision": "vision_tower.", "projector": "multi_modal_projector."},
    "model-prefixed": {"text": "model.language_model.", "vision": "model.vision_tower.",
                       "projector": "model.multi_modal_projector."},
}

SPECIAL_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<unused94>", "<unused95>", "<mask>"]
IMAGE_SOFT_TOKEN = "<image_soft_token>"

# Our own Gemma 3-style chat template: <bos>, user/model turns, the system text folded into the first user
# turn, images as <start_of_image> (expanded by the processor or by mtmd).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set prefix = messages[0]['content'] | trim -%}"
    "{%- else -%}{%- set prefix = messages[0]['content'][0]['text'] | trim -%}{%- endif -%}"
    "{%- set prefix = prefix + '\\n\\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if loop.first -%}{{ prefix }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_WORDS = (
    "the patient presents with chest pain shortness of breath cough fever chills fatigue radiograph shows "
    "bilateral pleural effusion consolidation in the right lower lobe no pneumothorax heart size is normal "
    "mediastinum unremarkable lungs are clear findings impression recommend follow up computed tomography "
    "magnetic resonance imaging contrast enhanced axial coronal sagittal slice lesion mass nodule opacity "
    "fracture vertebral body liver kidney spleen pancreas bowel obstruction appendicitis hemorrhage stroke "
    "infarct edema atelectasis cardiomegaly emphysema fibrosis calcification metastasis benign malignant "
    "history of diabetes hypertension smoking medication dose mg daily blood pressure heart rate oxygen "
    "saturation temperature laboratory results hemoglobin white cell count creatinine sodium potassium "
    "what does this image show describe the findings is there evidence of answer yes or no explain why"
).split()


def _corpus(n_lines: int = 600, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 18))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words)), str(rng.randint(0, 2000)))
        if rng.random() < 0.2:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice([".", "?", ",", ":", ""]))
    return "\n".join(lines) + "\n"


def train_tokenizer(path: Path, pieces: int) -> None:
    """A Gemma-style SentencePiece BPE model (byte fallback, no dummy prefix, digits split) with
    Gemma 3's specials: pad 0, eos 1, bos 2, unk 3, then the turn and image markers."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus().splitlines()), model_writer=model, vocab_size=pieces,
        model_type="bpe", byte_fallback=True, split_digits=True, add_dummy_prefix=False,
        remove_extra_whitespaces=False, normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
        unk_piece="<unk>", user_defined_symbols=SPECIAL_TOKENS, hard_vocab_limit=True, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )
    path.write_bytes(model.getvalue())


def train_siglip_tokenizer(path: Path, pieces: int = 256) -> None:
    """A SigLIP-style SentencePiece unigram model (pad 0, eos 1, unk 2, no bos): the tests' and the MedSigLIP
    benchmark's stand-in for MedSigLIP's own spiece.model, which only matters here as a valid vocabulary."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_corpus().lower().splitlines()), model_writer=model,
                                   vocab_size=pieces, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0,
                                   num_threads=1, minloglevel=2)
    path.write_bytes(model.getvalue())


def _tokenizer_files(folder: Path, shape: Shape) -> tuple[int, int, int, int]:
    """The tokenizer files; returns the ids of the image soft token, <start_of_image>, <end_of_image> and
    <end_of_turn>."""
    import sentencepiece as spm

    train_tokenizer(folder / "tokenizer.model", shape.sp_pieces)
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    image_soft = sp.GetPieceSize()
    decoder = {}
    for tid in range(sp.GetPieceSize()):
        piece = sp.IdToPiece(tid)
        if tid <= 3 or piece in SPECIAL_TOKENS:
            decoder[str(tid)] = {"content": piece, "lstrip": False, "normalized": False, "rstrip": False,
                                 "single_word": False, "special": True}
    decoder[str(image_soft)] = {"content": IMAGE_SOFT_TOKEN, "lstrip": False, "normalized": False,
                                "rstrip": False, "single_word": False, "special": True}
    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": IMAGE_SOFT_TOKEN}
    tok_cfg = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder,
               "clean_up_tokenization_spaces": False, "model_max_length": 1000000000000000019884624838656,
               "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "tokenizer_class": "GemmaTokenizer",
               "processor_class": "Gemma3Processor", "use_default_system_prompt": False,
               "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                        "image_token": IMAGE_SOFT_TOKEN},
               **specials}
    _json(folder / "tokenizer_config.json", tok_cfg)
    _json(folder / "special_tokens_map.json", specials)
    _json(folder / "added_tokens.json", {IMAGE_SOFT_TOKEN: image_soft})
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    return image_soft, sp.PieceToId("<start_of_image>"), sp.PieceToId("<end_of_image>"), sp.PieceToId("<end_of_turn>")


def _json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _config(shape: Shape, architecture: str, dtype: str, ids: tuple[int, int, int, int]) -> dict[str, Any]:
    image_soft, boi, eoi, eot = ids
    text = {"model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window_pattern": 6,
            "attention_bias": False, "attention_dropout": 0.0, "attn_logit_softcapping": None,
            "final_logit_softcapping": None, "initializer_range": 0.02, "use_cache": True,
            "torch_dtype": dtype, "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": [1, eot], **shape.text}
    if architecture == "Gemma3ForCausalLM":
        return {"architectures": [architecture], **text, "transformers_version": "4.50.0.dev0"}
    vision = {"model_type": "siglip_vision_model", "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
              "num_channels": 3, "attention_dropout": 0.0, "vision_use_head": False, "torch_dtype": dtype,
              **shape.vision}
    return {"architectures": [architecture], "model_type": "gemma3", "text_config": text, "vision_config": vision,
            "boi_token_index": boi, "eoi_token_index": eoi, "image_token_index": image_soft,
            "mm_tokens_per_image": shape.image_tokens, "eos_token_id": [1, eot], "initializer_range": 0.02,
            "torch_dtype": dtype, "transformers_version": "4.50.0.dev0"}


def _tensor_specs(spec: gemma3.Gemma3Spec, layout: dict[str, str]) -> list[tuple[str, tuple[int, ...], str]]:
    """(checkpoint key, shape, init kind) for every tensor, in the checkpoint's own layout."""
    dims = spec.dims
    out = []
    tables = [("text", gemma3.expand(gemma3.TEXT_TENSORS, spec.text.layers))]
    if spec.vision is not None:
        tables += [("vision", gemma3.expand(gemma3.VISION_TENSORS, spec.vision.layers)),
                   ("projector", list(gemma3.PROJECTOR_TENSORS))]
    for component, rows in tables:
        for src, _, shape_syms, plus_one in rows:
            shape = tuple(dims[s] for s in shape_syms)
            if plus_one:
                kind = "gemma_norm"
            elif "layer_norm" in src or "layernorm" in src:
                kind = "ln_weight" if src.endswith("weight") else "bias"
            elif src.endswith("bias"):
                kind = "bias"
            elif "embed_tokens" in src or "position_embedding" in src:
                kind = "embedding"
            else:
                kind = "linear"
            out.append((layout[component] + src, shape, kind))
    return out


def _values(shape: tuple[int, ...], kind: str, rng: np.random.Generator) -> np.ndarray:
    """Uniform noise (fast for multi-GB checkpoints) with a standard deviation suited to each tensor."""
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    std = {"linear": 1.0 / np.sqrt(fan_in), "embedding": 0.05, "gemma_norm": 0.2, "bias": 0.05,
           "ln_weight": 0.2}[kind]
    x = rng.random(shape, dtype=np.float32)
    x -= np.float32(0.5)
    x *= np.float32(std * np.sqrt(12.0))
    if kind == "ln_weight":
        x += np.float32(1.0)
    return x


def vision_weights(shape: str = "4b", seed: int = 0, image_tokens: int | None = None, **vision: int
                   ) -> tuple[gemma3.Gemma3Spec, Callable[[str], np.ndarray]]:
    """A shape's vision tower + projector with random weights, without a checkpoint on disk: its spec, and the
    weights by the names the ONNX graph writer asks for (`vision_model.<SigLIP key>`, `mm.<projector key>`),
    each made when asked for and the same on every call (for `converters.vision_onnx.vision_graph`).
    `vision` overrides the shape's vision config (a 4,096-patch tower one layer deep and 64 wide, say)."""
    s = SHAPES[shape]
    s = Shape(s.name, s.text, {**s.vision, **vision}, image_tokens or s.image_tokens, s.sp_pieces)
    ids = (s.text["vocab_size"] - 1, s.text["vocab_size"] - 2, s.text["vocab_size"] - 3, 106)
    spec = gemma3.read_spec(_config(s, "Gemma3ForConditionalGeneration", "float32", ids),
                            {"image_seq_length": s.image_tokens}, "synthetic vision weights")
    specs = {name: (shp, kind) for name, shp, kind in
             _tensor_specs(spec, {"text": "text.", "vision": "vision_model.", "projector": "mm."})}

    def get(name: str) -> np.ndarray:
        shp, kind = specs[name]
        return _values(shp, kind, np.random.default_rng([seed, zlib.crc32(name.encode())]))

    return spec, get


def make_checkpoint(folder: Path | str, shape: str = "tiny", *, architecture: str = "Gemma3ForConditionalGeneration",
                    dtype: str = "float32", layout: str = "hf4", seed: int = 0, shard_bytes: int | None = None,
                    layers: int | None = None, sliding_window: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a complete random checkpoint of a named shape into `folder` (created; must be empty or absent).

    `layers` overrides the text depth (a tiny-width model with 34 or 62 layers exercises every
    layer-position rule of the quantization presets); `sliding_window` the local-attention span."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    s = SHAPES[shape]
    if layers is not None or sliding_window is not None:
        text = {**s.text, "num_hidden_layers": layers or s.text["num_hidden_layers"],
                "sliding_window": sliding_window or s.text["sliding_window"]}
        s = Shape(s.name, text, s.vision, s.image_tokens, s.sp_pieces)
    ids = _tokenizer_files(folder, s)
    config = _config(s, architecture, dtype, ids)
    _json(folder / "config.json", config)
    _json(folder / "generation_config.json", {"bos_token_id": 2, "eos_token_id": [1, ids[3]], "pad_token_id": 0,
                                              "do_sample": False})
    size = s.vision["image_size"]
    if architecture == "Gemma3ForConditionalGeneration":
        pre = {"image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
               "do_resize": True, "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
               "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5, 0.5, 0.5],
               "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": None, "do_pan_and_scan": None,
               "image_seq_length": s.image_tokens}
        _json(folder / "preprocessor_config.json", pre)
        _json(folder / "processor_config.json",
              {"image_seq_length": s.image_tokens, "processor_class": "Gemma3Processor"})
    spec = gemma3.read_spec(config, {"image_seq_length": s.image_tokens}, folder / "config.json")
    prefixes = LAYOUTS[layout] if architecture == "Gemma3ForConditionalGeneration" else {"text": "model."}
    specs = _tensor_specs(spec, prefixes)
    st_dtype = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    rng = np.random.default_rng(seed)
    kinds = {name: kind for name, _, kind in specs}
    shapes = {name: shp for name, shp, _ in specs}
    total = sum(int(np.prod(shp)) for shp in shapes.values())
    done = 0

    def fill(name: str) -> np.ndarray:
        nonlocal done
        x = _values(shapes[name], kinds[name], rng)
        done += x.size
        if progress:
            progress(done, total)
        if st_dtype == "BF16":
            return float32_to_bf16_bits(x)
        return x.astype(np.float16) if st_dtype == "F16" else x

    # shard like the Hub does, with an index, when asked (the 4B checkpoint ships as 2 shards)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    acc = 0
    itemsize = 4 if st_dtype == "F32" else 2
    for name, shp, _ in specs:
        n = int(np.prod(shp)) * itemsize
        if shard_bytes and acc + n > shard_bytes and shards[-1]:
            shards.append([])
            acc = 0
        shards[-1].append((name, st_dtype, shp))
        acc += n
    if len(shards) == 1:
        write_file(folder / "model.safetensors", shards[0], fill, metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            write_file(folder / fname, shard, fill, metadata={"format": "pt"})
            weight_map.update({name: fname for name, _, _ in shard})
        _json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total * itemsize},
                                                         "weight_map": weight_map})
    return folder
