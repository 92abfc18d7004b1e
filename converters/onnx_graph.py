"""A small ONNX graph builder over `onnx.helper`, and the SigLIP encoder written with it.

Linears are MatMul + Add with the weight stored transposed as a constant, so ONNX Runtime's quantizers
(dynamic int8, MatMulNBits) see them; everything else is standard opset-20 operators (LayerNormalization,
Gelu with tanh approximation, Softmax).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 20
# External weights start on multiples of this. ONNX Runtime maps external data at any offset on Linux and
# macOS (and on Windows since 1.23), from the page below it, so the offset decides the mapped tensor's address:
# 64 is the buffer alignment its CPU kernels (MLAS) prefer and allocate with, and a cache line.
ONNX_DATA_ALIGNMENT = 64


class GraphBuilder:
    """`int8=True` writes every constant-weight matmul already quantized, in the pattern ONNX Runtime's
    dynamic quantization produces (DynamicQuantizeLinear → MatMulInteger → Cast → Mul, per-tensor symmetric
    int8 weights), so a graph never needs to exist in float32 first."""

    def __init__(self, name: str, int8: bool = False, data_file: Any = None, data_location: str | None = None,
                 attention_block: int | None = None):
        """`data_file` (an open binary file) streams constants into external data as they are made, so the
        graph never holds its weights: memory stays at one tensor. `data_location` is the data file's name
        as the graph refers to it (its final name, beside the graph). `attention_block`: self-attention over
        more queries than this is computed that many queries at a time (see `attention`)."""
        if attention_block is not None and attention_block < 1:
            raise ValueError(f"attention_block must be positive, not {attention_block}")
        self.name = name
        self.int8 = int8
        self.attention_block = attention_block
        self.data_file = data_file
        self.data_location = data_location
        self._quantized_inputs: dict[str, tuple[str, str, str]] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._n = 0

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, name: str, value: np.ndarray) -> str:
        value = np.array(value, copy=True, order="C")  # ascontiguousarray would make 0-d arrays 1-d
        if self.data_file is None or value.nbytes < 1024:
            self.inits.append(numpy_helper.from_array(value, name))
            return name
        f = self.data_file
        f.write(b"\0" * (-f.tell() % ONNX_DATA_ALIGNMENT))
        offset = f.tell()
        f.write(value.tobytes())
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(value.dtype), dims=list(value.shape))
        t.data_location = onnx.TensorProto.EXTERNAL
        for key, val in (("location", self.data_location), ("offset", str(offset)), ("length", str(value.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, val
        self.inits.append(t)
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, value: str, name: str, shape: list) -> None:
        self.nodes.append(helper.make_node("Identity", [value], [name], name=f"out_{name}"))
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="medgemma-cli")
        m.ir_version = 10
        return m

    # --- layers ---------------------------------------------------------------------------------
    def matmul_const(self, x: str, w: np.ndarray, name: str) -> str:
        """x @ w for a constant w [in, out]: float32, or int8 weights with dynamically quantized inputs."""
        if not self.int8:
            return self.op("MatMul", [x, self.const(name, w.astype(np.float32))], name)
        w = np.asarray(w, dtype=np.float32)
        scale = np.float32(np.abs(w).max() / 127.0) if np.abs(w).max() > 0 else np.float32(1.0)
        wq = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        if x not in self._quantized_inputs:  # one quantization of an activation serves all its matmuls
            xq, xs, xz = f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"
            self.nodes.append(helper.make_node("DynamicQuantizeLinear", [x], [xq, xs, xz], name=f"{x}_QuantizeLinear"))
            self._quantized_inputs[x] = (xq, xs, xz)
        xq, xs, xz = self._quantized_inputs[x]
        scales = self.op("Mul", [xs, self.const(f"{name}_scale", np.array(scale, np.float32))], f"{name}_scales")
        acc = self.op("MatMulInteger", [xq, self.const(f"{name}_quantized", wq), xz,
                                        self.const(f"{name}_zero_point", np.array(0, np.int8))], f"{name}_int32")
        return self.op("Mul", [self.op("Cast", [acc], f"{name}_float", to=TensorProto.FLOAT), scales], name)

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        """x @ wᵀ + b, with w as stored by PyTorch ([out, in])."""
        y = self.matmul_const(x, w.T, f"{name}.weight_t")
        return self.op("Add", [y, self.const(f"{name}.bias", b.astype(np.float32))], name) if b is not None else y

    def layer_norm(self, x: str, w: np.ndarray, b: np.ndarray, eps: float, name: str) -> str:
        return self.op("LayerNormalization", [x, self.const(f"{name}.weight", w.astype(np.float32)),
                                              self.const(f"{name}.bias", b.astype(np.float32))],
                       name, axis=-1, epsilon=eps)

    def shape_const(self, values: list[int], name: str) -> str:
        return self.const(name, np.array(values, dtype=np.int64))

    def attention(self, xq: str, xkv: str, get: Callable[[str], np.ndarray], prefix: str, heads: int, dim: int,
                  qkv: tuple[np.ndarray, ...] | None = None, queries: int | None = None) -> str:
        """Multi-head attention without a mask. `qkv` overrides the q/k/v/out weights (for the pooling head).

        `queries` (the query count, when known) above the builder's `attention_block` splits the queries into
        blocks of that many, each with its own scores, softmax and weighted sum: exact, since softmax runs per
        query row, and ONNX Runtime then holds one block's scores (heads × block × keys floats) instead of all
        (heads × keys², 1 GiB per layer for 4,096 patches and 16 heads)."""
        hd = dim // heads
        if qkv is None:
            wq, bq, wk, bk, wv, bv, wo, bo = (get(f"{prefix}.{p}_proj.{t}") for p in ("q", "k", "v", "out")
                                              for t in ("weight", "bias"))
        else:
            wq, bq, wk, bk, wv, bv, wo, bo = qkv
        split = self.shape_const([0, -1, heads, hd], f"{prefix}.split_heads")
        merge = self.shape_const([0, -1, dim], f"{prefix}.merge_heads")
        q = self.op("Transpose", [self.op("Reshape", [self.linear(xq, wq, bq, f"{prefix}.q_proj"), split])],
                    perm=[0, 2, 1, 3])
        k = self.op("Transpose", [self.op("Reshape", [self.linear(xkv, wk, bk, f"{prefix}.k_proj"), split])],
                    perm=[0, 2, 3, 1])
        v = self.op("Transpose", [self.op("Reshape", [self.linear(xkv, wv, bv, f"{prefix}.v_proj"), split])],
                    perm=[0, 2, 1, 3])
        scale = self.const(f"{prefix}.scale", np.array(hd**-0.5, np.float32))
        block = self.attention_block
        if block is None or queries is None or queries <= block:
            probs = self.op("Softmax", [self.op("Mul", [self.op("MatMul", [q, k]), scale])], axis=-1)
            ctx = self.op("MatMul", [probs, v])
        else:
            # the scale goes on q (heads × queries × head_dim) rather than on each block's scores: one pass over
            # a small tensor instead of one over every score. Blocks are emitted one after another, so ONNX
            # Runtime (which runs nodes in this order on CPU) frees each block's scores before the next.
            sizes = [block] * (queries // block) + ([queries % block] if queries % block else [])
            blocks = [self.fresh("query_block") for _ in sizes]
            self.nodes.append(helper.make_node(
                "Split", [self.op("Mul", [q, scale], "q_scaled"), self.shape_const(sizes, f"{prefix}.query_blocks")],
                blocks, name=self.fresh("split_queries"), axis=2))
            ctx = self.op("Concat", [self.op("MatMul", [self.op("Softmax", [self.op("MatMul", [b, k])], axis=-1), v])
                                     for b in blocks], axis=2)
        ctx = self.op("Reshape", [self.op("Transpose", [ctx], perm=[0, 2, 1, 3]), merge])
        return self.linear(ctx, wo, bo, f"{prefix}.out_proj")

    def mlp(self, x: str, get: Callable[[str], np.ndarray], prefix: str) -> str:
        h = self.linear(x, get(f"{prefix}.fc1.weight"), get(f"{prefix}.fc1.bias"), f"{prefix}.fc1")
        h = self.op("Gelu", [h], approximate="tanh")
        return self.linear(h, get(f"{prefix}.fc2.weight"), get(f"{prefix}.fc2.bias"), f"{prefix}.fc2")

    def encoder(self, x: str, get: Callable[[str], np.ndarray], prefix: str, layers: int, heads: int, dim: int,
                eps: float, tokens: int | None = None) -> str:
        """SigLIP's pre-LN encoder: x += attn(LN1(x)); x += mlp(LN2(x)). `tokens`: the sequence length, when
        fixed (the patches of an image), so that `attention` can split long sequences into query blocks."""
        for i in range(layers):
            p = f"{prefix}.layers.{i}"
            h = self.layer_norm(x, get(f"{p}.layer_norm1.weight"), get(f"{p}.layer_norm1.bias"), eps,
                                f"{p}.layer_norm1")
            x = self.op("Add", [x, self.attention(h, h, get, f"{p}.self_attn", heads, dim, queries=tokens)])
            h = self.layer_norm(x, get(f"{p}.layer_norm2.weight"), get(f"{p}.layer_norm2.bias"), eps,
                                f"{p}.layer_norm2")
            x = self.op("Add", [x, self.mlp(h, get, f"{p}.mlp")])
        return x


def siglip_vision_tower(gb: GraphBuilder, get: Callable[[str], np.ndarray], prefix: str, cfg: dict) -> str:
    """pixel_values [B, 3, S, S] → last hidden state after post_layernorm [B, patches, D]."""
    d, p = cfg["hidden_size"], cfg["patch_size"]
    px = gb.input("pixel_values", TensorProto.FLOAT, ["batch", 3, cfg["image_size"], cfg["image_size"]])
    conv = gb.op("Conv", [px, gb.const(f"{prefix}.embeddings.patch_embedding.weight",
                                       get(f"{prefix}.embeddings.patch_embedding.weight").astype(np.float32)),
                          gb.const(f"{prefix}.embeddings.patch_embedding.bias",
                                   get(f"{prefix}.embeddings.patch_embedding.bias").astype(np.float32))],
                 "patch_embedding", kernel_shape=[p, p], strides=[p, p])
    x = gb.op("Transpose", [gb.op("Reshape", [conv, gb.shape_const([0, d, -1], "patches_shape")])], perm=[0, 2, 1])
    pos = get(f"{prefix}.embeddings.position_embedding.weight").astype(np.float32)[None]
    x = gb.op("Add", [x, gb.const(f"{prefix}.embeddings.position_embedding", pos)])
    eps = cfg.get("layer_norm_eps", 1e-6)
    x = gb.encoder(x, get, f"{prefix}.encoder", cfg["num_hidden_layers"], cfg["num_attention_heads"], d, eps,
                   tokens=pos.shape[1])
    return gb.layer_norm(x, get(f"{prefix}.post_layernorm.weight"), get(f"{prefix}.post_layernorm.bias"), eps,
                         f"{prefix}.post_layernorm")


def siglip_pooling_head(gb: GraphBuilder, x: str, get: Callable[[str], np.ndarray], prefix: str, cfg: dict) -> str:
    """The attention-pooling head: a learned probe attends over the tokens, then LN + MLP residual → [B, D]."""
    d, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    eps = cfg.get("layer_norm_eps", 1e-6)
    w_in, b_in = get(f"{prefix}.attention.in_proj_weight"), get(f"{prefix}.attention.in_proj_bias")
    qkv = (w_in[:d], b_in[:d], w_in[d:2 * d], b_in[d:2 * d], w_in[2 * d:], b_in[2 * d:],
           get(f"{prefix}.attention.out_proj.weight"), get(f"{prefix}.attention.out_proj.bias"))
    probe = gb.const(f"{prefix}.probe", get(f"{prefix}.probe").astype(np.float32))  # [1, 1, D], broadcast over batch
    h = gb.attention(probe, x, get, f"{prefix}.attention", heads, d, qkv)
    n = gb.layer_norm(h, get(f"{prefix}.layernorm.weight"), get(f"{prefix}.layernorm.bias"), eps, f"{prefix}.layernorm")
    h = gb.op("Add", [h, gb.mlp(n, get, f"{prefix}.mlp")])
    return gb.op("Reshape", [h, gb.shape_const([-1, d], "pooled_shape")])


def siglip_text_tower(gb: GraphBuilder, get: Callable[[str], np.ndarray], prefix: str, cfg: dict) -> str:
    """input_ids [B, 64] → the head's projection of the last token [B, D]."""
    d, length = cfg["hidden_size"], cfg["max_position_embeddings"]
    ids = gb.input("input_ids", TensorProto.INT64, ["batch", length])
    x = gb.op("Gather", [gb.const(f"{prefix}.embeddings.token_embedding.weight",
                                  get(f"{prefix}.embeddings.token_embedding.weight").astype(np.float32)), ids], axis=0)
    pos = get(f"{prefix}.embeddings.position_embedding.weight").astype(np.float32)[None]
    x = gb.op("Add", [x, gb.const(f"{prefix}.embeddings.position_embedding", pos)])
    eps = cfg.get("layer_norm_eps", 1e-6)
    x = gb.encoder(x, get, f"{prefix}.encoder", cfg["num_hidden_layers"], cfg["num_attention_heads"], d, eps)
    x = gb.layer_norm(x, get(f"{prefix}.final_layer_norm.weight"), get(f"{prefix}.final_layer_norm.bias"), eps,
                      f"{prefix}.final_layer_norm")
    last = gb.op("Gather", [x, gb.const("last_token", np.array(length - 1, dtype=np.int64))], axis=1)
    return gb.linear(last, get(f"{prefix}.head.weight"), get(f"{prefix}.head.bias"), f"{prefix}.head")


