"""Benchmark: PDF pages rendered to the model's input (#21): pages/s, through `collect` as `ask` reads a PDF
(the text layer read by pypdf, each page rendered by PDFium to 896 px and zero-padded to a square).

    python benchmarks/documents.py [--pages 60] [--smoke]

The document is medgemma_cli.testing.documents' lab report (a ruled table per page, Helvetica text), repeated to
`--pages` pages; the figure is the median of 3 runs, in this process, with the CPU named (JSON lines).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    import smoke

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pages", type=int, default=60)
    smoke.add_arguments(ap, work=False)
    args = smoke.parse(ap, pages=4)
    from medgemma_cli.inputs.collect import collect
    from medgemma_cli.machine import cpu_model, physical_cores
    from medgemma_cli.testing.documents import PAGES, lab_report_pdf

    pages = args.pages
    runs = 1 if args.smoke else 3
    if args.smoke:
        print(json.dumps({"smoke": smoke.NOTE}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        pdf = Path(tmp) / "labs.pdf"
        pdf.write_bytes(lab_report_pdf([PAGES[i % len(PAGES)] for i in range(pages)]))
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            c = collect([pdf], 896, max_pages=pages)
            times.append(time.perf_counter() - t)
            assert len(c.images) == pages
    s = statistics.median(times)
    print(json.dumps({"cpu": cpu_model(), "cores": physical_cores()}))
    print(json.dumps({"pages": pages, "size_px": 896, "runs": runs, "median_s": round(s, 3),
                      "pages_per_s": round(pages / s, 2)}))


if __name__ == "__main__":
    main()
