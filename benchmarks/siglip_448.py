"""Benchmark: MedSigLIP-448-shaped vision tower (1152 wide, 27 layers, 448 px; random weights) on ONNX Runtime
fp32 / int8 / q4 against transformers + torch fp32, same images, same thread count.

The text tower is kept small (2 layers): only image embedding is timed.

    python benchmarks/siglip_448.py --work DIR [--threads 2] [--images 3]
    python benchmarks/siglip_448.py --smoke     # a tiny SigLIP in seconds; its figures mean nothing
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import smoke


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    smoke.add_arguments(ap)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=3)
    args = smoke.parse(ap, threads=1, images=1)
    shape = "tiny" if args.smoke else "448"
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE, "shape": shape}), flush=True)
    import torch
    from transformers import SiglipConfig, SiglipModel

    from medgemma_cli.synthetic import SIGLIP_SHAPES, train_siglip_tokenizer

    torch.set_num_threads(args.threads)
    ckpt = args.work / f"medsiglip-{shape}-random"
    if not (ckpt / "config.json").is_file():
        SiglipModel(SiglipConfig(**SIGLIP_SHAPES[shape])).save_pretrained(ckpt)
        train_siglip_tokenizer(ckpt / "spiece.model")
    from medgemma_cli.conversion import convert
    from medgemma_cli.siglip import Siglip, resolve_siglip

    rng = np.random.default_rng(0)
    size = SIGLIP_SHAPES[shape]["vision_config"]["image_size"]
    px = rng.uniform(-1, 1, (args.images, 3, size, size)).astype(np.float32)
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
        out = args.work / f"medsiglip-{shape}-{preset}"
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
