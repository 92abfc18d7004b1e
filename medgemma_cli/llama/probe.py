"""The extra-buffer probe, run as a child process: `python -m medgemma_cli.llama.probe WORK_DIR`.

It writes a small model whose matmuls take the paths that crash where they crash (Q8_0 and Q4_K weights,
rows and columns multiples of 256), evaluates a multi-token batch and a few single tokens with llama.cpp's
extra buffer types on, then again with them off, and prints one JSON line: the logits must agree. If this
process dies, the parent knows enough.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

EMBED, FFN, VOCAB, HEADS, LAYERS = 256, 512, 288, 4, 2
PROMPT = 32


def write_model(path: Path) -> None:
    """A random two-layer llama-architecture GGUF: attention in Q8_0, feed-forward and output in Q4_K."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from medgemma_cli.kernels.encode import encode

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(128)
    w.add_embedding_length(EMBED)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(EMBED // HEADS)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"piece{i}" for i in range(VOCAB - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (VOCAB - 259)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * VOCAB)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def matrix(name: str, rows: int, cols: int, qtype: Q) -> None:
        x = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(np.float32)
        w.add_tensor(name, encode(x, qtype), raw_dtype=qtype)

    def norm(name: str) -> None:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(EMBED)).astype(np.float32))

    matrix("token_embd.weight", VOCAB, EMBED, Q.Q8_0)
    for i in range(LAYERS):
        norm(f"blk.{i}.attn_norm.weight")
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            matrix(f"blk.{i}.{part}.weight", EMBED, EMBED, Q.Q8_0)
        norm(f"blk.{i}.ffn_norm.weight")
        matrix(f"blk.{i}.ffn_gate.weight", FFN, EMBED, Q.Q4_K)
        matrix(f"blk.{i}.ffn_up.weight", FFN, EMBED, Q.Q4_K)
        matrix(f"blk.{i}.ffn_down.weight", EMBED, FFN, Q.Q4_K)
    norm("output_norm.weight")
    matrix("output.weight", VOCAB, EMBED, Q.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def run(path: Path, extra: bool) -> tuple[np.ndarray, list[str]]:
    """Logits at every position of a multi-token batch and of three single-token steps after it, and the weight
    buffers llama.cpp used."""
    from medgemma_cli.containment import crash_if_testing
    from medgemma_cli.llama.loader import buffer_types_used, load_llama

    threads = min(4, os.cpu_count() or 1)
    with buffer_types_used() as buffers:
        llm = load_llama(path, use_extra_buffers=extra, n_ctx=64, n_batch=64, n_ubatch=PROMPT, logits_all=True,
                         n_threads=threads, n_threads_batch=threads, verbose=False)
    if extra:
        crash_if_testing("probe")
    prompt = [1] + [int(t) for t in np.random.default_rng(1).integers(3, VOCAB, PROMPT - 1)]
    llm.eval(prompt)
    for tok in (5, 77, 200):
        llm.eval([tok])
    out = np.array(llm.scores[:llm.n_tokens], dtype=np.float64)
    llm.close()
    return out, sorted(set(buffers))


def main(argv: list[str]) -> int:
    from medgemma_cli.offline import forbid_sockets

    forbid_sockets("doctor")
    path = Path(argv[0]) / "probe.gguf"
    write_model(path)
    with_extra, extra_types = run(path, True)
    plain, _ = run(path, False)
    diff = float(np.abs(with_extra - plain).max())
    scale = float(np.abs(plain).max()) or 1.0
    same = bool(np.isfinite(with_extra).all()) and diff <= 0.05 * scale
    print(json.dumps({"same_logits": same, "max_difference": round(diff, 6), "logit_scale": round(scale, 4),
                      "buffer_types": extra_types}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
