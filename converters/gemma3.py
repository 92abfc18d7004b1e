"""Gemma 3 (MedGemma) as llama.cpp expects it: hyper-parameters, tensor-name tables, GGUF metadata.

One file for the architecture, in the spirit of mlx-lm: every fact about how a Hugging Face Gemma 3
checkpoint becomes `gemma3` + `clip`/`gemma3` GGUF files lives here, as tables where possible.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import gguf

from medgemma_cli.errors import InputError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("Gemma3ForConditionalGeneration", "Gemma3ForCausalLM")

# The layouts a Gemma 3 checkpoint's keys come in, longest first: (prefix, component).
# transformers 4.5x saves `language_model.model.*` / `vision_tower.vision_model.*`; transformers 5 saves
# `model.language_model.*` / `model.vision_tower.*`, with or without the inner `vision_model.`.
KEY_LAYOUTS: tuple[tuple[str, str], ...] = (
    ("model.language_model.model.", "text"),
    ("model.language_model.", "text"),
    ("language_model.model.", "text"),
    ("language_model.lm_head.", "lm_head"),
    ("model.vision_tower.vision_model.", "vision"),
    ("model.vision_tower.", "vision"),
    ("vision_tower.vision_model.", "vision"),
    ("vision_tower.", "vision"),
    ("model.multi_modal_projector.", "projector"),
    ("multi_modal_projector.", "projector"),
    ("lm_head.", "lm_head"),
    ("model.", "text"),  # Gemma3ForCausalLM
)

# Text model: checkpoint name (layout prefix removed) → GGUF name, shape in checkpoint order, +1 on the
# stored value (Gemma's RMSNorm multiplies by 1 + w; llama.cpp multiplies by w).
TEXT_TENSORS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("embed_tokens.weight", "token_embd.weight", ("vocab", "hidden"), False),
    ("norm.weight", "output_norm.weight", ("hidden",), True),
    ("layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight", ("hidden",), True),
    ("layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight", ("q_dim", "hidden"), False),
    ("layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight", ("kv_dim", "hidden"), False),
    ("layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight", ("kv_dim", "hidden"), False),
    ("layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight", ("hidden", "q_dim"), False),
    ("layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight", ("head_dim",), True),
    ("layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight", ("head_dim",), True),
    ("layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight", ("hidden",), True),
    ("layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight", ("hidden",), True),
    ("layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight", ("hidden",), True),
    ("layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight", ("ffn", "hidden"), False),
    ("layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight", ("ffn", "hidden"), False),
    ("layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight", ("hidden", "ffn"), False),
)

# Vision tower (SigLIP, no head) and the Gemma 3 projector.
VISION_TENSORS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("embeddings.patch_embedding.weight", "v.patch_embd.weight", ("v_hidden", "channels", "patch", "patch"), False),
    ("embeddings.patch_embedding.bias", "v.patch_embd.bias", ("v_hidden",), False),
    ("embeddings.position_embedding.weight", "v.position_embd.weight", ("positions", "v_hidden"), False),
    ("encoder.layers.{i}.self_attn.q_proj.weight", "v.blk.{i}.attn_q.weight", ("v_hidden", "v_hidden"), False),
    ("encoder.layers.{i}.self_attn.q_proj.bias", "v.blk.{i}.attn_q.bias", ("v_hidden",), False),
    ("encoder.layers.{i}.self_attn.k_proj.weight", "v.blk.{i}.attn_k.weight", ("v_hidden", "v_hidden"), False),
    ("encoder.layers.{i}.self_attn.k_proj.bias", "v.blk.{i}.attn_k.bias", ("v_hidden",), False),
    ("encoder.layers.{i}.self_attn.v_proj.weight", "v.blk.{i}.attn_v.weight", ("v_hidden", "v_hidden"), False),
    ("encoder.layers.{i}.self_attn.v_proj.bias", "v.blk.{i}.attn_v.bias", ("v_hidden",), False),
    ("encoder.layers.{i}.self_attn.out_proj.weight", "v.blk.{i}.attn_out.weight", ("v_hidden", "v_hidden"), False),
    ("encoder.layers.{i}.self_attn.out_proj.bias", "v.blk.{i}.attn_out.bias", ("v_hidden",), False),
    ("encoder.layers.{i}.layer_norm1.weight", "v.blk.{i}.ln1.weight", ("v_hidden",), False),
    ("encoder.layers.{i}.layer_norm1.bias", "v.blk.{i}.ln1.bias", ("v_hidden",), False),
    ("encoder.layers.{i}.layer_norm2.weight", "v.blk.{i}.ln2.weight", ("v_hidden",), False),
    ("encoder.layers.{i}.layer_norm2.bias", "v.blk.{i}.ln2.bias", ("v_hidden",), False),
    ("encoder.layers.{i}.mlp.fc1.weight", "v.blk.{i}.ffn_up.weight", ("v_ffn", "v_hidden"), False),
    ("encoder.layers.{i}.mlp.fc1.bias", "v.blk.{i}.ffn_up.bias", ("v_ffn",), False),
    ("encoder.layers.{i}.mlp.fc2.weight", "v.blk.{i}.ffn_down.weight", ("v_hidden", "v_ffn"), False),
    ("encoder.layers.{i}.mlp.fc2.bias", "v.blk.{i}.ffn_down.bias", ("v_hidden",), False),
    ("post_layernorm.weight", "v.post_ln.weight", ("v_hidden",), False),
    ("post_layernorm.bias", "v.post_ln.bias", ("v_hidden",), False),
)
PROJECTOR_TENSORS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    # stored as [vision hidden, text hidden]; clip.cpp transposes it at run time
    ("mm_input_projection_weight", "mm.input_projection.weight", ("v_hidden", "hidden"), False),
    ("mm_soft_emb_norm.weight", "mm.soft_emb_norm.weight", ("v_hidden",), True),
)


@dataclass(frozen=True)
class TextParams:
    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_eps: float
    context_length: int
    sliding_window: int
    rope_theta: float
    rope_theta_local: float
    rope_scaling: str | None
    rope_factor: float | None
    query_pre_attn_scalar: float
    tie_embeddings: bool


@dataclass(frozen=True)
class VisionParams:
    hidden: int
    ffn: int
    layers: int
    heads: int
    image_size: int
    patch_size: int
    channels: int
    eps: float
    use_head: bool
    image_tokens: int


@dataclass(frozen=True)
class Gemma3Spec:
    architecture: str
    text: TextParams
    vision: VisionParams | None

    @property
    def dims(self) -> dict[str, int]:
        t = self.text
        d = {"vocab": t.vocab, "hidden": t.hidden, "ffn": t.ffn, "head_dim": t.head_dim,
             "q_dim": t.heads * t.head_dim, "kv_dim": t.kv_heads * t.head_dim}
        if self.vision is not None:
            v = self.vision
            d.update(v_hidden=v.hidden, v_ffn=v.ffn, channels=v.channels, patch=v.patch_size,
                     positions=(v.image_size // v.patch_size) ** 2)
        return d


def _get(cfg: dict[str, Any], key: str, default: Any = None, *, path: Any = None) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is None:
        raise InputError(path, f"config.json lacks {key!r}")
    return default


def _rope(text_cfg: dict[str, Any]) -> tuple[float, float, str | None, float | None]:
    """Read RoPE settings from either the transformers 4 keys or transformers 5's `rope_parameters`."""
    params = text_cfg.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or {}
        theta = float(full.get("rope_theta", 1_000_000.0))
        theta_local = float(local.get("rope_theta", 10_000.0))
        scaling = full
    else:
        theta = float(text_cfg.get("rope_theta", 1_000_000.0))
        theta_local = float(text_cfg.get("rope_local_base_freq", 10_000.0))
        scaling = text_cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return theta, theta_local, None, None
    if rope_type != "linear":
        raise UnsupportedModelError(None, f"RoPE scaling {rope_type!r} is not supported for Gemma 3 (only linear)")
    return theta, theta_local, "linear", float(scaling["factor"])


