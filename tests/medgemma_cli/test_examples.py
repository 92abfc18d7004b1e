"""Every command line the README and `--help` show works as written: each is run by bash, unchanged, in a folder
where the files it names exist (tiny random checkpoints stand in for ~/models/…, pydicom's files for the scans).

Only these are not run, and why: a `--server` on another host (no network in tests; test_batch runs `--server`
against a real server on 127.0.0.1), and `bench` on the 4B/27B shapes (it builds 2.5–16 GB models: a
benchmark, not a test; `bench --shape tiny` and `--shape none` are run)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medgemma_cli.cli import app
from medgemma_cli.testing.documents import lab_report_pdf
from medgemma_cli.testing.slides import write_dicom_wsi, write_pyramidal_tiff
from pictures import picture

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
NOT_RUN = (re.compile(r"--server http://gpu-box"), re.compile(r"^medgemma bench(?!.*--shape (none|tiny))"))


def readme_examples() -> list[str]:
    lines, block = [], False
    for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            block = line.strip() in ("```bash", "```sh", "```console")
            continue
        if block and re.match(r"^([A-Z_]+=\S+ )*medgemma ", line):
            lines.append(line)
    return lines


def help_examples() -> list[str]:
    """The examples of every command's --help, those of sub-commands (`extract labs`, `cache info`) included."""
    commands = [*app.registered_commands,
                *(c for g in app.registered_groups if g.typer_instance for c in g.typer_instance.registered_commands)]
    return [ln.strip() for c in commands for ln in (c.callback.__doc__ or "").splitlines()
            if ln.strip().startswith("medgemma ")]


def _data(name: str) -> Path:
    return Path(get_testdata_file(name, download=False))


def _scans(work: Path) -> None:
    """The files the examples name, as a clinician's folder would hold them."""
    shutil.copy(_data("CT_small.dcm"), work / "chest.dcm")
    Image.fromarray(picture(64, 64, 60)).save(work / "chest.png")
    Image.fromarray(picture(48, 64, 90)).save(work / "scan.png")
    (work / "note.txt").write_text("Cough and fever for three days. No chest pain.\n", encoding="utf-8")
    shutil.copy(_data("test-SR.dcm"), work / "report-sr.dcm")
    (work / "questions.txt").write_text("Any findings?\nIs the heart enlarged?\n", encoding="utf-8")
    shutil.copy(_data("CT_small.dcm"), work / "chest-2025.dcm")  # the prior study of --prior's examples
    (work / "findings.schema.json").write_text(
        '{"type": "object", "properties": {"findings": {"type": "array", "items": {"type": "string", "maxLength": 20},'
        ' "maxItems": 3}, "urgent": {"type": "boolean"}}, "required": ["findings", "urgent"]}', encoding="utf-8")
    base = pydicom.dcmread(_data("CT_small.dcm"))
    for folder in ("ct-series", "night-run/ct"):
        (work / folder).mkdir(parents=True)
        for i in range(3):
            ds = copy.deepcopy(base)
            ds.SOPInstanceUID = f"{base.SOPInstanceUID}.{i}"
            ds.InstanceNumber = i + 1
            ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
            ds.save_as(work / folder / f"ct{i}.dcm")
    shutil.copy(_data("MR_small.dcm"), work / "night-run" / "mr.dcm")
    (work / "labs.pdf").write_bytes(lab_report_pdf())
    tissue = [(896, 0, 2688, 896), (0, 896, 896, 1792)]  # whole slides: 3 tissue patches at 10×
    write_pyramidal_tiff(work / "slide.tif", 2688, 1792, tissue, downsamples=(1, 4), mpp=0.5)
    write_dicom_wsi(work / "wsi-series", 2688, 1792, tissue, downsamples=(1, 4), mpp=1.0)
    write_dicom_wsi(work / "slides" / "s1", 2688, 1792, tissue, downsamples=(1, 4), mpp=1.0, jpeg=True)
    (work / "cxr").mkdir()
    for i in range(2):
        Image.fromarray(picture(64, 64, 40 * i)).save(work / "cxr" / f"cxr{i}.png")


def _imatrix(path: Path, checkpoint: Path) -> None:
    """An importance matrix in llama.cpp's GGUF format with one entry (layer 0's query projection), as
    `llama-imatrix` would write it for this model."""
    import json

    hidden = json.loads((checkpoint / "config.json").read_text())["text_config"]["hidden_size"]
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_string("general.type", "imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.linspace(0.5, 2.0, hidden, dtype=np.float32).reshape(1, -1))
    w.add_tensor("blk.0.attn_q.weight.counts", np.array([[1.0]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_ckpt, siglip_ckpt) -> Path:
    work = tmp_path_factory.mktemp("clinician")
    models = work / "models"
    models.mkdir()
    for name in ("medgemma-4b-it", "medgemma-27b-text-it"):
        (models / name).symlink_to(tiny_ckpt)
    (models / "medsiglip-448").symlink_to(siglip_ckpt)
    _scans(work)
    _imatrix(work / "imatrix.gguf", tiny_ckpt)
    return work


def run(line: str, work: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(work), "MEDGEMMA_HOME": str(home), "COLUMNS": "200",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", "-c", line], cwd=work, env=env, capture_output=True, text=True, timeout=600,
                          input="Any change since last year?\n/quit\n")


def test_the_examples_are_found():
    readme, helps = readme_examples(), help_examples()
    assert len(readme) >= 15 and len(helps) >= 25
    assert all(line.startswith("medgemma ") for line in helps)


def test_every_example_works_as_written(workdir):
    """Conversions first, each on a fresh machine (its own store; a second identical conversion is refused, as
    it should be); then everything else against a store holding what they made."""
    lines = list(dict.fromkeys(readme_examples() + help_examples()))
    converts = [ln for ln in lines if ln.startswith("medgemma convert ")]
    store = workdir / "home" / "models"
    store.mkdir(parents=True)
    failures = []

    def check(line: str, r: subprocess.CompletedProcess) -> None:
        if r.returncode != 0 or "Traceback" in r.stderr:
            failures.append(f"{line}\n  → exit {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}")

    for i, line in enumerate(converts):
        shutil.rmtree(workdir / "medgemma-4b-q8", ignore_errors=True)
        fresh = workdir / "stores" / str(i)
        check(line, run(line, workdir, fresh))
        for made in (fresh / "models").glob("*") if (fresh / "models").exists() else ():
            if not (store / made.name).exists():
                made.rename(store / made.name)
    for line in lines:
        if line in converts or any(p.search(line) for p in NOT_RUN):
            continue
        if "--gguf medgemma-4b-it-Q4_K_M.gguf" in line and not (workdir / "mmproj-F16.gguf").exists():
            made = next(p for p in store.iterdir() if (p / "mmproj.gguf").exists() and "q4_k_m" in p.name.lower())
            shutil.copy(made / "text.gguf", workdir / "medgemma-4b-it-Q4_K_M.gguf")
            shutil.copy(made / "mmproj.gguf", workdir / "mmproj-F16.gguf")
        check(line, run(line, workdir, workdir / "home"))
    assert not failures, "\n".join(failures)