def gemma3_projector(gb: GraphBuilder, x: str, get: Callable[[str], np.ndarray], cfg: dict, image_tokens: int) -> str:
    """Gemma 3's multimodal projector: average-pool the patch grid down to the image-token grid, RMS-norm with
    the stored weight + 1, project to the text width: [B, patches, D] → [B, image_tokens, text hidden]."""
    d = cfg["hidden_size"]
    side = cfg["image_size"] // cfg["patch_size"]
    tokens_side = round(image_tokens ** 0.5)
    k = side // tokens_side
    grid = gb.op("Reshape", [gb.op("Transpose", [x], perm=[0, 2, 1]), gb.shape_const([0, d, side, side], "grid_shape")])
    pooled = gb.op("AveragePool", [grid], kernel_shape=[k, k], strides=[k, k])
    seq = gb.op("Transpose", [gb.op("Reshape", [pooled, gb.shape_const([0, d, -1], "pooled_seq")])], perm=[0, 2, 1])
    eps = gb.const("mm.soft_emb_norm.eps", np.array(cfg.get("layer_norm_eps", 1e-6), np.float32))
    ms = gb.op("ReduceMean", [gb.op("Mul", [seq, seq]), gb.shape_const([-1], "last_axis")], keepdims=1)
    normed = gb.op("Div", [seq, gb.op("Sqrt", [gb.op("Add", [ms, eps])])])
    w = (get("mm.mm_soft_emb_norm.weight") + 1.0).astype(np.float32)
    normed = gb.op("Mul", [normed, gb.const("mm.soft_emb_norm.weight_plus_one", w)])
    return gb.matmul_const(normed, get("mm.mm_input_projection_weight"), "mm.input_projection")  # [D, H]: x @ W
