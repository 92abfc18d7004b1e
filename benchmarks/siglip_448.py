"""Benchmark: MedSigLIP-448-shaped vision tower (1152 wide, 27 layers, 448 px; random weights) on ONNX Runtime
fp32 / int8 / q4 against transformers + torch fp32, same images, same thread count.

The text tower is kept small (2 layers): only image embedding is timed.

    python benchmarks/siglip_448.py --work DIR [--threads 2] [--images 3]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=3)
    args = ap.parse_args()
    import torch
    from transformers import SiglipConfig, SiglipModel

    torch.set_num_threads(args.threads)
    ckpt = args.work / "medsiglip-448-random"
    if not (ckpt / "config.json").is_file():
        cfg = SiglipConfig(
            vision_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                               image_size=448, patch_size=14),
            text_config=dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=2, num_attention_heads=16,
                             vocab_size=256, max_position_embeddings=64))
        SiglipModel(cfg).save_pretrained(ckpt)
        from medgemma_cli.synthetic import train_siglip_tokenizer

        train_siglip_tokenizer(ckpt / "spiece.model")
    from medgemma_cli.conversion import convert
    from medgemma_cli.siglip import Siglip, resolve_siglip

    rng = np.random.default_rng(0)
    px = rng.uniform(-1, 1, (args.images, 3, 448, 448)).astype(np.float32)
    model = SiglipModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        model.get_image_features(pixel_values=torch.tensor(px[:1]))  # warm-up
        t0 = time.perf_counter()
        ref = [model.get_image_features(pixel_values=torch.tensor(px[i:i + 1])) for i in range(args.images)]
        torch_s = (time.perf_counter() - t0) / args.images
    ref = np.concatenate([getattr(r, "pooler_output", r).numpy() for r in ref])
    del model
    print(json.dumps({"machine_cores": os.cpu_count(), "threads": args.threads,
                      "torch_fp32_s_per_image": round(torch_s, 2), "torch_images_per_s": round(1 / torch_s, 3)}),
          flush=True)
    for preset in ("fp32", "int8", "q4"):
        out = args.work / f"medsiglip-448-{preset}"
        if not (out / "manifest.json").is_file():
            t0 = time.perf_counter()
            convert(ckpt, out, preset=preset, overwrite=True)
            conv_s = time.perf_counter() - t0
        else:
            conv_s = None
        sig = Siglip(resolve_siglip(out), threads=args.threads)
        sig.vision.run(None, {"pixel_values": px[:1]})  # warm-up
        t0 = time.perf_counter()
        got = np.concatenate([sig.vision.run(None, {"pixel_values": px[i:i + 1]})[0] for i in range(args.images)])
        s = (time.perf_counter() - t0) / args.images
        cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        print(json.dumps({"preset": preset, "s_per_image": round(s, 2), "images_per_s": round(1 / s, 3),
                          "speedup_vs_torch_fp32": round(torch_s / s, 2),
                          "min_cosine_vs_torch": round(float(cos.min()), 6),
                          "convert_s": round(conv_s, 1) if conv_s else None,
                          "vision_onnx_bytes": sum(p.stat().st_size for p in out.glob("siglip-vision.onnx*"))}),
              flush=True)


if __name__ == "__main__":
    main()