_TEXT_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.")


def check_against_weights(spec: Gemma3Spec, shapes: dict[str, tuple[int, ...]], config_path: Any) -> None:
    """The sizes config.json declares must be those of the weights present, checked before anything is sized
    from them: a config saying 10^9 layers or a 10^12-token vocabulary is refused, not allocated."""
    text_layers = {int(m.group(1)) for n in shapes if "vision" not in n and (m := _TEXT_LAYER.search(n))}
    if _mismatch(spec.text.layers, len(text_layers)):
        raise InputError(config_path, f"num_hidden_layers is {spec.text.layers}, but the weights hold "
                                      f"{len(text_layers)} text layers")
    embed = [shape for n, shape in shapes.items() if n.endswith("embed_tokens.weight") and "vision" not in n]
    if embed and tuple(embed[0]) != (spec.text.vocab, spec.text.hidden):
        raise InputError(config_path, f"vocab_size {spec.text.vocab} and hidden_size {spec.text.hidden} do not match "
                                      f"the embedding's shape {list(embed[0])}")
    if spec.vision is not None:
        vision_layers = {int(m.group(1)) for n in shapes if "vision" in n and (m := _VISION_LAYER.search(n))}
        if _mismatch(spec.vision.layers, len(vision_layers)):
            raise InputError(config_path, f"vision num_hidden_layers is {spec.vision.layers}, but the weights hold "
                                          f"{len(vision_layers)} vision layers")


