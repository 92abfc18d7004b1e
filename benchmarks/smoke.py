"""`--smoke` for the benchmark scripts: the same code on tiny shapes in seconds, so that a benchmark broken by a
change in the package fails the test suite (tests/benchmarks/test_smoke.py) instead of whoever next wants its
figures. A smoke run's figures mean nothing; each script says so in the first line it prints.
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path

NOTE = "smoke run: tiny shapes and few repeats, to check that the benchmark runs; no figure of it means anything"
SMOKE_HELP = "run the same code on tiny shapes in seconds (the test suite does); its figures mean nothing"


def add_arguments(ap: argparse.ArgumentParser, work: bool = True) -> None:
    """--smoke, and --work (required unless --smoke, which then defaults to a temporary folder)."""
    if work:
        ap.add_argument("--work", type=Path, help="scratch folder (required; a temporary one with --smoke)")
    ap.add_argument("--smoke", action="store_true", help=SMOKE_HELP)


def parse(ap: argparse.ArgumentParser, args: list[str] | None = None, **smoke_values: object) -> argparse.Namespace:
    """Parse the command line; with --smoke, `smoke_values` replace the options of the same names (the tiny
    shapes) and a missing --work becomes a temporary folder, removed at exit."""
    ns = ap.parse_args(args)
    if not ns.smoke:
        if hasattr(ns, "work") and ns.work is None:
            ap.error("the following arguments are required: --work")
        return ns
    for name, value in smoke_values.items():
        if not hasattr(ns, name):
            raise AttributeError(f"--smoke sets {name}, which is no option of this script")
        setattr(ns, name, value)
    if hasattr(ns, "work") and ns.work is None:
        ns.work = Path(tempfile.mkdtemp(prefix="medgemma-bench-smoke-"))
        atexit.register(shutil.rmtree, ns.work, ignore_errors=True)
    return ns