def _mismatch(declared: int, present: int) -> bool:
    """A layer count to refuse here. With no layer at all present (a whole tower left out) and a plausible count,
    the tensor check that follows names the missing tensors, which says more."""
    return declared != present and (present > 0 or not 0 < declared <= MAX_PLAUSIBLE_LAYERS)


MAX_PLAUSIBLE_LAYERS = 1024


def read_spec(config: dict[str, Any], processor_config: dict[str, Any], config_path: Any) -> Gemma3Spec:
    """Validate a Gemma 3 config and check that llama.cpp's hard-coded assumptions hold for it."""
    archs = config.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        found = ", ".join(archs) or config.get("model_type") or "unknown"
        raise UnsupportedModelError(
            config_path,
            f"architecture {found} is not supported; medgemma converts {', '.join(SUPPORTED_ARCHITECTURES)}"
            " (MedGemma 4B/27B)",
        )
    tc = config.get("text_config", config) if arch == "Gemma3ForConditionalGeneration" else config
    p = config_path
    heads = int(_get(tc, "num_attention_heads", 8, path=p))
    hidden = int(_get(tc, "hidden_size", path=p))
    layers = int(_get(tc, "num_hidden_layers", path=p))
    if not 0 < layers <= MAX_PLAUSIBLE_LAYERS:  # checked before anything is sized by it
        raise InputError(p, f"num_hidden_layers is {layers}: no Gemma 3 has more than {MAX_PLAUSIBLE_LAYERS}")
    head_dim = int(_get(tc, "head_dim", 256, path=p))
    theta, theta_local, scaling, factor = _rope(tc)
    text = TextParams(
        vocab=int(_get(tc, "vocab_size", 262208, path=p)),
        hidden=hidden,
        ffn=int(_get(tc, "intermediate_size", path=p)),
        layers=layers,
        heads=heads,
        kv_heads=int(_get(tc, "num_key_value_heads", 4, path=p)),
        head_dim=head_dim,
        rms_eps=float(_get(tc, "rms_norm_eps", 1e-6, path=p)),
        context_length=int(_get(tc, "max_position_embeddings", 131072, path=p)),
        sliding_window=int(_get(tc, "sliding_window", 4096, path=p)),
        rope_theta=theta,
        rope_theta_local=theta_local,
        rope_scaling=scaling,
        rope_factor=factor,
        query_pre_attn_scalar=float(_get(tc, "query_pre_attn_scalar", 256, path=p)),
        tie_embeddings=bool(config.get("tie_word_embeddings", tc.get("tie_word_embeddings", True))),
    )
    _check_llama_cpp_assumptions(tc, text, p)

    vision = None
    if arch == "Gemma3ForConditionalGeneration":
        vc = config.get("vision_config")
        if not isinstance(vc, dict):
            raise InputError(p, "Gemma3ForConditionalGeneration config has no vision_config")
        image_tokens = processor_config.get("image_seq_length", config.get("mm_tokens_per_image"))
        if image_tokens is None:
            raise InputError(p, "neither processor_config.json's image_seq_length nor config.json's "
                                "mm_tokens_per_image says how many image tokens the model uses")
        vision = VisionParams(
            hidden=int(_get(vc, "hidden_size", 1152, path=p)),
            ffn=int(_get(vc, "intermediate_size", 4304, path=p)),
            layers=int(_get(vc, "num_hidden_layers", 27, path=p)),
            heads=int(_get(vc, "num_attention_heads", 16, path=p)),
            image_size=int(_get(vc, "image_size", 896, path=p)),
            patch_size=int(_get(vc, "patch_size", 14, path=p)),
            channels=int(_get(vc, "num_channels", 3, path=p)),
            eps=float(_get(vc, "layer_norm_eps", 1e-6, path=p)),
            use_head=bool(vc.get("vision_use_head", False)),
            image_tokens=int(image_tokens),
        )
        per_side = vision.image_size // vision.patch_size
        tokens_side = math.isqrt(vision.image_tokens)
        if tokens_side * tokens_side != vision.image_tokens or per_side % tokens_side:
            raise InputError(p, f"{vision.image_tokens} image tokens cannot pool a {per_side}x{per_side} patch grid")
        if vision.hidden == vision.ffn:
            # clip.cpp swaps ffn_up/ffn_down when they are square: the result would be silently wrong
            raise UnsupportedModelError(p, "vision intermediate_size equals hidden_size, which llama.cpp misreads")
    return Gemma3Spec(arch, text, vision)


def _check_llama_cpp_assumptions(tc: dict[str, Any], t: TextParams, p: Any) -> None:
    """llama.cpp hard-codes a few Gemma 3 facts; refuse checkpoints that differ rather than write a wrong model."""
    if tc.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(p, "attn_logit_softcapping is set, but llama.cpp's gemma3 ignores it")
    if tc.get("final_logit_softcapping") is not None:
        raise UnsupportedModelError(p, "final_logit_softcapping is set; Gemma 3 has none and llama.cpp would differ")
    expected_scalar = t.hidden / t.heads if t.layers == 62 else t.head_dim
    if abs(t.query_pre_attn_scalar - expected_scalar) > 1e-6:
        raise UnsupportedModelError(
            p, f"query_pre_attn_scalar is {t.query_pre_attn_scalar:g} but llama.cpp uses {expected_scalar:g} for a "
               f"{t.layers}-layer Gemma 3; the converted model would be wrong")
    layer_types = tc.get("layer_types")
    pattern = int(tc.get("sliding_window_pattern", 6) or 6)
    expected = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(t.layers)]
    actual = layer_types or ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                             for i in range(t.layers)]
    if list(actual) != expected:
        raise UnsupportedModelError(p, "the sliding/global layer pattern is not Gemma 3's every-6th-global, "
                                       "which llama.cpp assumes")


def expand(table: tuple[tuple[str, str, tuple[str, ...], bool], ...],
           n_layers: int) -> list[tuple[str, str, tuple[str, ...], bool]]:
    """The table with its `{i}` rows repeated for every layer: global rows first, then layer by layer."""
    globals_ = [row for row in table if "{i}" not in row[0]]
    per_layer = [row for row in table if "{i}" in row[0]]
    out = list(globals_)
    for i in range(n_layers):
        out.extend((src.format(i=i), dst.format(i=i), shape, plus_one) for src, dst, shape, plus_one in per_layer)
    return out


def split_key(key: str, arch: str) -> tuple[str, str] | None:
    """(component, name without layout prefix) for a checkpoint key, or None if no layout matches."""
    for prefix, component in KEY_LAYOUTS:
        if key.startswith(prefix):
            if prefix == "model." and arch != "Gemma3ForCausalLM":
                return None
            return component, key[len(prefix):]
    return None




def write_text_metadata(w: gguf.GGUFWriter, spec: Gemma3Spec, name: str) -> None:
    t = spec.text
    w.add_name(name)
    w.add_context_length(t.context_length)
    w.add_embedding_length(t.hidden)
    w.add_block_count(t.layers)
    w.add_feed_forward_length(t.ffn)
    w.add_head_count(t.heads)
    w.add_head_count_kv(t.kv_heads)
    w.add_key_length(t.head_dim)
    w.add_value_length(t.head_dim)
    w.add_layer_norm_rms_eps(t.rms_eps)
    w.add_sliding_window(t.sliding_window)
    w.add_rope_freq_base(t.rope_theta)
    w.add_rope_freq_base_swa(t.rope_theta_local)
    if t.rope_scaling == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        assert t.rope_factor is not None  # read with the scaling type: linear scaling always has a factor
        w.add_rope_scaling_factor(t.rope_factor)


def write_mmproj_metadata(w: gguf.GGUFWriter, spec: Gemma3Spec, name: str,
                          image_mean: list[float], image_std: list[float]) -> None:
    v = spec.vision
    assert v is not None
    w.add_type(gguf.GGUFType.MMPROJ)
    w.add_name(name)
    w.add_clip_has_vision_encoder(True)
    w.add_clip_projector_type(gguf.VisionProjectorType.GEMMA3)
    w.add_vision_projection_dim(spec.text.hidden)
    w.add_vision_image_size(v.image_size)
    w.add_vision_patch_size(v.patch_size)
    w.add_vision_embedding_length(v.hidden)
    w.add_vision_feed_forward_length(v.ffn)
    w.add_vision_block_count(v.layers)
    w.add_vision_head_count(v.heads)
    w.add_vision_attention_layernorm_eps(v.eps)
    w.add_vision_use_gelu(True)
    w.add_vision_image_mean(image_mean)
    w.add_vision_image_std(image_std)
    scale = (v.image_size // v.patch_size) // math.isqrt(v.image_tokens)
    if scale != 4:  # clip.cpp defaults to 4x4 pooling
        w.add_vision_projector_scale_factor(scale)
